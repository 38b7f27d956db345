//! Which pages of a load's destination are known to read as zeros, so that a ZERO record for
//! one of them costs nothing: no test, no fill, no fault.
//!
//! A plain loader (QEMU's `ram_handle_zero`, hostmem's before this) reads every page a ZERO
//! record names to see whether it must be cleared. Into a preallocated destination that is a
//! read of half the guest from memory, about a quarter of a load's time. QEMU's multifd and
//! mapped-ram loaders skip the test by assuming the destination was all zeros when the load
//! began, which is wrong for a file backend with old contents or a board that wrote RAM
//! before the load; hostmem knows instead of assuming:
//!
//! - pages the populated-page scan ([`crate::populated`]) leaves out read as zeros (the scan is
//!   a superset of what may hold data), known from the start;
//! - a helper thread ([`KnownZero::test_ahead`]) tests the populated pages in place, ahead of
//!   the loader, and marks those it finds zero.
//!
//! Either answer is about the memory as it was before this load wrote it: the load's own
//! writes are recorded ([`KnownZero::writing`]) before they happen, by the thread that makes
//! them, and a page written is never skipped afterwards. Nothing else writes a destination's
//! memory while it loads (its guest does not run), so a page found zero and not written since
//! is zero. The loader sends every record of one page through one thread, in stream order
//! (`parallel`), which is what makes the check and the record of a write agree without locks.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::populated::PopulatedMap;

use super::format::TARGET_PAGE_SIZE;

const PAGE: u64 = TARGET_PAGE_SIZE as u64;
/// Pages per bitmap word.
const WORD_PAGES: u64 = 64;

/// A bitmap of atomic words, all clear, whose untouched part costs no memory (the allocation
/// is zeroed by the kernel on first touch, as a 1 TiB guest's 32 MiB bitmaps need).
fn zeroed_words(n: usize) -> Box<[AtomicU64]> {
    if n == 0 {
        return Box::new([]);
    }
    let layout = std::alloc::Layout::array::<AtomicU64>(n).expect("bitmap of a RAMBlock's pages");
    // SAFETY: the layout is non-empty (n > 0); AtomicU64 has the in-memory representation of a
    // u64, so zeroed memory is n valid atomics holding 0; the pointer comes from the global
    // allocator with this very layout, which is what Box<[AtomicU64]> frees it with.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut AtomicU64;
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n))
    }
}

/// One block's hints.
#[derive(Debug)]
struct Hints {
    pages: u64,
    /// Pages the scan left out: zero from the start.
    unpopulated: u64,
    /// Set: the page may hold data (populated when the load began, and not yet found zero).
    /// Only the tester clears bits once the scan has set them.
    may_hold_data: Box<[AtomicU64]>,
    /// Set: this load wrote the page, or is about to. Set by the thread that writes it.
    written: Box<[AtomicU64]>,
    /// The highest offset the loader has reached in the block: the tester starts there.
    loader_at: AtomicU64,
}

impl Hints {
    fn new(map: &PopulatedMap, length: u64) -> Hints {
        let pages = length / PAGE;
        let words = pages.div_ceil(WORD_PAGES) as usize;
        let may_hold_data = zeroed_words(words);
        for run in map.runs() {
            let first = run.start / PAGE;
            let end = (run.end / PAGE).min(pages);
            let mut p = first;
            while p < end {
                let w = p / WORD_PAGES;
                let bit = p % WORD_PAGES;
                let n = (WORD_PAGES - bit).min(end - p);
                let mask = if n == WORD_PAGES {
                    u64::MAX
                } else {
                    ((1u64 << n) - 1) << bit
                };
                may_hold_data[w as usize].fetch_or(mask, Ordering::Relaxed);
                p += n;
            }
        }
        let populated = may_hold_data
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum::<u64>();
        Hints {
            pages,
            unpopulated: pages - populated,
            may_hold_data,
            written: zeroed_words(words),
            loader_at: AtomicU64::new(0),
        }
    }

    fn page(&self, offset: u64) -> Option<(usize, u64)> {
        let p = offset / PAGE;
        (p < self.pages).then_some(((p / WORD_PAGES) as usize, 1 << (p % WORD_PAGES)))
    }
}

/// The known-zero pages of a load's blocks, shared by the loader's threads and the tester.
#[derive(Debug)]
pub struct KnownZero {
    /// Per block of the load target, by its handle; `None`: nothing is known of that block.
    blocks: Vec<Option<Hints>>,
    /// The block the loader is in, for the tester.
    loader_block: AtomicUsize,
    /// ZERO records that needed nothing.
    skipped: AtomicU64,
    /// Pages the tester found zero.
    found_zero: AtomicU64,
}

impl KnownZero {
    /// Hints for blocks of the given lengths: `Some(map)` is what a populated-page scan of the
    /// block found (every page outside it reads as zeros), `None` a block nothing is known of
    /// (a ZERO record for it is tested, as without hints).
    pub fn new(blocks: impl IntoIterator<Item = Option<(PopulatedMap, u64)>>) -> KnownZero {
        KnownZero {
            blocks: blocks
                .into_iter()
                .map(|b| b.map(|(map, len)| Hints::new(&map, len)))
                .collect(),
            loader_block: AtomicUsize::new(0),
            skipped: AtomicU64::new(0),
            found_zero: AtomicU64::new(0),
        }
    }

