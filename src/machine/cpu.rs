//! The x86 CPU as far as guest memory cares: its vendor (QEMU moves RAM above 4 GiB to 1 TiB
//! for AMD vCPUs), whether it is 64-bit, and its physical address width, which bounds where RAM
//! and the 64-bit PCI hole may go. Resolved from `-cpu` the way QEMU 10 creates the board's
//! first CPU: the model's definition, then the accelerator's defaults (under KVM a named model
//! takes the host's vendor, and `host`/`max` the host's address width), then the `-cpu`
//! properties in order, then `+feature` and `-feature`, then the range checks of realize.
//!
//! The model and property tables are QEMU 10's, recorded from the binary
//! (`scripts/record-qemu-cpu-models`, file `x86_cpu_data.rs`).

pub use super::cpu_model::ModelData;
use crate::error::{Error, Result};
use crate::options::cmdline::Accel;
use crate::options::cpu::{CpuFeature, CpuOption};

/// The largest physical address width of an x86-64 target (QEMU's TARGET_PHYS_ADDR_SPACE_BITS).
const MAX_PHYS_BITS: u32 = 52;
/// QEMU's default width for 64-bit models that do not take the host's (TCG_PHYS_ADDR_BITS).
const DEFAULT_PHYS_BITS: u32 = 40;

/// What the machine's memory map needs of its first CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct X86Cpu {
    /// QEMU's `machine->cpu_type`, e.g. "qemu64-x86_64-cpu".
    pub type_name: String,
    pub vendor: String,
    pub long_mode: bool,
    pub phys_bits: u32,
}

impl X86Cpu {
    /// QEMU's IS_AMD_CPU: exactly the vendor "AuthenticAMD" (not Hygon).
    pub fn is_amd(&self) -> bool {
        self.vendor == "AuthenticAMD"
    }
}

/// The host CPU, for what KVM passes through.
pub trait HostCpu {
    fn vendor(&self) -> String;
    /// CPUID 8000_0008h EAX[7:0], or 36 on a CPU without that leaf (QEMU's fallback).
    fn phys_bits(&self) -> u32;
}

/// The CPU this process runs on.
pub struct ThisHost;

impl HostCpu for ThisHost {
    #[cfg(target_arch = "x86_64")]
    fn vendor(&self) -> String {
        let r = std::arch::x86_64::__cpuid(0);
        let mut v = Vec::with_capacity(12);
        for word in [r.ebx, r.edx, r.ecx] {
            v.extend_from_slice(&word.to_le_bytes());
        }
        String::from_utf8_lossy(&v).into_owned()
    }

    #[cfg(target_arch = "x86_64")]
    fn phys_bits(&self) -> u32 {
        // Leaf 0x80000000 reports the highest extended leaf; 0x80000008 is read only if it
        // exists.
        if std::arch::x86_64::__cpuid(0x8000_0000).eax >= 0x8000_0008 {
            std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff
        } else {
            36
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn vendor(&self) -> String {
        String::new()
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn phys_bits(&self) -> u32 {
        36
    }
}

/// The model `name` names, or None.
pub fn find_model(name: &str) -> Option<&'static ModelData> {
    super::x86_cpu_data::MODELS.iter().find(|m| m.name == name)
}

/// The model QOM type `type_name` ("qemu64-x86_64-cpu") is.
pub fn model_of_type(type_name: &str) -> Option<&'static ModelData> {
    super::x86_cpu_data::MODELS
        .iter()
        .find(|m| m.type_name == type_name)
}

/// QEMU's parse_cpu_option, for a board whose default CPU type is `default_type`: the model of
/// `-cpu` (or the default without one) and its features. Errors: an empty `-cpu`, a model QEMU
/// does not have ("unable to find CPU model 'x'"), a malformed `tsc-freq`. The warnings QEMU
/// prints while reading the features go to `warn`.
pub fn parse_cpu_option(
    option: Option<&str>,
    default_type: &str,
    warn: &mut dyn FnMut(String),
) -> Result<(&'static ModelData, CpuOption)> {
    let Some(text) = option else {
        let model = model_of_type(default_type).ok_or_else(|| {
            Error::generic(format!(
                "the board's CPU type '{default_type}' is not an x86 CPU model"
            ))
        })?;
        return Ok((
            model,
            CpuOption {
                model: model.name.to_string(),
                features: Vec::new(),
                warnings: Vec::new(),
            },
        ));
    };
    let option = CpuOption::parse(text)?;
    let model = find_model(&option.model)
        .ok_or_else(|| Error::invalid(format!("unable to find CPU model '{}'", option.model)))?;
    for w in &option.warnings {
        warn(format!("warning: {w}"));
    }
    Ok((model, option))
}

/// The QAPI type of property `name` of `model`, if it has one.
fn property_type(model: &ModelData, name: &str) -> Option<&'static str> {
    let extra = matches!(model.name, "max" | "host")
        .then_some(super::x86_cpu_data::MAX_HOST_PROPERTIES)
        .unwrap_or(&[]);
    super::x86_cpu_data::PROPERTIES
        .iter()
        .chain(extra)
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
}

