//! QEMU's command line, as far as machine RAM and the small VMM are concerned: `-m`, `-M` /
//! `-machine`, `-mem-path`, `-mem-prealloc`, `-object`, `-numa`, `-smp`, `-accel`, `-S`,
//! `-monitor`, and the options users add out of habit. Pure: argv in, [`Cmdline`] out.
//!
//! Errors read as QEMU 10 prints them. Those found while reading one option carry that option as
//! a location prefix ("-m foo: Parameter 'size' expects ..."), exactly where QEMU prints one.

use crate::options::error::OptionError;
use crate::options::values::{expects, parse_keyval, strtosz, Result, SizeFault};

/// `-m [size=]N[,slots=S,maxmem=M]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryOption {
    /// Bytes; `None` when absent (and `-m 0` means "the board's default", also `None`).
    pub size: Option<u64>,
    pub slots: Option<u64>,
    pub maxmem: Option<u64>,
}

/// `-numa node,...` (other `-numa` types are accepted and ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNode {
    pub nodeid: Option<u32>,
    pub memdev: Option<String>,
    pub mem: Option<u64>,
    /// The option text, for location-prefixed errors found later.
    pub text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// One `-object` option, kept as text: objects are created after the machine type is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectOption {
    pub text: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cmdline {
    pub machine_type: Option<String>,
    pub memory_backend: Option<String>,
    /// Other `-machine` properties (name, value), checked once the type is known.
    pub machine_props: Vec<(String, String)>,
    pub memory: MemoryOption,
    /// The text of the last `-m`, for errors that QEMU reports with it.
    pub memory_text: Option<String>,
    pub mem_path: Option<String>,
    pub mem_prealloc: bool,
    pub objects: Vec<ObjectOption>,
    pub numa: Vec<NumaNode>,
    pub smp_cpus: Option<u32>,
    /// The accelerator the machine runs on.
    pub accel: Option<Accel>,
    /// The first `-accel` / `-enable-kvm`, and `-machine accel=`: QEMU refuses both at once.
    pub accel_option: Option<Accel>,
    pub accel_machine: Option<Accel>,
    /// `-accel kvm,max-slot-size=SIZE` (hostmem's own property; 0 = the kernel's limit).
    pub kvm_max_slot_size: u64,
    pub start_paused: bool,
    pub monitor_stdio: bool,
    /// `-incoming URI` (or `defer`).
    pub incoming: Option<String>,
    /// `-global migration.send-switchover-start=on|off` (the machine type's default if absent).
    pub send_switchover_start: Option<bool>,
}

/// Options taking an argument that mean nothing to hostmem and are accepted as in QEMU.
const IGNORED_WITH_ARG: &[&str] = &[
    "-display", "-serial", "-name", "-vga", "-cpu", "-chardev", "-qmp", "-d", "-D", "-L", "-bios",
];
/// Options without an argument that mean nothing here.
const IGNORED_FLAGS: &[&str] = &[
    "-nodefaults",
    "-nographic",
    "-no-reboot",
    "-no-shutdown",
    "-no-user-config",
];

impl Cmdline {
    /// Reads `args` (without the program name).
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Cmdline> {
        let mut c = Cmdline::default();
        let mut i = 0;
        while i < args.len() {
            let raw = args[i].as_ref();
            i += 1;
            if !raw.starts_with('-') || raw == "-" {
                // QEMU takes a bare word as the disk image; hostmem has no disks.
                return Err(OptionError::DiskImage(raw.to_string()));
            }
            // QEMU accepts "--opt" as "-opt".
            let opt = if raw.starts_with("--") {
                &raw[1..]
            } else {
                raw
            };
            if IGNORED_FLAGS.contains(&opt) {
                continue;
            }
            let flag = |name: &str| opt == name;
            if flag("-S") {
                c.start_paused = true;
                continue;
            }
            if flag("-mem-prealloc") {
                c.mem_prealloc = true;
                continue;
            }
            if flag("-enable-kvm") {
                c.parse_accel("kvm")?;
                continue;
            }
            let takes_arg = matches!(
                opt,
                "-m" | "-M"
                    | "-machine"
                    | "-mem-path"
                    | "-object"
                    | "-numa"
                    | "-smp"
                    | "-accel"
                    | "-monitor"
                    | "-incoming"
                    | "-global"
            ) || IGNORED_WITH_ARG.contains(&opt);
            if !takes_arg {
                return Err(OptionError::InvalidOption(raw.to_string()));
            }
            let Some(arg) = args.get(i).map(|a| a.as_ref()) else {
                return Err(OptionError::RequiresArgument(raw.to_string()));
            };
            i += 1;
            let at = |e: OptionError| e.at(opt, arg);
            match opt {
                "-m" => {
                    // QEMU checks a bare number again once it has appended "M", without the
                    // option's location: that second failure comes back as a generic error.
                    c.memory = parse_memory(arg).map_err(|e| located(e, at))?;
                    c.memory_text = Some(arg.to_string());
                }
                "-M" | "-machine" => c.parse_machine(arg).map_err(at)?,
                "-mem-path" => c.mem_path = Some(arg.to_string()),
                "-object" => c.objects.push(ObjectOption {
                    text: arg.to_string(),
                }),
                "-numa" => {
                    if let Some(node) = parse_numa(arg).map_err(at)? {
                        c.numa.push(node);
                    }
                }
                // QEMU checks the topology after reading the option, without its location.
                "-smp" => c.smp_cpus = Some(parse_smp(arg).map_err(|e| located(e, at))?),
                "-accel" => c.parse_accel(arg).map_err(at)?,
                "-incoming" => c.incoming = Some(arg.to_string()),
                "-global" => c.parse_global(arg).map_err(at)?,
                "-monitor" => {
                    if arg != "stdio" {
                        return Err(at(OptionError::NotACharDriver(arg.to_string())));
                    }
                    c.monitor_stdio = true;
                }
                _ => {} // accepted and ignored
            }
        }
        c.finish_accel()?;
        Ok(c)
    }

