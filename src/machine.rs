//! The generic machine's RAM rules (QEMU's hw/core/machine.c and the RAM parts of vl.c):
//! `-m`, `-machine memory-backend`, the implicit backend made of `-mem-path` / `-mem-prealloc`,
//! `-numa node,memdev=`, consuming a backend as main RAM, and the legacy
//! `memory_region_allocate_system_memory()` for boards not converted yet.
//!
//! Boards never allocate RAM here: they read `machine->ram`. This module decides what that is.

use crate::backend::Backend;
use crate::context::Context;
use crate::error::{Error, HmErrorClass, Result};
use crate::options::cmdline::{is_syntax_error, Cmdline};
use crate::region::RegionId;

/// What the generic code needs to know of a board (the RAM half of QEMU's MachineClass).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoardInfo {
    pub name: String,
    pub alias: Option<String>,
    pub default_ram_size: u64,
    /// Name of main RAM (backend id and RAMBlock); `None` for boards that take no `-m`.
    pub default_ram_id: Option<String>,
    /// Whether `-numa node,mem=` (legacy "fake" NUMA) is still accepted: only by old machine types.
    pub numa_mem_supported: bool,
    /// Whether the board knows NUMA at all (QEMU: it maps CPUs to nodes).
    pub numa_supported: bool,
}

/// The machine of one context, as the generic code configured it.
pub struct MachineRuntime {
    pub board: BoardInfo,
    pub ram_size: u64,
    pub maxram_size: u64,
    pub ram_slots: u64,
    /// `machine->ram`: the consumed backend's region, or the NUMA container.
    pub ram: Option<RegionId>,
    /// Id of the backend behind `machine->ram` (explicit or implicit).
    pub memdev: Option<String>,
    pub cmdline: Cmdline,
    /// Set once a board called the legacy allocation; a second call is refused.
    legacy_allocation: Option<String>,
    /// Memory the legacy call allocated outside `/objects` (kept alive with the machine).
    legacy_backends: Vec<Backend>,
}

/// QEMU's -m rounding granule.
const RAM_SIZE_ALIGN: u64 = 8192;

