//! The `ram` section (idstr "ram", instance 0, version 4): QEMU's RAM payloads, both ways.
//!
//! Saving, [`RamSaver`] writes
//! * the setup payload (in SECTION_START): `be64 total | MEM_SIZE`, then for each migratable
//!   block in ram_list order `u8 len, idstr, be64 used_length`, then `be64 EOS`;
//! * rounds of page records (in SECTION_PART and SECTION_END): `be64 offset | flags`, the
//!   block's idstr unless CONTINUE says "same block as the previous record", then one fill
//!   byte (always 0) for ZERO or 4096 raw bytes for PAGE; each round ends with `be64 EOS`.
//!
//! Loading, [`RamLoader`] reads the same payloads and applies QEMU 10.0's checks, with its
//! messages: unknown and non-migratable blocks, the length check (the stream length aligned up
//! to the target page, then the host page; a resizeable block is resized when the aligned
//! length fits its max_length), offsets past used_length, CONTINUE before any block, unknown
//! flag combinations, and a ZERO record whose fill byte is not 0 (QEMU 7.2 filled the page
//! with it; 10.0 refuses it, and so does this loader). It also reads QEMU 10's mapped-ram
//! files, where the setup carries a header per block and the pages sit at fixed file offsets.
//!
//! RAM is reached through two traits rather than slices, see [`RamSource`] and
//! [`RamLoadTarget`].
//!
//! "Same block as the previous record" is tracked across section boundaries on both sides, as
//! in QEMU (neither resets it between sections), so a PART may start with CONTINUE. The saver
//! resets it at setup, as QEMU does, so the first page record always names its block.

use std::collections::HashMap;
use std::io::{self, Write};
use std::marker::PhantomData;
use std::sync::Arc;

use super::error::MigrationError;
use super::format::{MappedRam, RamFlag, RAM_FLAGS_MASK, TARGET_PAGE_SIZE};
pub use super::parallel::SharedRamTarget;
use super::parallel::{PageJob, PageWriters};
use super::qemu_file::{QemuReader, QemuWriter, StreamWrite};
use super::section::StreamRead;
use crate::error::Error;

const PAGE: u64 = TARGET_PAGE_SIZE as u64;

/// One migratable RAMBlock as the stream lists it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RamBlockInfo {
    pub idstr: String,
    pub used_length: u64,
}

impl RamBlockInfo {
    pub fn new(idstr: &str, used_length: u64) -> Self {
        RamBlockInfo {
            idstr: idstr.to_string(),
            used_length,
        }
    }
}

/// Where a saver's RAM comes from.
///
/// The source never hands out `&[u8]` of guest memory: a running guest may write any page at
/// any time (that is what the dirty log is for), and a Rust slice promises that its bytes do
/// not change while it lives, so a slice over live guest RAM would be undefined behaviour.
/// There are two ways to a page's bytes instead:
/// * [`Self::read_page`] copies a page into the saver's buffer (with whatever access the source
///   uses for memory shared with vCPUs), and the saver tests and sends that stable copy;
/// * [`Self::zero_test_in_place`], where the source has the pages mapped, tests a run of them
///   for zero where they lie and says where they are, and a stream that can
///   ([`StreamWrite::takes_unowned`]) hands the non-zero ones to the kernel from there, as
///   QEMU's iovecs do: one read pass and the kernel's copy, instead of three copies.
///
/// Either way a page torn by a concurrent write is dirty again and goes out in a later round;
/// in place, a page found zero and written before it is sent goes out as ZERO and again later,
/// and one found non-zero goes out with whatever it holds when the kernel reads it.
pub trait RamSource {
    /// The migratable blocks, in ram_list order (largest max_length first, as QEMU sorts
    /// them). Block indices in [`PageRef`] and [`Self::read_page`] index this list.
    fn blocks(&self) -> Vec<RamBlockInfo>;
    /// Copies the `TARGET_PAGE_SIZE` bytes at `offset` of block `block` into `buf`.
    fn read_page(&self, block: usize, offset: u64, buf: &mut [u8]) -> Result<(), Error>;
    /// Tests the `zero.len()` pages from `offset` of block `block` for zero where they lie
    /// (`zero[i]` for page `i`), and returns where they are. `None`: this source has no
    /// mapping to offer, and the saver copies with [`Self::read_page`].
    fn zero_test_in_place(
        &self,
        block: usize,
        offset: u64,
        zero: &mut [bool],
    ) -> Option<Result<InPlace<'_>, Error>> {
        let _ = (block, offset, zero);
        None
    }
    /// This source, if [`Self::zero_test_in_place`] may run on another thread at the same
    /// time (a saver then tests ahead on a helper thread). `None`: the saving thread only.
    fn shared(&self) -> Option<&(dyn RamSource + Sync)> {
        None
    }
}

/// Where a run of consecutive pages of a [`RamSource`] lies in the host's address space, for as
/// long as the source is borrowed.
#[derive(Clone, Copy, Debug)]
pub struct InPlace<'a> {
    base: *const u8,
    pages: usize,
    _source: PhantomData<&'a ()>,
}

// SAFETY: an InPlace is an address range and the borrow that keeps it mapped; reading through
// it is unsafe and its contract does not depend on the thread that reads (the zero-test helper
// finds runs, the saving thread sends them).
unsafe impl Send for InPlace<'_> {}

impl<'a> InPlace<'a> {
    /// # Safety
    /// `base..base + pages * TARGET_PAGE_SIZE` must stay mapped and readable for `'a`.
    pub unsafe fn new(base: *const u8, pages: usize) -> InPlace<'a> {
        InPlace {
            base,
            pages,
            _source: PhantomData,
        }
    }

    /// The host address of page `i` of the run.
    fn page(&self, i: usize) -> *const u8 {
        assert!(i < self.pages, "page {i} of a run of {}", self.pages);
        self.base.wrapping_add(i * TARGET_PAGE_SIZE)
    }
}

/// One page to send: a block index into [`RamSource::blocks`] and a page-aligned offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageRef {
    pub block: usize,
    pub offset: u64,
}

/// Every page of every block, in the order QEMU's bulk round sends them: block by block in
/// ram_list order, ascending offsets.
pub fn all_pages(blocks: &[RamBlockInfo]) -> impl Iterator<Item = PageRef> + '_ {
    blocks.iter().enumerate().flat_map(|(block, b)| {
        (0..b.used_length.div_ceil(PAGE)).map(move |n| PageRef {
            block,
            offset: n * PAGE,
        })
    })
}

