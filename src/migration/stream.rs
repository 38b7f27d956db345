//! The whole stream: header, CONFIGURATION, section framing, commands, EOF and the
//! VMDESCRIPTION trailer; the [`Saver`] that writes a stream round by round and the [`load`]
//! state machine that reads one.
//!
//! ```text
//! be32 "QEVM"  be32 3
//! u8 0x07 CONFIGURATION   be32 len, machine type name, [subsections: u8 0x05, name, be32 ver, ..]
//! u8 0x01 START  be32 id, idstr, be32 instance, be32 version, payload, u8 0x7e be32 id
//! u8 0x02 PART   be32 id, payload, footer           (any number of rounds)
//! [u8 0x08 COMMAND be16 0x0b be16 0]                (SWITCHOVER_START, QEMU 10 only)
//! u8 0x03 END    be32 id, payload, footer
//! u8 0x04 FULL   be32 id, idstr, be32 instance, be32 version, payload, footer
//! u8 0x00 EOF
//! u8 0x06 VMDESCRIPTION be32 len, JSON
//! ```
//!
//! Section ids are local to a stream. The saver numbers sections from 1 in the order it first
//! writes them (`ram` is 1), never 0: QEMU's loader starts every handler's remembered id at 0,
//! so a PART with id 0 could be matched to a handler that has not been started yet. The loader
//! finds START/FULL handlers by `(idstr, instance_id)` and remembers the stream's id, which
//! PART/END sections and footers must then use.

use std::collections::HashMap;
use std::io::{BufRead, Read, Seek, Write};

use super::chunked::ChunkReader;
use super::error::{LoadError, MigrationError, SectionContext};
use super::format::{
    Command, ConfigurationNames, FileHeader, MappedRam, RamSectionId, SectionType,
    TARGET_PAGE_BITS, TARGET_PAGE_SIZE, VALIDATED_CAPABILITIES,
};
use super::qemu_file::{QemuReader, QemuWriter, StreamWrite};
use super::ram::{PageRef, RamBlockInfo, RamLoadStats, RamLoadTarget, RamLoader, RamSaveStats};
use super::ram::{PageRuns, RamSaver, RamSource, TestedRuns};
use super::section::{SectionHandler, SectionPhase, StreamRead};

/// Every capability name QEMU 10.0 knows (`MigrationCapability`); a CONFIGURATION naming any
/// other is refused, as QEMU refuses it.
pub const KNOWN_CAPABILITIES: [&str; 22] = [
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
];

/// The CONFIGURATION section's content.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Configuration {
    /// The machine type's full name ("pc-i440fx-10.0", "none"), never an alias ("pc").
    pub machine_type: String,
    /// The `target-page-bits` subsection (absent on x86 and s390x).
    pub target_page_bits: Option<u32>,
    /// The `capabilities` subsection: the validated capabilities that are on. Empty means no
    /// subsection.
    pub capabilities: Vec<String>,
    /// The `uuid` subsection (the `validate-uuid` migration parameter).
    pub uuid: Option<[u8; 16]>,
}

impl Configuration {
    pub fn new(machine_type: &str) -> Self {
        Configuration {
            machine_type: machine_type.to_string(),
            ..Default::default()
        }
    }

    /// The payload after the 0x07 byte (the section has no header and no footer).
    pub fn write<W: Write + ?Sized>(&self, w: &mut QemuWriter<W>) -> Result<(), MigrationError> {
        let name = self.machine_type.as_bytes();
        let len = u32::try_from(name.len()).map_err(|_| MigrationError::StringTooLong {
            name: self.machine_type.clone(),
            len: name.len(),
        })?;
        w.put_be32(len)?;
        w.put_buffer(name)?;
        if let Some(bits) = self.target_page_bits {
            write_subsection_header(w, ConfigurationNames::TARGET_PAGE_BITS)?;
            w.put_be32(bits)?;
        }
        if !self.capabilities.is_empty() {
            write_subsection_header(w, ConfigurationNames::CAPABILITIES)?;
            w.put_be32(self.capabilities.len() as u32)?;
            for c in &self.capabilities {
                w.put_counted_string(c)?;
            }
        }
        if let Some(uuid) = self.uuid {
            write_subsection_header(w, ConfigurationNames::UUID)?;
            w.put_buffer(&uuid)?;
        }
        Ok(())
    }

    /// Reads the payload after the 0x07 byte, subsections included. Does not validate it
    /// against the local side; see [`LoadOptions::check_configuration`].
    pub fn read<R: BufRead + ?Sized>(r: &mut QemuReader<R>) -> Result<Self, MigrationError> {
        let len = r.get_be32("the machine type's length")?;
        if len > 4096 {
            return Err(MigrationError::MachineTypeTooLong { len });
        }
        let mut name = vec![0u8; len as usize];
        r.read_exact(&mut name, "the machine type name")?;
        let mut c = Configuration::new(&String::from_utf8_lossy(&name));
        while r.peek_u8()? == Some(SectionType::SUBSECTION) {
            r.get_u8("a subsection marker")?;
            let sub = r.get_counted_string("a subsection name")?;
            let _version = r.get_be32("a subsection version")?;
            match sub.as_str() {
                ConfigurationNames::TARGET_PAGE_BITS => {
                    c.target_page_bits = Some(r.get_be32("target-page-bits")?);
                }
                ConfigurationNames::CAPABILITIES => {
                    let n = r.get_be32("the capability count")?;
                    for _ in 0..n {
                        let cap = r.get_counted_string("a capability name")?;
                        if !KNOWN_CAPABILITIES.contains(&cap.as_str()) {
                            return Err(MigrationError::UnknownCapability { name: cap });
                        }
                        c.capabilities.push(cap);
                    }
                }
                ConfigurationNames::UUID => {
                    let mut u = [0u8; 16];
                    r.read_exact(&mut u, "the uuid")?;
                    c.uuid = Some(u);
                }
                _ => return Err(MigrationError::UnknownSubsection { name: sub }),
            }
        }
        Ok(c)
    }
}

fn write_subsection_header<W: Write + ?Sized>(
    w: &mut QemuWriter<W>,
    name: &str,
) -> Result<(), MigrationError> {
    w.put_u8(SectionType::SUBSECTION)?;
    w.put_counted_string(name)?;
    w.put_be32(1)
}

/// QEMU's text form of a UUID.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// How the received machine type is compared with the local one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MachineTypeCheck {
    /// QEMU's check: `strncmp` over the *received* length, so a received name that is a
    /// prefix of the local one passes ("pc" into "pc-i440fx-10.0", even "" into anything).
    /// The default, so that every stream QEMU 10 accepts is accepted here too.
    #[default]
    QemuPrefix,
    /// Names must be equal.
    Exact,
}

/// The loading side's configuration: what QEMU takes from its own machine and capabilities.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The local machine type's full name.
    pub machine_type: String,
    pub machine_type_check: MachineTypeCheck,
    /// The local `mapped-ram` capability. It must match the stream's, as in QEMU; with it on,
    /// use [`load_file`] (the pages are read at file offsets).
    pub mapped_ram: bool,
    /// The local UUID, checked against a stream's `uuid` subsection.
    pub uuid: Option<[u8; 16]>,
    /// QEMU's `send-configuration` property: whether the stream must have a CONFIGURATION.
    pub expect_configuration: bool,
}

impl LoadOptions {
    pub fn new(machine_type: &str) -> Self {
        LoadOptions {
            machine_type: machine_type.to_string(),
            machine_type_check: MachineTypeCheck::default(),
            mapped_ram: false,
            uuid: None,
            expect_configuration: true,
        }
    }

    /// QEMU's `configuration_post_load` and the uuid subsection's check, in QEMU's order.
    /// Returns warnings QEMU prints without failing.
    pub fn check_configuration(&self, c: &Configuration) -> Result<Vec<String>, MigrationError> {
        let received = c.machine_type.as_bytes();
        let local = self.machine_type.as_bytes();
        let matches = match self.machine_type_check {
            MachineTypeCheck::QemuPrefix => qemu_strncmp_eq(received, local),
            MachineTypeCheck::Exact => received == local,
        };
        if !matches {
            // QEMU prints the received name with "%.*s": up to its length or first NUL.
            let shown = received.split(|&b| b == 0).next().unwrap_or_default();
            return Err(MigrationError::MachineTypeMismatch {
                received: String::from_utf8_lossy(shown).into_owned(),
                local: self.machine_type.clone(),
            });
        }
        let bits = c.target_page_bits.unwrap_or(TARGET_PAGE_BITS);
        if bits != TARGET_PAGE_BITS {
            return Err(MigrationError::TargetPageBitsMismatch {
                received: bits,
                local: TARGET_PAGE_BITS,
            });
        }
        let mismatches: Vec<_> = VALIDATED_CAPABILITIES
            .iter()
            .filter_map(|&name| {
                let local = name == MappedRam::CAPABILITY && self.mapped_ram;
                let received = c.capabilities.iter().any(|x| x == name);
                (local != received).then(|| super::error::CapabilityMismatch {
                    name: name.to_string(),
                    local,
                    received,
                })
            })
            .collect();
        if !mismatches.is_empty() {
            return Err(MigrationError::CapabilityMismatch { mismatches });
        }
        let mut warnings = Vec::new();
        if let Some(u) = &c.uuid {
            match &self.uuid {
                None => warnings.push(format!(
                    "warning: UUID is received {}, but local uuid isn't set",
                    format_uuid(u)
                )),
                Some(l) if l != u => {
                    return Err(MigrationError::UuidMismatch {
                        received: format_uuid(u),
                        local: format_uuid(l),
                    })
                }
                Some(_) => {}
            }
        }
        Ok(warnings)
    }
}

