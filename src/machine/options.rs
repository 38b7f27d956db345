//! Applying the machine's options, the step QEMU takes right after it picked the machine type
//! and before it warns that the type is deprecated (qemu_apply_legacy_machine_options and
//! qemu_apply_machine_options in system/vl.c): the chardevs, `-mem-path` against
//! `memory-backend`, then every `-machine` property together with "memory" (`-m`) and "smp"
//! (`-smp`) in the order of QEMU's dictionary (`options::qdict`), then the accelerator.
//!
//! A board adds properties of its own (the PC's `max-ram-below-4g`) by declaring them in its
//! [`BoardInfo`]; their setters' checks, and the RAM size fixup of old machine types, run
//! through [`BoardHooks`].

use super::boards::{BoardInfo, PropertyKind};
use crate::error::{Error, HmErrorClass, Result};
use crate::options::cmdline::Cmdline;
use crate::options::values::{parse_bool_param, strtosz};

/// QEMU's -m rounding granule.
const RAM_SIZE_ALIGN: u64 = 8192;

/// What a board does while its machine's options are applied (C callbacks in the C skin).
pub trait BoardHooks {
    /// QEMU's `fixup_ram_size` of old machine types: the RAM size (rounded up to 8 KiB) to use.
    fn fixup_ram_size(&mut self, size: u64) -> u64 {
        size
    }

    /// The board's own check of its property `name` (QEMU: the property's setter), given the
    /// value as a number (a boolean is 0 or 1).
    fn check_property(&mut self, _name: &str, _value: u64) -> Result<()> {
        Ok(())
    }
}

/// A board without hooks.
pub struct NoHooks;

impl BoardHooks for NoHooks {}

/// The machine's options once applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineOptions {
    pub ram_size: u64,
    pub maxram_size: u64,
    pub ram_slots: u64,
    /// `-m` gave a size (a `memory-backend` without one sets the RAM size).
    pub custom_ram_size: bool,
    /// `mem-merge` and `dump-guest-core`, when given.
    pub mem_merge: Option<bool>,
    pub dump_guest_core: Option<bool>,
    /// The board's own properties that were given, by name, as numbers.
    pub board_properties: Vec<(String, u64)>,
}

/// Applies `cmd`'s machine options for `board`, refusing what QEMU refuses at this stage, in
/// its order.
pub fn apply(
    cmd: &Cmdline,
    board: &BoardInfo,
    hooks: &mut dyn BoardHooks,
) -> Result<MachineOptions> {
    if let Some(e) = &cmd.deferred.chardev {
        return Err(e.clone().into());
    }
    let props = dashify(&cmd.machine_props)?;
    if cmd.memory_backend.is_some() && cmd.mem_path.is_some() {
        return Err(Error::invalid(
            "'-mem-path' can't be used together with'-machine memory-backend'",
        ));
    }
    let mut keys: Vec<&str> = props.iter().map(|(k, _)| k.as_str()).collect();
    if cmd.smp.is_some() {
        keys.push("smp");
    }
    keys.push("memory");
    let mut out = MachineOptions::default();
    for key in crate::options::qdict::iteration_order(&keys) {
        let value = props
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str());
        match (key, value) {
            ("memory", None) => {
                if let Some(e) = &cmd.deferred.memory {
                    return Err(e.clone().into());
                }
                let (size, maxram, slots) = ram_sizes(cmd, board, hooks)?;
                out.ram_size = size;
                out.maxram_size = maxram;
                out.ram_slots = slots;
                out.custom_ram_size = cmd.memory.size.is_some();
            }
            ("smp", None) => {
                if let Some(e) = &cmd.deferred.smp {
                    return Err(e.clone().into());
                }
            }
            ("mem-merge", Some(v)) => out.mem_merge = Some(parse_bool_param(key, v)?),
            ("dump-guest-core", Some(v)) => out.dump_guest_core = Some(parse_bool_param(key, v)?),
            (_, Some(v)) => {
                let Some(prop) = board.properties.iter().find(|p| p.name == key) else {
                    return Err(Error::new(
                        HmErrorClass::NotFound,
                        format!("Property '{}-machine.{key}' not found", board.name),
                    ));
                };
                let number = match prop.kind {
                    PropertyKind::Size => strtosz(v)
                        .map_err(|_| Error::invalid(format!("Parameter '{key}' expects size")))?,
                    PropertyKind::Bool => u64::from(parse_bool_param(key, v)?),
                };
                hooks.check_property(key, number)?;
                out.board_properties.push((key.to_string(), number));
            }
            (_, None) => {}
        }
    }
    if let Some(e) = &cmd.deferred.accel {
        return Err(e.clone().into());
    }
    Ok(out)
}

