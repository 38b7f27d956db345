//! A host virtual-memory mapping that unmaps itself when the last user lets go.
//!
//! Backends create mappings; RAMBlocks (including alias RAMBlocks that point into a backend's
//! memory) and KVM slots hold `Arc<HostMapping>` clones, so memory stays mapped while anything
//! can still reach it, whatever order the C side frees things in.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

#[derive(Debug)]
pub struct HostMapping {
    addr: usize,
    len: usize,
    page_size: usize,
    fd: Option<OwnedFd>,
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
            shared,
            readonly,
        }
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