    /// `-global DRIVER.PROP=VALUE`: the migration object's `send-switchover-start` is read;
    /// device properties mean nothing to hostmem and are accepted, as QEMU accepts unknown
    /// globals with a warning at most.
    fn parse_global(&mut self, arg: &str) -> Result<()> {
        let (key, value) = arg.split_once('=').ok_or_else(|| OptionError::BadValue {
            name: "global".into(),
            value: arg.to_string(),
        })?;
        if key == "migration.send-switchover-start" {
            self.send_switchover_start = Some(crate::options::values::parse_bool_param(
                "send-switchover-start",
                value,
            )?);
        }
        Ok(())
    }

    fn parse_machine(&mut self, arg: &str) -> Result<()> {
        for (key, value) in parse_keyval(arg, Some("type"))? {
            match key.as_str() {
                "type" => self.machine_type = Some(value),
                "memory-backend" => self.memory_backend = Some(value),
                "accel" => {
                    self.accel_machine = Some(parse_accel_name(&value)?);
                }
                _ => self.machine_props.push((key, value)),
            }
        }
        Ok(())
    }

    /// One `-accel`: QEMU tries them in order and keeps the first that starts, so the first
    /// given wins (every accelerator hostmem knows starts when asked).
    fn parse_accel(&mut self, arg: &str) -> Result<()> {
        let mut accel = None;
        let mut max_slot_size = 0;
        for (key, value) in parse_keyval(arg, Some("accel"))? {
            match key.as_str() {
                "accel" => accel = Some(parse_accel_name(&value)?),
                "max-slot-size" if accel == Some(Accel::Kvm) => {
                    max_slot_size =
                        strtosz(&value).map_err(|_| expects("max-slot-size", "a size value"))?;
                }
                _ => {
                    let class = match accel {
                        Some(Accel::Kvm) => "kvm-accel",
                        _ => "tcg-accel",
                    };
                    return Err(OptionError::PropertyNotFound {
                        class: class.to_string(),
                        name: key,
                    });
                }
            }
        }
        if self.accel_option.is_none() {
            self.accel_option = accel;
            self.kvm_max_slot_size = max_slot_size;
        }
        Ok(())
    }

    /// Settles the accelerator once every option is read.
    fn finish_accel(&mut self) -> Result<()> {
        match (self.accel_option, self.accel_machine) {
            (Some(_), Some(_)) => Err(OptionError::AccelConflict),
            (a, m) => {
                self.accel = a.or(m);
                Ok(())
            }
        }
    }
}

fn parse_accel_name(name: &str) -> Result<Accel> {
    match name {
        "kvm" => Ok(Accel::Kvm),
        "tcg" => Ok(Accel::Tcg),
        _ => Err(OptionError::InvalidAccelerator(name.to_string())),
    }
}

/// `e` at the option being read, unless QEMU reports it without (a check made after reading).
fn located(e: OptionError, at: impl FnOnce(OptionError) -> OptionError) -> OptionError {
    if e.is_located() {
        at(e)
    } else {
        e
    }
}

