//! Precopy, both ways: the loop that sends a running guest's RAM (a bulk pass over every page,
//! then passes over the pages the guest dirtied meanwhile, until what is left fits the downtime
//! limit; then the guest pauses and the rest goes with the device sections), and the receiving
//! side that loads a stream into a machine's RAMBlocks.
//!
//! The loop knows nothing of machines, locks or KVM: it asks a [`PrecopyHost`] for what needs
//! the machine (dirty tracking, the dirty pages, pausing the guest, the device sections) and
//! reads RAM through a [`RamSnapshot`], which keeps the memory mapped while the machine is
//! unlocked. Bandwidth is limited as QEMU limits it (see [`super::rate`]): at most
//! `max-bandwidth / 10` bytes per 100 ms slice, charged a chunk at a time.

use super::qemu_file::StreamWrite;
use std::time::{Duration, Instant};

use crate::error::{Error, HmErrorClass};

use super::blocks::RamSnapshot;
use super::format::TARGET_PAGE_SIZE;
use super::ram::{PageRef, PageRuns, RamSaveStats, RamSource, TestedRuns};
use super::rate::{RateLimit, SliceBudget};
use super::section::SectionHandler;
use super::state::LiveLimits;
use super::state::{MigrationStatus, Parameters, Progress};
use super::stream::{SaveOptions, Saver};
use crate::populated::PopulatedMap;

const PAGE: u64 = TARGET_PAGE_SIZE as u64;

/// Pages per SECTION_PART: 1 MiB, small enough that rate limiting, cancellation and the
/// statistics stay fine-grained.
const CHUNK_PAGES: usize = 256;

/// Work done on the device sections of a migration.
pub type SectionsFn<'a> = dyn FnMut(&mut [&mut dyn SectionHandler]) -> Result<(), Error> + 'a;

