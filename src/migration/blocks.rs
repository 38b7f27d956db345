//! The codec's view of a machine's RAMBlocks: [`RamSnapshot`] takes the blocks a migration
//! works on out of the RAMBlock registry (their names, lengths and memory, kept mapped by the
//! `Arc<HostMapping>` each holds), so pages can be read and written while the machine itself
//! is unlocked and its guest runs.
//!
//! A snapshot is taken once per migration, under the machine's lock, and implements both
//! [`RamSource`] (the sending side) and [`RamLoadTarget`] (the receiving side). QEMU's RAM list
//! cannot change during a migration either (hotplug is refused meanwhile).

use std::sync::Arc;

use crate::backend::prealloc::populate_range;
use crate::error::{Error, HmErrorClass};
use crate::guarded::{AccessError, Guard, Span};
use crate::helper_thread::{second_core, HelperThread};
use crate::hostmap::HostMapping;
use crate::populated::{Detector, PopulatedMap, Region};
use crate::ramblock::{RamBlockId, RamBlockRegistry, DIRTY_PAGE_SIZE};

use super::format::TARGET_PAGE_SIZE;
use super::known_zero::KnownZero;
use super::ram::{
    InPlace, LocalRamBlock, PageRef, RamBlockInfo, RamLoadTarget, RamSource, SharedRamTarget,
};

const PAGE: u64 = TARGET_PAGE_SIZE as u64;

/// One block of a snapshot.
#[derive(Clone, Debug)]
pub struct SnapshotBlock {
    pub id: RamBlockId,
    pub idstr: String,
    pub used_length: u64,
    pub max_length: u64,
    pub migratable: bool,
    mapping: Arc<HostMapping>,
    mapping_offset: u64,
}

impl SnapshotBlock {
    /// The block's used length of its mapping, as the populated-page detector scans it.
    fn region(&self) -> Result<Region<'_>, Error> {
        Region::of(&self.mapping)
            .sub(self.mapping_offset as usize, self.used_length as usize)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "RAMBlock \"{}\" lies outside its mapping",
                    self.idstr
                ))
            })
    }

    /// Offset in the block's mapping of byte `offset` of the block, for `len` bytes inside it.
    fn at(&self, offset: u64, len: u64) -> Result<usize, Error> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.max_length) {
            return Err(Error::new(
                HmErrorClass::InvalidParameter,
                format!(
                    "page at 0x{offset:x} is outside RAMBlock \"{}\" of 0x{:x} bytes",
                    self.idstr, self.max_length
                ),
            ));
        }
        Ok((self.mapping_offset + offset) as usize)
    }

    /// A guarded access that failed, as an error naming the block, the offset in it and the
    /// cause: "RAMBlock "pc.ram": reading the page at offset 0x1000 failed: SIGBUS: ...".
    fn access_failed(&self, what: &str, e: AccessError) -> Error {
        let offset = e.offset().saturating_sub(self.mapping_offset);
        Error::new(
            HmErrorClass::Host,
            format!(
                "RAMBlock \"{}\": {what} at offset 0x{offset:x} failed: {e}",
                self.idstr
            ),
        )
        .with_errno(libc::EFAULT)
    }
}

/// The SIGBUS guard of one access: the snapshot's own, borrowed (cloning its `Arc` per page
/// made every page's access a locked increment and decrement of one counter that the loader
/// and its tester thread, or precopy's two testing threads, kept taking from each other: half
/// of a preallocated load's loader time), or one acquired for this access when the snapshot
/// could not hold one.
enum AccessGuard<'a> {
    Held(&'a Guard),
    Acquired(Guard),
}

impl std::ops::Deref for AccessGuard<'_> {
    type Target = Guard;

    fn deref(&self) -> &Guard {
        match self {
            AccessGuard::Held(g) => g,
            AccessGuard::Acquired(g) => g,
        }
    }
}

fn guard(held: &Option<Arc<Guard>>) -> Result<AccessGuard<'_>, Error> {
    match held {
        Some(g) => Ok(AccessGuard::Held(g)),
        None => Guard::acquire()
            .map(AccessGuard::Acquired)
            .map_err(|e| Error::new(HmErrorClass::Host, e.to_string())),
    }
}

