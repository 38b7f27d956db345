//! The O_DIRECT writer behind `file:` migrations with `direct-io on`: stream bytes are
//! staged in page-aligned buffers and whole 4 KiB file pages go to the disk through a second,
//! O_DIRECT descriptor of the same file, so saving a guest does not fill the page cache.
//!
//! Why: every new page-cache page costs a fault of the host (on a VM, an EPT fault and the
//! host's zeroing), which is what a buffered save of a big guest to a new file spends most of
//! its time on; O_DIRECT writes skip the cache. A writer thread does the `pwrite`s, so filling
//! the next buffer (reading and zero-testing guest pages) overlaps the disk's work.
//!
//! Better than QEMU: QEMU 10 honours `direct-io` only with `multifd` and `mapped-ram` (without
//! them it ignores the parameter); hostmem honours it for every outgoing `file:` stream, the
//! plain sequential one and the single-threaded mapped-ram one alike.
//!
//! How pages are split between the two descriptors: a buffer holds a window of the file that
//! starts at a page boundary (its first `head` bytes unused when the window starts mid-page:
//! after `offset=N` or a seek). A page the window covers entirely goes out through the O_DIRECT
//! descriptor; a page it covers only in part (the window's unaligned head, or its tail at a
//! seek, a flush or the end) goes through the buffered one with exactly the bytes the window
//! holds, so bytes of the file outside the window (before `offset=`, or written earlier) are
//! never overwritten. One thread writes every range in stream order, so a page written by one
//! descriptor and later by the other ends with the later bytes: the kernel writes back and
//! drops cached pages over an O_DIRECT write's range, and a buffered write after one reads the
//! page from the disk.
//!
//! A filesystem that refuses O_DIRECT at open (EINVAL: hugetlbfs, older tmpfs, some FUSE) or
//! at a write (an alignment it wants larger than 4 KiB) gets the buffered descriptor for the
//! rest, silently: the bytes in the file are the same either way. Write errors of either
//! descriptor are returned as the OS error (the channel words them as QEMU does), from the
//! call that found them: the one that handed the bytes over, or a later one, at the latest
//! [`DirectFile::flush`].

use std::alloc::{self, Layout};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The unit of O_DIRECT offsets, lengths and buffer addresses: the page size, which is at
/// least the logical block size of every disk Linux runs on.
pub const DIRECT_ALIGN: usize = 4096;
/// One staging buffer: what a single O_DIRECT `pwrite` carries at most. 1 MiB saved a 4 GiB
/// half-random guest a little faster than 4 MiB here (the writer starts sooner).
pub const STAGE_BYTES: usize = 1 << 20;
/// Staging buffers per writer: one being filled while the others are on their way to disk.
pub const STAGE_BUFFERS: usize = 2;

/// What went through each descriptor (whole pages through the O_DIRECT one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectStats {
    pub direct_bytes: u64,
    pub direct_writes: u64,
    pub buffered_bytes: u64,
}

/// Opens `file` again with O_DIRECT, through `/proc/self/fd` (so a renamed or replaced path
/// does not matter) or, without procfs, through `path`. `Ok(None)`: the filesystem refuses
/// O_DIRECT (EINVAL), and the caller writes through `file` alone.
pub fn reopen_direct(file: BorrowedFd<'_>, path: &Path) -> io::Result<Option<OwnedFd>> {
    reopen_direct_with(file, path, open_direct)
}

/// [`reopen_direct`] with the `open(2)` it makes given, for testing its answers.
pub fn reopen_direct_with(
    file: BorrowedFd<'_>,
    path: &Path,
    mut open: impl FnMut(&Path) -> io::Result<OwnedFd>,
) -> io::Result<Option<OwnedFd>> {
    let by_fd = format!("/proc/self/fd/{}", file.as_raw_fd());
    let r = match open(Path::new(&by_fd)) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => open(path),
        r => r,
    };
    match r {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

fn open_direct(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a NUL-terminated string that lives across the call.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_WRONLY | libc::O_DIRECT | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A page-aligned heap buffer of [`STAGE_BYTES`] (O_DIRECT wants the memory aligned too).
struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain owned memory; whoever holds the `AlignedBuf` is its only user
// (it moves between the filling thread and the writer thread, never shared).
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, DIRECT_ALIGN).expect("a valid staging layout")
    }

    fn new(len: usize) -> AlignedBuf {
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size (`with_buffer_size` asserts it). Zeroed, so every
        // byte is initialised (a fresh mmap'd allocation is zero already and costs no pass).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised bytes (zeroed in `new`) that we own and
        // that nothing else refers to while `&self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
    }
}

