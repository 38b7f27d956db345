//! The loader's read side: [`StreamRead`], what every loader and section handler reads a
//! stream through, and the loader's one read buffer, [`ChunkReader`], which reads the stream
//! into large chunks and can hand a run of its bytes to another thread as a [`SharedBytes`]
//! without copying them, so a RAM page goes from the kernel's copy into this buffer straight
//! to guest RAM (one copy in user space), whichever thread writes it.
//!
//! A chunk is written only past its filled end and only by the reader; what it hands out lies
//! below that end and is never written again while anything holds it. A chunk nobody holds
//! goes back to the reader's pool, so a long load reuses a few chunks rather than faulting in
//! fresh buffers for every megabyte of stream.
//!
//! Reads ask for at least [`MIN_READ`] bytes: a transport's own `BufReader` (64 KiB) passes
//! such reads straight to the descriptor, so the stream is buffered once, here.

use std::cell::UnsafeCell;
use std::io::{self, BufRead, Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use super::error::MigrationError;

/// The stream a loader reads: buffered, and seekable when the transport is a file (mapped-ram
/// needs to read pages at fixed file offsets). Handlers only ever need the `BufRead` half.
pub trait StreamRead: BufRead {
    /// Moves to an absolute offset of the underlying file.
    fn seek_to(&mut self, offset: u64) -> Result<(), MigrationError>;

    /// The buffered bytes, at least `len` of them unless the stream ends first, where the
    /// reader can arrange that (a [`ChunkReader`]); otherwise whatever `fill_buf` gives. A
    /// loader takes a page from here when it is whole, and copies it out otherwise.
    fn contiguous(&mut self, _len: usize) -> std::io::Result<&[u8]> {
        self.fill_buf()
    }

    /// Whether [`Self::share`] gives bytes.
    fn can_share(&self) -> bool {
        false
    }

    /// Consumes the next `len` bytes and returns them as a handle another thread may read,
    /// without copying; `None` when the reader cannot (see [`Self::can_share`]) or the
    /// stream ends first (nothing is consumed then).
    fn share(&mut self, _len: usize) -> std::io::Result<Option<SharedBytes>> {
        Ok(None)
    }
}

/// Bytes per chunk.
pub const CHUNK_SIZE: usize = 1 << 20;
/// The smallest read the reader makes (a transport's `BufReader` is 64 KiB; larger reads bypass
/// it).
pub const MIN_READ: usize = 64 * 1024;
/// Idle chunks a pool keeps.
const POOLED: usize = 64;

type Pool = Arc<Mutex<Vec<Box<[UnsafeCell<u8>]>>>>;

/// One buffer of the stream, shared by the reader and the threads it handed bytes to.
struct Chunk {
    buf: Box<[UnsafeCell<u8>]>,
    pool: Pool,
}

// SAFETY: the bytes are `UnsafeCell`s only so that the reader may fill the part past its
// filled end while other threads read the part below it: every `&[u8]` handed out (by
// `SharedBytes::bytes` or `fill_buf`) lies below the filled end, which only grows, and the
// reader writes only above it, so no byte is written while a shared reference to it exists.
// Handing a `SharedBytes` to another thread goes through a channel (a happens-before edge
// after the bytes were written).
unsafe impl Send for Chunk {}
// SAFETY: as for Send.
unsafe impl Sync for Chunk {}

impl Chunk {
    fn ptr(&self) -> *mut u8 {
        UnsafeCell::raw_get(self.buf.as_ptr())
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOLED {
            pool.push(buf);
        }
    }
}

/// A run of stream bytes another thread may read: it keeps its chunk alive.
pub struct SharedBytes {
    chunk: Arc<Chunk>,
    at: usize,
    len: usize,
}

impl SharedBytes {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `at..at+len` lay below the chunk's filled end when this was made, and the
        // reader never writes there again while the chunk is shared (see `Chunk`).
        unsafe { std::slice::from_raw_parts(self.chunk.ptr().add(self.at), self.len) }
    }

    /// Whether `other` lies in the same chunk (a batch of pages pins as few chunks as it can).
    pub fn same_chunk(&self, other: &SharedBytes) -> bool {
        Arc::ptr_eq(&self.chunk, &other.chunk)
    }
}

