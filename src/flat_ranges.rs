//! The ranges of a flat view in address order, stored in chunks: a commit that replaces a few
//! ranges in the middle of a big view moves the rest of one chunk, not the rest of the view.
//!
//! With one `Vec` for 10 000 regions, removing a region moved the ~5 000 ranges after it
//! (240 KiB, cache-cold after any full render): 10 µs of a 14 µs removal, more than 1 % of a
//! whole render. A chunk holds at most [`MAX_CHUNK`] ranges, so a splice costs a few
//! kilobytes moved plus a binary search over the chunks.

use std::fmt;

use crate::region::RegionId;

/// One piece of a flat view: `size` bytes from guest address `addr` answered by `region`
/// from `offset_in_region` on.
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

/// The ranges a chunk is cut to when a splice leaves it too long (in tests a handful, so
/// that the flat-view tests cross chunk boundaries at every size).
#[cfg(not(test))]
const CHUNK: usize = 256;
#[cfg(test)]
const CHUNK: usize = 4;
/// The most ranges one chunk holds.
const MAX_CHUNK: usize = 2 * CHUNK;

/// Sorted, disjoint ranges (the caller keeps them so). No chunk is empty.
#[derive(Clone, Default)]
pub struct FlatRanges {
    chunks: Vec<Vec<FlatRange>>,
    /// The position of each chunk's first range: positions are found by binary search.
    starts: Vec<usize>,
    len: usize,
}

impl FlatRanges {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> Iter<'_> {
        Iter {
            ranges: self.chunks.iter().flatten(),
            left: self.len,
        }
    }

    /// The range at position `i`, in address order.
    pub fn get(&self, i: usize) -> Option<&FlatRange> {
        let (c, at) = self.locate(i)?;
        self.chunks[c].get(at)
    }

    /// The number of leading ranges for which `pred` holds (it must hold for a prefix of the
    /// ranges, as for [`slice::partition_point`]).
    pub fn partition_point(&self, mut pred: impl FnMut(&FlatRange) -> bool) -> usize {
        // Chunks whose last range satisfies `pred` lie wholly inside the prefix.
        let full = self
            .chunks
            .partition_point(|c| c.last().is_some_and(&mut pred));
        match self.chunks.get(full) {
            Some(c) => self.starts[full] + c.partition_point(pred),
            None => self.len,
        }
    }

    /// The ranges at positions `range`, in order.
    pub fn slice(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = &FlatRange> {
        let (c, at) = self.locate(range.start).unwrap_or((self.chunks.len(), 0));
        self.chunks[c..].iter().flatten().skip(at).take(range.len())
    }

    /// Replaces the ranges at positions `range` by `with` (which must keep the whole sorted
    /// and disjoint): only the chunks `range` touches are rebuilt.
    pub fn splice(&mut self, range: std::ops::Range<usize>, with: Vec<FlatRange>) {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "splice {range:?} of {} ranges",
            self.len
        );
        let (first, start_in) = self.locate(range.start).unwrap_or((self.chunks.len(), 0));
        // The chunk holding the last replaced range, or the first one when none is replaced
        // (an insertion goes into the chunk it lands in).
        let last = if range.is_empty() {
            first
        } else {
            self.locate(range.end - 1).map_or(first, |(c, _)| c)
        };
        let end_chunk = (last + 1).min(self.chunks.len());
        self.len = self.len - range.len() + with.len();
        let mut merged = if first < self.chunks.len() {
            let end_in = range.end - self.starts[first];
            let mut flat: Vec<FlatRange> = Vec::new();
            for c in self.chunks.drain(first..end_chunk) {
                flat.extend(c);
            }
            flat.splice(start_in..end_in, with);
            flat
        } else {
            with
        };
        // A short result joins its successor, so that chunks do not dwindle to single ranges.
        let mut at = first.min(self.chunks.len());
        if merged.len() < CHUNK / 2 {
            if at < self.chunks.len() {
                let next = self.chunks.remove(at);
                merged.extend(next);
            } else if at > 0 {
                at -= 1;
                let mut prev = self.chunks.remove(at);
                prev.extend(merged);
                merged = prev;
            }
        }
        let pieces = cut(merged);
        self.chunks.splice(at..at, pieces);
        self.starts = starts(&self.chunks);
    }

    /// The chunk and the position in it of range `i`; `None` past the end.
    fn locate(&self, i: usize) -> Option<(usize, usize)> {
        if i >= self.len {
            return None;
        }
        let c = self.starts.partition_point(|&s| s <= i) - 1;
        Some((c, i - self.starts[c]))
    }
}

fn starts(chunks: &[Vec<FlatRange>]) -> Vec<usize> {
    chunks
        .iter()
        .scan(0, |at, c| {
            let start = *at;
            *at += c.len();
            Some(start)
        })
        .collect()
}

/// `ranges` as chunks of at most [`MAX_CHUNK`], none empty.
fn cut(ranges: Vec<FlatRange>) -> Vec<Vec<FlatRange>> {
    if ranges.is_empty() {
        return Vec::new();
    }
    if ranges.len() <= MAX_CHUNK {
        return vec![ranges];
    }
    chunked(ranges)
}

