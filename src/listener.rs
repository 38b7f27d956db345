//! What a commit tells the layers below the memory API (KVM, and later migration): the
//! sections of guest-physical space that appeared and disappeared.

use crate::error::Result;
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamSection {
    /// Host virtual address of the section's first byte.
    pub host_addr: usize,
    /// The RAMBlock that owns the memory, and the section's offset into it.
    pub block: RamBlockId,
    pub block_offset: u64,
    /// Page size of the memory behind the section (hugetlbfs page size or host page size).
    pub page_size: u64,
    pub readonly: bool,
}

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
