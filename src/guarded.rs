//! Host accesses to guest RAM that survive SIGBUS.
//!
//! A page of guest RAM the host cannot back (a file on a full tmpfs, a file truncated under its
//! mapping, an exhausted hugetlb pool, a hardware memory error) raises SIGBUS when touched.
//! Every read or write hostmem makes through a host pointer into guest RAM goes through a
//! [`Guard`], so such a page becomes a [`Fault`] naming the offset and the cause, and the
//! process keeps running.
//!
//! Why this is sound without sigsetjmp: Rust cannot longjmp out of a signal handler over Rust
//! frames. Instead, while a thread runs a guarded access it publishes the range it touches in
//! a thread-local. The handler, when the fault lies in that range and it is the first fault of
//! the access, maps an anonymous page over the faulting page with MAP_FIXED (mmap is
//! async-signal-safe) and records the address; the faulting instruction then retries and
//! succeeds on the stand-in page, and the access sees the record once it returns. A file-backed
//! page is then mapped back from its file, so the mapping is as it was (a later access faults
//! as it would have). The helpers ([`Guard::read`], [`Guard::write`], [`Guard::fill`]) run one
//! host page per guarded step, so one access faults at most once; a caller of [`Guard::run`]
//! stops at the first fault ([`Watch::faulted`]).
//!
//! A SIGBUS outside the current thread's guarded range, or a second one in the same access,
//! goes to the handler that was installed before ours; if there was none the default action is
//! restored so that the access ends the process as it would have without hostmem. The handler
//! is installed when the first [`Guard`] is taken and the previous one is put back when the last
//! goes, under one mutex.

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::sync::atomic::{compiler_fence, AtomicI32, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::hostmap::HostMapping;

/// How to put back a page the handler replaced: the mapping's file, if any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Remap {
    pub fd: Option<RawFd>,
    /// File offset of the mapping's first byte.
    pub file_offset: u64,
    pub shared: bool,
    pub readonly: bool,
}

/// A live mapping of guest RAM that guarded accesses may touch: where it is, its page size
/// and how to repair a page of it.
#[derive(Clone, Copy, Debug)]
pub struct Span<'a> {
    base: usize,
    len: usize,
    page: usize,
    remap: Remap,
    _mapping: PhantomData<&'a HostMapping>,
}

impl<'a> Span<'a> {
    /// The whole of `mapping`, for as long as it is borrowed.
    pub fn of(mapping: &'a HostMapping) -> Span<'a> {
        Span {
            base: mapping.as_ptr() as usize,
            len: mapping.len(),
            page: mapping.page_size().max(1),
            remap: Remap {
                fd: mapping.fd(),
                file_offset: mapping.file_offset(),
                shared: mapping.is_shared(),
                readonly: mapping.is_readonly(),
            },
            _mapping: PhantomData,
        }
    }

    /// A span over memory hostmem does not hold as a [`HostMapping`].
    ///
    /// # Safety
    /// `base..base+len` must stay mapped for `'a`, with pages of `page` bytes (a power of two)
    /// starting at `base`, and `remap` must describe how it was mapped.
    pub unsafe fn from_raw(base: *mut u8, len: usize, page: usize, remap: Remap) -> Span<'a> {
        Span {
            base: base as usize,
            len,
            page: page.max(1),
            remap,
            _mapping: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn page_size(&self) -> usize {
        self.page
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }
}

/// SIGBUS's `si_code` values (asm-generic/siginfo.h), which libc does not export.
const BUS_ADRALN: i32 = 1;
const BUS_ADRERR: i32 = 2;
const BUS_OBJERR: i32 = 3;
const BUS_MCEERR_AR: i32 = 4;
const BUS_MCEERR_AO: i32 = 5;

/// A page the host could not back, met by a guarded access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Offset in the span of the first byte of the faulting page.
    pub offset: u64,
    /// SIGBUS's `si_code`.
    pub code: i32,
}

impl Fault {
    /// What the kernel's code means for guest RAM.
    pub fn cause(&self) -> &'static str {
        match self.code {
            BUS_ADRERR => {
                "the host could not back the page (a full file system, a file shorter than \
                 its mapping, or no free huge page)"
            }
            BUS_MCEERR_AR | BUS_MCEERR_AO => "the host reported a hardware memory error",
            BUS_ADRALN => "misaligned access",
            BUS_OBJERR => "the backing object reported an error",
            _ => "the host could not access the page",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SIGBUS: {}", self.cause())
    }
}

/// Why a guarded access did not happen, or did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    Fault(Fault),
    #[error("0x{len:x} bytes at offset 0x{at:x} are outside a mapping of 0x{span:x} bytes")]
    OutOfRange { at: usize, len: usize, span: usize },
}

