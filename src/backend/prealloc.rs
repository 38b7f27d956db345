//! Preallocation: fault every page of a backend in, with several threads, after the NUMA policy
//! is installed (QEMU's qemu_prealloc_mem).
//!
//! Two methods. `MADV_POPULATE_WRITE` (Linux 5.14+) asks the kernel to populate a range and
//! reports failure as an errno; it is sensed on every call by advising the first page (EINVAL
//! means the kernel lacks it). Without it, one byte per page is read and written back. A page
//! that cannot be backed (hugetlbfs out of pages, a file hole past EOF) then raises SIGBUS.
//!
//! The touch path runs under a [`crate::guarded::Guard`]: a SIGBUS there replaces the page by a
//! stand-in, the loop stops with EFAULT, and the page is mapped back from its file (the design
//! is described in `guarded`).

use std::sync::atomic::{compiler_fence, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

use crate::guarded::{Guard, Span};

use super::{BackendError, Result};

/// Progress: (bytes done, bytes total). Called on the thread that preallocates, never
/// concurrently: first with 0, last with total on success.
pub type ProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// QEMU's MAX_MEM_PREALLOC_THREAD_COUNT.
pub const MAX_THREADS: usize = 16;
/// Below this much memory per thread, more threads cost more than they save.
pub const BYTES_PER_THREAD: u64 = 64 << 20;

const PREFIX: &str = "qemu_prealloc_mem";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    PopulateWrite,
    Touch,
}

pub struct Request<'a> {
    /// The memory to preallocate, its page size and how to repair a page of it.
    pub span: Span<'a>,
    pub max_threads: u32,
    pub progress: Option<&'a ProgressFn>,
    /// Whether the mapping is read-only (populated for reading only).
    pub readonly: bool,
    /// None: sense MADV_POPULATE_WRITE (POPULATE_READ for a read-only mapping); Some: force a
    /// method (tests).
    pub method: Option<Method>,
}

/// What a successful run did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub threads: usize,
    pub method: Method,
}

/// min(online CPUs, 16, prealloc-threads), then at most one thread per page, then at most one
/// thread per 64 MiB (but at least one).
pub fn thread_count(online_cpus: usize, max_threads: u32, pages: u64, bytes: u64) -> usize {
    let n = online_cpus
        .min(MAX_THREADS)
        .min(max_threads as usize)
        .max(1) as u64;
    let n = n.min(pages.max(1));
    n.min((bytes / BYTES_PER_THREAD).max(1)) as usize
}

/// Pages per thread: an even split, the remainder one each to the first threads.
pub fn split_pages(pages: u64, threads: usize) -> Vec<u64> {
    let t = threads as u64;
    (0..t)
        .map(|i| pages / t + u64::from(i < pages % t))
        .collect()
}

pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        1
    }
}

/// The populate advice for a mapping: a read-only mapping (rom) can only be populated for
/// reading; writable ones are populated for writing, so no later write faults.
fn populate_advice(readonly: bool) -> libc::c_int {
    if readonly {
        libc::MADV_POPULATE_READ
    } else {
        libc::MADV_POPULATE_WRITE
    }
}

/// Asks the kernel to populate `[addr, addr + len)` (`MADV_POPULATE_WRITE`, or `_READ` when
/// `readonly`): the faults an access would take, taken now, with no byte changed, so it may run
/// while other threads write the range. A page the host cannot back is an errno, not SIGBUS.
///
/// # Safety
/// `[addr, addr + len)` must lie inside one live mapping of the caller's, writable unless
/// `readonly`.
pub unsafe fn populate_range(
    addr: *mut u8,
    len: usize,
    readonly: bool,
) -> std::result::Result<(), i32> {
    // SAFETY: the range is the caller's mapping (this function's contract); populating leaves
    // its contents as they are.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, populate_advice(readonly)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(crate::hostmap::errno())
    }
}