    /// Records that the calling thread is about to write the page at `offset` of `block`:
    /// from now on it is never known zero.
    pub fn writing(&self, block: usize, offset: u64) {
        self.reached(block, offset);
        let Some(h) = self.hints(block) else { return };
        if let Some((w, bit)) = h.page(offset) {
            h.written[w].fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// Whether a ZERO record for the page at `offset` of `block` needs nothing: the page reads
    /// as zeros and this load has not written it. Asked by the thread that would write it.
    pub fn skips_zero_record(&self, block: usize, offset: u64) -> bool {
        self.reached(block, offset);
        let Some(h) = self.hints(block) else {
            return false;
        };
        let Some((w, bit)) = h.page(offset) else {
            return false;
        };
        let known = h.written[w].load(Ordering::Relaxed) & bit == 0
            && h.may_hold_data[w].load(Ordering::Acquire) & bit == 0;
        if known {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
        known
    }

    /// Bytes the scan found never populated, in every block it knows of.
    pub fn unpopulated_bytes(&self) -> u64 {
        self.blocks
            .iter()
            .flatten()
            .map(|h| h.unpopulated * PAGE)
            .sum()
    }

    /// ZERO records that needed nothing so far.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Pages the tester has found zero so far.
    pub fn found_zero(&self) -> u64 {
        self.found_zero.load(Ordering::Relaxed)
    }

    /// Whether any block has pages left for [`Self::test_ahead`].
    pub fn has_pages_to_test(&self) -> bool {
        self.blocks.iter().flatten().any(|h| {
            h.may_hold_data
                .iter()
                .any(|w| w.load(Ordering::Relaxed) != 0)
        })
    }

    /// Whether the loader has gone past `end` of `block` (into a later block, or has had a
    /// record for the page that ends there or a later one), as far as it tells: its position
    /// moves a bitmap word (256 KiB) at a time.
    pub fn loader_passed(&self, block: usize, end: u64) -> bool {
        let at = self.loader_block.load(Ordering::Relaxed);
        at > block
            || (at == block
                && self
                    .hints(block)
                    .is_some_and(|h| h.loader_at.load(Ordering::Relaxed) + PAGE >= end))
    }

    fn hints(&self, block: usize) -> Option<&Hints> {
        self.blocks.get(block).and_then(Option::as_ref)
    }

    fn reached(&self, block: usize, offset: u64) {
        if self.loader_block.load(Ordering::Relaxed) != block {
            self.loader_block.store(block, Ordering::Relaxed);
        }
        // Moved a bitmap word at a time (the tester's unit): with writer threads this line is
        // shared, and a store per page would bounce it between their cores.
        if let Some(h) = self.hints(block) {
            if h.loader_at.load(Ordering::Relaxed) + WORD_PAGES * PAGE <= offset {
                h.loader_at.store(offset, Ordering::Relaxed);
            }
        }
    }

    /// The tester: tests the pages that may hold data and this load has not written, block by
    /// block from where the loader is, with `test(block, offset, zero)` (which tests
    /// `zero.len()` pages in place from `offset`, `false` when it could not), and marks those
    /// found zero. Returns when every block is done or `stop` is set. A block whose test fails
    /// is left alone from there: its ZERO records are tested by the loader, which reports the
    /// page.
    pub fn test_ahead(
        &self,
        stop: &AtomicBool,
        test: &mut dyn FnMut(usize, u64, &mut [bool]) -> bool,
    ) {
        let mut zero = [false; WORD_PAGES as usize];
        for (b, h) in self.blocks.iter().enumerate() {
            let Some(h) = h else { continue };
            let mut w = 0usize;
            while w < h.may_hold_data.len() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if self.loader_block.load(Ordering::Relaxed) > b {
                    break;
                }
                // Behind the loader the test is too late to help.
                let loader_word =
                    (h.loader_at.load(Ordering::Relaxed) / PAGE / WORD_PAGES) as usize;
                if self.loader_block.load(Ordering::Relaxed) == b && w < loader_word {
                    w = loader_word;
                    continue;
                }
                let pending = h.may_hold_data[w].load(Ordering::Relaxed)
                    & !h.written[w].load(Ordering::Relaxed);
                if pending == 0 {
                    w += 1;
                    continue;
                }
                let first = w as u64 * WORD_PAGES;
                let n = WORD_PAGES.min(h.pages - first) as usize;
                let mut found = 0u64;
                let mut i = 0;
                let mut failed = false;
                while i < n {
                    if pending >> i & 1 == 0 {
                        i += 1;
                        continue;
                    }
                    let start = i;
                    while i < n && pending >> i & 1 != 0 {
                        i += 1;
                    }
                    if !test(b, (first + start as u64) * PAGE, &mut zero[start..i]) {
                        failed = true;
                        break;
                    }
                    for (j, &z) in zero[start..i].iter().enumerate() {
                        if z {
                            found |= 1 << (start + j);
                        }
                    }
                }
                if found != 0 {
                    h.may_hold_data[w].fetch_and(!found, Ordering::Release);
                    self.found_zero
                        .fetch_add(found.count_ones() as u64, Ordering::Relaxed);
                }
                if failed {
                    break;
                }
                w += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A block of `pages` pages whose contents are `data` (true: non-zero), tested by a closure
    /// that reads `data`.
    fn tester(data: &[bool]) -> impl FnMut(usize, u64, &mut [bool]) -> bool + '_ {
        move |_, offset, zero| {
            let first = (offset / PAGE) as usize;
            for (i, z) in zero.iter_mut().enumerate() {
                *z = !data[first + i];
            }
            true
        }
    }

    #[test]
    fn pages_left_out_of_the_scan_are_known_zero_until_written() {
        let map = PopulatedMap::from_runs(4 * MIB, std::iter::once(MIB..2 * MIB));
        let k = KnownZero::new([Some((map, 4 * MIB)), None]);
        assert!(k.skips_zero_record(0, 0));
        assert!(k.skips_zero_record(0, 3 * MIB));
        // Populated and not tested: may hold data.
        assert!(!k.skips_zero_record(0, MIB));
        assert!(!k.skips_zero_record(0, 2 * MIB - PAGE));
        k.writing(0, 3 * MIB);
        assert!(!k.skips_zero_record(0, 3 * MIB));
        // A block nothing is known of, and offsets past a block, are always tested.
        assert!(!k.skips_zero_record(1, 0));
        assert!(!k.skips_zero_record(0, 4 * MIB));
        assert!(!k.skips_zero_record(7, 0));
        assert_eq!(k.skipped(), 2);
    }

    #[test]
    fn the_tester_marks_populated_pages_it_finds_zero_and_no_other() {
        let pages = 300usize;
        let map = PopulatedMap::everything(pages as u64 * PAGE);
        let k = KnownZero::new([Some((map, pages as u64 * PAGE))]);
        let data: Vec<bool> = (0..pages).map(|p| p % 3 == 0).collect();
        assert!(k.has_pages_to_test());
        let stop = AtomicBool::new(false);
        k.test_ahead(&stop, &mut tester(&data));
        for (p, &d) in data.iter().enumerate() {
            assert_eq!(k.skips_zero_record(0, p as u64 * PAGE), !d, "page {p}");
        }
        assert_eq!(k.found_zero(), 200);
        assert!(k.has_pages_to_test(), "the data pages still may hold data");
    }

    #[test]
    fn a_page_written_before_or_while_it_is_tested_is_never_skipped() {
        let map = PopulatedMap::everything(128 * PAGE);
        let k = KnownZero::new([Some((map, 128 * PAGE))]);
        k.writing(0, 5 * PAGE);
        let stop = AtomicBool::new(false);
        let mut tested = Vec::new();
        // Page 70 is written while the tester looks at it: the tester still sees zeros there.
        k.test_ahead(&stop, &mut |_, offset, zero| {
            tested.push((offset / PAGE, zero.len()));
            if offset / PAGE <= 70 && 70 < offset / PAGE + zero.len() as u64 {
                k.writing(0, 70 * PAGE);
            }
            zero.fill(true);
            true
        });
        // Page 5 was written first: the tester skipped it.
        assert_eq!(tested, [(0, 5), (6, 58), (64, 64)]);
        assert!(!k.skips_zero_record(0, 5 * PAGE));
        assert!(!k.skips_zero_record(0, 70 * PAGE));
        assert!(k.skips_zero_record(0, 71 * PAGE));
    }

    #[test]
    fn the_tester_starts_where_the_loader_is_and_stops_at_a_failed_test() {
        let map = PopulatedMap::everything(256 * PAGE);
        let k = KnownZero::new([
            Some((map.clone(), 256 * PAGE)),
            Some((map.clone(), 256 * PAGE)),
        ]);
        // The loader is at page 130 of block 0.
        assert!(!k.skips_zero_record(0, 130 * PAGE));
        let stop = AtomicBool::new(false);
        let mut tested = Vec::new();
        k.test_ahead(&stop, &mut |b, offset, zero| {
            tested.push((b, offset / PAGE));
            zero.fill(true);
            // Block 1 faults at its second word.
            !(b == 1 && offset >= 64 * PAGE)
        });
        assert_eq!(tested, [(0, 128), (0, 192), (1, 0), (1, 64)]);
        assert!(
            !k.skips_zero_record(0, 127 * PAGE),
            "behind the loader: untested"
        );
        assert!(k.skips_zero_record(0, 200 * PAGE));
        assert!(k.skips_zero_record(1, 63 * PAGE));
        assert!(
            !k.skips_zero_record(1, 64 * PAGE),
            "the failed test marks nothing"
        );
        // A stop request ends it at once.
        let k = KnownZero::new([Some((map, 256 * PAGE))]);
        stop.store(true, Ordering::Relaxed);
        k.test_ahead(&stop, &mut |_, _, _| panic!("tested after stop"));
        assert_eq!(k.found_zero(), 0);
    }
}
