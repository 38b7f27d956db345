//! The MemoryRegion tree: containers, RAM, aliases and I/O placeholders (QEMU's memory.c
//! object model, without the dispatch). INTERFACE STUB: bodies to be written.

use crate::error::Result;
use crate::ramblock::RamBlockId;

/// A handle to a region in one context's arena. The generation makes a stale handle (to a
/// destroyed region whose slot was reused) an error instead of a silent alias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId {
    pub index: u32,
    pub generation: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionKind {
    Container,
    Ram {
        block: RamBlockId,
    },
    Alias {
        target: RegionId,
        offset: u64,
    },
    /// An MMIO region (shown as "i/o"); hostmem dispatches no accesses, but boards place them so
    /// that the flat view and `info mtree` look like QEMU's.
    Io,
}

#[derive(Clone, Debug)]
pub struct Region {
    pub name: String,
    /// Up to 2^64 (the "system" container), hence u128.
    pub size: u128,
    pub kind: RegionKind,
    pub parent: Option<RegionId>,
    pub addr: u64,
    pub priority: i32,
    pub enabled: bool,
    pub readonly: bool,
    /// Canonical path of the owner ("/objects/mem0"), printed by `info mtree -o` and used as
    /// the RAMBlock idstr prefix by `vmstate_register_ram`.
    pub owner: Option<String>,
    /// Children sorted as QEMU keeps them: by priority, newest first among equals.
    pub subregions: Vec<RegionId>,
}