/// `-m`: MiB when the number has no suffix; 0 means the board's default.
pub fn parse_memory(arg: &str) -> Result<MemoryOption> {
    let mut m = MemoryOption::default();
    for (key, value) in parse_keyval(arg, Some("size"))? {
        match key.as_str() {
            "size" => {
                // The value must be a size as written; a bare number then means MiB.
                let bytes = strtosz(&value).map_err(|fault| {
                    if value.starts_with('-') || fault == SizeFault::Range {
                        OptionError::OutOfRange {
                            name: "size".into(),
                            value: value.clone(),
                        }
                    } else {
                        OptionError::ExpectsSize("size".into())
                    }
                })?;
                let bytes = if value.ends_with(|ch: char| ch.is_ascii_digit()) {
                    strtosz(&format!("{value}M")).map_err(|_| OptionError::MemorySizeReparse)?
                } else {
                    bytes
                };
                m.size = (bytes != 0).then_some(bytes);
            }
            "slots" => {
                m.slots = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| expects("slots", "a number"))?,
                )
            }
            "maxmem" => {
                m.maxmem =
                    Some(strtosz(&value).map_err(|_| OptionError::ExpectsSize("maxmem".into()))?)
            }
            _ => return Err(OptionError::InvalidParameter(key)),
        }
    }
    Ok(m)
}

fn parse_numa(arg: &str) -> Result<Option<NumaNode>> {
    let pairs = parse_keyval(arg, Some("type"))?;
    let ty = pairs
        .iter()
        .find(|(k, _)| k == "type")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    match ty {
        "node" => {}
        "dist" | "cpu" | "hmat-lb" | "hmat-cache" => return Ok(None),
        _ => {
            return Err(OptionError::BadValue {
                name: "type".into(),
                value: ty.to_string(),
            })
        }
    }
    let mut node = NumaNode {
        nodeid: None,
        memdev: None,
        mem: None,
        text: arg.to_string(),
    };
    for (key, value) in pairs {
        match key.as_str() {
            "type" | "cpus" | "initiator" => {}
            "nodeid" => {
                node.nodeid = Some(
                    value
                        .parse()
                        .map_err(|_| expects("nodeid", "a uint64 value"))?,
                )
            }
            "memdev" => node.memdev = Some(value),
            "mem" => node.mem = Some(crate::options::values::parse_size(&value)?),
            _ => return Err(OptionError::InvalidParameter(key)),
        }
    }
    if node.mem.is_some() && node.memdev.is_some() {
        return Err(OptionError::NumaMemAndMemdev);
    }
    Ok(Some(node))
}