/// `ranges` moved into chunks of [`CHUNK`] (the last one shorter), none empty.
fn chunked(ranges: impl IntoIterator<Item = FlatRange>) -> Vec<Vec<FlatRange>> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::with_capacity(CHUNK);
    for r in ranges {
        if chunk.len() == CHUNK {
            chunks.push(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)));
        }
        chunk.push(r);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

/// From ranges in address order, each moved once into its chunk.
impl FromIterator<FlatRange> for FlatRanges {
    fn from_iter<I: IntoIterator<Item = FlatRange>>(ranges: I) -> Self {
        let chunks = chunked(ranges);
        FlatRanges {
            len: chunks.iter().map(Vec::len).sum(),
            starts: starts(&chunks),
            chunks,
        }
    }
}

impl From<Vec<FlatRange>> for FlatRanges {
    fn from(ranges: Vec<FlatRange>) -> Self {
        ranges.into_iter().collect()
    }
}

impl std::ops::Index<usize> for FlatRanges {
    type Output = FlatRange;

    fn index(&self, i: usize) -> &FlatRange {
        match self.get(i) {
            Some(r) => r,
            None => panic!("range {i} of a view of {}", self.len),
        }
    }
}

/// The ranges in address order. It knows how many are left, which a flattened iterator does
/// not: collecting a view's sections into a `Vec` then allocates once instead of growing
/// (copying 100 000 sections over and over cost a quarter of a 100 000-region commit).
#[derive(Clone)]
pub struct Iter<'a> {
    ranges: std::iter::Flatten<std::slice::Iter<'a, Vec<FlatRange>>>,
    left: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a FlatRange;

    fn next(&mut self) -> Option<&'a FlatRange> {
        let r = self.ranges.next()?;
        self.left -= 1;
        Some(r)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a FlatRanges {
    type Item = &'a FlatRange;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// Equal when they hold the same ranges, however they are chunked.
impl PartialEq for FlatRanges {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for FlatRanges {}

impl fmt::Debug for FlatRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(i: u64) -> FlatRange {
        FlatRange {
            addr: i * 0x1000,
            size: 0x1000,
            region: RegionId {
                index: i as u32,
                generation: 0,
            },
            offset_in_region: 0,
            readonly: false,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Splices anywhere keep the same ranges as one Vec would, and the chunks bounded.
        #[test]
        fn splices_agree_with_one_vec(
            start in 0usize..40,
            ops in prop::collection::vec((0usize..60, 0usize..6, 0usize..7), 1..40),
        ) {
            let mut model: Vec<FlatRange> = (0..start as u64).map(|i| r(i * 16)).collect();
            let mut ranges = FlatRanges::from(model.clone());
            for (generation, (at, remove, insert)) in (1u32..).zip(ops) {
                let a = at.min(model.len());
                let b = (a + remove).min(model.len());
                // Fresh ranges between the neighbours keep the whole sorted (addresses
                // are spaced out so they fit).
                let lo = if a > 0 { model[a - 1].addr / 0x1000 + 1 } else { 0 };
                let with: Vec<FlatRange> = (0..insert as u64)
                    .map(|k| {
                        let mut f = r(lo + k);
                        f.region.generation = generation;
                        f
                    })
                    .filter(|f| model.get(b).is_none_or(|n| f.end() <= u128::from(n.addr)))
                    .collect();
                model.splice(a..b, with.clone());
                ranges.splice(a..b, with);
                prop_assert_eq!(ranges.len(), model.len());
                prop_assert!(ranges.iter().eq(model.iter()));
                prop_assert!(ranges.chunks.iter().all(|c| !c.is_empty() && c.len() <= MAX_CHUNK));
                for (i, f) in model.iter().enumerate() {
                    prop_assert_eq!(ranges.get(i), Some(f));
                }
                prop_assert_eq!(ranges.get(model.len()), None);
                for from in [0, a, b, model.len()].map(|i| i.min(model.len())) {
                    let to = (from + 5).min(model.len());
                    prop_assert!(ranges.slice(from..to).eq(model[from..to].iter()));
                }
                for probe in [0u64, 0x1000, 0x8000, 0x40000] {
                    prop_assert_eq!(
                        ranges.partition_point(|f| f.addr < probe),
                        model.partition_point(|f| f.addr < probe)
                    );
                }
            }
        }
    }

    #[test]
    fn equal_ranges_are_equal_however_chunked() {
        let all: Vec<FlatRange> = (0..20).map(r).collect();
        let whole = FlatRanges::from(all.clone());
        let mut built = FlatRanges::from(all[..3].to_vec());
        built.splice(3..3, all[3..].to_vec());
        assert_ne!(whole.chunks.len(), built.chunks.len());
        assert_eq!(whole, built);
        assert_eq!(format!("{whole:?}"), format!("{all:?}"));
    }
}
