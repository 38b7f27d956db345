//! The numbers of QEMU's migration stream: file magic and version, section type bytes, the
//! footer marker, COMMAND numbers and the `ram` section's flag bits.
//!
//! The values are part of QEMU's wire format (`migration/savevm.h`, `migration/ram.h` in 10.0)
//! and never change. They are grouped as associated constants of zero-sized types, so a use
//! reads as the stream's own vocabulary: `SectionType::START`, `RamFlag::CONTINUE`.

/// The stream header.
pub struct FileHeader;

impl FileHeader {
    /// `"QEVM"`, the first four bytes of every stream.
    pub const MAGIC: u32 = 0x5145_564d;
    /// The only version current QEMU writes and loads.
    pub const VERSION: u32 = 3;
    /// The pre-2009 format; QEMU refuses it with its own message.
    pub const VERSION_COMPAT: u32 = 2;
}

/// The byte that starts every top-level record of the stream (and the footer marker).
pub struct SectionType;

impl SectionType {
    pub const EOF: u8 = 0x00;
    pub const START: u8 = 0x01;
    pub const PART: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const FULL: u8 = 0x04;
    pub const SUBSECTION: u8 = 0x05;
    pub const VMDESCRIPTION: u8 = 0x06;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    /// Not a section: the marker of the footer that follows every START/PART/END/FULL section.
    pub const FOOTER: u8 = 0x7e;
}

/// COMMAND numbers (`u8 0x08, be16 cmd, be16 len, payload`).
pub struct Command;

impl Command {
    pub const INVALID: u16 = 0;
    pub const OPEN_RETURN_PATH: u16 = 1;
    pub const PING: u16 = 2;
    pub const POSTCOPY_ADVISE: u16 = 3;
    pub const POSTCOPY_LISTEN: u16 = 4;
    pub const POSTCOPY_RUN: u16 = 5;
    pub const POSTCOPY_RAM_DISCARD: u16 = 6;
    pub const PACKAGED: u16 = 7;
    pub const ENABLE_COLO: u16 = 8;
    pub const POSTCOPY_RESUME: u16 = 9;
    pub const RECV_BITMAP: u16 = 10;
    /// Sent by QEMU 10.0 just before the END sections; 7.2 refuses it.
    pub const SWITCHOVER_START: u16 = 11;
    /// One past the last command QEMU 10.0 knows.
    pub const MAX: u16 = 12;

    /// QEMU's name of a command, as its "received with bad length" message spells it.
    pub fn name(cmd: u16) -> &'static str {
        match cmd {
            Self::OPEN_RETURN_PATH => "OPEN_RETURN_PATH",
            Self::PING => "PING",
            Self::POSTCOPY_ADVISE => "POSTCOPY_ADVISE",
            Self::POSTCOPY_LISTEN => "POSTCOPY_LISTEN",
            Self::POSTCOPY_RUN => "POSTCOPY_RUN",
            Self::POSTCOPY_RAM_DISCARD => "POSTCOPY_RAM_DISCARD",
            Self::PACKAGED => "PACKAGED",
            Self::ENABLE_COLO => "ENABLE_COLO",
            Self::POSTCOPY_RESUME => "POSTCOPY_RESUME",
            Self::RECV_BITMAP => "RECV_BITMAP",
            Self::SWITCHOVER_START => "SWITCHOVER_START",
            _ => "INVALID",
        }
    }

    /// The payload length QEMU 10.0 requires for a command, `None` where it is variable.
    pub fn fixed_len(cmd: u16) -> Option<u16> {
        match cmd {
            Self::OPEN_RETURN_PATH
            | Self::POSTCOPY_LISTEN
            | Self::POSTCOPY_RUN
            | Self::ENABLE_COLO
            | Self::POSTCOPY_RESUME
            | Self::SWITCHOVER_START => Some(0),
            Self::PING | Self::PACKAGED => Some(4),
            Self::POSTCOPY_ADVISE => Some(16),
            _ => None,
        }
    }
}

/// The flag bits in the low 12 bits of a `ram` record's be64 (the high bits are the offset).
pub struct RamFlag;

