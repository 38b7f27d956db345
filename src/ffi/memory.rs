//! `MemoryRegion` for C: caller-provided storage holding a handle into a context's arena, and
//! QEMU's memory API over it. INTERFACE STUB: exports to be written.

use crate::context::ContextId;
use crate::region::RegionId;

/// Storage for a memory region, embedded in board structs as in QEMU. Its content is a handle;
/// boards never read it. A zeroed MemoryRegion is "not initialised" and refused with an error.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryRegion {
    pub magic: u32,
    pub context: u32,
    pub index: u32,
    pub generation: u32,
}

impl MemoryRegion {
    pub const MAGIC: u32 = 0x686d_6d72; // "hmmr"

    pub fn new(context: ContextId, id: RegionId) -> Self {
        MemoryRegion {
            magic: Self::MAGIC,
            context,
            index: id.index,
            generation: id.generation,
        }
    }

    /// The context and region this storage names, if it was initialised.
    pub fn handle(&self) -> Option<(ContextId, RegionId)> {
        (self.magic == Self::MAGIC).then_some((
            self.context,
            RegionId {
                index: self.index,
                generation: self.generation,
            },
        ))
    }
}
