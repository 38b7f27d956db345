//! Preallocation: fault every page of a backend in, with several threads, after the NUMA policy
//! is installed (QEMU's qemu_prealloc_mem).
//!
//! Two methods. `MADV_POPULATE_WRITE` (Linux 5.14+) asks the kernel to populate a range and
//! reports failure as an errno; it is sensed on every call by advising the first page (EINVAL
//! means the kernel lacks it). Without it, one byte per page is read and written back. A page
//! that cannot be backed (hugetlbfs out of pages, a file hole past EOF) then raises SIGBUS.
//!
//! Why the touch path is sound without sigsetjmp: Rust cannot longjmp out of a signal handler
//! over Rust frames. Instead the handler, when the fault lies in the range the *current thread*
//! is touching (a thread-local set only around the touch loop), maps an anonymous page over the
//! faulting page with MAP_FIXED (mmap is async-signal-safe) and records the address in an
//! atomic; the faulting instruction then retries and succeeds, the loop sees the flag and stops
//! with EFAULT. After the threads are joined, each replaced page of a file-backed mapping is
//! mapped back from its file, so the backend is exactly as before (a later access faults as it
//! would have without prealloc). SIGBUS outside the touched range, or on another thread, goes to
//! the previous handler; if there was none the default action is restored so the access kills
//! the process as it would have. The handler is installed under a mutex (one touch run at a
//! time) and the previous one is always reinstalled.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::sync::atomic::{compiler_fence, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

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

/// How to put back a page the SIGBUS path replaced: the mapping's file, if any.
#[derive(Clone, Copy, Debug, Default)]
pub struct Remap {
    pub fd: Option<RawFd>,
    /// File offset of the mapping's first byte.
    pub file_offset: u64,
    pub shared: bool,
    pub readonly: bool,
}

pub struct Request<'a> {
    pub addr: *mut u8,
    pub len: usize,
    pub page_size: usize,
    pub max_threads: u32,
    pub progress: Option<&'a ProgressFn>,
    pub remap: Remap,
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

/// Whether the kernel has MADV_POPULATE_*, sensed on the first page of the range.
fn populate_works(addr: *mut u8, page: usize, readonly: bool) -> bool {
    // SAFETY: advising the first page of the caller's mapping.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, page, populate_advice(readonly)) };
    rc == 0 || crate::hostmap::errno() != libc::EINVAL
}

