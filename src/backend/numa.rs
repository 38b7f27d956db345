//! Host NUMA binding: the host-nodes bitmap and mbind(2), as QEMU's backend applies them.

use super::{BackendError, Result};

use super::props::HostMemPolicy;

/// QEMU's MAX_NODES: host-nodes values must be below it.
pub const MAX_NODES: usize = 128;

const MPOL_PREFERRED_MANY: libc::c_int = 5;
const MPOL_MF_STRICT: libc::c_uint = 1;
const MPOL_MF_MOVE: libc::c_uint = 2;
const MPOL_F_ADDR: libc::c_ulong = 2;

/// MAX_NODES + 1 bits, the extra one for the kernel's historic off-by-one in `maxnode`.
const WORDS: usize = (MAX_NODES + 1).div_ceil(64);

/// A set of host nodes. Repeated sets accumulate, as QEMU's `host-nodes` setter does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeSet([u64; WORDS]);

impl NodeSet {
    /// Adds `nodes`; any value >= MAX_NODES refuses the whole list ("Invalid host-nodes value:
    /// %d") without changing the set.
    pub fn add(&mut self, nodes: &[u16]) -> Result<()> {
        if let Some(bad) = nodes.iter().find(|&&n| usize::from(n) >= MAX_NODES) {
            return Err(BackendError::InvalidHostNode(*bad));
        }
        for &n in nodes {
            self.0[usize::from(n) / 64] |= 1 << (n % 64);
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    pub fn nodes(&self) -> Vec<u16> {
        (0..MAX_NODES as u16)
            .filter(|&n| self.0[usize::from(n) / 64] & (1 << (n % 64)) != 0)
            .collect()
    }

    /// Last set bit + 1 (0 when empty), QEMU's `maxnode`.
    fn maxnode(&self) -> usize {
        self.nodes().last().map_or(0, |&n| usize::from(n) + 1)
    }
}

/// Installs `policy` over `[addr, addr+len)`; the caller does so before any page is touched so
/// that first-touch allocation honours it.
pub fn bind(addr: *mut u8, len: usize, policy: HostMemPolicy, nodes: &NodeSet) -> Result<()> {
    let mut mode = policy as libc::c_int;
    if policy == HostMemPolicy::Preferred {
        // Plain MPOL_PREFERRED honours only the first node; prefer the "many" form, which
        // kernels older than 5.15 refuse with EINVAL.
        mode = MPOL_PREFERRED_MANY;
    }
    loop {
        let rc = mbind(addr, len, mode, nodes);
        if rc == 0 {
            return Ok(());
        }
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if errno == libc::EINVAL && mode == MPOL_PREFERRED_MANY {
            mode = HostMemPolicy::Preferred as libc::c_int;
            continue;
        }
        if errno == libc::ENOSYS && policy == HostMemPolicy::Default {
            return Ok(());
        }
        return Err(BackendError::host(
            "cannot bind memory to host NUMA nodes",
            errno,
        ));
    }
}

fn mbind(addr: *mut u8, len: usize, mode: libc::c_int, nodes: &NodeSet) -> libc::c_long {
    // SAFETY: mbind only changes the policy of our own mapping; the mask outlives the call and
    // holds WORDS * 64 >= maxnode + 1 bits.
    unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as libc::c_ulong,
            len as libc::c_ulong,
            mode as libc::c_ulong,
            nodes.0.as_ptr(),
            (nodes.maxnode() + 1) as libc::c_ulong,
            (MPOL_MF_STRICT | MPOL_MF_MOVE) as libc::c_ulong,
        )
    }
}

/// The policy installed at `addr` (mode, first word of the node mask), from get_mempolicy with
/// MPOL_F_ADDR, which reads the mapping's policy without faulting a page in.
pub fn policy_at(addr: *const u8) -> Result<(i32, u64)> {
    let mut mode: libc::c_int = 0;
    let mut mask = [0u64; 16];
    // SAFETY: the kernel writes at most maxnode (1024) bits into `mask` (16 * 64 bits) and one
    // int into `mode`; both outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.as_mut_ptr(),
            1024 as libc::c_ulong,
            addr as libc::c_ulong,
            MPOL_F_ADDR,
        )
    };
    if rc != 0 {
        return Err(BackendError::last_os("get_mempolicy"));
    }
    Ok((mode, mask[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_accumulate_and_bound() {
        let mut s = NodeSet::default();
        assert!(s.is_empty());
        s.add(&[0, 1]).unwrap();
        s.add(&[3]).unwrap();
        assert_eq!(s.nodes(), [0, 1, 3]);
        assert_eq!(s.maxnode(), 4);
        let e = s.add(&[5, 128]).unwrap_err();
        assert_eq!(e.to_string(), "Invalid host-nodes value: 128");
        // A refused list leaves the set unchanged.
        assert_eq!(s.nodes(), [0, 1, 3]);
        s.add(&[127]).unwrap();
        assert_eq!(s.maxnode(), 128);
    }

    fn anon(len: usize) -> *mut u8 {
        // SAFETY: a fresh anonymous mapping; the tests unmap it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as *mut u8
    }

    #[test]
    fn bind_to_node_0_is_visible_through_get_mempolicy() {
        let len = 1 << 20;
        let p = anon(len);
        let mut s = NodeSet::default();
        s.add(&[0]).unwrap();
        bind(p, len, HostMemPolicy::Bind, &s).unwrap();
        assert_eq!(policy_at(p).unwrap(), (HostMemPolicy::Bind as i32, 1));
        bind(p, len, HostMemPolicy::Preferred, &s).unwrap();
        let (mode, mask) = policy_at(p).unwrap();
        assert!(mode == MPOL_PREFERRED_MANY || mode == HostMemPolicy::Preferred as i32);
        assert_eq!(mask, 1);
        // Nodes the host lacks are dropped by the kernel as long as one present node remains
        // (QEMU accepts host-nodes=0-1 on a one-node host too).
        let mut s01 = NodeSet::default();
        s01.add(&[0, 1]).unwrap();
        bind(p, len, HostMemPolicy::Bind, &s01).unwrap();
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(p as *mut libc::c_void, len) };
    }

    #[test]
    fn bind_to_a_missing_node_fails_with_qemus_words() {
        let len = 1 << 20;
        let p = anon(len);
        let mut s = NodeSet::default();
        s.add(&[127]).unwrap();
        let e = bind(p, len, HostMemPolicy::Bind, &s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot bind memory to host NUMA nodes: Invalid argument"
        );
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(p as *mut libc::c_void, len) };
    }
}