/// The RAMBlocks of a machine as one migration sees them.
#[derive(Clone, Debug, Default)]
pub struct RamSnapshot {
    blocks: Vec<SnapshotBlock>,
    /// Makes a page the host cannot back (SIGBUS) an error of the access, not the process's
    /// end; None only if the handler could not be installed (then each access tries again).
    guard: Option<Arc<Guard>>,
    /// A load target's pages known to read as zeros ([`Self::know_zero_pages`]).
    known_zero: Option<Arc<KnownZero>>,
}

impl RamSnapshot {
    /// The blocks that go in the stream (registered for migration), in `info ramblock` order
    /// (QEMU's ram_list order, the order the stream lists and sends them in).
    pub fn migratable(reg: &RamBlockRegistry) -> RamSnapshot {
        let mut s = Self::all(reg);
        s.blocks.retain(|b| b.migratable);
        s
    }

    /// Every block, named or not: what a loader looks names up in (it refuses a known block that
    /// is not migratable with QEMU's words, which needs to see it).
    pub fn all(reg: &RamBlockRegistry) -> RamSnapshot {
        let blocks = reg
            .ids()
            .into_iter()
            .filter_map(|id| {
                let b = reg.get(id)?;
                Some(SnapshotBlock {
                    id,
                    idstr: b.idstr.clone(),
                    used_length: b.used_length,
                    max_length: b.max_length,
                    migratable: b.migratable && !b.idstr.is_empty(),
                    mapping: b.mapping.clone(),
                    mapping_offset: b.mapping_offset,
                })
            })
            .collect();
        RamSnapshot {
            blocks,
            guard: Guard::acquire().ok().map(Arc::new),
            known_zero: None,
        }
    }

    /// Makes this load target skip ZERO records for pages known to read as zeros
    /// ([`super::known_zero`]): scans every migratable, writable block for what may hold data,
    /// and, with more than one core and `helper` on, tests the populated pages ahead of the
    /// loader on a thread that runs while the returned helper lives (none on one core, or with
    /// nothing to test). Call it right
    /// before the load, after anything that writes the destination's memory, and keep the
    /// target from being written by anything but the load until the tester is dropped. A
    /// block the scan cannot tell about is tested by the loader, as without this.
    pub fn know_zero_pages(&mut self, detector: &Detector, helper: bool) -> Option<HelperThread> {
        let known = KnownZero::new(self.blocks.iter().enumerate().map(|(i, b)| {
            if !b.migratable || b.mapping.is_readonly() || self.overlaps_another(i) {
                return None;
            }
            // A file shorter than the mapping: its pages past the end are holes to the scan
            // but SIGBUS to a read, and the load must meet that as an error.
            if let Some(fd) = b.mapping.fd() {
                let end = b.mapping.file_offset() + b.mapping_offset + b.used_length;
                // SAFETY: a zeroed stat is a valid buffer, and fstat writes only that buffer,
                // which we own; `fd` is the mapping's, open as long as the mapping (which the
                // snapshot holds).
                let size = unsafe {
                    let mut st: libc::stat = std::mem::zeroed();
                    (libc::fstat(fd, &mut st) == 0).then_some(st.st_size as u64)
                };
                if size.is_none_or(|size| size < end) {
                    return None;
                }
            }
            let outcome = detector.scan(&b.region().ok()?, None).ok()?;
            Some((outcome.map()?.clone(), b.used_length))
        }));
        let known = Arc::new(known);
        self.known_zero = Some(known.clone());
        if !(helper && second_core() && known.has_pages_to_test()) {
            return None;
        }
        let me = self.clone();
        HelperThread::spawn("hm-zero-test", move |stop| {
            known.test_ahead(&stop, &mut |b, offset, zero| {
                me.zero_test(b, offset, zero).is_ok()
            })
        })
    }

    /// Whether this load target's loader has gone past `end` of block `block` (false when
    /// it does not know its known-zero pages, which tell where the loader is).
    pub fn loader_passed(&self, block: usize, end: u64) -> bool {
        self.known_zero
            .as_ref()
            .is_some_and(|k| k.loader_passed(block, end))
    }