/// The CPU's state as properties set it, before realize.
struct Building {
    vendor: String,
    lm: bool,
    pae: bool,
    pse36: bool,
    phys_bits: u32,
    host_phys_bits: bool,
    host_phys_bits_limit: u8,
}

/// A value as QEMU's string input visitor reads a property of QAPI type `ty`; the number for
/// the ones hostmem uses. Words as QEMU 10's.
fn parse_value(name: &str, ty: &str, value: &str) -> Result<u64> {
    use crate::options::values::{parse_bool, parse_i64_any, parse_u64_any};
    let expects = |what: &str| Error::invalid(format!("Parameter '{name}' expects {what}"));
    let unsigned = |max: u64, what: &str| {
        let v = parse_u64_any(value).ok_or_else(|| expects("uint64"))?;
        if v > max {
            return Err(expects(what));
        }
        Ok(v)
    };
    match ty {
        "bool" => parse_bool(value)
            .map(u64::from)
            .map_err(|_| expects("'on' or 'off'")),
        "uint8" => unsigned(u8::MAX.into(), "uint8_t"),
        "uint16" => unsigned(u16::MAX.into(), "uint16_t"),
        "uint32" => unsigned(u32::MAX.into(), "uint32_t"),
        "uint64" => unsigned(u64::MAX, "uint64_t"),
        "int" | "int32" => {
            let v = parse_i64_any(value).ok_or_else(|| expects("int64"))?;
            if ty == "int32" && i32::try_from(v).is_err() {
                return Err(expects("int32_t"));
            }
            Ok(v as u64)
        }
        _ => Ok(0),
    }
}

/// Creates and realizes the CPU as QEMU does for the board's first CPU: the model's
/// definition and the accelerator's defaults, every `NAME=VALUE` of `-cpu` in order (QEMU's
/// "can't apply global" errors), then every `+NAME` and `-NAME`, then realize's checks.
/// Warnings (KVM's about phys-bits) go to `warn`.
pub fn realize(
    model: &ModelData,
    option: &CpuOption,
    accel: Option<Accel>,
    host: &dyn HostCpu,
    warn: &mut dyn FnMut(String),
) -> Result<X86Cpu> {
    let kvm = accel == Some(Accel::Kvm);
    if model.host_cpuid_required && !kvm {
        return Err(Error::invalid(format!(
            "CPU model '{}' requires KVM or HVF",
            model.name
        )));
    }
    let mut cpu = Building {
        vendor: model.vendor.to_string(),
        lm: model.lm,
        pae: model.pae,
        pse36: model.pse36,
        phys_bits: 0,
        host_phys_bits: false,
        host_phys_bits_limit: 0,
    };
    if kvm {
        // Under KVM every named model shows the host's vendor, and "host" and "max" the host's
        // address width.
        cpu.vendor = host.vendor();
        cpu.host_phys_bits = matches!(model.name, "host" | "max");
    }
    let driver = model.type_name;
    let not_found = |name: &str| Error::invalid(format!("Property '{driver}.{name}' not found"));
    for feature in &option.features {
        let CpuFeature::Set { name, value } = feature else {
            continue;
        };
        let global = |e: Error| e.prepend(&format!("can't apply global {driver}.{name}={value}: "));
        let ty = property_type(model, name).ok_or_else(|| global(not_found(name)))?;
        let v = parse_value(name, ty, value).map_err(global)?;
        match name.as_str() {
            "phys-bits" => cpu.phys_bits = v as u32,
            "host-phys-bits" => cpu.host_phys_bits = v != 0,
            "host-phys-bits-limit" => cpu.host_phys_bits_limit = v as u8,
            "lm" | "i64" => cpu.lm = v != 0,
            "pae" => cpu.pae = v != 0,
            "pse36" => cpu.pse36 = v != 0,
            "vendor" => {
                if value.len() != 12 {
                    return Err(global(Error::invalid(
                        "value of property 'vendor' must consist of exactly 12 characters",
                    )));
                }
                cpu.vendor = value.clone();
            }
            _ => {}
        }
    }
    for feature in &option.features {
        let (name, on) = match feature {
            CpuFeature::Plus(n) => (n, true),
            CpuFeature::Minus(n) => (n, false),
            CpuFeature::Set { .. } => continue,
        };
        let ty = property_type(model, name).ok_or_else(|| not_found(name))?;
        if ty != "bool" {
            // QEMU sets "+x" as a boolean, which a property of another type refuses.
            let expected = match ty {
                "uint8" | "uint16" | "uint32" | "uint64" | "int" | "int32" => "integer",
                _ => "string",
            };
            return Err(Error::invalid(format!(
                "Invalid parameter type for '{name}', expected: {expected}"
            )));
        }
        match name.as_str() {
            "lm" | "i64" => cpu.lm = on,
            "pae" => cpu.pae = on,
            "pse36" => cpu.pse36 = on,
            _ => {}
        }
    }
    let phys_bits = finish_phys_bits(&cpu, kvm, host, warn)?;
    Ok(X86Cpu {
        type_name: model.type_name.to_string(),
        vendor: cpu.vendor,
        long_mode: cpu.lm,
        phys_bits,
    })
}

