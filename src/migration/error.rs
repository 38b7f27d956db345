//! What can go wrong while reading or writing a migration stream.
//!
//! [`MigrationError`] has one variant per failure. Where QEMU 10.0's loader reports the same
//! failure, `Display` is QEMU's message, byte for byte, so a VMM engineer sees the line they
//! know. Where QEMU prints more than one line for a failure (an unknown block in a page record
//! is "Can't find block zz" then "Illegal RAM offset 0"), [`MigrationError::qemu_lines`] gives
//! every line and `Display` the first.
//!
//! A failed load is a [`LoadError`]: the error plus where it happened. Its
//! [`LoadError::qemu_lines`] are the lines QEMU 10.0 writes to stderr for the same stream,
//! without QEMU's `qemu-system-x86_64: ` prefix, ending with QEMU's outer
//! "load of migration failed: STRERROR" line:
//!
//! ```text
//! Unknown ramblock "zz", cannot accept migration
//! error while loading state for instance 0x0 of device 'ram'
//! load of migration failed: Invalid argument
//! ```
//!
//! Truncation is the exception. QEMU reads zeros past the end of a stream and reports whatever
//! check those zeros fail first, so its lines depend on where the cut falls (checked on 10.0):
//! "Failed to load configuration:len" (EIO), "Unable to read ID string for section 0"
//! (EINVAL), `Unknown ramblock "ra"` for a cut idstr (EINVAL), "Getting RAM address failed"
//! with the section's context (EIO), or only "load of migration failed: Input/output error".
//! The codec always says where the stream ended ([`MigrationError::Truncated`]), with the
//! section context and EIO, which is QEMU's transcript, tail included, for a cut inside a `ram`
//! page record.

use std::io;

use crate::error::{Error, HmErrorClass};

