//! Rendering a region tree into the flat list of ranges the guest sees (QEMU's FlatView), and
//! the difference between two flat views.
//!
//! The rules are QEMU's: siblings are visited in priority order (newest first among equals),
//! each region is clipped to its parent, an alias renders its target shifted by the alias
//! offset, children are rendered before their parent, and a RAM or I/O region then fills only
//! the gaps its children left. Disabled regions (and everything under them) are invisible.

use std::collections::BTreeMap;

use crate::region::{RegionId, RegionKind, RegionLookup};

const SPACE_END: u128 = 1u128 << 64;

pub use crate::flat_ranges::{FlatRange, FlatRanges};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlatView {
    pub ranges: FlatRanges,
}

/// What QEMU calls the flat view's root: the region actually rendered for an address space.
/// It descends through an alias that shows its whole target from offset 0, and through a
/// container whose only enabled child sits at 0 and fits inside it, so that equivalent address
/// spaces share a view; `None` when the root (or the only thing under it) is disabled or empty.
pub fn flatview_root(arena: &impl RegionLookup, root: RegionId) -> Option<RegionId> {
    let mut id = root;
    // Each step goes one edge down an acyclic graph; the bound only guards corrupt arenas.
    for _ in 0..4096 {
        let r = arena.region(id)?;
        if !r.enabled {
            return None;
        }
        // Descending would drop the read-only attribute that QEMU passes down while rendering.
        if r.readonly {
            return Some(id);
        }
        match r.kind {
            RegionKind::Alias { target, offset } => {
                let t = arena.region(target)?;
                if offset == 0 && r.size >= t.size {
                    id = target;
                    continue;
                }
                return Some(id);
            }
            RegionKind::Container => {
                let mut enabled = r
                    .subregions
                    .iter()
                    .filter(|&&c| arena.region(c).is_some_and(|c| c.enabled));
                let &only = enabled.next()?;
                if enabled.next().is_some() {
                    return Some(id);
                }
                let c = arena.region(only)?;
                if c.addr == 0 && r.size >= c.size {
                    id = only;
                    continue;
                }
                return Some(id);
            }
            RegionKind::Ram { .. } | RegionKind::Io => return Some(id),
        }
    }
    Some(id)
}

/// Renders the view of `root` (already reduced by [`flatview_root`]; `None` = empty view).
pub fn render(arena: &impl RegionLookup, root: Option<RegionId>) -> FlatView {
    FlatView {
        ranges: simplified(render_window(arena, root, (0, SPACE_END))).collect(),
    }
}

/// The view of `root` inside the half-open window `[window.0, window.1)`, sorted and disjoint
/// but not simplified: exactly the full view's ranges cut at the window's edges.
pub fn render_window(
    arena: &impl RegionLookup,
    root: Option<RegionId>,
    window: (u128, u128),
) -> impl Iterator<Item = FlatRange> {
    // Keyed by address: children render in priority order, not address order, so a sorted Vec
    // would be inserted into at random places (quadratic at 100 000 regions).
    let mut out = BTreeMap::new();
    if let Some(root) = root {
        // The root starts at address 0 whatever its address in some parent: QEMU adds it,
        // which shifts the view when the root was reached through an alias whose target is
        // mapped elsewhere.
        let base = arena.region(root).map_or(0, |r| -i128::from(r.addr));
        let window = (window.0, window.1.min(SPACE_END));
        render_region(arena, &mut out, root, base, window, false, 0);
    }
    out.into_values()
}

/// `base` is the absolute address of the region's parent origin (it may be "negative" inside
/// aliases, hence i128); `clip` is the half-open absolute window still visible.
fn render_region(
    arena: &impl RegionLookup,
    out: &mut BTreeMap<u64, FlatRange>,
    id: RegionId,
    base: i128,
    clip: (u128, u128),
    readonly: bool,
    depth: u32,
) {
    let Some(r) = arena.region(id) else { return };
    if !r.enabled || depth > 4096 {
        return;
    }
    let readonly = readonly || r.readonly;
    let start = base + i128::from(r.addr);
    let end = start + r.size as i128;
    let lo = start.max(clip.0 as i128);
    let hi = end.min(clip.1 as i128);
    if lo >= hi {
        return;
    }
    let clip = (lo as u128, hi as u128);
    if let RegionKind::Alias { target, offset } = r.kind {
        let Some(t) = arena.region(target) else {
            return;
        };
        // The target is placed so that alias offset `offset` lands on the alias's start,
        // whatever address the target has in its own parent.
        let tbase = start - i128::from(t.addr) - i128::from(offset);
        render_region(arena, out, target, tbase, clip, readonly, depth + 1);
        return;
    }
    // Children outside the window render nothing: visit only the ones reaching into it
    // (all of them, in order, when the window is the whole region).
    let (rel_lo, rel_hi) = ((lo - start) as u128, (hi - start) as u128);
    if rel_lo == 0 && rel_hi >= r.size {
        for &child in &r.subregions {
            render_region(arena, out, child, start, clip, readonly, depth + 1);
        }
    } else {
        for child in r.subregions.overlapping(rel_lo, rel_hi) {
            render_region(arena, out, child, start, clip, readonly, depth + 1);
        }
    }
    if !r.terminates() {
        return;
    }
    fill_gaps(out, id, start, clip, readonly);
}

