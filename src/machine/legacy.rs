//! The legacy `memory_region_allocate_system_memory(mr, owner, name, size)` of QEMU before
//! 5.0, for boards not converted to `machine->ram` yet.

use super::ram::{legacy_options_backend, size_mismatch};
use super::Machine;
use crate::error::{Error, HmErrorClass, Result};
use crate::region::RegionId;

impl Machine {
    /// Works plain, with -mem-path, with -numa memdevs and with memory-backend, registers the
    /// RAM for migration under `name`, and — unlike QEMU, which only documented "exactly once"
    /// — refuses a second call.
    pub fn allocate_system_memory(&mut self, name: &str, size: u64) -> Result<RegionId> {
        let config = self.config.as_ref().ok_or_else(|| {
            Error::generic("memory_region_allocate_system_memory() called without a machine")
        })?;
        if let Some(first) = &config.legacy_allocation {
            return Err(Error::new(
                HmErrorClass::InUse,
                format!(
                    "memory_region_allocate_system_memory() called twice on machine '{}' (first for '{first}', now for '{name}'): it must be called exactly once; map parts of one region with aliases instead",
                    config.board.name
                ),
            ));
        }
        let cmd = config.cmdline.clone();
        let consumed = config.ram;
        let memdevs = config.numa_memdevs.clone();

        let region = if !memdevs.is_empty() {
            self.numa_container(name, size, &memdevs)?
        } else if let Some(id) = &cmd.memory_backend {
            // The generic code consumed the backend already (as QEMU does for every board);
            // the legacy call hands that region out rather than consuming it twice.
            if self.backend_size(id) != size {
                return Err(size_mismatch());
            }
            consumed.ok_or_else(|| Error::generic(format!("memory backend {id} is not mapped")))?
        } else {
            self.allocate_outside_objects(&cmd, name, size)?
        };
        if let Some(config) = self.config.as_mut() {
            config.legacy_allocation = Some(name.to_string());
        }
        Ok(region)
    }

    /// RAM from the legacy options that no `/objects` entry owns: the machine keeps the
    /// backend alive.
    fn allocate_outside_objects(
        &mut self,
        cmd: &crate::options::cmdline::Cmdline,
        name: &str,
        size: u64,
    ) -> Result<RegionId> {
        let mut backend = legacy_options_backend(cmd, name, size, &self.backend_defaults)?;
        backend.complete()?;
        let mapping = backend
            .mapping()
            .ok_or_else(|| Error::generic("backend has no memory"))?;
        let region = self.memory.new_ram_region(name, mapping, 0, size, false)?;
        if let Err(e) = self.memory.vmstate_register_ram(region, None) {
            let _ = self.memory.destroy_region(region);
            return Err(e);
        }
        backend.set_mapped(true);
        if let Some(config) = self.config.as_mut() {
            config.legacy_backends.push(backend);
        }
        Ok(region)
    }
}
