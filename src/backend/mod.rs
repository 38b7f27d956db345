//! Host memory backends: `memory-backend-ram`, `-file` and `-memfd`, their QOM properties and
//! their completion (allocate → advise → bind → prealloc). INTERFACE STUB: bodies to be written.

use std::sync::Arc;

use crate::error::Result;
use crate::hostmap::HostMapping;

/// Machine-level defaults a backend takes at creation, before user properties: QEMU's
/// instance_init copies of mem-merge / dump-guest-core / smp.cpus, and the -mem-prealloc sugar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendDefaults {
    pub merge: bool,
    pub dump: bool,
    pub prealloc: bool,
    pub prealloc_threads: u32,
}

impl Default for BackendDefaults {
    fn default() -> Self {
        BackendDefaults {
            merge: true,
            dump: true,
            prealloc: false,
            prealloc_threads: 1,
        }
    }
}

/// What `info memdev` shows of a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemdevInfo {
    pub id: String,
    pub size: u64,
    pub merge: bool,
    pub dump: bool,
    pub prealloc: bool,
    pub share: bool,
    pub reserve: Option<bool>,
    /// "0-1,3" style, empty when no nodes.
    pub host_nodes: String,
    pub policy: &'static str,
}

pub struct Backend {}

impl Backend {
    /// An uncompleted backend of QOM type `type_name` ("memory-backend-ram", ...).
    pub fn new(_type_name: &str, _id: &str, _defaults: &BackendDefaults) -> Result<Backend> {
        todo!()
    }
    pub fn type_name(&self) -> &'static str {
        todo!()
    }
    pub fn id(&self) -> &str {
        todo!()
    }
    pub fn set(&mut self, _prop: &str, _value: &str) -> Result<()> {
        todo!()
    }
    pub fn get(&self, _prop: &str) -> Result<String> {
        todo!()
    }
    pub fn complete(&mut self) -> Result<()> {
        todo!()
    }
    pub fn is_complete(&self) -> bool {
        todo!()
    }
    pub fn mapping(&self) -> Option<Arc<HostMapping>> {
        todo!()
    }
    pub fn size(&self) -> u64 {
        todo!()
    }
    /// The RAMBlock / region name: the id, or "/objects/<id>" with
    /// x-use-canonical-path-for-ramblock-id=on.
    pub fn region_name(&self) -> String {
        todo!()
    }
    pub fn is_mapped(&self) -> bool {
        todo!()
    }
    pub fn set_mapped(&mut self, _mapped: bool) {
        todo!()
    }
    pub fn memdev_info(&self) -> MemdevInfo {
        todo!()
    }
}