/// Inserts ranges for region `id` (starting at absolute `start`) wherever `clip` is not yet
/// covered; `out` holds disjoint ranges by address.
fn fill_gaps(
    out: &mut BTreeMap<u64, FlatRange>,
    id: RegionId,
    start: i128,
    clip: (u128, u128),
    readonly: bool,
) {
    let (mut pos, end) = clip;
    // Only the last range starting below the window can reach into it.
    if let Some((_, f)) = out.range(..clip.0 as u64).next_back() {
        pos = pos.max(f.end());
    }
    let mut gaps = Vec::new();
    if pos < end {
        for f in out.range(pos as u64..).map(|(_, f)| f) {
            let at = u128::from(f.addr);
            if at >= end {
                break;
            }
            if at > pos {
                gaps.push((pos, at));
            }
            pos = pos.max(f.end());
        }
    }
    if pos < end {
        gaps.push((pos, end));
    }
    for (from, to) in gaps {
        out.insert(
            from as u64,
            FlatRange {
                addr: from as u64,
                size: to - from,
                region: id,
                offset_in_region: (from as i128 - start) as u64,
                readonly,
            },
        );
    }
}

/// What replacing one window of a view changed: the ranges of the old view that are gone and
/// the ones of the new view that were not there, each in address order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WindowPatch {
    pub removed: Vec<FlatRange>,
    pub added: Vec<FlatRange>,
    /// Where in the old view the replaced ranges were, and how many ranges replaced them.
    pub at: std::ops::Range<usize>,
    pub replaced_by: usize,
    /// The addresses of the replaced ranges, in order.
    pub replaced_addrs: Vec<u64>,
}

/// Re-renders only `window` of `view` (whose tree changed nowhere else since `view` was
/// rendered from `root`) and splices it in: the ranges crossing the window's edges are cut,
/// the window is rendered afresh, and the pieces are merged with their neighbours as
/// [`simplified`] would. The result equals a full [`render`]; the cost is that of the window.
pub fn patch_window(
    arena: &impl RegionLookup,
    root: Option<RegionId>,
    view: &mut FlatView,
    window: (u128, u128),
) -> WindowPatch {
    let (w0, w1) = (window.0, window.1.min(SPACE_END));
    if w0 >= w1 {
        return WindowPatch::default();
    }
    let ranges = &view.ranges;
    // The ranges overlapping the window, and one neighbour each side that a piece may merge
    // with.
    let first = ranges.partition_point(|f| f.end() <= w0).saturating_sub(1);
    let last = (ranges.partition_point(|f| u128::from(f.addr) < w1) + 1).min(ranges.len());
    let old: Vec<FlatRange> = ranges.slice(first..last).cloned().collect();
    let old = &old[..];
    let cut = |f: &FlatRange, from: u128, to: u128| FlatRange {
        addr: from as u64,
        size: to - from,
        region: f.region,
        offset_in_region: f.offset_in_region + (from - u128::from(f.addr)) as u64,
        readonly: f.readonly,
    };
    let mut pieces: Vec<FlatRange> = old
        .iter()
        .filter(|f| u128::from(f.addr) < w0)
        .map(|f| cut(f, u128::from(f.addr), f.end().min(w0)))
        .collect();
    pieces.extend(render_window(arena, root, (w0, w1)));
    pieces.extend(
        old.iter()
            .filter(|f| f.end() > w1)
            .map(|f| cut(f, u128::from(f.addr).max(w1), f.end())),
    );
    let fresh: Vec<FlatRange> = simplified(pieces).collect();
    let removed = old
        .iter()
        .filter(|f| !sorted_contains(&fresh, f))
        .cloned()
        .collect();
    let added = fresh
        .iter()
        .filter(|f| !sorted_contains(old, f))
        .cloned()
        .collect();
    let replaced_addrs = old.iter().map(|f| f.addr).collect();
    let replaced_by = fresh.len();
    view.ranges.splice(first..last, fresh);
    WindowPatch {
        removed,
        added,
        at: first..last,
        replaced_by,
        replaced_addrs,
    }
}

