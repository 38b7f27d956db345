//! Would a stream from this source load into that destination? The migration-compat check,
//! answered from what each side would write and expect before the first page, with the
//! loader's own checks, so that it refuses with the loader's words.
//!
//! The loader stops at its first failure; the check goes on and lists every break, in the
//! order the loader meets them: the first break is the message a real load prints first.
//! Besides the breaks it notes what QEMU accepts without a word although the guest loses
//! memory: a destination block the stream does not carry is left as it is (zero).

use super::ram::{check_block_length, RamBlockInfo, RamLoadTarget, RamSaver};
use super::stream::{json_string, Configuration, LoadOptions, SaveOptions};
use super::MigrationError;

/// What a source writes before its first page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// The CONFIGURATION section, if the source sends one.
    pub configuration: Option<Configuration>,
    /// The `ram` section's block list, in stream order.
    pub blocks: Vec<RamBlockInfo>,
}

impl Outgoing {
    pub fn new(opts: &SaveOptions, blocks: Vec<RamBlockInfo>) -> Outgoing {
        Outgoing {
            configuration: opts.send_configuration.then(|| opts.configuration.clone()),
            blocks,
        }
    }
}

/// Which side refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The source will not start the migration.
    Source,
    /// The destination's loader fails the stream.
    Destination,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

/// One reason the migration fails, in QEMU's words where QEMU has them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Break {
    pub side: Side,
    pub message: String,
}

/// The check's answer: compatible when there is no break.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompatReport {
    pub breaks: Vec<Break>,
    /// What loads but loses something (hostmem's words: QEMU says nothing).
    pub notes: Vec<String>,
}

impl CompatReport {
    pub fn compatible(&self) -> bool {
        self.breaks.is_empty()
    }

    /// A source-side failure (found by the caller, e.g. memory no migratable alias carries).
    pub fn source_break(&mut self, message: impl Into<String>) {
        self.breaks.push(Break {
            side: Side::Source,
            message: message.into(),
        });
    }

    /// The report as the C API and `vmm -x-hm-migration-check` give it:
    /// `{"compatible": B, "breaks": [{"side": S, "message": M}, ...], "notes": [N, ...]}`.
    pub fn to_json(&self) -> String {
        let breaks: Vec<String> = self
            .breaks
            .iter()
            .map(|b| {
                format!(
                    "{{\"side\": \"{}\", \"message\": {}}}",
                    b.side.name(),
                    json_string(&b.message)
                )
            })
            .collect();
        let notes: Vec<String> = self.notes.iter().map(|n| json_string(n)).collect();
        format!(
            "{{\"compatible\": {}, \"breaks\": [{}], \"notes\": [{}]}}",
            self.compatible(),
            breaks.join(", "),
            notes.join(", ")
        )
    }

    fn destination_break(&mut self, e: MigrationError) {
        self.breaks.push(Break {
            side: Side::Destination,
            message: e.to_string(),
        });
    }
}

