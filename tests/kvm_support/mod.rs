//! Shared by the KVM integration tests: opening KVM (a failure is fatal under CI=true, a skip
//! elsewhere), sparse host memory, and the host-memory budget check for huge guests.
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

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("MemAvailable in /proc/meminfo")
}

/// Host memory KVM itself needs for slots covering `guest_bytes`. With the shadow MMU (no TDP
/// MMU: nested or paravirtual hosts such as this one) x86 KVM allocates, per 4 KiB guest page,
/// an 8-byte reverse map plus 2 bytes of write tracking up front: about 20 GiB for an 8 TiB
/// slot. The TDP MMU allocates those lazily.
pub fn kvm_slot_overhead(guest_bytes: u64) -> u64 {
    let tdp_mmu = std::fs::read_to_string("/sys/module/kvm/parameters/tdp_mmu")
        .map(|v| v.trim() == "Y")
        .unwrap_or(false);
    // Measured here: 10.04 bytes per page with the shadow MMU.
    let tenths_per_page = if tdp_mmu { 10 } else { 101 };
    guest_bytes / 4096 * tenths_per_page / 10
}

/// Waits up to `secs` for `need` bytes of available host memory (other processes' builds
/// finish); false if it never came.
pub fn wait_for_memory(need: u64, secs: u64) -> bool {
    for _ in 0..secs {
        if mem_available() >= need {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    mem_available() >= need
}

pub fn under_ci_pub() -> bool {
    under_ci()
}