/// One window of the file for the writer: `buf[head..len]` belongs at `start + head`.
struct Job {
    buf: AlignedBuf,
    /// File offset of `buf[0]`, page-aligned.
    start: u64,
    head: usize,
    len: usize,
}

/// The two descriptors and what the writer thread did with them.
struct Files {
    buffered: OwnedFd,
    direct: Option<OwnedFd>,
    /// Cleared when an O_DIRECT write was refused: the rest goes buffered.
    direct_ok: AtomicBool,
    /// Set when the stream is abandoned (dropped unfinished): queued windows are not written.
    abandoned: AtomicBool,
    direct_bytes: AtomicU64,
    direct_writes: AtomicU64,
    buffered_bytes: AtomicU64,
    /// Test hook: the errno the next O_DIRECT write fails with.
    #[cfg(test)]
    fail_direct: std::sync::Mutex<Option<i32>>,
}

/// `pwrite` of all of `data` at `off`; short writes go on, EINTR is retried.
fn pwrite_all(fd: RawFd, mut data: &[u8], mut off: u64) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: `data` is valid for `data.len()` bytes for the call.
        let n = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), off as libc::off_t) };
        match n {
            n if n > 0 => {
                data = &data[n as usize..];
                off += n as u64;
            }
            0 => return Err(io::Error::from_raw_os_error(libc::EIO)),
            _ => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

impl Files {
    fn buffered(&self, data: &[u8], off: u64) -> io::Result<()> {
        pwrite_all(self.buffered.as_raw_fd(), data, off)?;
        self.buffered_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Whole pages at a page-aligned offset; through O_DIRECT while it works.
    fn pages(&self, mut data: &[u8], mut off: u64) -> io::Result<()> {
        let Some(direct) = self.direct.as_ref() else {
            return self.buffered(data, off);
        };
        while !data.is_empty() && self.direct_ok.load(Ordering::Relaxed) {
            let n = self.direct_pwrite(direct.as_raw_fd(), data, off);
            match n {
                Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
                Ok(n) => {
                    self.direct_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    self.direct_writes.fetch_add(1, Ordering::Relaxed);
                    data = &data[n..];
                    off += n as u64;
                    if !n.is_multiple_of(DIRECT_ALIGN) {
                        // A short write that ended mid-page: the rest of this range is no
                        // longer aligned, so it goes buffered; the next range is aligned again.
                        break;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_ok.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        self.buffered(data, off)
    }

    fn direct_pwrite(&self, fd: RawFd, data: &[u8], off: u64) -> io::Result<usize> {
        #[cfg(test)]
        if let Some(e) = self.fail_direct.lock().unwrap().take() {
            return Err(io::Error::from_raw_os_error(e));
        }
        // SAFETY: `data` is valid for `data.len()` bytes for the call; it is page-aligned in
        // memory, offset and length, as O_DIRECT wants.
        let n = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), off as libc::off_t) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes a window: the unaligned head and tail buffered, the whole pages between direct.
    fn write_job(&self, job: &Job) -> io::Result<()> {
        let bytes = &job.buf.as_slice()[..job.len];
        let first_page = job.head.next_multiple_of(DIRECT_ALIGN);
        let last_page = job.len / DIRECT_ALIGN * DIRECT_ALIGN;
        let at = |i: usize| job.start + i as u64;
        if first_page >= last_page {
            return self.buffered(&bytes[job.head..], at(job.head));
        }
        if job.head < first_page {
            self.buffered(&bytes[job.head..first_page], at(job.head))?;
        }
        self.pages(&bytes[first_page..last_page], at(first_page))?;
        if last_page < job.len {
            self.buffered(&bytes[last_page..], at(last_page))?;
        }
        Ok(())
    }
}

fn writer_thread(
    files: Arc<Files>,
    jobs: Receiver<Job>,
    done: Sender<(AlignedBuf, io::Result<()>)>,
) {
    for job in jobs {
        let r = if files.abandoned.load(Ordering::Relaxed) || job.head == job.len {
            Ok(())
        } else {
            files.write_job(&job)
        };
        if done.send((job.buf, r)).is_err() {
            return;
        }
    }
}

/// A sequential (and seekable) writer of one file through staging buffers, whole pages by
/// O_DIRECT. Positions are absolute file offsets; writing starts at the one given to
/// [`DirectFile::new`] and never moves the descriptors' own file positions.
pub struct DirectFile {
    files: Arc<Files>,
    /// The buffer being filled: the window `[start + head, start + len)` of the file.
    cur: Option<AlignedBuf>,
    start: u64,
    head: usize,
    len: usize,
    /// `cur[head..written_to]` is in the file already (the page a flush kept).
    written_to: usize,
    buf_bytes: usize,
    /// Buffers back from the writer, and how many are out with it.
    spare: Vec<AlignedBuf>,
    allocated: usize,
    in_flight: usize,
    jobs: Option<Sender<Job>>,
    done: Receiver<(AlignedBuf, io::Result<()>)>,
    thread: Option<JoinHandle<()>>,
    /// The first write error, returned from then on (the stream has a hole).
    error: Option<(io::ErrorKind, Option<i32>, String)>,
}

impl DirectFile {
    /// A writer of `buffered` from file offset `position`, whole pages through `direct`
    /// (`None`: everything buffered, same bytes). Starts the writer thread.
    pub fn new(buffered: OwnedFd, direct: Option<OwnedFd>, position: u64) -> io::Result<Self> {
        Self::with_buffer_size(buffered, direct, position, STAGE_BYTES)
    }

    /// [`DirectFile::new`] with staging buffers of `buf_bytes` (a multiple of 4 KiB).
    pub fn with_buffer_size(
        buffered: OwnedFd,
        direct: Option<OwnedFd>,
        position: u64,
        buf_bytes: usize,
    ) -> io::Result<Self> {
        assert!(buf_bytes > 0 && buf_bytes.is_multiple_of(DIRECT_ALIGN));
        let files = Arc::new(Files {
            buffered,
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
            abandoned: AtomicBool::new(false),
            direct_bytes: AtomicU64::new(0),
            direct_writes: AtomicU64::new(0),
            buffered_bytes: AtomicU64::new(0),
            #[cfg(test)]
            fail_direct: std::sync::Mutex::new(None),
        });
        let (jobs, job_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let f = files.clone();
        let thread = std::thread::Builder::new()
            .name("hm-direct-io".into())
            .spawn(move || writer_thread(f, job_rx, done_tx))?;
        let mut w = DirectFile {
            files,
            cur: Some(AlignedBuf::new(buf_bytes)),
            start: 0,
            head: 0,
            len: 0,
            written_to: 0,
            buf_bytes,
            spare: Vec::new(),
            allocated: 1,
            in_flight: 0,
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            error: None,
        };
        w.start_window(position);
        Ok(w)
    }

    /// Whether whole pages still go through O_DIRECT (false after a refusal, or without).
    pub fn is_direct(&self) -> bool {
        self.files.direct_ok.load(Ordering::Relaxed)
    }

    /// What went through each descriptor so far (complete after [`Self::flush`]).
    pub fn stats(&self) -> DirectStats {
        DirectStats {
            direct_bytes: self.files.direct_bytes.load(Ordering::Relaxed),
            direct_writes: self.files.direct_writes.load(Ordering::Relaxed),
            buffered_bytes: self.files.buffered_bytes.load(Ordering::Relaxed),
        }
    }

    /// The O_DIRECT descriptor, if the file has one.
    pub fn direct_fd(&self) -> Option<BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.files.direct.as_ref().map(|f| f.as_fd())
    }

    /// The file offset the next byte goes to.
    pub fn position(&self) -> u64 {
        self.start + self.len as u64
    }

    fn start_window(&mut self, position: u64) {
        let head = (position % DIRECT_ALIGN as u64) as usize;
        self.start = position - head as u64;
        self.head = head;
        self.len = head;
        self.written_to = head;
    }

    fn check(&self) -> io::Result<()> {
        match &self.error {
            None => Ok(()),
            Some((_, Some(n), _)) => Err(io::Error::from_raw_os_error(*n)),
            Some((kind, None, msg)) => Err(io::Error::new(*kind, msg.clone())),
        }
    }

    fn take_done(&mut self, (buf, r): (AlignedBuf, io::Result<()>)) {
        self.in_flight -= 1;
        self.spare.push(buf);
        if let (Err(e), None) = (r, &self.error) {
            self.error = Some((e.kind(), e.raw_os_error(), e.to_string()));
        }
    }

    /// A buffer to fill: a spare one, a new one while there are fewer than
    /// [`STAGE_BUFFERS`], else the next the writer gives back.
    fn free_buffer(&mut self) -> io::Result<AlignedBuf> {
        while let Ok(d) = self.done.try_recv() {
            self.take_done(d);
        }
        if self.spare.is_empty() && self.allocated < STAGE_BUFFERS {
            self.allocated += 1;
            return Ok(AlignedBuf::new(self.buf_bytes));
        }
        while self.spare.is_empty() {
            let d = self.done.recv().map_err(|_| writer_gone())?;
            self.take_done(d);
        }
        Ok(self.spare.pop().expect("a spare buffer"))
    }

    /// Hands the current window to the writer and starts the next at `next` with a fresh
    /// buffer; with `keep_tail`, the window's last partial page is copied into it, so the next
    /// window continues where this one ended and that page still goes out whole later.
    fn submit(&mut self, next: u64, keep_tail: bool) -> io::Result<()> {
        if self.len <= self.written_to {
            // Nothing new: a window continuing where it is keeps its kept page.
            if next != self.position() {
                self.start_window(next);
            }
            return Ok(());
        }
        let mut fresh = self.free_buffer()?;
        let cur = self.cur.take().expect("a current buffer");
        let job = Job {
            start: self.start,
            head: self.head,
            len: self.len,
            buf: cur,
        };
        let end = self.position();
        self.start_window(next);
        if keep_tail && next == end && self.head > 0 {
            // The partial page starts `self.head` bytes before the end; the window may have
            // started inside it.
            let keep = job.head.max(job.len - self.head);
            let n = job.len - keep;
            fresh.as_mut_slice()[self.head - n..self.head]
                .copy_from_slice(&job.buf.as_slice()[keep..job.len]);
            self.head -= n;
            self.written_to = self.len;
        }
        self.cur = Some(fresh);
        self.in_flight += 1;
        self.jobs
            .as_ref()
            .expect("the writer runs until drop")
            .send(job)
            .map_err(|_| writer_gone())
    }

    /// Appends all of `data` at [`Self::position`].
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.check()?;
        while !data.is_empty() {
            let n = (self.buf_bytes - self.len).min(data.len());
            let at = self.len;
            self.cur.as_mut().expect("a current buffer").as_mut_slice()[at..at + n]
                .copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
            if self.len == self.buf_bytes {
                let next = self.position();
                self.submit(next, false)?;
                self.check()?;
            }
        }
        Ok(())
    }

    /// Moves to file offset `position` (mapped-ram seeks). Moving to where the stream is
    /// already is free; anywhere else ends the current window.
    pub fn seek(&mut self, position: u64) -> io::Result<()> {
        self.check()?;
        if position != self.position() {
            self.submit(position, false)?;
        }
        Ok(())
    }

    /// The file's size once everything handed over is written (for `SeekFrom::End`).
    pub fn file_len(&mut self) -> io::Result<u64> {
        self.flush()?;
        // SAFETY: fstat on a descriptor we hold, into a zeroed stat we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(self.files.buffered.as_raw_fd(), &mut st) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.st_size as u64)
    }

    /// Writes everything handed over and waits for it; the first write error, if any.
    pub fn flush(&mut self) -> io::Result<()> {
        self.check()?;
        let next = self.position();
        self.submit(next, true)?;
        while self.in_flight > 0 {
            let d = self.done.recv().map_err(|_| writer_gone())?;
            self.take_done(d);
        }
        self.check()
    }

    #[cfg(test)]
    fn fail_next_direct_write(&self, errno: i32) {
        *self.files.fail_direct.lock().unwrap() = Some(errno);
    }
}

fn writer_gone() -> io::Error {
    io::Error::other("the direct-io writer thread ended")
}

impl Drop for DirectFile {
    /// Abandons what was not flushed: queued windows are skipped, the one being written ends.
    fn drop(&mut self) {
        self.files.abandoned.store(true, Ordering::Relaxed);
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for DirectFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectFile")
            .field("position", &self.position())
            .field("direct", &self.is_direct())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs::{File, OpenOptions};
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicUsize;

    /// A file of its own under the temp dir, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(initial: &[u8]) -> Scratch {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "hostmem-direct-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&p, initial).unwrap();
            Scratch(p)
        }

        fn writer(&self, position: u64, buf_bytes: usize) -> DirectFile {
            let f = OpenOptions::new().write(true).open(&self.0).unwrap();
            let direct = reopen_direct(f.as_fd(), &self.0).unwrap();
            assert!(direct.is_some(), "the temp dir's filesystem takes O_DIRECT");
            DirectFile::with_buffer_size(f.into(), direct, position, buf_bytes).unwrap()
        }

        fn buffered_only(&self, position: u64, buf_bytes: usize) -> DirectFile {
            let f = OpenOptions::new().write(true).open(&self.0).unwrap();
            DirectFile::with_buffer_size(f.into(), None, position, buf_bytes).unwrap()
        }

        fn content(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(Vec<u8>),
        Seek(u64),
        Flush,
    }

    /// What the file holds after `ops`, written the plain way (pwrite at a moving position).
    fn reference(initial: &[u8], position: u64, ops: &[Op]) -> Vec<u8> {
        let s = Scratch::new(initial);
        let f = OpenOptions::new().write(true).open(&s.0).unwrap();
        let mut at = position;
        for op in ops {
            match op {
                Op::Write(d) => {
                    f.write_all_at(d, at).unwrap();
                    at += d.len() as u64;
                }
                Op::Seek(p) => at = *p,
                Op::Flush => {}
            }
        }
        s.content()
    }

    fn run(w: &mut DirectFile, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Write(d) => w.write(d).unwrap(),
                Op::Seek(p) => w.seek(*p).unwrap(),
                Op::Flush => w.flush().unwrap(),
            }
        }
        w.flush().unwrap();
    }

    fn bytes(seed: u8, n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    fn check(initial: &[u8], position: u64, ops: &[Op], buf_bytes: usize) -> DirectStats {
        let s = Scratch::new(initial);
        let mut w = s.writer(position, buf_bytes);
        run(&mut w, ops);
        let stats = w.stats();
        drop(w);
        assert_eq!(s.content(), reference(initial, position, ops), "{ops:?}");
        stats
    }

    fn fdinfo_flags(fd: BorrowedFd<'_>) -> u32 {
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        let line = info.lines().find(|l| l.starts_with("flags:")).unwrap();
        u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
    }

    #[test]
    fn whole_pages_go_through_an_o_direct_descriptor() {
        let s = Scratch::new(&[]);
        let mut w = s.writer(0, STAGE_BYTES);
        let fd = w.direct_fd().expect("a direct descriptor");
        assert_ne!(fdinfo_flags(fd) & libc::O_DIRECT as u32, 0);
        let data = bytes(7, 3 * STAGE_BYTES + 3 * DIRECT_ALIGN);
        w.write(&data).unwrap();
        w.flush().unwrap();
        let st = w.stats();
        assert_eq!(st.direct_bytes, data.len() as u64);
        assert_eq!(st.direct_writes, 4, "one pwrite per staging buffer");
        assert_eq!(st.buffered_bytes, 0);
        assert!(w.is_direct());
        drop(w);
        assert_eq!(s.content(), data);
    }

    #[test]
    fn partial_pages_at_an_unaligned_start_and_end_go_buffered() {
        // offset=100: the first page's 3996 bytes and the last 50 go buffered, the pages
        // between direct; the 100 bytes before the offset stay as they were.
        let before = bytes(1, 100);
        let ops = [Op::Write(bytes(2, 3996 + 2 * DIRECT_ALIGN + 50))];
        let st = check(&before, 100, &ops, STAGE_BYTES);
        assert_eq!(st.direct_bytes, 2 * DIRECT_ALIGN as u64);
        assert_eq!(st.buffered_bytes, 3996 + 50);
    }

    #[test]
    fn a_window_inside_one_page_writes_only_its_bytes() {
        let before = bytes(3, 3 * DIRECT_ALIGN);
        check(&before, 1000, &[Op::Write(bytes(4, 10))], 2 * DIRECT_ALIGN);
        check(&before, 4096, &[Op::Write(bytes(4, 10))], 2 * DIRECT_ALIGN);
        check(&before, 4000, &[Op::Write(bytes(4, 96))], 2 * DIRECT_ALIGN);
    }

    #[test]
    fn an_empty_stream_leaves_the_file_as_it_was() {
        let before = bytes(5, 5000);
        let st = check(&before, 5000, &[], STAGE_BYTES);
        assert_eq!(st, DirectStats::default());
        let st = check(&[], 0, &[Op::Write(Vec::new()), Op::Flush], STAGE_BYTES);
        assert_eq!(st, DirectStats::default());
    }

    #[test]
    fn a_flush_mid_page_writes_the_page_whole_once_it_is_complete() {
        // 6000 bytes, flush (the partial second page goes buffered), then the rest of that
        // page: it goes out again, whole, through O_DIRECT.
        let ops = [
            Op::Write(bytes(6, 6000)),
            Op::Flush,
            Op::Flush,
            Op::Write(bytes(7, 2 * DIRECT_ALIGN - 6000)),
        ];
        let st = check(&[], 0, &ops, STAGE_BYTES);
        assert_eq!(st.direct_bytes, 2 * DIRECT_ALIGN as u64);
        assert_eq!(st.buffered_bytes, (6000 - DIRECT_ALIGN) as u64);
    }

    #[test]
    fn mapped_ram_seeks_write_pages_in_place_and_leave_holes() {
        // The saver's pattern: a header, pages at aligned offsets with zero pages skipped
        // (seeks forward), the bitmap back before them, then the stream after the block.
        let header = bytes(8, 300);
        let pages = 1 << 20;
        let mut ops = vec![Op::Write(header)];
        for n in [0u64, 1, 2, 5, 6, 40, 41, 42, 43, 255] {
            ops.push(Op::Seek(pages + n * DIRECT_ALIGN as u64));
            ops.push(Op::Write(bytes(n as u8, DIRECT_ALIGN)));
        }
        ops.push(Op::Seek(300));
        ops.push(Op::Write(bytes(9, 32)));
        ops.push(Op::Seek(pages + 256 * DIRECT_ALIGN as u64));
        ops.push(Op::Write(bytes(10, 1234)));
        let st = check(&[], 0, &ops, 4 * DIRECT_ALIGN);
        assert_eq!(st.direct_bytes, 10 * DIRECT_ALIGN as u64);
        assert_eq!(st.buffered_bytes, 300 + 32 + 1234);
    }

    #[test]
    fn a_seek_to_the_current_position_keeps_the_window() {
        let s = Scratch::new(&[]);
        let mut w = s.writer(0, STAGE_BYTES);
        for n in 0..64u64 {
            w.seek(n * DIRECT_ALIGN as u64).unwrap();
            w.write(&bytes(n as u8, DIRECT_ALIGN)).unwrap();
        }
        w.flush().unwrap();
        assert_eq!(w.stats().direct_writes, 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Any mix of writes, seeks and flushes from any start leaves the file byte for byte as
        /// plain writes at a moving position do, over existing content.
        #[test]
        fn any_pattern_matches_plain_writes(
            initial_len in 0usize..20_000,
            position in prop_oneof![0u64..20_000, (0u64..5).prop_map(|p| p * 4096)],
            ops in prop::collection::vec(
                prop_oneof![
                    4 => (0usize..13_000, any::<u8>()).prop_map(|(n, s)| Op::Write(bytes(s, n))),
                    1 => (0usize..9).prop_map(|p| Op::Write(bytes(p as u8, p * 4096))),
                    2 => prop_oneof![0u64..40_000, (0u64..10).prop_map(|p| p * 4096)]
                        .prop_map(Op::Seek),
                    1 => Just(Op::Flush),
                ],
                0..24,
            ),
            buf_pages in 1usize..5,
        ) {
            let initial = bytes(0xA5, initial_len);
            check(&initial, position, &ops, buf_pages * DIRECT_ALIGN);
        }
    }

    #[test]
    fn without_an_o_direct_descriptor_every_byte_goes_buffered() {
        let ops = [Op::Write(bytes(11, 3 * DIRECT_ALIGN + 7))];
        let s = Scratch::new(&[]);
        let mut w = s.buffered_only(0, STAGE_BYTES);
        assert!(!w.is_direct());
        run(&mut w, &ops);
        assert_eq!(w.stats().direct_bytes, 0);
        assert_eq!(w.stats().buffered_bytes, 3 * DIRECT_ALIGN as u64 + 7);
        drop(w);
        assert_eq!(s.content(), reference(&[], 0, &ops));
    }

    #[test]
    fn a_refused_o_direct_open_is_no_error() {
        let f = File::open("/dev/null").unwrap();
        let einval = |_: &Path| Err(io::Error::from_raw_os_error(libc::EINVAL));
        assert!(reopen_direct_with(f.as_fd(), Path::new("/x"), einval)
            .unwrap()
            .is_none());
        // No procfs: the path is opened instead.
        let mut tried = Vec::new();
        let r = reopen_direct_with(f.as_fd(), Path::new("/x"), |p| {
            tried.push(p.to_path_buf());
            if p.starts_with("/proc") {
                Err(io::Error::from_raw_os_error(libc::ENOENT))
            } else {
                File::open("/dev/null").map(OwnedFd::from)
            }
        });
        assert!(r.unwrap().is_some());
        assert_eq!(tried[1], Path::new("/x"));
        // Anything else is an error.
        let emfile = |_: &Path| Err(io::Error::from_raw_os_error(libc::EMFILE));
        let e = reopen_direct_with(f.as_fd(), Path::new("/x"), emfile).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EMFILE));
    }

    #[test]
    fn a_device_without_o_direct_falls_back_and_its_enospc_is_reported() {
        // /dev/full refuses O_DIRECT (EINVAL) and fails every write with ENOSPC.
        let f = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let direct = reopen_direct(f.as_fd(), Path::new("/dev/full")).unwrap();
        assert!(direct.is_none());
        let mut w = DirectFile::new(f.into(), direct, 0).unwrap();
        w.write(&bytes(12, 5000)).unwrap();
        let e = w.flush().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        // The stream has a hole from here on: every later call says so.
        assert_eq!(
            w.write(b"x").unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        assert_eq!(w.flush().unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    }

    #[test]
    fn an_o_direct_write_refused_mid_stream_goes_buffered_from_then_on() {
        let data = bytes(13, 3 * STAGE_BYTES);
        let s = Scratch::new(&[]);
        let mut w = s.writer(0, STAGE_BYTES);
        w.fail_next_direct_write(libc::EINVAL);
        w.write(&data).unwrap();
        w.flush().unwrap();
        assert!(!w.is_direct());
        assert_eq!(w.stats().direct_bytes, 0);
        assert_eq!(w.stats().buffered_bytes, data.len() as u64);
        drop(w);
        assert_eq!(s.content(), data);
    }

    #[test]
    fn an_o_direct_write_error_is_returned() {
        let s = Scratch::new(&[]);
        let mut w = s.writer(0, STAGE_BYTES);
        w.fail_next_direct_write(libc::EIO);
        // The error surfaces when the writer's answer is back: at the latest at the flush.
        let r = w
            .write(&bytes(14, 2 * STAGE_BYTES))
            .and_then(|()| w.flush());
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn dropping_unflushed_abandons_what_is_staged() {
        let s = Scratch::new(b"keep");
        let mut w = s.writer(4, STAGE_BYTES);
        w.write(&bytes(15, 1000)).unwrap();
        drop(w);
        assert_eq!(s.content(), b"keep");
    }

    #[test]
    fn file_len_counts_what_was_handed_over() {
        let s = Scratch::new(&bytes(16, 10));
        let mut w = s.writer(10, STAGE_BYTES);
        w.write(&bytes(17, 9000)).unwrap();
        assert_eq!(w.file_len().unwrap(), 9010);
        assert_eq!(w.position(), 9010);
    }
}