/// Repositions the wrapped stream (files only).
type SeekFn<R> = fn(&mut R, u64) -> io::Result<u64>;

/// A [`StreamRead`] over any reader, buffered once in shareable chunks.
pub struct ChunkReader<R> {
    inner: R,
    seek: Option<SeekFn<R>>,
    chunk: Arc<Chunk>,
    /// Consumed up to here.
    start: usize,
    /// Filled up to here.
    end: usize,
    eof: bool,
    pool: Pool,
}

fn new_buffer(pool: &Pool) -> Box<[UnsafeCell<u8>]> {
    let reused = pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
    reused.unwrap_or_else(|| (0..CHUNK_SIZE).map(|_| UnsafeCell::new(0)).collect())
}

impl<R: Read> ChunkReader<R> {
    /// A stream read front to back: seeking is refused (`NotSeekable`).
    pub fn sequential(inner: R) -> Self {
        Self::with_seek(inner, None)
    }

    fn with_seek(inner: R, seek: Option<SeekFn<R>>) -> Self {
        let pool: Pool = Arc::default();
        let chunk = Arc::new(Chunk {
            buf: new_buffer(&pool),
            pool: pool.clone(),
        });
        ChunkReader {
            inner,
            seek,
            chunk,
            start: 0,
            end: 0,
            eof: false,
            pool,
        }
    }

    /// Bytes buffered and not yet consumed.
    fn buffered(&self) -> &[u8] {
        // SAFETY: `start..end` is filled and below the filled end; only `fill` writes, past
        // `end`, and it needs `&mut self`.
        unsafe {
            std::slice::from_raw_parts(self.chunk.ptr().add(self.start), self.end - self.start)
        }
    }

    /// Makes at least `want` bytes (at most a chunk) contiguous in the buffer, unless the
    /// stream ends first. One read when some are missing: a short read returns what it got.
    fn fill(&mut self, want: usize) -> io::Result<()> {
        let want = want.min(CHUNK_SIZE);
        if self.end - self.start >= want || self.eof {
            return Ok(());
        }
        let room = CHUNK_SIZE - self.end;
        if room < MIN_READ.max(want - (self.end - self.start)) {
            self.next_chunk();
        }
        loop {
            // SAFETY: `end..CHUNK_SIZE` is past the filled end: nothing shared lies there (see
            // `Chunk`), and only this reader, borrowed mutably, writes it.
            let space = unsafe {
                std::slice::from_raw_parts_mut(
                    self.chunk.ptr().add(self.end),
                    CHUNK_SIZE - self.end,
                )
            };
            match self.inner.read(space) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.end += n;
                    if self.end - self.start >= want {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the unconsumed bytes to the start of a chunk nobody else holds.
    fn next_chunk(&mut self) {
        let left = self.end - self.start;
        if Arc::get_mut(&mut self.chunk).is_some() {
            // SAFETY: the chunk is ours alone; `copy` handles the overlap.
            unsafe { std::ptr::copy(self.chunk.ptr().add(self.start), self.chunk.ptr(), left) };
        } else {
            let fresh = Arc::new(Chunk {
                buf: new_buffer(&self.pool),
                pool: self.pool.clone(),
            });
            // SAFETY: the old range is filled; the new chunk is ours alone, a separate buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(self.chunk.ptr().add(self.start), fresh.ptr(), left)
            };
            self.chunk = fresh;
        }
        self.start = 0;
        self.end = left;
    }
}

impl<R: Read + Seek> ChunkReader<R> {
    /// A file: [`StreamRead::seek_to`] works (mapped-ram).
    pub fn seekable(inner: R) -> Self {
        Self::with_seek(inner, Some(|r, offset| r.seek(SeekFrom::Start(offset))))
    }
}

impl<R: Read> Read for ChunkReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for ChunkReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.fill(1)?;
        Ok(self.buffered())
    }

    fn consume(&mut self, amt: usize) {
        self.start = (self.start + amt).min(self.end);
    }
}

