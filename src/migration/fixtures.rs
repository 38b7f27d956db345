//! The codec against streams real QEMU 10.0 and 7.2 wrote (testdata/migration/, recorded by
//! scripts/record-qemu-streams). Each stream comes with QEMU's own `info migrate` and
//! `info ramblock` from the moment it was written; the loader must find exactly those blocks
//! and exactly QEMU's normal and duplicate (zero) page counts, and the blob the recorder put
//! at 0x100000 must land at that offset of the main RAM block.
//!
//! QEMU's device sections are not self-delimiting and the codec has no vmstate layouts, so
//! these tests register a handler per device listed in the stream's VMDESCRIPTION that skips
//! its payload up to its footer, found in the raw bytes. That is a test device, not a
//! product feature.

use std::io::{Cursor, Write};
use std::path::PathBuf;

use super::error::MigrationError;
use super::format::{SectionType, TARGET_PAGE_SIZE};
use super::qemu_file::{QemuReader, QemuWriter};
use super::ram::tests::VecRam;
use super::ram::RamBlockInfo;
use super::section::{SectionHandler, SectionPhase, StreamRead};
use super::stream::{load, LoadOptions, LoadSummary};

pub(crate) fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/migration")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// What QEMU said when it wrote the stream.
pub(crate) struct QemuAccount {
    pub normal: u64,
    pub duplicate: u64,
    /// (name, used, total) in `info ramblock` order.
    pub blocks: Vec<(String, u64, u64)>,
}

pub(crate) fn account(name: &str) -> QemuAccount {
    let text = String::from_utf8(fixture(name)).unwrap();
    let count = |key: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{name}: no '{key}'"));
        line[key.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let blocks = text
        .split("## info ramblock\n")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), hex(f[4]), hex(f[5]))
        })
        .collect();
    QemuAccount {
        normal: count("normal:"),
        duplicate: count("duplicate:"),
        blocks,
    }
}

/// The VMDESCRIPTION trailer's JSON, found from the end as analyze-migration.py does.
pub(crate) fn vmdesc_of(stream: &[u8]) -> &str {
    for i in (0..stream.len().saturating_sub(5)).rev() {
        if stream[i] == SectionType::VMDESCRIPTION && stream[i + 5] == b'{' {
            let len = u32::from_be_bytes(stream[i + 1..i + 5].try_into().unwrap()) as usize;
            if i + 5 + len == stream.len() {
                return std::str::from_utf8(&stream[i + 5..]).unwrap();
            }
        }
    }
    panic!("no VMDESCRIPTION trailer");
}

/// (name, instance_id, version) of each device the VMDESCRIPTION lists.
pub(crate) fn vmdesc_devices(json: &str) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let mut rest = json;
    while let Some(i) = rest.find("{\"name\": \"") {
        rest = &rest[i + 10..];
        let name = &rest[..rest.find('"').unwrap()];
        let after = &rest[name.len() + 1..];
        if let Some(inst) = after.strip_prefix(", \"instance_id\": ") {
            let num = |s: &str| -> u32 {
                s[..s.find(|c: char| !c.is_ascii_digit()).unwrap()]
                    .parse()
                    .unwrap()
            };
            let v = &inst[inst.find("\"version\": ").unwrap() + 11..];
            out.push((name.to_string(), num(inst), num(v)));
        }
    }
    out
}

/// Skips a section's payload: everything up to the next footer carrying the section's id.
pub(crate) struct SkipToFooter<'s> {
    pub stream: &'s [u8],
    pub idstr: String,
    pub instance_id: u32,
    pub version_id: u32,
    pub skipped: Vec<SectionPhase>,
}

impl SectionHandler for SkipToFooter<'_> {
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
        _: SectionPhase,
        _: &mut QemuWriter<dyn Write + '_>,
    ) -> Result<(), MigrationError> {
        unreachable!("a skipping handler only loads")
    }
    fn load(
        &mut self,
        phase: SectionPhase,
        _version_id: u32,
        input: &mut QemuReader<dyn StreamRead + '_>,
    ) -> Result<(), MigrationError> {
        let pos = input.position() as usize;
        // The section id sits before idstr, instance and version (START/FULL) or right before
        // the payload (PART/END).
        let id_at = match phase {
            SectionPhase::Start | SectionPhase::Full => pos - 8 - 1 - self.idstr.len() - 4,
            _ => pos - 4,
        };
        let mut footer = vec![SectionType::FOOTER];
        footer.extend_from_slice(&self.stream[id_at..id_at + 4]);
        let n = self.stream[pos..]
            .windows(5)
            .position(|w| w == footer)
            .expect("a footer follows every section");
        input.skip(n as u64, "a skipped section")?;
        self.skipped.push(phase);
        Ok(())
    }
}