impl RamFlag {
    /// Obsolete since 2009, never sent.
    pub const FULL: u64 = 0x001;
    /// A zero page; one fill byte follows.
    pub const ZERO: u64 = 0x002;
    /// The setup record: the high bits are the total RAM size, the block list follows.
    pub const MEM_SIZE: u64 = 0x004;
    /// A raw page follows.
    pub const PAGE: u64 = 0x008;
    /// End of this section's RAM data.
    pub const EOS: u64 = 0x010;
    /// Same block as the previous page record: no idstr follows.
    pub const CONTINUE: u64 = 0x020;
    /// An XBZRLE delta page (capability `xbzrle`); not supported here.
    pub const XBZRLE: u64 = 0x040;
    /// RDMA registration; not supported here.
    pub const HOOK: u64 = 0x080;
    /// A zlib page (7.2's `compress` capability); not supported here.
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// The multifd sync marker; not supported here.
    pub const MULTIFD_FLUSH: u64 = 0x200;
}

/// The guest page the stream is written in: TARGET_PAGE_SIZE of x86 and s390x.
pub const TARGET_PAGE_BITS: u32 = 12;
/// `1 << TARGET_PAGE_BITS`.
pub const TARGET_PAGE_SIZE: usize = 1 << TARGET_PAGE_BITS;
/// The low bits of a `ram` record's be64 that carry flags (`~TARGET_PAGE_MASK`).
pub const RAM_FLAGS_MASK: u64 = (TARGET_PAGE_SIZE as u64) - 1;

/// The `ram` section's registration: idstr, instance and the one version its loader accepts.
pub struct RamSectionId;

impl RamSectionId {
    pub const IDSTR: &'static str = "ram";
    pub const INSTANCE_ID: u32 = 0;
    pub const VERSION_ID: u32 = 4;
}

/// Names of the CONFIGURATION section and its optional subsections.
pub struct ConfigurationNames;

impl ConfigurationNames {
    pub const SECTION: &'static str = "configuration";
    pub const TARGET_PAGE_BITS: &'static str = "configuration/target-page-bits";
    pub const CAPABILITIES: &'static str = "configuration/capabilities";
    pub const UUID: &'static str = "configuration/uuid";
}

/// mapped-ram (`file:` plus capability `mapped-ram`) on-disk constants.
pub struct MappedRam;

impl MappedRam {
    /// The capability's name in the CONFIGURATION `capabilities` subsection.
    pub const CAPABILITY: &'static str = "mapped-ram";
    /// The one header version QEMU 10.0 writes and accepts.
    pub const HEADER_VERSION: u32 = 1;
    /// `be32 version, be64 page_size, be64 bitmap_offset, be64 pages_offset`, packed.
    pub const HEADER_SIZE: u64 = 28;
    /// The alignment of each block's page area in the file as QEMU writes it.
    pub const FILE_OFFSET_ALIGNMENT: u64 = 1 << 20;
}

/// The capabilities QEMU 10.0 validates through the CONFIGURATION section, in QEMU's order.
pub const VALIDATED_CAPABILITIES: [&str; 2] = ["x-ignore-shared", "mapped-ram"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_spells_qevm() {
        assert_eq!(&FileHeader::MAGIC.to_be_bytes(), b"QEVM");
    }

    #[test]
    fn flags_fit_below_the_target_page() {
        for f in [
            RamFlag::FULL,
            RamFlag::ZERO,
            RamFlag::MEM_SIZE,
            RamFlag::PAGE,
            RamFlag::EOS,
            RamFlag::CONTINUE,
            RamFlag::XBZRLE,
            RamFlag::HOOK,
            RamFlag::COMPRESS_PAGE,
            RamFlag::MULTIFD_FLUSH,
        ] {
            assert_eq!(f & !RAM_FLAGS_MASK, 0, "flag {f:#x}");
            assert_eq!(f.count_ones(), 1, "flag {f:#x}");
        }
        assert_eq!(RAM_FLAGS_MASK, 0xfff);
    }

    #[test]
    fn command_lengths_match_qemu_10() {
        assert_eq!(Command::fixed_len(Command::SWITCHOVER_START), Some(0));
        assert_eq!(Command::fixed_len(Command::PING), Some(4));
        assert_eq!(Command::fixed_len(Command::POSTCOPY_ADVISE), Some(16));
        assert_eq!(Command::fixed_len(Command::POSTCOPY_RAM_DISCARD), None);
        assert_eq!(Command::name(Command::SWITCHOVER_START), "SWITCHOVER_START");
        assert_eq!(Command::name(Command::MAX), "INVALID");
    }
}
