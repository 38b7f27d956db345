//! memory-backend-memfd: guest RAM in an anonymous memfd, optionally on huge pages and sealed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{BackendError, Result};
use crate::hostmap::HostMapping;
use crate::options::values::size_to_str;

use super::file::{fd_page_size, MAP_FAILED};
use super::host_limits;
use crate::hostmap::{map_aligned, MapSpec, VMALLOC_ALIGN};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemfdProps {
    pub hugetlb: bool,
    /// 0 = the host's default huge page size.
    pub hugetlbsize: u64,
    pub seal: bool,
}

impl Default for MemfdProps {
    fn default() -> Self {
        MemfdProps {
            hugetlb: false,
            hugetlbsize: 0,
            seal: true,
        }
    }
}

/// Creates, sizes, seals and maps the memfd; the fd closes again on any failure.
pub fn alloc(
    props: &MemfdProps,
    type_name: &str,
    region_name: &str,
    size: u64,
    share: bool,
    noreserve: bool,
) -> Result<HostMapping> {
    let mut flags = libc::MFD_CLOEXEC;
    if props.seal {
        flags |= libc::MFD_ALLOW_SEALING;
    }
    if props.hugetlb {
        flags |= libc::MFD_HUGETLB;
        if props.hugetlbsize != 0 {
            if !props.hugetlbsize.is_power_of_two() {
                return Err(BackendError::HugepageSizeNotPowerOfTwo);
            }
            flags |= props.hugetlbsize.trailing_zeros() << libc::MFD_HUGE_SHIFT;
        }
    }
    // SAFETY: the name is a NUL-terminated literal.
    let fd = unsafe { libc::memfd_create(c"memory-backend-memfd".as_ptr(), flags) };
    if fd < 0 {
        return Err(BackendError::last_os("failed to create memfd"));
    }
    // SAFETY: fd is a fresh descriptor we own; OwnedFd closes it on every error path.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let page = fd_page_size(&fd);
    if !size.is_multiple_of(page as u64) {
        // QEMU only notices after a failed ftruncate or a mismatched mapping; say why here.
        return Err(BackendError::SizeNotPageMultiple {
            ty: type_name.to_string(),
            page: size_to_str(page as u64),
        });
    }
    if props.hugetlb && !noreserve {
        let page = page as u64;
        host_limits::check_pool(region_name, size, page, host_limits::pool_available(page))?;
    }
    // SAFETY: fd is our memfd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
        return Err(BackendError::last_os(format!(
            "failed to resize memfd to {size}"
        )));
    }
    if props.seal {
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fd is our memfd, created with MFD_ALLOW_SEALING.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(BackendError::last_os("failed to add seals to memfd"));
        }
    }
    let len = usize::try_from(size).map_err(|_| BackendError::host(MAP_FAILED, libc::ENOMEM))?;
    let spec = MapSpec {
        len,
        // As anonymous RAM: a 2 MiB boundary at least, so KVM can map huge pages (THP on
        // shmem) into the guest; a 4 KiB-aligned start rules them out for the whole slot.
        align: page.max(VMALLOC_ALIGN),
        shared: share,
        noreserve,
        readonly: false,
        file_offset: 0,
        sync: false,
    };
    let p = map_aligned(&spec, Some(&fd)).map_err(|e| {
        host_limits::explain_enomem(BackendError::host(MAP_FAILED, e), size, noreserve)
    })?;
    // SAFETY: `p..p+len` was just mapped for us alone.
    Ok(unsafe { HostMapping::from_raw(p, len, page, Some(fd), share, false) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_start_on_a_2_mib_boundary() {
        let maps: Vec<_> = (0..8)
            .map(|_| {
                alloc(
                    &MemfdProps::default(),
                    "memory-backend-memfd",
                    "m",
                    1 << 20,
                    true,
                    false,
                )
                .unwrap()
            })
            .collect();
        for m in &maps {
            assert_eq!(m.as_ptr() as usize % (2 << 20), 0);
        }
    }

    #[test]
    fn sealed_memfd_cannot_grow() {
        let m = alloc(
            &MemfdProps::default(),
            "memory-backend-memfd",
            "m",
            1 << 20,
            true,
            false,
        )
        .unwrap();
        let fd = m.fd().unwrap();
        // SAFETY: fd belongs to the live mapping `m`.
        let rc = unsafe { libc::ftruncate(fd, 2 << 20) };
        assert_eq!(rc, -1);
        // SAFETY: as above.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        assert_eq!(
            seals,
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL
        );
    }

    #[test]
    fn unsealed_memfd_has_no_seals() {
        let p = MemfdProps {
            seal: false,
            ..Default::default()
        };
        let m = alloc(&p, "memory-backend-memfd", "m", 4096, false, false).unwrap();
        // SAFETY: fd belongs to the live mapping `m`.
        let seals = unsafe { libc::fcntl(m.fd().unwrap(), libc::F_GET_SEALS) };
        assert_eq!(seals, libc::F_SEAL_SEAL);
    }

    #[test]
    fn refusals() {
        let t = "memory-backend-memfd";
        assert_eq!(
            alloc(&MemfdProps::default(), t, "m", 1000, true, false)
                .unwrap_err()
                .to_string(),
            "backend 'memory-backend-memfd' memory size must be multiple of 4 KiB"
        );
        let p = MemfdProps {
            hugetlb: true,
            hugetlbsize: 3 << 20,
            seal: true,
        };
        assert_eq!(
            alloc(&p, t, "m", 6 << 20, true, false)
                .unwrap_err()
                .to_string(),
            "Hugepage size must be a power of 2"
        );
    }
}