/// One failure of the migration codec.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The underlying reader or writer failed.
    #[error("migration stream I/O error: {0}")]
    Io(#[source] io::Error),
    /// The stream ended inside a field.
    #[error("migration stream truncated: it ends at byte {offset} while reading {what}")]
    Truncated { offset: u64, what: &'static str },

    // --- header and CONFIGURATION ---
    #[error("Not a migration stream")]
    BadMagic { magic: u32 },
    #[error("SaveVM v2 format is obsolete and don't work anymore")]
    ObsoleteVersion,
    #[error("Unsupported migration stream version")]
    UnsupportedVersion { version: u32 },
    #[error("Configuration section missing")]
    ConfigurationMissing,
    /// QEMU compares only the received length; see [`super::stream::MachineTypeCheck`].
    #[error("Machine type received is '{received}' and local is '{local}'")]
    MachineTypeMismatch { received: String, local: String },
    #[error("Received TARGET_PAGE_BITS is {received} but local is {local}")]
    TargetPageBitsMismatch { received: u32, local: u32 },
    #[error("Received unknown capability {name}")]
    UnknownCapability { name: String },
    /// One entry per validated capability whose state differs (QEMU reports them all).
    #[error("{}", capability_lines(.mismatches).join("\n"))]
    CapabilityMismatch { mismatches: Vec<CapabilityMismatch> },
    #[error("UUID received is {received} and local is {local}")]
    UuidMismatch { received: String, local: String },
    /// A CONFIGURATION subsection this loader does not know (QEMU fails it with ENOENT and no
    /// message of its own).
    #[error("unknown CONFIGURATION subsection '{name}'")]
    UnknownSubsection { name: String },

    // --- section framing ---
    #[error(
        "Unknown savevm section or instance '{idstr}' {instance_id}. Make sure that your current \
         VM setup matches your saved VM setup, including any hotplugged devices"
    )]
    UnknownSection { idstr: String, instance_id: u32 },
    /// A PART/END section whose id no START named.
    #[error("Unknown savevm section {section_id}")]
    UnknownSectionId { section_id: u32 },
    #[error("savevm: unsupported version {version} for '{idstr}' v{local_version}")]
    UnsupportedSectionVersion {
        version: u32,
        idstr: String,
        local_version: u32,
    },
    #[error("Unknown savevm section type {section_type}")]
    UnknownSectionType { section_type: u8 },
    #[error("Missing section footer for {idstr}")]
    MissingFooter { idstr: String },
    #[error("Mismatched section id in footer for {idstr} - read {read:#x} expected {expected:#x}")]
    MismatchedFooter {
        idstr: String,
        read: u32,
        expected: u32,
    },
    #[error("MIG_CMD {cmd:#x} unknown (len {len:#x})")]
    UnknownCommand { cmd: u16, len: u16 },
    #[error("{name} received with bad length - expecting {expected}, got {got}")]
    CommandBadLength {
        name: &'static str,
        expected: u16,
        got: u16,
    },
    /// A command QEMU knows but a plain precopy loader cannot act on (postcopy, COLO, ...).
    #[error("MIG_CMD {name} ({cmd:#x}) is not supported by this loader")]
    UnsupportedCommand { cmd: u16, name: &'static str },
    /// A counted string (idstr, capability) longer than its one length byte can say.
    #[error("'{name}' is {len} bytes long; a counted string holds at most 255")]
    StringTooLong { name: String, len: usize },

    // --- the ram section ---
    /// QEMU's `ram` loader returns EINVAL for any version but 4 without a message.
    #[error("ram section version {version} is not 4")]
    RamVersion { version: u32 },
    #[error("Unknown ramblock \"{idstr}\", cannot accept migration")]
    UnknownRamBlock { idstr: String },
    #[error("block {idstr} should not be migrated !")]
    RamBlockNotMigratable { idstr: String },
    /// `stream` is the stream's length aligned up to the target page, then the host page.
    #[error("Size mismatch: {idstr}: {stream:#x} != {local:#x}: Invalid argument")]
    RamSizeMismatch {
        idstr: String,
        stream: u64,
        local: u64,
    },
    #[error("Size too large: {idstr}: {stream:#x} > {max:#x}: Invalid argument")]
    RamSizeTooLarge {
        idstr: String,
        stream: u64,
        max: u64,
    },
    /// The block list's lengths add up to more than the MEM_SIZE total (QEMU would wrap
    /// around and read garbage as block names).
    #[error("RAM block list exceeds the stream's total of {total:#x} bytes at block \"{idstr}\"")]
    RamTotalMismatch { total: u64, idstr: String },
    /// A page record names a block this target does not have ("Can't find block").
    #[error("Can't find block {idstr}")]
    UnknownPageBlock { idstr: String, offset: u64 },
    /// A page record names a block that is not migratable.
    #[error("block {idstr} should not be migrated !")]
    PageBlockNotMigratable { idstr: String, offset: u64 },
    /// The first page record of the stream has CONTINUE: there is no previous block.
    #[error("Ack, bad migration stream!")]
    ContinueWithoutBlock { offset: u64 },
    #[error("Illegal RAM offset {offset:x}")]
    IllegalRamOffset { offset: u64 },
    #[error("Unknown combination of migration flags: {flags:#x}")]
    UnknownRamFlags { flags: u64 },
    #[error("Found a zero page with value {value}")]
    NonZeroFill { value: u8 },
    /// A flag that is invalid with mapped-ram (ZERO, PAGE, XBZRLE, HOOK, MULTIFD_FLUSH).
    #[error("Unexpected RAM flags: {flags}")]
    UnexpectedRamFlags { flags: u64 },

    // --- mapped-ram ---
    #[error(
        "Migration mapped-ram capability version not supported (expected <= 1, got {version})"
    )]
    MappedRamVersion { version: u32 },
    #[error("Error reading ramblock {idstr} pages, region has bad alignment")]
    MappedRamAlignment { idstr: String },
    #[error("Migration requires seekable transport (e.g. file)")]
    NotSeekable,

    /// A CONFIGURATION whose machine type name is implausibly long (QEMU would allocate it).
    #[error("CONFIGURATION machine type name of {len} bytes (at most 4096 accepted)")]
    MachineTypeTooLong { len: u32 },
    /// A mapped-ram header whose page size is not the target page size.
    #[error("mapped-ram block {idstr} has page size {page_size}, expected 4096")]
    MappedRamPageSize { idstr: String, page_size: u64 },

    // --- the caller's side ---
    /// The codec was driven in a way it cannot honour (a saver step out of order, a page
    /// outside the block list, a block list QEMU could not load).
    #[error("{0}")]
    Usage(String),
    /// A RAM source, load target or section handler failed; its message is kept as it is.
    #[error("{0}")]
    Callback(Error),
}

/// One validated capability whose state differs between the stream and the loader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapabilityMismatch {
    pub name: String,
    pub local: bool,
    pub received: bool,
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn capability_lines(mismatches: &[CapabilityMismatch]) -> Vec<String> {
    mismatches
        .iter()
        .map(|m| {
            format!(
                "Capability {} is {}, but received capability is {}",
                m.name,
                on_off(m.local),
                on_off(m.received)
            )
        })
        .collect()
}

