//! Rendering a region tree into the flat list of ranges the guest sees (QEMU's FlatView), and
//! the difference between two flat views.
//!
//! The rules are QEMU's: siblings are visited in priority order (newest first among equals),
//! each region is clipped to its parent, an alias renders its target shifted by the alias
//! offset, children are rendered before their parent, and a RAM or I/O region then fills only
//! the gaps its children left. Disabled regions (and everything under them) are invisible.

use crate::region::{Region, RegionId, RegionKind, RegionLookup};

const SPACE_END: u128 = 1u128 << 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatRange {
    pub addr: u64,
    pub size: u128,
    /// The leaf region (RAM or I/O) that answers for this range.
    pub region: RegionId,
    pub offset_in_region: u64,
    pub readonly: bool,
}

impl FlatRange {
    pub fn end(&self) -> u128 {
        u128::from(self.addr) + self.size
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlatView {
    pub ranges: Vec<FlatRange>,
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
    let mut view = FlatView::default();
    if let Some(root) = root {
        render_region(arena, &mut view.ranges, root, 0, (0, SPACE_END), false, 0);
    }
    simplify(&mut view);
    view
}

/// `base` is the absolute address of the region's parent origin (it may be "negative" inside
/// aliases, hence i128); `clip` is the half-open absolute window still visible.
fn render_region(
    arena: &impl RegionLookup,
    out: &mut Vec<FlatRange>,
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
    for &child in &r.subregions {
        render_region(arena, out, child, start, clip, readonly, depth + 1);
    }
    if !r.terminates() {
        return;
    }
    fill_gaps(out, r, id, start, clip, readonly);
}

/// Inserts ranges for `r` wherever `clip` is not yet covered; `out` is sorted and disjoint.
fn fill_gaps(
    out: &mut Vec<FlatRange>,
    _r: &Region,
    id: RegionId,
    start: i128,
    clip: (u128, u128),
    readonly: bool,
) {
    let mut pos = clip.0;
    let end = clip.1;
    let piece = |from: u128, to: u128| FlatRange {
        addr: from as u64,
        size: to - from,
        region: id,
        offset_in_region: (from as i128 - start) as u64,
        readonly,
    };
    let mut i = out.partition_point(|f| f.end() <= pos);
    while pos < end {
        match out.get(i) {
            Some(f) if u128::from(f.addr) <= pos => {
                pos = f.end();
                i += 1;
            }
            Some(f) => {
                let stop = u128::from(f.addr).min(end);
                out.insert(i, piece(pos, stop));
                i += 1;
                pos = stop;
            }
            None => {
                out.push(piece(pos, end));
                pos = end;
            }
        }
    }
}

/// QEMU's flatview_simplify: neighbours that continue the same region at contiguous offsets
/// with the same attributes become one range.
pub fn simplify(view: &mut FlatView) {
    let mut merged: Vec<FlatRange> = Vec::with_capacity(view.ranges.len());
    for r in view.ranges.drain(..) {
        if let Some(last) = merged.last_mut() {
            if last.region == r.region
                && last.end() == u128::from(r.addr)
                && u128::from(last.offset_in_region) + last.size == u128::from(r.offset_in_region)
                && last.readonly == r.readonly
            {
                last.size += r.size;
                continue;
            }
        }
        merged.push(r);
    }
    view.ranges = merged;
}

/// Ranges of `old` that are gone from `new`, and ranges of `new` that were not in `old`, each in
/// address order: what listeners get as region_del and region_add.
pub fn diff(old: &FlatView, new: &FlatView) -> (Vec<FlatRange>, Vec<FlatRange>) {
    let removed = old
        .ranges
        .iter()
        .filter(|r| !contains(new, r))
        .cloned()
        .collect();
    let added = new
        .ranges
        .iter()
        .filter(|r| !contains(old, r))
        .cloned()
        .collect();
    (removed, added)
}

fn contains(view: &FlatView, r: &FlatRange) -> bool {
    view.ranges
        .binary_search_by(|f| f.addr.cmp(&r.addr))
        .is_ok_and(|i| view.ranges[i] == *r)
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