/// Faults every page of the range in.
pub fn prealloc(req: &Request<'_>) -> Result<Outcome> {
    let page = req.page_size.max(1);
    let pages = (req.len as u64).div_ceil(page as u64);
    let total = req.len as u64;
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
        if populate_works(req.addr, page, req.remap.readonly) {
            Method::PopulateWrite
        } else {
            Method::Touch
        }
    });
    let _handler = match method {
        Method::Touch => Some(SigbusGuard::install()?),
        Method::PopulateWrite => None,
    };
    let counts = split_pages(pages, threads);
    let mut starts = Vec::with_capacity(threads);
    let mut next = 0u64;
    for c in &counts {
        starts.push(next);
        next += c;
    }
    let base = req.addr as usize;
    let len = req.len;
    let (tx, rx) = mpsc::channel::<u64>();
    let readonly = req.remap.readonly;
    let work = |first: u64, count: u64, done: &dyn Fn(u64)| {
        let start = base + (first as usize) * page;
        let end = (start + count as usize * page).min(base + len);
        run_chunk(start, end, page, method, readonly, done)
    };
    let results: Vec<ChunkResult> = if threads == 1 {
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
                let work = &work;
                let h = std::thread::Builder::new()
                    .name("touch_pages".into())
                    .spawn_scoped(s, move || {
                        // Start together, once every thread exists, so that thread creation
                        // does not contend with page faults for the mm lock.
                        if !gate.wait() {
                            return ChunkResult {
                                errno: libc::EAGAIN,
                                fault: None,
                            };
                        }
                        work(first, count, &|n| {
                            let _ = tx.send(n);
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
                .map(|h| {
                    h.join().unwrap_or(ChunkResult {
                        errno: libc::EFAULT,
                        fault: None,
                    })
                })
                .collect())
        })?
    };
    let mut failed = None;
    for r in &results {
        if let Some(at) = r.fault {
            restore_page(at, page, base, &req.remap);
        }
        if r.errno != 0 && failed.is_none() {
            failed = Some(r.errno);
        }
    }
    if let Some(errno) = failed {
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

fn report(progress: Option<&ProgressFn>, rx: &mpsc::Receiver<u64>, total: u64) {
    let mut done = 0u64;
    for n in rx.iter() {
        done += n;
        if let Some(p) = progress {
            if done < total {
                p(done, total);
            }
        }
    }
}

struct ChunkResult {
    errno: i32,
    fault: Option<usize>,
}

/// Pages per progress report (and per madvise call).
fn step_bytes(page: usize) -> usize {
    (8usize << 20).max(page).next_multiple_of(page)
}

fn run_chunk(
    start: usize,
    end: usize,
    page: usize,
    method: Method,
    readonly: bool,
    done: &dyn Fn(u64),
) -> ChunkResult {
    let step = step_bytes(page);
    let mut at = start;
    if method == Method::Touch {
        TOUCH.with(|t| {
            t.start.store(start, Ordering::Relaxed);
            t.end.store(end, Ordering::Relaxed);
            t.page.store(page, Ordering::Relaxed);
            t.fault.store(0, Ordering::Relaxed);
        });
        compiler_fence(Ordering::SeqCst);
    }
    let mut result = ChunkResult {
        errno: 0,
        fault: None,
    };
    while at < end {
        let n = step.min(end - at);
        match method {
            Method::PopulateWrite => {
                // SAFETY: [at, at+n) lies inside the caller's mapping.
                let rc =
                    unsafe { libc::madvise(at as *mut libc::c_void, n, populate_advice(readonly)) };
                if rc != 0 {
                    result.errno = crate::hostmap::errno();
                    break;
                }
            }
            Method::Touch => {
                let mut p = at;
                while p < at + n {
                    // SAFETY: p lies inside the caller's mapping (writable unless `readonly`);
                    // reading a byte and writing the same value back leaves the content
                    // unchanged. A SIGBUS here is repaired by the handler (see the module
                    // comment).
                    unsafe {
                        let v = std::ptr::read_volatile(p as *const u8);
                        if !readonly {
                            std::ptr::write_volatile(p as *mut u8, v);
                        }
                    }
                    compiler_fence(Ordering::SeqCst);
                    let fault = TOUCH.with(|t| t.fault.load(Ordering::Relaxed));
                    if fault != 0 {
                        result.errno = libc::EFAULT;
                        result.fault = Some(fault);
                        break;
                    }
                    p += page;
                }
                if result.errno != 0 {
                    break;
                }
            }
        }
        done(n as u64);
        at += n;
    }
    if method == Method::Touch {
        compiler_fence(Ordering::SeqCst);
        TOUCH.with(|t| {
            t.start.store(0, Ordering::Relaxed);
            t.end.store(0, Ordering::Relaxed);
        });
    }
    result
}

/// Puts a page that the SIGBUS handler replaced back to its file.
fn restore_page(at: usize, page: usize, base: usize, remap: &Remap) {
    let Some(fd) = remap.fd else { return };
    let prot = if remap.readonly {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_WRITE
    };
    let flags = libc::MAP_FIXED
        | if remap.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
    // SAFETY: `at` is a page of the caller's mapping that the handler replaced; mapping the
    // file back over it restores the original layout.
    unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            page,
            prot,
            flags,
            fd,
            (remap.file_offset + (at - base) as u64) as libc::off_t,
        );
    }
}

/// The range the current thread is touching, read by the SIGBUS handler. Atomics so that the
/// handler and the loop on the same thread agree without the compiler caching values.
struct TouchState {
    start: AtomicUsize,
    end: AtomicUsize,
    page: AtomicUsize,
    fault: AtomicUsize,
}

thread_local! {
    // const-initialised and without a destructor: accessing it from a signal handler is a plain
    // TLS load, with no lazy initialisation or allocation.
    static TOUCH: TouchState = const {
        TouchState {
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            page: AtomicUsize::new(0),
            fault: AtomicUsize::new(0),
        }
    };
}

/// The handler that was in place before ours, for forwarding.
struct OldAction(UnsafeCell<MaybeUninit<libc::sigaction>>);
// SAFETY: written only while HANDLER_LOCK is held and before our handler is installed; read by
// the handler only while it is installed.
unsafe impl Sync for OldAction {}
static OLD_ACTION: OldAction = OldAction(UnsafeCell::new(MaybeUninit::uninit()));
static HANDLER_LOCK: Mutex<()> = Mutex::new(());

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let mine = TOUCH.with(|t| {
        let (s, e, p) = (
            t.start.load(Ordering::Relaxed),
            t.end.load(Ordering::Relaxed),
            t.page.load(Ordering::Relaxed),
        );
        if addr >= s && addr < e && p != 0 {
            let pg = addr & !(p - 1);
            // SAFETY: replacing one page of the range this thread is preallocating; mmap is
            // async-signal-safe. The page is restored from its file after the run.
            let r = unsafe {
                libc::mmap(
                    pg as *mut libc::c_void,
                    p,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                t.fault.store(pg, Ordering::Relaxed);
                return true;
            }
        }
        false
    });
    if mine {
        return;
    }
    // SAFETY: OLD_ACTION was filled before this handler was installed (see OldAction).
    let old = unsafe { (*OLD_ACTION.0.get()).assume_init_ref() };
    if old.sa_sigaction == libc::SIG_DFL || old.sa_sigaction == libc::SIG_IGN {
        // No one else wants it: fall back to the default action, so that returning re-runs the
        // access and it ends the process as it would have without us.
        // SAFETY: a zeroed sigaction with SIG_DFL is a valid argument.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
        }
    } else if old.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO the stored handler has this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(old.sa_sigaction) };
        f(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO the stored handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(old.sa_sigaction) };
        f(sig);
    }
}

