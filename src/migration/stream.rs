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
use std::io::{BufRead, BufReader, Read, Seek, Write};

use super::error::{LoadError, MigrationError, SectionContext};
use super::format::{
    Command, ConfigurationNames, FileHeader, MappedRam, RamSectionId, SectionType,
    TARGET_PAGE_BITS, TARGET_PAGE_SIZE, VALIDATED_CAPABILITIES,
};
use super::qemu_file::{QemuReader, QemuWriter};
use super::ram::{PageRef, RamBlockInfo, RamLoadStats, RamLoadTarget, RamLoader, RamSaveStats};
use super::ram::{RamSaver, RamSource};
use super::section::{SectionHandler, SectionPhase, Seekable, Sequential, StreamRead};
use crate::error::Error;

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
            return Err(MigrationError::Callback(Error::invalid(format!(
                "machine type name of {len} bytes in the CONFIGURATION section"
            ))));
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
            // strncmp(received, local, received_len): equal up to the received length, where
            // the local name ending early (its NUL) is a difference.
            MachineTypeCheck::QemuPrefix => {
                let n = received
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(received.len());
                local.len() >= n && local[..n] == received[..n]
            }
            MachineTypeCheck::Exact => received == local,
        };
        if !matches {
            return Err(MigrationError::MachineTypeMismatch {
                received: c.machine_type.clone(),
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
                    "UUID is received {}, but local uuid isn't set",
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
    /// Send all-zero pages as ZERO records (QEMU's `zero-page-detection=legacy`); with
    /// `false` every page goes out in full.
    pub zero_page_detection: bool,
}

impl SaveOptions {
    pub fn new(machine_type: &str) -> Self {
        SaveOptions {
            configuration: Configuration::new(machine_type),
            send_switchover_start: false,
            vmdesc: true,
            zero_page_detection: true,
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
pub struct Saver<W: Write> {
    w: QemuWriter<W>,
    opts: SaveOptions,
    ram: RamSaver,
    state: SaveState,
    next_section_id: u32,
    ram_section_id: u32,
    iterative_ids: HashMap<(String, u32), u32>,
    vmdesc_devices: Vec<String>,
    ram_rounds: u64,
}

impl<W: Write> Saver<W> {
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
            Err(MigrationError::Callback(Error::generic(format!(
                "migration saver: {what} called out of order"
            ))))
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
        self.w.put_be32(FileHeader::MAGIC)?;
        self.w.put_be32(FileHeader::VERSION)?;
        self.w.put_u8(SectionType::CONFIGURATION)?;
        self.opts.configuration.write(&mut self.w)?;
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

    /// One `ram` SECTION_PART with a record for each page (the bulk round passes every page;
    /// later rounds the dirty ones).
    pub fn save_pages(
        &mut self,
        source: &dyn RamSource,
        pages: impl IntoIterator<Item = PageRef>,
    ) -> Result<RamSaveStats, MigrationError> {
        self.expect(SaveState::Iterating, "save_pages")?;
        let id = self.ram_section_id;
        self.put_part_end(SectionType::PART, id)?;
        let st = self.ram.write_round(&mut self.w, source, pages)?;
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
                MigrationError::Callback(Error::generic(format!(
                    "migration saver: iterative section '{}' {} was not set up",
                    h.idstr(),
                    h.instance_id()
                )))
            })
    }

    /// Completion: [SWITCHOVER_START], the `ram` END with `final_pages`, an END for each
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
fn json_string(s: &str) -> String {
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
pub fn save_stream<W: Write>(
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
    /// What QEMU would warn about without failing (no vmdesc, a uuid with none set locally).
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
    let mut r = QemuReader::new(Sequential(BufReader::with_capacity(1 << 18, input)));
    load_from(&mut r, opts, ram, handlers)
}

/// Loads a stream from a file positioned at its start; also reads mapped-ram files.
pub fn load_file<R: Read + Seek>(
    input: R,
    opts: &LoadOptions,
    ram: Option<&mut dyn RamLoadTarget>,
    handlers: &mut [&mut dyn SectionHandler],
) -> Result<LoadSummary, LoadError> {
    let mut r = QemuReader::new(Seekable(BufReader::with_capacity(1 << 18, input)));
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
