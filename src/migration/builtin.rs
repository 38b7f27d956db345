//! The device sections every QEMU machine carries whatever its devices, so that streams QEMU
//! writes load into hostmem and hostmem's tell QEMU what it needs: `globalstate` (the source's
//! run state at the switchover, which decides whether the destination starts) and `timer` (the
//! CPU clock offsets, which hostmem reads and has no use for).

use std::io::Write;
use std::sync::{Arc, Mutex};

use super::error::MigrationError;
use super::qemu_file::{QemuReader, QemuWriter};
use super::section::{SectionHandler, SectionPhase, StreamRead};

/// QEMU's `GlobalState`: `size`, `runstate[32]`, `has_vm_was_suspended`, `vm_was_suspended`,
/// `unused[66]`.
const RUNSTATE_LEN: usize = 32;
const UNUSED_LEN: usize = 66;

/// `globalstate` (version 1). Saving writes the run state the source had when the switchover
/// began; loading keeps the state the stream carried for the destination to follow.
pub struct GlobalState {
    /// What to save: shared with whoever pauses the guest, which records its state first.
    pub runstate: Arc<Mutex<String>>,
    /// What a load read.
    pub received: Option<String>,
}

impl GlobalState {
    pub fn new(runstate: Arc<Mutex<String>>) -> GlobalState {
        GlobalState {
            runstate,
            received: None,
        }
    }
}

impl SectionHandler for GlobalState {
    fn idstr(&self) -> &str {
        "globalstate"
    }
    fn instance_id(&self) -> u32 {
        0
    }
    fn version_id(&self) -> u32 {
        1
    }
    fn save(
        &mut self,
        _: SectionPhase,
        out: &mut QemuWriter<dyn Write + '_>,
    ) -> Result<(), MigrationError> {
        let name = self
            .runstate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut runstate = [0u8; RUNSTATE_LEN];
        let n = name.len().min(RUNSTATE_LEN - 1);
        runstate[..n].copy_from_slice(&name.as_bytes()[..n]);
        out.put_be32(n as u32 + 1)?;
        out.put_buffer(&runstate)?;
        out.put_u8(1)?;
        out.put_u8(0)?;
        out.put_buffer(&[0u8; UNUSED_LEN])
    }
    fn load(
        &mut self,
        _: SectionPhase,
        _: u32,
        input: &mut QemuReader<dyn StreamRead + '_>,
    ) -> Result<(), MigrationError> {
        input.get_be32("globalstate size")?;
        let mut runstate = [0u8; RUNSTATE_LEN];
        input.read_exact(&mut runstate, "globalstate runstate")?;
        input.get_u8("globalstate has_vm_was_suspended")?;
        input.get_u8("globalstate vm_was_suspended")?;
        let mut unused = [0u8; UNUSED_LEN];
        input.read_exact(&mut unused, "globalstate unused")?;
        let end = runstate
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(RUNSTATE_LEN);
        self.received = Some(String::from_utf8_lossy(&runstate[..end]).into_owned());
        Ok(())
    }
}

/// `timer` (version 2): the CPU tick and clock offsets. hostmem's VMM keeps no guest clock, so
/// a load reads them and leaves them; hostmem's streams do not carry the section.
#[derive(Default)]
pub struct Timer {
    pub cpu_ticks_offset: i64,
    pub cpu_clock_offset: i64,
}

impl SectionHandler for Timer {
    fn idstr(&self) -> &str {
        "timer"
    }
    fn instance_id(&self) -> u32 {
        0
    }
    fn version_id(&self) -> u32 {
        2
    }
    fn save(
        &mut self,
        _: SectionPhase,
        out: &mut QemuWriter<dyn Write + '_>,
    ) -> Result<(), MigrationError> {
        out.put_be64(self.cpu_ticks_offset as u64)?;
        out.put_be64(0)?;
        out.put_be64(self.cpu_clock_offset as u64)
    }
    fn load(
        &mut self,
        _: SectionPhase,
        version_id: u32,
        input: &mut QemuReader<dyn StreamRead + '_>,
    ) -> Result<(), MigrationError> {
        self.cpu_ticks_offset = input.get_be64("timer cpu_ticks_offset")? as i64;
        input.get_be64("timer unused")?;
        // Version 1 streams stop before the clock offset.
        if version_id >= 2 {
            self.cpu_clock_offset = input.get_be64("timer cpu_clock_offset")? as i64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::chunked::ChunkReader;
    use std::io::Cursor;

    #[test]
    fn globalstate_is_qemus_104_bytes_and_round_trips_the_run_state() {
        let state = Arc::new(Mutex::new("running".to_string()));
        let mut w = QemuWriter::new(Vec::new());
        GlobalState::new(state)
            .save(SectionPhase::Full, &mut w)
            .unwrap();
        let bytes = w.into_inner();
        assert_eq!(bytes.len(), 4 + 32 + 1 + 1 + 66);
        assert_eq!(&bytes[..4], &8u32.to_be_bytes());
        assert_eq!(&bytes[4..11], b"running");
        let mut g = GlobalState::new(Arc::new(Mutex::new(String::new())));
        let mut r = QemuReader::new(ChunkReader::sequential(Cursor::new(bytes)));
        g.load(SectionPhase::Full, 1, &mut r).unwrap();
        assert_eq!(g.received.as_deref(), Some("running"));
    }

    #[test]
    fn timer_reads_both_versions() {
        let mut w = QemuWriter::new(Vec::new());
        Timer {
            cpu_ticks_offset: 5,
            cpu_clock_offset: -7,
        }
        .save(SectionPhase::Full, &mut w)
        .unwrap();
        let bytes = w.into_inner();
        assert_eq!(bytes.len(), 24);
        let mut t = Timer::default();
        t.load(
            SectionPhase::Full,
            2,
            &mut QemuReader::new(ChunkReader::sequential(Cursor::new(bytes.clone()))),
        )
        .unwrap();
        assert_eq!((t.cpu_ticks_offset, t.cpu_clock_offset), (5, -7));
        let mut t = Timer::default();
        let mut r = QemuReader::new(ChunkReader::sequential(Cursor::new(bytes[..16].to_vec())));
        t.load(SectionPhase::Full, 1, &mut r).unwrap();
        assert_eq!((t.cpu_ticks_offset, t.cpu_clock_offset), (5, 0));
    }
}
