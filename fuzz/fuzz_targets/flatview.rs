//! FlatView rendering against the per-address model: regions (containers, RAM, I/O, aliases;
//! priorities, enabled, read-only) built from the input, the view rendered, and every address
//! of the space looked up both in the view and by walking the tree as QEMU's lookup rule does.
//! The view must be sorted, disjoint, merged where it can be, and agree at every address.
#![no_main]

use hostmem::flatview::{flatview_root, render};
use hostmem::ramblock::RamBlockId;
use hostmem::region::{Region, RegionId, RegionKind, RegionLookup};
use libfuzzer_sys::fuzz_target;

/// Addresses come in granules; the space holds 256 of them.
const G: u64 = 0x10;
const SPACE: u64 = 0x100 * G;

#[derive(Default)]
struct Arena(Vec<Region>);

impl RegionLookup for Arena {
    fn region(&self, id: RegionId) -> Option<&Region> {
        self.0.get(id.index as usize)
    }
}

fn id(i: usize) -> RegionId {
    RegionId {
        index: i as u32,
        generation: 0,
    }
}

impl Arena {
    fn add(&mut self, name: &str, size: u128, kind: RegionKind) -> RegionId {
        self.0.push(Region::new(name, size, kind));
        id(self.0.len() - 1)
    }

    /// QEMU's insertion rule: before the first sibling of equal or lower priority.
    fn attach(&mut self, parent: RegionId, addr: u64, child: RegionId, prio: i32) {
        let c = &mut self.0[child.index as usize];
        c.addr = addr;
        c.priority = prio;
        c.parent = Some(parent);
        let size = c.size;
        self.0[parent.index as usize]
            .subregions
            .insert(child, addr, size, prio);
    }

    fn reaches(&self, from: RegionId, to: RegionId) -> bool {
        if from == to {
            return true;
        }
        let r = &self.0[from.index as usize];
        r.subregions.iter().any(|&c| self.reaches(c, to))
            || r.alias_target().is_some_and(|(t, _)| self.reaches(t, to))
    }
}

/// QEMU's lookup rule, one address at a time: `a` is relative to the region's start.
fn model(arena: &Arena, id: RegionId, a: u128, ro: bool) -> Option<(RegionId, u64, bool)> {
    let r = arena.region(id)?;
    if !r.enabled || a >= r.size {
        return None;
    }
    let ro = ro || r.readonly;
    if let RegionKind::Alias { target, offset } = r.kind {
        return model(arena, target, a + u128::from(offset), ro);
    }
    for &c in &r.subregions {
        let cr = arena.region(c)?;
        let start = u128::from(cr.addr);
        if a >= start && a < start + cr.size {
            if let Some(hit) = model(arena, c, a - start, ro) {
                return Some(hit);
            }
        }
    }
    r.terminates().then_some((id, a as u64, ro))
}

/// Eight bytes per region: kind, size, parent, address, priority, flags, alias target and
/// offset. Cycles and aliases as parents are left unattached, as the memory API refuses them.
fn build(data: &[u8]) -> (Arena, RegionId) {
    let mut a = Arena::default();
    let root = a.add("root", u128::from(SPACE), RegionKind::Container);
    for (i, s) in data.chunks_exact(8).take(16).enumerate() {
        let name = format!("r{i}");
        let existing = a.0.len();
        let size = u128::from((u64::from(s[1] % 0x80) + 1) * G);
        let kind = match s[0] % 4 {
            0 => RegionKind::Container,
            1 => RegionKind::Ram {
                block: RamBlockId(existing as u32),
            },
            2 => RegionKind::Io,
            _ => RegionKind::Alias {
                target: id(usize::from(s[6]) % existing),
                offset: u64::from(s[7] % 0x40) * G,
            },
        };
        let me = a.add(&name, size, kind);
        let flags = s[5];
        a.0[me.index as usize].enabled = flags % 10 != 0;
        a.0[me.index as usize].readonly = flags & 0x10 != 0 && flags % 7 == 0;
        let parent = id(usize::from(s[2]) % existing);
        let prio = i32::from(s[4] % 5) - 2;
        if a.0[parent.index as usize].alias_target().is_none() && !a.reaches(me, parent) {
            a.attach(parent, u64::from(s[3]) * G, me, prio);
        }
    }
    (a, root)
}

fuzz_target!(|data: &[u8]| {
    let (arena, root) = build(data);
    let view = render(&arena, Some(root));
    assert_eq!(render(&arena, flatview_root(&arena, root)), view);
    let ranges: Vec<_> = view.ranges.iter().collect();
    for w in ranges.windows(2) {
        assert!(w[0].end() <= u128::from(w[1].addr), "overlap {w:?}");
        let mergeable = w[0].region == w[1].region
            && w[0].end() == u128::from(w[1].addr)
            && u128::from(w[0].offset_in_region) + w[0].size == u128::from(w[1].offset_in_region)
            && w[0].readonly == w[1].readonly;
        assert!(!mergeable, "unmerged neighbours {w:?}");
    }
    for g in 0..(SPACE / G + 8) {
        let addr = g * G;
        let want = model(&arena, root, u128::from(addr), false);
        let got = view
            .lookup(addr)
            .map(|f| (f.region, f.offset_in_region + (addr - f.addr), f.readonly));
        assert_eq!(got, want, "at {addr:#x}");
    }
});