/// Whether a buffer is all zero bytes: the test QEMU's `buffer_is_zero` makes before sending a
/// ZERO record. The first word is checked alone (most non-zero pages fail there), then
/// 512-byte stretches are OR-folded eight bytes at a time, a loop the compiler turns into
/// vector code, with one branch per stretch. Measured with the baseline x86-64 target on the
/// project's shared 2-core machine: 30-48 GiB/s on cache-resident zero pages (2-3x a loop
/// that branches every 256 bytes), and memory-bound (5-6 GiB/s there) on cold ones.
pub fn is_zero_page(buf: &[u8]) -> bool {
    const STRETCH: usize = 512;
    let word = |w: &[u8]| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
    if buf.len() >= 8 && word(buf) != 0 {
        return false;
    }
    let mut chunks = buf.chunks_exact(STRETCH);
    for chunk in &mut chunks {
        if chunk.chunks_exact(8).fold(0u64, |acc, w| acc | word(w)) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// What a saver wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamSaveStats {
    /// PAGE records (4096 raw bytes each).
    pub normal_pages: u64,
    /// ZERO records.
    pub zero_pages: u64,
}

/// The sending side of the `ram` section.
pub struct RamSaver {
    blocks: Vec<RamBlockInfo>,
    last_block: Option<usize>,
    zero_page_detection: bool,
    page: Vec<u8>,
    stats: RamSaveStats,
}

impl RamSaver {
    /// Checks the block list: idstrs of 1 to 255 bytes, each once, page-aligned lengths.
    pub fn new(blocks: Vec<RamBlockInfo>) -> Result<Self, MigrationError> {
        let mut seen = std::collections::HashSet::new();
        for b in &blocks {
            if b.idstr.len() > 255 {
                return Err(MigrationError::StringTooLong {
                    name: b.idstr.clone(),
                    len: b.idstr.len(),
                });
            }
            if b.idstr.is_empty()
                || !seen.insert(b.idstr.as_str())
                || !b.used_length.is_multiple_of(PAGE)
            {
                return Err(MigrationError::Usage(format!(
                    "RAM block \"{}\" cannot be migrated: idstrs must be unique and non-empty \
                     and used_length (0x{:x}) a multiple of 0x{:x}",
                    b.idstr, b.used_length, PAGE
                )));
            }
        }
        Ok(RamSaver {
            blocks,
            last_block: None,
            zero_page_detection: true,
            page: vec![0; TARGET_PAGE_SIZE],
            stats: RamSaveStats::default(),
        })
    }

    /// With `false`, every page goes out as PAGE (QEMU 10's `zero-page-detection=none`).
    pub fn set_zero_page_detection(&mut self, on: bool) {
        self.zero_page_detection = on;
    }

    pub fn blocks(&self) -> &[RamBlockInfo] {
        &self.blocks
    }

    pub fn stats(&self) -> RamSaveStats {
        self.stats
    }

    /// The sum of the blocks' used_length: the MEM_SIZE record's value.
    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.used_length).sum()
    }

    /// The SECTION_START payload: MEM_SIZE, the block list, EOS. Forgets the last block, so the
    /// first page record names its block.
    pub fn write_setup<W: Write + ?Sized>(
        &mut self,
        w: &mut QemuWriter<W>,
    ) -> Result<(), MigrationError> {
        self.last_block = None;
        w.put_be64(self.total_bytes() | RamFlag::MEM_SIZE)?;
        for b in &self.blocks {
            w.put_counted_string(&b.idstr)?;
            w.put_be64(b.used_length)?;
        }
        w.put_be64(RamFlag::EOS)
    }

    /// The SECTION_START payload of a mapped-ram file (QEMU 10's `file:` with capability
    /// `mapped-ram`): per block, after its length, a [`MappedRamHeader`]; then the block's
    /// non-zero pages at `pages_offset + n * 4096` (zero pages stay holes), its bitmap at
    /// `bitmap_offset`, and the stream continues at `pages_offset + used_length`. Each page is
    /// read once, so this is for a stopped guest (QEMU's docs: mapped-ram is "best done
    /// non-live"). The writer must be at the file position `w.position()` says.
    pub fn write_setup_mapped_ram<W: Write + std::io::Seek>(
        &mut self,
        w: &mut QemuWriter<W>,
        source: &dyn RamSource,
    ) -> Result<(), MigrationError> {
        use std::io::SeekFrom;
        self.last_block = None;
        w.put_be64(self.total_bytes() | RamFlag::MEM_SIZE)?;
        for b in 0..self.blocks.len() {
            let (idstr, used) = (self.blocks[b].idstr.clone(), self.blocks[b].used_length);
            w.put_counted_string(&idstr)?;
            w.put_be64(used)?;
            let num_pages = used / PAGE;
            let bitmap_offset = w.position() + MappedRam::HEADER_SIZE;
            let bitmap_len = num_pages.div_ceil(64) * 8;
            let pages_offset =
                align_up(bitmap_offset + bitmap_len, MappedRam::FILE_OFFSET_ALIGNMENT);
            MappedRamHeader {
                version: MappedRam::HEADER_VERSION,
                page_size: PAGE,
                bitmap_offset,
                pages_offset,
            }
            .write(w)?;
            let mut bitmap = vec![0u8; bitmap_len as usize];
            for n in 0..num_pages {
                source.read_page(b, n * PAGE, &mut self.page)?;
                if self.zero_page_detection && is_zero_page(&self.page) {
                    self.stats.zero_pages += 1;
                    continue;
                }
                bitmap[(n / 8) as usize] |= 1 << (n % 8);
                w.get_mut().seek(SeekFrom::Start(pages_offset + n * PAGE))?;
                w.set_position(pages_offset + n * PAGE);
                w.put_buffer(&self.page)?;
                self.stats.normal_pages += 1;
            }
            w.get_mut().seek(SeekFrom::Start(bitmap_offset))?;
            w.set_position(bitmap_offset);
            w.put_buffer(&bitmap)?;
            w.get_mut().seek(SeekFrom::Start(pages_offset + used))?;
            w.set_position(pages_offset + used);
        }
        w.put_be64(RamFlag::EOS)
    }

    /// One round's payload: a record for each page, then EOS. Returns what this round wrote.
    ///
    /// When both the source and the stream can ([`Self::tests_in_place`]), pages are tested
    /// and sent in place, a run of consecutive pages at a time
    /// ([`RamSource::zero_test_in_place`]); the stream is then flushed before this returns, so
    /// the kernel has read every page while `source` is still borrowed. A caller that tests
    /// on other threads splits this into [`Self::runs`], [`PageRuns::test`] and
    /// [`Self::write_tested_round`].
    pub fn write_round<W: StreamWrite + ?Sized>(
        &mut self,
        w: &mut QemuWriter<W>,
        source: &dyn RamSource,
        pages: impl IntoIterator<Item = PageRef>,
    ) -> Result<RamSaveStats, MigrationError> {
        let before = self.stats;
        let mut pages = pages.into_iter().peekable();
        let mut sent_in_place = false;
        if !self.tests_in_place(w) {
            for p in pages {
                self.check_page(p)?;
                self.write_page(w, source, p)?;
            }
        } else {
            // A batch at a time, so that a round of a huge guest holds little.
            loop {
                let runs = self.next_runs(&mut pages, BATCH_PAGES)?;
                if runs.is_empty() {
                    break;
                }
                let tested = runs.test(source);
                sent_in_place |= self.write_runs(w, source, &runs, tested)?;
            }
        }
        self.end_round(w, sent_in_place)?;
        Ok(self.stats_since(before))
    }

    /// Whether rounds on `w` test pages in place (zero-page detection on, and a stream that
    /// takes bytes it does not own), so that their zero tests may run on other threads.
    pub fn tests_in_place<W: StreamWrite + ?Sized>(&self, w: &mut QemuWriter<W>) -> bool {
        self.zero_page_detection && w.get_mut().takes_unowned()
    }

    /// `pages`, checked against the block list, as runs of consecutive pages for
    /// [`PageRuns::test`].
    pub fn runs(
        &self,
        pages: impl IntoIterator<Item = PageRef>,
    ) -> Result<PageRuns, MigrationError> {
        self.next_runs(&mut pages.into_iter().peekable(), usize::MAX)
    }

    /// One round's payload from pages [`Self::runs`] found and [`PageRuns::test`] tested (on
    /// any thread, from this `source`): what [`Self::write_round`] writes for them, flushed
    /// likewise. For streams that [`Self::tests_in_place`].
    pub fn write_tested_round<W: StreamWrite + ?Sized>(
        &mut self,
        w: &mut QemuWriter<W>,
        source: &dyn RamSource,
        runs: &PageRuns,
        tested: TestedRuns<'_>,
    ) -> Result<RamSaveStats, MigrationError> {
        if !self.tests_in_place(w) {
            return Err(MigrationError::Usage(
                "pages tested in place on a stream that copies them".into(),
            ));
        }
        let before = self.stats;
        let sent_in_place = self.write_runs(w, source, runs, tested)?;
        self.end_round(w, sent_in_place)?;
        Ok(self.stats_since(before))
    }

    /// EOS, and the flush that lets go of pages sent in place.
    fn end_round<W: StreamWrite + ?Sized>(
        &mut self,
        w: &mut QemuWriter<W>,
        sent_in_place: bool,
    ) -> Result<(), MigrationError> {
        w.put_be64(RamFlag::EOS)?;
        if sent_in_place {
            w.flush()?;
        }
        Ok(())
    }

    fn stats_since(&self, before: RamSaveStats) -> RamSaveStats {
        RamSaveStats {
            normal_pages: self.stats.normal_pages - before.normal_pages,
            zero_pages: self.stats.zero_pages - before.zero_pages,
        }
    }

    /// The next runs of `pages`, checked, until they hold at least `limit` pages or `pages`
    /// ends.
    fn next_runs(
        &self,
        pages: &mut std::iter::Peekable<impl Iterator<Item = PageRef>>,
        limit: usize,
    ) -> Result<PageRuns, MigrationError> {
        let mut runs = PageRuns::default();
        while runs.pages < limit {
            let Some(first) = pages.next() else { break };
            self.check_page(first)?;
            let mut n = 1;
            while n < IN_PLACE_RUN {
                match pages.peek() {
                    Some(p)
                        if p.block == first.block && p.offset == first.offset + n as u64 * PAGE =>
                    {
                        self.check_page(*p)?;
                        pages.next();
                        n += 1;
                    }
                    _ => break,
                }
            }
            runs.runs.push(Run { first, n });
            runs.pages += n;
        }
        Ok(runs)
    }

    /// The records of `runs`, tested; whether any page went out in place (the stream then
    /// must be flushed while the source is borrowed).
    fn write_runs<W: StreamWrite + ?Sized>(
        &mut self,
        w: &mut QemuWriter<W>,
        source: &dyn RamSource,
        runs: &PageRuns,
        tested: TestedRuns<'_>,
    ) -> Result<bool, MigrationError> {
        if tested.0.len() != runs.runs.len() {
            return Err(MigrationError::Usage(format!(
                "{} runs tested for a round of {}",
                tested.0.len(),
                runs.runs.len()
            )));
        }
        let mut sent_in_place = false;
        for (run, t) in runs.runs.iter().zip(tested.0) {
            let Some(found) = t.found else {
                // This source copies.
                for i in 0..run.n {
                    let offset = run.first.offset + i as u64 * PAGE;
                    self.write_page(
                        w,
                        source,
                        PageRef {
                            offset,
                            ..run.first
                        },
                    )?;
                }
                continue;
            };
            let place = found?;
            for (i, &z) in t.zero[..run.n].iter().enumerate() {
                let offset = run.first.offset + i as u64 * PAGE;
                self.put_header(
                    w,
                    PageRef {
                        offset,
                        ..run.first
                    },
                    z,
                )?;
                if z {
                    w.put_u8(0)?;
                    self.stats.zero_pages += 1;
                } else {
                    // SAFETY: the page lies in `place`, which the source keeps mapped while it
                    // is borrowed (for `tested`'s lifetime, past the flush that ends the
                    // round).
                    unsafe { w.put_unowned(place.page(i), TARGET_PAGE_SIZE)? };
                    self.stats.normal_pages += 1;
                    sent_in_place = true;
                }
            }
        }
        Ok(sent_in_place)
    }

    /// Refuses a page the source does not list.
    fn check_page(&self, p: PageRef) -> Result<(), MigrationError> {
        let Some(block) = self.blocks.get(p.block) else {
            return Err(MigrationError::Usage(format!(
                "page of RAM block index {} requested; the source lists {} blocks",
                p.block,
                self.blocks.len()
            )));
        };
        if !p.offset.is_multiple_of(PAGE) || p.offset >= block.used_length {
            return Err(MigrationError::IllegalRamOffset { offset: p.offset });
        }
        Ok(())
    }

    /// A checked page's record: the block's page, copied, tested and written.
    fn write_page<W: Write + ?Sized>(
        &mut self,
        w: &mut QemuWriter<W>,
        source: &dyn RamSource,
        p: PageRef,
    ) -> Result<(), MigrationError> {
        source.read_page(p.block, p.offset, &mut self.page)?;
        let zero = self.zero_page_detection && is_zero_page(&self.page);
        self.put_header(w, p, zero)?;
        if zero {
            w.put_u8(0)?;
            self.stats.zero_pages += 1;
        } else {
            w.put_buffer(&self.page)?;
            self.stats.normal_pages += 1;
        }
        Ok(())
    }

    /// The record's header: offset and flags, and the block's idstr unless CONTINUE.
    fn put_header<W: Write + ?Sized>(
        &mut self,
        w: &mut QemuWriter<W>,
        p: PageRef,
        zero: bool,
    ) -> Result<(), MigrationError> {
        let mut header = p.offset | if zero { RamFlag::ZERO } else { RamFlag::PAGE };
        let same = self.last_block == Some(p.block);
        if same {
            header |= RamFlag::CONTINUE;
        }
        w.put_be64(header)?;
        if !same {
            w.put_counted_string(&self.blocks[p.block].idstr)?;
            self.last_block = Some(p.block);
        }
        Ok(())
    }
}

/// Pages tested in place at a time: one guarded access per run (256 KiB).
const IN_PLACE_RUN: usize = 64;

/// Pages a round tests and frames at a time, so that a round of a huge guest holds little.
const BATCH_PAGES: usize = 1024;

/// Consecutive pages of one block, tested with one guarded access.
#[derive(Clone, Copy, Debug)]
struct Run {
    first: PageRef,
    n: usize,
}

/// Pages of a round as runs of consecutive pages of one block, checked against the saver's
/// block list ([`RamSaver::runs`]); a thread other than the saver's may test them.
#[derive(Clone, Debug, Default)]
pub struct PageRuns {
    runs: Vec<Run>,
    pages: usize,
}

impl PageRuns {
    /// Pages in all.
    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Tests every run for zero where it lies ([`RamSource::zero_test_in_place`]), for
    /// [`RamSaver::write_tested_round`]; a fault is kept for the round to report.
    pub fn test<'s>(&self, source: &'s (dyn RamSource + '_)) -> TestedRuns<'s> {
        TestedRuns(
            self.runs
                .iter()
                .map(|r| {
                    let mut zero = [false; IN_PLACE_RUN];
                    let found =
                        source.zero_test_in_place(r.first.block, r.first.offset, &mut zero[..r.n]);
                    Tested { zero, found }
                })
                .collect(),
        )
    }
}

/// What [`PageRuns::test`] found: which pages are zero, and where they lie for as long as the
/// source is borrowed.
pub struct TestedRuns<'s>(Vec<Tested<'s>>);

/// A run tested for zero where it lies: `None` when the source has no mapping to offer.
struct Tested<'s> {
    zero: [bool; IN_PLACE_RUN],
    found: Option<Result<InPlace<'s>, Error>>,
}

/// What a load target knows of one of its RAMBlocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalRamBlock {
    /// The target's name for the block, passed back in every later call.
    pub handle: usize,
    pub used_length: u64,
    pub max_length: u64,
    /// QEMU's RAM_RESIZEABLE: the loader may change used_length up to max_length.
    pub resizeable: bool,
    /// Registered for migration (QEMU's RAM_MIGRATABLE, set by `vmstate_register_ram`).
    pub migratable: bool,
}

