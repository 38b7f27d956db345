//! What can go wrong with a memory backend, each as QEMU 10 words it, converted to the C-facing
//! [`Error`] (class, errno) in one place.

use crate::error::{strerror, Error, HmErrorClass};
use crate::options::values::size_to_str;
use crate::options::OptionError;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// A value that does not parse.
    #[error(transparent)]
    Option(#[from] OptionError),
    #[error("Property '{ty}.{prop}' not found")]
    NoSuchProperty { ty: &'static str, prop: String },
    #[error("property '{prop}' of {ty} doesn't take value '0'")]
    ZeroRefused { ty: &'static str, prop: String },
    #[error("Property '{ty}.hugetlbsize' doesn't take value '0'")]
    HugetlbsizeZero { ty: &'static str },
    /// A property that cannot change once the backend is complete, in the wording QEMU uses
    /// for that property.
    #[error("{}", completed_message(ty, prop))]
    Completed { ty: &'static str, prop: String },
    #[error("'prealloc=on' and 'reserve=off' are incompatible")]
    PreallocWithoutReserve,
    #[error("memory backend '{0}' is already complete")]
    AlreadyComplete(String),
    #[error("memory backend '{0}' is not being completed")]
    NotCompleting(String),
    #[error("memory backend '{0}' has no memory yet: complete it first")]
    NotAllocated(String),
    #[error("can't create backend with size 0")]
    SizeZero,
    #[error("host-nodes must be empty for policy default, or you should explicitly specify a policy other than default")]
    NodesWithDefaultPolicy,
    #[error("host-nodes must be set for policy {0}")]
    PolicyWithoutNodes(&'static str),
    #[error("Invalid host-nodes value: {0}")]
    InvalidHostNode(u16),
    #[error("mem-path property not set")]
    MemPathMissing,
    #[error("property 'rom' = 'on' is not supported with 'readonly' = 'off'")]
    RomOnWithoutReadonly,
    #[error("property 'rom' = 'off' is incompatible with 'readonly' = 'on' and 'share' = 'on'")]
    RomOffReadonlyShared,
    #[error("Hugepage size must be a power of 2")]
    HugepageSizeNotPowerOfTwo,
    #[error("alignment 0x{align:x} must be multiples of page size 0x{page:x}")]
    AlignNotPageMultiple { align: u64, page: u64 },
    #[error("alignment 0x{0:x} must be a power of two")]
    AlignNotPowerOfTwo(u64),
    #[error("offset 0x{offset:x} must be multiples of page size 0x{page:x}")]
    OffsetNotPageMultiple { offset: u64, page: u64 },
    #[error("memory size 0x{size:x} must be equal to or larger than page size 0x{page:x}")]
    SizeBelowPage { size: u64, page: u64 },
    /// `page` as QEMU's size_to_str prints it ("2 MiB").
    #[error("backend '{ty}' memory size must be multiple of {page}")]
    SizeNotPageMultiple { ty: String, page: String },
    #[error("offset 0x{0:x} is too large")]
    OffsetTooLarge(u64),
    #[error("{region} backing store size 0x{file_size:x} is too small for 'size' option 0x{size:x} plus 'offset' option 0x{offset:x}")]
    FileTooSmall {
        region: String,
        file_size: u64,
        size: u64,
        offset: u64,
    },
    /// mem-path names something that cannot be sized and mapped as guest RAM (a FIFO, a
    /// character or block device, a socket). QEMU opens it anyway and fails later with an
    /// unrelated errno, or for /dev/zero silently maps private memory.
    #[error("can't use {path} as backing store for guest RAM: it is {kind}, not a regular file")]
    NotARegularFile { path: String, kind: &'static str },
    /// The host refused: "WHAT: strerror(errno)", as QEMU's error_setg_errno prints it.
    #[error("{what}: {}", strerror(*errno))]
    Host { what: String, errno: i32 },
    /// QEMU maps and fails with ENOMEM; hostmem reads the pool first.
    #[error("hugetlbfs pool too small for guest RAM '{region}': {needed} pages of {page} needed, {available} free")]
    HugetlbPoolTooSmall {
        region: String,
        needed: u64,
        available: u64,
        page: String,
        pool: String,
    },
    /// A reserving mapping larger than the host's memory and swap: QEMU's words, and a hint.
    #[error("{what}: {}", strerror(libc::ENOMEM))]
    MoreThanTheHost { what: String, size: u64, host: u64 },
    /// Preallocation could not install its SIGBUS handler.
    #[error("{0}: failed to install signal handler")]
    SignalHandler(&'static str),
}

impl From<crate::hostmap::MapError> for BackendError {
    fn from(e: crate::hostmap::MapError) -> BackendError {
        BackendError::Host {
            what: e.what,
            errno: e.errno,
        }
    }
}

impl BackendError {
    pub fn host(what: impl Into<String>, errno: i32) -> BackendError {
        BackendError::Host {
            what: what.into(),
            errno,
        }
    }

    /// The calling thread's errno as a host error.
    pub fn last_os(what: impl Into<String>) -> BackendError {
        Self::host(what, crate::hostmap::errno())
    }
}

fn completed_message(ty: &str, prop: &str) -> String {
    match prop {
        // host_memory_backend_set_size's format ends in a space.
        "size" => format!("cannot change property {prop} of {ty} "),
        "mem-path" | "align" | "offset" => format!("cannot change property '{prop}' of {ty}"),
        "readonly" | "rom" | "pmem" => format!("cannot change property '{prop}' of {ty}."),
        _ => "cannot change property value".to_string(),
    }
}

impl From<BackendError> for Error {
    fn from(e: BackendError) -> Error {
        let class = match &e {
            BackendError::Option(o) => return o.clone().into(),
            BackendError::Completed { .. } | BackendError::AlreadyComplete(_) => {
                HmErrorClass::Completed
            }
            BackendError::NotCompleting(_) | BackendError::SignalHandler(_) => {
                HmErrorClass::Generic
            }
            BackendError::NotAllocated(_) => HmErrorClass::InUse,
            BackendError::Host { errno, .. } => {
                return Error::new(HmErrorClass::Host, e.to_string()).with_errno(*errno)
            }
            BackendError::HugetlbPoolTooSmall { pool, .. } => {
                return Error::new(HmErrorClass::HostResources, e.to_string()).with_hint(format!(
                    "Add pages to {pool}/nr_hugepages, or use reserve=off to take them on first touch.\n"
                ))
            }
            BackendError::MoreThanTheHost { size, host, .. } => {
                return Error::new(HmErrorClass::HostResources, e.to_string())
                    .with_errno(libc::ENOMEM)
                    .with_hint(format!(
                        "The host has {} of memory and swap for {}: a sparse guest needs reserve=off, which takes memory on first touch only.\n",
                        size_to_str(*host),
                        size_to_str(*size)
                    ))
            }
            _ => HmErrorClass::InvalidParameter,
        };
        Error::new(class, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_errors_read_like_strerror_and_keep_errno() {
        let e: Error =
            BackendError::host("cannot bind memory to host NUMA nodes", libc::EPERM).into();
        assert_eq!(
            e.message(),
            "cannot bind memory to host NUMA nodes: Operation not permitted"
        );
        assert_eq!(
            (e.class(), e.errno()),
            (HmErrorClass::Host, Some(libc::EPERM))
        );
    }

    #[test]
    fn completed_properties_use_qemus_three_wordings() {
        let msg = |prop: &str| {
            BackendError::Completed {
                ty: "memory-backend-file",
                prop: prop.into(),
            }
            .to_string()
        };
        assert_eq!(
            msg("size"),
            "cannot change property size of memory-backend-file "
        );
        assert_eq!(
            msg("align"),
            "cannot change property 'align' of memory-backend-file"
        );
        assert_eq!(
            msg("rom"),
            "cannot change property 'rom' of memory-backend-file."
        );
        assert_eq!(msg("share"), "cannot change property value");
        let e: Error = BackendError::Completed {
            ty: "memory-backend-ram",
            prop: "share".into(),
        }
        .into();
        assert_eq!(e.class(), HmErrorClass::Completed);
    }

    #[test]
    fn value_errors_keep_the_option_parsers_class() {
        let e: Error = BackendError::from(OptionError::DuplicateId("m".into())).into();
        assert_eq!(e.class(), HmErrorClass::Duplicate);
    }
}
