//! Board types: what the generic machine code needs to know of a board (the RAM half of QEMU's
//! `MachineClass`), and the registry `-M` looks names up in.
//!
//! The registry is generic over what a caller keeps beside each board (the C skin keeps the
//! board's `MachineClass *`), so the rules (unique names and aliases, the default board,
//! QEMU's words when `-M` names nothing) exist once, for C and Rust callers alike.

use crate::error::{Error, HmErrorClass, Result};

/// What the generic code needs to know of a board.
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

impl BoardInfo {
    fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.alias.as_deref() == Some(name)
    }
}

/// The registered boards, each with the caller's `T`.
pub struct BoardRegistry<T> {
    boards: Vec<(BoardInfo, T)>,
}

impl<T> Default for BoardRegistry<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> BoardRegistry<T> {
    pub const fn new() -> Self {
        BoardRegistry { boards: Vec::new() }
    }

    /// Adds a board; a name or alias another board already answers to is refused.
    pub fn register(&mut self, info: BoardInfo, extra: T) -> Result<()> {
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
        }
    }

    #[test]
    fn boards_are_found_by_name_alias_or_default() {
        let mut r = BoardRegistry::default();
        r.register(board("pc-i440fx-10.0", Some("pc"), true), 1)
            .unwrap();
        r.register(board("pc-q35-10.0", Some("q35"), false), 2)
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
        r.register(board("pc-i440fx-10.0", Some("pc"), true), ())
            .unwrap();
        for clash in [
            board("pc", None, false),
            board("other", Some("pc-i440fx-10.0"), false),
            board("other", Some("pc"), false),
        ] {
            let e = r.register(clash, ()).unwrap_err();
            assert_eq!(e.class(), HmErrorClass::Duplicate);
        }
        assert_eq!(r.len(), 1);
        assert_eq!(
            r.register(board("", None, false), ())
                .unwrap_err()
                .message(),
            "Parameter 'mc.name' is missing"
        );
    }

    #[test]
    fn without_a_default_board_no_m_is_an_error() {
        let mut r = BoardRegistry::default();
        r.register(board("none", None, false), ()).unwrap();
        assert_eq!(
            r.find(None).unwrap_err().message(),
            "No machine specified, and there is no default"
        );
    }
}