pub(crate) fn load_fixture(name: &str, machine: &str) -> (LoadSummary, VecRam, QemuAccount) {
    let stream = fixture(&format!("{name}.mig"));
    let acct = account(&format!("{name}.info"));
    let spec: Vec<(&str, u64)> = acct
        .blocks
        .iter()
        .map(|(n, u, _)| (n.as_str(), *u))
        .collect();
    let mut ram = VecRam::new(&spec);
    for (i, (_, used, total)) in acct.blocks.iter().enumerate() {
        ram.max_length[i] = *total;
        ram.resizeable[i] = total != used;
    }
    let mut devices: Vec<SkipToFooter> = vmdesc_devices(vmdesc_of(&stream))
        .into_iter()
        .map(|(idstr, instance_id, version_id)| SkipToFooter {
            stream: &stream,
            idstr,
            instance_id,
            version_id,
            skipped: vec![],
        })
        .collect();
    let mut handlers: Vec<&mut dyn SectionHandler> = devices
        .iter_mut()
        .map(|d| d as &mut dyn SectionHandler)
        .collect();
    let summary = load(
        Cursor::new(&stream[..]),
        &LoadOptions::new(machine),
        Some(&mut ram),
        &mut handlers,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        summary.bytes,
        stream.len() as u64,
        "{name}: read to the end"
    );
    (summary, ram, acct)
}

fn check_against_qemu(name: &str, machine: &str, main_block: &str) -> LoadSummary {
    let (summary, ram, acct) = load_fixture(name, machine);
    assert_eq!(
        summary.ram.normal_pages, acct.normal,
        "{name}: normal pages"
    );
    assert_eq!(
        summary.ram.zero_pages, acct.duplicate,
        "{name}: duplicate pages"
    );
    let blocks: Vec<RamBlockInfo> = acct
        .blocks
        .iter()
        .map(|(n, u, _)| RamBlockInfo::new(n, *u))
        .collect();
    assert_eq!(
        summary.ram.blocks, blocks,
        "{name}: blocks in ram_list order"
    );
    assert!(summary.ram.resized.is_empty());
    let b = ram
        .blocks
        .iter()
        .position(|(n, _)| n == main_block)
        .unwrap();
    let counter: Vec<u8> = (0..TARGET_PAGE_SIZE).map(|i| i as u8).collect();
    assert_eq!(ram.page(b, 0x100000), &counter[..], "{name}: blob page 0");
    assert_eq!(
        ram.page(b, 0x101000),
        &[0x5a; TARGET_PAGE_SIZE][..],
        "{name}: blob page 1"
    );
    let p2 = ram.page(b, 0x102000);
    assert_eq!(
        (p2[0], p2[1..].iter().all(|&x| x == 0)),
        (1, true),
        "{name}: blob page 2"
    );
    assert_eq!(
        summary.configuration.as_ref().unwrap().machine_type,
        machine
    );
    summary
}

#[test]
fn qemu10_none_stream_has_qemus_blocks_and_page_counts() {
    let s = check_against_qemu("qemu10-none-16M", "none", "ram");
    assert_eq!(s.commands, [0x0b], "10.0 sends SWITCHOVER_START");
    assert_eq!(s.sections[0].section_id, 1, "ram is section 1 in 10.0");
    assert!(s.vmdesc.unwrap().contains("\"configuration\""));
}

#[test]
fn qemu72_none_stream_has_qemus_blocks_and_page_counts() {
    let s = check_against_qemu("qemu72-none-16M", "none", "ram");
    assert!(s.commands.is_empty(), "7.2 sends no command");
    assert_eq!(s.sections[0].section_id, 2, "ram is section 2 in 7.2");
    assert!(!s.vmdesc.unwrap().contains("\"configuration\""));
}

#[test]
fn qemu10_pc_stream_has_qemus_blocks_and_page_counts() {
    check_against_qemu("qemu10-pc-i440fx-10.0-32M", "pc-i440fx-10.0", "pc.ram");
}

#[test]
fn qemu72_pc_stream_has_qemus_blocks_and_page_counts() {
    check_against_qemu("qemu72-pc-i440fx-7.2-32M", "pc-i440fx-7.2", "pc.ram");
}

#[test]
fn qemu_stream_into_the_wrong_machine_is_refused_with_qemus_message() {
    let stream = fixture("qemu10-none-16M.mig");
    let mut ram = VecRam::new(&[("ram", 16 << 20)]);
    let e = load(
        Cursor::new(stream),
        &LoadOptions::new("pc-i440fx-10.0"),
        Some(&mut ram),
        &mut [],
    )
    .unwrap_err();
    assert_eq!(
        e.qemu_lines(),
        [
            "Machine type received is 'none' and local is 'pc-i440fx-10.0'",
            "load of migration failed: Invalid argument"
        ]
    );
}

#[test]
fn qemu_stream_without_its_devices_registered_names_the_first_one() {
    let stream = fixture("qemu10-none-16M.mig");
    let mut ram = VecRam::new(&[("ram", 16 << 20)]);
    let e = load(
        Cursor::new(stream),
        &LoadOptions::new("none"),
        Some(&mut ram),
        &mut [],
    )
    .unwrap_err();
    assert_eq!(
        e.error.to_string(),
        "Unknown savevm section or instance 'timer' 0. Make sure that your current VM setup \
         matches your saved VM setup, including any hotplugged devices"
    );
}

#[test]
fn vmdesc_device_list_is_read_from_the_trailer() {
    let stream = fixture("qemu72-none-16M.mig");
    let devs = vmdesc_devices(vmdesc_of(&stream));
    assert!(devs.contains(&("timer".to_string(), 0, 2)), "{devs:?}");
}
