//! Board types: what the generic machine code needs to know of a board (the RAM half of QEMU's
//! `MachineClass`), and the registry `-M` looks names up in.
//!
//! The registry is generic over what a caller keeps beside each board (the C skin keeps the
//! board's `MachineClass *`), so the rules (unique names and aliases, the default board,
//! QEMU's words when `-M` names nothing, the `-machine help` listing) exist once, for C and Rust
//! callers alike.

use std::cmp::Ordering;

use crate::error::{Error, HmErrorClass, Result};

/// The type of a board's own machine property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PropertyKind {
    /// A size ("2G"), as QEMU's size visitor reads it.
    Size,
    /// on/off.
    Bool,
}

/// A property a board adds to its machine type, e.g. the PC's `max-ram-below-4g` (QEMU: a
/// class property of the board's machine class).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoardProperty {
    pub name: String,
    pub kind: PropertyKind,
}

/// What the generic code needs to know of a board.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BoardInfo {
    /// Full type name, e.g. "pc-i440fx-10.0" (the name the migration stream carries).
    pub name: String,
    /// Short name `-M` also accepts, e.g. "pc".
    pub alias: Option<String>,
    pub default_ram_size: u64,
    /// Name of main RAM (backend id and RAMBlock); `None` for boards that take no `-m`.
    pub default_ram_id: Option<String>,
    /// Whether `-numa node,mem=` (legacy "fake" NUMA) is still accepted: only by old machine
    /// types.
    pub numa_mem_supported: bool,
    /// Whether the board knows NUMA at all (QEMU: it maps CPUs to nodes).
    pub numa_supported: bool,
    /// The board starts without a CPU unless `-smp` asks for one (QEMU's `none`).
    pub no_cpus_by_default: bool,
    /// The board `-M` defaults to.
    pub is_default: bool,
    /// QEMU's `default_cpu_type`, e.g. "qemu64-x86_64-cpu": `-cpu` is read against the x86
    /// models for a board with an x86 type, and not read at all for a board without one.
    pub default_cpu_type: Option<String>,
    /// The board's own machine properties.
    pub properties: Vec<BoardProperty>,
}

impl BoardInfo {
    fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.alias.as_deref() == Some(name)
    }

    /// The QOM type name QEMU sorts the listing by ("pc-i440fx-10.0-machine").
    fn type_name(&self) -> String {
        format!("{}-machine", self.name)
    }
}

/// What `-machine help` shows of a board beside its name, alias and default mark: QEMU's
/// `MachineClass` `desc`, `family` and `deprecation_reason`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BoardListing {
    /// One line for people, e.g. "Standard PC (i440FX + PIIX, 1996)".
    pub desc: Option<String>,
    /// The versions of one machine share a family ("pc_piix", "pc_q35"); `None` for a
    /// standalone board.
    pub family: Option<String>,
    /// Set for a deprecated machine type: listed with "(deprecated)"; the C skin warns with it
    /// when the type is built.
    pub deprecation_reason: Option<String>,
}

/// The header line of `-machine help`.
pub const HELP_HEADER: &str = "Supported machines are:";

/// The registered boards, each with its listing and the caller's `T`.
pub struct BoardRegistry<T> {
    boards: Vec<(BoardInfo, T)>,
    /// `listings[i]` belongs to `boards[i]`.
    listings: Vec<BoardListing>,
}

impl<T> Default for BoardRegistry<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> BoardRegistry<T> {
    pub const fn new() -> Self {
        BoardRegistry {
            boards: Vec::new(),
            listings: Vec::new(),
        }
    }

    /// Adds a board; a name or alias another board already answers to is refused.
    pub fn register(&mut self, info: BoardInfo, listing: BoardListing, extra: T) -> Result<()> {
        if info.name.is_empty() {
            return Err(Error::invalid("Parameter 'mc.name' is missing"));
        }
        let clash = self.boards.iter().any(|(o, _)| {
            o.answers_to(&info.name) || info.alias.as_deref().is_some_and(|a| o.answers_to(a))
        });
        if clash {
            return Err(Error::new(
                HmErrorClass::Duplicate,
                format!("machine type '{}' is already registered", info.name),
            ));
        }
        self.boards.push((info, extra));
        self.listings.push(listing);
        Ok(())
    }

    /// The board `-M name` selects, or the default board without `-M`; QEMU's errors when
    /// there is none.
    pub fn find(&self, name: Option<&str>) -> Result<&(BoardInfo, T)> {
        let found = self.boards.iter().find(|(b, _)| match name {
            Some(n) => b.answers_to(n),
            None => b.is_default,
        });
        found.ok_or_else(|| {
            let e = match name {
                Some(n) => Error::new(
                    HmErrorClass::NotFound,
                    format!("unsupported machine type: \"{n}\""),
                ),
                None => Error::new(
                    HmErrorClass::NotFound,
                    "No machine specified, and there is no default",
                ),
            };
            e.with_hint("Use -machine help to list supported machines\n")
        })
    }