fn parse_smp(arg: &str) -> Result<u32> {
    let mut cpus = None;
    for (key, value) in parse_keyval(arg, Some("cpus"))? {
        if key == "cpus" {
            let n: u32 = value.parse().map_err(|_| OptionError::SmpCpusNotInteger)?;
            if n == 0 {
                return Err(OptionError::ZeroTopology);
            }
            cpus = Some(n);
        }
    }
    Ok(cpus.unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::options::error::SIZE_HINT;

    /// Parses `s`, with errors as C callers get them (message, hint, class).
    fn parse(s: &str) -> crate::Result<Cmdline> {
        let args: Vec<&str> = s.split_whitespace().collect();
        Ok(Cmdline::parse(&args)?)
    }

    #[test]
    fn bare_m_is_mebibytes_and_suffixes_are_kept() {
        assert_eq!(parse("-m 64").unwrap().memory.size, Some(64 << 20));
        assert_eq!(parse("-m 4G").unwrap().memory.size, Some(4 << 30));
        assert_eq!(
            parse("-m size=2G,slots=4,maxmem=8G").unwrap().memory,
            MemoryOption {
                size: Some(2 << 30),
                slots: Some(4),
                maxmem: Some(8 << 30)
            }
        );
    }

    #[test]
    fn m_zero_means_board_default() {
        assert_eq!(parse("-m 0").unwrap().memory.size, None);
    }

    #[test]
    fn malformed_m_reads_like_qemu() {
        let e = parse("-m foo").unwrap_err();
        assert_eq!(
            e.message(),
            "-m foo: Parameter 'size' expects a non-negative number below 2^64"
        );
        assert_eq!(e.hint(), Some(SIZE_HINT));
        assert_eq!(
            parse("-m -5").unwrap_err().message(),
            "-m -5: Value '-5' is out of range for parameter 'size'"
        );
        assert_eq!(
            parse("-m 64M,foo=1").unwrap_err().message(),
            "-m 64M,foo=1: Invalid parameter 'foo'"
        );
        assert_eq!(
            parse("-m").unwrap_err().message(),
            "-m: requires an argument"
        );
    }

    #[test]
    fn machine_options_split_type_and_backend() {
        let c = parse("-M pc,memory-backend=m0 -object memory-backend-ram,id=m0,size=1G").unwrap();
        assert_eq!(c.machine_type.as_deref(), Some("pc"));
        assert_eq!(c.memory_backend.as_deref(), Some("m0"));
        assert_eq!(c.objects[0].text, "memory-backend-ram,id=m0,size=1G");
        let c = parse("-machine memory-backend=m0 -machine q35").unwrap();
        assert_eq!(c.machine_type.as_deref(), Some("q35"));
        assert_eq!(c.memory_backend.as_deref(), Some("m0"));
    }

    #[test]
    fn habitual_options_are_accepted() {
        let c = parse("-nodefaults -nographic -display none -accel tcg -S -monitor stdio").unwrap();
        assert!(c.start_paused && c.monitor_stdio);
        assert_eq!(c.accel, Some(Accel::Tcg));
    }

    #[test]
    fn unknown_options_are_refused_as_qemu_does() {
        assert_eq!(parse("-foo").unwrap_err().message(), "-foo: invalid option");
        assert_eq!(
            parse("-accel foo").unwrap_err().message(),
            "-accel foo: invalid accelerator foo"
        );
        assert_eq!(
            parse("-monitor stdio2").unwrap_err().message(),
            "-monitor stdio2: 'stdio2' is not a valid char driver"
        );
    }

    #[test]
    fn the_first_accel_wins_and_machine_accel_does_not_mix() {
        assert_eq!(
            parse("-accel tcg -accel kvm").unwrap().accel,
            Some(Accel::Tcg)
        );
        assert_eq!(
            parse("-enable-kvm -accel tcg").unwrap().accel,
            Some(Accel::Kvm)
        );
        assert_eq!(parse("-machine accel=kvm").unwrap().accel, Some(Accel::Kvm));
        assert_eq!(
            parse("-accel tcg -machine accel=kvm")
                .unwrap_err()
                .message(),
            "The -accel and \"-machine accel=\" options are incompatible"
        );
    }

    #[test]
    fn m_values_are_checked_as_written_then_as_mebibytes() {
        // "1.5" is no size without a suffix, so QEMU refuses it before appending "M".
        assert_eq!(
            parse("-m 1.5").unwrap_err().message(),
            "-m 1.5: Parameter 'size' expects a non-negative number below 2^64"
        );
        assert_eq!(parse("-m 1.5G").unwrap().memory.size, Some(3 << 29));
        // A number that only overflows once it means MiB fails later, without the location.
        assert_eq!(
            parse("-m 17592186044416").unwrap_err().message(),
            "Parameter 'memory.size' expects size"
        );
        assert_eq!(
            parse("-m 100000000000000000000").unwrap_err().message(),
            "-m 100000000000000000000: Value '100000000000000000000' is out of range for parameter 'size'"
        );
        assert_eq!(
            parse("-m 64M,slots=x,maxmem=1G").unwrap_err().message(),
            "-m 64M,slots=x,maxmem=1G: Parameter 'slots' expects a number"
        );
        let e = parse("-m 64M,maxmem=x").unwrap_err();
        assert_eq!(
            e.message(),
            "-m 64M,maxmem=x: Parameter 'maxmem' expects a non-negative number below 2^64"
        );
        assert_eq!(e.hint(), Some(SIZE_HINT));
        assert_eq!(
            parse("-smp x").unwrap_err().message(),
            "Parameter 'smp.cpus' expects integer"
        );
        assert_eq!(
            parse("-numa node,nodeid=x").unwrap_err().message(),
            "-numa node,nodeid=x: Parameter 'nodeid' expects a uint64 value"
        );
    }

    #[test]
    fn kvm_max_slot_size_is_ours_and_only_for_kvm() {
        let c = parse("-accel kvm,max-slot-size=1G").unwrap();
        assert_eq!((c.accel, c.kvm_max_slot_size), (Some(Accel::Kvm), 1 << 30));
        assert_eq!(
            parse("-accel tcg,max-slot-size=1G").unwrap_err().message(),
            "-accel tcg,max-slot-size=1G: Property 'tcg-accel.max-slot-size' not found"
        );
    }

    #[test]
    fn numa_nodes_and_their_refusals() {
        let c = parse(
            "-numa node,memdev=m0 -numa node,nodeid=1,memdev=m1 -numa dist,src=0,dst=1,val=20",
        )
        .unwrap();
        assert_eq!(c.numa.len(), 2);
        assert_eq!(c.numa[1].nodeid, Some(1));
        assert_eq!(
            parse("-numa node,memdev=m,mem=64M").unwrap_err().message(),
            "-numa node,memdev=m,mem=64M: numa configuration should use either mem= or memdev=,mixing both is not allowed"
        );
        assert_eq!(
            parse("-numa foo").unwrap_err().message(),
            "-numa foo: Parameter 'type' does not accept value 'foo'"
        );
        assert_eq!(
            parse("-numa node,foo=1").unwrap_err().message(),
            "-numa node,foo=1: Invalid parameter 'foo'"
        );
    }

    #[test]
    fn smp_zero_is_refused() {
        assert_eq!(parse("-smp 2").unwrap().smp_cpus, Some(2));
        assert_eq!(
            parse("-smp 0").unwrap_err().message(),
            "Invalid CPU topology: CPU topology parameters must be greater than zero"
        );
    }
}