impl MigrationError {
    /// The errno QEMU 10.0's loader returns for this failure; it decides the outer
    /// "load of migration failed: STRERROR" line.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Self::Truncated { .. } => libc::EIO,
            Self::ObsoleteVersion | Self::UnsupportedVersion { .. } => libc::ENOTSUP,
            Self::UnknownSubsection { .. } => libc::ENOENT,
            Self::CommandBadLength { .. } => libc::ERANGE,
            Self::Callback(e) => e.errno().unwrap_or(libc::EINVAL),
            _ => libc::EINVAL,
        }
    }

    /// The lines QEMU 10.0 prints for this failure itself, before any section context. Empty
    /// where QEMU fails silently (a `ram` section of the wrong version, an unknown
    /// CONFIGURATION subsection).
    pub fn qemu_lines(&self) -> Vec<String> {
        match self {
            Self::RamVersion { .. } | Self::UnknownSubsection { .. } => vec![],
            // QEMU's vmstate loader names the subsection and field that failed.
            Self::UnknownCapability { .. } => vec![
                self.to_string(),
                "Failed to load configuration/capabilities:capabilities".to_string(),
            ],
            Self::CapabilityMismatch { mismatches } => capability_lines(mismatches),
            Self::UnknownPageBlock { offset, .. }
            | Self::PageBlockNotMigratable { offset, .. }
            | Self::ContinueWithoutBlock { offset } => vec![
                self.to_string(),
                Self::IllegalRamOffset { offset: *offset }.to_string(),
            ],
            _ => vec![self.to_string()],
        }
    }

    /// The class a program branches on once this becomes a [`crate::Error`].
    pub fn class(&self) -> HmErrorClass {
        match self {
            Self::Io(_) => HmErrorClass::Host,
            Self::Callback(e) => e.class(),
            Self::UnknownSection { .. } | Self::UnknownRamBlock { .. } => HmErrorClass::NotFound,
            Self::UnknownPageBlock { .. } | Self::UnknownSectionId { .. } => HmErrorClass::NotFound,
            Self::ObsoleteVersion
            | Self::UnsupportedVersion { .. }
            | Self::UnsupportedSectionVersion { .. }
            | Self::UnsupportedCommand { .. }
            | Self::RamVersion { .. }
            | Self::MappedRamVersion { .. }
            | Self::NotSeekable => HmErrorClass::Unsupported,
            _ => HmErrorClass::InvalidParameter,
        }
    }
}

impl From<io::Error> for MigrationError {
    fn from(e: io::Error) -> Self {
        MigrationError::Io(e)
    }
}

impl From<Error> for MigrationError {
    fn from(e: Error) -> Self {
        MigrationError::Callback(e)
    }
}

/// Which section a failure happened in, as QEMU names it in its context line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SectionContext {
    /// In the payload of a START or FULL section: QEMU names the instance and idstr.
    StartFull { idstr: String, instance_id: u32 },
    /// In the payload of a PART or END section: QEMU names the stream's section id.
    PartEnd { idstr: String, section_id: u32 },
}

impl SectionContext {
    /// QEMU 10.0's context line.
    pub fn qemu_line(&self) -> String {
        match self {
            Self::StartFull { idstr, instance_id } => format!(
                "error while loading state for instance {instance_id:#x} of device '{idstr}'"
            ),
            Self::PartEnd { idstr, section_id } => {
                format!("error while loading state section id {section_id}({idstr})")
            }
        }
    }
}

/// A failed load: what went wrong, where, and how far the stream was read.
#[derive(Debug)]
pub struct LoadError {
    pub error: MigrationError,
    /// Set when the failure happened inside a section's payload.
    pub context: Option<SectionContext>,
    /// Bytes of the stream read when the failure was found.
    pub offset: u64,
}

impl LoadError {
    pub fn new(error: MigrationError, offset: u64) -> Self {
        LoadError {
            error,
            context: None,
            offset,
        }
    }