/// Where a loader's RAM goes.
///
/// The loader never asks for a slice either: it hands over each page's bytes and lets the
/// target copy them in, and it asks for zero pages to be zeroed rather than writing zeros, so
/// the target can skip pages that are already zero (QEMU's `ram_handle_zero` does), keeping
/// never-touched memory unallocated.
pub trait RamLoadTarget {
    /// The block called `idstr` (an exact match), whether migratable or not.
    fn find_block(&mut self, idstr: &str) -> Option<LocalRamBlock>;
    /// Sets a resizeable block's used_length (already aligned, at most max_length), running
    /// whatever the block's owner does on a resize.
    fn resize_block(&mut self, handle: usize, new_used_length: u64) -> Result<(), Error>;
    /// Copies one `TARGET_PAGE_SIZE` page into the block at `offset` (< used_length).
    fn write_page(&mut self, handle: usize, offset: u64, data: &[u8]) -> Result<(), Error>;
    /// Makes one page zero; the target may skip a page that is zero already.
    fn zero_page(&mut self, handle: usize, offset: u64) -> Result<(), Error>;
    /// The host page size lengths are aligned to (QEMU's `qemu_real_host_page_size`).
    fn host_page_size(&self) -> u64 {
        host_page_size()
    }
    /// A handle through which other threads may write pages of the blocks as they are now,
    /// for a loader that spreads pages over threads; `None` (the default): the loader writes
    /// every page itself through `self`.
    fn shared(&self) -> Option<Arc<dyn SharedRamTarget>> {
        None
    }
}

/// This host's page size.
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf takes a constant and reads no memory of ours; it has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        PAGE
    }
}

/// What a loader applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamLoadStats {
    /// Pages whose bytes were written (PAGE records, or set bits of a mapped-ram bitmap).
    pub normal_pages: u64,
    /// Pages made zero (ZERO records, or clear bits of a mapped-ram bitmap).
    pub zero_pages: u64,
    /// The blocks the setup listed, with the stream's (unaligned) lengths, in stream order.
    pub blocks: Vec<RamBlockInfo>,
    /// Blocks whose used_length the loader changed, with the new length.
    pub resized: Vec<RamBlockInfo>,
    /// `ram` sections read (START, PART and END).
    pub sections: u64,
    /// Threads other than the parsing one that wrote pages (0: the parser wrote them all).
    pub writer_threads: u64,
}

struct KnownBlock {
    idstr: String,
    local: LocalRamBlock,
}

/// The receiving side of the `ram` section.
pub struct RamLoader {
    mapped_ram: bool,
    known: Vec<KnownBlock>,
    by_name: HashMap<String, usize>,
    last_block: Option<usize>,
    page: Vec<u8>,
    stats: RamLoadStats,
    /// Page writer threads to start (below 2: none).
    threads: usize,
    /// Page records to apply before starting them (a short stream is not worth threads).
    parallel_after: u64,
    /// Page records (ZERO and PAGE) seen so far.
    records: u64,
    writers: Option<PageWriters>,
    /// The target or the reader cannot take pages from other threads, or none started.
    sequential: bool,
}

/// Page records a loader applies itself before it starts writer threads: 16 MiB of pages.
pub const PARALLEL_AFTER: u64 = 4096;

/// Writer threads a loader starts: none on a host of at most 2 cores, else one per core but
/// the parser's, at most 8. Measured on a 2-vCPU VM (4 GiB, half zero pages, file in the page
/// cache), 2 writers made loads slower, not faster: 0.84 s against 0.58 s into a preallocated
/// destination and 2.0 s against 0.86 s into a fresh one, the pages crossing cores and the
/// faults not overlapping. Hosts with more cores are not measured.
pub fn default_writer_threads() -> usize {
    match std::thread::available_parallelism().map_or(1, |n| n.get()) {
        0..=2 => 0,
        n => (n - 1).min(8),
    }
}

impl RamLoader {
    /// `mapped_ram`: the stream's setup carries mapped-ram headers and no page records follow.
    pub fn new(mapped_ram: bool) -> Self {
        RamLoader {
            mapped_ram,
            known: Vec::new(),
            by_name: HashMap::new(),
            last_block: None,
            page: vec![0; TARGET_PAGE_SIZE],
            stats: RamLoadStats::default(),
            threads: default_writer_threads(),
            parallel_after: PARALLEL_AFTER,
            records: 0,
            writers: None,
            sequential: false,
        }
    }

    /// Writes pages from `threads` threads (0 or 1: from the parsing thread only) once
    /// `after` page records have been applied, when the target ([`RamLoadTarget::shared`])
    /// and the reader ([`StreamRead::share`]) allow it. The default is
    /// [`default_writer_threads`] after [`PARALLEL_AFTER`].
    pub fn set_parallel(&mut self, threads: usize, after: u64) {
        self.threads = threads;
        self.parallel_after = after;
    }

    pub fn stats(&self) -> &RamLoadStats {
        &self.stats
    }

    pub fn into_stats(self) -> RamLoadStats {
        self.stats
    }

    /// Reads one `ram` section's payload, up to and including its EOS.
    pub fn load_section(
        &mut self,
        target: &mut dyn RamLoadTarget,
        r: &mut QemuReader<dyn StreamRead + '_>,
        version_id: u32,
    ) -> Result<(), MigrationError> {
        if version_id != 4 {
            return Err(MigrationError::RamVersion {
                version: version_id,
            });
        }
        self.stats.sections += 1;
        let parsed = self.load_records(target, r);
        // Everything handed to a writer came before what the parser stopped at: a writer's
        // failure is the one a single-threaded load would have met first.
        self.sync_writers().and(parsed)
    }

    fn load_records(
        &mut self,
        target: &mut dyn RamLoadTarget,
        r: &mut QemuReader<dyn StreamRead + '_>,
    ) -> Result<(), MigrationError> {
        let invalid = if self.mapped_ram {
            RamFlag::HOOK | RamFlag::MULTIFD_FLUSH | RamFlag::PAGE | RamFlag::XBZRLE | RamFlag::ZERO
        } else {
            0
        };
        loop {
            let v = r.get_be64("a RAM record header")?;
            let flags = v & RAM_FLAGS_MASK;
            let addr = v & !RAM_FLAGS_MASK;
            if flags & invalid != 0 {
                return Err(MigrationError::UnexpectedRamFlags {
                    flags: flags & invalid,
                });
            }
            let mut block = None;
            if flags & (RamFlag::ZERO | RamFlag::PAGE | RamFlag::XBZRLE) != 0 {
                let b = self.block_from_stream(target, r, flags, addr)?;
                if addr >= self.known[b].local.used_length {
                    return Err(MigrationError::IllegalRamOffset { offset: addr });
                }
                block = Some(b);
            }
            let at = r.position() - 8;
            match (flags & !RamFlag::CONTINUE, block) {
                (RamFlag::MEM_SIZE, _) => {
                    // The writers see the blocks as they were when they started.
                    self.stop_writers()?;
                    self.parse_blocks(target, r, addr)?
                }
                (RamFlag::ZERO, Some(b)) => {
                    let fill = r.get_u8("a zero page's fill byte")?;
                    if fill != 0 {
                        return Err(MigrationError::NonZeroFill { value: fill });
                    }
                    let handle = self.known[b].local.handle;
                    match self.writers_for(target, r) {
                        Some(w) => w.push(PageJob::Zero {
                            handle,
                            offset: addr,
                            at,
                        })?,
                        None => target.zero_page(handle, addr)?,
                    }
                    self.stats.zero_pages += 1;
                }
                (RamFlag::PAGE, Some(b)) => {
                    let handle = self.known[b].local.handle;
                    self.load_page(target, r, handle, addr, at)?;
                    self.stats.normal_pages += 1;
                }
                (RamFlag::EOS, _) => return Ok(()),
                _ => return Err(MigrationError::UnknownRamFlags { flags }),
            }
        }
    }

    /// The writer threads for the next record, started once enough records went by; `None`:
    /// this thread writes it.
    fn writers_for(
        &mut self,
        target: &dyn RamLoadTarget,
        r: &mut QemuReader<dyn StreamRead + '_>,
    ) -> Option<&mut PageWriters> {
        self.records += 1;
        if self.writers.is_none() && !self.sequential && self.records > self.parallel_after {
            self.writers = (self.threads >= 2 && r.get_mut().can_share())
                .then(|| target.shared())
                .flatten()
                .and_then(|t| PageWriters::spawn(t, self.threads));
            self.sequential = self.writers.is_none();
        }
        self.writers.as_mut()
    }

    /// Waits until the writers applied everything handed to them; their earliest error.
    fn sync_writers(&mut self) -> Result<(), MigrationError> {
        let Some(w) = self.writers.as_mut() else {
            return Ok(());
        };
        let synced = w.sync();
        self.stats.writer_threads = self.stats.writer_threads.max(w.threads_that_ran() as u64);
        synced
    }

    /// Applies everything handed to the writers and ends them (the next record starts them
    /// again with the target as it is then).
    fn stop_writers(&mut self) -> Result<(), MigrationError> {
        let synced = self.sync_writers();
        self.writers = None;
        synced
    }

    /// A PAGE record's bytes, from the stream's buffer to the block with one copy: handed to
    /// a writer thread, or copied by this one when the page lies whole in the buffer (nearly
    /// always), else through the loader's page buffer.
    fn load_page(
        &mut self,
        target: &mut dyn RamLoadTarget,
        r: &mut QemuReader<dyn StreamRead + '_>,
        handle: usize,
        offset: u64,
        at: u64,
    ) -> Result<(), MigrationError> {
        const WHAT: &str = "a RAM page";
        if self.writers_for(target, r).is_some() {
            if let Some(data) = r.get_mut().share(TARGET_PAGE_SIZE)? {
                r.set_position(r.position() + PAGE);
                let w = self.writers.as_mut().expect("writers started above");
                return w.push(PageJob::Page {
                    handle,
                    offset,
                    data,
                    at,
                });
            }
            // The stream ends inside the page: this read reports where. Should it get the
            // page after all, the writers finish first so that it lands after their records.
            r.read_exact(&mut self.page, WHAT)?;
            self.sync_writers()?;
            return Ok(target.write_page(handle, offset, &self.page)?);
        }
        let whole = loop {
            match r.get_mut().contiguous(TARGET_PAGE_SIZE) {
                Ok(buf) if buf.len() >= TARGET_PAGE_SIZE => {
                    break Some(target.write_page(handle, offset, &buf[..TARGET_PAGE_SIZE]))
                }
                Ok(_) => break None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(MigrationError::Io(e)),
            }
        };
        match whole {
            Some(written) => {
                r.get_mut().consume(TARGET_PAGE_SIZE);
                r.set_position(r.position() + PAGE);
                Ok(written?)
            }
            None => {
                r.read_exact(&mut self.page, WHAT)?;
                Ok(target.write_page(handle, offset, &self.page)?)
            }
        }
    }

    /// The block a ZERO/PAGE record is for: the previous one (CONTINUE) or the named one.
    fn block_from_stream(
        &mut self,
        target: &mut dyn RamLoadTarget,
        r: &mut QemuReader<dyn StreamRead + '_>,
        flags: u64,
        offset: u64,
    ) -> Result<usize, MigrationError> {
        if flags & RamFlag::CONTINUE != 0 {
            return self
                .last_block
                .ok_or(MigrationError::ContinueWithoutBlock { offset });
        }
        let idstr = r.get_counted_string("a RAMBlock idstr")?;
        let b = match self.lookup(target, &idstr) {
            Some(b) => b,
            None => return Err(MigrationError::UnknownPageBlock { idstr, offset }),
        };
        if !self.known[b].local.migratable {
            return Err(MigrationError::PageBlockNotMigratable { idstr, offset });
        }
        self.last_block = Some(b);
        Ok(b)
    }