impl AccessError {
    /// The offset in the span the error is about: the faulting page, or the access asked for.
    pub fn offset(&self) -> u64 {
        match *self {
            AccessError::Fault(f) => f.offset,
            AccessError::OutOfRange { at, .. } => at as u64,
        }
    }
}

/// The SIGBUS handler could not be installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("failed to install signal handler for guest memory access")]
pub struct HandlerError;

/// The range the current thread is accessing, read by the handler; atomics so that the handler
/// and the access on the same thread agree without the compiler caching values.
struct Watched {
    start: AtomicUsize,
    end: AtomicUsize,
    page: AtomicUsize,
    fault: AtomicUsize,
    code: AtomicI32,
}

thread_local! {
    // const-initialised and without a destructor: accessing it from a signal handler is a plain
    // TLS load, with no lazy initialisation or allocation.
    static WATCHED: Watched = const {
        Watched {
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            page: AtomicUsize::new(0),
            fault: AtomicUsize::new(0),
            code: AtomicI32::new(0),
        }
    };
}

/// What an access run by [`Guard::run`] may ask while it runs.
pub struct Watch(());

impl Watch {
    /// Whether a page of the range has faulted (and been replaced by a stand-in); the access
    /// must stop touching the range once it has.
    pub fn faulted(&self) -> bool {
        compiler_fence(Ordering::SeqCst);
        WATCHED.with(|w| w.fault.load(Ordering::Relaxed)) != 0
    }
}

/// The handler that was in place before ours, for forwarding.
struct OldAction(UnsafeCell<MaybeUninit<libc::sigaction>>);
// SAFETY: written only under HOLDERS' lock while no handler of ours is installed (a handler of
// ours running on another thread at that moment reads the same bytes sigaction is about to
// store again: the action it put back when the previous holder let go); read by the handler
// only while it is installed.
unsafe impl Sync for OldAction {}
static OLD_ACTION: OldAction = OldAction(UnsafeCell::new(MaybeUninit::uninit()));
/// How many [`Guard`]s exist: the first installs the handler, the last restores the old one.
static HOLDERS: Mutex<usize> = Mutex::new(0);

/// While one exists, SIGBUS on a guarded access is repaired instead of ending the process.
/// Cheap to hold for as long as accesses go on (a migration holds one throughout); taking the
/// first and dropping the last cost one `sigaction` each.
#[derive(Debug)]
pub struct Guard(());