    /// Asks the kernel to populate `len` bytes of block `block` from `offset` for writing
    /// (`MADV_POPULATE_WRITE`): the faults a write there would take, taken now; no byte changes.
    pub fn populate(&self, block: usize, offset: u64, len: u64) -> Result<(), Error> {
        let b = self.block(block)?;
        let at = b.at(offset, len)?;
        if b.mapping.is_readonly() {
            return Err(Error::invalid(format!(
                "RAMBlock \"{}\" is read-only",
                b.idstr
            )));
        }
        // No touching fallback where the kernel lacks MADV_POPULATE_WRITE (as prealloc has):
        // rewriting a byte could undo the loader's write of it, which runs meanwhile.
        // SAFETY: `at..at + len` lies inside the block's mapping (checked by `at`), which the
        // snapshot keeps mapped, and the mapping is writable (checked above).
        unsafe { populate_range(b.mapping.as_ptr().add(at), len as usize, false) }.map_err(
            |errno| {
                Error::new(
                    HmErrorClass::Host,
                    format!(
                        "RAMBlock \"{}\": populating 0x{len:x} bytes at 0x{offset:x} failed",
                        b.idstr
                    ),
                )
                .with_errno(errno)
            },
        )
    }

    /// Whether the memory of block `index` overlaps another migratable block's: a write
    /// through one would not be recorded for the other, so neither gets known-zero pages.
    fn overlaps_another(&self, index: usize) -> bool {
        let span = |b: &SnapshotBlock| {
            let start = b.mapping.as_ptr() as usize + b.mapping_offset as usize;
            start..start + b.used_length as usize
        };
        let me = span(&self.blocks[index]);
        self.blocks.iter().enumerate().any(|(i, b)| {
            let other = span(b);
            i != index && b.migratable && other.start < me.end && me.start < other.end
        })
    }

    /// Whether most of this load target's memory was never populated when its known-zero
    /// pages were found ([`Self::know_zero_pages`]): a fresh destination.
    pub fn starts_mostly_unpopulated(&self) -> bool {
        self.known_zero
            .as_ref()
            .is_some_and(|k| k.unpopulated_bytes() * 2 >= self.total_bytes())
    }

    /// ZERO records this load target skipped as known zero, and pages its tester found zero.
    pub fn known_zero_counts(&self) -> (u64, u64) {
        self.known_zero
            .as_ref()
            .map_or((0, 0), |k| (k.skipped(), k.found_zero()))
    }

    /// Tests `zero.len()` pages of block `block` from `offset` for zero where they lie; the
    /// offset of the span's first page in the block's mapping.
    fn zero_test(&self, block: usize, offset: u64, zero: &mut [bool]) -> Result<usize, Error> {
        let b = self.block(block)?;
        let at = b.at(offset, (zero.len() * TARGET_PAGE_SIZE) as u64)?;
        guard(&self.guard)?
            .zero_test(&Span::of(&b.mapping), at, TARGET_PAGE_SIZE, zero)
            .map_err(|e| b.access_failed("reading the page", e))?;
        Ok(at)
    }

    pub fn blocks(&self) -> &[SnapshotBlock] {
        &self.blocks
    }

    /// The blocks as a stream lists them (idstr and used length), in order.
    pub fn blocks_info(&self) -> Vec<RamBlockInfo> {
        RamSource::blocks(self)
    }

