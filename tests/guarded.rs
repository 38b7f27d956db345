//! Guarded guest-RAM access: a page the host cannot back becomes an error naming its offset and
//! the cause, the page is its file's again afterwards, and the SIGBUS handler that was there
//! before comes back. A binary of its own, one test at a time (`SERIAL`): the handler is
//! process-wide, and these tests install handlers of their own to watch it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use hostmem::guarded::{AccessError, Guard, Remap, Span};

static SERIAL: Mutex<()> = Mutex::new(());

const PAGE: usize = 4096;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A shared memfd mapping of `pages` pages over a file of `file_pages`: the pages past the end
/// of the file raise SIGBUS (BUS_ADRERR) when touched, as a full tmpfs does.
struct Truncated {
    fd: OwnedFd,
    addr: *mut u8,
    len: usize,
    page: usize,
}

impl Truncated {
    fn new(pages: usize, file_pages: usize) -> Truncated {
        Self::with_page(pages, file_pages, PAGE, 0)
    }

    fn with_page(pages: usize, file_pages: usize, page: usize, extra: libc::c_uint) -> Truncated {
        // SAFETY: creating, sizing and mapping our own memfd.
        unsafe {
            let fd = libc::memfd_create(c"guarded".as_ptr(), libc::MFD_CLOEXEC | extra);
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            let len = pages * page;
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as libc::off_t), 0);
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            // Shrunk under the mapping (hugetlbfs would otherwise grow the file to it).
            assert_eq!(
                libc::ftruncate(fd.as_raw_fd(), (file_pages * page) as libc::off_t),
                0
            );
            Truncated {
                fd,
                addr: p as *mut u8,
                len,
                page,
            }
        }
    }

    fn span(&self) -> Span<'_> {
        let remap = Remap {
            fd: Some(self.fd.as_raw_fd()),
            file_offset: 0,
            shared: true,
            readonly: false,
        };
        // SAFETY: the mapping lives as long as `self`, which the span borrows.
        unsafe { Span::from_raw(self.addr, self.len, self.page, remap) }
    }

    fn grow(&self) {
        // SAFETY: our memfd.
        let rc = unsafe { libc::ftruncate(self.fd.as_raw_fd(), self.len as libc::off_t) };
        assert_eq!(rc, 0);
    }

    /// The file's byte at `offset`, read through the fd.
    fn file_byte(&self, offset: usize) -> u8 {
        let mut b = [0u8; 1];
        // SAFETY: a one-byte buffer of ours.
        let n = unsafe {
            libc::pread(
                self.fd.as_raw_fd(),
                b.as_mut_ptr() as *mut _,
                1,
                offset as i64,
            )
        };
        assert_eq!(n, 1);
        b[0]
    }

    /// Grows the file over the whole mapping and writes `byte` at `offset` through the fd.
    fn grow_and_put(&self, offset: usize, byte: u8) {
        // SAFETY: our memfd; a one-byte buffer.
        unsafe {
            assert_eq!(
                libc::ftruncate(self.fd.as_raw_fd(), self.len as libc::off_t),
                0
            );
            let b = [byte];
            assert_eq!(
                libc::pwrite(
                    self.fd.as_raw_fd(),
                    b.as_ptr() as *const _,
                    1,
                    offset as i64
                ),
                1
            );
        }
    }

    fn byte(&self, offset: usize) -> u8 {
        assert!(offset < self.len);
        // SAFETY: inside the mapping; the caller made the page readable.
        unsafe { self.addr.add(offset).read_volatile() }
    }
}

