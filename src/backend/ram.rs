//! memory-backend-ram: anonymous memory, plus the aligned-mmap helper the fd backends share.

use std::os::fd::{AsRawFd, OwnedFd};

use crate::error::{Error, Result};
use crate::hostmap::{host_page_size, HostMapping};

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

pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Anonymous guest RAM of `size` bytes (rounded up to the host page), named `name` in errors.
pub fn alloc(name: &str, size: u64, shared: bool, noreserve: bool) -> Result<HostMapping> {
    let page = host_page_size();
    let len = usize::try_from(size)
        .ok()
        .and_then(|s| s.checked_next_multiple_of(page))
        .ok_or_else(|| Error::host(format!("cannot set up guest memory '{name}'"), libc::ENOMEM))?;
    let spec = MapSpec {
        len,
        align: VMALLOC_ALIGN,
        shared,
        noreserve,
        readonly: false,
        file_offset: 0,
        sync: false,
    };
    let p = map_aligned(&spec, None)
        .map_err(|e| Error::host(format!("cannot set up guest memory '{name}'"), e))?;
    // SAFETY: `p..p+len` was just mapped by map_aligned and is owned by nobody else.
    Ok(unsafe { HostMapping::from_raw(p, len, page, None, shared, false) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_memory_is_aligned_and_writable() {
        let m = alloc("t", 5000, false, false).unwrap();
        assert_eq!(m.len(), 8192);
        assert_eq!(m.as_ptr() as usize % VMALLOC_ALIGN, 0);
        // SAFETY: inside the mapping just made.
        unsafe { m.as_ptr().add(8191).write(7) };
    }

    #[test]
    fn noreserve_allows_huge_sparse_mappings() {
        let m = alloc("big", 1 << 44, false, true).unwrap();
        assert_eq!(m.len(), 1 << 44);
    }

    #[test]
    fn failure_names_the_backend() {
        let e = alloc("pc.ram", 1 << 62, false, false).unwrap_err();
        assert!(
            e.message()
                .starts_with("cannot set up guest memory 'pc.ram': "),
            "{}",
            e.message()
        );
    }
}