/// `strncmp(received, local, received.len()) == 0`, with `local` ending in a NUL: equal up to
/// the received length, stopping early where both have a NUL.
fn qemu_strncmp_eq(received: &[u8], local: &[u8]) -> bool {
    for (i, &r) in received.iter().enumerate() {
        let l = local.get(i).copied().unwrap_or(0);
        if r != l {
            return false;
        }
        if r == 0 {
            return true;
        }
    }
    true
}

/// The saving side's configuration.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// The CONFIGURATION section; its machine type must be the peer's full machine type name.
    pub configuration: Configuration,
    /// Write COMMAND SWITCHOVER_START before the END sections, as QEMU 10 does for machine
    /// types newer than 9.2. Off by default: QEMU 7.2 refuses the command
    /// ("MIG_CMD 0xb unknown (len 0x0)"), and no loader needs it.
    pub send_switchover_start: bool,
    /// Write the VMDESCRIPTION trailer (QEMU's default; analyze-migration.py needs it).
    pub vmdesc: bool,
    /// Write the CONFIGURATION section (QEMU's `send-configuration`, on by default): off, the
    /// stream goes without it and a loader must not expect one.
    pub send_configuration: bool,
    /// Send all-zero pages as ZERO records (QEMU's `zero-page-detection=legacy`); with
    /// `false` every page goes out in full.
    pub zero_page_detection: bool,
    /// Test pages for zero on a helper thread too, where the caller pipelines its rounds
    /// (precopy); by default on a host of more than one core ([`default_zero_test_helper`]).
    pub zero_test_helper: bool,
}

/// Whether precopy tests pages on a helper thread too: on a host of more than one core.
pub fn default_zero_test_helper() -> bool {
    std::thread::available_parallelism().map_or(1, |n| n.get()) > 1
}

impl SaveOptions {
    pub fn new(machine_type: &str) -> Self {
        SaveOptions {
            configuration: Configuration::new(machine_type),
            send_switchover_start: false,
            vmdesc: true,
            send_configuration: true,
            zero_page_detection: true,
            zero_test_helper: default_zero_test_helper(),
        }
    }
}

/// Where a [`Saver`] is in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SaveState {
    New,
    Iterating,
    Complete,
}

/// What a saver wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SaveSummary {
    pub ram: RamSaveStats,
    /// Bytes written, VMDESCRIPTION included.
    pub bytes: u64,
    /// SECTION_PART sections of `ram`.
    pub ram_rounds: u64,
}

/// Writes one stream. The round structure is the one a precopy loop drives:
/// [`Saver::save_setup`] once, [`Saver::save_pages`] (and [`Saver::save_iterate`] for other
/// iterative handlers) any number of times, then [`Saver::save_complete`].
pub struct Saver<W: StreamWrite> {
    w: QemuWriter<W>,
    opts: SaveOptions,
    ram: RamSaver,
    state: SaveState,
    next_section_id: u32,
    ram_section_id: u32,
    iterative_ids: HashMap<(String, u32), u32>,
    vmdesc_devices: Vec<String>,
    ram_rounds: u64,
    /// Pages went out with the setup at fixed offsets; no page records may follow.
    mapped_ram: bool,
}

impl<W: StreamWrite> Saver<W> {
    /// `ram_blocks`: the migratable blocks in ram_list order (see [`RamSource::blocks`]).
    pub fn new(
        out: W,
        opts: SaveOptions,
        ram_blocks: Vec<RamBlockInfo>,
    ) -> Result<Self, MigrationError> {
        let mut ram = RamSaver::new(ram_blocks)?;
        ram.set_zero_page_detection(opts.zero_page_detection);
        Ok(Saver {
            w: QemuWriter::new(out),
            opts,
            ram,
            state: SaveState::New,
            next_section_id: 1,
            ram_section_id: 0,
            iterative_ids: HashMap::new(),
            vmdesc_devices: Vec::new(),
            ram_rounds: 0,
            mapped_ram: false,
        })
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.w.position()
    }

    pub fn ram_stats(&self) -> RamSaveStats {
        self.ram.stats()
    }

    fn expect(&self, state: SaveState, what: &str) -> Result<(), MigrationError> {
        if self.state == state {
            Ok(())
        } else {
            Err(MigrationError::Usage(format!(
                "migration saver: {what} called out of order"
            )))
        }
    }

    fn new_section_id(&mut self) -> u32 {
        let id = self.next_section_id;
        self.next_section_id += 1;
        id
    }

    fn put_start_full(
        &mut self,
        kind: u8,
        id: u32,
        idstr: &str,
        instance_id: u32,
        version_id: u32,
    ) -> Result<(), MigrationError> {
        self.w.put_u8(kind)?;
        self.w.put_be32(id)?;
        self.w.put_counted_string(idstr)?;
        self.w.put_be32(instance_id)?;
        self.w.put_be32(version_id)
    }

    fn put_part_end(&mut self, kind: u8, id: u32) -> Result<(), MigrationError> {
        self.w.put_u8(kind)?;
        self.w.put_be32(id)
    }

    /// The magic, the version and (unless it is off) the CONFIGURATION.
    fn put_header(&mut self) -> Result<(), MigrationError> {
        self.w.put_be32(FileHeader::MAGIC)?;
        self.w.put_be32(FileHeader::VERSION)?;
        if self.opts.send_configuration {
            self.w.put_u8(SectionType::CONFIGURATION)?;
            self.opts.configuration.write(&mut self.w)?;
        }
        Ok(())
    }

    fn put_footer(&mut self, id: u32) -> Result<(), MigrationError> {
        self.w.put_u8(SectionType::FOOTER)?;
        self.w.put_be32(id)
    }

    /// The header, the CONFIGURATION, the `ram` START (its block list) and a START for each
    /// iterative handler in `handlers` (the others are ignored until completion).
    pub fn save_setup(
        &mut self,
        handlers: &mut [&mut dyn SectionHandler],
    ) -> Result<(), MigrationError> {
        self.expect(SaveState::New, "save_setup")?;
        self.put_header()?;
        self.ram_section_id = self.new_section_id();
        let id = self.ram_section_id;
        self.put_start_full(
            SectionType::START,
            id,
            RamSectionId::IDSTR,
            RamSectionId::INSTANCE_ID,
            RamSectionId::VERSION_ID,
        )?;
        self.ram.write_setup(&mut self.w)?;
        self.put_footer(id)?;
        for h in handlers.iter_mut().filter(|h| h.is_iterative()) {
            let id = self.new_section_id();
            self.iterative_ids
                .insert((h.idstr().to_string(), h.instance_id()), id);
            let (idstr, inst, ver) = (h.idstr().to_string(), h.instance_id(), h.version_id());
            self.put_start_full(SectionType::START, id, &idstr, inst, ver)?;
            h.save(SectionPhase::Start, &mut self.w)?;
            self.put_footer(id)?;
        }
        self.state = SaveState::Iterating;
        Ok(())
    }

    /// [`Saver::save_setup`] for a mapped-ram file: the configuration announces capability
    /// `mapped-ram` and the `ram` START carries every page at its fixed file offset (see
    /// [`RamSaver::write_setup_mapped_ram`]). Afterwards only [`Saver::save_complete`] with no
    /// pages is valid; QEMU 10 loads the file with the capability on and `file:`.
    pub fn save_setup_mapped_ram(
        &mut self,
        source: &dyn RamSource,
        handlers: &mut [&mut dyn SectionHandler],
    ) -> Result<(), MigrationError>
    where
        W: Seek,
    {
        self.expect(SaveState::New, "save_setup_mapped_ram")?;
        if handlers.iter().any(|h| h.is_iterative()) {
            return Err(MigrationError::Usage(
                "a mapped-ram file holds no iterative sections besides ram".to_string(),
            ));
        }
        let caps = &mut self.opts.configuration.capabilities;
        if !caps.iter().any(|c| c == MappedRam::CAPABILITY) {
            caps.push(MappedRam::CAPABILITY.to_string());
        }
        self.mapped_ram = true;
        self.put_header()?;
        self.ram_section_id = self.new_section_id();
        let id = self.ram_section_id;
        self.put_start_full(
            SectionType::START,
            id,
            RamSectionId::IDSTR,
            RamSectionId::INSTANCE_ID,
            RamSectionId::VERSION_ID,
        )?;
        self.ram.write_setup_mapped_ram(&mut self.w, source)?;
        self.put_footer(id)?;
        self.state = SaveState::Iterating;
        Ok(())
    }