/// Whether the kernel has MADV_POPULATE_*, sensed on the first page of the range.
fn populate_works(addr: *mut u8, page: usize, readonly: bool) -> bool {
    // SAFETY: the first page of the caller's mapping.
    match unsafe { populate_range(addr, page, readonly) } {
        Ok(()) => true,
        Err(errno) => errno != libc::EINVAL,
    }
}

/// Faults every page of the range in.
pub fn prealloc(req: &Request<'_>) -> Result<Outcome> {
    let page = req.span.page_size();
    let pages = (req.span.len() as u64).div_ceil(page as u64);
    let total = req.span.len() as u64;
    if let Some(p) = req.progress {
        p(0, total);
    }
    if pages == 0 {
        return Ok(Outcome {
            threads: 0,
            method: Method::PopulateWrite,
        });
    }
    let threads = thread_count(online_cpus(), req.max_threads, pages, total);
    let method = req.method.unwrap_or_else(|| {
        if populate_works(req.span.as_ptr(), page, req.readonly) {
            Method::PopulateWrite
        } else {
            Method::Touch
        }
    });
    let guard = match method {
        Method::Touch => Some(Guard::acquire().map_err(|_| BackendError::SignalHandler(PREFIX))?),
        Method::PopulateWrite => None,
    };
    let counts = split_pages(pages, threads);
    let mut starts = Vec::with_capacity(threads);
    let mut next = 0u64;
    for c in &counts {
        starts.push(next);
        next += c;
    }
    let len = req.span.len();
    let (tx, rx) = mpsc::channel::<u64>();
    let tally = Tally::new(total);
    let span = &req.span;
    let guard = guard.as_ref();
    let readonly = req.readonly;
    let work = |first: u64, count: u64, done: &dyn Fn(u64)| {
        let start = (first as usize) * page;
        let end = (start + count as usize * page).min(len);
        run_chunk(span, guard, start..end, readonly, done)
    };
    let results: Vec<i32> = if threads == 1 {
        drop(tx);
        // One thread: no spawning; progress is reported directly as the work goes.
        let sum = std::cell::Cell::new(0u64);
        let r = work(0, pages, &|n| {
            sum.set(sum.get() + n);
            if let Some(p) = req.progress {
                if sum.get() < total {
                    p(sum.get(), total);
                }
            }
        });
        vec![r]
    } else {
        let gate = Gate::default();
        std::thread::scope(|s| {
            let mut handles = Vec::new();
            for i in 0..threads {
                let tx = tx.clone();
                let gate = &gate;
                let (first, count) = (starts[i], counts[i]);
                let (work, tally) = (&work, &tally);
                let h = std::thread::Builder::new()
                    .name("touch_pages".into())
                    .spawn_scoped(s, move || {
                        // Start together, once every thread exists, so that thread creation
                        // does not contend with page faults for the mm lock.
                        if !gate.wait() {
                            return libc::EAGAIN;
                        }
                        work(first, count, &|n| {
                            if let Some(done) = tally.add(n) {
                                let _ = tx.send(done);
                            }
                        })
                    });
                match h {
                    Ok(h) => handles.push(h),
                    Err(_) => {
                        // Threads already spawned are waiting at the gate: send them home.
                        gate.open(false);
                        drop(handles);
                        return Err(BackendError::host(
                            format!("{PREFIX}: failed to create preallocation thread"),
                            libc::EAGAIN,
                        ));
                    }
                }
            }
            drop(tx);
            gate.open(true);
            report(req.progress, &rx, total);
            Ok(handles
                .into_iter()
                .map(|h| h.join().unwrap_or(libc::EFAULT))
                .collect())
        })?
    };
    if let Some(&errno) = results.iter().find(|&&e| e != 0) {
        return Err(BackendError::host(
            format!("{PREFIX}: preallocating memory failed"),
            errno,
        ));
    }
    if let Some(p) = req.progress {
        p(total, total);
    }
    Ok(Outcome { threads, method })
}

