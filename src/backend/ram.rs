//! memory-backend-ram: anonymous memory.

use super::host_limits::explain_enomem;
use super::Result;
#[cfg(test)]
use crate::hostmap::VMALLOC_ALIGN;
use crate::hostmap::{self, HostMapping};

/// Anonymous guest RAM of `size` bytes (rounded up to the host page), named `name` in errors.
pub fn alloc(name: &str, size: u64, shared: bool, noreserve: bool) -> Result<HostMapping> {
    hostmap::map_anonymous(name, size, shared, noreserve)
        .map_err(|e| explain_enomem(e.into(), size, noreserve))
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
            e.to_string()
                .starts_with("cannot set up guest memory 'pc.ram': "),
            "{e}"
        );
    }
}