/// QEMU's flatview_simplify over `ranges` in address order: neighbours that continue the
/// same region at contiguous offsets with the same attributes become one range.
pub fn simplified(ranges: impl IntoIterator<Item = FlatRange>) -> impl Iterator<Item = FlatRange> {
    let mut ranges = ranges.into_iter().peekable();
    std::iter::from_fn(move || {
        let mut merged = ranges.next()?;
        while let Some(r) = ranges.next_if(|r| {
            merged.region == r.region
                && merged.end() == u128::from(r.addr)
                && u128::from(merged.offset_in_region) + merged.size
                    == u128::from(r.offset_in_region)
                && merged.readonly == r.readonly
        }) {
            merged.size += r.size;
        }
        Some(merged)
    })
}

/// Ranges of `old` that are gone from `new`, and ranges of `new` that were not in `old`, each in
/// address order: what listeners get as region_del and region_add. One walk over both views
/// in address order (each holds at most one range per address).
pub fn diff(old: &FlatView, new: &FlatView) -> (Vec<FlatRange>, Vec<FlatRange>) {
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    let mut olds = old.ranges.iter().peekable();
    let mut news = new.ranges.iter().peekable();
    loop {
        match (olds.peek(), news.peek()) {
            (None, None) => break,
            (Some(_), None) => removed.extend(olds.by_ref().cloned()),
            (None, Some(_)) => added.extend(news.by_ref().cloned()),
            (Some(&o), Some(&n)) => match o.addr.cmp(&n.addr) {
                std::cmp::Ordering::Less => {
                    removed.push(o.clone());
                    olds.next();
                }
                std::cmp::Ordering::Greater => {
                    added.push(n.clone());
                    news.next();
                }
                std::cmp::Ordering::Equal => {
                    if o != n {
                        removed.push(o.clone());
                        added.push(n.clone());
                    }
                    olds.next();
                    news.next();
                }
            },
        }
    }
    (removed, added)
}

/// Whether `ranges` (sorted by address, disjoint, as views and diffs are) holds `r`.
pub fn sorted_contains(ranges: &[FlatRange], r: &FlatRange) -> bool {
    ranges
        .binary_search_by(|f| f.addr.cmp(&r.addr))
        .is_ok_and(|i| ranges[i] == *r)
}

