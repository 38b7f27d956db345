//! Faulting a fresh destination's pages in ahead of its loader, on a second core.
//!
//! Into fresh memory every page a load writes is a first touch: a page fault, and on a host
//! that took freed memory back (free page reporting) a fault in the host below it too. The
//! loader meets those faults one after the other between its copies. For a `file:` stream a
//! second reader can run the same stream through the codec's own loader ahead of it, with a
//! target ([`Prefaulter`]) that copies nothing: it asks the kernel to populate the pages the
//! PAGE records name (`MADV_POPULATE_WRITE`, in runs of up to 2 MiB), so the faults happen on
//! another core while the loader copies, and the loader finds the pages there.
//!
//! It populates only pages the stream writes, so the destination ends with the memory the load
//! alone would have given it; it never changes a byte (populating keeps contents). It stops at
//! the first thing it cannot load (a device section: it has no handlers), on any error, and
//! when told to; the pages the loader has passed are not populated again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::Error;
use crate::helper_thread::{second_core, HelperThread};

use super::blocks::RamSnapshot;
use super::format::TARGET_PAGE_SIZE;
use super::ram::{LocalRamBlock, RamLoadTarget};
use super::stream::{load_file, LoadOptions};

const PAGE: u64 = TARGET_PAGE_SIZE as u64;
/// The largest run populated at once: a huge page's worth, so the loader is never far behind.
const RUN: u64 = 2 << 20;

/// A load target that populates the pages a stream writes and keeps nothing.
pub struct Prefaulter {
    snapshot: RamSnapshot,
    stop: Arc<AtomicBool>,
    /// The run being gathered: block, first offset, length.
    run: Option<(usize, u64, u64)>,
    populated: Arc<AtomicU64>,
}

impl Prefaulter {
    fn flush(&mut self) {
        if let Some((block, offset, len)) = self.run.take() {
            if self.snapshot.loader_passed(block, offset + len) {
                return;
            }
            if self.snapshot.populate(block, offset, len).is_ok() {
                self.populated.fetch_add(len, Ordering::Relaxed);
            }
        }
    }
}

impl RamLoadTarget for Prefaulter {
    fn find_block(&mut self, idstr: &str) -> Option<LocalRamBlock> {
        self.snapshot.find_block(idstr)
    }

    fn resize_block(&mut self, handle: usize, len: u64) -> Result<(), Error> {
        self.snapshot.resize_block(handle, len)
    }

    fn write_page(&mut self, handle: usize, offset: u64, _data: &[u8]) -> Result<(), Error> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(Error::invalid("the load ended"));
        }
        match &mut self.run {
            Some((b, start, len))
                if *b == handle
                    && *start + *len == offset
                    && *len < RUN
                    && !offset.is_multiple_of(RUN) =>
            {
                *len += PAGE;
            }
            _ => {
                self.flush();
                self.run = Some((handle, offset, PAGE));
            }
        }
        Ok(())
    }

    fn zero_page(&mut self, _handle: usize, _offset: u64) -> Result<(), Error> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(Error::invalid("the load ended"));
        }
        Ok(())
    }
}

/// The prefaulting thread of one load; stopped and joined when dropped.
pub struct Prefault {
    helper: HelperThread,
    populated: Arc<AtomicU64>,
}

impl Prefault {
    /// Starts reading `stream` (a second reader of the load's `file:` stream, at its start)
    /// ahead of the loader of `target`, which must have its known-zero pages
    /// ([`RamSnapshot::know_zero_pages`]): the loader's position is told through them. `None`
    /// on one core (it would only take turns with the loader) or if the thread could not
    /// start.
    pub fn spawn(
        target: &RamSnapshot,
        stream: std::fs::File,
        opts: &LoadOptions,
    ) -> Option<Prefault> {
        if !second_core() {
            return None;
        }
        let populated = Arc::new(AtomicU64::new(0));
        let (snapshot, counter, opts) = (target.clone(), populated.clone(), opts.clone());
        let helper = HelperThread::spawn("hm-prefault", move |stop| {
            let mut prefaulter = Prefaulter {
                snapshot,
                stop,
                run: None,
                populated: counter,
            };
            let _ = load_file(
                std::io::BufReader::new(stream),
                &opts,
                Some(&mut prefaulter),
                &mut [],
            );
            prefaulter.flush();
        })?;
        Some(Prefault { helper, populated })
    }

    /// Bytes populated so far.
    pub fn populated(&self) -> u64 {
        self.populated.load(Ordering::Relaxed)
    }

