//! Device sections: the generic handler a VMM registers for each piece of state it migrates.
//!
//! A handler is keyed by `(idstr, instance_id)` and has a version, as QEMU's `SaveStateEntry`
//! is. Its payload is opaque to the codec, and, as in QEMU, not length-prefixed: the stream has
//! no way to skip a section, so the loader hands the handler the stream and the handler must
//! read exactly what its saver wrote. Non-iterative handlers are written once, as a FULL
//! section at completion; iterative ones (like `ram`, which the codec implements itself in
//! [`crate::migration::ram`]) get a START at setup, PARTs during the rounds and an END at completion.

use std::io::Write;

pub use super::chunked::StreamRead;
use super::error::MigrationError;
use super::qemu_file::{QemuReader, QemuWriter};

/// Which kind of section a payload travels in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SectionPhase {
    /// SECTION_START: an iterative handler's setup.
    Start,
    /// SECTION_PART: one round of an iterative handler.
    Part,
    /// SECTION_END: an iterative handler's completion.
    End,
    /// SECTION_FULL: a non-iterative handler's whole state.
    Full,
}

/// One registered piece of device state.
pub trait SectionHandler {
    /// The section's idstr (at most 255 bytes).
    fn idstr(&self) -> &str;
    fn instance_id(&self) -> u32;
    /// The newest version this handler writes and loads; a stream with a newer one is refused.
    fn version_id(&self) -> u32;
    /// Iterative handlers get START/PART/END sections, the others one FULL section.
    fn is_iterative(&self) -> bool {
        false
    }
    /// Writes the payload of one section of `phase`.
    fn save(
        &mut self,
        phase: SectionPhase,
        out: &mut QemuWriter<dyn Write + '_>,
    ) -> Result<(), MigrationError>;
    /// Reads the payload of one section of `phase`, written by a saver of `version_id`
    /// (at most [`Self::version_id`]). It must consume exactly what the saver wrote.
    fn load(
        &mut self,
        phase: SectionPhase,
        version_id: u32,
        input: &mut QemuReader<dyn StreamRead + '_>,
    ) -> Result<(), MigrationError>;
}

/// A non-iterative section whose state is a fixed-size byte buffer: it saves `data` and loads
/// exactly `data.len()` bytes back into it. It describes itself in the VMDESCRIPTION as one
/// `buffer` field, as QEMU does for old-style sections, so analyze-migration.py can read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferSection {
    pub idstr: String,
    pub instance_id: u32,
    pub version_id: u32,
    pub data: Vec<u8>,
    /// How many times `load` ran.
    pub loads: u32,
}

impl BufferSection {
    pub fn new(idstr: &str, instance_id: u32, version_id: u32, data: Vec<u8>) -> Self {
        BufferSection {
            idstr: idstr.to_string(),
            instance_id,
            version_id,
            data,
            loads: 0,
        }
    }
}

impl SectionHandler for BufferSection {
    fn idstr(&self) -> &str {
        &self.idstr
    }
    fn instance_id(&self) -> u32 {
        self.instance_id
    }
    fn version_id(&self) -> u32 {
        self.version_id
    }
    fn save(
        &mut self,
        _phase: SectionPhase,
        out: &mut QemuWriter<dyn Write + '_>,
    ) -> Result<(), MigrationError> {
        out.put_buffer(&self.data)
    }
    fn load(
        &mut self,
        _phase: SectionPhase,
        _version_id: u32,
        input: &mut QemuReader<dyn StreamRead + '_>,
    ) -> Result<(), MigrationError> {
        input.read_exact(&mut self.data, "a device section's buffer")?;
        self.loads += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::chunked::ChunkReader;
    use std::io::Cursor;

    #[test]
    fn buffer_section_round_trips_its_bytes() {
        let mut a = BufferSection::new("timer", 0, 2, vec![1, 2, 3]);
        let mut w = QemuWriter::new(Vec::new());
        a.save(SectionPhase::Full, &mut w).unwrap();
        let bytes = w.into_inner();
        let mut b = BufferSection::new("timer", 0, 2, vec![0; 3]);
        let mut r = QemuReader::new(ChunkReader::sequential(Cursor::new(bytes)));
        b.load(SectionPhase::Full, 2, &mut r).unwrap();
        assert_eq!(b.data, [1, 2, 3]);
        assert_eq!(b.loads, 1);
    }
}