/// QEMU's keyval_dashify: `a_b` means `a-b`, and giving both is refused.
fn dashify(props: &[(String, String)]) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (key, value) in props {
        let dashed = key.replace('_', "-");
        if dashed != *key && props.iter().any(|(k, _)| *k == dashed) {
            return Err(Error::invalid(format!(
                "Conflict between '{key}' and '{dashed}'"
            )));
        }
        out.push((dashed, value.clone()));
    }
    Ok(out)
}

/// QEMU's machine_set_mem: `-m` against the board's default (rounded up to 8 KiB, then the
/// board's fixup), and `maxmem` and `slots` against it: (ram_size, maxram_size, slots).
fn ram_sizes(
    cmd: &Cmdline,
    board: &BoardInfo,
    hooks: &mut dyn BoardHooks,
) -> Result<(u64, u64, u64)> {
    let size = resolve_size(cmd.memory.size.unwrap_or(board.default_ram_size))?;
    let size = hooks.fixup_ram_size(size);
    check_maxmem(cmd, size)
}

fn resolve_size(size: u64) -> Result<u64> {
    size.checked_add(RAM_SIZE_ALIGN - 1)
        .map(|s| s & !(RAM_SIZE_ALIGN - 1))
        .ok_or_else(|| Error::invalid("ram size too large"))
}

fn check_maxmem(cmd: &Cmdline, size: u64) -> Result<(u64, u64, u64)> {
    let m = &cmd.memory;
    let slots = m.slots.unwrap_or(0);
    let maxram = match m.maxmem {
        None if m.slots.is_some() => {
            return Err(Error::invalid("slots specified but no max-size"))
        }
        None => size,
        Some(max) if max < size => {
            return Err(Error::invalid(format!(
                "invalid value of maxmem: maximum memory size (0x{max:x}) must be at least the initial memory size (0x{size:x})"
            )))
        }
        Some(max) if max == size && slots != 0 => {
            return Err(Error::invalid(format!(
                "invalid value of maxmem: memory slots were specified but maximum memory size (0x{max:x}) is equal to the initial memory size (0x{size:x})"
            )))
        }
        Some(max) => max,
    };
    Ok((size, maxram, slots))
}

