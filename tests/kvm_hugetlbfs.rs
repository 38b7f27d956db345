//! A guest on hugetlbfs memory (memory-backend-file on 2 MiB pages): slots are cut on huge-page
//! boundaries, so a max slot size of 3 MiB gives 2 MiB slots, and the guest check passes in all
//! of them.

mod kvm_support;

use hostmem::backend::{Backend, BackendDefaults};
use hostmem::memory::MemorySystem;
use hostmem::testing::GuestRun;
use kvm_support::*;

/// The hugetlbfs mount from the project script; a failure fails under CI, skips elsewhere.
fn hugetlbfs() -> Option<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/hugepages-setup");
    match std::process::Command::new(script).output() {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        other => {
            let why = format!("hugepages-setup failed: {other:?}");
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{why}");
            }
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

#[test]
fn hugetlbfs_guest_gets_slots_on_huge_page_boundaries_and_passes_the_check() {
    let Some(kvm) = open_kvm(3 * MIB) else { return };
    let Some(dir) = hugetlbfs() else { return };
    let mut b = Backend::new("memory-backend-file", "mem", &BackendDefaults::default()).unwrap();
    b.set("size", "16M").unwrap();
    b.set("mem-path", &dir).unwrap();
    b.set("share", "on").unwrap();
    b.complete().unwrap();
    let mapping = b.mapping().unwrap();
    assert_eq!(mapping.page_size() as u64, 2 * MIB);

    let mut mem = MemorySystem::new();
    let ram = mem
        .new_ram_region("mem", mapping.clone(), 0, 16 * MIB, false)
        .unwrap();
    let sys = mem.system_memory();
    mem.add_subregion(sys, 0, ram, None).unwrap();
    mem.add_listener(Box::new(kvm.listener())).unwrap();

    let slots = kvm.slots();
    assert_eq!(slots.len(), 8);
    for (i, s) in slots.iter().enumerate() {
        assert_eq!((s.gpa, s.size), (i as u64 * 2 * MIB, 2 * MIB));
        assert_eq!(s.hva, mapping.as_ptr() as u64 + s.gpa);
    }
    let check = kvm.run_guest_check(&mem.ramblocks).unwrap();
    assert_eq!((check.slots, check.signatures), (8, 16));
    assert_eq!(
        read_u64(&mapping, 16 * MIB - 8),
        hostmem::testing::signature(16 * MIB - 8)
    );
}
