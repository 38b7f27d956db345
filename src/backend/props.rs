//! Property names, value types and QEMU's wording for refusing them.

use super::error::BackendError;
use super::BackendType;
use crate::options::values::Result as ValueResult;
use crate::options::OptionError;

/// Properties every backend type has (backends/hostmem.c class properties).
pub const COMMON: &[&str] = &[
    "size",
    "merge",
    "dump",
    "prealloc",
    "prealloc-threads",
    "share",
    "reserve",
    "policy",
    "host-nodes",
    "x-use-canonical-path-for-ramblock-id",
];

/// memory-backend-file's own properties.
pub const FILE: &[&str] = &[
    "mem-path",
    "align",
    "offset",
    "discard-data",
    "readonly",
    "rom",
    "pmem",
];

/// memory-backend-memfd's own properties.
pub const MEMFD: &[&str] = &["hugetlb", "hugetlbsize", "seal"];

/// The order of QEMU's QAPI schema (MemoryBackendProperties, then the type's own), in which
/// QEMU's option parser checks values and reports the first bad or missing one.
pub fn schema_order(ty: BackendType) -> Vec<&'static str> {
    let mut v = vec![
        "dump",
        "host-nodes",
        "merge",
        "policy",
        "prealloc",
        "prealloc-threads",
        "share",
        "reserve",
        "size",
        "x-use-canonical-path-for-ramblock-id",
    ];
    v.extend_from_slice(match ty {
        BackendType::Ram => &[],
        BackendType::File => &[
            "align",
            "offset",
            "discard-data",
            "mem-path",
            "pmem",
            "readonly",
            "rom",
        ],
        BackendType::Memfd => &["hugetlb", "hugetlbsize", "seal"],
    });
    v
}

/// Properties an `-object` option string must give (mandatory in QEMU's schema).
pub fn required(ty: BackendType, prop: &str) -> bool {
    prop == "size" || (ty == BackendType::File && prop == "mem-path")
}

/// Checks the syntax of a value the way QEMU's option visitor does, before any setter runs.
pub fn check_syntax(prop: &str, value: &str) -> ValueResult<()> {
    use crate::options::values::{
        parse_bool_param, parse_size_param, parse_u16_list, parse_u32_param,
    };
    match prop {
        "size" | "align" | "offset" | "hugetlbsize" => parse_size_param(prop, value).map(drop),
        "prealloc-threads" => parse_u32_param(prop, value).map(drop),
        "host-nodes" => parse_u16_list(prop, value).map(drop),
        "policy" => HostMemPolicy::parse(value).map(drop),
        "rom" => OnOffAuto::parse(prop, value).map(drop),
        "mem-path" => Ok(()),
        _ => parse_bool_param(prop, value).map(drop),
    }
}

/// Whether `prop` is a property of backends of type `ty`.
pub fn exists(ty: BackendType, prop: &str) -> bool {
    COMMON.contains(&prop)
        || match ty {
            BackendType::Ram => false,
            BackendType::File => FILE.contains(&prop),
            BackendType::Memfd => MEMFD.contains(&prop),
        }
}

/// `qom-set` of a property the type lacks.
pub fn not_found(ty: BackendType, prop: &str) -> BackendError {
    BackendError::NoSuchProperty {
        ty: ty.name(),
        prop: prop.to_string(),
    }
}

/// QEMU's host_memory_backend setters: "property 'size' of memory-backend-ram doesn't take
/// value '0'".
pub fn zero_refused(ty: BackendType, prop: &str) -> BackendError {
    BackendError::ZeroRefused {
        ty: ty.name(),
        prop: prop.to_string(),
    }
}

/// A property that can no longer change: the backend is complete.
pub fn completed(ty: BackendType, prop: &str) -> BackendError {
    BackendError::Completed {
        ty: ty.name(),
        prop: prop.to_string(),
    }
}

/// An enum value QEMU does not know: "Parameter 'policy' does not accept value 'foo'".
pub fn bad_enum(prop: &str, value: &str) -> OptionError {
    OptionError::BadValue {
        name: prop.to_string(),
        value: value.to_string(),
    }
}

/// HostMemPolicy: the Linux MPOL_* numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostMemPolicy {
    Default = 0,
    Preferred = 1,
    Bind = 2,
    Interleave = 3,
}

impl HostMemPolicy {
    pub fn parse(s: &str) -> ValueResult<Self> {
        Ok(match s {
            "default" => Self::Default,
            "preferred" => Self::Preferred,
            "bind" => Self::Bind,
            "interleave" => Self::Interleave,
            _ => return Err(bad_enum("policy", s)),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Preferred => "preferred",
            Self::Bind => "bind",
            Self::Interleave => "interleave",
        }
    }
}

/// QAPI OnOffAuto, for `rom`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OnOffAuto {
    Auto,
    On,
    Off,
}

impl OnOffAuto {
    pub fn parse(prop: &str, s: &str) -> ValueResult<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "on" => Self::On,
            "off" => Self::Off,
            _ => return Err(bad_enum(prop, s)),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::values::expects;

    #[test]
    fn properties_belong_to_their_types() {
        assert!(exists(BackendType::Ram, "size"));
        assert!(!exists(BackendType::Ram, "mem-path"));
        assert!(exists(BackendType::File, "mem-path"));
        assert!(!exists(BackendType::File, "seal"));
        assert!(exists(BackendType::Memfd, "hugetlbsize"));
        assert!(!exists(BackendType::Memfd, "foo"));
    }

    #[test]
    fn schema_order_covers_every_property_once() {
        for ty in [BackendType::Ram, BackendType::File, BackendType::Memfd] {
            let order = schema_order(ty);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), order.len());
            assert!(order.iter().all(|p| exists(ty, p)));
            let count = COMMON.len()
                + match ty {
                    BackendType::Ram => 0,
                    BackendType::File => FILE.len(),
                    BackendType::Memfd => MEMFD.len(),
                };
            assert_eq!(order.len(), count);
        }
        assert_eq!(
            check_syntax("dump", "x").unwrap_err(),
            expects("dump", "'on' or 'off'")
        );
        assert!(check_syntax("mem-path", "").is_ok());
    }

    #[test]
    fn enums_parse_and_print() {
        for p in ["default", "preferred", "bind", "interleave"] {
            assert_eq!(HostMemPolicy::parse(p).unwrap().name(), p);
        }
        assert_eq!(
            HostMemPolicy::parse("foo").unwrap_err().to_string(),
            "Parameter 'policy' does not accept value 'foo'"
        );
        assert_eq!(OnOffAuto::parse("rom", "auto").unwrap(), OnOffAuto::Auto);
        assert!(OnOffAuto::parse("rom", "yes").is_err());
    }
}