/// What the precopy loop needs from the machine it migrates. Each call may lock the machine;
/// none is made while pages are being sent.
pub trait PrecopyHost {
    /// Switches dirty logging on, folds and clears what was logged so far, and returns the
    /// blocks to migrate. Everything is dirty at this point (the bulk pass sends it all).
    fn begin(&mut self) -> Result<RamSnapshot, Error>;
    /// Folds the dirty log and returns the pages of `snap` dirtied since the previous call.
    fn dirty_pages(&mut self, snap: &RamSnapshot) -> Result<Vec<PageRef>, Error>;
    /// Pauses the guest for the switchover; whether it was running.
    fn stop_guest(&mut self) -> Result<bool, Error>;
    /// Resumes the guest after a failed or cancelled migration that paused it.
    fn resume_guest(&mut self) -> Result<(), Error>;
    /// Switches dirty logging off again and lets go of the channel; called once, whatever
    /// happened, after [`Self::complete`] or [`Self::resume_guest`] and before the final
    /// status is published (whoever sees it may free the machine at once).
    fn end(&mut self);
    /// The stream went out whole: closes the channel (an error here fails the migration; the
    /// guest then runs on) and records that the guest now runs on the destination.
    fn complete(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// Runs `f` on the device sections that go in the stream.
    fn with_sections(&mut self, f: &mut SectionsFn<'_>) -> Result<(), Error>;
    /// What may hold data in each block of `snap` (in block order), when `x-skip-unpopulated`
    /// is on; `None` means every page goes.
    fn populated(&mut self, snap: &RamSnapshot) -> Result<Option<Vec<PopulatedMap>>, Error> {
        let _ = snap;
        Ok(None)
    }
}

/// Throughput bookkeeping for `info migrate`, updated once per slice.
struct Meter {
    slice_start: Instant,
    bytes_at_slice: u64,
    pages_at_slice: u64,
}

impl Meter {
    fn new() -> Self {
        Meter {
            slice_start: Instant::now(),
            bytes_at_slice: 0,
            pages_at_slice: 0,
        }
    }

    fn tick(&mut self, progress: &Progress, bytes: u64, pages: u64) {
        let elapsed = self.slice_start.elapsed();
        if elapsed < RateLimit::SLICE {
            return;
        }
        let secs = elapsed.as_secs_f64();
        let (db, dp) = (bytes - self.bytes_at_slice, pages - self.pages_at_slice);
        progress.update(|s| {
            s.mbps = db as f64 * 8.0 / 1e6 / secs;
            s.pages_per_second = (dp as f64 / secs) as u64;
        });
        self.slice_start = Instant::now();
        self.bytes_at_slice = bytes;
        self.pages_at_slice = pages;
    }
}

fn cancelled() -> Error {
    Error::new(HmErrorClass::Generic, "migration cancelled")
}

struct Sender<'a, W: StreamWrite> {
    saver: Saver<W>,
    snap: &'a RamSnapshot,
    progress: &'a Progress,
    rate: &'a RateLimit,
    budget: SliceBudget,
    meter: Meter,
    pages_sent: u64,
}

/// Chunks a helper thread keeps tested ahead of the one going out (4 MiB).
const TESTED_AHEAD: usize = 4;
/// Chunks the migration thread tests itself at most while it waits for one helper chunk.
const MINE_AHEAD: usize = 8;

impl<'a, W: StreamWrite> Sender<'a, W> {
    /// Sends `pages` as PART sections of at most a chunk each, rate-limited; where the stream
    /// and the saver's options allow, each chunk's zero test runs ahead on a helper thread.
    fn send(&mut self, pages: impl IntoIterator<Item = PageRef>) -> Result<(), Error> {
        let mut pages = pages.into_iter().peekable();
        let snap: &'a RamSnapshot = self.snap;
        if self.saver.zero_test_helper() && self.saver.tests_in_place() {
            if let Some(shared) = snap.shared() {
                return self.send_tested_ahead(shared, &mut pages);
            }
        }
        let mut chunk = Vec::with_capacity(CHUNK_PAGES);
        while pages.peek().is_some() {
            chunk.clear();
            chunk.extend(pages.by_ref().take(CHUNK_PAGES));
            if self.progress.cancel_requested() {
                return Err(cancelled());
            }
            let before = self.saver.position();
            let st = self
                .saver
                .save_pages(self.snap, chunk.iter().copied())
                .map_err(Error::from)?;
            self.chunk_sent(chunk.len(), st, before);
        }
        Ok(())
    }

