//! A guest larger than one KVM slot can be: its RAM is split at the kernel's limit
//! (2^31 - 1 pages) and a 64-bit guest writes on both sides of 8 TiB. Alone in its own test
//! binary because on a shadow-MMU host (no TDP MMU, as on this nested machine) KVM allocates
//! ~20 GiB of kernel memory (reverse maps, write tracking) for an 8 TiB slot, for the ~20 s
//! the test holds it. It runs under CI=true (the CI machine runs nothing beside it) or when
//! HOSTMEM_KVM_HUGE=1 asks for it; elsewhere it would starve the other builds sharing the
//! machine, so it says it is skipped.

mod kvm_support;

use hostmem::backend::{Backend, BackendDefaults};
use hostmem::kvm::cost::Preflight;
use hostmem::memory::MemorySystem;
use hostmem::testing::{GuestOp, GuestRun};
use kvm_support::*;

/// The guest size: 9 TiB where the host can afford KVM's bookkeeping for it, otherwise the
/// smallest guest that still needs the split (8 TiB + 2 MiB). None: not enough memory. The
/// memslot preflight decides (the slots would be refused otherwise).
fn guest_size() -> Option<u64> {
    let affordable = |size: u64| {
        let limit = 8 * TIB - 4096;
        Preflight::of_host()
            .check(&[(limit, false), (size - limit, false)])
            .is_ok()
    };
    let smallest = 8 * TIB + 2 * MIB;
    for size in [9 * TIB, smallest] {
        if affordable(size) {
            return Some(size);
        }
    }
    (0..60).find_map(|_| {
        std::thread::sleep(std::time::Duration::from_secs(1));
        affordable(smallest).then_some(smallest)
    })
}

#[test]
fn a_guest_above_8_tib_is_split_at_the_limit_and_writes_land_in_its_one_mapping() {
    if !kvm_usable() {
        return;
    }
    if !under_ci_pub() && std::env::var("HOSTMEM_KVM_HUGE").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED: needs ~20 GiB of host memory for KVM's slot bookkeeping; runs under \
             CI=true or with HOSTMEM_KVM_HUGE=1"
        );
        return;
    }
    let Some(size) = guest_size() else {
        let limit = 8 * TIB - 4096;
        let msg = format!(
            "not enough host memory for KVM's bookkeeping of an 8 TiB slot: {}",
            Preflight::of_host()
                .check(&[(limit, false), (2 * MIB + 4096, false)])
                .unwrap_err()
        );
        if under_ci_pub() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return;
    };
    eprintln!("guest size 0x{size:x}");
    // A memory-backend-ram with reserve=off (MAP_NORESERVE): one mapping, one RAM region, one
    // RAMBlock, as `-object memory-backend-ram,id=pc.ram,size=...,reserve=off` makes it.
    let mut backend =
        Backend::new("memory-backend-ram", "pc.ram", &BackendDefaults::default()).unwrap();
    backend.set("size", &size.to_string()).unwrap();
    backend.set("reserve", "off").unwrap();
    backend.complete().unwrap();
    let mut mem = MemorySystem::new();
    let ram = mem
        .new_ram_region("pc.ram", backend.mapping().unwrap(), 0, size, false)
        .unwrap();
    let sys = mem.system_memory();
    mem.add_subregion(sys, 0, ram, None).unwrap();
    let host = mem.ram_ptr(ram).unwrap().unwrap() as u64;

    let kvm = open_kvm(0).unwrap();
    mem.add_listener(Box::new(kvm.listener())).unwrap();
    let limit = 8 * TIB - 4096;
    let slots: Vec<(u64, u64, u64)> = kvm
        .slots()
        .iter()
        .map(|s| (s.gpa, s.size, s.hva - host))
        .collect();
    assert_eq!(slots, vec![(0, limit, 0), (limit, size - limit, limit)]);

    let targets = [8 * TIB - 8, 8 * TIB + 8, limit - 8, limit, size - 8];
    let ops: Vec<GuestOp> = targets
        .iter()
        .map(|&gpa| GuestOp::Write { gpa, value: !gpa })
        .collect();
    kvm.run_guest(&ops).unwrap();
    for gpa in targets {
        // SAFETY: gpa + 8 <= size, inside the mapping; the vCPU has halted.
        let v = unsafe { std::ptr::read_unaligned((host + gpa) as *const u64) };
        assert_eq!(v, !gpa, "gpa 0x{gpa:x}");
    }
    let check = kvm.run_guest_check(&mem.ramblocks).unwrap();
    assert_eq!((check.slots, check.signatures), (2, 4));

    // Taking the region out removes both slots (the same walk as adding them).
    mem.del_subregion(sys, ram).unwrap();
    assert!(kvm.slots().is_empty());
}