/// Our SIGBUS handler, installed for one touch run; the previous one comes back on drop.
struct SigbusGuard {
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl SigbusGuard {
    fn install() -> Result<Self> {
        let lock = HANDLER_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: zeroed sigaction structs are valid; the old action is written to our own
        // static while no handler of ours is installed (we hold the lock).
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            let old = (*OLD_ACTION.0.get()).as_mut_ptr();
            if libc::sigaction(libc::SIGBUS, &act, old) != 0 {
                return Err(BackendError::SignalHandler(PREFIX));
            }
        }
        Ok(SigbusGuard { _lock: lock })
    }
}

impl Drop for SigbusGuard {
    fn drop(&mut self) {
        // SAFETY: OLD_ACTION holds what sigaction returned at install; we still hold the lock.
        let rc = unsafe {
            libc::sigaction(
                libc::SIGBUS,
                (*OLD_ACTION.0.get()).as_ptr(),
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            // QEMU treats this as fatal; a process left with our handler would misroute SIGBUS.
            eprintln!("{PREFIX}: failed to reinstall signal handler");
            std::process::abort();
        }
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
            addr: m.as_ptr(),
            len,
            page_size: 4096,
            max_threads: 2,
            progress: Some(&cb),
            remap: Remap::default(),
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
            addr: m.as_ptr(),
            len,
            page_size: 4096,
            max_threads: 1,
            progress: Some(&cb),
            remap: Remap::default(),
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

    /// Tests that install SIGBUS handlers or use the touch method run one at a time: the
    /// handler is process-wide.
    static SIGNAL_TESTS: Mutex<()> = Mutex::new(());

    #[test]
    fn touch_method_makes_pages_resident_and_keeps_content() {
        let _serial = SIGNAL_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let len = 4 << 20;
        let m = anon(len);
        // SAFETY: writing inside the mapping.
        unsafe { m.as_ptr().add(4096 * 3).write(0x42) };
        prealloc(&Request {
            addr: m.as_ptr(),
            len,
            page_size: 4096,
            max_threads: 4,
            progress: None,
            remap: Remap::default(),
            method: Some(Method::Touch),
        })
        .unwrap();
        assert_eq!(resident_pages(m.as_ptr(), len), len / 4096);
        // SAFETY: reading inside the mapping.
        assert_eq!(unsafe { m.as_ptr().add(4096 * 3).read() }, 0x42);
    }

    extern "C" fn marker_handler(_: libc::c_int) {}

    fn current_sigbus() -> usize {
        // SAFETY: querying the current action into a zeroed struct.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old);
            old.sa_sigaction
        }
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

    #[test]
    fn sigbus_while_touching_is_an_error_and_the_old_handler_returns() {
        use std::os::fd::AsRawFd;
        let _serial = SIGNAL_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: installing a harmless handler to check it is restored.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = marker_handler as *const () as usize;
            libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut());
        }
        let (fd, p) = truncated_memfd(8, 4);
        let e = prealloc(&Request {
            addr: p,
            len: 8 * 4096,
            page_size: 4096,
            max_threads: 1,
            progress: None,
            remap: Remap {
                fd: Some(fd.as_raw_fd()),
                file_offset: 0,
                shared: true,
                readonly: false,
            },
            method: Some(Method::Touch),
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "qemu_prealloc_mem: preallocating memory failed: Bad address"
        );
        assert_eq!(current_sigbus(), marker_handler as *const () as usize);
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
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
        }
    }

    #[test]
    fn populate_write_failure_uses_qemus_words() {
        // Kernels without MADV_POPULATE_WRITE take the touch path here.
        let _serial = SIGNAL_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let (fd, p) = truncated_memfd(4, 1);
        let e = prealloc(&Request {
            addr: p,
            len: 4 * 4096,
            page_size: 4096,
            max_threads: 1,
            progress: None,
            remap: Remap::default(),
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