    /// One `ram` SECTION_PART with a record for each page (the bulk round passes every page;
    /// later rounds the dirty ones).
    pub fn save_pages(
        &mut self,
        source: &dyn RamSource,
        pages: impl IntoIterator<Item = PageRef>,
    ) -> Result<RamSaveStats, MigrationError> {
        self.expect_page_records("save_pages")?;
        let id = self.ram_section_id;
        self.put_part_end(SectionType::PART, id)?;
        let st = self.ram.write_round(&mut self.w, source, pages)?;
        self.put_footer(id)?;
        self.ram_rounds += 1;
        Ok(st)
    }

    /// Iterating, and not in a mapped-ram file (whose pages went out with the setup).
    fn expect_page_records(&self, what: &str) -> Result<(), MigrationError> {
        self.expect(SaveState::Iterating, what)?;
        if self.mapped_ram {
            return Err(MigrationError::Usage(
                "a mapped-ram file has no page records".to_string(),
            ));
        }
        Ok(())
    }

    /// Whether `ram` rounds test pages in place ([`RamSaver::tests_in_place`]; never in a
    /// mapped-ram file): a caller may then test a chunk's pages on another thread
    /// ([`Self::page_runs`], [`PageRuns::test`]) and send them with
    /// [`Self::save_tested_pages`].
    pub fn tests_in_place(&mut self) -> bool {
        !self.mapped_ram && self.ram.tests_in_place(&mut self.w)
    }

    /// Whether the caller should test pages on a helper thread ([`SaveOptions`]).
    pub fn zero_test_helper(&self) -> bool {
        self.opts.zero_test_helper
    }

    /// `pages` checked and grouped for [`PageRuns::test`].
    pub fn page_runs(
        &self,
        pages: impl IntoIterator<Item = PageRef>,
    ) -> Result<PageRuns, MigrationError> {
        self.ram.runs(pages)
    }

    /// [`Self::save_pages`] for pages tested already ([`Self::tests_in_place`]).
    pub fn save_tested_pages(
        &mut self,
        source: &dyn RamSource,
        runs: &PageRuns,
        tested: TestedRuns<'_>,
    ) -> Result<RamSaveStats, MigrationError> {
        self.expect_page_records("save_tested_pages")?;
        let id = self.ram_section_id;
        self.put_part_end(SectionType::PART, id)?;
        let st = self
            .ram
            .write_tested_round(&mut self.w, source, runs, tested)?;
        self.put_footer(id)?;
        self.ram_rounds += 1;
        Ok(st)
    }

    /// A SECTION_PART for each iterative handler in `handlers`.
    pub fn save_iterate(
        &mut self,
        handlers: &mut [&mut dyn SectionHandler],
    ) -> Result<(), MigrationError> {
        self.expect(SaveState::Iterating, "save_iterate")?;
        for h in handlers.iter_mut().filter(|h| h.is_iterative()) {
            let id = self.iterative_id(&**h)?;
            self.put_part_end(SectionType::PART, id)?;
            h.save(SectionPhase::Part, &mut self.w)?;
            self.put_footer(id)?;
        }
        Ok(())
    }

    fn iterative_id(&self, h: &dyn SectionHandler) -> Result<u32, MigrationError> {
        self.iterative_ids
            .get(&(h.idstr().to_string(), h.instance_id()))
            .copied()
            .ok_or_else(|| {
                MigrationError::Usage(format!(
                    "migration saver: iterative section '{}' {} was not set up",
                    h.idstr(),
                    h.instance_id()
                ))
            })
    }

    /// Completion: (SWITCHOVER_START if asked), the `ram` END with `final_pages`, an END for each
    /// iterative handler, a FULL for each other handler, EOF and the VMDESCRIPTION. Flushes.
    pub fn save_complete(
        &mut self,
        source: &dyn RamSource,
        final_pages: impl IntoIterator<Item = PageRef>,
        handlers: &mut [&mut dyn SectionHandler],
    ) -> Result<SaveSummary, MigrationError> {
        self.expect(SaveState::Iterating, "save_complete")?;
        if self.opts.send_switchover_start {
            self.w.put_u8(SectionType::COMMAND)?;
            self.w.put_be16(Command::SWITCHOVER_START)?;
            self.w.put_be16(0)?;
        }
        let id = self.ram_section_id;
        self.put_part_end(SectionType::END, id)?;
        let mut final_pages = final_pages.into_iter().peekable();
        if self.mapped_ram && final_pages.peek().is_some() {
            return Err(MigrationError::Usage(
                "a mapped-ram file has no page records".to_string(),
            ));
        }
        self.ram.write_round(&mut self.w, source, final_pages)?;
        self.put_footer(id)?;
        for h in handlers.iter_mut().filter(|h| h.is_iterative()) {
            let id = self.iterative_id(&**h)?;
            self.put_part_end(SectionType::END, id)?;
            h.save(SectionPhase::End, &mut self.w)?;
            self.put_footer(id)?;
        }
        for h in handlers.iter_mut().filter(|h| !h.is_iterative()) {
            let id = self.new_section_id();
            let (idstr, inst, ver) = (h.idstr().to_string(), h.instance_id(), h.version_id());
            // The payload is staged so the VMDESCRIPTION can give its size.
            let mut staged = QemuWriter::new(Vec::new());
            h.save(SectionPhase::Full, &mut staged)?;
            let payload = staged.into_inner();
            self.put_start_full(SectionType::FULL, id, &idstr, inst, ver)?;
            self.w.put_buffer(&payload)?;
            self.put_footer(id)?;
            self.vmdesc_devices.push(format!(
                "{{\"name\":{n},\"instance_id\":{inst},\"vmsd_name\":{n},\"version\":{ver},\
                 \"fields\":[{{\"name\":\"data\",\"type\":\"buffer\",\"size\":{}}}]}}",
                payload.len(),
                n = json_string(&idstr),
            ));
        }
        self.w.put_u8(SectionType::EOF)?;
        if self.opts.vmdesc {
            let json = self.vmdesc_json();
            self.w.put_u8(SectionType::VMDESCRIPTION)?;
            self.w.put_be32(json.len() as u32)?;
            self.w.put_buffer(json.as_bytes())?;
        }
        self.w.flush()?;
        self.state = SaveState::Complete;
        Ok(SaveSummary {
            ram: self.ram.stats(),
            bytes: self.w.position(),
            ram_rounds: self.ram_rounds,
        })
    }

    /// The VMDESCRIPTION JSON: page size and one entry per FULL section written.
    pub fn vmdesc_json(&self) -> String {
        format!(
            "{{\"page_size\":{TARGET_PAGE_SIZE},\"devices\":[{}]}}",
            self.vmdesc_devices.join(",")
        )
    }

    /// The writer, after [`Saver::save_complete`] (or to abandon a stream).
    pub fn into_inner(self) -> W {
        self.w.into_inner()
    }
}

/// A JSON string literal.
pub(crate) fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A whole non-live stream in one call: setup, one round with every page, completion with no
/// further pages and the FULL sections of `handlers`.
pub fn save_stream<W: StreamWrite>(
    out: W,
    opts: SaveOptions,
    source: &dyn RamSource,
    handlers: &mut [&mut dyn SectionHandler],
) -> Result<(W, SaveSummary), MigrationError> {
    let blocks = source.blocks();
    let mut s = Saver::new(out, opts, blocks.clone())?;
    s.save_setup(handlers)?;
    s.save_pages(source, super::ram::all_pages(&blocks))?;
    let summary = s.save_complete(source, std::iter::empty(), handlers)?;
    Ok((s.into_inner(), summary))
}

/// A whole mapped-ram file in one call (QEMU 10's `file:` + `mapped-ram`, non-live).
pub fn save_mapped_ram_file<W: StreamWrite + Seek>(
    out: W,
    opts: SaveOptions,
    source: &dyn RamSource,
    handlers: &mut [&mut dyn SectionHandler],
) -> Result<(W, SaveSummary), MigrationError> {
    let mut s = Saver::new(out, opts, source.blocks())?;
    s.save_setup_mapped_ram(source, handlers)?;
    let summary = s.save_complete(source, std::iter::empty(), handlers)?;
    Ok((s.into_inner(), summary))
}

/// A section the loader met.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionSeen {
    pub section_type: u8,
    pub section_id: u32,
    pub idstr: String,
}