    fn lookup(&mut self, target: &mut dyn RamLoadTarget, idstr: &str) -> Option<usize> {
        if let Some(&b) = self.by_name.get(idstr) {
            return Some(b);
        }
        let local = target.find_block(idstr)?;
        self.known.push(KnownBlock {
            idstr: idstr.to_string(),
            local,
        });
        self.by_name.insert(idstr.to_string(), self.known.len() - 1);
        Some(self.known.len() - 1)
    }

    /// The block list after MEM_SIZE: it ends when the lengths add up to `total`.
    fn parse_blocks(
        &mut self,
        target: &mut dyn RamLoadTarget,
        r: &mut QemuReader<dyn StreamRead + '_>,
        total: u64,
    ) -> Result<(), MigrationError> {
        let mut remaining = total;
        while remaining != 0 {
            let idstr = r.get_counted_string("a RAMBlock idstr")?;
            let length = r.get_be64("a RAMBlock length")?;
            let Some(b) = self.lookup(target, &idstr) else {
                return Err(MigrationError::UnknownRamBlock { idstr });
            };
            self.check_length(target, b, length)?;
            if self.mapped_ram {
                self.load_mapped_ram_block(target, r, b, length)?;
            }
            self.stats.blocks.push(RamBlockInfo::new(&idstr, length));
            remaining = remaining
                .checked_sub(length)
                .ok_or(MigrationError::RamTotalMismatch { total, idstr })?;
        }
        Ok(())
    }

    /// [`check_block_length`], then the resize it asks for.
    fn check_length(
        &mut self,
        target: &mut dyn RamLoadTarget,
        b: usize,
        length: u64,
    ) -> Result<(), MigrationError> {
        let kb = &self.known[b];
        let host = target.host_page_size();
        let Some(aligned) = check_block_length(&kb.idstr, &kb.local, length, host)? else {
            return Ok(());
        };
        target.resize_block(kb.local.handle, aligned)?;
        let kb = &mut self.known[b];
        kb.local.used_length = aligned;
        self.stats
            .resized
            .push(RamBlockInfo::new(&kb.idstr, aligned));
        Ok(())
    }

    fn load_mapped_ram_block(
        &mut self,
        target: &mut dyn RamLoadTarget,
        r: &mut QemuReader<dyn StreamRead + '_>,
        b: usize,
        length: u64,
    ) -> Result<(), MigrationError> {
        let header = MappedRamHeader::read(r)?;
        let idstr = self.known[b].idstr.clone();
        let handle = self.known[b].local.handle;
        if header.version > MappedRam::HEADER_VERSION {
            return Err(MigrationError::MappedRamVersion {
                version: header.version,
            });
        }
        if header.bitmap_offset == 0 && header.pages_offset == 0 {
            // A block the source skipped (x-ignore-shared; QEMU 11 writes 0/0 for those).
            return Ok(());
        }
        if !header.pages_offset.is_multiple_of(PAGE) {
            return Err(MigrationError::MappedRamAlignment { idstr });
        }
        if header.page_size != PAGE {
            return Err(MigrationError::MappedRamPageSize {
                idstr,
                page_size: header.page_size,
            });
        }
        let num_pages = length / PAGE;
        let bitmap_len = num_pages.div_ceil(64) * 8;
        let mut bitmap = vec![0u8; bitmap_len as usize];
        seek(r, header.bitmap_offset)?;
        r.read_exact(&mut bitmap, "a mapped-ram bitmap")?;
        let bit = |n: u64| bitmap[(n / 8) as usize] >> (n % 8) & 1 != 0;
        let mut n = 0;
        while n < num_pages {
            if !bit(n) {
                target.zero_page(handle, n * PAGE)?;
                self.stats.zero_pages += 1;
                n += 1;
                continue;
            }
            let run_start = n;
            while n < num_pages && bit(n) {
                n += 1;
            }
            seek(r, header.pages_offset + run_start * PAGE)?;
            for p in run_start..n {
                r.read_exact(&mut self.page, "a mapped-ram page")?;
                target.write_page(handle, p * PAGE, &self.page)?;
                self.stats.normal_pages += 1;
            }
        }
        seek(r, header.pages_offset + length)
    }
}

/// QEMU's `parse_ramblock` + `qemu_ram_resize` for one block of a stream's list, named
/// `idstr` with the stream's `length`, found locally as `local`: it must be migratable, and its
/// length (aligned to the target page, then to `host_page_size`) equal to used_length or, for a
/// resizeable block, at most max_length. `Some(new used_length)` when the block must be resized.
/// The loader and the migration-compat checker both ask this, so they refuse with one message.
pub fn check_block_length(
    idstr: &str,
    local: &LocalRamBlock,
    length: u64,
    host_page_size: u64,
) -> Result<Option<u64>, MigrationError> {
    if !local.migratable {
        return Err(MigrationError::RamBlockNotMigratable {
            idstr: idstr.to_string(),
        });
    }
    if length == local.used_length {
        return Ok(None);
    }
    // A length that cannot be aligned in 64 bits is past any block's maximum: the errors
    // below then name it as the stream gave it.
    let aligned = length
        .checked_next_multiple_of(PAGE)
        .and_then(|l| l.checked_next_multiple_of(host_page_size.max(1)))
        .unwrap_or(length);
    if aligned == local.used_length {
        return Ok(None);
    }
    if !local.resizeable {
        return Err(MigrationError::RamSizeMismatch {
            idstr: idstr.to_string(),
            stream: aligned,
            local: local.used_length,
        });
    }
    if aligned > local.max_length {
        return Err(MigrationError::RamSizeTooLarge {
            idstr: idstr.to_string(),
            stream: aligned,
            max: local.max_length,
        });
    }
    Ok(Some(aligned))
}

fn seek(r: &mut QemuReader<dyn StreamRead + '_>, offset: u64) -> Result<(), MigrationError> {
    r.get_mut().seek_to(offset)?;
    r.set_position(offset);
    Ok(())
}

/// `n` rounded up to a multiple of `to` (a power of two or any positive number).
pub fn align_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// The per-block header of a mapped-ram setup record (28 bytes, big-endian, packed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedRamHeader {
    pub version: u32,
    pub page_size: u64,
    /// File offset of the block's page bitmap (host-endian `unsigned long`s, bit n = page n).
    pub bitmap_offset: u64,
    /// File offset of page 0; page n is at `pages_offset + n * page_size`.
    pub pages_offset: u64,
}

impl MappedRamHeader {
    pub fn read(r: &mut QemuReader<dyn StreamRead + '_>) -> Result<Self, MigrationError> {
        Ok(MappedRamHeader {
            version: r.get_be32("a mapped-ram header")?,
            page_size: r.get_be64("a mapped-ram header")?,
            bitmap_offset: r.get_be64("a mapped-ram header")?,
            pages_offset: r.get_be64("a mapped-ram header")?,
        })
    }