/// Realize's physical address width: under KVM the host's for `host-phys-bits` (capped by the
/// limit), with QEMU's warning when an explicit width differs from the host's; 40 for a
/// 64-bit CPU that has none; 36 or 32 for a 32-bit one, where it cannot be set.
fn finish_phys_bits(
    cpu: &Building,
    kvm: bool,
    host: &dyn HostCpu,
    warn: &mut dyn FnMut(String),
) -> Result<u32> {
    let mut bits = cpu.phys_bits;
    if !cpu.lm {
        if bits != 0 {
            return Err(Error::invalid(
                "phys-bits is not user-configurable in 32 bit",
            ));
        }
        return Ok(if cpu.pae || cpu.pse36 { 36 } else { 32 });
    }
    if kvm {
        let host_bits = host.phys_bits();
        if bits != host_bits && bits != 0 {
            warn(format!(
                "warning: Host physical bits ({host_bits}) does not match phys-bits property ({bits})"
            ));
        }
        if cpu.host_phys_bits {
            bits = host_bits;
            if cpu.host_phys_bits_limit != 0 && bits > u32::from(cpu.host_phys_bits_limit) {
                bits = u32::from(cpu.host_phys_bits_limit);
            }
        }
    }
    if bits != 0 && !(32..=MAX_PHYS_BITS).contains(&bits) {
        return Err(Error::invalid(format!(
            "phys-bits should be between 32 and {MAX_PHYS_BITS}  (but is {bits})"
        )));
    }
    Ok(if bits == 0 { DEFAULT_PHYS_BITS } else { bits })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeHost(&'static str, u32);

    impl HostCpu for FakeHost {
        fn vendor(&self) -> String {
            self.0.to_string()
        }
        fn phys_bits(&self) -> u32 {
            self.1
        }
    }

    const INTEL_46: FakeHost = FakeHost("GenuineIntel", 46);

    /// Realizes `-cpu text` (or the pc default) under `accel`; (cpu, warnings).
    fn cpu(text: Option<&str>, accel: Option<Accel>) -> Result<(X86Cpu, Vec<String>)> {
        let mut warnings = Vec::new();
        let mut warn = |w: String| warnings.push(w);
        let (model, option) = parse_cpu_option(text, "qemu64-x86_64-cpu", &mut warn)?;
        let cpu = realize(model, &option, accel, &INTEL_46, &mut warn)?;
        Ok((cpu, warnings))
    }

    fn message(r: Result<(X86Cpu, Vec<String>)>) -> String {
        r.unwrap_err().message().to_string()
    }

    #[test]
    fn the_default_is_qemu64_amd_40_bits_under_tcg() {
        let (c, w) = cpu(None, None).unwrap();
        assert_eq!(c.type_name, "qemu64-x86_64-cpu");
        assert!(c.is_amd() && c.long_mode && w.is_empty());
        assert_eq!(c.phys_bits, 40);
    }

    #[test]
    fn kvm_gives_named_models_the_hosts_vendor_and_max_the_hosts_width() {
        let (c, _) = cpu(Some("qemu64"), Some(Accel::Kvm)).unwrap();
        assert_eq!((c.vendor.as_str(), c.phys_bits), ("GenuineIntel", 40));
        let (c, _) = cpu(Some("max"), Some(Accel::Kvm)).unwrap();
        assert_eq!(c.phys_bits, 46);
        let (c, _) = cpu(
            Some("qemu64,host-phys-bits=on,host-phys-bits-limit=42"),
            Some(Accel::Kvm),
        )
        .unwrap();
        assert_eq!(c.phys_bits, 42);
        // Under TCG host-phys-bits means nothing.
        assert_eq!(
            cpu(Some("qemu64,host-phys-bits=on"), None)
                .unwrap()
                .0
                .phys_bits,
            40
        );
        // An explicit vendor wins over the host's.
        let (c, _) = cpu(Some("EPYC,vendor=GenuineIntel"), None).unwrap();
        assert!(!c.is_amd());
    }

    #[test]
    fn an_explicit_width_under_kvm_warns_when_it_is_not_the_hosts() {
        let (c, w) = cpu(Some("qemu64,phys-bits=41"), Some(Accel::Kvm)).unwrap();
        assert_eq!(c.phys_bits, 41);
        assert_eq!(
            w,
            ["warning: Host physical bits (46) does not match phys-bits property (41)"]
        );
    }

    #[test]
    fn models_and_properties_are_refused_in_qemus_words() {
        assert_eq!(
            message(cpu(Some("Qemu64"), None)),
            "unable to find CPU model 'Qemu64'"
        );
        assert_eq!(message(cpu(Some(""), None)), "-cpu option cannot be empty");
        assert_eq!(
            message(cpu(Some("host"), None)),
            "CPU model 'host' requires KVM or HVF"
        );
        assert_eq!(
            message(cpu(Some("qemu64,foo=1,phys-bits=x"), None)),
            "can't apply global qemu64-x86_64-cpu.foo=1: Property 'qemu64-x86_64-cpu.foo' not found"
        );
        assert_eq!(
            message(cpu(Some("qemu64,phys-bits=x,foo=1"), None)),
            "can't apply global qemu64-x86_64-cpu.phys-bits=x: Parameter 'phys-bits' expects uint64"
        );
        assert_eq!(
            message(cpu(Some("qemu64,phys-bits=4294967296"), None)),
            "can't apply global qemu64-x86_64-cpu.phys-bits=4294967296: Parameter 'phys-bits' expects uint32_t"
        );
        assert_eq!(
            message(cpu(Some("qemu64,host-phys-bits=maybe"), None)),
            "can't apply global qemu64-x86_64-cpu.host-phys-bits=maybe: Parameter 'host-phys-bits' expects 'on' or 'off'"
        );
        assert_eq!(
            message(cpu(Some("qemu64,vendor=abc"), None)),
            "can't apply global qemu64-x86_64-cpu.vendor=abc: value of property 'vendor' must consist of exactly 12 characters"
        );
        assert_eq!(
            message(cpu(Some("qemu64,+foo"), None)),
            "Property 'qemu64-x86_64-cpu.foo' not found"
        );
        assert_eq!(
            message(cpu(Some("qemu64,phys-bits=20"), None)),
            "phys-bits should be between 32 and 52  (but is 20)"
        );
        assert_eq!(
            message(cpu(Some("athlon,phys-bits=33"), None)),
            "phys-bits is not user-configurable in 32 bit"
        );
        // "max" has properties the named models lack.
        assert!(cpu(Some("max,migratable=off"), None).is_ok());
        assert!(cpu(Some("qemu64,migratable=off"), None).is_err());
    }

    #[test]
    fn thirty_two_bit_cpus_get_36_or_32_bits() {
        assert_eq!(cpu(Some("qemu32"), None).unwrap().0.phys_bits, 36);
        assert_eq!(cpu(Some("486"), None).unwrap().0.phys_bits, 32);
        let (c, _) = cpu(Some("qemu64,-lm"), None).unwrap();
        assert!(!c.long_mode);
        assert_eq!(c.phys_bits, 36);
        // "+lm" comes after "lm=off", as in QEMU.
        let (c, w) = cpu(Some("qemu64,+lm,lm=off"), None).unwrap();
        assert!(c.long_mode);
        assert_eq!(w.len(), 2);
        assert_eq!(cpu(Some("base"), None).unwrap().0.phys_bits, 32);
    }

    #[test]
    fn the_model_table_is_qemus() {
        assert_eq!(super::super::x86_cpu_data::MODELS.len(), 154);
        let epyc = find_model("EPYC-v4").unwrap();
        assert_eq!((epyc.vendor, epyc.lm), ("AuthenticAMD", true));
        assert_eq!(
            find_model("Skylake-Client-IBRS").unwrap().vendor,
            "GenuineIntel"
        );
        assert!(find_model("qemu64-v2").is_none());
        assert_eq!(
            property_type(find_model("qemu64").unwrap(), "phys-bits"),
            Some("uint32")
        );
    }
}