/// `-m` against the board's default, without a board's fixup: (ram_size, maxram_size, slots).
pub fn resolve_ram_size(cmd: &Cmdline, board: &BoardInfo) -> Result<(u64, u64, u64)> {
    ram_sizes(cmd, board, &mut NoHooks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::boards::BoardProperty;

    fn board() -> BoardInfo {
        BoardInfo {
            name: "pc-i440fx-10.0".into(),
            default_ram_size: 128 << 20,
            default_ram_id: Some("pc.ram".into()),
            numa_supported: true,
            properties: vec![BoardProperty {
                name: "max-ram-below-4g".into(),
                kind: PropertyKind::Size,
            }],
            ..BoardInfo::default()
        }
    }

    struct Limit4G(Vec<String>);

    impl BoardHooks for Limit4G {
        fn check_property(&mut self, name: &str, value: u64) -> Result<()> {
            self.0.push(name.to_string());
            if value > 4 << 30 {
                return Err(Error::invalid(format!("{name} too big")));
            }
            Ok(())
        }
    }

    fn applied(line: &str) -> Result<MachineOptions> {
        let args: Vec<&str> = line.split_whitespace().collect();
        let cmd = Cmdline::read(&args, &mut Vec::new()).unwrap();
        apply(&cmd, &board(), &mut Limit4G(Vec::new()))
    }

    fn refusal(line: &str) -> String {
        applied(line).unwrap_err().message().to_string()
    }

    #[test]
    fn board_properties_are_parsed_checked_and_kept() {
        let o = applied("-M pc,max-ram-below-4g=2G -m 4G").unwrap();
        assert_eq!(
            o.board_properties,
            [("max-ram-below-4g".to_string(), 2 << 30)]
        );
        assert_eq!((o.ram_size, o.custom_ram_size), (4 << 30, true));
        assert_eq!(
            refusal("-M pc,max-ram-below-4g=5G"),
            "max-ram-below-4g too big"
        );
        assert_eq!(
            refusal("-M pc,max-ram-below-4g=x"),
            "Parameter 'max-ram-below-4g' expects size"
        );
        assert_eq!(
            applied("-M pc,max_ram_below_4g=1G")
                .unwrap()
                .board_properties[0]
                .0,
            "max-ram-below-4g"
        );
        assert_eq!(
            refusal("-M pc,max_ram_below_4g=4G,max-ram-below-4g=1G"),
            "Conflict between 'max_ram_below_4g' and 'max-ram-below-4g'"
        );
        assert_eq!(
            refusal("-M pc,mem-merge=x"),
            "Parameter 'mem-merge' expects 'on' or 'off'"
        );
    }

    #[test]
    fn properties_memory_and_smp_fail_in_qemus_dictionary_order() {
        // Each pair observed with QEMU 10.
        assert_eq!(
            refusal("-M pc,foo=bar -m 1G,maxmem=512M"),
            "invalid value of maxmem: maximum memory size (0x20000000) must be at least the initial memory size (0x40000000)"
        );
        assert_eq!(
            refusal("-M pc,bogus=1 -m 1G,maxmem=512M"),
            "Property 'pc-i440fx-10.0-machine.bogus' not found"
        );
        assert_eq!(
            refusal("-M pc,foo=1 -smp x"),
            "Parameter 'smp.cpus' expects integer"
        );
        assert_eq!(
            refusal("-M pc,foo=1,max-ram-below-4g=5G"),
            "max-ram-below-4g too big"
        );
        assert_eq!(
            refusal("-M pc,foo=1 -accel foo"),
            "Property 'pc-i440fx-10.0-machine.foo' not found"
        );
        assert_eq!(
            refusal("-M pc,bogus=1 -monitor stdio -monitor stdio"),
            "-monitor stdio: cannot use stdio by multiple character devices"
        );
        assert_eq!(
            refusal("-M memory-backend=m -mem-path /tmp -M pc,bogus=1"),
            "'-mem-path' can't be used together with'-machine memory-backend'"
        );
    }

    #[test]
    fn maxmem_and_slots_follow_qemus_rules() {
        let o = applied("-m 1G,slots=2,maxmem=4G").unwrap();
        assert_eq!(
            (o.ram_size, o.maxram_size, o.ram_slots),
            (1 << 30, 4 << 30, 2)
        );
        assert_eq!(refusal("-m 1T,slots=2"), "slots specified but no max-size");
        // slots=0 counts as given.
        assert_eq!(refusal("-m 1G,slots=0"), "slots specified but no max-size");
        assert_eq!(
            refusal("-m 1G,maxmem=512M"),
            "invalid value of maxmem: maximum memory size (0x20000000) must be at least the initial memory size (0x40000000)"
        );
        assert_eq!(
            refusal("-m 1G,slots=2,maxmem=1G"),
            "invalid value of maxmem: memory slots were specified but maximum memory size (0x40000000) is equal to the initial memory size (0x40000000)"
        );
        assert!(applied("-m 1G,slots=0,maxmem=1G").is_ok());
    }

    #[test]
    fn absent_or_zero_m_takes_the_board_default_rounded_to_8k() {
        assert_eq!(applied("").unwrap().ram_size, 128 << 20);
        assert_eq!(applied("-m 0").unwrap().ram_size, 128 << 20);
        assert_eq!(applied("-m 4097k").unwrap().ram_size, 4104 << 10);
        assert_eq!(
            resolve_size(u64::MAX).unwrap_err().message(),
            "ram size too large"
        );
    }
}
