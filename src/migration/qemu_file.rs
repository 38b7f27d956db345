//! Big-endian primitives of the migration stream over `std::io`, with a byte counter.
//!
//! [`QemuReader`] and [`QemuWriter`] are QEMU's `QEMUFile` reduced to what the stream format
//! needs: `u8`, `be16`, `be32`, `be64`, raw buffers and counted strings (one length byte, then
//! at most 255 bytes, no NUL). Unlike QEMU, which reads zeros past the end of a stream and
//! notices later, a read that hits the end inside a field fails at once with
//! [`MigrationError::Truncated`], naming the field and the byte where the stream ended; other
//! read failures are [`MigrationError::Io`].
//!
//! Both types keep the wrapped stream as their last field so that `&mut QemuReader<R>` coerces
//! to `&mut QemuReader<dyn BufRead + '_>`: section handlers (which a C VMM may supply) get one
//! non-generic reader type.

use std::io::{self, BufRead, Write};

use super::error::MigrationError;

/// A stream that can also send bytes it does not own, straight from where they lie: guest RAM,
/// which a vCPU may write at any time and so can never be borrowed as a slice. A channel to a
/// file descriptor hands such bytes to the kernel in a `writev` (QEMU's iovecs into guest RAM),
/// saving the two copies a page buffer and a stream buffer would cost.
///
/// Writers that cannot (buffers in memory, rate limiters, test doubles) keep the defaults, and
/// the RAM saver then copies each page under its SIGBUS guard and writes the copy.
pub trait StreamWrite: Write {
    /// Whether [`Self::write_unowned`] takes bytes; asked once per round of pages.
    fn takes_unowned(&self) -> bool {
        false
    }

    /// Queues `len` bytes at `ptr` to go out after everything written before them. They are
    /// read by the kernel, at the latest when the stream is next flushed: whatever they hold
    /// then is what is sent.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped and readable until this stream's next `flush` returns
    /// (or until the stream is dropped, which abandons what is queued).
    unsafe fn write_unowned(&mut self, ptr: *const u8, len: usize) -> io::Result<()> {
        let _ = (ptr, len);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this stream cannot send bytes from guest RAM in place",
        ))
    }
}

impl StreamWrite for Vec<u8> {}
impl StreamWrite for std::fs::File {}
impl StreamWrite for io::Sink {}
impl StreamWrite for std::os::unix::net::UnixStream {}
impl StreamWrite for std::net::TcpStream {}
impl StreamWrite for std::process::ChildStdin {}
impl<T> StreamWrite for io::Cursor<T> where io::Cursor<T>: Write {}
impl<W: StreamWrite + ?Sized> StreamWrite for &mut W {
    fn takes_unowned(&self) -> bool {
        (**self).takes_unowned()
    }

    unsafe fn write_unowned(&mut self, ptr: *const u8, len: usize) -> io::Result<()> {
        // SAFETY: the caller's promise, passed on unchanged.
        unsafe { (**self).write_unowned(ptr, len) }
    }
}
impl<W: StreamWrite + ?Sized> StreamWrite for Box<W> {
    fn takes_unowned(&self) -> bool {
        (**self).takes_unowned()
    }

    unsafe fn write_unowned(&mut self, ptr: *const u8, len: usize) -> io::Result<()> {
        // SAFETY: the caller's promise, passed on unchanged.
        unsafe { (**self).write_unowned(ptr, len) }
    }
}

/// The reading half: counts every byte consumed.
pub struct QemuReader<R: ?Sized> {
    pos: u64,
    inner: R,
}