    /// The lines QEMU 10.0 writes to stderr for the same failure (without its program-name
    /// prefix): the error's own lines, the section context, then
    /// "load of migration failed: STRERROR".
    pub fn qemu_lines(&self) -> Vec<String> {
        let mut lines = self.error.qemu_lines();
        if let Some(c) = &self.context {
            lines.push(c.qemu_line());
        }
        lines.push(format!(
            "load of migration failed: {}",
            strerror(self.error.errno())
        ));
        lines
    }
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.qemu_lines().join("\n"))
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// The C library's text for `errno`, as QEMU's `strerror` prints it.
pub fn strerror(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

impl From<MigrationError> for Error {
    fn from(e: MigrationError) -> Self {
        match e {
            MigrationError::Callback(inner) => inner,
            MigrationError::Io(ref io) if io.raw_os_error().is_some() => {
                Error::host("migration stream I/O error", io.raw_os_error().unwrap_or(0))
            }
            other => Error::new(other.class(), other.to_string()),
        }
    }
}

/// The message of a failed load is QEMU's whole stderr text, one line after the other.
impl From<LoadError> for Error {
    fn from(e: LoadError) -> Self {
        Error::new(e.error.class(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_qemu_wording() {
        let e = MigrationError::MismatchedFooter {
            idstr: "ram".into(),
            read: 0,
            expected: 1,
        };
        assert_eq!(
            e.to_string(),
            "Mismatched section id in footer for ram - read 0x0 expected 0x1"
        );
        let e = MigrationError::RamSizeMismatch {
            idstr: "m".into(),
            stream: 0x200000,
            local: 0x400000,
        };
        assert_eq!(
            e.to_string(),
            "Size mismatch: m: 0x200000 != 0x400000: Invalid argument"
        );
        assert_eq!(
            MigrationError::IllegalRamOffset { offset: 0x1000000 }.to_string(),
            "Illegal RAM offset 1000000"
        );
    }

    #[test]
    fn continue_first_prints_two_lines_like_qemu() {
        let e = MigrationError::ContinueWithoutBlock { offset: 0x2000 };
        assert_eq!(
            e.qemu_lines(),
            vec!["Ack, bad migration stream!", "Illegal RAM offset 2000"]
        );
    }

    #[test]
    fn load_error_lines_end_with_qemus_outer_line() {
        let e = LoadError {
            error: MigrationError::UnknownRamBlock { idstr: "zz".into() },
            context: Some(SectionContext::StartFull {
                idstr: "ram".into(),
                instance_id: 0,
            }),
            offset: 42,
        };
        assert_eq!(
            e.qemu_lines(),
            vec![
                "Unknown ramblock \"zz\", cannot accept migration",
                "error while loading state for instance 0x0 of device 'ram'",
                "load of migration failed: Invalid argument",
            ]
        );
        let e = LoadError::new(MigrationError::ObsoleteVersion, 8);
        assert_eq!(
            e.qemu_lines().last().unwrap(),
            "load of migration failed: Operation not supported"
        );
        let e = LoadError {
            error: MigrationError::Truncated {
                offset: 100,
                what: "a RAM record",
            },
            context: Some(SectionContext::PartEnd {
                idstr: "ram".into(),
                section_id: 1,
            }),
            offset: 100,
        };
        let lines = e.qemu_lines();
        assert_eq!(lines[1], "error while loading state section id 1(ram)");
        assert_eq!(lines[2], "load of migration failed: Input/output error");
    }

    #[test]
    fn unknown_capability_adds_qemus_vmstate_line() {
        let e = MigrationError::UnknownCapability {
            name: "warp-drive".into(),
        };
        assert_eq!(
            e.qemu_lines(),
            [
                "Received unknown capability warp-drive",
                "Failed to load configuration/capabilities:capabilities"
            ]
        );
    }

    #[test]
    fn ram_version_is_silent_in_qemu() {
        assert!(MigrationError::RamVersion { version: 3 }
            .qemu_lines()
            .is_empty());
    }

    #[test]
    fn capability_mismatches_are_one_line_each() {
        let e = MigrationError::CapabilityMismatch {
            mismatches: vec![
                CapabilityMismatch {
                    name: "x-ignore-shared".into(),
                    local: false,
                    received: true,
                },
                CapabilityMismatch {
                    name: "mapped-ram".into(),
                    local: true,
                    received: false,
                },
            ],
        };
        assert_eq!(
            e.qemu_lines(),
            vec![
                "Capability x-ignore-shared is off, but received capability is on",
                "Capability mapped-ram is on, but received capability is off",
            ]
        );
    }

    #[test]
    fn errno_picks_qemus_outer_line() {
        assert_eq!(
            MigrationError::CommandBadLength {
                name: "PING",
                expected: 4,
                got: 0
            }
            .errno(),
            libc::ERANGE
        );
        assert_eq!(strerror(libc::ERANGE), "Numerical result out of range");
        assert_eq!(MigrationError::BadMagic { magic: 0 }.errno(), libc::EINVAL);
    }

    #[test]
    fn into_crate_error_keeps_message_and_class() {
        let e: Error = MigrationError::UnknownRamBlock { idstr: "zz".into() }.into();
        assert_eq!(
            e.message(),
            "Unknown ramblock \"zz\", cannot accept migration"
        );
        assert_eq!(e.class(), HmErrorClass::NotFound);
        let e: Error = MigrationError::ObsoleteVersion.into();
        assert_eq!(e.class(), HmErrorClass::Unsupported);
        let inner = Error::invalid("resize refused");
        let e: Error = MigrationError::Callback(inner.clone()).into();
        assert_eq!(e, inner);
        let e: Error = MigrationError::Io(io::Error::from_raw_os_error(libc::EPIPE)).into();
        assert_eq!(e.message(), "migration stream I/O error: Broken pipe");
        assert_eq!(e.class(), HmErrorClass::Host);
        let e: Error = LoadError::new(MigrationError::BadMagic { magic: 1 }, 4).into();
        assert_eq!(
            e.message(),
            "Not a migration stream\nload of migration failed: Invalid argument"
        );
    }
}
