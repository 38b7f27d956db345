//! The MemoryRegion tree: containers, RAM, aliases and I/O placeholders (QEMU's memory.c
//! object model, without the dispatch). The arena and every mutation live in
//! [`crate::memory::MemorySystem`]; this file holds the data and the rules that need no arena.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

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
    /// Children sorted as QEMU keeps them: by priority, newest first among equals, and
    /// indexed by address so that a change among 100 000 siblings visits only its neighbours.
    pub subregions: Subregions,
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
            subregions: Subregions::default(),
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

/// Where a child sorts among its siblings: higher priority first, then the newest link first.
type OrderKey = (Reverse<i32>, Reverse<u64>);

/// A container's children in QEMU's order, with an index by address. The index buckets
/// children by the binary order of magnitude of their size: a child of class `c` is shorter
/// than `2^(c+1)`, so the ones that can reach a window start less than that before it. A query
/// thus costs a range lookup per class in use (at most 65) plus the children it finds, whatever
/// the sibling count, as long as siblings of one class do not pile up on each other.
#[derive(Clone, Debug, Default)]
pub struct Subregions {
    order: BTreeMap<OrderKey, RegionId>,
    /// (size class, start, child) → (size, order key).
    by_addr: BTreeMap<(u8, u64, RegionId), (u128, OrderKey)>,
    /// child → (order key, size class, start), to find its entries when it leaves.
    entries: HashMap<RegionId, (OrderKey, u8, u64)>,
    /// How many children each size class holds, so that a query skips the empty ones.
    class_len: Vec<u32>,
    next_link: u64,
}

const ID_MIN: RegionId = RegionId {
    index: 0,
    generation: 0,
};
const ID_MAX: RegionId = RegionId {
    index: u32::MAX,
    generation: u32::MAX,
};

/// The size class: floor(log2(size)), 0 for sizes 0 and 1; at most 64.
fn size_class(size: u128) -> u8 {
    (127 - size.max(1).leading_zeros()) as u8
}

impl Subregions {
    /// Links `child` (placed at `addr`, `size` bytes long) before the first sibling of equal or
    /// lower priority, as QEMU's `memory_region_update_container_subregions` does. A child
    /// already present is moved.
    pub fn insert(&mut self, child: RegionId, addr: u64, size: u128, priority: i32) {
        self.remove(child);
        let key = (Reverse(priority), Reverse(self.next_link));
        self.next_link += 1;
        let class = size_class(size);
        self.order.insert(key, child);
        self.by_addr.insert((class, addr, child), (size, key));
        self.entries.insert(child, (key, class, addr));
        if self.class_len.len() <= usize::from(class) {
            self.class_len.resize(usize::from(class) + 1, 0);
        }
        self.class_len[usize::from(class)] += 1;
    }

    /// Unlinks `child`; whether it was there.
    pub fn remove(&mut self, child: RegionId) -> bool {
        let Some((key, class, addr)) = self.entries.remove(&child) else {
            return false;
        };
        self.order.remove(&key);
        self.by_addr.remove(&(class, addr, child));
        self.class_len[usize::from(class)] -= 1;
        true
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The children in priority order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &RegionId> + '_ {
        self.order.values()
    }

    pub fn to_vec(&self) -> Vec<RegionId> {
        self.iter().copied().collect()
    }

    /// The children whose extent `[start, start + size)` has `start < hi` and `end > lo`
    /// (the overlap test of two half-open ranges, also for empty ones), in priority order.
    pub fn overlapping(&self, lo: u128, hi: u128) -> Vec<RegionId> {
        let mut found: Vec<(OrderKey, RegionId)> = Vec::new();
        let Some(last_start) = hi.checked_sub(1) else {
            return Vec::new();
        };
        let last_start = u64::try_from(last_start).unwrap_or(u64::MAX);
        for (class, &n) in self.class_len.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let class = class as u8;
            // A child of this class is shorter than 2^(class+1): one starting at or before
            // lo - 2^(class+1) ends at or before lo.
            let reach = (1u128 << (u32::from(class) + 1)) - 1;
            let first_start = u64::try_from(lo.saturating_sub(reach)).unwrap_or(u64::MAX);
            if first_start > last_start {
                continue;
            }
            let range = (class, first_start, ID_MIN)..=(class, last_start, ID_MAX);
            for (&(_, start, child), &(size, key)) in self.by_addr.range(range) {
                if u128::from(start) + size > lo {
                    found.push((key, child));
                }
            }
        }
        found.sort_unstable_by_key(|&(key, _)| key);
        found.into_iter().map(|(_, child)| child).collect()
    }
}

impl<'a> IntoIterator for &'a Subregions {
    type Item = &'a RegionId;
    type IntoIter = std::collections::btree_map::Values<'a, OrderKey, RegionId>;
    fn into_iter(self) -> Self::IntoIter {
        self.order.values()
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

    fn rid(i: u32) -> RegionId {
        RegionId {
            index: i,
            generation: 0,
        }
    }

    #[test]
    fn subregions_keep_priority_order_newest_first_and_move_on_relink() {
        let mut s = Subregions::default();
        s.insert(rid(1), 0, 0x1000, 0);
        s.insert(rid(2), 0, 0x1000, 1);
        s.insert(rid(3), 0, 0x1000, 0);
        s.insert(rid(4), 0, 0x1000, -1);
        assert_eq!(s.to_vec(), [rid(2), rid(3), rid(1), rid(4)]);
        // Linking again makes it the newest of its priority.
        s.insert(rid(1), 0x2000, 0x1000, 0);
        assert_eq!(s.to_vec(), [rid(2), rid(1), rid(3), rid(4)]);
        assert!(s.remove(rid(3)));
        assert!(!s.remove(rid(3)));
        assert_eq!(s.len(), 3);
        assert_eq!(s.overlapping(0x2000, 0x2001), [rid(1)]);
        assert_eq!(s.overlapping(0, 0x1000), [rid(2), rid(4)]);
    }

    proptest::proptest! {
        #[test]
        fn overlapping_finds_exactly_the_children_reaching_into_the_window(
            ops in proptest::collection::vec(
                (0u32..24, proptest::bool::weighted(0.8), 0u64..64, 0u32..66, -1i32..2),
                1..60,
            ),
            windows in proptest::collection::vec((0u128..(1 << 66), 0u128..(1 << 66)), 1..12),
        ) {
            let mut s = Subregions::default();
            let mut placed: HashMap<RegionId, (u64, u128)> = HashMap::new();
            for (child, link, slot, bits, prio) in ops {
                // Sizes from 0 to 2^64 and addresses at any order of magnitude.
                let size = (1u128 << bits.min(64)) - u128::from(bits % 3 == 1 && bits > 0);
                let size = if bits == 65 { 0 } else { size };
                let addr = (slot << 58) | (slot * 0x1001);
                if link {
                    s.insert(rid(child), addr, size, prio);
                    placed.insert(rid(child), (addr, size));
                } else {
                    proptest::prop_assert_eq!(s.remove(rid(child)), placed.remove(&rid(child)).is_some());
                }
            }
            proptest::prop_assert_eq!(s.len(), placed.len());
            for (a, b) in windows {
                let (lo, hi) = (a.min(b) >> (a % 3), a.max(b) >> (b % 5));
                let want: Vec<RegionId> = s
                    .iter()
                    .copied()
                    .filter(|c| {
                        let (addr, size) = placed[c];
                        u128::from(addr) < hi && u128::from(addr) + size > lo
                    })
                    .collect();
                proptest::prop_assert_eq!(s.overlapping(lo, hi), want, "window {:#x}..{:#x}", lo, hi);
            }
        }
    }
}
