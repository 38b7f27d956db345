//! A host virtual-memory mapping that unmaps itself when the last user lets go.
//!
//! Backends create mappings; RAMBlocks (including alias RAMBlocks that point into a backend's
//! memory) and KVM slots hold `Arc<HostMapping>` clones, so memory stays mapped while anything
//! can still reach it, whatever order the C side frees things in.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::error::Error;

#[derive(Debug)]
pub struct HostMapping {
    addr: usize,
    len: usize,
    page_size: usize,
    fd: Option<OwnedFd>,
    file_offset: u64,
    shared: bool,
    readonly: bool,
}

impl HostMapping {
    /// Takes ownership of an existing mapping.
    ///
    /// # Safety
    /// `addr..addr+len` must be a live mapping created by `mmap` that nothing else unmaps.
    pub unsafe fn from_raw(
        addr: *mut u8,
        len: usize,
        page_size: usize,
        fd: Option<OwnedFd>,
        shared: bool,
        readonly: bool,
    ) -> Self {
        HostMapping {
            addr: addr as usize,
            len,
            page_size,
            fd,
            file_offset: 0,
            shared,
            readonly,
        }
    }

    /// Records where in its file the mapping starts (a file backend's `offset`), which a
    /// repair of a faulting page maps back from.
    pub fn with_file_offset(mut self, offset: u64) -> Self {
        self.file_offset = offset;
        self
    }

    /// Offset in its file of the mapping's first byte (0 for anonymous memory).
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The page size backing the mapping: the hugetlbfs page size, or the host page size.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    pub fn is_shared(&self) -> bool {
        self.shared
    }

    pub fn is_readonly(&self) -> bool {
        self.readonly
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: `from_raw`'s contract makes this mapping ours alone; it is unmapped once.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }
}

// SAFETY: the mapping is plain memory; the struct only records where it is. Concurrent access to
// the bytes is the guest's and the VMM's business, as with any shared guest RAM.
unsafe impl Send for HostMapping {}
// SAFETY: see Send; no interior state of the struct itself is mutated through `&self`.
unsafe impl Sync for HostMapping {}

/// The host's base page size.
pub fn host_page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as usize
    } else {
        4096
    }
}

/// QEMU_VMALLOC_ALIGN on x86/arm/ppc64 hosts: anonymous guest RAM starts on a 2 MiB boundary so
/// transparent huge pages can back it.
pub const VMALLOC_ALIGN: usize = 2 << 20;

/// How to map: the pieces of mmap's flags a backend decides.
#[derive(Clone, Copy, Debug)]
pub struct MapSpec {
    pub len: usize,
    pub align: usize,
    pub shared: bool,
    pub noreserve: bool,
    pub readonly: bool,
    pub file_offset: u64,
    /// MAP_SYNC (persistent memory, `pmem=on`); only for shared file mappings.
    pub sync: bool,
}

/// Linux's MAP_SYNC (not exported by libc for every glibc target).
const MAP_SYNC: libc::c_int = 0x80000;

/// Maps `spec.len` bytes of `fd` (or anonymous memory) at an address aligned to `spec.align`:
/// reserve a larger inaccessible range, map over its aligned middle, return the slack.
/// On failure nothing stays mapped. Returns the errno on failure.
pub fn map_aligned(spec: &MapSpec, fd: Option<&OwnedFd>) -> std::result::Result<*mut u8, i32> {
    let align = spec.align.max(host_page_size());
    let total = spec.len + align;
    // SAFETY: a fresh PROT_NONE reservation; nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(errno());
    }
    let start = (base as usize).next_multiple_of(align);
    let prot = if spec.readonly {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_WRITE
    };
    let mut flags = libc::MAP_FIXED
        | if spec.sync && spec.shared {
            libc::MAP_SHARED_VALIDATE | MAP_SYNC
        } else if spec.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
    if spec.noreserve {
        flags |= libc::MAP_NORESERVE;
    }
    if fd.is_none() {
        flags |= libc::MAP_ANONYMOUS;
    }
    // SAFETY: MAP_FIXED over part of the reservation made above, which we own.
    let p = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            spec.len,
            prot,
            flags,
            fd.map_or(-1, |f| f.as_raw_fd()),
            spec.file_offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        let e = errno();
        // SAFETY: releasing our own reservation.
        unsafe { libc::munmap(base, total) };
        return Err(e);
    }
    let head = start - base as usize;
    let tail = total - head - spec.len;
    // SAFETY: the head and tail are unused parts of our own reservation.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((start + spec.len) as *mut libc::c_void, tail);
        }
    }
    Ok(start as *mut u8)
}

/// A mapping the host refused: "WHAT: strerror(errno)".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {}", crate::error::strerror(*errno))]
pub struct MapError {
    pub what: String,
    pub errno: i32,
}

impl From<MapError> for Error {
    fn from(e: MapError) -> Error {
        Error::host(e.what, e.errno)
    }
}

pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Anonymous guest RAM of `size` bytes rounded up to the host page, aligned to
/// [`VMALLOC_ALIGN`] as QEMU aligns it; `name` is the RAM's name in the error ("cannot set up
/// guest memory 'pc.ram': ..."). Backends and regions that own their RAM both come here.
pub fn map_anonymous(
    name: &str,
    size: u64,
    shared: bool,
    noreserve: bool,
) -> std::result::Result<HostMapping, MapError> {
    let page = host_page_size();
    let failed = |errno| MapError {
        what: format!("cannot set up guest memory '{name}'"),
        errno,
    };
    let len = usize::try_from(size)
        .ok()
        .and_then(|s| s.checked_next_multiple_of(page))
        .filter(|l| {
            l.checked_add(VMALLOC_ALIGN)
                .is_some_and(|t| t <= isize::MAX as usize)
        })
        .ok_or_else(|| failed(libc::ENOMEM))?;
    let spec = MapSpec {
        len,
        align: VMALLOC_ALIGN,
        shared,
        noreserve,
        readonly: false,
        file_offset: 0,
        sync: false,
    };
    let p = map_aligned(&spec, None).map_err(failed)?;
    // SAFETY: `p..p+len` was just mapped by map_aligned and is owned by nobody else.
    Ok(unsafe { HostMapping::from_raw(p, len, page, None, shared, false) })
}
