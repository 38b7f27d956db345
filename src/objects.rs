//! The `/objects` container of one context: user-creatable backends by id, each with the RAM
//! region that exposes its memory once complete. INTERFACE STUB: bodies to be written.

use crate::backend::{Backend, BackendDefaults};
use crate::error::Result;
use crate::memory::MemorySystem;
use crate::region::RegionId;

pub struct BackendEntry {
    pub backend: Backend,
    /// The RAM region over the backend's memory, once complete.
    pub region: Option<RegionId>,
}

#[derive(Default)]
pub struct ObjectRegistry {}

impl ObjectRegistry {
    /// `-object` / `object-add`: parse a QEMU option string, create, set, complete.
    pub fn add_from_opts(
        &mut self,
        _opts: &str,
        _defaults: &BackendDefaults,
        _mem: &mut MemorySystem,
    ) -> Result<String> {
        todo!()
    }
    /// Creates an uncompleted backend.
    pub fn create(
        &mut self,
        _type_name: &str,
        _id: &str,
        _defaults: &BackendDefaults,
    ) -> Result<()> {
        todo!()
    }
    /// Completes a backend and creates its RAM region.
    pub fn complete(&mut self, _id: &str, _mem: &mut MemorySystem) -> Result<()> {
        todo!()
    }
    /// `object-del`: refused while mapped.
    pub fn delete(&mut self, _id: &str, _mem: &mut MemorySystem) -> Result<()> {
        todo!()
    }
    pub fn get(&self, _id: &str) -> Option<&BackendEntry> {
        todo!()
    }
    pub fn get_mut(&mut self, _id: &str) -> Option<&mut BackendEntry> {
        todo!()
    }
    /// Ids in `info memdev` order (sorted).
    pub fn ids(&self) -> Vec<String> {
        todo!()
    }
}
