//! What the host can give before asking it: its memory and swap (what a reserving mapping is
//! checked against) and the free huge pages of a hugetlb pool, so that a refusal says what was
//! needed and what is there instead of a bare "Cannot allocate memory".

use super::{BackendError, Result};
use crate::options::values::size_to_str;

/// MemTotal + SwapTotal from /proc/meminfo: what the kernel's default overcommit heuristic
/// lets one reserving mapping have at most.
pub fn memory_and_swap() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
}

/// The sysfs directory of the pool of `page`-byte huge pages.
pub fn pool_dir(page: u64) -> String {
    format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page / 1024)
}

/// Huge pages of `page` bytes that a new reservation can still take (free minus reserved).
pub fn pool_available(page: u64) -> Option<u64> {
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("{}/{f}", pool_dir(page)))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(read("free_hugepages")?.saturating_sub(read("resv_hugepages")?))
}

/// Refuses a reserving mapping of `size` bytes of `page`-byte huge pages that the pool cannot
/// hold, before mapping it (QEMU maps and reports ENOMEM). `available` is what
/// [`pool_available`] read.
pub fn check_pool(region: &str, size: u64, page: u64, available: Option<u64>) -> Result<()> {
    let Some(available) = available else {
        return Ok(());
    };
    let needed = size.div_ceil(page);
    if needed > available {
        return Err(BackendError::HugetlbPoolTooSmall {
            region: region.to_string(),
            needed,
            available,
            page: size_to_str(page),
            pool: pool_dir(page),
        });
    }
    Ok(())
}

/// A reserving mapping refused with ENOMEM for more than the host has: the same error, with
/// a hint at `reserve=off`.
pub fn explain_enomem(e: BackendError, size: u64, noreserve: bool) -> BackendError {
    match e {
        BackendError::Host { what, errno } if errno == libc::ENOMEM && !noreserve => {
            match memory_and_swap() {
                Some(host) if size > host => BackendError::MoreThanTheHost { what, size, host },
                _ => BackendError::Host { what, errno },
            }
        }
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, HmErrorClass};

    #[test]
    fn a_pool_too_small_says_what_was_needed_and_what_is_free() {
        let e: Error = check_pool("pc.ram", 3 << 30, 2 << 20, Some(640))
            .unwrap_err()
            .into();
        assert_eq!(
            e.message(),
            "hugetlbfs pool too small for guest RAM 'pc.ram': 1536 pages of 2 MiB needed, 640 free"
        );
        assert_eq!(
            e.hint(),
            Some("Add pages to /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages, or use reserve=off to take them on first touch.\n")
        );
        assert_eq!(e.class(), HmErrorClass::HostResources);
        check_pool("pc.ram", 1280 << 20, 2 << 20, Some(640)).unwrap();
        check_pool("pc.ram", 1 << 40, 2 << 20, None).unwrap();
    }

    #[test]
    fn enomem_beyond_the_hosts_memory_hints_at_reserve_off() {
        let host = memory_and_swap().unwrap();
        let e = |size, noreserve| {
            Error::from(explain_enomem(
                BackendError::host("cannot set up guest memory 'm'", libc::ENOMEM),
                size,
                noreserve,
            ))
        };
        let big = e(host + (1 << 30), false);
        assert_eq!(
            big.message(),
            "cannot set up guest memory 'm': Cannot allocate memory"
        );
        assert_eq!(big.class(), HmErrorClass::HostResources);
        assert_eq!(big.errno(), Some(libc::ENOMEM));
        assert!(big.hint().unwrap().contains("reserve=off"), "{big:?}");
        // Within the host's memory, or with reserve=off already: no such hint.
        assert_eq!(e(1 << 20, false).hint(), None);
        assert_eq!(e(host + (1 << 30), true).hint(), None);
    }
}
