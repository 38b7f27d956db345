//! RAMBlocks: the named, migratable units of guest RAM (QEMU's `RAMBlock` and `ram_list`).
//! INTERFACE STUB: bodies to be written.

use std::sync::Arc;

use crate::error::Result;
use crate::hostmap::HostMapping;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RamBlockId(pub u32);

#[derive(Debug)]
pub struct RamBlock {
    /// "" until `vmstate_register_ram` names it (QEMU shows such blocks with an empty name).
    pub idstr: String,
    /// ram_addr_t offset in the RAM address space.
    pub offset: u64,
    pub used_length: u64,
    pub max_length: u64,
    pub page_size: u64,
    pub readonly: bool,
    pub migratable: bool,
    /// The memory; alias blocks share their target's mapping.
    pub mapping: Arc<HostMapping>,
    pub mapping_offset: u64,
    /// Set for a RAMBlock that an alias owns: it points into this block's memory.
    pub alias_of: Option<RamBlockId>,
}

impl RamBlock {
    pub fn host_ptr(&self) -> *mut u8 {
        todo!()
    }
}

#[derive(Debug, Default)]
pub struct RamBlockRegistry {}

impl RamBlockRegistry {
    pub fn new() -> Self {
        todo!()
    }
    /// A new unnamed, unmigratable block over `mapping[mapping_offset..+max_length]`.
    pub fn add(
        &mut self,
        _mapping: Arc<HostMapping>,
        _mapping_offset: u64,
        _used_length: u64,
        _max_length: u64,
        _readonly: bool,
    ) -> Result<RamBlockId> {
        todo!()
    }
    /// A block that owns no memory of its own: `len` bytes of `of` starting at `offset`.
    pub fn add_alias(&mut self, _of: RamBlockId, _offset: u64, _len: u64) -> Result<RamBlockId> {
        todo!()
    }
    pub fn remove(&mut self, _id: RamBlockId) {
        todo!()
    }
    pub fn get(&self, _id: RamBlockId) -> Option<&RamBlock> {
        todo!()
    }
    /// Names the block "<owner_path>/<name>" or "<name>"; a name already taken is an error.
    pub fn set_idstr(
        &mut self,
        _id: RamBlockId,
        _owner_path: Option<&str>,
        _name: &str,
    ) -> Result<()> {
        todo!()
    }
    pub fn unset_idstr(&mut self, _id: RamBlockId) {
        todo!()
    }
    pub fn set_migratable(&mut self, _id: RamBlockId, _migratable: bool) {
        todo!()
    }
    pub fn find_by_idstr(&self, _idstr: &str) -> Option<RamBlockId> {
        todo!()
    }
    /// Blocks in `info ramblock` order.
    pub fn ids(&self) -> Vec<RamBlockId> {
        todo!()
    }
    /// Marks `[offset, offset+len)` of the block dirty (target pages of 4 KiB).
    pub fn set_dirty(&mut self, _id: RamBlockId, _offset: u64, _len: u64) {
        todo!()
    }
    /// Returns the block's dirty bitmap (one bit per 4 KiB page, little-endian u64 words) and
    /// clears it.
    pub fn take_dirty(&mut self, _id: RamBlockId) -> Vec<u64> {
        todo!()
    }
}
