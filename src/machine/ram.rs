//! The generic machine's RAM rules (QEMU's hw/core/machine.c and the RAM parts of vl.c):
//! `-m`, `-machine memory-backend`, the implicit backend made of `-mem-path` / `-mem-prealloc`,
//! `-numa node,memdev=`, and consuming a backend as main RAM.
//!
//! Boards never allocate RAM here: they read `machine->ram`. This file decides what that is.

use super::{BoardInfo, Machine, MachineConfig};
use crate::backend::{Backend, BackendDefaults, BackendType};
use crate::error::{Error, HmErrorClass, Result};
use crate::options::cmdline::Cmdline;
use crate::region::RegionId;

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

impl Machine {
    /// Configures the machine from the command line, up to the point where the board's own
    /// init runs: backends created, `machine->ram` decided and consumed. On error the caller
    /// drops the machine, which releases everything made so far.
    pub fn configure(&mut self, cmd: &Cmdline, board: &BoardInfo) -> Result<()> {
        let mut board_properties: Vec<(String, u64)> = board
            .properties
            .iter()
            .map(|p| (p.name.clone(), p.default))
            .collect();
        for (key, value) in &cmd.machine_props {
            match key.as_str() {
                "mem-merge" => {
                    self.backend_defaults.merge =
                        crate::options::values::parse_bool_param(key, value)?
                }
                "dump-guest-core" => {
                    self.backend_defaults.dump =
                        crate::options::values::parse_bool_param(key, value)?
                }
                _ => match board_properties.iter_mut().find(|(n, _)| n == key) {
                    Some((_, v)) => *v = crate::options::values::parse_size_param(key, value)?,
                    None => {
                        return Err(Error::invalid(format!(
                            "Property '{}-machine.{key}' not found",
                            board.name
                        )))
                    }
                },
            }
        }
        let (mut ram_size, mut maxram_size, ram_slots) = resolve_ram_size(cmd, board)?;

        self.backend_defaults.prealloc = cmd.mem_prealloc;
        // QEMU preallocates with the guest's vCPU count (1 without -smp); -mem-prealloc here
        // uses the host's cores, since nothing pins a count (prealloc-threads on a backend
        // still does). See DESIGN.md, "Where hostmem deliberately differs".
        self.backend_defaults.prealloc_threads = if cmd.mem_prealloc {
            u32::try_from(crate::backend::prealloc::online_cpus()).unwrap_or(u32::MAX)
        } else {
            cmd.smp_cpus.unwrap_or(1)
        };

        for object in &cmd.objects {
            // What reading the option finds is reported at the option, as QEMU does; what
            // creating the object finds is not.
            let parsed = self
                .objects
                .parse_opts(&object.text)
                .map_err(|e| e.at("-object", &object.text))?;
            self.objects
                .add_parsed(parsed, &self.backend_defaults, &mut self.memory)?;
        }

        self.check_numa_nodes(cmd, board)?;
        let numa_memdevs = numa_memdevs(cmd);

        if let Some(id) = &cmd.memory_backend {
            if cmd.mem_path.is_some() {
                return Err(Error::invalid(
                    "'-mem-path' can't be used together with'-machine memory-backend'",
                ));
            }
            let entry = self.objects.get(id).ok_or_else(|| backend_not_found(id))?;
            if cmd.memory.size.is_none() {
                ram_size = entry.backend.size();
                maxram_size = maxram_size.max(ram_size);
            }
            if entry.backend.size() != ram_size {
                return Err(size_mismatch());
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
                self.create_default_memdev(cmd, ram_id, ram_size)?;
                memdev = Some(ram_id.clone());
            }
        }

        let mut ram = None;
        if !numa_memdevs.is_empty() {
            if let Some(ram_id) = &board.default_ram_id {
                ram = Some(self.numa_container(ram_id, ram_size, &numa_memdevs)?);
            }
        } else if let Some(id) = &memdev {
            ram = Some(self.consume_memdev(id)?);
        }

        self.config = Some(MachineConfig {
            board: board.clone(),
            ram_size,
            maxram_size,
            ram_slots,
            ram,
            memdev,
            cmdline: cmd.clone(),
            board_properties,
            board_max_slot_size: 0,
            legacy_allocation: None,
            legacy_backends: Vec::new(),
        });
        Ok(())
    }