impl Drop for Truncated {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

fn fault_offset(e: AccessError) -> u64 {
    match e {
        AccessError::Fault(f) => f.offset,
        other => panic!("expected a fault, got {other:?}"),
    }
}

#[test]
fn a_read_past_the_backing_is_an_error_at_the_first_page_that_faults() {
    let _s = serial();
    let t = Truncated::new(8, 3);
    let g = Guard::acquire().unwrap();
    // The backed part reads as the file holds it.
    // SAFETY: writing through the mapping inside the file.
    unsafe { t.addr.add(2 * PAGE + 5).write_volatile(0xab) };
    let mut buf = vec![0u8; 3 * PAGE];
    g.read(&t.span(), 0, &mut buf).unwrap();
    assert_eq!(buf[2 * PAGE + 5], 0xab);

    let mut buf = vec![0u8; 4 * PAGE];
    let e = g.read(&t.span(), 2 * PAGE, &mut buf).unwrap_err();
    assert_eq!(fault_offset(e), 3 * PAGE as u64);
    let AccessError::Fault(f) = e else {
        unreachable!()
    };
    assert_eq!(f.code, 2, "BUS_ADRERR");
    assert_eq!(
        e.to_string(),
        "SIGBUS: the host could not back the page (a full file system, a file shorter than its \
         mapping, or no free huge page)"
    );
    assert_eq!(buf[5], 0xab, "the bytes before the fault were copied");
    // The faulting page is the file's again: once the file grows, it shows the file's bytes.
    t.grow_and_put(3 * PAGE + 1, 0x5c);
    assert_eq!(t.byte(3 * PAGE + 1), 0x5c);
}

#[test]
fn writes_and_fills_past_the_backing_fail_and_leave_the_mapping_as_it_was() {
    let _s = serial();
    let t = Truncated::new(6, 2);
    let g = Guard::acquire().unwrap();
    let data = vec![0x11u8; 3 * PAGE];
    let e = g.write(&t.span(), PAGE / 2, &data).unwrap_err();
    assert_eq!(fault_offset(e), 2 * PAGE as u64);
    assert_eq!(t.byte(PAGE / 2), 0x11, "the backed part was written");
    let e = g.fill(&t.span(), 4 * PAGE, 2 * PAGE, 0).unwrap_err();
    assert_eq!(fault_offset(e), 4 * PAGE as u64);
    // What the stand-in pages got is gone: the file's pages show through again.
    t.grow_and_put(2 * PAGE, 0x22);
    t.grow_and_put(4 * PAGE + 7, 0x44);
    assert_eq!(t.byte(2 * PAGE), 0x22);
    assert_eq!(
        t.byte(2 * PAGE + 1),
        0,
        "the write did not reach the file past its end"
    );
    assert_eq!(t.byte(4 * PAGE + 7), 0x44);
}

#[test]
fn accesses_outside_the_span_are_refused_before_touching_anything() {
    let _s = serial();
    let t = Truncated::new(2, 2);
    let g = Guard::acquire().unwrap();
    let mut buf = [0u8; 16];
    let e = g.read(&t.span(), 2 * PAGE - 8, &mut buf).unwrap_err();
    assert_eq!(
        e,
        AccessError::OutOfRange {
            at: 2 * PAGE - 8,
            len: 16,
            span: 2 * PAGE
        }
    );
    assert_eq!(
        e.to_string(),
        "0x10 bytes at offset 0x1ff8 are outside a mapping of 0x2000 bytes"
    );
    let e = g.fill(&t.span(), usize::MAX, 2, 0).unwrap_err();
    assert!(matches!(e, AccessError::OutOfRange { .. }), "{e:?}");
}

static MARKER_CALLS: AtomicUsize = AtomicUsize::new(0);

/// A VMM's own SIGBUS handler: counts, and repairs the page so the access can go on.
extern "C" fn marker(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    MARKER_CALLS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the kernel passes a valid siginfo; mapping an anonymous page over the faulting
    // page of the test's own mapping.
    unsafe {
        let page = ((*info).si_addr() as usize) & !(PAGE - 1);
        libc::mmap(
            page as *mut libc::c_void,
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        );
    }
}

fn current_sigbus() -> usize {
    // SAFETY: querying the current action into a zeroed struct.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old);
        old.sa_sigaction
    }
}

fn set_sigbus(handler: usize, flags: libc::c_int) {
    // SAFETY: installing a handler of this test (or SIG_DFL).
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler;
        act.sa_flags = flags;
        libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut());
    }
}

#[test]
fn the_previous_handler_gets_every_sigbus_outside_a_guarded_access_and_comes_back() {
    let _s = serial();
    let marker_addr = marker as *const () as usize;
    set_sigbus(marker_addr, libc::SA_SIGINFO);
    let t = Truncated::new(4, 1);
    {
        let g1 = Guard::acquire().unwrap();
        let g2 = Guard::acquire().unwrap();
        assert_ne!(
            current_sigbus(),
            marker_addr,
            "hostmem's handler is in place"
        );
        // A fault outside any guarded access is the VMM's business: its handler runs.
        // SAFETY: touching a page past the end of the file; the marker repairs it.
        unsafe { t.addr.add(2 * PAGE).write_volatile(1) };
        assert_eq!(MARKER_CALLS.load(Ordering::SeqCst), 1);
        // A guarded one is hostmem's: the marker does not see it.
        let e = g1.fill(&t.span(), 3 * PAGE, 8, 0).unwrap_err();
        assert_eq!(fault_offset(e), 3 * PAGE as u64);
        assert_eq!(MARKER_CALLS.load(Ordering::SeqCst), 1);
        drop(g1);
        assert_ne!(
            current_sigbus(),
            marker_addr,
            "still held by the second guard"
        );
        drop(g2);
    }
    assert_eq!(
        current_sigbus(),
        marker_addr,
        "the last guard put the VMM's handler back"
    );
    set_sigbus(libc::SIG_DFL, 0);
}

