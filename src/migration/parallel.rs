//! Page writers for a parallel load: threads that copy RAM pages, handed over by the thread
//! parsing the stream, into guest RAM, so that the first-touch faults of a fresh destination
//! (the kernel zeroing each page it allocates) and the copies happen on several cores.
//!
//! Pages are spread over the writers by address, in 2 MiB stretches (a huge page is faulted
//! by one thread), hashed so that a stream alternating zero and data stretches still splits
//! evenly. Every record for one address goes to the same writer, which applies its records in
//! stream order: a page sent twice (live migration's dirty rounds) ends with the later
//! content, and so does a ZERO record after a PAGE record, as when one thread loads.
//!
//! A writer that fails (a page the host cannot back, an offset outside the block) keeps the
//! error with the stream offset of its record and skips the rest of its work; the parser
//! notices at its next hand-over and stops. [`PageWriters::sync`] waits until every writer has
//! applied everything handed to it and returns the error of the earliest failing record: the
//! error a single-threaded load would have stopped at, since every record handed over lies
//! before anything the parser has yet to read.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::chunked::SharedBytes;
use super::error::MigrationError;
use crate::error::Error;

/// A RAM load target's page writes (those of `ram::RamLoadTarget`), from any thread: what the
/// writers write through. The loader sends every record for one page through the same thread,
/// in stream order; records for different pages may be applied in any order and at once.
pub trait SharedRamTarget: Send + Sync {
    /// As `RamLoadTarget::write_page`.
    fn write_page(&self, handle: usize, offset: u64, data: &[u8]) -> Result<(), Error>;
    /// As `RamLoadTarget::zero_page`.
    fn zero_page(&self, handle: usize, offset: u64) -> Result<(), Error>;
}

/// Records per hand-over.
const BATCH: usize = 512;
/// Batches queued per writer before the parser waits for it.
const QUEUE: usize = 4;
/// Chunks of the stream a batch may keep alive before it is handed over anyway (a writer that
/// gets few pages must not pin the whole read-ahead).
const PINNED: usize = 8;

/// One record for a writer.
pub enum PageJob {
    /// Copy `data` (one page) to `offset` of block `handle`.
    Page {
        handle: usize,
        offset: u64,
        data: SharedBytes,
        /// Stream offset of the record, to order failures.
        at: u64,
    },
    /// Make the page at `offset` zero.
    Zero { handle: usize, offset: u64, at: u64 },
}

enum Message {
    Batch(Vec<PageJob>),
    /// Reply on the done channel once everything before has been applied.
    Sync,
}

struct Writer {
    tx: SyncSender<Message>,
    thread: Option<JoinHandle<()>>,
    batch: Vec<PageJob>,
    /// Distinct chunks the batch's pages lie in.
    pinned: usize,
}

/// What the writers share with the parser.
#[derive(Default)]
struct Shared {
    failed: AtomicBool,
    /// The earliest failing record's stream offset and error.
    failure: Mutex<Option<(u64, MigrationError)>>,
    /// Writers that applied at least one record.
    ran: AtomicUsize,
}

impl Shared {
    fn record(&self, at: u64, e: MigrationError) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.as_ref().is_none_or(|(first, _)| at < *first) {
            *f = Some((at, e));
        }
        self.failed.store(true, Ordering::Release);
    }
}

/// The writer threads of one load.
pub struct PageWriters {
    writers: Vec<Writer>,
    done: Receiver<()>,
    spare: Receiver<Vec<PageJob>>,
    shared: Arc<Shared>,
}

fn lost_writer() -> MigrationError {
    MigrationError::Usage("a RAM page writer thread ended unexpectedly".into())
}

impl PageWriters {
    /// Starts `threads` writers over `target`; `None` if no thread could be started (the
    /// loader then writes every page itself).
    pub fn spawn(target: Arc<dyn SharedRamTarget>, threads: usize) -> Option<PageWriters> {
        let shared = Arc::new(Shared::default());
        let (done_tx, done) = channel();
        let (spare_tx, spare) = channel();
        let mut writers = Vec::new();
        for i in 0..threads {
            let (tx, rx) = sync_channel(QUEUE);
            let (target, shared, done_tx, spare_tx) = (
                target.clone(),
                shared.clone(),
                done_tx.clone(),
                spare_tx.clone(),
            );
            let thread = std::thread::Builder::new()
                .name(format!("hm-load-{i}"))
                .spawn(move || work(&*target, rx, &done_tx, &spare_tx, &shared));
            match thread {
                Ok(t) => writers.push(Writer {
                    tx,
                    thread: Some(t),
                    batch: Vec::with_capacity(BATCH),
                    pinned: 0,
                }),
                Err(_) => break,
            }
        }
        if writers.is_empty() {
            return None;
        }
        Some(PageWriters {
            writers,
            done,
            spare,
            shared,
        })
    }

