//! The MemoryRegion tree: containers, RAM, aliases and I/O placeholders (QEMU's memory.c
//! object model, without the dispatch). The arena and every mutation live in
//! [`crate::memory::MemorySystem`]; this file holds the data and the rules that need no arena.

use std::collections::VecDeque;

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

/// QEMU's region sizes are 128-bit so that a region can span all 2^64 bytes; its C API takes a
/// `uint64_t` and reads `UINT64_MAX` as 2^64. Every size entering hostmem as u64 goes through
/// this rule.
pub fn size_from_u64(size: u64) -> u128 {
    if size == u64::MAX {
        1u128 << 64
    } else {
        u128::from(size)
    }
}

/// The inverse for display and C: 2^64 becomes `UINT64_MAX`, like QEMU's `int128_get64` of a
/// clamped size in `memory_region_size`.
pub fn size_to_u64(size: u128) -> u64 {
    u64::try_from(size).unwrap_or(u64::MAX)
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
    /// Children sorted as QEMU keeps them: by priority, newest first among equals. A deque:
    /// the newest of equals goes in front, which a Vec would pay for with a move of them all.
    pub subregions: VecDeque<RegionId>,
    /// Added with the non-overlapping form (`memory_region_add_subregion`): two such enabled
    /// siblings may not intersect.
    pub may_overlap: bool,
    /// For an alias of RAM registered for migration: the alias RAMBlock that names it in the
    /// stream (the s390 ">8 TB as several blocks" layout). Owned by the region.
    pub alias_block: Option<RamBlockId>,
}

impl Region {
    pub fn new(name: &str, size: u128, kind: RegionKind) -> Self {
        Region {
            name: name.to_string(),
            size,
            kind,
            parent: None,
            addr: 0,
            priority: 0,
            enabled: true,
            readonly: false,
            owner: None,
            subregions: VecDeque::new(),
            may_overlap: false,
            alias_block: None,
        }
    }

    /// QEMU's `terminates`: RAM and I/O regions answer for every address of theirs that no
    /// child claims; containers and aliases never answer themselves.
    pub fn terminates(&self) -> bool {
        matches!(self.kind, RegionKind::Ram { .. } | RegionKind::Io)
    }

    pub fn alias_target(&self) -> Option<(RegionId, u64)> {
        match self.kind {
            RegionKind::Alias { target, offset } => Some((target, offset)),
            _ => None,
        }
    }

    /// `[addr, addr+size)` in the parent's space.
    pub fn end(&self) -> u128 {
        u128::from(self.addr) + self.size
    }
}

/// Read access to a region arena, all that rendering and dumping need.
pub trait RegionLookup {
    fn region(&self, id: RegionId) -> Option<&Region>;
}

/// QEMU's `memory_region_type`: aliases show their target's type; read-only RAM is "rom".
pub fn region_type(arena: &impl RegionLookup, id: RegionId) -> &'static str {
    let mut id = id;
    // Alias chains are acyclic (MemorySystem refuses cycles); the bound is belt and braces.
    for _ in 0..1024 {
        let Some(r) = arena.region(id) else {
            return "i/o";
        };
        match r.kind {
            RegionKind::Alias { target, .. } => id = target,
            RegionKind::Ram { .. } if r.readonly => return "rom",
            RegionKind::Ram { .. } => return "ram",
            RegionKind::Container | RegionKind::Io => return "i/o",
        }
    }
    "i/o"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uint64_max_means_two_to_the_64() {
        assert_eq!(size_from_u64(u64::MAX), 1u128 << 64);
        assert_eq!(size_from_u64(65536), 65536);
        assert_eq!(size_to_u64(1u128 << 64), u64::MAX);
        assert_eq!(size_to_u64(4096), 4096);
    }

    #[test]
    fn only_ram_and_io_terminate() {
        assert!(Region::new(
            "r",
            1,
            RegionKind::Ram {
                block: RamBlockId(0)
            }
        )
        .terminates());
        assert!(Region::new("i", 1, RegionKind::Io).terminates());
        assert!(!Region::new("c", 1, RegionKind::Container).terminates());
        let a = RegionKind::Alias {
            target: RegionId {
                index: 0,
                generation: 0,
            },
            offset: 0,
        };
        assert!(!Region::new("a", 1, a).terminates());
    }

    struct Arena(Vec<Region>);
    impl RegionLookup for Arena {
        fn region(&self, id: RegionId) -> Option<&Region> {
            self.0.get(id.index as usize)
        }
    }

    #[test]
    fn type_follows_aliases_and_readonly_ram_is_rom() {
        let id = |i| RegionId {
            index: i,
            generation: 0,
        };
        let mut rom = Region::new(
            "bios",
            1,
            RegionKind::Ram {
                block: RamBlockId(0),
            },
        );
        rom.readonly = true;
        let arena = Arena(vec![
            rom,
            Region::new(
                "a",
                1,
                RegionKind::Alias {
                    target: id(0),
                    offset: 0,
                },
            ),
            Region::new("c", 1, RegionKind::Container),
            Region::new(
                "b",
                1,
                RegionKind::Alias {
                    target: id(2),
                    offset: 0,
                },
            ),
            Region::new(
                "ram",
                1,
                RegionKind::Ram {
                    block: RamBlockId(1),
                },
            ),
        ]);
        assert_eq!(region_type(&arena, id(0)), "rom");
        assert_eq!(region_type(&arena, id(1)), "rom");
        assert_eq!(region_type(&arena, id(3)), "i/o");
        assert_eq!(region_type(&arena, id(4)), "ram");
    }
}
