//! One context's memory system: the region arena, the RAMBlock registry, the address spaces,
//! transactions and the listeners told about each commit. INTERFACE STUB: bodies to be written.

use std::sync::Arc;

use crate::error::Result;
use crate::hostmap::HostMapping;
use crate::listener::MemoryListener;
use crate::ramblock::{RamBlockId, RamBlockRegistry};
use crate::region::RegionId;

pub struct MemorySystem {
    pub ramblocks: RamBlockRegistry,
}

impl MemorySystem {
    /// A fresh system with the "system" (2^64) and "io" (64 KiB) containers and the address
    /// spaces "memory" and "I/O" over them.
    pub fn new() -> Self {
        todo!()
    }
    pub fn system_memory(&self) -> RegionId {
        todo!()
    }
    /// A RAM region over existing memory (a backend's), with an unnamed, unmigratable RAMBlock.
    pub fn new_ram_region(
        &mut self,
        _name: &str,
        _mapping: Arc<HostMapping>,
        _mapping_offset: u64,
        _size: u64,
        _readonly: bool,
    ) -> Result<RegionId> {
        todo!()
    }
    pub fn new_container(&mut self, _name: &str, _size: u128) -> RegionId {
        todo!()
    }
    pub fn new_alias(
        &mut self,
        _name: &str,
        _target: RegionId,
        _offset: u64,
        _size: u64,
    ) -> Result<RegionId> {
        todo!()
    }
    /// `memory_region_add_subregion[_overlap]`: `priority` None means the non-overlapping form.
    pub fn add_subregion(
        &mut self,
        _parent: RegionId,
        _addr: u64,
        _child: RegionId,
        _priority: Option<i32>,
    ) -> Result<()> {
        todo!()
    }
    pub fn del_subregion(&mut self, _parent: RegionId, _child: RegionId) -> Result<()> {
        todo!()
    }
    pub fn region_size(&self, _id: RegionId) -> Result<u128> {
        todo!()
    }
    pub fn ram_block_of(&self, _id: RegionId) -> Option<RamBlockId> {
        todo!()
    }
    /// Names the region's RAMBlock and makes it migratable (`vmstate_register_ram`).
    pub fn vmstate_register_ram(&mut self, _id: RegionId, _owner_path: Option<&str>) -> Result<()> {
        todo!()
    }
    pub fn destroy_region(&mut self, _id: RegionId) -> Result<()> {
        todo!()
    }
    pub fn transaction_begin(&mut self) {
        todo!()
    }
    /// Ends a transaction; at depth 0 renders the flat views and tells every listener.
    pub fn transaction_commit(&mut self) -> Result<()> {
        todo!()
    }
    /// Registers a listener and replays the current flat view to it as `region_add`s.
    pub fn add_listener(&mut self, _l: Box<dyn MemoryListener>) -> Result<()> {
        todo!()
    }
}

impl Default for MemorySystem {
    fn default() -> Self {
        Self::new()
    }
}