    /// How many writers run.
    pub fn threads(&self) -> usize {
        self.writers.len()
    }

    /// Writers that have applied at least one record so far.
    pub fn threads_that_ran(&self) -> usize {
        self.shared.ran.load(Ordering::Acquire)
    }

    /// The writer of the page at `offset` of block `handle`.
    fn writer_for(&self, handle: usize, offset: u64) -> usize {
        let stretch = (offset >> 21) ^ ((handle as u64) << 43);
        let h = stretch.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        (h % self.writers.len() as u64) as usize
    }

    /// Queues one record. An `Err` means a writer has failed: stop parsing and [`Self::sync`],
    /// which gives the error to report.
    pub fn push(&mut self, job: PageJob) -> Result<(), MigrationError> {
        let (handle, offset) = match &job {
            PageJob::Page { handle, offset, .. } | PageJob::Zero { handle, offset, .. } => {
                (*handle, *offset)
            }
        };
        let i = self.writer_for(handle, offset);
        let w = &mut self.writers[i];
        if let PageJob::Page { data, .. } = &job {
            let last = w.batch.iter().rev().find_map(|j| match j {
                PageJob::Page { data, .. } => Some(data),
                PageJob::Zero { .. } => None,
            });
            if last.is_none_or(|l| !l.same_chunk(data)) {
                w.pinned += 1;
            }
        }
        w.batch.push(job);
        if w.batch.len() >= BATCH || w.pinned >= PINNED {
            self.hand_over(i)?;
        }
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(lost_writer());
        }
        Ok(())
    }

    fn hand_over(&mut self, i: usize) -> Result<(), MigrationError> {
        let fresh = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BATCH));
        let w = &mut self.writers[i];
        w.pinned = 0;
        let batch = std::mem::replace(&mut w.batch, fresh);
        w.tx.send(Message::Batch(batch)).map_err(|_| lost_writer())
    }

    /// Waits until every record handed over has been applied; the earliest failure, if any.
    pub fn sync(&mut self) -> Result<(), MigrationError> {
        let mut lost = false;
        for i in 0..self.writers.len() {
            if !self.writers[i].batch.is_empty() {
                lost |= self.hand_over(i).is_err();
            }
        }
        let mut waiting = 0;
        for w in &self.writers {
            match w.tx.send(Message::Sync) {
                Ok(()) => waiting += 1,
                Err(_) => lost = true,
            }
        }
        for _ in 0..waiting {
            if self.done.recv().is_err() {
                lost = true;
                break;
            }
        }
        let failure = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.shared.failed.store(false, Ordering::Release);
        match failure {
            Some((_, e)) => Err(e),
            None if lost => Err(lost_writer()),
            None => Ok(()),
        }
    }
}

impl Drop for PageWriters {
    fn drop(&mut self) {
        let threads: Vec<_> = self
            .writers
            .drain(..)
            .filter_map(|mut w| w.thread.take())
            .collect();
        // The senders went with the writers: each thread's loop ends.
        for t in threads {
            let _ = t.join();
        }
    }
}

fn work(
    target: &dyn SharedRamTarget,
    rx: Receiver<Message>,
    done: &Sender<()>,
    spare: &Sender<Vec<PageJob>>,
    shared: &Shared,
) {
    let mut ran = false;
    let mut failed = false;
    for message in rx {
        match message {
            Message::Batch(mut jobs) => {
                if !ran {
                    ran = true;
                    shared.ran.fetch_add(1, Ordering::AcqRel);
                }
                for job in jobs.drain(..) {
                    if failed {
                        continue;
                    }
                    let (at, result) = match job {
                        PageJob::Page {
                            handle,
                            offset,
                            data,
                            at,
                        } => (at, target.write_page(handle, offset, data.bytes())),
                        PageJob::Zero { handle, offset, at } => {
                            (at, target.zero_page(handle, offset))
                        }
                    };
                    if let Err(e) = result {
                        failed = true;
                        shared.record(at, e.into());
                    }
                }
                let _ = spare.send(jobs);
            }
            Message::Sync => {
                failed = false;
                let _ = done.send(());
            }
        }
    }
}