    /// [`Self::send`] with the zero tests on two threads: a helper keeps up to
    /// [`TESTED_AHEAD`] chunks tested ahead of the one going out, and this thread, rather
    /// than wait for the helper, tests the next chunks itself (up to [`MINE_AHEAD`]); framing, the kernel's copy and
    /// the rate limit stay here, and the chunks go out in the pages' order.
    fn send_tested_ahead(
        &mut self,
        shared: &'a (dyn RamSource + Sync),
        pages: &mut std::iter::Peekable<impl Iterator<Item = PageRef>>,
    ) -> Result<(), Error> {
        use std::collections::VecDeque;
        use std::sync::mpsc::{sync_channel, TryRecvError};
        let helper_ended = || {
            Error::new(
                HmErrorClass::Generic,
                "migration: the zero-test helper thread ended unexpectedly",
            )
        };
        std::thread::scope(|scope| {
            let (to_helper, jobs) = sync_channel::<PageRuns>(TESTED_AHEAD);
            let (from_helper, results) = sync_channel::<TestedRuns<'a>>(TESTED_AHEAD);
            scope.spawn(move || {
                for runs in jobs {
                    if from_helper.send(runs.test(shared)).is_err() {
                        break;
                    }
                }
            });
            // In the pages' order; `None`: the helper's, whose results come back in order.
            let mut queue: VecDeque<(PageRuns, Option<TestedRuns<'a>>)> = VecDeque::new();
            let mut with_helper = 0;
            loop {
                while with_helper < TESTED_AHEAD && pages.peek().is_some() {
                    let runs = self.saver.page_runs(pages.by_ref().take(CHUNK_PAGES))?;
                    to_helper.send(runs.clone()).map_err(|_| helper_ended())?;
                    queue.push_back((runs, None));
                    with_helper += 1;
                }
                let Some((runs, tested)) = queue.pop_front() else {
                    break;
                };
                let tested = match tested {
                    Some(t) => t,
                    None => {
                        // Until the helper's chunk is ready, this thread tests the next
                        // chunks itself (one at a time, looking again after each: a chunk of
                        // non-zero pages tests in a fraction of a zero chunk's time, so
                        // testing one and then waiting left this thread idle).
                        let mut mine_ahead = 0;
                        let t = loop {
                            match results.try_recv() {
                                Ok(t) => break t,
                                Err(TryRecvError::Disconnected) => return Err(helper_ended()),
                                Err(TryRecvError::Empty) => {}
                            }
                            if pages.peek().is_none() || mine_ahead == MINE_AHEAD {
                                break results.recv().map_err(|_| helper_ended())?;
                            }
                            let mine = self.saver.page_runs(pages.by_ref().take(CHUNK_PAGES))?;
                            let t = mine.test(shared);
                            queue.push_back((mine, Some(t)));
                            mine_ahead += 1;
                        };
                        with_helper -= 1;
                        t
                    }
                };
                if self.progress.cancel_requested() {
                    return Err(cancelled());
                }
                let before = self.saver.position();
                let st = self.saver.save_tested_pages(self.snap, &runs, tested)?;
                self.chunk_sent(runs.pages(), st, before);
            }
            Ok(())
        })
    }

    /// What follows a chunk of `pages` pages that went out from stream position `before`:
    /// the statistics, the rate limit's wait (a cancel ends it; the next chunk sees it) and
    /// the meter.
    fn chunk_sent(&mut self, pages: usize, st: RamSaveStats, before: u64) {
        let bytes = self.saver.position() - before;
        self.pages_sent += pages as u64;
        self.progress.update(|s| {
            s.transferred += bytes;
            s.precopy_bytes += bytes;
            s.duplicate += st.zero_pages;
            s.normal += st.normal_pages;
            s.normal_bytes += st.normal_pages * PAGE;
            s.remaining = s.remaining.saturating_sub(pages as u64 * PAGE);
        });
        self.budget.charge(bytes);
        let progress = self.progress;
        let _ = self.budget.wait(self.rate, |left| {
            if progress.cancel_requested() {
                return Err(());
            }
            std::thread::sleep(left.min(Duration::from_millis(10)));
            Ok(())
        });
        self.meter
            .tick(self.progress, self.saver.position(), self.pages_sent);
    }
}

/// Migrates the host's guest over `out`: setup, bulk pass, dirty passes until the rest fits
/// `downtime-limit` at the measured bandwidth (or `max_rounds` passes, when not 0), switchover.
/// The passes keep to `limits` (which may change meanwhile); the switchover does not limit its
/// bandwidth, as in QEMU.
/// The guest keeps running on the source until the switchover and stays paused after success;
/// on failure or cancellation it runs again. `progress` gets the status and statistics.
#[allow(clippy::too_many_arguments)]
pub fn run_outgoing<W: StreamWrite>(
    host: &mut dyn PrecopyHost,
    out: W,
    opts: SaveOptions,
    params: &Parameters,
    limits: &LiveLimits,
    max_rounds: u64,
    progress: &Progress,
) -> Result<(), Error> {
    let snap = host.begin()?;
    let mut stopped = false;
    let result = outgoing_rounds(
        host,
        &snap,
        out,
        opts,
        params,
        limits,
        max_rounds,
        progress,
        &mut stopped,
    );
    let result = result.and_then(|()| host.complete());
    if result.is_err() && stopped {
        let _ = host.resume_guest();
    }
    host.end();
    // The migration's hold on guest memory goes before its end is published: a caller that
    // sees "completed" may remove the machine and count what is left of it.
    drop(snap);
    match result {
        Ok(()) => {
            progress.set_status(MigrationStatus::Completed);
            Ok(())
        }
        Err(e) => {
            if progress.cancel_requested() {
                progress.set_status(MigrationStatus::Cancelled);
            } else {
                progress.fail(&e);
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn outgoing_rounds<W: StreamWrite>(
    host: &mut dyn PrecopyHost,
    snap: &RamSnapshot,
    out: W,
    mut opts: SaveOptions,
    params: &Parameters,
    limits: &LiveLimits,
    max_rounds: u64,
    progress: &Progress,
    stopped: &mut bool,
) -> Result<(), Error> {
    opts.zero_page_detection = params.zero_page_detection();
    let total = snap.total_bytes();
    progress.update(|s| {
        s.total = total;
        s.remaining = total;
        s.dirty_sync_count = 1;
    });
    let mut saver = Saver::new(out, opts, RamSource::blocks(snap)).map_err(Error::from)?;
    host.with_sections(&mut |h| saver.save_setup(h).map_err(Error::from))?;
    let setup_bytes = saver.position();
    progress.update(|s| {
        s.transferred += setup_bytes;
        s.precopy_bytes += setup_bytes;
    });
    let populated = host.populated(snap)?;
    if let Some(maps) = &populated {
        let pages: u64 = maps.iter().map(PopulatedMap::pages).sum();
        progress.update(|s| {
            s.skipped_unpopulated = (total / PAGE).saturating_sub(pages);
            s.remaining = pages * PAGE;
        });
    }
    let blocks = RamSource::blocks(snap);
    progress.set_status(MigrationStatus::Active);
    progress.set_expected_downtime(limits.downtime_limit_ms());
    let mut sender = Sender {
        saver,
        snap,
        progress,
        rate: &limits.rate,
        budget: SliceBudget::new(),
        meter: Meter::new(),
        pages_sent: 0,
    };
    let mut round_start = Instant::now();
    let mut round_bytes_start = sender.saver.position();
    match &populated {
        Some(maps) => sender.send(maps.iter().enumerate().flat_map(|(block, map)| {
            map.page_offsets()
                .map(move |offset| PageRef { block, offset })
        }))?,
        None => sender.send(super::ram::all_pages(&blocks))?,
    }
    let mut rounds = 0u64;
    let final_pages = loop {
        let dirty = host.dirty_pages(snap)?;
        let elapsed = round_start.elapsed().as_secs_f64().max(1e-3);
        let bytes = sender.saver.position() - round_bytes_start;
        let bandwidth = (bytes as f64 / elapsed).max(1.0);
        let remaining = dirty.len() as u64 * PAGE;
        let expected_ms = (remaining as f64 / bandwidth * 1000.0) as u64;
        progress.update(|s| {
            s.dirty_sync_count += 1;
            s.remaining = remaining;
            s.dirty_pages_rate = (dirty.len() as f64 / elapsed) as u64;
        });
        progress.set_expected_downtime(expected_ms);
        // QEMU's threshold: what the measured bandwidth sends within the downtime limit.
        let threshold = bandwidth * limits.downtime_limit_ms() as f64 / 1000.0;
        let converged = (remaining as f64) < threshold;
        if converged || (max_rounds != 0 && rounds >= max_rounds) || dirty.is_empty() {
            break dirty;
        }
        if progress.cancel_requested() {
            return Err(cancelled());
        }
        round_start = Instant::now();
        round_bytes_start = sender.saver.position();
        sender.send(dirty.iter().copied())?;
        rounds += 1;
        progress.update(|s| s.rounds = rounds);
    };
    // Switchover: the guest pauses, the pages it dirtied since the last sync and the device
    // state go, and the destination takes over.
    let paused_at = Instant::now();
    *stopped = host.stop_guest()?;
    let mut last = final_pages;
    last.extend(host.dirty_pages(snap)?);
    last.sort_unstable();
    last.dedup();
    progress.update(|s| s.dirty_sync_count += 1);
    let before = sender.saver.position();
    let Sender { mut saver, .. } = sender;
    let mut summary = None;
    host.with_sections(&mut |h| {
        summary = Some(
            saver
                .save_complete(snap, last.iter().copied(), h)
                .map_err(Error::from)?,
        );
        Ok(())
    })?;
    let summary = summary.expect("with_sections ran the closure");
    let bytes = saver.position() - before;
    progress.update(|s| {
        s.transferred += bytes;
        s.downtime_bytes += bytes;
        s.remaining = 0;
        s.duplicate = summary.ram.zero_pages;
        s.normal = summary.ram.normal_pages;
        s.normal_bytes = summary.ram.normal_pages * PAGE;
    });
    progress.set_downtime(paused_at.elapsed());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::section::BufferSection;
    use crate::migration::stream::{load, LoadOptions};
    use crate::ramblock::{RamBlockId, RamBlockRegistry};

    const MIB: u64 = 1 << 20;

    /// A host over a registry whose "guest" is the test: it dirties pages between syncs.
    struct FakeHost {
        reg: RamBlockRegistry,
        block: RamBlockId,
        /// Pages to dirty (write a new byte to) before each sync, one list per sync.
        writes: Vec<Vec<u64>>,
        running: bool,
        stops: u32,
        resumes: u32,
        ended: bool,
        fail_stop: bool,
        section: BufferSection,
    }

    impl FakeHost {
        fn new(size: u64) -> FakeHost {
            let mut reg = RamBlockRegistry::new();
            let m = crate::ramblock::map_anonymous("t", size).unwrap();
            let block = reg.add(m, 0, size, size, false).unwrap();
            reg.set_idstr(block, None, "ram").unwrap();
            reg.set_migratable(block, true);
            let h = FakeHost {
                reg,
                block,
                writes: Vec::new(),
                running: true,
                stops: 0,
                resumes: 0,
                ended: false,
                fail_stop: false,
                section: BufferSection::new("vmm-cpu", 0, 1, vec![7; 16]),
            };
            for p in 0..size / PAGE / 2 {
                h.poke(p * PAGE, (p % 251) as u8 + 1);
            }
            h
        }

        fn poke(&self, offset: u64, v: u8) {
            let b = self.reg.get(self.block).unwrap();
            // SAFETY: inside the block's mapping, which the registry keeps alive.
            unsafe { *b.host_ptr().add(offset as usize) = v };
        }

        fn bytes(&self) -> Vec<u8> {
            let b = self.reg.get(self.block).unwrap();
            // SAFETY: the block's whole mapping, alive while the registry is.
            unsafe { std::slice::from_raw_parts(b.host_ptr(), b.used_length as usize) }.to_vec()
        }
    }

    impl PrecopyHost for FakeHost {
        fn begin(&mut self) -> Result<RamSnapshot, Error> {
            Ok(RamSnapshot::migratable(&self.reg))
        }
        fn dirty_pages(&mut self, snap: &RamSnapshot) -> Result<Vec<PageRef>, Error> {
            if self.running && !self.writes.is_empty() {
                for p in self.writes.remove(0) {
                    self.poke(p, 0xee);
                    self.reg.set_dirty(self.block, p, 1);
                }
            }
            Ok(snap.dirty_pages(0, &self.reg.take_dirty(self.block)))
        }
        fn stop_guest(&mut self) -> Result<bool, Error> {
            if self.fail_stop {
                return Err(Error::generic("vCPU did not stop"));
            }
            self.stops += 1;
            let was = self.running;
            self.running = false;
            Ok(was)
        }
        fn resume_guest(&mut self) -> Result<(), Error> {
            self.resumes += 1;
            self.running = true;
            Ok(())
        }
        fn end(&mut self) {
            self.ended = true;
        }
        fn with_sections(&mut self, f: &mut SectionsFn<'_>) -> Result<(), Error> {
            f(&mut [&mut self.section])
        }
    }

    fn load_into(bytes: &[u8], size: u64) -> (Vec<u8>, BufferSection) {
        let mut reg = RamBlockRegistry::new();
        let m = crate::ramblock::map_anonymous("d", size).unwrap();
        let b = reg.add(m, 0, size, size, false).unwrap();
        reg.set_idstr(b, None, "ram").unwrap();
        reg.set_migratable(b, true);
        let mut target = RamSnapshot::all(&reg);
        let mut cpu = BufferSection::new("vmm-cpu", 0, 1, vec![0; 16]);
        load(
            bytes,
            &LoadOptions::new("none"),
            Some(&mut target),
            &mut [&mut cpu],
        )
        .unwrap();
        let blk = reg.get(b).unwrap();
        // SAFETY: the destination block's whole mapping, alive with `reg`.
        let data = unsafe { std::slice::from_raw_parts(blk.host_ptr(), size as usize) }.to_vec();
        (data, cpu)
    }

    /// A stream that takes guest RAM in place (as a socket or a file channel does), copying
    /// it at once.
    #[derive(Default)]
    struct InPlaceVec(Vec<u8>);

    impl std::io::Write for InPlaceVec {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl StreamWrite for InPlaceVec {
        fn takes_unowned(&self) -> bool {
            true
        }
        unsafe fn write_unowned(&mut self, ptr: *const u8, len: usize) -> std::io::Result<()> {
            // SAFETY: the caller keeps `ptr..ptr+len` mapped until the next flush, and this
            // reads it now.
            self.0
                .extend_from_slice(unsafe { std::slice::from_raw_parts(ptr, len) });
            Ok(())
        }
    }

    #[test]
    fn zero_tests_run_ahead_on_a_helper_and_the_stream_is_the_one_tested_alone() {
        // 24 MiB, half of it written: the bulk pass is 24 chunks, more than the helper keeps
        // ahead; dirty passes follow.
        let mut streams = Vec::new();
        for helper in [true, false] {
            let mut host = FakeHost::new(24 * MIB);
            host.writes = vec![vec![0, 4096 * 3000], vec![4096 * 5]];
            let progress = Progress::new(false);
            let mut params = Parameters::default();
            params.set("downtime-limit", "0").unwrap();
            let mut opts = SaveOptions::new("none");
            opts.zero_test_helper = helper;
            let mut out = InPlaceVec::default();
            run_outgoing(
                &mut host,
                &mut out,
                opts,
                &params,
                &LiveLimits::new(&params),
                0,
                &progress,
            )
            .unwrap();
            let (data, _) = load_into(&out.0, 24 * MIB);
            assert!(
                data == host.bytes(),
                "helper {helper}: the destination differs"
            );
            let s = progress.snapshot();
            assert_eq!(s.stats.transferred, out.0.len() as u64);
            assert_eq!(s.stats.duplicate + s.stats.normal, 24 * MIB / PAGE + 3);
            streams.push(out.0);
        }
        assert!(streams[0] == streams[1], "the streams differ");
    }

    #[test]
    fn the_snapshot_and_the_channel_are_released_before_the_end_is_published() {
        use crate::migration::state::tests::OnDrop;
        use std::sync::{Arc, Mutex};
        // What the migration still holds when its final status is set, seen from the
        // interrupt, which a final status drops just before it becomes visible.
        struct Held {
            mapping_holders: usize,
            channel_open: bool,
        }
        for fail in [false, true] {
            let mut host = FakeHost::new(4 * MIB);
            host.fail_stop = fail;
            let mapping = Arc::downgrade(&host.reg.get(host.block).unwrap().mapping);
            let channel = Arc::new(());
            let progress = Arc::new(Progress::new(false));
            let held = Arc::new(Mutex::new(None));
            let (record, channel_weak) = (held.clone(), Arc::downgrade(&channel));
            let at_end = OnDrop(move || {
                *record.lock().unwrap() = Some(Held {
                    mapping_holders: mapping.strong_count(),
                    channel_open: channel_weak.strong_count() > 0,
                });
            });
            progress.set_interrupt(Some(Box::new(move || {
                let _ = &at_end;
            })));
            /// A channel that is open while it lives.
            struct Channel(Vec<u8>, #[allow(dead_code)] Arc<()>);
            impl std::io::Write for Channel {
                fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                    self.0.extend_from_slice(buf);
                    Ok(buf.len())
                }
                fn flush(&mut self) -> std::io::Result<()> {
                    Ok(())
                }
            }
            impl StreamWrite for Channel {}
            let params = Parameters::default();
            let result = run_outgoing(
                &mut host,
                Channel(Vec::new(), channel),
                SaveOptions::new("none"),
                &params,
                &LiveLimits::new(&params),
                0,
                &progress,
            );
            assert_eq!(result.is_err(), fail);
            let held = held
                .lock()
                .unwrap()
                .take()
                .expect("the final status dropped it");
            assert_eq!(
                held.mapping_holders, 1,
                "fail {fail}: the snapshot still held guest memory (the registry alone should)"
            );
            assert!(
                !held.channel_open,
                "fail {fail}: the channel was still open"
            );
            assert!(progress.status().is_finished());
        }
    }

    #[test]
    fn pages_dirtied_during_the_rounds_arrive_with_their_last_value() {
        let mut host = FakeHost::new(8 * MIB);
        // The guest keeps dirtying: three syncs find new pages, each sent in a pass of its own.
        host.writes = vec![vec![0, 4096 * 300], vec![4096 * 5], vec![4096 * 2000]];
        let progress = Progress::new(false);
        let mut params = Parameters::default();
        // A downtime limit of 0 ms forces passes until nothing is dirty.
        params.set("downtime-limit", "0").unwrap();
        let mut out = Vec::new();
        run_outgoing(
            &mut host,
            &mut out,
            SaveOptions::new("none"),
            &params,
            &LiveLimits::new(&params),
            0,
            &progress,
        )
        .unwrap();
        assert!(host.ended && !host.running);
        assert_eq!((host.stops, host.resumes), (1, 0));
        let (data, cpu) = load_into(&out, 8 * MIB);
        assert!(
            data == host.bytes(),
            "the destination differs from the source"
        );
        assert_eq!(cpu.data, [7; 16]);
        let s = progress.snapshot();
        assert_eq!(s.status, MigrationStatus::Completed);
        assert_eq!(s.stats.rounds, 3);
        // The setup's, one after the bulk pass and after each pass, and the switchover's.
        assert_eq!(s.stats.dirty_sync_count, 6);
        assert_eq!(s.stats.transferred, out.len() as u64);
        assert_eq!(s.stats.total, 8 * MIB);
        assert!(s.downtime_ms.is_some() && s.expected_downtime_ms.is_none());
    }

    #[test]
    fn dropping_one_dirty_pass_would_lose_the_page_it_carried() {
        // The same guest, but a host that forgets the second sync's pages: the destination
        // then has a stale page, which is what the round-by-round test above rules out.
        struct Forgetful(FakeHost, u32);
        impl PrecopyHost for Forgetful {
            fn begin(&mut self) -> Result<RamSnapshot, Error> {
                self.0.begin()
            }
            fn dirty_pages(&mut self, snap: &RamSnapshot) -> Result<Vec<PageRef>, Error> {
                self.1 += 1;
                let pages = self.0.dirty_pages(snap)?;
                Ok(if self.1 == 2 { Vec::new() } else { pages })
            }
            fn stop_guest(&mut self) -> Result<bool, Error> {
                self.0.stop_guest()
            }
            fn resume_guest(&mut self) -> Result<(), Error> {
                self.0.resume_guest()
            }
            fn end(&mut self) {
                self.0.end()
            }
            fn with_sections(&mut self, f: &mut SectionsFn<'_>) -> Result<(), Error> {
                self.0.with_sections(f)
            }
        }
        let mut host = FakeHost::new(8 * MIB);
        host.writes = vec![vec![0], vec![4096 * 5], vec![]];
        let mut host = Forgetful(host, 0);
        let mut params = Parameters::default();
        params.set("downtime-limit", "0").unwrap();
        let mut out = Vec::new();
        let progress = Progress::new(false);
        run_outgoing(
            &mut host,
            &mut out,
            SaveOptions::new("none"),
            &params,
            &LiveLimits::new(&params),
            0,
            &progress,
        )
        .unwrap();
        let (data, _) = load_into(&out, 8 * MIB);
        assert_ne!(data[4096 * 5], host.0.bytes()[4096 * 5]);
    }

    #[test]
    fn a_failed_switchover_resumes_nothing_it_did_not_stop_and_reports_why() {
        let mut host = FakeHost::new(2 * MIB);
        host.fail_stop = true;
        let progress = Progress::new(false);
        let e = run_outgoing(
            &mut host,
            Vec::new(),
            SaveOptions::new("none"),
            &Parameters::default(),
            &LiveLimits::default(),
            0,
            &progress,
        )
        .unwrap_err();
        assert_eq!(e.message(), "vCPU did not stop");
        assert!(host.ended && host.running);
        assert_eq!(host.resumes, 0);
        let s = progress.snapshot();
        assert_eq!(s.status, MigrationStatus::Failed);
        assert_eq!(s.error.as_deref(), Some("vCPU did not stop"));
    }

    #[test]
    fn a_writer_that_breaks_fails_the_migration_and_the_guest_runs_on() {
        struct Broken;
        impl StreamWrite for Broken {}
        impl std::io::Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from_raw_os_error(libc::EPIPE))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut host = FakeHost::new(2 * MIB);
        let progress = Progress::new(false);
        assert!(run_outgoing(
            &mut host,
            Broken,
            SaveOptions::new("none"),
            &Parameters::default(),
            &LiveLimits::default(),
            0,
            &progress,
        )
        .is_err());
        assert!(host.running && host.ended);
        assert_eq!(progress.status(), MigrationStatus::Failed);
    }

    #[test]
    fn cancelling_stops_the_sender_and_leaves_the_guest_running() {
        let mut host = FakeHost::new(8 * MIB);
        let progress = Progress::new(false);
        progress.cancel();
        let e = run_outgoing(
            &mut host,
            Vec::new(),
            SaveOptions::new("none"),
            &Parameters::default(),
            &LiveLimits::default(),
            0,
            &progress,
        )
        .unwrap_err();
        assert_eq!(e.message(), "migration cancelled");
        assert_eq!(progress.status(), MigrationStatus::Cancelled);
        assert!(host.running && host.stops == 0);
    }

    #[test]
    fn the_bandwidth_limit_paces_the_bulk_pass() {
        // 2 MiB with half of it zero at 4 MiB/s: the ~1 MiB of full pages take about 250 ms.
        let mut host = FakeHost::new(2 * MIB);
        let mut params = Parameters::default();
        params.set("max-bandwidth", "4M").unwrap();
        let progress = Progress::new(false);
        let t = Instant::now();
        run_outgoing(
            &mut host,
            Vec::new(),
            SaveOptions::new("none"),
            &params,
            &LiveLimits::new(&params),
            0,
            &progress,
        )
        .unwrap();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }
}
