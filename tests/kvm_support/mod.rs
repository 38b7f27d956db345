//! Shared by the KVM integration tests: opening KVM (a failure is fatal under CI=true, a skip
//! elsewhere) and sparse host memory.
#![allow(dead_code)]

use std::sync::Arc;

use hostmem::hostmap::HostMapping;
use hostmem::kvm::KvmAccel;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Opens a VM, or returns None (after saying why) when this host has no usable KVM. Under
/// CI=true a missing KVM fails the test instead.
pub fn open_kvm(max_slot_size: u64) -> Option<KvmAccel> {
    match KvmAccel::open(max_slot_size) {
        Ok(h) => Some(h),
        Err(e) if under_ci() => panic!("KVM is required under CI=true: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: no usable /dev/kvm here: {e}");
            None
        }
    }
}

/// Whether KVM can be opened at all (same CI rule as `open_kvm`).
pub fn kvm_usable() -> bool {
    open_kvm(0).is_some()
}

/// Anonymous private MAP_NORESERVE memory: only the pages touched cost anything.
pub fn sparse(len: u64) -> Arc<HostMapping> {
    Arc::new(hostmem::hostmap::map_anonymous("test", len, false, true).expect("sparse mapping"))
}

pub fn read_u64(m: &HostMapping, offset: u64) -> u64 {
    assert!(offset + 8 <= m.len() as u64);
    // SAFETY: in bounds of a live mapping (checked above); no vCPU runs during the read.
    unsafe { std::ptr::read_unaligned(m.as_ptr().add(offset as usize) as *const u64) }
}

pub fn write_u64(m: &HostMapping, offset: u64, v: u64) {
    assert!(offset + 8 <= m.len() as u64);
    // SAFETY: in bounds of a live mapping (checked above); no vCPU runs during the write.
    unsafe { std::ptr::write_unaligned(m.as_ptr().add(offset as usize) as *mut u64, v) }
}

pub fn under_ci_pub() -> bool {
    under_ci()
}