    /// The boards in the order `-machine help` lists them (QEMU's `machine_class_cmp` over
    /// the type names): families first, by family name, each family newest version first (a
    /// plain string comparison, so "pc-i440fx-9.2" comes before "pc-i440fx-10.0", as in QEMU);
    /// then the standalone boards, in increasing order of name.
    pub fn in_help_order(&self) -> Vec<(&BoardInfo, &BoardListing)> {
        let mut all: Vec<_> = self
            .boards
            .iter()
            .map(|(info, _)| info)
            .zip(&self.listings)
            .map(|(info, listing)| (info, listing, info.type_name()))
            .collect();
        all.sort_by(|(_, l1, t1), (_, l2, t2)| match (&l1.family, &l2.family) {
            (None, None) => t1.cmp(t2),
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(f1), Some(f2)) => f1.cmp(f2).then_with(|| t2.cmp(t1)),
        });
        all.into_iter().map(|(i, l, _)| (i, l)).collect()
    }

    /// What `-machine help` prints, byte for byte as QEMU 10's `machine_help_func`: the header,
    /// then per board an "(alias of NAME)" line for its alias first, then its own line with
    /// " (default)" and " (deprecated)" marks; names padded to 20 columns (longer ones push
    /// the description right), a board without a description shows glibc's "(null)".
    pub fn help_text(&self) -> String {
        let mut out = format!("{HELP_HEADER}\n");
        for (info, listing) in self.in_help_order() {
            let desc = listing.desc.as_deref().unwrap_or("(null)");
            if let Some(alias) = &info.alias {
                out += &format!("{alias:<20} {desc} (alias of {})\n", info.name);
            }
            out += &format!(
                "{:<20} {desc}{}{}\n",
                info.name,
                if info.is_default { " (default)" } else { "" },
                if listing.deprecation_reason.is_some() {
                    " (deprecated)"
                } else {
                    ""
                }
            );
        }
        out
    }

    pub fn len(&self) -> usize {
        self.boards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.boards.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(name: &str, alias: Option<&str>, is_default: bool) -> BoardInfo {
        BoardInfo {
            name: name.into(),
            alias: alias.map(str::to_string),
            default_ram_size: 128 << 20,
            default_ram_id: Some("pc.ram".into()),
            numa_mem_supported: false,
            numa_supported: true,
            no_cpus_by_default: false,
            is_default,
            ..BoardInfo::default()
        }
    }

    fn listed(family: Option<&str>) -> BoardListing {
        BoardListing {
            desc: Some("Some board".into()),
            family: family.map(str::to_string),
            deprecation_reason: None,
        }
    }

    #[test]
    fn boards_are_found_by_name_alias_or_default() {
        let mut r = BoardRegistry::default();
        r.register(board("pc-i440fx-10.0", Some("pc"), true), listed(None), 1)
            .unwrap();
        r.register(board("pc-q35-10.0", Some("q35"), false), listed(None), 2)
            .unwrap();
        assert_eq!(r.find(Some("q35")).unwrap().1, 2);
        assert_eq!(r.find(Some("pc-i440fx-10.0")).unwrap().1, 1);
        assert_eq!(r.find(None).unwrap().1, 1);
        let e = r.find(Some("virt")).unwrap_err();
        assert_eq!(e.message(), "unsupported machine type: \"virt\"");
        assert_eq!(
            e.hint(),
            Some("Use -machine help to list supported machines\n")
        );
    }

    #[test]
    fn names_and_aliases_are_unique_across_boards() {
        let mut r = BoardRegistry::default();
        r.register(board("pc-i440fx-10.0", Some("pc"), true), listed(None), ())
            .unwrap();
        for clash in [
            board("pc", None, false),
            board("other", Some("pc-i440fx-10.0"), false),
            board("other", Some("pc"), false),
        ] {
            let e = r.register(clash, listed(None), ()).unwrap_err();
            assert_eq!(e.class(), HmErrorClass::Duplicate);
        }
        assert_eq!(r.len(), 1);
        assert_eq!(
            r.register(board("", None, false), listed(None), ())
                .unwrap_err()
                .message(),
            "Parameter 'mc.name' is missing"
        );
    }

    #[test]
    fn without_a_default_board_no_m_is_an_error() {
        let mut r = BoardRegistry::default();
        r.register(board("none", None, false), listed(None), ())
            .unwrap();
        assert_eq!(
            r.find(None).unwrap_err().message(),
            "No machine specified, and there is no default"
        );
    }

    /// A test board: (name, alias, family, is_default, deprecated).
    type Listed<'a> = (&'a str, Option<&'a str>, Option<&'a str>, bool, bool);

    /// Registers the boards in the order given.
    fn registry(boards: &[Listed]) -> BoardRegistry<()> {
        let mut r = BoardRegistry::default();
        for &(name, alias, family, is_default, deprecated) in boards {
            let listing = BoardListing {
                deprecation_reason: deprecated.then(|| "too old".to_string()),
                ..listed(family)
            };
            r.register(board(name, alias, is_default), listing, ())
                .unwrap();
        }
        r
    }

    fn names_in_help_order(r: &BoardRegistry<()>) -> Vec<&str> {
        r.in_help_order()
            .into_iter()
            .map(|(b, _)| b.name.as_str())
            .collect()
    }

    #[test]
    fn families_list_first_newest_version_first_by_plain_string_order() {
        // Registration order does not matter; QEMU compares type names as strings, so
        // "9.2" sorts above "10.0" and "2.4" above "2.12".
        let r = registry(&[
            ("none", None, None, false, false),
            ("pc-q35-10.0", Some("q35"), Some("pc_q35"), false, false),
            ("pc-i440fx-2.12", None, Some("pc_piix"), false, true),
            ("pc-i440fx-10.0", Some("pc"), Some("pc_piix"), true, false),
            ("pc-i440fx-9.2", None, Some("pc_piix"), false, false),
            ("pc-i440fx-2.4", None, Some("pc_piix"), false, true),
            ("pc-q35-9.2", None, Some("pc_q35"), false, false),
            ("isapc", None, None, false, false),
        ]);
        assert_eq!(
            names_in_help_order(&r),
            [
                "pc-i440fx-9.2",
                "pc-i440fx-2.4",
                "pc-i440fx-2.12",
                "pc-i440fx-10.0",
                "pc-q35-9.2",
                "pc-q35-10.0",
                "isapc",
                "none",
            ]
        );
    }

    #[test]
    fn standalone_boards_sort_by_type_name_increasing() {
        // As QEMU's s390x listing: no family, so "10.0" comes first and "2.9" after "2.12".
        let r = registry(&[
            ("s390-ccw-virtio-2.9", None, None, false, true),
            ("s390-ccw-virtio-2.12", None, None, false, true),
            (
                "s390-ccw-virtio-10.0",
                Some("s390-ccw-virtio"),
                None,
                true,
                false,
            ),
            ("none", None, None, false, false),
        ]);
        assert_eq!(
            names_in_help_order(&r),
            [
                "none",
                "s390-ccw-virtio-10.0",
                "s390-ccw-virtio-2.12",
                "s390-ccw-virtio-2.9"
            ]
        );
        // The "-machine" suffix takes part: "a-machine" sorts after "a-b-machine" ('m' > 'b'),
        // where the bare names would sort the other way.
        let r = registry(&[
            ("a", None, None, false, false),
            ("a-b", None, None, false, false),
        ]);
        assert_eq!(names_in_help_order(&r), ["a-b", "a"]);
    }

    #[test]
    fn help_text_is_qemus_byte_for_byte() {
        let r = registry(&[
            ("pc-i440fx-10.0", Some("pc"), Some("pc_piix"), true, false),
            ("pc-i440fx-7.0", None, Some("pc_piix"), false, true),
            (
                "s390-ccw-virtio-10.0",
                Some("s390-ccw-virtio"),
                None,
                false,
                false,
            ),
            ("a-machine-name-over-20", None, None, false, false),
        ]);
        assert_eq!(
            r.help_text(),
            "Supported machines are:\n\
             pc-i440fx-7.0        Some board (deprecated)\n\
             pc                   Some board (alias of pc-i440fx-10.0)\n\
             pc-i440fx-10.0       Some board (default)\n\
             a-machine-name-over-20 Some board\n\
             s390-ccw-virtio      Some board (alias of s390-ccw-virtio-10.0)\n\
             s390-ccw-virtio-10.0 Some board\n"
        );
    }

    #[test]
    fn default_and_deprecated_marks_come_in_qemus_order_and_no_desc_is_null() {
        let mut r = BoardRegistry::default();
        let listing = BoardListing {
            desc: None,
            family: None,
            deprecation_reason: Some("old".into()),
        };
        r.register(board("old", None, true), listing, ()).unwrap();
        assert_eq!(
            r.help_text(),
            "Supported machines are:\nold                  (null) (default) (deprecated)\n"
        );
        assert_eq!(
            BoardRegistry::<()>::default().help_text(),
            "Supported machines are:\n"
        );
    }
}