    pub fn write<W: Write + ?Sized>(&self, w: &mut QemuWriter<W>) -> Result<(), MigrationError> {
        w.put_be32(self.version)?;
        w.put_be64(self.page_size)?;
        w.put_be64(self.bitmap_offset)?;
        w.put_be64(self.pages_offset)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::migration::chunked::ChunkReader;
    use std::cell::RefCell;
    use std::io::Cursor;

    /// RAM in plain vectors, for both sides of the tests.
    #[derive(Clone, Debug, Default)]
    pub(crate) struct VecRam {
        pub blocks: Vec<(String, Vec<u8>)>,
        pub max_length: Vec<u64>,
        pub resizeable: Vec<bool>,
        pub migratable: Vec<bool>,
        pub zeroed: RefCell<u64>,
        pub resizes: Vec<(usize, u64)>,
    }

    impl VecRam {
        pub fn new(blocks: &[(&str, u64)]) -> Self {
            let n = blocks.len();
            VecRam {
                blocks: blocks
                    .iter()
                    .map(|(n, l)| (n.to_string(), vec![0u8; *l as usize]))
                    .collect(),
                max_length: blocks.iter().map(|(_, l)| *l).collect(),
                resizeable: vec![false; n],
                migratable: vec![true; n],
                ..Default::default()
            }
        }

        pub fn fill(&mut self, block: usize, offset: u64, byte: u8) {
            let o = offset as usize;
            self.blocks[block].1[o..o + TARGET_PAGE_SIZE].fill(byte);
        }

        pub fn page(&self, block: usize, offset: u64) -> &[u8] {
            let o = offset as usize;
            &self.blocks[block].1[o..o + TARGET_PAGE_SIZE]
        }
    }

    impl RamSource for VecRam {
        fn blocks(&self) -> Vec<RamBlockInfo> {
            self.blocks
                .iter()
                .map(|(n, d)| RamBlockInfo::new(n, d.len() as u64))
                .collect()
        }
        fn read_page(&self, block: usize, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
            buf.copy_from_slice(self.page(block, offset));
            Ok(())
        }
    }

    impl RamLoadTarget for VecRam {
        fn find_block(&mut self, idstr: &str) -> Option<LocalRamBlock> {
            let i = self.blocks.iter().position(|(n, _)| n == idstr)?;
            Some(LocalRamBlock {
                handle: i,
                used_length: self.blocks[i].1.len() as u64,
                max_length: self.max_length[i],
                resizeable: self.resizeable[i],
                migratable: self.migratable[i],
            })
        }
        fn resize_block(&mut self, handle: usize, len: u64) -> Result<(), Error> {
            self.blocks[handle].1.resize(len as usize, 0);
            self.resizes.push((handle, len));
            Ok(())
        }
        fn write_page(&mut self, handle: usize, offset: u64, data: &[u8]) -> Result<(), Error> {
            let o = offset as usize;
            self.blocks[handle].1[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero_page(&mut self, handle: usize, offset: u64) -> Result<(), Error> {
            *self.zeroed.borrow_mut() += 1;
            let o = offset as usize;
            self.blocks[handle].1[o..o + TARGET_PAGE_SIZE].fill(0);
            Ok(())
        }
        fn host_page_size(&self) -> u64 {
            4096
        }
    }

    const M: u64 = 1 << 20;

    fn setup_bytes(blocks: &[(&str, u64)]) -> Vec<u8> {
        let infos = blocks
            .iter()
            .map(|(n, l)| RamBlockInfo::new(n, *l))
            .collect();
        let mut s = RamSaver::new(infos).unwrap();
        let mut w = QemuWriter::new(Vec::new());
        s.write_setup(&mut w).unwrap();
        w.into_inner()
    }

    fn load(target: &mut VecRam, sections: &[Vec<u8>]) -> Result<RamLoadStats, MigrationError> {
        let mut l = RamLoader::new(false);
        for s in sections {
            let mut r = QemuReader::new(ChunkReader::sequential(Cursor::new(s.clone())));
            l.load_section(target, &mut r, 4)?;
            assert_eq!(r.position(), s.len() as u64, "section read to its end");
        }
        Ok(l.into_stats())
    }

    /// Builds a page-records payload by hand: (header, idstr, body).
    fn records(recs: &[(u64, Option<&str>, Vec<u8>)]) -> Vec<u8> {
        let mut w = QemuWriter::new(Vec::new());
        for (h, id, body) in recs {
            w.put_be64(*h).unwrap();
            if let Some(id) = id {
                w.put_counted_string(id).unwrap();
            }
            w.put_buffer(body).unwrap();
        }
        w.put_be64(RamFlag::EOS).unwrap();
        w.into_inner()
    }

    #[test]
    fn setup_payload_is_total_then_blocks_then_eos() {
        let b = setup_bytes(&[("pc.ram", 2 * M), ("pc.bios", 256 << 10)]);
        let mut want = Vec::new();
        want.extend(((2 * M + (256 << 10)) | RamFlag::MEM_SIZE).to_be_bytes());
        want.extend(b"\x06pc.ram");
        want.extend((2 * M).to_be_bytes());
        want.extend(b"\x07pc.bios");
        want.extend((256u64 << 10).to_be_bytes());
        want.extend(RamFlag::EOS.to_be_bytes());
        assert_eq!(b, want);
    }

    #[test]
    fn saver_refuses_duplicate_empty_or_unaligned_blocks() {
        for blocks in [
            vec![RamBlockInfo::new("a", 4096), RamBlockInfo::new("a", 4096)],
            vec![RamBlockInfo::new("", 4096)],
            vec![RamBlockInfo::new("a", 4097)],
        ] {
            assert!(RamSaver::new(blocks).is_err());
        }
        assert!(matches!(
            RamSaver::new(vec![RamBlockInfo::new(&"x".repeat(256), 4096)]),
            Err(MigrationError::StringTooLong { len: 256, .. })
        ));
    }

    #[test]
    fn zero_and_normal_pages_with_continue_after_the_first_record() {
        let mut src = VecRam::new(&[("ram", 4 * PAGE), ("vga", 2 * PAGE)]);
        src.fill(0, PAGE, 0xab);
        src.blocks[1].1[PAGE as usize] = 1; // one byte in page 1 of vga
        let mut s = RamSaver::new(src.blocks()).unwrap();
        let mut w = QemuWriter::new(Vec::new());
        let pages = vec![
            PageRef {
                block: 0,
                offset: 0,
            },
            PageRef {
                block: 0,
                offset: PAGE,
            },
            PageRef {
                block: 1,
                offset: PAGE,
            },
            PageRef {
                block: 1,
                offset: 0,
            },
        ];
        let st = s.write_round(&mut w, &src, pages).unwrap();
        assert_eq!(
            st,
            RamSaveStats {
                normal_pages: 2,
                zero_pages: 2
            }
        );
        let b = w.into_inner();
        let mut want = Vec::new();
        want.extend(RamFlag::ZERO.to_be_bytes());
        want.extend(b"\x03ram\x00");
        want.extend((PAGE | RamFlag::PAGE | RamFlag::CONTINUE).to_be_bytes());
        want.extend(vec![0xab; TARGET_PAGE_SIZE]);
        want.extend((PAGE | RamFlag::PAGE).to_be_bytes());
        want.extend(b"\x03vga");
        want.extend(src.page(1, PAGE));
        want.extend((RamFlag::ZERO | RamFlag::CONTINUE).to_be_bytes());
        want.push(0);
        want.extend(RamFlag::EOS.to_be_bytes());
        assert_eq!(b, want);
    }

    #[test]
    fn continue_carries_across_rounds_and_setup_resets_it() {
        let src = VecRam::new(&[("ram", 2 * PAGE)]);
        let mut s = RamSaver::new(src.blocks()).unwrap();
        let mut w = QemuWriter::new(Vec::new());
        s.write_round(
            &mut w,
            &src,
            [PageRef {
                block: 0,
                offset: 0,
            }],
        )
        .unwrap();
        let first = w.position();
        s.write_round(
            &mut w,
            &src,
            [PageRef {
                block: 0,
                offset: PAGE,
            }],
        )
        .unwrap();
        let b = w.into_inner();
        let second = u64::from_be_bytes(b[first as usize..first as usize + 8].try_into().unwrap());
        assert_eq!(second, PAGE | RamFlag::ZERO | RamFlag::CONTINUE);
        let mut w = QemuWriter::new(Vec::new());
        s.write_setup(&mut w).unwrap();
        let setup_len = w.position() as usize;
        s.write_round(
            &mut w,
            &src,
            [PageRef {
                block: 0,
                offset: 0,
            }],
        )
        .unwrap();
        let b = w.into_inner();
        assert_eq!(&b[setup_len..setup_len + 12], b"\0\0\0\0\0\0\0\x02\x03ram");
    }

    #[test]
    fn zero_page_detection_off_sends_every_page_in_full() {
        let src = VecRam::new(&[("ram", PAGE)]);
        let mut s = RamSaver::new(src.blocks()).unwrap();
        s.set_zero_page_detection(false);
        let mut w = QemuWriter::new(Vec::new());
        let st = s
            .write_round(&mut w, &src, all_pages(&src.blocks()))
            .unwrap();
        assert_eq!(st.normal_pages, 1);
        assert_eq!(w.position(), 8 + 4 + 4096 + 8);
    }

    #[test]
    fn uniform_nonzero_page_is_a_full_page() {
        let mut src = VecRam::new(&[("ram", PAGE)]);
        src.fill(0, 0, 0x5a);
        let mut s = RamSaver::new(src.blocks()).unwrap();
        let mut w = QemuWriter::new(Vec::new());
        let st = s
            .write_round(&mut w, &src, all_pages(&src.blocks()))
            .unwrap();
        assert_eq!(
            st,
            RamSaveStats {
                normal_pages: 1,
                zero_pages: 0
            }
        );
    }

    #[test]
    fn saver_refuses_pages_outside_the_list() {
        let src = VecRam::new(&[("ram", PAGE)]);
        let mut s = RamSaver::new(src.blocks()).unwrap();
        let mut w = QemuWriter::new(Vec::new());
        for p in [
            PageRef {
                block: 0,
                offset: PAGE,
            },
            PageRef {
                block: 0,
                offset: 1,
            },
            PageRef {
                block: 1,
                offset: 0,
            },
        ] {
            assert!(s.write_round(&mut w, &src, [p]).is_err(), "{p:?}");
        }
    }

    #[test]
    fn all_pages_is_block_order_then_offset_order() {
        let blocks = [
            RamBlockInfo::new("a", 2 * PAGE),
            RamBlockInfo::new("b", PAGE),
        ];
        let v: Vec<_> = all_pages(&blocks).map(|p| (p.block, p.offset)).collect();
        assert_eq!(v, [(0, 0), (0, PAGE), (1, 0)]);
    }

    #[test]
    fn a_stream_length_near_2_pow_64_is_refused_not_wrapped() {
        let local = |resizeable| LocalRamBlock {
            handle: 0,
            used_length: 1 << 20,
            max_length: 4 << 20,
            resizeable,
            migratable: true,
        };
        // Found by the migration_load fuzz target: aligning this length overflowed.
        let length = u64::MAX - 2;
        match check_block_length("pc.ram", &local(false), length, 4096) {
            Err(MigrationError::RamSizeMismatch { stream, local, .. }) => {
                assert_eq!((stream, local), (length, 1 << 20))
            }
            other => panic!("{other:?}"),
        }
        match check_block_length("pc.ram", &local(true), length, 2 << 20) {
            Err(MigrationError::RamSizeTooLarge { stream, max, .. }) => {
                assert_eq!((stream, max), (length, 4 << 20))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn is_zero_page_finds_a_single_bit_anywhere() {
        let mut page = vec![0u8; TARGET_PAGE_SIZE];
        assert!(is_zero_page(&page));
        for i in [0, 7, 8, 255, 256, 2049, 4095] {
            page[i] = 0x10;
            assert!(!is_zero_page(&page), "byte {i}");
            page[i] = 0;
        }
        assert!(is_zero_page(&[0u8; 13]));
        assert!(!is_zero_page(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }

    /// A VecRam offering its pages in place, failing a run that reaches `fault_at`; it may be
    /// tested from several threads at once and records which thread tested each run.
    struct InPlaceRam {
        blocks: Vec<RamBlockInfo>,
        data: Vec<Vec<u8>>,
        fault_at: Option<u64>,
        runs: std::sync::Mutex<Vec<(usize, u64, usize, std::thread::ThreadId)>>,
    }

    impl InPlaceRam {
        fn new(ram: &VecRam, fault_at: Option<u64>) -> Self {
            InPlaceRam {
                blocks: ram.blocks(),
                data: ram.blocks.iter().map(|b| b.1.clone()).collect(),
                fault_at,
                runs: std::sync::Mutex::new(Vec::new()),
            }
        }
    }

    impl RamSource for InPlaceRam {
        fn blocks(&self) -> Vec<RamBlockInfo> {
            self.blocks.clone()
        }
        fn read_page(&self, block: usize, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
            buf.copy_from_slice(&self.data[block][offset as usize..][..TARGET_PAGE_SIZE]);
            Ok(())
        }
        fn zero_test_in_place(
            &self,
            block: usize,
            offset: u64,
            zero: &mut [bool],
        ) -> Option<Result<InPlace<'_>, Error>> {
            let me = std::thread::current().id();
            self.runs
                .lock()
                .unwrap()
                .push((block, offset, zero.len(), me));
            let end = offset + (zero.len() * TARGET_PAGE_SIZE) as u64;
            if self.fault_at.is_some_and(|f| (offset..end).contains(&f)) {
                return Some(Err(Error::invalid("SIGBUS: test fault")));
            }
            let data = &self.data[block][offset as usize..end as usize];
            for (z, page) in zero.iter_mut().zip(data.chunks(TARGET_PAGE_SIZE)) {
                *z = is_zero_page(page);
            }
            // SAFETY: `data` is borrowed from the source, unchanged while it is borrowed.
            Some(Ok(unsafe { InPlace::new(data.as_ptr(), zero.len()) }))
        }
        fn shared(&self) -> Option<&(dyn RamSource + Sync)> {
            Some(self)
        }
    }

    /// Takes unowned bytes and reads them only when flushed, as a gathering write does; a
    /// pending queue at drop would be bytes read after the saver let go of its source.
    #[derive(Default)]
    struct DeferringWriter {
        out: Vec<u8>,
        queue: Vec<Result<Vec<u8>, (usize, usize)>>,
        unowned: usize,
        flushes: usize,
    }

    impl Write for DeferringWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.queue.push(Ok(buf.to_vec()));
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            for q in self.queue.drain(..) {
                match q {
                    Ok(bytes) => self.out.extend_from_slice(&bytes),
                    Err((addr, len)) => {
                        // SAFETY: write_unowned's contract: mapped until this flush returns.
                        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                        self.out.extend_from_slice(bytes);
                    }
                }
            }
            self.flushes += 1;
            Ok(())
        }
    }

    impl StreamWrite for DeferringWriter {
        fn takes_unowned(&self) -> bool {
            true
        }
        unsafe fn write_unowned(&mut self, ptr: *const u8, len: usize) -> std::io::Result<()> {
            self.queue.push(Err((ptr as usize, len)));
            self.unowned += 1;
            Ok(())
        }
    }

    fn copied_round(src: &VecRam, pages: &[PageRef]) -> Vec<u8> {
        let mut s = RamSaver::new(src.blocks()).unwrap();
        let mut w = QemuWriter::new(Vec::new());
        s.write_round(&mut w, src, pages.iter().copied()).unwrap();
        w.into_inner()
    }

    #[test]
    fn pages_sent_in_place_make_the_copied_stream_and_are_read_before_the_round_ends() {
        let mut ram = VecRam::new(&[("pc.ram", 200 * PAGE), ("vga", 2 * PAGE)]);
        for n in [0, 3, 64, 65, 130, 199] {
            ram.fill(0, n * PAGE, n as u8 + 1);
        }
        ram.blocks[1].1[4095] = 9;
        // Runs break at block changes, gaps, and every 64 pages.
        let mut pages: Vec<PageRef> = all_pages(&ram.blocks()).collect();
        pages.retain(|p| p.offset != 100 * PAGE);
        pages.swap(0, 1);
        let expect = copied_round(&ram, &pages);
        let src = InPlaceRam::new(&ram, None);
        let mut s = RamSaver::new(src.blocks()).unwrap();
        let mut w = QemuWriter::new(DeferringWriter::default());
        let st = s.write_round(&mut w, &src, pages.iter().copied()).unwrap();
        assert_eq!(
            st,
            RamSaveStats {
                normal_pages: 7,
                zero_pages: 194
            }
        );
        let w = w.into_inner();
        assert!(w.queue.is_empty(), "bytes left unread after the round");
        assert_eq!((w.unowned, w.flushes), (7, 1));
        assert!(
            w.out == expect,
            "the in-place stream differs from the copied one"
        );
        let runs: Vec<(usize, u64, usize)> = src
            .runs
            .lock()
            .unwrap()
            .iter()
            .map(|&(b, o, n, _)| (b, o, n))
            .collect();
        assert_eq!(runs[..3], [(0, PAGE, 1), (0, 0, 1), (0, 2 * PAGE, 64)]);
        assert!(runs.iter().all(|r| r.2 <= IN_PLACE_RUN));
        assert!(runs.contains(&(1, 0, 2)));
        assert_eq!(runs.iter().map(|r| r.2).sum::<usize>(), 201);

        // Zero-page detection off sends every page copied in full, never in place.
        let mut s = RamSaver::new(src.blocks()).unwrap();
        s.set_zero_page_detection(false);
        let mut w = QemuWriter::new(DeferringWriter::default());
        s.write_round(&mut w, &src, pages.iter().copied()).unwrap();
        assert_eq!(w.get_mut().unowned, 0);
    }

    #[test]
    fn a_fault_in_place_fails_the_round_and_pages_outside_the_list_are_refused() {
        let mut ram = VecRam::new(&[("pc.ram", 8 * PAGE)]);
        ram.fill(0, 0, 1);
        let src = InPlaceRam::new(&ram, Some(5 * PAGE));
        let mut s = RamSaver::new(src.blocks()).unwrap();
        let mut w = QemuWriter::new(DeferringWriter::default());
        let e = s
            .write_round(&mut w, &src, all_pages(&src.blocks()))
            .unwrap_err();
        assert!(e.to_string().contains("SIGBUS: test fault"), "{e}");
        for bad in [
            PageRef {
                block: 1,
                offset: 0,
            },
            PageRef {
                block: 0,
                offset: 8 * PAGE,
            },
        ] {
            let mut w = QemuWriter::new(DeferringWriter::default());
            assert!(s
                .write_round(
                    &mut w,
                    &src,
                    [
                        PageRef {
                            block: 0,
                            offset: 0
                        },
                        bad
                    ]
                )
                .is_err());
        }
    }

    #[test]
    fn runs_tested_on_other_threads_make_the_stream_of_a_round_written_alone() {
        // Several batches, with gaps and a second block; the runs are tested on a thread of
        // their own and written here, as precopy's helper does.
        let pages_in = 3 * BATCH_PAGES as u64 + 77;
        let mut ram = VecRam::new(&[("pc.ram", pages_in * PAGE), ("vga", 3 * PAGE)]);
        for n in (0..pages_in).filter(|n| n % 7 == 0 || n % 1000 == 3) {
            ram.fill(0, n * PAGE, (n % 251) as u8 + 1);
        }
        ram.fill(1, PAGE, 4);
        let mut pages: Vec<PageRef> = all_pages(&ram.blocks()).collect();
        pages.retain(|p| p.offset % (997 * PAGE) != 500 * PAGE);
        let expect = copied_round(&ram, &pages);
        let src = InPlaceRam::new(&ram, None);
        let me = std::thread::current().id();

        let mut s = RamSaver::new(src.blocks()).unwrap();
        let mut w = QemuWriter::new(DeferringWriter::default());
        let mut st = RamSaveStats::default();
        for chunk in pages.chunks(300) {
            let runs = s.runs(chunk.iter().copied()).unwrap();
            assert_eq!(runs.pages(), chunk.len());
            let shared = src.shared().unwrap();
            let tested = std::thread::scope(|t| t.spawn(|| runs.test(shared)).join().unwrap());
            let one = s.write_tested_round(&mut w, &src, &runs, tested).unwrap();
            st.normal_pages += one.normal_pages;
            st.zero_pages += one.zero_pages;
        }
        assert_eq!(st.normal_pages + st.zero_pages, pages.len() as u64);
        assert!(src.runs.lock().unwrap().iter().all(|r| r.3 != me));
        let w = w.into_inner();
        assert!(w.queue.is_empty(), "bytes left unread after a round");
        // Rounds of 300 pages: each its own EOS. The same rounds written alone match.
        let mut alone = RamSaver::new(src.blocks()).unwrap();
        let mut wa = QemuWriter::new(DeferringWriter::default());
        for chunk in pages.chunks(300) {
            alone
                .write_round(&mut wa, &src, chunk.iter().copied())
                .unwrap();
        }
        assert!(w.out == wa.into_inner().out, "the streams differ");
        // And one round of them all is the copied stream.
        let mut one = RamSaver::new(src.blocks()).unwrap();
        let mut wo = QemuWriter::new(DeferringWriter::default());
        one.write_round(&mut wo, &src, pages.iter().copied())
            .unwrap();
        assert!(wo.into_inner().out == expect, "the in-place stream differs");

        // Tested runs on a stream that copies, or for other runs, are refused.
        let runs = s.runs(pages[..10].iter().copied()).unwrap();
        let mut copying = QemuWriter::new(Vec::new());
        assert!(s
            .write_tested_round(&mut copying, &src, &runs, runs.test(&src))
            .is_err());
        let other = s.runs(pages[..200].iter().copied()).unwrap();
        let mut w = QemuWriter::new(DeferringWriter::default());
        assert!(s
            .write_tested_round(&mut w, &src, &runs, other.test(&src))
            .is_err());
    }

    #[test]
    fn a_fault_found_by_a_test_on_another_thread_fails_the_round_and_bad_pages_fail_runs() {
        let mut ram = VecRam::new(&[("pc.ram", 200 * PAGE)]);
        ram.fill(0, 0, 1);
        let src = InPlaceRam::new(&ram, Some(150 * PAGE));
        let mut s = RamSaver::new(src.blocks()).unwrap();
        let runs = s.runs(all_pages(&src.blocks())).unwrap();
        let shared = src.shared().unwrap();
        let tested = std::thread::scope(|t| t.spawn(|| runs.test(shared)).join().unwrap());
        let mut w = QemuWriter::new(DeferringWriter::default());
        let e = s
            .write_tested_round(&mut w, &src, &runs, tested)
            .unwrap_err();
        assert!(e.to_string().contains("SIGBUS: test fault"), "{e}");
        let bad = PageRef {
            block: 0,
            offset: 200 * PAGE,
        };
        let e = s
            .runs([
                PageRef {
                    block: 0,
                    offset: 0,
                },
                bad,
            ])
            .unwrap_err();
        assert!(matches!(e, MigrationError::IllegalRamOffset { offset } if offset == 200 * PAGE));
    }

    #[test]
    fn round_trip_restores_every_byte() {
        let mut src = VecRam::new(&[("pc.ram", 8 * PAGE), ("vga", 2 * PAGE)]);
        src.fill(0, 3 * PAGE, 0x11);
        src.blocks[1].1[100] = 0x77;
        let mut s = RamSaver::new(src.blocks()).unwrap();
        let mut w = QemuWriter::new(Vec::new());
        s.write_setup(&mut w).unwrap();
        let setup = w.into_inner();
        let mut w = QemuWriter::new(Vec::new());
        s.write_round(&mut w, &src, all_pages(&src.blocks()))
            .unwrap();
        let round = w.into_inner();
        let mut dst = VecRam::new(&[("pc.ram", 8 * PAGE), ("vga", 2 * PAGE)]);
        dst.fill(0, 0, 0xee); // stale data must be zeroed
        let st = load(&mut dst, &[setup, round]).unwrap();
        assert_eq!(dst.blocks, src.blocks);
        assert_eq!(st.normal_pages, 2);
        assert_eq!(st.zero_pages, 8);
        assert_eq!(st.sections, 2);
        assert_eq!(
            st.blocks,
            [
                RamBlockInfo::new("pc.ram", 8 * PAGE),
                RamBlockInfo::new("vga", 2 * PAGE)
            ]
        );
    }

    /// RAM that writer threads can share, one lock per block; writing the page at `fail_at`
    /// (block 0) fails, as a page the host cannot back does.
    #[derive(Clone)]
    struct SharedVecRam {
        blocks: Arc<Vec<(String, std::sync::Mutex<Vec<u8>>)>>,
        fail_at: Option<u64>,
    }

    impl SharedVecRam {
        fn new(blocks: &[(&str, u64)], fail_at: Option<u64>) -> Self {
            SharedVecRam {
                blocks: Arc::new(
                    blocks
                        .iter()
                        .map(|(n, l)| {
                            (
                                n.to_string(),
                                std::sync::Mutex::new(vec![0xee; *l as usize]),
                            )
                        })
                        .collect(),
                ),
                fail_at,
            }
        }

        fn bytes(&self) -> Vec<Vec<u8>> {
            self.blocks
                .iter()
                .map(|(_, b)| b.lock().unwrap().clone())
                .collect()
        }
    }

    impl SharedRamTarget for SharedVecRam {
        fn write_page(&self, handle: usize, offset: u64, data: &[u8]) -> Result<(), Error> {
            if handle == 0 && self.fail_at == Some(offset) {
                return Err(Error::invalid(format!(
                    "cannot back the page at 0x{offset:x}"
                )));
            }
            let o = offset as usize;
            self.blocks[handle].1.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero_page(&self, handle: usize, offset: u64) -> Result<(), Error> {
            let o = offset as usize;
            self.blocks[handle].1.lock().unwrap()[o..o + TARGET_PAGE_SIZE].fill(0);
            Ok(())
        }
    }

    impl RamLoadTarget for SharedVecRam {
        fn find_block(&mut self, idstr: &str) -> Option<LocalRamBlock> {
            let i = self.blocks.iter().position(|(n, _)| n == idstr)?;
            let len = self.blocks[i].1.lock().unwrap().len() as u64;
            Some(LocalRamBlock {
                handle: i,
                used_length: len,
                max_length: len,
                resizeable: false,
                migratable: true,
            })
        }
        fn resize_block(&mut self, _: usize, _: u64) -> Result<(), Error> {
            Err(Error::invalid("not resizeable"))
        }
        fn write_page(&mut self, h: usize, o: u64, d: &[u8]) -> Result<(), Error> {
            SharedRamTarget::write_page(self, h, o, d)
        }
        fn zero_page(&mut self, h: usize, o: u64) -> Result<(), Error> {
            SharedRamTarget::zero_page(self, h, o)
        }
        fn host_page_size(&self) -> u64 {
            4096
        }
        fn shared(&self) -> Option<Arc<dyn SharedRamTarget>> {
            Some(Arc::new(self.clone()))
        }
    }

    /// Loads `sections` through the loader's own buffer, with `threads` writers from the
    /// first record on (0: the parser writes every page).
    fn load_shared(
        target: &mut SharedVecRam,
        sections: &[Vec<u8>],
        threads: usize,
    ) -> Result<RamLoadStats, MigrationError> {
        let mut l = RamLoader::new(false);
        l.set_parallel(threads, 0);
        let stream: Vec<u8> = sections.concat();
        let mut r = QemuReader::new(ChunkReader::sequential(Cursor::new(stream)));
        for _ in sections {
            l.load_section(target, &mut r, 4)?;
        }
        Ok(l.into_stats())
    }

    /// Rounds of records over two blocks, as live migration sends them: a bulk round of every
    /// page, then rounds resending some pages with new bytes and zeroing others that held
    /// data; a page's later record must win wherever it went.
    fn dirty_rounds() -> Vec<Vec<u8>> {
        let blocks = [("ram", 8 * M), ("vga", M)];
        let mut sections = vec![setup_bytes(&blocks)];
        let page = |n: u64, round: u64| -> Vec<u8> {
            (0..TARGET_PAGE_SIZE as u64)
                .map(|i| (n * 31 + round * 7 + i) as u8)
                .collect()
        };
        for round in 0..4u64 {
            let mut recs = Vec::new();
            for (b, (id, len)) in blocks.iter().enumerate() {
                let mut first = true;
                for n in 0..len / PAGE {
                    // Round 0 sends everything; later rounds a shifting subset.
                    if round > 0 && !(n * 7 + round * 3 + b as u64).is_multiple_of(5) {
                        continue;
                    }
                    let zero = (n + round) % 3 == 0;
                    let mut h = (n * PAGE) | if zero { RamFlag::ZERO } else { RamFlag::PAGE };
                    let named = std::mem::take(&mut first).then_some(*id);
                    if named.is_none() {
                        h |= RamFlag::CONTINUE;
                    }
                    let body = if zero {
                        vec![0]
                    } else {
                        page(n + b as u64 * 1000, round)
                    };
                    recs.push((h, named, body));
                }
            }
            sections.push(records(&recs));
        }
        sections
    }

    #[test]
    fn parallel_load_gives_the_bytes_of_a_sequential_one() {
        let sections = dirty_rounds();
        let blocks = [("ram", 8 * M), ("vga", M)];
        let mut seq = SharedVecRam::new(&blocks, None);
        let st_seq = load_shared(&mut seq, &sections, 0).unwrap();
        assert_eq!(st_seq.writer_threads, 0);
        let mut par = SharedVecRam::new(&blocks, None);
        let st_par = load_shared(&mut par, &sections, 3).unwrap();
        assert!(st_par.writer_threads >= 2, "{st_par:?}");
        assert_eq!(
            (st_par.normal_pages, st_par.zero_pages),
            (st_seq.normal_pages, st_seq.zero_pages)
        );
        assert!(
            seq.bytes() == par.bytes(),
            "the RAM loaded in parallel differs"
        );
        // And both are the later records: the bulk round's bytes are gone where later rounds
        // wrote, and a page zeroed after holding data is zero.
        let mut reference = VecRam::new(&blocks);
        load(&mut reference, &sections).unwrap();
        let want: Vec<Vec<u8>> = reference.blocks.iter().map(|(_, b)| b.clone()).collect();
        assert!(par.bytes() == want);
    }

    #[test]
    fn a_writer_failure_is_the_error_a_sequential_load_gives() {
        let sections = dirty_rounds();
        let blocks = [("ram", 8 * M), ("vga", M)];
        // A page of the bulk round (sent as PAGE: (n + 0) % 3 != 0), mid-stream.
        let bad = 301 * PAGE;
        let mut seq = SharedVecRam::new(&blocks, Some(bad));
        let e_seq = load_shared(&mut seq, &sections, 0).unwrap_err();
        let mut par = SharedVecRam::new(&blocks, Some(bad));
        let e_par = load_shared(&mut par, &sections, 2).unwrap_err();
        assert_eq!(e_par.to_string(), e_seq.to_string());
        assert_eq!(e_par.qemu_lines(), e_seq.qemu_lines());
        assert!(e_par.to_string().contains("0x12d000"), "{e_par}");
    }

    #[test]
    fn a_writer_failure_before_a_truncation_wins_as_it_would_sequentially() {
        let mut sections = dirty_rounds();
        let blocks = [("ram", 8 * M), ("vga", M)];
        let last = sections.last_mut().unwrap();
        last.truncate(last.len() - 100);
        for bad in [None, Some(5 * PAGE)] {
            let mut seq = SharedVecRam::new(&blocks, bad);
            let e_seq = load_shared(&mut seq, &sections, 0).unwrap_err();
            let mut par = SharedVecRam::new(&blocks, bad);
            let e_par = load_shared(&mut par, &sections, 2).unwrap_err();
            assert_eq!(
                format!("{e_par:?}"),
                format!("{e_seq:?}"),
                "failing page {bad:?}"
            );
            if bad.is_none() {
                assert!(
                    matches!(
                        e_par,
                        MigrationError::Truncated {
                            what: "a RAM page",
                            ..
                        }
                    ),
                    "{e_par:?}"
                );
            }
        }
    }

    /// A reader that keeps the trait's defaults: it cannot share its bytes with other threads.
    struct UnsharedReader(Cursor<Vec<u8>>);

    impl std::io::Read for UnsharedReader {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl std::io::BufRead for UnsharedReader {
        fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
            self.0.fill_buf()
        }
        fn consume(&mut self, amt: usize) {
            self.0.consume(amt)
        }
    }

    impl StreamRead for UnsharedReader {
        fn seek_to(&mut self, _offset: u64) -> Result<(), MigrationError> {
            Err(MigrationError::NotSeekable)
        }
    }

    #[test]
    fn a_reader_that_cannot_share_loads_without_threads() {
        let sections = dirty_rounds();
        let blocks = [("ram", 8 * M), ("vga", M)];
        let mut t = SharedVecRam::new(&blocks, None);
        let mut l = RamLoader::new(false);
        l.set_parallel(4, 0);
        for s in &sections {
            let mut r = QemuReader::new(UnsharedReader(Cursor::new(s.clone())));
            l.load_section(&mut t, &mut r, 4).unwrap();
        }
        assert_eq!(l.stats().writer_threads, 0);
        let mut reference = VecRam::new(&blocks);
        load(&mut reference, &sections).unwrap();
        assert!(
            t.bytes()
                == reference
                    .blocks
                    .iter()
                    .map(|(_, b)| b.clone())
                    .collect::<Vec<_>>()
        );
    }

    #[test]
    fn loader_accepts_continue_at_the_start_of_a_later_section() {
        let mut dst = VecRam::new(&[("ram", 2 * PAGE)]);
        let a = records(&[(RamFlag::ZERO, Some("ram"), vec![0])]);
        let b = records(&[(
            PAGE | RamFlag::PAGE | RamFlag::CONTINUE,
            None,
            vec![3; 4096],
        )]);
        load(&mut dst, &[a, b]).unwrap();
        assert_eq!(dst.page(0, PAGE), &[3; 4096][..]);
    }

    fn load_err(target: &mut VecRam, sections: &[Vec<u8>]) -> MigrationError {
        load(target, sections).unwrap_err()
    }

    #[test]
    fn unknown_block_in_setup_is_refused_with_qemus_message() {
        let mut dst = VecRam::new(&[("ram", M)]);
        let e = load_err(&mut dst, &[setup_bytes(&[("zz", M)])]);
        assert_eq!(
            e.to_string(),
            "Unknown ramblock \"zz\", cannot accept migration"
        );
    }

    #[test]
    fn non_migratable_block_in_setup_is_refused() {
        let mut dst = VecRam::new(&[("ram", M)]);
        dst.migratable[0] = false;
        let e = load_err(&mut dst, &[setup_bytes(&[("ram", M)])]);
        assert_eq!(e.to_string(), "block ram should not be migrated !");
    }

    #[test]
    fn size_mismatch_on_a_fixed_block() {
        let mut dst = VecRam::new(&[("m", 4 * M)]);
        let e = load_err(&mut dst, &[setup_bytes(&[("m", 2 * M)])]);
        assert_eq!(
            e.to_string(),
            "Size mismatch: m: 0x200000 != 0x400000: Invalid argument"
        );
    }

    #[test]
    fn stream_length_is_aligned_to_target_then_host_page_before_comparing() {
        // 0x3001 rounds up to 0x4000 and 0xfff to 0x1000, the local used_lengths: accepted,
        // no resize. (The total, 0x4000, sits above the flag bits.)
        let mut dst = VecRam::new(&[("ram", 4 * PAGE), ("b", PAGE)]);
        let mut w = QemuWriter::new(Vec::new());
        w.put_be64(0x4000 | RamFlag::MEM_SIZE).unwrap();
        w.put_counted_string("ram").unwrap();
        w.put_be64(0x3001).unwrap();
        w.put_counted_string("b").unwrap();
        w.put_be64(0xfff).unwrap();
        w.put_be64(RamFlag::EOS).unwrap();
        let st = load(&mut dst, &[w.into_inner()]).unwrap();
        assert!(dst.resizes.is_empty());
        assert_eq!(
            st.blocks,
            [
                RamBlockInfo::new("ram", 0x3001),
                RamBlockInfo::new("b", 0xfff)
            ]
        );
        // A 64 KiB host page: 0x11000 aligns to 0x20000, reported as such.
        struct BigHost(VecRam);
        impl RamLoadTarget for BigHost {
            fn find_block(&mut self, i: &str) -> Option<LocalRamBlock> {
                self.0.find_block(i)
            }
            fn resize_block(&mut self, h: usize, l: u64) -> Result<(), Error> {
                self.0.resize_block(h, l)
            }
            fn write_page(&mut self, h: usize, o: u64, d: &[u8]) -> Result<(), Error> {
                self.0.write_page(h, o, d)
            }
            fn zero_page(&mut self, h: usize, o: u64) -> Result<(), Error> {
                self.0.zero_page(h, o)
            }
            fn host_page_size(&self) -> u64 {
                0x10000
            }
        }
        let mut t = BigHost(VecRam::new(&[("ram", 0x10000)]));
        let setup = setup_bytes(&[("ram", 0x11000)]);
        let mut l = RamLoader::new(false);
        let mut r = QemuReader::new(ChunkReader::sequential(Cursor::new(setup)));
        let e = l.load_section(&mut t, &mut r, 4).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Size mismatch: ram: 0x20000 != 0x10000: Invalid argument"
        );
    }

    #[test]
    fn resizeable_block_is_resized_when_the_stream_fits_max_length() {
        let mut dst = VecRam::new(&[("/rom@etc/acpi/tables", 0x20000)]);
        dst.resizeable[0] = true;
        dst.max_length[0] = 2 * M;
        let st = load(
            &mut dst,
            &[setup_bytes(&[("/rom@etc/acpi/tables", 0x10000)])],
        )
        .unwrap();
        assert_eq!(dst.resizes, [(0, 0x10000)]);
        assert_eq!(dst.blocks[0].1.len(), 0x10000);
        assert_eq!(
            st.resized,
            [RamBlockInfo::new("/rom@etc/acpi/tables", 0x10000)]
        );
    }

    #[test]
    fn resized_block_bounds_later_page_offsets() {
        let mut dst = VecRam::new(&[("r", 4 * PAGE)]);
        dst.resizeable[0] = true;
        dst.max_length[0] = 4 * PAGE;
        let setup = setup_bytes(&[("r", PAGE)]);
        let page = records(&[(PAGE | RamFlag::ZERO, Some("r"), vec![0])]);
        let e = load_err(&mut dst, &[setup, page]);
        assert_eq!(e.to_string(), "Illegal RAM offset 1000");
    }

    #[test]
    fn resizeable_block_larger_than_max_is_refused() {
        let mut dst = VecRam::new(&[("/rom@etc/acpi/tables", 0x20000)]);
        dst.resizeable[0] = true;
        dst.max_length[0] = 2 * M;
        let e = load_err(&mut dst, &[setup_bytes(&[("/rom@etc/acpi/tables", 4 * M)])]);
        assert_eq!(
            e.to_string(),
            "Size too large: /rom@etc/acpi/tables: 0x400000 > 0x200000: Invalid argument"
        );
        assert!(dst.resizes.is_empty());
    }

    #[test]
    fn block_list_longer_than_total_is_refused() {
        let mut dst = VecRam::new(&[("a", PAGE), ("b", PAGE)]);
        let mut w = QemuWriter::new(Vec::new());
        w.put_be64(PAGE | RamFlag::MEM_SIZE).unwrap();
        w.put_counted_string("a").unwrap();
        w.put_be64(2 * PAGE).unwrap();
        let mut dst2 = VecRam::new(&[("a", 2 * PAGE)]);
        let e = load_err(&mut dst2, &[w.into_inner()]);
        assert!(matches!(e, MigrationError::RamTotalMismatch { .. }), "{e}");
        // Blocks of the target that the stream does not list are left alone.
        dst.fill(1, 0, 9);
        load(&mut dst, &[setup_bytes(&[("a", PAGE)])]).unwrap();
        assert_eq!(dst.page(1, 0), &[9; 4096][..]);
    }

    #[test]
    fn offset_past_used_length_is_illegal() {
        let mut dst = VecRam::new(&[("ram", M)]);
        let e = load_err(
            &mut dst,
            &[records(&[(M | RamFlag::ZERO, Some("ram"), vec![0])])],
        );
        assert_eq!(e.to_string(), "Illegal RAM offset 100000");
    }

    #[test]
    fn continue_as_first_record_is_a_bad_stream() {
        let mut dst = VecRam::new(&[("ram", M)]);
        let r = records(&[(PAGE | RamFlag::ZERO | RamFlag::CONTINUE, None, vec![0])]);
        let e = load_err(&mut dst, &[r]);
        assert_eq!(e.to_string(), "Ack, bad migration stream!");
        assert_eq!(e.qemu_lines()[1], "Illegal RAM offset 1000");
    }

    #[test]
    fn page_record_for_an_unknown_block() {
        let mut dst = VecRam::new(&[("ram", M)]);
        let e = load_err(&mut dst, &[records(&[(RamFlag::PAGE, Some("zz"), vec![])])]);
        assert_eq!(
            e.qemu_lines(),
            ["Can't find block zz", "Illegal RAM offset 0"]
        );
    }

    #[test]
    fn page_record_for_a_non_migratable_block() {
        let mut dst = VecRam::new(&[("ram", M)]);
        dst.migratable[0] = false;
        let e = load_err(
            &mut dst,
            &[records(&[(RamFlag::ZERO, Some("ram"), vec![0])])],
        );
        assert_eq!(e.to_string(), "block ram should not be migrated !");
    }

    #[test]
    fn unknown_flag_combinations_are_refused() {
        for flags in [
            RamFlag::ZERO | RamFlag::PAGE,
            RamFlag::FULL,
            RamFlag::COMPRESS_PAGE,
            RamFlag::MULTIFD_FLUSH,
            RamFlag::HOOK,
            0,
        ] {
            let mut dst = VecRam::new(&[("ram", M)]);
            let id = (flags & RamFlag::ZERO != 0).then_some("ram");
            let e = load_err(&mut dst, &[records(&[(flags, id, vec![])])]);
            assert_eq!(
                e.to_string(),
                format!("Unknown combination of migration flags: {flags:#x}")
            );
        }
    }

    #[test]
    fn zero_page_with_non_zero_fill_is_refused() {
        let mut dst = VecRam::new(&[("ram", M)]);
        let e = load_err(
            &mut dst,
            &[records(&[(RamFlag::ZERO, Some("ram"), vec![0x5a])])],
        );
        assert_eq!(e.to_string(), "Found a zero page with value 90");
    }

    #[test]
    fn wrong_ram_version_is_refused_silently() {
        let mut dst = VecRam::new(&[("ram", M)]);
        let mut l = RamLoader::new(false);
        let mut r = QemuReader::new(ChunkReader::sequential(Cursor::new(setup_bytes(&[(
            "ram", M,
        )]))));
        let e = l.load_section(&mut dst, &mut r, 3).unwrap_err();
        assert!(matches!(e, MigrationError::RamVersion { version: 3 }));
        assert!(e.qemu_lines().is_empty());
    }

    #[test]
    fn truncated_page_is_reported_as_truncation() {
        let mut dst = VecRam::new(&[("ram", M)]);
        let mut r = records(&[(RamFlag::PAGE, Some("ram"), vec![1; 100])]);
        r.truncate(r.len() - 8);
        let e = load_err(&mut dst, &[r]);
        assert!(
            matches!(
                e,
                MigrationError::Truncated {
                    what: "a RAM page",
                    offset: 112
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn mapped_ram_loader_refuses_page_records() {
        let mut dst = VecRam::new(&[("ram", M)]);
        let mut l = RamLoader::new(true);
        let bytes = records(&[(RamFlag::ZERO, Some("ram"), vec![0])]);
        let mut r = QemuReader::new(ChunkReader::sequential(Cursor::new(bytes)));
        let e = l.load_section(&mut dst, &mut r, 4).unwrap_err();
        assert_eq!(e.to_string(), "Unexpected RAM flags: 2");
    }

    /// A mapped-ram file laid out as QEMU 10 writes it, by hand: setup with header, bitmap
    /// right after the header, pages at the next 1 MiB.
    fn mapped_ram_file(pages: &[Option<u8>], version: u32) -> (Vec<u8>, u64) {
        let used = pages.len() as u64 * PAGE;
        let mut w = QemuWriter::new(Vec::new());
        w.put_be64(used | RamFlag::MEM_SIZE).unwrap();
        w.put_counted_string("ram").unwrap();
        w.put_be64(used).unwrap();
        let bitmap_offset = w.position() + MappedRam::HEADER_SIZE;
        let bitmap_len = (pages.len() as u64).div_ceil(64) * 8;
        let pages_offset = align_up(bitmap_offset + bitmap_len, M);
        MappedRamHeader {
            version,
            page_size: PAGE,
            bitmap_offset,
            pages_offset,
        }
        .write(&mut w)
        .unwrap();
        let mut file = w.into_inner();
        let mut bitmap = vec![0u8; bitmap_len as usize];
        for (n, p) in pages.iter().enumerate() {
            if p.is_some() {
                bitmap[n / 8] |= 1 << (n % 8);
            }
        }
        file.extend(&bitmap);
        file.resize(pages_offset as usize, 0);
        for p in pages {
            file.extend(vec![p.unwrap_or(0xcc); TARGET_PAGE_SIZE]);
        }
        file.extend(RamFlag::EOS.to_be_bytes());
        (file, pages_offset + used)
    }

    #[test]
    fn mapped_ram_reads_set_bits_and_zeroes_holes() {
        let pages = [Some(1), None, Some(2), Some(3), None];
        let (file, eos_at) = mapped_ram_file(&pages, 1);
        let mut dst = VecRam::new(&[("ram", 5 * PAGE)]);
        dst.fill(0, PAGE, 0xee);
        let mut l = RamLoader::new(true);
        let mut r = QemuReader::new(ChunkReader::seekable(Cursor::new(file.clone())));
        l.load_section(&mut dst, &mut r, 4).unwrap();
        assert_eq!(r.position(), eos_at + 8);
        for (n, p) in pages.iter().enumerate() {
            assert_eq!(
                dst.page(0, n as u64 * PAGE),
                &[p.unwrap_or(0); 4096][..],
                "page {n}"
            );
        }
        assert_eq!(l.stats().normal_pages, 3);
        assert_eq!(l.stats().zero_pages, 2);
        // The same bytes through a pipe cannot be loaded.
        let mut l = RamLoader::new(true);
        let mut r = QemuReader::new(ChunkReader::sequential(Cursor::new(file)));
        let e = l.load_section(&mut dst, &mut r, 4).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Migration requires seekable transport (e.g. file)"
        );
    }

    fn load_mapped(file: Vec<u8>, dst: &mut VecRam) -> Result<u64, MigrationError> {
        let mut l = RamLoader::new(true);
        let mut r = QemuReader::new(ChunkReader::seekable(Cursor::new(file)));
        l.load_section(dst, &mut r, 4)?;
        Ok(r.position())
    }

    /// The header sits after MEM_SIZE (8), "\x03ram" (4) and the length (8).
    const HDR: usize = 20;

    #[test]
    fn mapped_ram_pages_must_start_page_aligned() {
        let (mut file, _) = mapped_ram_file(&[Some(1)], 1);
        file[HDR + 4 + 8 + 8 + 6] = 0x08; // pages_offset += 0x800
        let e = load_mapped(file, &mut VecRam::new(&[("ram", PAGE)])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Error reading ramblock ram pages, region has bad alignment"
        );
    }

    #[test]
    fn mapped_ram_page_size_must_be_the_target_page() {
        let (mut file, _) = mapped_ram_file(&[Some(1)], 1);
        file[HDR + 4 + 6] = 0x20; // page_size 0x2000
        let e = load_mapped(file, &mut VecRam::new(&[("ram", PAGE)])).unwrap_err();
        assert!(
            matches!(
                e,
                MigrationError::MappedRamPageSize {
                    page_size: 0x2000,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn mapped_ram_block_with_no_offsets_was_skipped_by_the_source() {
        let mut w = QemuWriter::new(Vec::new());
        w.put_be64(PAGE | RamFlag::MEM_SIZE).unwrap();
        w.put_counted_string("ram").unwrap();
        w.put_be64(PAGE).unwrap();
        MappedRamHeader {
            version: 1,
            page_size: PAGE,
            bitmap_offset: 0,
            pages_offset: 0,
        }
        .write(&mut w)
        .unwrap();
        w.put_be64(RamFlag::EOS).unwrap();
        let file = w.into_inner();
        let mut dst = VecRam::new(&[("ram", PAGE)]);
        dst.fill(0, 0, 4);
        assert_eq!(
            load_mapped(file.clone(), &mut dst).unwrap(),
            file.len() as u64
        );
        assert_eq!(
            dst.page(0, 0),
            &[4; 4096][..],
            "a skipped block is left alone"
        );
    }

    #[test]
    fn mapped_ram_header_version_2_is_refused() {
        let (file, _) = mapped_ram_file(&[Some(1)], 2);
        let mut dst = VecRam::new(&[("ram", PAGE)]);
        let mut l = RamLoader::new(true);
        let mut r = QemuReader::new(ChunkReader::seekable(Cursor::new(file)));
        let e = l.load_section(&mut dst, &mut r, 4).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Migration mapped-ram capability version not supported (expected <= 1, got 2)"
        );
    }
}