impl Guard {
    pub fn acquire() -> Result<Guard, HandlerError> {
        let mut holders = HOLDERS.lock().unwrap_or_else(|p| p.into_inner());
        if *holders == 0 {
            // SAFETY: zeroed sigaction structs are valid; the old action goes to our static
            // while no handler of ours is installed (we hold the lock, see OldAction).
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_sigbus as *const () as usize;
                act.sa_flags = libc::SA_SIGINFO;
                libc::sigemptyset(&mut act.sa_mask);
                let old = (*OLD_ACTION.0.get()).as_mut_ptr();
                if libc::sigaction(libc::SIGBUS, &act, old) != 0 {
                    return Err(HandlerError);
                }
            }
        }
        *holders += 1;
        Ok(Guard(()))
    }

    /// Runs `access`, which touches `[at, at+len)` of `span` and nothing else of it, with a
    /// SIGBUS there repaired. `access` must stop touching the range once
    /// [`Watch::faulted`] says so; its result is dropped when a page faulted.
    pub fn run<R>(
        &self,
        span: &Span<'_>,
        at: usize,
        len: usize,
        access: impl FnOnce(&Watch) -> R,
    ) -> Result<R, AccessError> {
        let end =
            at.checked_add(len)
                .filter(|&e| e <= span.len)
                .ok_or(AccessError::OutOfRange {
                    at,
                    len,
                    span: span.len,
                })?;
        let saved = WATCHED.with(|w| {
            let saved = (
                w.start.load(Ordering::Relaxed),
                w.end.load(Ordering::Relaxed),
                w.page.load(Ordering::Relaxed),
                w.fault.load(Ordering::Relaxed),
                w.code.load(Ordering::Relaxed),
            );
            w.fault.store(0, Ordering::Relaxed);
            w.page.store(span.page, Ordering::Relaxed);
            w.start.store(span.base + at, Ordering::Relaxed);
            w.end.store(span.base + end, Ordering::Relaxed);
            saved
        });
        compiler_fence(Ordering::SeqCst);
        let r = access(&Watch(()));
        compiler_fence(Ordering::SeqCst);
        let (fault, code) = WATCHED.with(|w| {
            let found = (
                w.fault.load(Ordering::Relaxed),
                w.code.load(Ordering::Relaxed),
            );
            w.start.store(saved.0, Ordering::Relaxed);
            w.end.store(saved.1, Ordering::Relaxed);
            w.page.store(saved.2, Ordering::Relaxed);
            w.fault.store(saved.3, Ordering::Relaxed);
            w.code.store(saved.4, Ordering::Relaxed);
            found
        });
        compiler_fence(Ordering::SeqCst);
        if fault == 0 {
            return Ok(r);
        }
        restore_page(fault, span);
        Err(AccessError::Fault(Fault {
            offset: (fault - span.base) as u64,
            code,
        }))
    }

    /// Copies `buf.len()` bytes at `at` of `span` into `buf`, with volatile reads (a running
    /// guest may write them meanwhile: the copy is some snapshot of them).
    pub fn read(&self, span: &Span<'_>, at: usize, buf: &mut [u8]) -> Result<(), AccessError> {
        let mut done = 0;
        for (piece_at, n) in pieces(span, at, buf.len())? {
            let dst = &mut buf[done..done + n];
            self.run(span, piece_at, n, |_| {
                // SAFETY: `piece_at..piece_at+n` lies inside the span (checked by `pieces`),
                // which its borrow keeps mapped; a volatile read of bytes another thread may
                // change yields some value of them; a SIGBUS is repaired (module comment).
                unsafe { copy_volatile((span.base + piece_at) as *const u8, dst) }
            })?;
            done += n;
        }
        Ok(())
    }

    /// Copies `data` to `at` of `span`.
    pub fn write(&self, span: &Span<'_>, at: usize, data: &[u8]) -> Result<(), AccessError> {
        let mut done = 0;
        for (piece_at, n) in pieces(span, at, data.len())? {
            let src = &data[done..done + n];
            self.run(span, piece_at, n, |_| {
                // SAFETY: `piece_at..piece_at+n` lies inside the span (checked by `pieces`),
                // kept mapped by its borrow; `data` is the caller's own buffer, not guest RAM;
                // a SIGBUS is repaired (module comment).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        (span.base + piece_at) as *mut u8,
                        n,
                    )
                }
            })?;
            done += n;
        }
        Ok(())
    }

    /// Tests `zero.len()` consecutive pieces of `piece` bytes from `at` of `span` for zero
    /// bytes, in place: `zero[i]` says whether piece `i` is all zero. One guarded access for
    /// the whole range (the per-access bookkeeping would cost as much as testing a page), which
    /// stops at the first piece that faulted; a fault is the error, as for [`Self::read`].
    pub fn zero_test(
        &self,
        span: &Span<'_>,
        at: usize,
        piece: usize,
        zero: &mut [bool],
    ) -> Result<(), AccessError> {
        let len = piece
            .checked_mul(zero.len())
            .ok_or(AccessError::OutOfRange {
                at,
                len: usize::MAX,
                span: span.len,
            })?;
        self.run(span, at, len, |watch| {
            for (i, z) in zero.iter_mut().enumerate() {
                // SAFETY: piece `i` lies inside `at..at+len`, inside the span (checked by
                // `pieces`), which its borrow keeps mapped; the reads are volatile, so bytes a
                // vCPU writes meanwhile give some value of them; a SIGBUS is repaired (module
                // comment) and ends the loop below.
                *z = unsafe { is_zero_volatile((span.base + at + i * piece) as *const u8, piece) };
                if watch.faulted() {
                    break;
                }
            }
        })
    }

    /// Sets `len` bytes at `at` of `span` to `value`.
    pub fn fill(
        &self,
        span: &Span<'_>,
        at: usize,
        len: usize,
        value: u8,
    ) -> Result<(), AccessError> {
        for (piece_at, n) in pieces(span, at, len)? {
            self.run(span, piece_at, n, |_| {
                // SAFETY: `piece_at..piece_at+n` lies inside the span (checked by `pieces`),
                // kept mapped by its borrow; a SIGBUS is repaired (module comment).
                unsafe { std::ptr::write_bytes((span.base + piece_at) as *mut u8, value, n) }
            })?;
        }
        Ok(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut holders = HOLDERS.lock().unwrap_or_else(|p| p.into_inner());
        *holders -= 1;
        if *holders > 0 {
            return;
        }
        // SAFETY: OLD_ACTION holds what sigaction returned when the first holder installed our
        // handler; we hold the lock.
        let rc = unsafe {
            libc::sigaction(
                libc::SIGBUS,
                (*OLD_ACTION.0.get()).as_ptr(),
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            // A process left with our handler would misroute SIGBUS; QEMU treats this as fatal.
            eprintln!("failed to reinstall signal handler for guest memory access");
            std::process::abort();
        }
    }
}

/// `[at, at+len)` of `span` cut at its page boundaries: (offset, length) pieces, each inside
/// one page, so that a guarded step faults at most once.
fn pieces(
    span: &Span<'_>,
    at: usize,
    len: usize,
) -> Result<impl Iterator<Item = (usize, usize)>, AccessError> {
    let end = at
        .checked_add(len)
        .filter(|&e| e <= span.len)
        .ok_or(AccessError::OutOfRange {
            at,
            len,
            span: span.len,
        })?;
    let (base, page) = (span.base, span.page);
    let mut p = at;
    Ok(std::iter::from_fn(move || {
        if p >= end {
            return None;
        }
        // Pages are aligned in the address space (a span starts on one).
        let page_end = ((base + p) / page + 1) * page - base;
        let n = page_end.min(end) - p;
        let piece = (p, n);
        p += n;
        Some(piece)
    }))
}

/// Volatile copy, a word at a time where both ends allow it.
///
/// # Safety
/// `src..src+dst.len()` must be readable.
unsafe fn copy_volatile(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    let mut i = 0;
    if (src as usize).is_multiple_of(8) {
        while i + 8 <= n {
            // SAFETY: inside the caller's range, 8-aligned.
            let w = unsafe { std::ptr::read_volatile(src.add(i) as *const u64) };
            dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
            i += 8;
        }
    }
    while i < n {
        // SAFETY: inside the caller's range.
        dst[i] = unsafe { std::ptr::read_volatile(src.add(i)) };
        i += 1;
    }
}

/// Whether `len` bytes at `p` are all zero, read with volatile loads (guest RAM a vCPU may be
/// writing). The first 8 bytes are tested alone (most non-zero pages differ there), then
/// 256-byte stretches are OR-folded, 16 bytes per load on x86-64.
///
/// # Safety
/// `p..p+len` must be mapped and readable.
unsafe fn is_zero_volatile(p: *const u8, len: usize) -> bool {
    const STRETCH: usize = 256;
    let aligned = (p as usize).is_multiple_of(16) && len.is_multiple_of(STRETCH);
    if !aligned {
        // SAFETY: the caller's range.
        return (0..len).all(|i| unsafe { std::ptr::read_volatile(p.add(i)) } == 0);
    }
    // SAFETY: 16-aligned and inside the caller's range.
    if unsafe { std::ptr::read_volatile(p as *const u64) } != 0 {
        return false;
    }
    let mut at = 0;
    while at < len {
        // SAFETY: `at..at+STRETCH` is inside the caller's range, 16-aligned.
        if unsafe { !stretch_is_zero(p.add(at)) } {
            return false;
        }
        at += STRETCH;
    }
    true
}

/// One 256-byte stretch, 16-aligned.
///
/// # Safety
/// `p..p+256` must be mapped and readable, `p` 16-aligned.
#[cfg(target_arch = "x86_64")]
unsafe fn stretch_is_zero(p: *const u8) -> bool {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_movemask_epi8, _mm_or_si128, _mm_setzero_si128,
    };
    let v = p as *const __m128i;
    // SAFETY: SSE2 is part of the x86-64 baseline; the 16 loads are inside the caller's
    // 16-aligned range.
    unsafe {
        let mut acc = std::ptr::read_volatile(v);
        for i in 1..16 {
            acc = _mm_or_si128(acc, std::ptr::read_volatile(v.add(i)));
        }
        _mm_movemask_epi8(_mm_cmpeq_epi8(acc, _mm_setzero_si128())) == 0xffff
    }
}

