//! What a commit tells the layers below the memory API (KVM, and later migration): the
//! sections of guest-physical space that appeared and disappeared; and the one question the
//! monitor asks an accelerator at print time ([`HasMemory`]).

use std::sync::Arc;

use crate::error::Result;
use crate::hostmap::HostMapping;
use crate::ramblock::{RamBlockId, RamBlockRegistry};

/// One contiguous piece of a flat view, as a listener sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemorySection {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes (never 0; a 2^64 section cannot be RAM, so u64 is enough for listeners,
    /// and I/O sections of 2^64 bytes are reported as `u64::MAX` bytes long).
    pub size: u64,
    /// Name of the leaf region (for error messages and dumps).
    pub region_name: String,
    /// `Some` for RAM; `None` for I/O (listeners such as KVM leave those to the device model).
    pub ram: Option<RamSection>,
}

#[derive(Clone, Debug)]
pub struct RamSection {
    /// Host virtual address of the section's first byte.
    pub host_addr: usize,
    /// The memory `host_addr` points into. A listener that keeps the address (a KVM slot)
    /// keeps this too, so the memory stays mapped as long as the address is in use.
    pub mapping: Arc<HostMapping>,
    /// The RAMBlock that owns the memory, and the section's offset into it.
    pub block: RamBlockId,
    pub block_offset: u64,
    /// Page size of the memory behind the section (hugetlbfs page size or host page size).
    pub page_size: u64,
    pub readonly: bool,
}

/// Two sections are the same section when they describe the same bytes of the same memory.
impl PartialEq for RamSection {
    fn eq(&self, other: &Self) -> bool {
        self.host_addr == other.host_addr
            && Arc::ptr_eq(&self.mapping, &other.mapping)
            && self.block == other.block
            && self.block_offset == other.block_offset
            && self.page_size == other.page_size
            && self.readonly == other.readonly
    }
}

impl Eq for RamSection {}

/// A consumer of flat-view changes. At each outermost commit, `begin`, then `region_del` for
/// every section that disappeared, then `region_add` for every section that appeared, then
/// `commit`. Errors do not undo the change in the region tree: they are reported to the caller of
/// the commit, which decides what to do (QEMU aborted; we report).
pub trait MemoryListener: Send {
    fn name(&self) -> &str;
    fn begin(&mut self) -> Result<()> {
        Ok(())
    }
    fn region_del(&mut self, section: &MemorySection) -> Result<()>;
    fn region_add(&mut self, section: &MemorySection) -> Result<()>;
    fn commit(&mut self) -> Result<()> {
        Ok(())
    }
    /// Dirty logging switched on for all RAM (QEMU's `memory_global_dirty_log_start`).
    fn log_global_start(&mut self) -> Result<()> {
        Ok(())
    }
    fn log_global_stop(&mut self) -> Result<()> {
        Ok(())
    }
    /// Fold what the listener knows of dirty pages into the RAMBlocks' dirty bitmaps.
    fn log_sync(&mut self, _ramblocks: &mut RamBlockRegistry) -> Result<()> {
        Ok(())
    }
}

/// What `info mtree -f` asks the accelerator about each flat range (QEMU's
/// `AccelClass::has_memory`): whether it maps the range, so the dump can mark it with
/// `" <name>"` (" KVM").
pub trait HasMemory {
    /// The accelerator's name as the dump prints it ("KVM").
    fn accel_name(&self) -> &str;
    /// Whether guest-physical `[gpa, gpa + size)` of the "memory" address space is mapped.
    fn has_memory(&self, gpa: u64, size: u64) -> bool;
}
