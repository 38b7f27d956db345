//! The generic machine's RAM rules (QEMU's hw/core/machine.c and the RAM parts of vl.c):
//! `-m`, `-machine memory-backend`, the implicit backend made of `-mem-path` / `-mem-prealloc`,
//! `-numa node,memdev=`, and consuming a backend as main RAM.
//!
//! Boards never allocate RAM here: they read `machine->ram`. This file decides what that is.

use super::cpu::{self, HostCpu};
use super::numa::{NumaContext, NumaState};
use super::options::MachineOptions;
use super::{BoardInfo, Machine, MachineConfig};
use crate::backend::{Backend, BackendDefaults, BackendType};
use crate::error::{Error, HmErrorClass, Result};
use crate::options::cmdline::Cmdline;
use crate::region::RegionId;

/// What building a machine needs beyond the command line: the host CPU KVM passes through
/// and where QEMU's warnings go (printed as they come, before any later error).
pub struct BuildEnv<'a> {
    pub host: &'a dyn HostCpu,
    pub warn: &'a mut dyn FnMut(String),
}

impl Machine {
    /// Configures the machine from the command line and its applied options, up to the point
    /// where the board's own init runs, in QEMU's order: the `-object` backends, the CPU model,
    /// `memory-backend`, the `-numa` options, then what machine_run_board_init checks and
    /// builds (the backend's size, the implicit backend, NUMA's completion, `machine->ram`),
    /// then the board's first CPU. On error the caller drops the machine, which releases
    /// everything made so far.
    pub fn configure(
        &mut self,
        cmd: &Cmdline,
        board: &BoardInfo,
        options: &MachineOptions,
        env: &mut BuildEnv,
    ) -> Result<()> {
        let (mut ram_size, mut maxram_size, ram_slots) =
            (options.ram_size, options.maxram_size, options.ram_slots);
        if let Some(merge) = options.mem_merge {
            self.backend_defaults.merge = merge;
        }
        if let Some(dump) = options.dump_guest_core {
            self.backend_defaults.dump = dump;
        }
        self.backend_defaults.prealloc = cmd.mem_prealloc;
        // QEMU preallocates with the guest's vCPU count (1 without -smp); -mem-prealloc here
        // uses the host's cores, since nothing pins a count (prealloc-threads on a backend
        // still does). See DESIGN.md, "Where hostmem deliberately differs".
        self.backend_defaults.prealloc_threads = if cmd.mem_prealloc {
            u32::try_from(crate::backend::prealloc::online_cpus()).unwrap_or(u32::MAX)
        } else {
            cmd.smp.as_ref().and_then(|s| s.cpus).unwrap_or(1)
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

        let cpu_model = match board.default_cpu_type.as_deref() {
            Some(ty) if ty.ends_with("-x86_64-cpu") => Some(cpu::parse_cpu_option(
                cmd.cpu.as_deref(),
                ty,
                &mut *env.warn,
            )?),
            _ => None,
        };

        if let Some(id) = &cmd.memory_backend {
            let entry = self.objects.get(id).ok_or_else(|| backend_not_found(id))?;
            if !options.custom_ram_size {
                ram_size = entry.backend.size();
                maxram_size = maxram_size.max(ram_size);
            }
        }

        let numa = self.parse_numa(cmd, board, env)?;
        let numa_memdevs: Vec<String> = numa
            .as_ref()
            .map(|n| n.memdevs().into_iter().map(|(id, _)| id).collect())
            .unwrap_or_default();
        let uses_memdevs = numa.as_ref().is_some_and(NumaState::uses_memdevs);

        // machine_run_board_init.
        let mut memdev = cmd.memory_backend.clone();
        if let Some(id) = &memdev {
            if self.backend_size(id) != ram_size {
                return Err(size_mismatch());
            }
        } else if ram_size != 0 && !uses_memdevs {
            if let Some(ram_id) = &board.default_ram_id {
                self.create_default_memdev(cmd, ram_id, ram_size)?;
                memdev = Some(ram_id.clone());
            }
        }
        let mut ram = None;
        if let Some(numa) = &numa {
            numa.check_nodes(ram_size)?;
            if uses_memdevs {
                if let Some(ram_id) = &board.default_ram_id {
                    if cmd.memory_backend.is_some() {
                        return Err(Error::invalid(
                            "'-machine memory-backend' and '-numa memdev' properties are mutually exclusive",
                        ));
                    }
                    ram = Some(self.numa_container(ram_id, ram_size, &numa_memdevs)?);
                }
            }
            numa.check_distances()?;
            for w in numa.cpu_warnings() {
                (env.warn)(w);
            }
        }
        if ram.is_none() {
            if let Some(id) = &memdev {
                ram = Some(self.consume_memdev(id)?);
            }
        }

        // The board's first CPU (QEMU creates it at the start of the board's init).
        let cpu = match cpu_model {
            Some((model, option)) => Some(cpu::realize(
                model,
                &option,
                cmd.accel,
                env.host,
                &mut *env.warn,
            )?),
            None => None,
        };

        self.config = Some(MachineConfig {
            board: board.clone(),
            ram_size,
            maxram_size,
            ram_slots,
            ram,
            memdev,
            cmdline: cmd.clone(),
            cpu,
            board_properties: options.board_properties.clone(),
            board_max_slot_size: 0,
            numa_memdevs,
            legacy_allocation: None,
            legacy_backends: Vec::new(),
        });
        Ok(())
    }

    /// QEMU's parse_numa_opts: `None` without `-numa` options. A board without NUMA refuses
    /// the first well-formed one.
    fn parse_numa(
        &self,
        cmd: &Cmdline,
        board: &BoardInfo,
        env: &mut BuildEnv,
    ) -> Result<Option<NumaState>> {
        if cmd.numa.is_empty() {
            return Ok(None);
        }
        if !board.numa_supported {
            let entry = &cmd.numa[0];
            let at = |e: Error| e.prepend(&format!("-numa {}: ", entry.text));
            entry.option.clone().map_err(Error::from)?;
            return Err(at(Error::new(
                HmErrorClass::Unsupported,
                "NUMA is not supported by this machine-type",
            )));
        }
        let backend_size = |id: &str| self.objects.get(id).map(|e| e.backend.size());
        let mut cx = NumaContext {
            mem_supported: board.numa_mem_supported,
            topology: cmd.topology(),
            backend_size: &backend_size,
            warn: &mut *env.warn,
        };
        NumaState::parse(&cmd.numa, &mut cx).map(Some)
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

    /// `-numa node,memdev=`: main RAM is a container of the node backends, one after another
    /// in node-id order.
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