    /// Waits until the thread has read as far as it can; the bytes it populated.
    pub fn join(self) -> u64 {
        self.helper.join();
        self.populated.load(Ordering::Relaxed)
    }

    /// Stops the thread and waits for it; the bytes it populated.
    pub fn stop(self) -> u64 {
        self.helper.stop();
        self.populated.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::stream::{save_stream, SaveOptions};
    use crate::populated::Detector;
    use crate::ramblock::{map_anonymous, RamBlockRegistry};
    use std::io::Write;

    const MIB: u64 = 1 << 20;

    fn block(reg: &mut RamBlockRegistry, size: u64) -> crate::ramblock::RamBlockId {
        let b = reg
            .add(map_anonymous("t", size).unwrap(), 0, size, size, false)
            .unwrap();
        reg.set_idstr(b, None, "ram").unwrap();
        reg.set_migratable(b, true);
        b
    }

    #[test]
    fn it_populates_the_pages_the_stream_writes_and_changes_no_byte() {
        if std::thread::available_parallelism().unwrap().get() < 2 {
            // Never started on one core (checked below by spawn returning None).
            let mut reg = RamBlockRegistry::new();
            block(&mut reg, 4 * MIB);
            let f = tempfile();
            assert!(
                Prefault::spawn(&RamSnapshot::all(&reg), f, &LoadOptions::new("none")).is_none()
            );
            return;
        }
        // Source: data in the 2nd and 4th 2 MiB stretches of 16 MiB, zeros elsewhere.
        let size = 16 * MIB;
        let mut src_reg = RamBlockRegistry::new();
        let s = block(&mut src_reg, size);
        let src_ptr = src_reg.get(s).unwrap().host_ptr();
        let data = [2 * MIB..4 * MIB, 6 * MIB..8 * MIB];
        for r in &data {
            for at in r.clone().step_by(4096) {
                // SAFETY: inside the source block's mapping, alive with `src_reg`.
                unsafe { *src_ptr.add(at as usize + 17) = 0xa5 };
            }
        }
        let (bytes, _) = save_stream(
            Vec::new(),
            SaveOptions::new("none"),
            &RamSnapshot::migratable(&src_reg),
            &mut [],
        )
        .unwrap();
        let mut file = tempfile();
        file.write_all(&bytes).unwrap();
        std::io::Seek::rewind(&mut file).unwrap();

        let mut dst_reg = RamBlockRegistry::new();
        let d = block(&mut dst_reg, size);
        let mut target = RamSnapshot::all(&dst_reg);
        let detector = Detector::new();
        let _tester = target.know_zero_pages(&detector, false);
        let p = Prefault::spawn(&target, file, &LoadOptions::new("none")).expect("2 cores");
        assert_eq!(p.join(), 4 * MIB, "the data stretches, populated once");
        let populated = RamSnapshot::all(&dst_reg).populated(&detector).unwrap();
        let runs = populated[0].runs().to_vec();
        assert_eq!(runs, data, "only the pages the stream writes");
        let dst_ptr = dst_reg.get(d).unwrap().host_ptr();
        // SAFETY: the destination block's whole mapping, alive with `dst_reg`.
        let dst = unsafe { std::slice::from_raw_parts(dst_ptr, size as usize) };
        assert!(dst.iter().all(|&b| b == 0), "the prefaulter wrote a byte");
    }

    #[test]
    fn it_leaves_alone_what_the_loader_has_passed_and_stops_when_told() {
        let mut reg = RamBlockRegistry::new();
        block(&mut reg, 4 * MIB);
        let mut target = RamSnapshot::all(&reg);
        let _tester = target.know_zero_pages(&Detector::new(), false);
        let stop = Arc::new(AtomicBool::new(false));
        let mut p = Prefaulter {
            snapshot: target.clone(),
            stop: stop.clone(),
            run: None,
            populated: Arc::new(AtomicU64::new(0)),
        };
        // The loader wrote the page at 1 MiB + 4 KiB: the run below ends there.
        target.write_page(0, MIB + 4096, &[1; 4096]).unwrap();
        for at in (0..MIB + 8192).step_by(4096) {
            p.write_page(0, at, &[]).unwrap();
        }
        p.flush();
        assert_eq!(p.populated.load(Ordering::Relaxed), 0, "behind the loader");
        p.write_page(0, 3 * MIB, &[]).unwrap();
        p.flush();
        assert_eq!(p.populated.load(Ordering::Relaxed), 4096);
        stop.store(true, Ordering::Relaxed);
        assert!(p.write_page(0, 3 * MIB + 4096, &[]).is_err());
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "hostmem-prefault-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