    /// Total bytes of the snapshot's blocks (their used lengths).
    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.used_length).sum()
    }

    /// What may hold data in each block (everything, where the kernel cannot tell), in block
    /// order: the pages `x-skip-unpopulated` sends in the bulk pass. Reads no guest memory, so
    /// it populates nothing; scan once dirty logging is on, which catches what is written
    /// after the scan went past it.
    pub fn populated(&self, detector: &Detector) -> Result<Vec<PopulatedMap>, Error> {
        self.blocks
            .iter()
            .map(|b| Ok(detector.scan(&b.region()?, None)?.into_map()))
            .collect()
    }

    /// Zeroes what may hold data in every migratable, writable block: a destination that
    /// takes a stream without the never-populated pages (`x-skip-unpopulated`) must start
    /// from zeros there, whatever its memory held (a file backend's old contents, an earlier
    /// guest). Returns the bytes written; fresh anonymous memory costs nothing.
    pub fn clear_populated(&self, detector: &Detector) -> Result<u64, Error> {
        let mut cleared = 0;
        let guard = guard(&self.guard)?;
        for b in self.blocks.iter().filter(|b| b.migratable) {
            if b.mapping.is_readonly() {
                continue;
            }
            let map = detector.scan(&b.region()?, None)?.into_map();
            for run in map.runs() {
                let len = run.end.min(b.used_length).saturating_sub(run.start);
                let at = b.at(run.start, len)?;
                // The destination's guest does not run while it waits for the stream.
                guard
                    .fill(&Span::of(&b.mapping), at, len as usize, 0)
                    .map_err(|e| b.access_failed("zeroing the pages", e))?;
                cleared += len;
            }
        }
        Ok(cleared)
    }

    /// The pages of block `index` whose bits are set in `bitmap` (the registry's dirty bitmap
    /// of that block: one bit per 4 KiB page, little-endian words), below its used length.
    pub fn dirty_pages(&self, index: usize, bitmap: &[u64]) -> Vec<PageRef> {
        let Some(b) = self.blocks.get(index) else {
            return Vec::new();
        };
        let pages = b.used_length.div_ceil(DIRTY_PAGE_SIZE);
        let mut out = Vec::new();
        crate::ramblock::for_each_set_run(bitmap, |first, count| {
            for p in first..(first + count).min(pages) {
                out.push(PageRef {
                    block: index,
                    offset: p * DIRTY_PAGE_SIZE,
                });
            }
        });
        out
    }

    fn block(&self, index: usize) -> Result<&SnapshotBlock, Error> {
        self.blocks.get(index).ok_or_else(|| {
            Error::new(
                HmErrorClass::NotFound,
                format!("no RAMBlock {index} in this migration"),
            )
        })
    }
}

impl RamSource for RamSnapshot {
    fn blocks(&self) -> Vec<RamBlockInfo> {
        self.blocks
            .iter()
            .map(|b| RamBlockInfo::new(&b.idstr, b.used_length))
            .collect()
    }

    /// A live source's guest may write the page meanwhile: the guarded read is volatile, so
    /// the copy is some snapshot of its bytes, and a page written during it is dirty and goes
    /// again. A page the host cannot back fails the read (and the migration); the guest goes
    /// on as before.
    fn read_page(&self, block: usize, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let b = self.block(block)?;
        let at = b.at(offset, buf.len() as u64)?;
        guard(&self.guard)?
            .read(&Span::of(&b.mapping), at, buf)
            .map_err(|e| b.access_failed("reading the page", e))
    }

    fn zero_test_in_place(
        &self,
        block: usize,
        offset: u64,
        zero: &mut [bool],
    ) -> Option<Result<InPlace<'_>, Error>> {
        let mut test = || {
            let at = self.zero_test(block, offset, zero)?;
            let base = self.block(block)?.mapping.as_ptr();
            // SAFETY: `at..at + zero.len() pages` lies in the block's mapping (checked by the
            // zero test), which the snapshot holds for as long as it is borrowed, and which is
            // mapped readable (guest RAM always is).
            Ok(unsafe { InPlace::new(base.add(at), zero.len()) })
        };
        Some(test())
    }

    fn shared(&self) -> Option<&(dyn RamSource + Sync)> {
        Some(self)
    }
}

impl RamLoadTarget for RamSnapshot {
    fn find_block(&mut self, idstr: &str) -> Option<LocalRamBlock> {
        let (handle, b) = self
            .blocks
            .iter()
            .enumerate()
            .find(|(_, b)| !b.idstr.is_empty() && b.idstr == idstr)?;
        Some(LocalRamBlock {
            handle,
            used_length: b.used_length,
            max_length: b.max_length,
            // hostmem has no resizeable RAM (QEMU's fw_cfg blobs are its only users).
            resizeable: false,
            migratable: b.migratable,
        })
    }

    fn resize_block(&mut self, handle: usize, _new_used_length: u64) -> Result<(), Error> {
        let b = self.block(handle)?;
        Err(Error::invalid(format!(
            "RAMBlock \"{}\" is not resizeable",
            b.idstr
        )))
    }