/// What a successful load read and applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadSummary {
    pub configuration: Option<Configuration>,
    pub ram: RamLoadStats,
    /// Every section in stream order (START/PART/END/FULL).
    pub sections: Vec<SectionSeen>,
    /// COMMAND numbers in stream order.
    pub commands: Vec<u16>,
    /// The VMDESCRIPTION JSON, if the stream ended with one.
    pub vmdesc: Option<String>,
    /// The lines QEMU 10 prints on stderr for this stream while still loading it (no vmdesc,
    /// a uuid with none set locally), as it prints them, without the program-name prefix.
    pub warnings: Vec<String>,
    /// Bytes read (for mapped-ram: the file offset where the stream ended).
    pub bytes: u64,
}

/// Loads a stream from a pipe, socket or any front-to-back reader.
pub fn load<R: Read>(
    input: R,
    opts: &LoadOptions,
    ram: Option<&mut dyn RamLoadTarget>,
    handlers: &mut [&mut dyn SectionHandler],
) -> Result<LoadSummary, LoadError> {
    let mut r = QemuReader::new(ChunkReader::sequential(input));
    load_from(&mut r, opts, ram, handlers)
}

/// Loads a stream from a file positioned at its start; also reads mapped-ram files.
pub fn load_file<R: Read + Seek>(
    input: R,
    opts: &LoadOptions,
    ram: Option<&mut dyn RamLoadTarget>,
    handlers: &mut [&mut dyn SectionHandler],
) -> Result<LoadSummary, LoadError> {
    let mut r = QemuReader::new(ChunkReader::seekable(input));
    load_from(&mut r, opts, ram, handlers)
}

/// Who a stream section id belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Ram,
    Handler(usize),
}

struct Loader<'o, 'r, 'hs, 'h> {
    opts: &'o LoadOptions,
    ram_target: Option<&'r mut dyn RamLoadTarget>,
    ram: RamLoader,
    handlers: &'hs mut [&'h mut dyn SectionHandler],
    /// Stream section id -> owner and idstr, from START/FULL (a handler keeps its latest id).
    by_id: HashMap<u32, (Owner, String)>,
    /// Stream section id -> the version its START gave.
    versions: HashMap<u32, u32>,
    summary: LoadSummary,
}

/// The loader state machine over any [`StreamRead`].
pub fn load_from(
    r: &mut QemuReader<dyn StreamRead + '_>,
    opts: &LoadOptions,
    ram: Option<&mut dyn RamLoadTarget>,
    handlers: &mut [&mut dyn SectionHandler],
) -> Result<LoadSummary, LoadError> {
    let mut l = Loader {
        opts,
        ram_target: ram,
        ram: RamLoader::new(opts.mapped_ram),
        handlers,
        by_id: HashMap::new(),
        versions: HashMap::new(),
        summary: LoadSummary::default(),
    };
    let result = l.run(r);
    let pos = r.position();
    match result {
        Ok(()) => {
            let mut summary = l.summary;
            summary.ram = l.ram.into_stats();
            summary.bytes = pos;
            Ok(summary)
        }
        Err((error, context)) => Err(LoadError {
            error,
            context,
            offset: pos,
        }),
    }
}

type Failure = (MigrationError, Option<SectionContext>);

fn bare(e: MigrationError) -> Failure {
    (e, None)
}

impl Loader<'_, '_, '_, '_> {
    fn run(&mut self, r: &mut QemuReader<dyn StreamRead + '_>) -> Result<(), Failure> {
        self.header(r).map_err(bare)?;
        loop {
            let t = r.get_u8("a section type").map_err(bare)?;
            match t {
                SectionType::START | SectionType::FULL => self.start_full(r, t)?,
                SectionType::PART | SectionType::END => self.part_end(r, t)?,
                SectionType::COMMAND => self.command(r).map_err(bare)?,
                SectionType::EOF => break,
                _ => return Err(bare(MigrationError::UnknownSectionType { section_type: t })),
            }
        }
        self.vmdesc(r).map_err(bare)
    }

    fn header(&mut self, r: &mut QemuReader<dyn StreamRead + '_>) -> Result<(), MigrationError> {
        let magic = r.get_be32("the file magic")?;
        if magic != FileHeader::MAGIC {
            return Err(MigrationError::BadMagic { magic });
        }
        let version = r.get_be32("the stream version")?;
        if version == FileHeader::VERSION_COMPAT {
            return Err(MigrationError::ObsoleteVersion);
        }
        if version != FileHeader::VERSION {
            return Err(MigrationError::UnsupportedVersion { version });
        }
        if !self.opts.expect_configuration {
            return Ok(());
        }
        // QEMU reads the byte whether or not the stream has one; at the end of the stream it
        // reads 0, so a stream of only the header is "Configuration section missing" too.
        if r.peek_u8()? != Some(SectionType::CONFIGURATION) {
            return Err(MigrationError::ConfigurationMissing);
        }
        r.get_u8("the CONFIGURATION marker")?;
        let c = Configuration::read(r)?;
        let warnings = self.opts.check_configuration(&c)?;
        self.summary.warnings.extend(warnings);
        self.summary.configuration = Some(c);
        Ok(())
    }

    fn start_full(
        &mut self,
        r: &mut QemuReader<dyn StreamRead + '_>,
        t: u8,
    ) -> Result<(), Failure> {
        let section_id = r.get_be32("a section id").map_err(bare)?;
        let idstr = r.get_counted_string("a section idstr").map_err(bare)?;
        let instance_id = r.get_be32("a section instance id").map_err(bare)?;
        let version_id = r.get_be32("a section version").map_err(bare)?;
        let unknown = || MigrationError::UnknownSection {
            idstr: idstr.clone(),
            instance_id,
        };
        let is_ram = idstr == RamSectionId::IDSTR
            && instance_id == RamSectionId::INSTANCE_ID
            && self.ram_target.is_some();
        let (owner, local_version) = if is_ram {
            (Owner::Ram, RamSectionId::VERSION_ID)
        } else {
            let i = self
                .handlers
                .iter()
                .position(|h| h.idstr() == idstr && h.instance_id() == instance_id)
                .ok_or_else(|| bare(unknown()))?;
            (Owner::Handler(i), self.handlers[i].version_id())
        };
        if version_id > local_version {
            return Err(bare(MigrationError::UnsupportedSectionVersion {
                version: version_id,
                idstr,
                local_version,
            }));
        }
        self.by_id.retain(|_, (o, _)| *o != owner);
        self.by_id.insert(section_id, (owner, idstr.clone()));
        self.summary.sections.push(SectionSeen {
            section_type: t,
            section_id,
            idstr: idstr.clone(),
        });
        let phase = if t == SectionType::START {
            SectionPhase::Start
        } else {
            SectionPhase::Full
        };
        self.payload(r, owner, phase, version_id).map_err(|e| {
            (
                e,
                Some(SectionContext::StartFull {
                    idstr: idstr.clone(),
                    instance_id,
                }),
            )
        })?;
        self.versions.insert(section_id, version_id);
        footer(r, section_id, &idstr).map_err(bare)
    }

    fn part_end(&mut self, r: &mut QemuReader<dyn StreamRead + '_>, t: u8) -> Result<(), Failure> {
        let section_id = r.get_be32("a section id").map_err(bare)?;
        let Some((owner, idstr)) = self.by_id.get(&section_id).cloned() else {
            return Err(bare(MigrationError::UnknownSectionId { section_id }));
        };
        self.summary.sections.push(SectionSeen {
            section_type: t,
            section_id,
            idstr: idstr.clone(),
        });
        let phase = if t == SectionType::PART {
            SectionPhase::Part
        } else {
            SectionPhase::End
        };
        let version = self.versions.get(&section_id).copied().unwrap_or(0);
        self.payload(r, owner, phase, version).map_err(|e| {
            (
                e,
                Some(SectionContext::PartEnd {
                    idstr: idstr.clone(),
                    section_id,
                }),
            )
        })?;
        footer(r, section_id, &idstr).map_err(bare)
    }

    fn payload(
        &mut self,
        r: &mut QemuReader<dyn StreamRead + '_>,
        owner: Owner,
        phase: SectionPhase,
        version_id: u32,
    ) -> Result<(), MigrationError> {
        match owner {
            Owner::Ram => {
                let target = self
                    .ram_target
                    .as_deref_mut()
                    .expect("ram sections are only owned when a target exists");
                self.ram.load_section(target, r, version_id)
            }
            Owner::Handler(i) => self.handlers[i].load(phase, version_id, r),
        }
    }

    fn command(&mut self, r: &mut QemuReader<dyn StreamRead + '_>) -> Result<(), MigrationError> {
        let cmd = r.get_be16("a command number")?;
        let len = r.get_be16("a command length")?;
        if cmd >= Command::MAX || cmd == Command::INVALID {
            return Err(MigrationError::UnknownCommand { cmd, len });
        }
        if let Some(expected) = Command::fixed_len(cmd) {
            if expected != len {
                return Err(MigrationError::CommandBadLength {
                    name: Command::name(cmd),
                    expected,
                    got: len,
                });
            }
        }
        self.summary.commands.push(cmd);
        match cmd {
            Command::SWITCHOVER_START => Ok(()),
            Command::PING => r.get_be32("a PING's value").map(drop),
            _ => Err(MigrationError::UnsupportedCommand {
                cmd,
                name: Command::name(cmd),
            }),
        }
    }