/// Resolves `-m` against the board's default: (ram_size, maxram_size, slots).
pub fn resolve_ram_size(cmd: &Cmdline, board: &BoardInfo) -> Result<(u64, u64, u64)> {
    let m = &cmd.memory;
    let size = m.size.unwrap_or(board.default_ram_size);
    let size = size
        .checked_add(RAM_SIZE_ALIGN - 1)
        .map(|s| s & !(RAM_SIZE_ALIGN - 1))
        .ok_or_else(|| Error::invalid("ram size too large"))?;
    let slots = m.slots.unwrap_or(0);
    let maxram = match m.maxmem {
        None if slots != 0 => return Err(Error::invalid("slots specified but no max-size")),
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

/// Configures the machine of `ctx` from the command line, up to the point where the board's
/// own init runs: backends created, `machine->ram` decided and consumed. On error the caller
/// drops the context, which releases everything made so far.
pub fn configure(ctx: &mut Context, cmd: &Cmdline, board: &BoardInfo) -> Result<()> {
    for (key, value) in &cmd.machine_props {
        match key.as_str() {
            "mem-merge" => ctx.backend_defaults.merge = crate::options::values::parse_bool(value)?,
            "dump-guest-core" => {
                ctx.backend_defaults.dump = crate::options::values::parse_bool(value)?
            }
            _ => {
                return Err(Error::invalid(format!(
                    "Property '{}-machine.{key}' not found",
                    board.name
                )))
            }
        }
    }
    let (mut ram_size, mut maxram_size, ram_slots) = resolve_ram_size(cmd, board)?;

    ctx.backend_defaults.prealloc = cmd.mem_prealloc;
    ctx.backend_defaults.prealloc_threads = cmd.smp_cpus.unwrap_or(1);

    for object in &cmd.objects {
        ctx.objects
            .add_from_opts(&object.text, &ctx.backend_defaults, &mut ctx.memory)
            .map_err(|e| at_option_if_syntax(e, "-object", &object.text))?;
    }

    check_numa_nodes(ctx, cmd, board)?;
    let numa_memdevs: Vec<String> = cmd.numa.iter().filter_map(|n| n.memdev.clone()).collect();

    if let Some(id) = &cmd.memory_backend {
        if cmd.mem_path.is_some() {
            return Err(Error::invalid(
                "'-mem-path' can't be used together with'-machine memory-backend'",
            ));
        }
        let entry = ctx.objects.get(id).ok_or_else(|| {
            Error::new(
                HmErrorClass::NotFound,
                format!("Memory backend '{id}' not found"),
            )
        })?;
        if cmd.memory.size.is_none() {
            ram_size = entry.backend.size();
            maxram_size = maxram_size.max(ram_size);
        }
        if entry.backend.size() != ram_size {
            return Err(Error::invalid(
                "Machine memory size does not match the size of the memory backend",
            ));
        }
        if !numa_memdevs.is_empty() {
            return Err(Error::invalid(
                "'-machine memory-backend' and '-numa memdev' properties are mutually exclusive",
            ));
        }
    }

    let mut memdev = cmd.memory_backend.clone();
    if memdev.is_none() && numa_memdevs.is_empty() && ram_size != 0 {
        if let Some(ram_id) = &board.default_ram_id {
            create_default_memdev(ctx, cmd, ram_id, ram_size)?;
            memdev = Some(ram_id.clone());
        }
    }

    let mut ram = None;
    if !numa_memdevs.is_empty() {
        if let Some(ram_id) = &board.default_ram_id {
            ram = Some(numa_container(ctx, ram_id, ram_size, &numa_memdevs)?);
        }
    } else if let Some(id) = &memdev {
        ram = Some(consume_memdev(ctx, id)?);
    }

    ctx.machine = Some(MachineRuntime {
        board: board.clone(),
        ram_size,
        maxram_size,
        ram_slots,
        ram,
        memdev,
        cmdline: cmd.clone(),
        legacy_allocation: None,
        legacy_backends: Vec::new(),
    });
    Ok(())
}

/// Each `-numa node` in QEMU's order of checks: NUMA at all, mem= and memdev= not mixed across
/// nodes, mem= only on boards that still take it (refused for current machine types), memdev=
/// naming an existing backend.
fn check_numa_nodes(ctx: &Context, cmd: &Cmdline, board: &BoardInfo) -> Result<()> {
    let (mut have_mem, mut have_memdev) = (false, false);
    for node in &cmd.numa {
        let at = |e: Error| e.prepend(&format!("-numa {}: ", node.text));
        if !board.numa_supported {
            return Err(at(Error::new(
                HmErrorClass::Unsupported,
                "NUMA is not supported by this machine-type",
            )));
        }
        if (have_memdev && node.mem.is_some()) || (have_mem && node.memdev.is_some()) {
            return Err(at(Error::invalid(
                "numa configuration should use either mem= or memdev=,mixing both is not allowed",
            )));
        }
        have_mem |= node.mem.is_some();
        have_memdev |= node.memdev.is_some();
        if node.mem.is_some() && !board.numa_mem_supported {
            return Err(at(Error::invalid(
                "Parameter -numa node,mem is not supported by this machine type",
            )
            .with_hint("Use -numa node,memdev instead\n")));
        }
        if let Some(id) = &node.memdev {
            if ctx.objects.get(id).is_none() {
                return Err(at(Error::new(
                    HmErrorClass::NotFound,
                    format!("memdev={id} is ambiguous"),
                )));
            }
        }
    }
    Ok(())
}

fn at_option_if_syntax(e: Error, opt: &str, text: &str) -> Error {
    if is_syntax_error(&e) {
        e.prepend(&format!("{opt} {text}: "))
    } else {
        e
    }
}

/// The backend QEMU makes from the legacy options: a file backend with -mem-path, else RAM; id
/// and RAMBlock name are the board's default_ram_id.
fn create_default_memdev(
    ctx: &mut Context,
    cmd: &Cmdline,
    ram_id: &str,
    ram_size: u64,
) -> Result<()> {
    if ctx.objects.get(ram_id).is_some() {
        return Err(Error::new(
            HmErrorClass::Duplicate,
            format!("object's id '{ram_id}' is reserved for the default RAM backend, it can't be used for any other purposes"),
        )
        .with_hint(format!(
            "Change the object's 'id' to something else or disable automatic creation of the default RAM backend by setting 'memory-backend={ram_id}' with '-machine'.\n"
        )));
    }
    let type_name = if cmd.mem_path.is_some() {
        "memory-backend-file"
    } else {
        "memory-backend-ram"
    };
    ctx.objects
        .create(type_name, ram_id, &ctx.backend_defaults)?;
    let result = (|| {
        let entry = ctx.objects.get_mut(ram_id).expect("just created");
        entry.backend.set("size", &ram_size.to_string())?;
        if let Some(path) = &cmd.mem_path {
            entry.backend.set("mem-path", path)?;
        }
        // The RAMBlock must be "pc.ram", never "/objects/pc.ram", whatever compat says.
        entry
            .backend
            .set("x-use-canonical-path-for-ramblock-id", "off")?;
        ctx.objects.complete(ram_id, &mut ctx.memory)
    })();
    if result.is_err() {
        // Nothing half-built stays behind: the uncompleted object goes away with its error.
        let _ = ctx.objects.delete(ram_id, &mut ctx.memory);
    }
    result
}

/// Maps a backend as main RAM: once only, and registered for migration under its name.
fn consume_memdev(ctx: &mut Context, id: &str) -> Result<RegionId> {
    let entry = ctx.objects.get_mut(id).ok_or_else(|| {
        Error::new(
            HmErrorClass::NotFound,
            format!("Memory backend '{id}' not found"),
        )
    })?;
    if entry.backend.is_mapped() {
        return Err(Error::new(
            HmErrorClass::InUse,
            format!("memory backend {id} can't be used multiple times."),
        ));
    }
    let region = entry
        .region
        .ok_or_else(|| Error::generic(format!("memory backend {id} is not complete")))?;
    ctx.memory.vmstate_register_ram(region, None)?;
    ctx.objects
        .get_mut(id)
        .expect("checked above")
        .backend
        .set_mapped(true);
    Ok(region)
}

/// `-numa node,memdev=`: main RAM is a container of the node backends, one after another.
fn numa_container(
    ctx: &mut Context,
    ram_id: &str,
    ram_size: u64,
    memdevs: &[String],
) -> Result<RegionId> {
    let total: u64 = memdevs
        .iter()
        .map(|id| ctx.objects.get(id).map(|e| e.backend.size()).unwrap_or(0))
        .sum();
    if total != ram_size {
        return Err(Error::invalid(format!(
            "total memory for NUMA nodes (0x{total:x}) should equal RAM size (0x{ram_size:x})"
        )));
    }
    let container = ctx.memory.new_container(ram_id, ram_size as u128);
    let mut offset = 0;
    for id in memdevs {
        let region = consume_memdev(ctx, id)?;
        ctx.memory.add_subregion(container, offset, region, None)?;
        offset += ctx.objects.get(id).map(|e| e.backend.size()).unwrap_or(0);
    }
    Ok(container)
}

/// The legacy `memory_region_allocate_system_memory(mr, owner, name, size)`: for boards not
/// converted yet. Works plain, with -mem-path and with -numa memdevs, registers the RAM for
/// migration, and — unlike QEMU, which only documented it — refuses a second call.
pub fn allocate_system_memory(ctx: &mut Context, name: &str, size: u64) -> Result<RegionId> {
    let machine = ctx.machine.as_mut().ok_or_else(|| {
        Error::generic("memory_region_allocate_system_memory() called without a machine")
    })?;
    if let Some(first) = &machine.legacy_allocation {
        return Err(Error::new(
            HmErrorClass::InUse,
            format!(
                "memory_region_allocate_system_memory() called twice on machine '{}' (first for '{first}', now for '{name}'): it must be called exactly once; map parts of one region with aliases instead",
                machine.board.name
            ),
        ));
    }
    let cmd = machine.cmdline.clone();
    let memdevs: Vec<String> = cmd.numa.iter().filter_map(|n| n.memdev.clone()).collect();

    let region = if !memdevs.is_empty() {
        numa_container(ctx, name, size, &memdevs)?
    } else if let Some(id) = cmd.memory_backend.clone() {
        // The generic code consumed the backend already (as QEMU does for every board); the
        // legacy call hands that region out rather than consuming it twice.
        let backend_size = ctx.objects.get(&id).map(|e| e.backend.size()).unwrap_or(0);
        if backend_size != size {
            return Err(Error::invalid(
                "Machine memory size does not match the size of the memory backend",
            ));
        }
        ctx.machine
            .as_ref()
            .and_then(|m| m.ram)
            .ok_or_else(|| Error::generic(format!("memory backend {id} is not mapped")))?
    } else {
        let type_name = if cmd.mem_path.is_some() {
            "memory-backend-file"
        } else {
            "memory-backend-ram"
        };
        let mut backend = Backend::new(type_name, name, &ctx.backend_defaults)?;
        backend.set("size", &size.to_string())?;
        if let Some(path) = &cmd.mem_path {
            backend.set("mem-path", path)?;
        }
        backend.complete()?;
        let mapping = backend
            .mapping()
            .ok_or_else(|| Error::generic("backend has no memory"))?;
        let region = ctx.memory.new_ram_region(name, mapping, 0, size, false)?;
        if let Err(e) = ctx.memory.vmstate_register_ram(region, None) {
            let _ = ctx.memory.destroy_region(region);
            return Err(e);
        }
        backend.set_mapped(true);
        ctx.machine
            .as_mut()
            .expect("checked above")
            .legacy_backends
            .push(backend);
        region
    };
    ctx.machine
        .as_mut()
        .expect("checked above")
        .legacy_allocation = Some(name.to_string());
    Ok(region)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(default_ram_size: u64) -> BoardInfo {
        BoardInfo {
            name: "pc-i440fx-10.0".into(),
            alias: Some("pc".into()),
            default_ram_size,
            default_ram_id: Some("pc.ram".into()),
            numa_mem_supported: false,
            numa_supported: true,
        }
    }

    fn sizes(args: &str) -> Result<(u64, u64, u64)> {
        let args: Vec<&str> = args.split_whitespace().collect();
        resolve_ram_size(&Cmdline::parse(&args)?, &board(128 << 20))
    }

    #[test]
    fn absent_or_zero_m_takes_the_board_default() {
        assert_eq!(sizes("").unwrap().0, 128 << 20);
        assert_eq!(sizes("-m 0").unwrap().0, 128 << 20);
    }

    #[test]
    fn m_is_rounded_up_to_8k() {
        assert_eq!(sizes("-m 4097k").unwrap().0, 4104 << 10);
        assert_eq!(sizes("-m 8k").unwrap().0, 8 << 10);
    }

    #[test]
    fn maxmem_and_slots_follow_qemus_rules() {
        assert_eq!(
            sizes("-m 1G,slots=2,maxmem=4G").unwrap(),
            (1 << 30, 4 << 30, 2)
        );
        assert_eq!(
            sizes("-m 1T,slots=2").unwrap_err().message(),
            "slots specified but no max-size"
        );
        assert_eq!(
            sizes("-m 1G,maxmem=512M").unwrap_err().message(),
            "invalid value of maxmem: maximum memory size (0x20000000) must be at least the initial memory size (0x40000000)"
        );
        assert_eq!(
            sizes("-m 1G,slots=2,maxmem=1G").unwrap_err().message(),
            "invalid value of maxmem: memory slots were specified but maximum memory size (0x40000000) is equal to the initial memory size (0x40000000)"
        );
    }

    #[test]
    fn size_overflow_is_an_error_not_a_wrap() {
        let cmd = Cmdline {
            memory: crate::options::cmdline::MemoryOption {
                size: Some(u64::MAX),
                slots: None,
                maxmem: None,
            },
            ..Default::default()
        };
        assert_eq!(
            resolve_ram_size(&cmd, &board(0)).unwrap_err().message(),
            "ram size too large"
        );
    }
}