impl<R: Read> StreamRead for ChunkReader<R> {
    fn seek_to(&mut self, offset: u64) -> Result<(), MigrationError> {
        let seek = self.seek.ok_or(MigrationError::NotSeekable)?;
        seek(&mut self.inner, offset)?;
        self.start = self.end;
        self.eof = false;
        Ok(())
    }

    fn contiguous(&mut self, len: usize) -> io::Result<&[u8]> {
        self.fill(len)?;
        Ok(self.buffered())
    }

    fn can_share(&self) -> bool {
        true
    }

    fn share(&mut self, len: usize) -> io::Result<Option<SharedBytes>> {
        if len > CHUNK_SIZE - MIN_READ {
            return Ok(None);
        }
        self.fill(len)?;
        if self.end - self.start < len {
            return Ok(None);
        }
        let shared = SharedBytes {
            chunk: self.chunk.clone(),
            at: self.start,
            len,
        };
        self.start += len;
        Ok(Some(shared))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// Gives at most `step` bytes per read, as a socket may.
    struct Trickle(Cursor<Vec<u8>>, usize);
    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.1);
            self.0.read(&mut buf[..n])
        }
    }

    fn stream(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn shared_runs_keep_their_bytes_while_the_reader_moves_on() {
        let data = stream(3 * CHUNK_SIZE + 123);
        let mut r = ChunkReader::sequential(Trickle(Cursor::new(data.clone()), 70_000));
        let mut held = Vec::new();
        let mut at = 0;
        // Odd-sized runs straddle chunk ends: each must still come out whole.
        while at + 4099 <= data.len() {
            let s = r.share(4099).unwrap().expect("bytes left");
            held.push((at, s));
            at += 4099;
        }
        for (at, s) in &held {
            assert!(s.bytes() == &data[*at..*at + 4099], "run at {at}");
        }
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert!(rest == data[at..]);
        assert!(r.share(1).unwrap().is_none(), "nothing past the end");
    }

    #[test]
    fn chunks_nobody_holds_are_reused() {
        let data = stream(8 * CHUNK_SIZE);
        let mut r = ChunkReader::sequential(Cursor::new(data.clone()));
        let mut at = 0;
        while let Some(s) = r.share(4096).unwrap() {
            assert!(s.bytes() == &data[at..at + 4096], "run at {at}");
            at += 4096;
        }
        assert_eq!(at, data.len());
        // Every run was dropped at once: the reader never needed a second buffer.
        assert!(r.pool.lock().unwrap().is_empty());
    }

    #[test]
    fn contiguous_fills_across_a_chunk_end_and_stops_at_the_end_of_the_stream() {
        let data = stream(CHUNK_SIZE + 5000);
        let mut r = ChunkReader::sequential(Trickle(Cursor::new(data.clone()), MIN_READ));
        let held = [
            r.share(CHUNK_SIZE - MIN_READ).unwrap().unwrap(),
            r.share(MIN_READ - 100).unwrap().unwrap(),
        ];
        // 100 bytes left in the first chunk, which is held: the page comes whole from a
        // second one.
        let page = r.contiguous(4096).unwrap();
        assert!(page.len() >= 4096);
        assert!(page[..4096] == data[CHUNK_SIZE - 100..CHUNK_SIZE - 100 + 4096]);
        r.consume(4096);
        let tail = r.contiguous(4096).unwrap().to_vec();
        assert!(tail == data[CHUNK_SIZE - 100 + 4096..], "the rest, short");
        assert!(held[0].bytes() == &data[..CHUNK_SIZE - MIN_READ]);
        assert!(held[1].bytes() == &data[CHUNK_SIZE - MIN_READ..CHUNK_SIZE - 100]);
    }

    #[test]
    fn seeking_drops_the_buffer_and_needs_a_file() {
        let data = stream(10_000);
        let mut r = ChunkReader::seekable(Cursor::new(data.clone()));
        assert_eq!(r.fill_buf().unwrap()[0], data[0]);
        r.seek_to(5000).unwrap();
        assert!(r.contiguous(10).unwrap()[..10] == data[5000..5010]);
        let mut s = ChunkReader::sequential(Cursor::new(data));
        assert!(matches!(s.seek_to(1), Err(MigrationError::NotSeekable)));
    }
}