    fn write_page(&mut self, handle: usize, offset: u64, data: &[u8]) -> Result<(), Error> {
        SharedRamTarget::write_page(self, handle, offset, data)
    }

    fn zero_page(&mut self, handle: usize, offset: u64) -> Result<(), Error> {
        SharedRamTarget::zero_page(self, handle, offset)
    }

    /// A copy of the snapshot: the same mappings (kept mapped by their `Arc`s) and guard.
    fn shared(&self) -> Option<Arc<dyn SharedRamTarget>> {
        Some(Arc::new(self.clone()))
    }
}

impl SharedRamTarget for RamSnapshot {
    /// The destination's guest does not run while it loads; a page the host cannot back fails
    /// the load, and a failed load never starts the guest.
    fn write_page(&self, handle: usize, offset: u64, data: &[u8]) -> Result<(), Error> {
        let b = self.block(handle)?;
        let at = b.at(offset, data.len() as u64)?;
        if let Some(k) = &self.known_zero {
            k.writing(handle, offset);
        }
        guard(&self.guard)?
            .write(&Span::of(&b.mapping), at, data)
            .map_err(|e| b.access_failed("writing the page", e))
    }

    fn zero_page(&self, handle: usize, offset: u64) -> Result<(), Error> {
        let b = self.block(handle)?;
        let at = b.at(offset, PAGE)?;
        if self
            .known_zero
            .as_ref()
            .is_some_and(|k| k.skips_zero_record(handle, offset))
        {
            return Ok(());
        }
        let guard = guard(&self.guard)?;
        let span = Span::of(&b.mapping);
        // Tested in place, not copied out: a preallocated destination's zero pages are half
        // of a typical stream, and a copy of each cost as much as the test.
        let mut zero = [false];
        guard
            .zero_test(&span, at, TARGET_PAGE_SIZE, &mut zero)
            .map_err(|e| b.access_failed("reading the page", e))?;
        // Writing zeros over zeros would allocate memory that was never touched.
        if !zero[0] {
            guard
                .fill(&span, at, TARGET_PAGE_SIZE, 0)
                .map_err(|e| b.access_failed("zeroing the page", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn registry() -> (RamBlockRegistry, RamBlockId, RamBlockId, RamBlockId) {
        let mut r = RamBlockRegistry::new();
        let map = |n| crate::ramblock::map_anonymous("t", n).unwrap();
        let big = r.add(map(4 * MIB), 0, 4 * MIB, 4 * MIB, false).unwrap();
        r.set_idstr(big, None, "pc.ram").unwrap();
        r.set_migratable(big, true);
        let small = r.add(map(MIB), 0, MIB, MIB, false).unwrap();
        r.set_idstr(small, None, "pc.bios").unwrap();
        r.set_migratable(small, true);
        let unnamed = r.add(map(2 * MIB), 0, 2 * MIB, 2 * MIB, false).unwrap();
        (r, big, small, unnamed)
    }

    #[test]
    fn only_registered_blocks_migrate_in_ram_list_order() {
        let (r, _, _, _) = registry();
        let s = RamSnapshot::migratable(&r);
        let names: Vec<_> = RamSource::blocks(&s)
            .into_iter()
            .map(|b| (b.idstr, b.used_length))
            .collect();
        assert_eq!(
            names,
            [
                ("pc.ram".to_string(), 4 * MIB),
                ("pc.bios".to_string(), MIB)
            ]
        );
        assert_eq!(s.total_bytes(), 5 * MIB);
        assert_eq!(RamSnapshot::all(&r).blocks().len(), 3);
    }

    #[test]
    fn pages_written_on_one_side_read_back_on_the_other() {
        let (r, big, _, _) = registry();
        let mut dst = RamSnapshot::all(&r);
        let h = dst.find_block("pc.ram").unwrap();
        assert_eq!((h.used_length, h.migratable), (4 * MIB, true));
        let page: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
        dst.write_page(h.handle, 3 * MIB, &page).unwrap();
        let src = RamSnapshot::migratable(&r);
        let mut got = vec![0; 4096];
        src.read_page(0, 3 * MIB, &mut got).unwrap();
        assert_eq!(got, page);
        dst.zero_page(h.handle, 3 * MIB).unwrap();
        src.read_page(0, 3 * MIB, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 0));
        assert!(dst.find_block("").is_none() && dst.find_block("nope").is_none());
        assert!(src.read_page(0, 4 * MIB, &mut got).is_err());
        assert_eq!(src.blocks()[0].id, big);
    }

    #[test]
    fn zero_records_clear_written_pages_and_populate_no_untouched_one() {
        let (r, _, _, _) = registry();
        let mut dst = RamSnapshot::all(&r);
        let h = dst.find_block("pc.ram").unwrap();
        dst.write_page(h.handle, MIB, &[7; 4096]).unwrap();
        for offset in (0..4 * MIB).step_by(4096) {
            dst.zero_page(h.handle, offset).unwrap();
        }
        let src = RamSnapshot::migratable(&r);
        let mut got = vec![1; 4096];
        src.read_page(0, MIB, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 0));
        // Only the written page's memory may hold data (its 2 MiB, should THP have backed it):
        // the zero records read the rest, which maps the zero page and allocates nothing.
        let populated = src.populated(&Detector::new()).unwrap();
        assert!(
            populated[0].runs().iter().all(|run| run.end <= 2 * MIB),
            "{:?}",
            populated[0].runs()
        );
    }

    #[test]
    fn zero_records_for_pages_known_zero_are_skipped_and_the_rest_still_cleared() {
        let (r, _, _, _) = registry();
        let page: Vec<u8> = (0..4096).map(|i| (i % 13 + 1) as u8).collect();
        // Before the load: pc.ram holds old data at 1 MiB and a populated zero page at 2 MiB.
        let mut before = RamSnapshot::all(&r);
        let h = before.find_block("pc.ram").unwrap().handle;
        before.write_page(h, MIB, &page).unwrap();
        before.write_page(h, 2 * MIB, &[0; 4096]).unwrap();
        // The tester off, done before the load, and running while it loads.
        for (helper, join) in [(false, true), (true, true), (true, false)] {
            let mut dst = RamSnapshot::all(&r);
            let mut tester = dst.know_zero_pages(&Detector::new(), helper);
            assert!(tester.is_none() || tester_ran(helper));
            if join {
                if let Some(t) = tester.take() {
                    t.join();
                }
            }
            // A page of the load, then a ZERO record for it (a later round's).
            dst.write_page(h, 3 * MIB, &page).unwrap();
            for offset in (0..4 * MIB).step_by(4096) {
                dst.zero_page(h, offset).unwrap();
            }
            let src = RamSnapshot::migratable(&r);
            let mut got = vec![1; 4096];
            for at in [MIB, 2 * MIB, 3 * MIB] {
                src.read_page(0, at, &mut got).unwrap();
                assert!(got.iter().all(|&b| b == 0), "page at {at:#x}");
            }
            if !join {
                if let Some(t) = tester {
                    t.stop();
                }
                before.write_page(h, MIB, &page).unwrap();
                continue;
            }
            let (skipped, found) = dst.known_zero_counts();
            if tester_ran(helper) {
                // Every page but the old data and the load's own was known zero, the
                // populated zero page at 2 MiB (at least) found so by the tester.
                assert!(skipped == 1022 && found >= 1, "{skipped} {found}");
            } else {
                // The pages the scan left out; the populated ones were tested.
                assert!(skipped < 1022 && found == 0, "{skipped} {found}");
            }
            // What the tester found: the old data page is populated and was not zero.
            before.write_page(h, MIB, &page).unwrap();
        }
    }

    fn tester_ran(helper: bool) -> bool {
        helper && std::thread::available_parallelism().unwrap().get() > 1
    }

    #[test]
    fn dirty_bitmaps_become_page_references_below_the_used_length() {
        let (mut r, big, _, _) = registry();
        r.set_dirty(big, 0, 1);
        r.set_dirty(big, 4 * MIB - 4096, 4096);
        let s = RamSnapshot::migratable(&r);
        let pages = s.dirty_pages(0, &r.take_dirty(big));
        assert_eq!(
            pages,
            [
                PageRef {
                    block: 0,
                    offset: 0
                },
                PageRef {
                    block: 0,
                    offset: 4 * MIB - 4096
                }
            ]
        );
    }
}