impl<R: BufRead> QemuReader<R> {
    pub fn new(inner: R) -> Self {
        QemuReader { pos: 0, inner }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: BufRead + ?Sized> QemuReader<R> {
    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The wrapped stream. Reading from it directly bypasses the counter.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Moves the counter after the caller repositioned the stream (mapped-ram seeks).
    pub fn set_position(&mut self, pos: u64) {
        self.pos = pos;
    }

    /// Fills `buf` completely; `what` names the field in a truncation error.
    pub fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), MigrationError> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    self.pos += done as u64;
                    return Err(MigrationError::Truncated {
                        offset: self.pos,
                        what,
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.pos += done as u64;
                    return Err(MigrationError::Io(e));
                }
            }
        }
        self.pos += done as u64;
        Ok(())
    }

    pub fn get_u8(&mut self, what: &'static str) -> Result<u8, MigrationError> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b, what)?;
        Ok(b[0])
    }

    pub fn get_be16(&mut self, what: &'static str) -> Result<u16, MigrationError> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b, what)?;
        Ok(u16::from_be_bytes(b))
    }

    pub fn get_be32(&mut self, what: &'static str) -> Result<u32, MigrationError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }

    pub fn get_be64(&mut self, what: &'static str) -> Result<u64, MigrationError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }

    /// A counted string's raw bytes (QEMU's idstrs are C strings, not necessarily UTF-8).
    pub fn get_counted_bytes(&mut self, what: &'static str) -> Result<Vec<u8>, MigrationError> {
        let len = self.get_u8(what)?;
        let mut buf = vec![0u8; len as usize];
        self.read_exact(&mut buf, what)?;
        Ok(buf)
    }

    /// A counted string as text; bytes that are not UTF-8 become U+FFFD, so such a name can
    /// only fail a lookup, never match a different block.
    pub fn get_counted_string(&mut self, what: &'static str) -> Result<String, MigrationError> {
        let bytes = self.get_counted_bytes(what)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The next byte without consuming it; `None` at the end of the stream.
    pub fn peek_u8(&mut self) -> Result<Option<u8>, MigrationError> {
        loop {
            match self.inner.fill_buf() {
                Ok(buf) => return Ok(buf.first().copied()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(MigrationError::Io(e)),
            }
        }
    }

    /// Consumes `n` bytes (a VMDESCRIPTION's JSON, an unknown payload).
    pub fn skip(&mut self, mut n: u64, what: &'static str) -> Result<(), MigrationError> {
        let mut scratch = [0u8; 4096];
        while n > 0 {
            let chunk = n.min(scratch.len() as u64) as usize;
            self.read_exact(&mut scratch[..chunk], what)?;
            n -= chunk as u64;
        }
        Ok(())
    }
}

/// The writing half: counts every byte produced.
pub struct QemuWriter<W: ?Sized> {
    pos: u64,
    inner: W,
}

impl<W: Write> QemuWriter<W> {
    pub fn new(inner: W) -> Self {
        QemuWriter { pos: 0, inner }
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write + ?Sized> QemuWriter<W> {
    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Moves the counter after the caller repositioned the stream (mapped-ram seeks).
    pub fn set_position(&mut self, pos: u64) {
        self.pos = pos;
    }

    pub fn put_buffer(&mut self, buf: &[u8]) -> Result<(), MigrationError> {
        self.inner.write_all(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    pub fn put_u8(&mut self, v: u8) -> Result<(), MigrationError> {
        self.put_buffer(&[v])
    }

    pub fn put_be16(&mut self, v: u16) -> Result<(), MigrationError> {
        self.put_buffer(&v.to_be_bytes())
    }

    pub fn put_be32(&mut self, v: u32) -> Result<(), MigrationError> {
        self.put_buffer(&v.to_be_bytes())
    }

    pub fn put_be64(&mut self, v: u64) -> Result<(), MigrationError> {
        self.put_buffer(&v.to_be_bytes())
    }

    /// One length byte, then the bytes; longer than 255 bytes is refused before anything is
    /// written.
    pub fn put_counted_string(&mut self, s: &str) -> Result<(), MigrationError> {
        let len = u8::try_from(s.len()).map_err(|_| MigrationError::StringTooLong {
            name: s.to_string(),
            len: s.len(),
        })?;
        self.put_u8(len)?;
        self.put_buffer(s.as_bytes())
    }

    pub fn flush(&mut self) -> Result<(), MigrationError> {
        self.inner.flush()?;
        Ok(())
    }
}

impl<W: StreamWrite + ?Sized> QemuWriter<W> {
    /// [`StreamWrite::write_unowned`], counted.
    ///
    /// # Safety
    /// As [`StreamWrite::write_unowned`]: the bytes stay mapped until the next flush.
    pub unsafe fn put_unowned(&mut self, ptr: *const u8, len: usize) -> Result<(), MigrationError> {
        // SAFETY: the caller's promise, passed on unchanged.
        unsafe { self.inner.write_unowned(ptr, len)? };
        self.pos += len as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn reader(bytes: &[u8]) -> QemuReader<Cursor<Vec<u8>>> {
        QemuReader::new(Cursor::new(bytes.to_vec()))
    }

    #[test]
    fn integers_are_big_endian_both_ways() {
        let mut w = QemuWriter::new(Vec::new());
        w.put_u8(0xab).unwrap();
        w.put_be16(0x0102).unwrap();
        w.put_be32(0x0304_0506).unwrap();
        w.put_be64(0x0708_090a_0b0c_0d0e).unwrap();
        assert_eq!(w.position(), 15);
        let bytes = w.into_inner();
        assert_eq!(bytes, [0xab, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
        let mut r = reader(&bytes);
        assert_eq!(r.get_u8("a").unwrap(), 0xab);
        assert_eq!(r.get_be16("b").unwrap(), 0x0102);
        assert_eq!(r.get_be32("c").unwrap(), 0x0304_0506);
        assert_eq!(r.get_be64("d").unwrap(), 0x0708_090a_0b0c_0d0e);
        assert_eq!(r.position(), 15);
    }

    #[test]
    fn counted_strings_have_one_length_byte_and_no_nul() {
        let mut w = QemuWriter::new(Vec::new());
        w.put_counted_string("ram").unwrap();
        w.put_counted_string("").unwrap();
        assert_eq!(w.into_inner(), b"\x03ram\x00");
        let mut r = reader(b"\x03ram\x00");
        assert_eq!(r.get_counted_string("id").unwrap(), "ram");
        assert_eq!(r.get_counted_string("id").unwrap(), "");
    }

    #[test]
    fn counted_string_of_255_bytes_fits_and_256_is_refused() {
        let mut w = QemuWriter::new(Vec::new());
        w.put_counted_string(&"x".repeat(255)).unwrap();
        assert_eq!(w.position(), 256);
        let err = w.put_counted_string(&"x".repeat(256)).unwrap_err();
        assert!(matches!(
            err,
            MigrationError::StringTooLong { len: 256, .. }
        ));
        assert_eq!(w.position(), 256, "nothing written for a refused string");
    }

    #[test]
    fn non_utf8_idstr_is_kept_recognisably() {
        let mut r = reader(b"\x02\xff\x41");
        assert_eq!(r.get_counted_string("id").unwrap(), "\u{fffd}A");
    }

    #[test]
    fn eof_inside_a_field_is_truncation_with_the_offset() {
        let mut r = reader(&[0, 0, 0, 1, 0xaa]);
        assert_eq!(r.get_be32("first").unwrap(), 1);
        match r.get_be32("section id") {
            Err(MigrationError::Truncated { offset, what }) => {
                assert_eq!(offset, 5);
                assert_eq!(what, "section id");
            }
            other => panic!("{other:?}"),
        }
        let mut r = reader(b"\x05ab");
        assert!(matches!(
            r.get_counted_string("idstr"),
            Err(MigrationError::Truncated { offset: 3, .. })
        ));
    }

    struct Failing;
    impl io::Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::ECONNRESET))
        }
    }

    #[test]
    fn read_failure_is_io_not_truncation() {
        let mut r = QemuReader::new(io::BufReader::new(Failing));
        match r.get_u8("x") {
            Err(MigrationError::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::ECONNRESET)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn peek_does_not_consume_and_skip_does() {
        let mut r = reader(&[5, 6, 7]);
        assert_eq!(r.peek_u8().unwrap(), Some(5));
        assert_eq!(r.position(), 0);
        r.skip(2, "x").unwrap();
        assert_eq!(r.get_u8("x").unwrap(), 7);
        assert_eq!(r.peek_u8().unwrap(), None);
        assert!(matches!(
            r.skip(1, "vmdesc"),
            Err(MigrationError::Truncated { offset: 3, .. })
        ));
    }

    #[test]
    fn reader_coerces_to_dyn_bufread() {
        let mut r = reader(&[1, 2]);
        let dynr: &mut QemuReader<dyn BufRead> = &mut r;
        assert_eq!(dynr.get_be16("x").unwrap(), 0x0102);
        let mut w = QemuWriter::new(Vec::new());
        let dynw: &mut QemuWriter<dyn Write> = &mut w;
        dynw.put_be16(7).unwrap();
        assert_eq!(w.into_inner(), [0, 7]);
    }
}