/// Checks `out` against a destination loading with `opts` into `target`, whose migratable
/// blocks are `local_blocks` (for the notes). Source-side breaks the caller found go first in
/// `report`; this adds the saver's refusal of the block list, then the loader's breaks.
pub fn check(
    report: &mut CompatReport,
    out: &Outgoing,
    opts: &LoadOptions,
    target: &mut dyn RamLoadTarget,
    local_blocks: &[RamBlockInfo],
) {
    if let Err(e) = RamSaver::new(out.blocks.clone()) {
        report.source_break(e.to_string());
    }
    match (&out.configuration, opts.expect_configuration) {
        (None, true) => report.destination_break(MigrationError::ConfigurationMissing),
        // The loader meets the CONFIGURATION byte where it expects a section.
        (Some(_), false) => report.destination_break(MigrationError::UnknownSectionType {
            section_type: super::format::SectionType::CONFIGURATION,
        }),
        (Some(c), true) => {
            if let Err(e) = opts.check_configuration(c) {
                report.destination_break(e);
            }
        }
        (None, false) => {}
    }
    let host = target.host_page_size();
    for b in &out.blocks {
        let found = target.find_block(&b.idstr);
        let checked = match found {
            None => Err(MigrationError::UnknownRamBlock {
                idstr: b.idstr.clone(),
            }),
            Some(local) => check_block_length(&b.idstr, &local, b.used_length, host).map(|_| ()),
        };
        if let Err(e) = checked {
            report.destination_break(e);
        }
    }
    for l in local_blocks {
        if !out.blocks.iter().any(|b| b.idstr == l.idstr) {
            report.notes.push(format!(
                "RAMBlock \"{}\" of the destination is not in the stream: it loads, and the \
                 guest finds those {:#x} bytes zero",
                l.idstr, l.used_length
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::ram::LocalRamBlock;

    struct Blocks(Vec<(String, LocalRamBlock)>);

    impl RamLoadTarget for Blocks {
        fn find_block(&mut self, idstr: &str) -> Option<LocalRamBlock> {
            self.0.iter().find(|(n, _)| n == idstr).map(|(_, b)| *b)
        }
        fn resize_block(&mut self, _: usize, _: u64) -> Result<(), crate::Error> {
            unreachable!("the check never resizes")
        }
        fn write_page(&mut self, _: usize, _: u64, _: &[u8]) -> Result<(), crate::Error> {
            unreachable!("the check never writes")
        }
        fn zero_page(&mut self, _: usize, _: u64) -> Result<(), crate::Error> {
            unreachable!("the check never writes")
        }
        fn host_page_size(&self) -> u64 {
            4096
        }
    }

    fn local(blocks: &[(&str, u64, bool)]) -> (Blocks, Vec<RamBlockInfo>) {
        let t = Blocks(
            blocks
                .iter()
                .enumerate()
                .map(|(handle, &(n, len, migratable))| {
                    let b = LocalRamBlock {
                        handle,
                        used_length: len,
                        max_length: len,
                        resizeable: false,
                        migratable,
                    };
                    (n.to_string(), b)
                })
                .collect(),
        );
        let infos = blocks
            .iter()
            .filter(|b| b.2)
            .map(|&(n, len, _)| RamBlockInfo::new(n, len))
            .collect();
        (t, infos)
    }

    fn messages(r: &CompatReport) -> Vec<(&'static str, &str)> {
        r.breaks
            .iter()
            .map(|b| (b.side.name(), b.message.as_str()))
            .collect()
    }

    const T: u64 = 1 << 40;
    const M: u64 = 1 << 20;

    #[test]
    fn every_break_is_listed_in_the_loaders_order_and_words() {
        // QEMU 4.1's 9 TiB s390 stream into 10.0's one block, machine types checked.
        let mut save = SaveOptions::new("s390-ccw-virtio-4.1");
        save.send_configuration = true;
        let out = Outgoing::new(
            &save,
            vec![
                RamBlockInfo::new("s390.ram", 8 * T - M),
                RamBlockInfo::new("s390.ram.1", T + M),
            ],
        );
        let (mut target, infos) = local(&[("s390.ram", 9 * T, true)]);
        let mut r = CompatReport::default();
        check(
            &mut r,
            &out,
            &LoadOptions::new("s390-ccw-virtio-10.0"),
            &mut target,
            &infos,
        );
        assert_eq!(
            messages(&r),
            [
                (
                    "destination",
                    "Machine type received is 's390-ccw-virtio-4.1' and local is \
                     's390-ccw-virtio-10.0'"
                ),
                (
                    "destination",
                    "Size mismatch: s390.ram: 0x7fffff00000 != 0x90000000000: Invalid argument"
                ),
                (
                    "destination",
                    "Unknown ramblock \"s390.ram.1\", cannot accept migration"
                ),
            ]
        );
        assert!(!r.compatible());
        assert!(r.to_json().starts_with(
            "{\"compatible\": false, \"breaks\": [{\"side\": \"destination\", \"message\": \
             \"Machine type received is 's390-ccw-virtio-4.1' and local"
        ));
        assert!(r
            .to_json()
            .ends_with("cannot accept migration\"}], \"notes\": []}"));
    }

    #[test]
    fn configuration_presence_must_agree_and_a_block_left_out_is_a_note() {
        let (mut target, infos) = local(&[("ram", M, true), ("extra", 2 * M, true)]);
        let mut off = SaveOptions::new("none");
        off.send_configuration = false;
        let blocks = vec![RamBlockInfo::new("ram", M)];
        let mut r = CompatReport::default();
        let out = Outgoing::new(&off, blocks.clone());
        check(&mut r, &out, &LoadOptions::new("none"), &mut target, &infos);
        assert_eq!(
            messages(&r),
            [("destination", "Configuration section missing")]
        );
        assert_eq!(r.notes.len(), 1);
        assert!(r.notes[0].starts_with("RAMBlock \"extra\" of the destination"));

        let mut r = CompatReport::default();
        let mut no_config = LoadOptions::new("none");
        no_config.expect_configuration = false;
        let out = Outgoing::new(&SaveOptions::new("none"), blocks.clone());
        check(&mut r, &out, &no_config, &mut target, &infos);
        assert_eq!(
            messages(&r),
            [("destination", "Unknown savevm section type 7")]
        );

        let mut r = CompatReport::default();
        let out = Outgoing::new(&off, blocks);
        check(&mut r, &out, &no_config, &mut target, &infos);
        assert!(r.compatible(), "{r:?}");
    }

    #[test]
    fn a_block_the_destination_does_not_migrate_and_a_bad_list_at_the_source() {
        let (mut target, infos) = local(&[("rom", M, false)]);
        let out = Outgoing::new(
            &SaveOptions::new("none"),
            vec![RamBlockInfo::new("rom", M), RamBlockInfo::new("rom", M)],
        );
        let mut r = CompatReport::default();
        check(&mut r, &out, &LoadOptions::new("none"), &mut target, &infos);
        let m = messages(&r);
        assert_eq!(m[0].0, "source");
        assert_eq!(
            &m[1..],
            [
                ("destination", "block rom should not be migrated !"),
                ("destination", "block rom should not be migrated !")
            ]
        );
    }
}