/// Holds workers until all exist (`open(true)`) or the run is abandoned (`open(false)`).
#[derive(Default)]
struct Gate {
    state: Mutex<Option<bool>>,
    cv: Condvar,
}

impl Gate {
    fn open(&self, go: bool) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(go);
        self.cv.notify_all();
    }

    fn wait(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(go) = *s {
                return go;
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The bytes the worker threads have preallocated, and when that is worth telling the
/// reporting thread: once per 1/[`Tally::REPORTS`] of the total. A message per 8 MiB step
/// woke that thread 1 024 times for 8 GiB, and on a host with as many cores as workers each
/// wake-up took a core from them: 4 % of a warm two-thread preallocation.
struct Tally {
    done: AtomicU64,
    slice: u64,
}

impl Tally {
    const REPORTS: u64 = 64;

    fn new(total: u64) -> Tally {
        Tally {
            done: AtomicU64::new(0),
            slice: (total / Self::REPORTS).max(1),
        }
    }

    /// Counts `n` more bytes done; the new total, when it starts a new slice.
    fn add(&self, n: u64) -> Option<u64> {
        let before = self.done.fetch_add(n, Ordering::Relaxed);
        let after = before + n;
        (after / self.slice != before / self.slice).then_some(after)
    }
}

/// Reports the totals the workers send, in the order of their size (two workers' messages
/// may arrive in either order).
fn report(progress: Option<&ProgressFn>, rx: &mpsc::Receiver<u64>, total: u64) {
    let mut done = 0u64;
    for n in rx.iter() {
        done = done.max(n);
        if let Some(p) = progress {
            if done < total {
                p(done, total);
            }
        }
    }
}

/// Bytes per madvise call (and per progress report, with one thread).
fn step_bytes(page: usize) -> usize {
    (8usize << 20).max(page).next_multiple_of(page)
}

/// Preallocates `range` (offsets in the span): 0, or the errno that stopped it.
fn run_chunk(
    span: &Span<'_>,
    guard: Option<&Guard>,
    range: std::ops::Range<usize>,
    readonly: bool,
    done: &dyn Fn(u64),
) -> i32 {
    let page = span.page_size();
    let step = step_bytes(page);
    let mut at = range.start;
    while at < range.end {
        let n = step.min(range.end - at);
        let errno = match guard {
            None => {
                let addr = span.as_ptr().wrapping_add(at);
                // SAFETY: [addr, addr+n) lies inside the span's mapping, writable unless
                // `readonly`.
                unsafe { populate_range(addr, n, readonly) }
                    .err()
                    .unwrap_or(0)
            }
            Some(guard) => {
                match guard.run(span, at, n, |watch| touch(span, at, n, readonly, watch)) {
                    Ok(()) => 0,
                    Err(_) => libc::EFAULT,
                }
            }
        };
        if errno != 0 {
            return errno;
        }
        done(n as u64);
        at += n;
    }
    0
}

/// Reads one byte of every page of `[at, at+n)` and writes it back (unless read-only), stopping
/// at the first page that faults.
fn touch(span: &Span<'_>, at: usize, n: usize, readonly: bool, watch: &crate::guarded::Watch) {
    let page = span.page_size();
    let mut p = at;
    while p < at + n {
        let addr = span.as_ptr().wrapping_add(p);
        // SAFETY: `addr` lies inside the span's mapping (writable unless `readonly`); reading a
        // byte and writing the same value back leaves the content unchanged. A SIGBUS here is
        // repaired by the guard, and the loop stops.
        unsafe {
            let v = std::ptr::read_volatile(addr as *const u8);
            if !readonly {
                std::ptr::write_volatile(addr, v);
            }
        }
        compiler_fence(Ordering::SeqCst);
        if watch.faulted() {
            return;
        }
        p += page;
    }
}

/// Number of resident pages of `[addr, addr+len)`, from mincore.
pub fn resident_pages(addr: *const u8, len: usize) -> usize {
    let page = crate::hostmap::host_page_size();
    let n = len.div_ceil(page);
    let mut vec = vec![0u8; n];
    // SAFETY: `vec` has one byte per page of the range; the range is the caller's mapping.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guarded::Remap;

    #[test]
    fn thread_count_rule() {
        const M: u64 = 1 << 20;
        // Capped by CPUs, by 16, by prealloc-threads.
        assert_eq!(thread_count(2, 8, 1 << 20, 1 << 30), 2);
        assert_eq!(thread_count(64, 64, 1 << 20, 64 << 30), 16);
        assert_eq!(thread_count(8, 3, 1 << 20, 1 << 30), 3);
        // One thread per page at most, one per 64 MiB at most, never zero.
        assert_eq!(thread_count(8, 8, 2, 4 << 30), 2);
        assert_eq!(thread_count(8, 8, 1 << 20, 128 * M), 2);
        assert_eq!(thread_count(8, 8, 1 << 20, 64 * M - 1), 1);
        assert_eq!(thread_count(8, 8, 1, 4096), 1);
        assert_eq!(thread_count(0, 8, 10, 1 << 30), 1);
    }

    #[test]
    fn pages_split_evenly_remainder_first() {
        assert_eq!(split_pages(10, 3), [4, 3, 3]);
        assert_eq!(split_pages(11, 3), [4, 4, 3]);
        assert_eq!(split_pages(9, 3), [3, 3, 3]);
        assert_eq!(split_pages(5, 1), [5]);
        assert_eq!(split_pages(10, 4).iter().sum::<u64>(), 10);
    }

    fn anon(len: usize) -> crate::hostmap::HostMapping {
        super::super::ram::alloc("t", len as u64, false, false).unwrap()
    }

    #[test]
    fn populate_write_makes_every_page_resident_and_reports_progress() {
        let len = 160 << 20;
        let m = anon(len);
        assert_eq!(resident_pages(m.as_ptr(), len), 0);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let cb: ProgressFn = Arc::new(move |d, t| s2.lock().unwrap().push((d, t)));
        let out = prealloc(&Request {
            span: Span::of(&m),
            max_threads: 2,
            progress: Some(&cb),
            readonly: false,
            method: None,
        })
        .unwrap();
        assert_eq!(out.method, Method::PopulateWrite);
        assert_eq!(
            out.threads,
            thread_count(online_cpus(), 2, (len / 4096) as u64, len as u64)
        );
        assert_eq!(resident_pages(m.as_ptr(), len), len / 4096);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.first(), Some(&(0, len as u64)));
        assert_eq!(seen.last(), Some(&(len as u64, len as u64)));
        assert!(
            seen.windows(2).all(|w| w[0].0 <= w[1].0),
            "progress goes forward"
        );
        assert!(seen.len() > 3);
    }

    #[test]
    fn workers_wake_the_reporter_once_per_slice_of_the_total_not_per_step() {
        let total = 8u64 << 30;
        let step = step_bytes(4096) as u64;
        let tally = Tally::new(total);
        let sent: Vec<u64> = (0..total / step).filter_map(|_| tally.add(step)).collect();
        assert_eq!(
            sent.len() as u64,
            Tally::REPORTS,
            "one message per 1/64 of 8 GiB"
        );
        assert_eq!(
            sent.last(),
            Some(&total),
            "the last step ends the last slice"
        );
        assert!(sent.windows(2).all(|w| w[0] < w[1]));
        // Steps larger than a slice tell every time.
        let small = Tally::new(10 * step);
        assert!((0..10).all(|_| small.add(step).is_some()));
    }

    #[test]
    fn single_thread_progress_comes_while_pages_are_faulted_in() {
        let len = 64 << 20;
        let m = Arc::new(anon(len));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s2, m2) = (seen.clone(), m.clone());
        let cb: ProgressFn = Arc::new(move |d, _| {
            s2.lock()
                .unwrap()
                .push((d, resident_pages(m2.as_ptr(), m2.len())));
        });
        prealloc(&Request {
            span: Span::of(&m),
            max_threads: 1,
            progress: Some(&cb),
            readonly: false,
            method: None,
        })
        .unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0], (0, 0), "nothing resident before the first report");
        let mid = seen[seen.len() / 2];
        assert!(mid.0 > 0 && mid.0 < len as u64, "{mid:?}");
        assert!(
            mid.1 > 0 && mid.1 < len / 4096,
            "reported while running: {mid:?}"
        );
    }

    #[test]
    fn touch_method_makes_pages_resident_and_keeps_content() {
        let len = 4 << 20;
        let m = anon(len);
        // SAFETY: writing inside the mapping.
        unsafe { m.as_ptr().add(4096 * 3).write(0x42) };
        prealloc(&Request {
            span: Span::of(&m),
            max_threads: 4,
            progress: None,
            readonly: false,
            method: Some(Method::Touch),
        })
        .unwrap();
        assert_eq!(resident_pages(m.as_ptr(), len), len / 4096);
        // SAFETY: reading inside the mapping.
        assert_eq!(unsafe { m.as_ptr().add(4096 * 3).read() }, 0x42);
    }

    /// A memfd mapping longer than its file: pages past EOF raise SIGBUS when touched.
    fn truncated_memfd(pages: usize, file_pages: usize) -> (std::os::fd::OwnedFd, *mut u8) {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: creating and sizing our own memfd, then mapping it.
        unsafe {
            let fd = libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            assert_eq!(
                libc::ftruncate(fd.as_raw_fd(), (file_pages * 4096) as i64),
                0
            );
            let p = libc::mmap(
                std::ptr::null_mut(),
                pages * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            (fd, p as *mut u8)
        }
    }

    /// (That the previous SIGBUS handler comes back is tested in tests/guarded.rs, a binary
    /// of its own: the handler is process-wide.)
    #[test]
    fn sigbus_while_touching_is_an_error_and_the_page_is_the_files_again() {
        use std::os::fd::AsRawFd;
        let (fd, p) = truncated_memfd(8, 4);
        let remap = Remap {
            fd: Some(fd.as_raw_fd()),
            file_offset: 0,
            shared: true,
            readonly: false,
        };
        // SAFETY: `p` maps 8 pages of our memfd until the munmap below.
        let span = unsafe { Span::from_raw(p, 8 * 4096, 4096, remap) };
        let e = prealloc(&Request {
            span,
            max_threads: 1,
            progress: None,
            readonly: false,
            method: Some(Method::Touch),
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "qemu_prealloc_mem: preallocating memory failed: Bad address"
        );
        // The replaced page is the file's again: growing the file makes it readable through
        // the original mapping, which an anonymous stand-in would not show.
        // SAFETY: growing our memfd and writing through the fd; then reading the mapping.
        unsafe {
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), 8 * 4096), 0);
            let b = [0x77u8];
            assert_eq!(
                libc::pwrite(fd.as_raw_fd(), b.as_ptr() as *const _, 1, 4 * 4096),
                1
            );
            assert_eq!(p.add(4 * 4096).read_volatile(), 0x77);
            libc::munmap(p as *mut libc::c_void, 8 * 4096);
        }
    }

    #[test]
    fn populate_write_failure_uses_qemus_words() {
        // Kernels without MADV_POPULATE_WRITE take the touch path here.
        let (fd, p) = truncated_memfd(4, 1);
        // SAFETY: `p` maps 4 pages of our memfd until the munmap below.
        let span = unsafe { Span::from_raw(p, 4 * 4096, 4096, Remap::default()) };
        let e = prealloc(&Request {
            span,
            max_threads: 1,
            progress: None,
            readonly: false,
            method: None,
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("qemu_prealloc_mem: preallocating memory failed: "),
            "{}",
            e.to_string()
        );
        // SAFETY: unmapping the test mapping.
        unsafe { libc::munmap(p as *mut libc::c_void, 4 * 4096) };
        drop(fd);
    }
}