impl FlatView {
    /// The range answering for `addr`, if any.
    pub fn lookup(&self, addr: u64) -> Option<&FlatRange> {
        let i = self.ranges.partition_point(|f| f.end() <= u128::from(addr));
        self.ranges
            .get(i)
            .filter(|f| u128::from(f.addr) <= u128::from(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ramblock::RamBlockId;
    use crate::region::Region;
    use proptest::prelude::*;

    /// A bare arena: flat-view rules are tested without the memory system's checks.
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
        fn container(&mut self, name: &str, size: u128) -> RegionId {
            self.add(name, size, RegionKind::Container)
        }
        fn ram(&mut self, name: &str, size: u128) -> RegionId {
            let b = RamBlockId(self.0.len() as u32);
            self.add(name, size, RegionKind::Ram { block: b })
        }
        fn io(&mut self, name: &str, size: u128) -> RegionId {
            self.add(name, size, RegionKind::Io)
        }
        fn alias(&mut self, name: &str, target: RegionId, offset: u64, size: u128) -> RegionId {
            self.add(name, size, RegionKind::Alias { target, offset })
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
        fn r(&mut self, i: RegionId) -> &mut Region {
            &mut self.0[i.index as usize]
        }
        fn view(&self, root: RegionId) -> Vec<(u64, u128, String, u64)> {
            render(self, Some(root))
                .ranges
                .iter()
                .map(|f| {
                    (
                        f.addr,
                        f.size,
                        self.0[f.region.index as usize].name.clone(),
                        f.offset_in_region,
                    )
                })
                .collect()
        }
    }

    fn s(name: &str) -> String {
        name.to_string()
    }

    #[test]
    fn container_fills_nothing_and_ram_fills_its_extent() {
        let mut a = Arena::default();
        let sys = a.container("system", 1 << 64);
        let ram = a.ram("ram", 0x4000);
        a.attach(sys, 0x1000, ram, 0);
        assert_eq!(a.view(sys), [(0x1000, 0x4000, s("ram"), 0)]);
    }

    #[test]
    fn higher_priority_wins_and_holes_show_the_lower_region() {
        let mut a = Arena::default();
        let sys = a.container("system", 1 << 64);
        let ram = a.ram("ram", 0x10000);
        let pci = a.container("pci", 0x10000);
        let rom = a.ram("rom", 0x1000);
        a.attach(sys, 0, ram, 0);
        a.attach(sys, 0, pci, 1);
        a.attach(pci, 0x4000, rom, 0);
        // pci is a container with a hole everywhere but rom: RAM shows through.
        assert_eq!(
            a.view(sys),
            [
                (0, 0x4000, s("ram"), 0),
                (0x4000, 0x1000, s("rom"), 0),
                (0x5000, 0xb000, s("ram"), 0x5000)
            ]
        );
    }

    #[test]
    fn newest_of_equal_priority_wins() {
        let mut a = Arena::default();
        let sys = a.container("system", 1 << 64);
        let old = a.io("old", 0x100);
        let new = a.io("new", 0x100);
        a.attach(sys, 0, old, 0);
        a.attach(sys, 0x80, new, 0);
        assert_eq!(
            a.view(sys),
            [(0, 0x80, s("old"), 0), (0x80, 0x100, s("new"), 0)]
        );
    }

    #[test]
    fn io_region_with_children_fills_the_gaps_with_offsets() {
        // QEMU's "io": unassigned ports answer as "io @offset" in `info mtree -f`.
        let mut a = Arena::default();
        let io = a.io("io", 0x10000);
        let pic = a.io("pic", 2);
        let rtc = a.io("rtc", 2);
        let idx = a.io("rtc-index", 1);
        a.attach(io, 0x20, pic, 0);
        a.attach(io, 0x70, rtc, 0);
        a.attach(rtc, 0, idx, 0);
        assert_eq!(
            a.view(io),
            [
                (0, 0x20, s("io"), 0),
                (0x20, 2, s("pic"), 0),
                (0x22, 0x4e, s("io"), 0x22),
                (0x70, 1, s("rtc-index"), 0),
                (0x71, 1, s("rtc"), 1),
                (0x72, 0xff8e, s("io"), 0x72)
            ]
        );
    }

    #[test]
    fn aliases_of_aliases_add_their_offsets() {
        let mut a = Arena::default();
        let sys = a.container("system", 1 << 64);
        let ram = a.ram("pc.ram", 0x100000);
        let outer = a.alias("outer", ram, 0x10000, 0x20000);
        let inner = a.alias("inner", outer, 0x1000, 0x2000);
        a.attach(sys, 0x500000, inner, 0);
        assert_eq!(a.view(sys), [(0x500000, 0x2000, s("pc.ram"), 0x11000)]);
    }

    #[test]
    fn alias_target_address_in_its_own_parent_does_not_matter() {
        let mut a = Arena::default();
        let sys = a.container("system", 1 << 64);
        let pci = a.container("pci", 1 << 64);
        let bios = a.ram("pc.bios", 0x40000);
        a.attach(pci, 0xfffc0000, bios, 0);
        let isa = a.alias("isa-bios", bios, 0x20000, 0x20000);
        a.attach(sys, 0xe0000, isa, 1);
        a.attach(sys, 0, pci, -1);
        assert_eq!(
            a.view(sys),
            [
                (0xe0000, 0x20000, s("pc.bios"), 0x20000),
                (0xfffc0000, 0x40000, s("pc.bios"), 0)
            ]
        );
    }

    #[test]
    fn children_are_clipped_to_their_parent_and_alias_to_its_target() {
        let mut a = Arena::default();
        let sys = a.container("system", 1 << 64);
        let c = a.container("c", 0x1000);
        let big = a.ram("big", 0x4000);
        a.attach(sys, 0x10000, c, 0);
        a.attach(c, 0x800, big, 0);
        let small = a.ram("small", 0x1000);
        let wide = a.alias("wide", small, 0x800, 0x4000);
        a.attach(sys, 0x20000, wide, 0);
        assert_eq!(
            a.view(sys),
            [
                (0x10800, 0x800, s("big"), 0),
                (0x20000, 0x800, s("small"), 0x800)
            ]
        );
    }

    #[test]
    fn disabled_regions_and_their_subtrees_are_invisible() {
        let mut a = Arena::default();
        let sys = a.container("system", 1 << 64);
        let c = a.container("c", 0x1000);
        let r = a.ram("r", 0x1000);
        a.attach(sys, 0, c, 1);
        a.attach(c, 0, r, 0);
        let low = a.ram("low", 0x1000);
        a.attach(sys, 0, low, 0);
        a.r(c).enabled = false;
        assert_eq!(a.view(sys), [(0, 0x1000, s("low"), 0)]);
    }

    #[test]
    fn readonly_propagates_from_containers_and_aliases() {
        let mut a = Arena::default();
        let sys = a.container("system", 1 << 64);
        let ram = a.ram("ram", 0x2000);
        let al = a.alias("ro-window", ram, 0, 0x1000);
        a.r(al).readonly = true;
        a.attach(sys, 0, al, 0);
        a.attach(sys, 0x1000, ram, 0);
        let v = render(&a, Some(sys));
        assert!(v.ranges[0].readonly);
        assert!(!v.ranges[1].readonly);
        // Same region, contiguous addresses but not contiguous offsets: not merged.
        assert_eq!(v.ranges.len(), 2);
    }

    #[test]
    fn simplify_merges_contiguous_pieces_of_one_region() {
        let mut a = Arena::default();
        let sys = a.container("system", 1 << 64);
        let ram = a.ram("ram", 0x3000);
        let hole = a.container("hole", 0x1000);
        let gone = a.io("gone", 0x1000);
        a.attach(sys, 0, ram, 0);
        a.attach(ram, 0x1000, hole, 0);
        a.attach(hole, 0, gone, 0);
        a.r(gone).enabled = false;
        // The RAM fills around the empty child in two pieces, merged back into one.
        assert_eq!(a.view(sys), [(0, 0x3000, s("ram"), 0)]);
    }

    #[test]
    fn flatview_root_descends_like_qemu() {
        let mut a = Arena::default();
        let sys = a.container("system", 1 << 64);
        assert_eq!(flatview_root(&a, sys), None);
        let ram = a.ram("s390.ram", 0x4000000);
        a.attach(sys, 0, ram, 0);
        assert_eq!(flatview_root(&a, sys), Some(ram));
        let smm = a.container("memory", 1 << 64);
        let whole = a.alias("memory", sys, 0, 1 << 64);
        a.attach(smm, 0, whole, 0);
        assert_eq!(flatview_root(&a, smm), Some(ram));
        let io = a.io("io", 0x10000);
        a.attach(sys, 0x1_0000_0000, io, 0);
        assert_eq!(flatview_root(&a, smm), Some(sys));
        let part = a.alias("part", sys, 0x1000, 0x1000);
        assert_eq!(flatview_root(&a, part), Some(part));
        a.r(sys).enabled = false;
        assert_eq!(flatview_root(&a, smm), None);
        assert_eq!(render(&a, None), FlatView::default());
    }

    #[test]
    fn root_reached_through_an_alias_renders_at_zero() {
        let mut a = Arena::default();
        let sys = a.container("system", 1 << 64);
        let pci = a.container("pci", 1 << 64);
        let bios = a.ram("bios", 0x1000);
        a.attach(pci, 0xfffff000, bios, 0);
        let whole = a.alias("whole", bios, 0, 0x1000);
        a.attach(sys, 0, whole, 0);
        assert_eq!(flatview_root(&a, sys), Some(bios));
        let direct = render(&a, Some(sys));
        assert_eq!(render(&a, flatview_root(&a, sys)), direct);
        assert_eq!(direct.ranges[0].addr, 0);
    }

    #[test]
    fn diff_lists_gone_and_new_ranges() {
        let r = |addr: u64, region: usize| FlatRange {
            addr,
            size: 0x1000,
            region: id(region),
            offset_in_region: 0,
            readonly: false,
        };
        let old = FlatView {
            ranges: vec![r(0, 1), r(0x1000, 2), r(0x2000, 3)].into(),
        };
        let new = FlatView {
            ranges: vec![r(0, 1), r(0x1000, 4), r(0x3000, 3)].into(),
        };
        let (gone, added) = diff(&old, &new);
        assert_eq!(gone, [r(0x1000, 2), r(0x2000, 3)]);
        assert_eq!(added, [r(0x1000, 4), r(0x3000, 3)]);
        assert_eq!(new.lookup(0x1fff), Some(&r(0x1000, 4)));
        assert_eq!(new.lookup(0x2000), None);
    }

    // ---- property test against a brute-force model -------------------------------------

    const G: u64 = 0x10;
    const SPACE: u64 = 0x100 * G;

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

    #[derive(Clone, Debug)]
    struct Spec {
        kind: u8,
        size: u64,
        parent: usize,
        addr: u64,
        prio: i32,
        enabled: bool,
        readonly: bool,
        target: usize,
        offset: u64,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            0u8..4,
            1u64..0x80,
            any::<usize>(),
            0u64..0x100,
            -2i32..3,
            prop::bool::weighted(0.9),
            prop::bool::weighted(0.1),
            any::<usize>(),
            0u64..0x40,
        )
            .prop_map(
                |(kind, size, parent, addr, prio, enabled, readonly, target, offset)| Spec {
                    kind,
                    size: size * G,
                    parent,
                    addr: addr * G,
                    prio,
                    enabled,
                    readonly,
                    target,
                    offset: offset * G,
                },
            )
    }

    fn reaches(a: &Arena, from: RegionId, to: RegionId) -> bool {
        if from == to {
            return true;
        }
        let r = &a.0[from.index as usize];
        r.subregions.iter().any(|&c| reaches(a, c, to))
            || r.alias_target().is_some_and(|(t, _)| reaches(a, t, to))
    }

    fn build(specs: &[Spec]) -> (Arena, RegionId) {
        let mut a = Arena::default();
        let root = a.container("root", u128::from(SPACE));
        for (i, sp) in specs.iter().enumerate() {
            let name = format!("r{i}");
            let existing = a.0.len();
            let size = u128::from(sp.size);
            let me = match sp.kind {
                0 => a.container(&name, size),
                1 => a.ram(&name, size),
                2 => a.io(&name, size),
                _ => {
                    let t = id(sp.target % existing);
                    a.alias(&name, t, sp.offset, size)
                }
            };
            a.r(me).enabled = sp.enabled;
            a.r(me).readonly = sp.readonly;
            let parent = id(sp.parent % existing);
            let parent_ok = a.0[parent.index as usize].alias_target().is_none();
            if parent_ok && !reaches(&a, me, parent) {
                a.attach(parent, sp.addr, me, sp.prio);
            }
        }
        (a, root)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn render_agrees_with_per_address_lookup(specs in prop::collection::vec(spec(), 1..14)) {
            let (arena, root) = build(&specs);
            let view = render(&arena, Some(root));
            // Patching any window of an unchanged tree changes nothing and announces nothing.
            for sp in &specs {
                let mut patched = view.clone();
                let w = (u128::from(sp.addr), u128::from(sp.addr) + u128::from(sp.size));
                let p = patch_window(&arena, Some(root), &mut patched, w);
                prop_assert!(p.removed.is_empty() && p.added.is_empty(), "{:?}", p);
                prop_assert_eq!(&patched, &view);
            }
            // Rendering from the reduced root gives the same view.
            prop_assert_eq!(&render(&arena, flatview_root(&arena, root)), &view);
            // Sorted, disjoint, non-empty, and fully simplified.
            let ranges: Vec<&FlatRange> = view.ranges.iter().collect();
            for w in ranges.windows(2) {
                prop_assert!(w[0].end() <= u128::from(w[1].addr));
                let mergeable = w[0].region == w[1].region
                    && w[0].end() == u128::from(w[1].addr)
                    && u128::from(w[0].offset_in_region) + w[0].size
                        == u128::from(w[1].offset_in_region)
                    && w[0].readonly == w[1].readonly;
                prop_assert!(!mergeable, "unmerged neighbours {:?}", w);
            }
            for g in 0..(SPACE / G + 8) {
                let addr = g * G;
                let want = model(&arena, root, u128::from(addr), false);
                let got = view.lookup(addr).map(|f| {
                    (f.region, f.offset_in_region + (addr - f.addr), f.readonly)
                });
                prop_assert_eq!(got, want, "at {:#x}", addr);
            }
        }
    }
}