    /// Each `-numa node` in QEMU's order of checks: NUMA at all, mem= and memdev= not mixed
    /// across nodes, mem= only on boards that still take it (refused for current machine
    /// types), memdev= naming an existing backend.
    fn check_numa_nodes(&self, cmd: &Cmdline, board: &BoardInfo) -> Result<()> {
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
                if self.objects.get(id).is_none() {
                    return Err(at(Error::new(
                        HmErrorClass::NotFound,
                        format!("memdev={id} is ambiguous"),
                    )));
                }
            }
        }
        Ok(())
    }

    /// The backend QEMU makes from the legacy options (`create_default_memdev`), registered in
    /// `/objects` under the board's default_ram_id and completed.
    fn create_default_memdev(&mut self, cmd: &Cmdline, ram_id: &str, ram_size: u64) -> Result<()> {
        if self.objects.get(ram_id).is_some() {
            return Err(Error::new(
                HmErrorClass::Duplicate,
                format!("object's id '{ram_id}' is reserved for the default RAM backend, it can't be used for any other purposes"),
            )
            .with_hint(format!(
                "Change the object's 'id' to something else or disable automatic creation of the default RAM backend by setting 'memory-backend={ram_id}' with '-machine'.\n"
            )));
        }
        let backend = legacy_options_backend(cmd, ram_id, ram_size, &self.backend_defaults)?;
        self.objects.insert(backend)?;
        let result = self.objects.complete(ram_id, &mut self.memory);
        if result.is_err() {
            // Nothing half-built stays behind: the uncompleted object goes away with its error.
            let _ = self.objects.delete(ram_id, &mut self.memory);
        }
        result
    }

    /// Maps a backend as main RAM: once only, and registered for migration under its name.
    pub(super) fn consume_memdev(&mut self, id: &str) -> Result<RegionId> {
        let entry = self
            .objects
            .get_mut(id)
            .ok_or_else(|| backend_not_found(id))?;
        if entry.backend.is_mapped() {
            return Err(Error::new(
                HmErrorClass::InUse,
                format!("memory backend {id} can't be used multiple times."),
            ));
        }
        let region = entry
            .region
            .ok_or_else(|| Error::generic(format!("memory backend {id} is not complete")))?;
        self.memory.vmstate_register_ram(region, None)?;
        entry.backend.set_mapped(true);
        Ok(region)
    }

    /// `-numa node,memdev=`: main RAM is a container of the node backends, one after another.
    pub(super) fn numa_container(
        &mut self,
        ram_id: &str,
        ram_size: u64,
        memdevs: &[String],
    ) -> Result<RegionId> {
        let total: u64 = memdevs.iter().map(|id| self.backend_size(id)).sum();
        if total != ram_size {
            return Err(Error::invalid(format!(
                "total memory for NUMA nodes (0x{total:x}) should equal RAM size (0x{ram_size:x})"
            )));
        }
        let container = self.memory.new_container(ram_id, ram_size as u128);
        let mut offset = 0;
        for id in memdevs {
            let region = self.consume_memdev(id)?;
            self.memory.add_subregion(container, offset, region, None)?;
            offset += self.backend_size(id);
        }
        Ok(container)
    }

    /// Size of backend `id` (0 when there is none).
    pub(super) fn backend_size(&self, id: &str) -> u64 {
        self.objects.get(id).map_or(0, |e| e.backend.size())
    }
}

/// The `-numa node,memdev=` ids, in command-line order.
pub(super) fn numa_memdevs(cmd: &Cmdline) -> Vec<String> {
    cmd.numa.iter().filter_map(|n| n.memdev.clone()).collect()
}

/// The memory backend QEMU makes of the legacy options for main RAM, uncompleted: a file
/// backend on `-mem-path`, else RAM, `size` bytes, named `id`, and its RAMBlock named `id`
/// (never "/objects/<id>", whatever compat says). The implicit backend and the legacy
/// allocation both start from it.
pub(super) fn legacy_options_backend(
    cmd: &Cmdline,
    id: &str,
    size: u64,
    defaults: &BackendDefaults,
) -> Result<Backend> {
    let ty = match cmd.mem_path {
        Some(_) => BackendType::File,
        None => BackendType::Ram,
    };
    let mut backend = Backend::of_type(ty, id, defaults);
    backend.set_size(size)?;
    if let Some(path) = &cmd.mem_path {
        backend.set_mem_path(path)?;
    }
    backend.set_use_canonical_path(false);
    Ok(backend)
}

fn backend_not_found(id: &str) -> Error {
    Error::new(
        HmErrorClass::NotFound,
        format!("Memory backend '{id}' not found"),
    )
}

pub(super) fn size_mismatch() -> Error {
    Error::invalid("Machine memory size does not match the size of the memory backend")
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
            no_cpus_by_default: false,
            is_default: true,
            properties: Vec::new(),
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