/// One 256-byte stretch, 8 bytes per load.
///
/// # Safety
/// `p..p+256` must be mapped and readable, `p` 16-aligned.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn stretch_is_zero(p: *const u8) -> bool {
    let v = p as *const u64;
    // SAFETY: the 32 loads are inside the caller's aligned range.
    (0..32).fold(0u64, |acc, i| {
        acc | unsafe { std::ptr::read_volatile(v.add(i)) }
    }) == 0
}

/// Maps the file back over a page the handler replaced; an anonymous mapping keeps the
/// stand-in (it had nothing the host could give).
fn restore_page(page_addr: usize, span: &Span<'_>) {
    let Some(fd) = span.remap.fd else { return };
    let prot = if span.remap.readonly {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_WRITE
    };
    let flags = libc::MAP_FIXED
        | if span.remap.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
    let offset = span.remap.file_offset + (page_addr - span.base) as u64;
    let len = span.page.min(span.base + span.len - page_addr);
    // SAFETY: `page_addr` is a page of the span that the handler replaced; mapping the file
    // back over it restores the mapping's original layout.
    unsafe {
        libc::mmap(
            page_addr as *mut libc::c_void,
            len,
            prot,
            flags,
            fd,
            offset as libc::off_t,
        );
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    let repaired = WATCHED.with(|w| {
        let (s, e, p) = (
            w.start.load(Ordering::Relaxed),
            w.end.load(Ordering::Relaxed),
            w.page.load(Ordering::Relaxed),
        );
        if addr < s || addr >= e || p == 0 || w.fault.load(Ordering::Relaxed) != 0 {
            return false;
        }
        let page = addr & !(p - 1);
        // SAFETY: replacing one page of the range this thread is accessing; mmap is
        // async-signal-safe. The page is mapped back from its file once the access returns.
        let r = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                p,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return false;
        }
        w.code.store(code, Ordering::Relaxed);
        w.fault.store(page, Ordering::Relaxed);
        true
    });
    if repaired {
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
            // A SIGBUS sent by kill() re-runs nothing: deliver it again (pending until this
            // handler returns) so that the default action still happens.
            if code <= 0 {
                libc::raise(libc::SIGBUS);
            }
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