#[test]
fn several_threads_fault_at_once_and_each_gets_its_own_page() {
    let _s = serial();
    let threads = 4;
    let t = Truncated::new(threads * 4, threads);
    let g = Guard::acquire().unwrap();
    let span = t.span();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (g, span) = (&g, &span);
                s.spawn(move || {
                    let mut faults = Vec::new();
                    for round in 0..50 {
                        let at = (threads + i * 3 + round % 3) * PAGE;
                        let mut buf = [0u8; 64];
                        faults.push(fault_offset(g.read(span, at, &mut buf).unwrap_err()));
                        assert_eq!(faults.last(), Some(&(at as u64)));
                    }
                    faults.len()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 50);
        }
    });
}

#[test]
fn huge_pages_fault_and_are_repaired_a_whole_huge_page_at_a_time() {
    let _s = serial();
    const HUGE: usize = 2 << 20;
    let free: usize =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    if free < 3 {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("no free 2 MiB huge pages (scripts/hugepages-setup)");
        }
        eprintln!("SKIPPED: no free 2 MiB huge pages");
        return;
    }
    let t = Truncated::with_page(3, 1, HUGE, libc::MFD_HUGETLB);
    let g = Guard::acquire().unwrap();
    let mut buf = vec![0u8; 8192];
    g.read(&t.span(), HUGE - 4096, &mut buf[..4096]).unwrap();
    let e = g.read(&t.span(), HUGE - 4096, &mut buf).unwrap_err();
    assert_eq!(fault_offset(e), HUGE as u64);
    let e = g.write(&t.span(), 2 * HUGE + 100, &[1, 2, 3]).unwrap_err();
    assert_eq!(fault_offset(e), 2 * HUGE as u64);
    // Back to the file: once it grows, what the mapping writes is in the file (hugetlbfs
    // files are written through mappings only).
    t.grow();
    // SAFETY: inside the mapping, now backed by the file.
    unsafe { t.addr.add(2 * HUGE + 3).write_volatile(0x33) };
    assert_eq!(t.file_byte(2 * HUGE + 3), 0x33);
}

#[test]
fn zero_test_tells_each_page_and_stops_at_the_first_that_faults() {
    let _s = serial();
    let t = Truncated::new(8, 5);
    let g = Guard::acquire().unwrap();
    // A single set byte anywhere makes a page non-zero: first word, middle, last byte.
    for (page, at) in [(1, 0), (2, 1000), (4, PAGE - 1)] {
        // SAFETY: writing through the mapping inside the file (5 pages).
        unsafe { t.addr.add(page * PAGE + at).write_volatile(1) };
    }
    let mut zero = [false; 5];
    g.zero_test(&t.span(), 0, PAGE, &mut zero).unwrap();
    assert_eq!(zero, [true, false, false, true, false]);
    // Unaligned pieces take the byte-wise path and agree.
    let mut zero = [false; 2];
    g.zero_test(&t.span(), PAGE + 1, PAGE, &mut zero).unwrap();
    assert_eq!(zero, [true, false], "piece 1 holds page 2's byte at 1000");

    // Pages 5.. are past the file: the test stops there with the fault's offset.
    let mut zero = [false; 6];
    let e = g
        .zero_test(&t.span(), 2 * PAGE, PAGE, &mut zero)
        .unwrap_err();
    assert_eq!(fault_offset(e), 5 * PAGE as u64);
    assert_eq!(&zero[..3], &[false, true, false]);
    // The range is checked before anything is touched.
    let mut zero = [false; 9];
    let e = g.zero_test(&t.span(), 0, PAGE, &mut zero).unwrap_err();
    assert!(matches!(e, AccessError::OutOfRange { .. }), "{e:?}");
}