    /// After EOF: QEMU reads a VMDESCRIPTION if there is one and only warns when there is not.
    fn vmdesc(&mut self, r: &mut QemuReader<dyn StreamRead + '_>) -> Result<(), MigrationError> {
        match r.peek_u8()? {
            Some(SectionType::VMDESCRIPTION) => {
                r.get_u8("the VMDESCRIPTION marker")?;
                let len = r.get_be32("the VMDESCRIPTION length")?;
                let mut json = vec![0u8; len.min(16 << 20) as usize];
                r.read_exact(&mut json, "the VMDESCRIPTION")?;
                r.skip(u64::from(len) - json.len() as u64, "the VMDESCRIPTION")?;
                self.summary.vmdesc = Some(String::from_utf8_lossy(&json).into_owned());
            }
            other => {
                let got = other.unwrap_or(0);
                self.summary
                    .warnings
                    .push(format!("Expected vmdescription section, but got {got}"));
            }
        }
        Ok(())
    }
}

fn footer(
    r: &mut QemuReader<dyn StreamRead + '_>,
    section_id: u32,
    idstr: &str,
) -> Result<(), MigrationError> {
    let mark = r.get_u8("a section footer")?;
    if mark != SectionType::FOOTER {
        return Err(MigrationError::MissingFooter {
            idstr: idstr.to_string(),
        });
    }
    let read = r.get_be32("a section footer's id")?;
    if read != section_id {
        return Err(MigrationError::MismatchedFooter {
            idstr: idstr.to_string(),
            read,
            expected: section_id,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::format::RamFlag;
    use crate::migration::ram::all_pages;
    use crate::migration::ram::tests::VecRam;
    use crate::migration::section::BufferSection;
    use proptest::prelude::*;
    use std::io::Cursor;

    const PAGE: u64 = TARGET_PAGE_SIZE as u64;

    /// A stream assembled piece by piece, for the corrupt ones.
    struct B(QemuWriter<Vec<u8>>);

    impl B {
        fn new() -> Self {
            B(QemuWriter::new(Vec::new()))
        }
        fn header(mut self) -> Self {
            self.0.put_be32(FileHeader::MAGIC).unwrap();
            self.0.put_be32(FileHeader::VERSION).unwrap();
            self
        }
        fn config(mut self, c: &Configuration) -> Self {
            self.0.put_u8(SectionType::CONFIGURATION).unwrap();
            c.write(&mut self.0).unwrap();
            self
        }
        fn begin(self) -> Self {
            self.header().config(&Configuration::new("none"))
        }
        fn start(mut self, t: u8, id: u32, idstr: &str, inst: u32, ver: u32) -> Self {
            self.0.put_u8(t).unwrap();
            self.0.put_be32(id).unwrap();
            self.0.put_counted_string(idstr).unwrap();
            self.0.put_be32(inst).unwrap();
            self.0.put_be32(ver).unwrap();
            self
        }
        fn part(mut self, t: u8, id: u32) -> Self {
            self.0.put_u8(t).unwrap();
            self.0.put_be32(id).unwrap();
            self
        }
        fn footer(mut self, id: u32) -> Self {
            self.0.put_u8(SectionType::FOOTER).unwrap();
            self.0.put_be32(id).unwrap();
            self
        }
        fn be64(mut self, v: u64) -> Self {
            self.0.put_be64(v).unwrap();
            self
        }
        fn bytes(mut self, b: &[u8]) -> Self {
            self.0.put_buffer(b).unwrap();
            self
        }
        fn ram_setup(self, id: u32, blocks: &[(&str, u64)]) -> Self {
            let mut s = RamSaver::new(
                blocks
                    .iter()
                    .map(|(n, l)| RamBlockInfo::new(n, *l))
                    .collect(),
            )
            .unwrap();
            let mut w = QemuWriter::new(Vec::new());
            s.write_setup(&mut w).unwrap();
            self.start(SectionType::START, id, "ram", 0, 4)
                .bytes(&w.into_inner())
                .footer(id)
        }
        fn eof(self) -> Self {
            self.bytes(&[SectionType::EOF])
        }
        fn done(self) -> Vec<u8> {
            self.0.into_inner()
        }
    }

    fn ram16() -> VecRam {
        VecRam::new(&[("ram", 16 * PAGE)])
    }

    fn load_with(
        bytes: Vec<u8>,
        opts: &LoadOptions,
        ram: &mut VecRam,
        handlers: &mut [&mut dyn SectionHandler],
    ) -> Result<LoadSummary, LoadError> {
        load(Cursor::new(bytes), opts, Some(ram), handlers)
    }

    fn fail(bytes: Vec<u8>) -> LoadError {
        load_with(bytes, &LoadOptions::new("none"), &mut ram16(), &mut []).unwrap_err()
    }

    fn fail_lines(bytes: Vec<u8>) -> Vec<String> {
        fail(bytes).qemu_lines()
    }

    // --- header ---

    #[test]
    fn bad_magic_is_not_a_migration_stream() {
        assert_eq!(
            fail_lines(b"XXXX\0\0\0\x03".to_vec()),
            [
                "Not a migration stream",
                "load of migration failed: Invalid argument"
            ]
        );
    }

    #[test]
    fn version_2_is_obsolete() {
        let b = B::new().be64(((FileHeader::MAGIC as u64) << 32) | 2).done();
        assert_eq!(
            fail_lines(b),
            [
                "SaveVM v2 format is obsolete and don't work anymore",
                "load of migration failed: Operation not supported"
            ]
        );
    }

    #[test]
    fn version_4_is_unsupported() {
        let b = B::new().be64(((FileHeader::MAGIC as u64) << 32) | 4).done();
        assert_eq!(
            fail(b).error.to_string(),
            "Unsupported migration stream version"
        );
    }

    #[test]
    fn stream_without_configuration_is_refused_unless_not_expected() {
        let b = B::new().header().eof().done();
        assert_eq!(
            fail_lines(b.clone()),
            [
                "Configuration section missing",
                "load of migration failed: Invalid argument"
            ]
        );
        let mut opts = LoadOptions::new("none");
        opts.expect_configuration = false;
        let s = load_with(b, &opts, &mut ram16(), &mut []).unwrap();
        assert!(s.configuration.is_none());
        // A stream that is only its header: QEMU reads a 0 there, so "missing" as well.
        assert_eq!(
            fail(B::new().header().done()).error.to_string(),
            "Configuration section missing"
        );
    }

    #[test]
    fn machine_type_mismatch_uses_qemus_message() {
        let b = B::new()
            .header()
            .config(&Configuration::new("pc-i440fx-7.2"))
            .eof()
            .done();
        let e = load_with(
            b,
            &LoadOptions::new("pc-i440fx-10.0"),
            &mut ram16(),
            &mut [],
        )
        .unwrap_err();
        assert_eq!(
            e.qemu_lines(),
            [
                "Machine type received is 'pc-i440fx-7.2' and local is 'pc-i440fx-10.0'",
                "load of migration failed: Invalid argument"
            ]
        );
    }

    #[test]
    fn received_machine_type_that_prefixes_the_local_one_passes_like_qemu() {
        for received in ["pc", "", "pc-i440fx-10.0"] {
            let b = B::new()
                .header()
                .config(&Configuration::new(received))
                .eof()
                .done();
            let opts = LoadOptions::new("pc-i440fx-10.0");
            assert!(
                load_with(b, &opts, &mut ram16(), &mut []).is_ok(),
                "{received:?}"
            );
        }
        // Longer than the local name fails, as QEMU's strncmp meets the local NUL.
        let b = B::new()
            .header()
            .config(&Configuration::new("none2"))
            .eof()
            .done();
        assert!(matches!(
            fail(b).error,
            MigrationError::MachineTypeMismatch { .. }
        ));
    }

    #[test]
    fn machine_type_comparison_is_qemus_strncmp() {
        assert!(qemu_strncmp_eq(b"pc", b"pc-i440fx-10.0"));
        assert!(qemu_strncmp_eq(b"", b"none"));
        assert!(
            qemu_strncmp_eq(b"none\0junk", b"none"),
            "stops at the common NUL"
        );
        assert!(
            !qemu_strncmp_eq(b"pc\0", b"pc-q35"),
            "received NUL against local '-'"
        );
        assert!(!qemu_strncmp_eq(b"nonf", b"none"));
        assert!(!qemu_strncmp_eq(b"none2", b"none"));
        let mut c = Configuration::new("x");
        c.machine_type = "nonf\0tail".into();
        let e = LoadOptions::new("none")
            .check_configuration(&c)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Machine type received is 'nonf' and local is 'none'"
        );
    }

    #[test]
    fn exact_machine_type_check_refuses_a_prefix() {
        let b = B::new()
            .header()
            .config(&Configuration::new("pc"))
            .eof()
            .done();
        let mut opts = LoadOptions::new("pc-i440fx-10.0");
        opts.machine_type_check = MachineTypeCheck::Exact;
        let e = load_with(b, &opts, &mut ram16(), &mut []).unwrap_err();
        assert_eq!(
            e.error.to_string(),
            "Machine type received is 'pc' and local is 'pc-i440fx-10.0'"
        );
    }

    #[test]
    fn target_page_bits_must_match() {
        let mut c = Configuration::new("none");
        c.target_page_bits = Some(16);
        let e = fail(B::new().header().config(&c).eof().done());
        assert_eq!(
            e.error.to_string(),
            "Received TARGET_PAGE_BITS is 16 but local is 12"
        );
        c.target_page_bits = Some(12);
        let s = load_with(
            B::new().header().config(&c).eof().done(),
            &LoadOptions::new("none"),
            &mut ram16(),
            &mut [],
        )
        .unwrap();
        assert_eq!(s.configuration.unwrap().target_page_bits, Some(12));
    }

    #[test]
    fn validated_capabilities_must_match_both_ways() {
        let mut c = Configuration::new("none");
        c.capabilities = vec!["mapped-ram".into()];
        let stream = B::new().header().config(&c).eof().done();
        assert_eq!(
            fail_lines(stream.clone()),
            [
                "Capability mapped-ram is off, but received capability is on",
                "load of migration failed: Invalid argument"
            ]
        );
        let mut opts = LoadOptions::new("none");
        opts.mapped_ram = true;
        assert!(load_with(stream, &opts, &mut ram16(), &mut []).is_ok());
        let plain = B::new().begin().eof().done();
        let e = load_with(plain, &opts, &mut ram16(), &mut []).unwrap_err();
        assert_eq!(
            e.error.to_string(),
            "Capability mapped-ram is on, but received capability is off"
        );
    }

    #[test]
    fn capabilities_qemu_does_not_validate_are_accepted() {
        let mut c = Configuration::new("none");
        c.capabilities = vec!["xbzrle".into()];
        let s = load_with(
            B::new().header().config(&c).eof().done(),
            &LoadOptions::new("none"),
            &mut ram16(),
            &mut [],
        )
        .unwrap();
        assert_eq!(s.configuration.unwrap().capabilities, ["xbzrle"]);
    }

    #[test]
    fn implausibly_long_machine_type_is_refused_before_allocating() {
        let b = B::new().header().bytes(&[7, 0, 0x10, 0, 1]).done();
        assert!(matches!(
            fail(b).error,
            MigrationError::MachineTypeTooLong { len: 0x100001 }
        ));
    }

    #[test]
    fn unknown_capability_name_is_refused() {
        let mut c = Configuration::new("none");
        c.capabilities = vec!["warp-drive".into()];
        assert_eq!(
            fail(B::new().header().config(&c).eof().done())
                .error
                .to_string(),
            "Received unknown capability warp-drive"
        );
    }

    #[test]
    fn uuid_is_checked_when_both_sides_have_one() {
        let mut c = Configuration::new("none");
        let u = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8,
        ];
        c.uuid = Some(u);
        let stream = B::new().header().config(&c).eof().done();
        let s = load_with(
            stream.clone(),
            &LoadOptions::new("none"),
            &mut ram16(),
            &mut [],
        )
        .unwrap();
        assert_eq!(
            s.warnings[0],
            "warning: UUID is received 12345678-9abc-def0-0102-030405060708, but local uuid \
             isn't set"
        );
        let mut opts = LoadOptions::new("none");
        opts.uuid = Some([0; 16]);
        let e = load_with(stream, &opts, &mut ram16(), &mut []).unwrap_err();
        assert_eq!(
            e.error.to_string(),
            "UUID received is 12345678-9abc-def0-0102-030405060708 and local is \
             00000000-0000-0000-0000-000000000000"
        );
    }

    #[test]
    fn configuration_round_trips_with_every_subsection() {
        let c = Configuration {
            machine_type: "s390-ccw-virtio-10.0".into(),
            target_page_bits: Some(12),
            capabilities: vec!["x-ignore-shared".into(), "mapped-ram".into()],
            uuid: Some([7; 16]),
        };
        let mut w = QemuWriter::new(Vec::new());
        c.write(&mut w).unwrap();
        let bytes = w.into_inner();
        assert_eq!(&bytes[..4], &20u32.to_be_bytes());
        assert!(bytes
            .windows(31)
            .any(|x| x == b"\x1econfiguration/target-page-bits"));
        let mut r = QemuReader::new(Cursor::new(bytes));
        assert_eq!(Configuration::read(&mut r).unwrap(), c);
    }

    #[test]
    fn unknown_configuration_subsection_is_refused() {
        let b = B::new()
            .header()
            .config(&Configuration::new("none"))
            .bytes(b"\x05\x12configuration/warp\0\0\0\x01")
            .eof()
            .done();
        let e = fail(b);
        assert!(matches!(e.error, MigrationError::UnknownSubsection { .. }));
        // QEMU prints no line of its own for it.
        assert_eq!(
            e.qemu_lines(),
            ["load of migration failed: No such file or directory"]
        );
    }

    // --- framing ---

    #[test]
    fn unknown_section_names_idstr_and_instance() {
        let b = B::new()
            .begin()
            .start(SectionType::FULL, 3, "floppy", 1, 1)
            .done();
        assert_eq!(
            fail_lines(b),
            [
                "Unknown savevm section or instance 'floppy' 1. Make sure that your current VM \
                 setup matches your saved VM setup, including any hotplugged devices",
                "load of migration failed: Invalid argument"
            ]
        );
    }

    #[test]
    fn newer_section_version_is_refused() {
        let b = B::new()
            .begin()
            .start(SectionType::START, 1, "ram", 0, 5)
            .done();
        assert_eq!(
            fail(b).error.to_string(),
            "savevm: unsupported version 5 for 'ram' v4"
        );
        let mut dev = BufferSection::new("timer", 0, 2, vec![0; 4]);
        let b = B::new()
            .begin()
            .start(SectionType::FULL, 1, "timer", 0, 3)
            .done();
        let e = load_with(b, &LoadOptions::new("none"), &mut ram16(), &mut [&mut dev]).unwrap_err();
        assert_eq!(
            e.error.to_string(),
            "savevm: unsupported version 3 for 'timer' v2"
        );
    }

    #[test]
    fn older_ram_version_fails_silently_with_qemus_context() {
        let b = B::new()
            .begin()
            .start(SectionType::START, 1, "ram", 0, 3)
            .done();
        assert_eq!(
            fail_lines(b),
            [
                "error while loading state for instance 0x0 of device 'ram'",
                "load of migration failed: Invalid argument"
            ]
        );
    }

    #[test]
    fn unknown_section_type_byte() {
        let b = B::new().begin().bytes(&[0x09]).done();
        assert_eq!(fail(b).error.to_string(), "Unknown savevm section type 9");
    }

    #[test]
    fn missing_footer_names_the_section() {
        let b = B::new()
            .begin()
            .start(SectionType::START, 1, "ram", 0, 4)
            .be64(RamFlag::EOS)
            .bytes(&[SectionType::EOF])
            .done();
        assert_eq!(
            fail_lines(b),
            [
                "Missing section footer for ram",
                "load of migration failed: Invalid argument"
            ]
        );
    }

    #[test]
    fn mismatched_footer_gives_both_ids() {
        let b = B::new()
            .begin()
            .start(SectionType::START, 1, "ram", 0, 4)
            .be64(RamFlag::EOS)
            .footer(0)
            .done();
        assert_eq!(
            fail(b).error.to_string(),
            "Mismatched section id in footer for ram - read 0x0 expected 0x1"
        );
    }

    #[test]
    fn any_section_id_works_when_used_consistently() {
        let b = B::new()
            .begin()
            .ram_setup(77, &[("ram", 16 * PAGE)])
            .part(SectionType::END, 77)
            .be64((3 * PAGE) | RamFlag::PAGE)
            .bytes(b"\x03ram")
            .bytes(&[0x42; TARGET_PAGE_SIZE])
            .be64(RamFlag::EOS)
            .footer(77)
            .eof()
            .done();
        let mut ram = ram16();
        let s = load_with(b, &LoadOptions::new("none"), &mut ram, &mut []).unwrap();
        assert_eq!(ram.page(0, 3 * PAGE), &[0x42; TARGET_PAGE_SIZE][..]);
        assert_eq!(
            s.sections.iter().map(|x| x.section_id).collect::<Vec<_>>(),
            [77, 77]
        );
    }

    #[test]
    fn part_for_an_id_no_start_named_is_unknown() {
        let b = B::new()
            .begin()
            .ram_setup(1, &[("ram", 16 * PAGE)])
            .part(SectionType::PART, 2)
            .done();
        assert_eq!(fail(b).error.to_string(), "Unknown savevm section 2");
    }

    #[test]
    fn ram_error_in_a_part_names_the_section_id() {
        let b = B::new()
            .begin()
            .ram_setup(1, &[("ram", 16 * PAGE)])
            .part(SectionType::PART, 1)
            .be64((16 * PAGE) | RamFlag::ZERO)
            .bytes(b"\x03ram\0")
            .done();
        assert_eq!(
            fail_lines(b),
            [
                "Illegal RAM offset 10000",
                "error while loading state section id 1(ram)",
                "load of migration failed: Invalid argument"
            ]
        );
    }

    #[test]
    fn truncation_inside_ram_keeps_qemus_context_and_eio() {
        let mut b = B::new()
            .begin()
            .ram_setup(1, &[("ram", 16 * PAGE)])
            .part(SectionType::PART, 1)
            .done();
        b.extend_from_slice(&[0, 0, 0]);
        let e = fail(b);
        assert!(matches!(
            e.error,
            MigrationError::Truncated {
                what: "a RAM record header",
                ..
            }
        ));
        assert_eq!(
            e.qemu_lines()[1..],
            [
                "error while loading state section id 1(ram)",
                "load of migration failed: Input/output error"
            ]
        );
    }

    #[test]
    fn unknown_ramblock_in_setup_has_the_start_context() {
        let b = B::new().begin().ram_setup(1, &[("zz", 16 * PAGE)]).done();
        assert_eq!(
            fail_lines(b),
            [
                "Unknown ramblock \"zz\", cannot accept migration",
                "error while loading state for instance 0x0 of device 'ram'",
                "load of migration failed: Invalid argument"
            ]
        );
    }

    #[test]
    fn handler_error_is_reported_inside_its_section() {
        let mut dev = BufferSection::new("timer", 0, 2, vec![0; 64]);
        let b = B::new()
            .begin()
            .start(SectionType::FULL, 5, "timer", 0, 2)
            .bytes(&[1; 10])
            .done();
        let e = load_with(b, &LoadOptions::new("none"), &mut ram16(), &mut [&mut dev]).unwrap_err();
        assert_eq!(
            e.context,
            Some(SectionContext::StartFull {
                idstr: "timer".into(),
                instance_id: 0
            })
        );
    }

    // --- commands ---

    #[test]
    fn switchover_start_is_accepted_like_qemu_10() {
        let b = B::new().begin().bytes(&[8, 0, 0x0b, 0, 0]).eof().done();
        let s = load_with(b, &LoadOptions::new("none"), &mut ram16(), &mut []).unwrap();
        assert_eq!(s.commands, [Command::SWITCHOVER_START]);
    }

    #[test]
    fn ping_is_read_and_ignored() {
        let b = B::new()
            .begin()
            .bytes(&[8, 0, 2, 0, 4, 0, 0, 0, 9])
            .eof()
            .done();
        let s = load_with(b, &LoadOptions::new("none"), &mut ram16(), &mut []).unwrap();
        assert_eq!(s.commands, [Command::PING]);
    }

    #[test]
    fn unknown_command_number() {
        let b = B::new().begin().bytes(&[8, 0, 0x0c, 0, 3]).done();
        assert_eq!(fail(b).error.to_string(), "MIG_CMD 0xc unknown (len 0x3)");
        let b = B::new().begin().bytes(&[8, 0, 0, 0, 0]).done();
        assert_eq!(fail(b).error.to_string(), "MIG_CMD 0x0 unknown (len 0x0)");
    }

    #[test]
    fn command_with_the_wrong_length_is_out_of_range() {
        let b = B::new().begin().bytes(&[8, 0, 0x0b, 0, 1, 0]).done();
        assert_eq!(
            fail_lines(b),
            [
                "SWITCHOVER_START received with bad length - expecting 0, got 1",
                "load of migration failed: Numerical result out of range"
            ]
        );
    }

    #[test]
    fn postcopy_commands_are_not_supported() {
        let b = B::new().begin().bytes(&[8, 0, 5, 0, 0]).done();
        assert!(matches!(
            fail(b).error,
            MigrationError::UnsupportedCommand { cmd: 5, .. }
        ));
    }

    // --- trailer ---

    #[test]
    fn missing_vmdesc_is_only_a_warning() {
        let s = load_with(
            B::new().begin().eof().done(),
            &LoadOptions::new("none"),
            &mut ram16(),
            &mut [],
        )
        .unwrap();
        assert_eq!(s.warnings, ["Expected vmdescription section, but got 0"]);
        assert!(s.vmdesc.is_none());
        let b = B::new().begin().eof().bytes(&[0x42]).done();
        let s = load_with(b, &LoadOptions::new("none"), &mut ram16(), &mut []).unwrap();
        assert_eq!(s.warnings, ["Expected vmdescription section, but got 66"]);
    }

    // --- saver ---

    fn sample_ram() -> VecRam {
        let mut ram = VecRam::new(&[("pc.ram", 32 * PAGE), ("vga.vram", 8 * PAGE)]);
        ram.fill(0, 5 * PAGE, 0xa5);
        ram.blocks[1].1[3 * PAGE as usize + 17] = 9;
        ram
    }

    #[test]
    fn saver_stream_layout_matches_qemus() {
        let src = sample_ram();
        let mut dev = BufferSection::new("timer", 0, 2, vec![1, 2, 3, 4]);
        let (bytes, summary) =
            save_stream(Vec::new(), SaveOptions::new("none"), &src, &mut [&mut dev]).unwrap();
        assert_eq!(&bytes[..8], b"QEVM\0\0\0\x03");
        assert_eq!(&bytes[8..17], b"\x07\0\0\0\x04none");
        assert_eq!(&bytes[17..30], b"\x01\0\0\0\x01\x03ram\0\0\0\0");
        assert_eq!(
            summary.ram,
            RamSaveStats {
                normal_pages: 2,
                zero_pages: 38
            }
        );
        assert_eq!(summary.bytes, bytes.len() as u64);
        assert!(
            !bytes.windows(5).any(|w| w == [8, 0, 0x0b, 0, 0]),
            "no SWITCHOVER_START by default"
        );
        let json = br#"{"page_size":4096,"devices":[{"name":"timer","instance_id":0,"vmsd_name":"timer","version":2,"fields":[{"name":"data","type":"buffer","size":4}]}]}"#;
        let tail = &bytes[bytes.len() - json.len() - 6..];
        assert_eq!(tail[0], SectionType::EOF);
        assert_eq!(tail[1], SectionType::VMDESCRIPTION);
        assert_eq!(&tail[2..6], &(json.len() as u32).to_be_bytes());
        assert_eq!(&tail[6..], json);
    }

    #[test]
    fn saver_writes_switchover_start_when_asked() {
        let src = sample_ram();
        let mut opts = SaveOptions::new("none");
        opts.send_switchover_start = true;
        opts.vmdesc = false;
        let (bytes, _) = save_stream(Vec::new(), opts, &src, &mut []).unwrap();
        let s = load_with(
            bytes.clone(),
            &LoadOptions::new("none"),
            &mut sample_ram(),
            &mut [],
        )
        .unwrap();
        assert_eq!(s.commands, [Command::SWITCHOVER_START]);
        assert!(s.vmdesc.is_none());
        assert_eq!(*bytes.last().unwrap(), SectionType::EOF);
    }

    #[test]
    fn without_configuration_both_sides_must_agree() {
        let mut opts = SaveOptions::new("s390-ccw-virtio-4.1");
        opts.send_configuration = false;
        let (bytes, _) = save_stream(Vec::new(), opts, &sample_ram(), &mut []).unwrap();
        assert_eq!(bytes[8], SectionType::START);
        // QEMU's send-configuration=off: no machine type check, whatever the local type.
        let mut off = LoadOptions::new("s390-ccw-virtio-10.0");
        off.expect_configuration = false;
        let s = load_with(bytes.clone(), &off, &mut sample_ram(), &mut []).unwrap();
        assert!(s.configuration.is_none());
        let on = LoadOptions::new("s390-ccw-virtio-4.1");
        assert_eq!(
            load_with(bytes, &on, &mut sample_ram(), &mut [])
                .unwrap_err()
                .error
                .to_string(),
            "Configuration section missing"
        );
        // A stream with one, into a loader that expects none: QEMU reads its marker as a
        // section type.
        let (bytes, _) =
            save_stream(Vec::new(), SaveOptions::new("none"), &sample_ram(), &mut []).unwrap();
        assert_eq!(
            load_with(bytes, &off, &mut sample_ram(), &mut [])
                .unwrap_err()
                .error
                .to_string(),
            "Unknown savevm section type 7"
        );
    }

    #[test]
    fn full_round_trip_with_rounds_devices_and_an_iterative_handler() {
        let mut src = sample_ram();
        struct Counter(u32);
        impl SectionHandler for Counter {
            fn idstr(&self) -> &str {
                "dirty-bitmap"
            }
            fn instance_id(&self) -> u32 {
                0
            }
            fn version_id(&self) -> u32 {
                1
            }
            fn is_iterative(&self) -> bool {
                true
            }
            fn save(
                &mut self,
                _: SectionPhase,
                out: &mut QemuWriter<dyn Write + '_>,
            ) -> Result<(), MigrationError> {
                self.0 += 1;
                out.put_be32(self.0)
            }
            fn load(
                &mut self,
                phase: SectionPhase,
                _: u32,
                input: &mut QemuReader<dyn StreamRead + '_>,
            ) -> Result<(), MigrationError> {
                let v = input.get_be32("counter")?;
                assert_eq!(v, self.0 + 1, "{phase:?}");
                self.0 = v;
                Ok(())
            }
        }
        let mut it = Counter(0);
        let mut dev = BufferSection::new("timer", 0, 2, vec![7; 24]);
        let mut s = Saver::new(Vec::new(), SaveOptions::new("none"), src.blocks()).unwrap();
        s.save_setup(&mut [&mut it, &mut dev]).unwrap();
        s.save_pages(&src, all_pages(&src.blocks())).unwrap();
        s.save_iterate(&mut [&mut it]).unwrap();
        // The guest dirties two pages; they go out again at completion.
        src.fill(0, 0, 0x11);
        src.fill(1, 7 * PAGE, 0x22);
        let dirty = [
            PageRef {
                block: 0,
                offset: 0,
            },
            PageRef {
                block: 1,
                offset: 7 * PAGE,
            },
        ];
        let summary = s
            .save_complete(&src, dirty, &mut [&mut it, &mut dev])
            .unwrap();
        assert_eq!(summary.ram_rounds, 1);
        assert_eq!(summary.ram.normal_pages, 4);
        let bytes = s.into_inner();

        let mut dst = VecRam::new(&[("pc.ram", 32 * PAGE), ("vga.vram", 8 * PAGE)]);
        let mut it2 = Counter(0);
        let mut dev2 = BufferSection::new("timer", 0, 2, vec![0; 24]);
        let l = load_with(
            bytes,
            &LoadOptions::new("none"),
            &mut dst,
            &mut [&mut it2, &mut dev2],
        )
        .unwrap();
        assert_eq!(dst.blocks, src.blocks);
        assert_eq!(it2.0, 3);
        assert_eq!(dev2.data, vec![7; 24]);
        assert_eq!(l.ram.normal_pages, 4);
        assert_eq!(l.ram.zero_pages, 38);
        assert_eq!(l.ram.sections, 3);
        let kinds: Vec<(u8, &str)> = l
            .sections
            .iter()
            .map(|x| (x.section_type, x.idstr.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (SectionType::START, "ram"),
                (SectionType::START, "dirty-bitmap"),
                (SectionType::PART, "ram"),
                (SectionType::PART, "dirty-bitmap"),
                (SectionType::END, "ram"),
                (SectionType::END, "dirty-bitmap"),
                (SectionType::FULL, "timer"),
            ]
        );
        assert!(l.vmdesc.unwrap().contains("\"name\":\"timer\""));
        assert!(l.warnings.is_empty());
    }

    #[test]
    fn saver_calls_out_of_order_are_refused() {
        let src = sample_ram();
        let mut s = Saver::new(Vec::new(), SaveOptions::new("none"), src.blocks()).unwrap();
        assert!(s.save_pages(&src, []).is_err());
        s.save_setup(&mut []).unwrap();
        assert!(s.save_setup(&mut []).is_err());
        s.save_complete(&src, [], &mut []).unwrap();
        assert!(s.save_complete(&src, [], &mut []).is_err());
    }

    #[test]
    fn mapped_ram_file_round_trips_and_has_qemus_layout() {
        let src = sample_ram();
        let mut dev = BufferSection::new("timer", 0, 2, vec![5; 8]);
        let (file, summary) = save_mapped_ram_file(
            Cursor::new(Vec::new()),
            SaveOptions::new("none"),
            &src,
            &mut [&mut dev],
        )
        .unwrap();
        let file = file.into_inner();
        assert_eq!(summary.bytes, file.len() as u64);
        assert_eq!(
            summary.ram,
            RamSaveStats {
                normal_pages: 2,
                zero_pages: 38
            }
        );
        // Block 0's header follows "\x06pc.ram" and its length; pages start at 1 MiB.
        let at = file.windows(7).position(|w| w == b"\x06pc.ram").unwrap() + 7 + 8;
        let word = |o: usize, n: usize| file[o..o + n].iter().fold(0u64, |a, &b| a << 8 | b as u64);
        assert_eq!(word(at, 4), 1, "header version");
        assert_eq!(word(at + 4, 8), PAGE, "page size");
        assert_eq!(
            word(at + 12, 8),
            at as u64 + 28,
            "bitmap right after the header"
        );
        assert_eq!(word(at + 20, 8), 1 << 20, "pages at the next MiB");
        assert_eq!(
            file[at + 28],
            0b0010_0000,
            "only page 5 of pc.ram is non-zero"
        );
        assert_eq!(&file[(1 << 20) + 5 * 4096..][..4], &[0xa5; 4]);

        let mut dst = VecRam::new(&[("pc.ram", 32 * PAGE), ("vga.vram", 8 * PAGE)]);
        for (_, d) in dst.blocks.iter_mut() {
            d.fill(0x77);
        }
        let mut dev2 = BufferSection::new("timer", 0, 2, vec![0; 8]);
        let mut opts = LoadOptions::new("none");
        opts.mapped_ram = true;
        let l = load_file(
            Cursor::new(file.clone()),
            &opts,
            Some(&mut dst),
            &mut [&mut dev2],
        )
        .unwrap();
        assert_eq!(dst.blocks, src.blocks);
        assert_eq!(dev2.data, [5; 8]);
        assert_eq!((l.ram.normal_pages, l.ram.zero_pages), (2, 38));
        assert_eq!(l.configuration.unwrap().capabilities, ["mapped-ram"]);
        // Through a pipe the same file cannot be read.
        let e = load(Cursor::new(file), &opts, Some(&mut dst), &mut []).unwrap_err();
        assert_eq!(
            e.error.to_string(),
            "Migration requires seekable transport (e.g. file)"
        );
    }

    #[test]
    fn mapped_ram_saver_refuses_page_rounds() {
        let src = sample_ram();
        let mut s = Saver::new(
            Cursor::new(Vec::new()),
            SaveOptions::new("none"),
            src.blocks(),
        )
        .unwrap();
        s.save_setup_mapped_ram(&src, &mut []).unwrap();
        assert!(s.save_pages(&src, all_pages(&src.blocks())).is_err());
        let one = [PageRef {
            block: 0,
            offset: 0,
        }];
        assert!(s.save_complete(&src, one, &mut []).is_err());
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_blocks_and_pages_round_trip(
            blocks in proptest::collection::vec((1u64..6, proptest::collection::vec((0u64..6, any::<u8>(), 0usize..4096), 0..6)), 1..4),
            order in any::<u64>(),
        ) {
            let spec: Vec<(String, u64)> = blocks.iter().enumerate().map(|(i, (n, _))| (format!("blk{i}"), n * PAGE)).collect();
            let spec_ref: Vec<(&str, u64)> = spec.iter().map(|(n, l)| (n.as_str(), *l)).collect();
            let mut src = VecRam::new(&spec_ref);
            for (b, (n, writes)) in blocks.iter().enumerate() {
                for (page, byte, at) in writes {
                    let o = (page % n) * PAGE + *at as u64;
                    src.blocks[b].1[o as usize] = *byte;
                }
            }
            // Pages in a shuffled order and split over two rounds, so CONTINUE and idstrs mix.
            let mut pages: Vec<PageRef> = all_pages(&src.blocks()).collect();
            let len = pages.len();
            for i in (1..len).rev() {
                pages.swap(i, (order.wrapping_mul(i as u64 + 7) % (i as u64 + 1)) as usize);
            }
            let (a, b) = pages.split_at(len / 2);
            let mut s = Saver::new(Vec::new(), SaveOptions::new("none"), src.blocks()).unwrap();
            s.save_setup(&mut []).unwrap();
            s.save_pages(&src, a.iter().copied()).unwrap();
            let sum = s.save_complete(&src, b.iter().copied(), &mut []).unwrap();
            let bytes = s.into_inner();
            let mut dst = VecRam::new(&spec_ref);
            for (_, d) in dst.blocks.iter_mut() { d.fill(0xff); }
            let l = load_with(bytes, &LoadOptions::new("none"), &mut dst, &mut []).unwrap();
            prop_assert_eq!(&dst.blocks, &src.blocks);
            prop_assert_eq!(l.ram.normal_pages, sum.ram.normal_pages);
            prop_assert_eq!(l.ram.zero_pages, sum.ram.zero_pages);
            prop_assert_eq!(l.ram.normal_pages + l.ram.zero_pages, len as u64);
        }
    }
}
