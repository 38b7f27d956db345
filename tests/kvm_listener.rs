//! KVM refusing slots, on a real VM: hand-made overlapping sections (which no flat view
//! produces) and a flat view whose RAM is not page-aligned in the host come back as errors
//! naming slot, start, size and errno, never as an abort.

mod kvm_support;

use hostmem::listener::{MemoryListener, MemorySection, RamSection};
use hostmem::ramblock::RamBlockId;
use kvm_support::*;

fn ram(
    name: &str,
    gpa: u64,
    size: u64,
    m: &std::sync::Arc<hostmem::hostmap::HostMapping>,
    offset: u64,
) -> MemorySection {
    MemorySection {
        gpa,
        size,
        region_name: name.into(),
        ram: Some(RamSection {
            host_addr: m.as_ptr() as usize + offset as usize,
            mapping: m.clone(),
            block: RamBlockId(0),
            block_offset: offset,
            page_size: 4096,
            readonly: false,
        }),
    }
}

#[test]
fn kernel_refusals_and_bad_slot_sizes_are_errors_not_aborts() {
    let Some(kvm) = open_kvm(0) else { return };
    let mem = sparse(64 * MIB);
    let mut l = kvm.listener();
    // A slot that overlaps an existing one is refused by the kernel: the error names it.
    l.region_add(&ram("a", 0, 32 * MIB, &mem, 0)).unwrap();
    let e = l
        .region_add(&ram("b", 16 * MIB, 32 * MIB, &mem, 32 * MIB))
        .unwrap_err();
    assert_eq!(
        e.message(),
        "kvm_set_user_memory_region: KVM_SET_USER_MEMORY_REGION failed, slot=1, \
         start=0x1000000, size=0x2000000: File exists"
    );
    assert_eq!(e.class(), hostmem::HmErrorClass::Kvm);
    assert_eq!(kvm.slots().len(), 1);
    let e = hostmem::kvm::KvmAccel::open(GIB + 1).err().unwrap();
    assert!(
        e.to_string()
            .contains("must be a multiple of the host page size"),
        "{e}"
    );
}

#[test]
fn a_commit_that_kvm_refuses_is_an_error_from_the_commit() {
    let Some(kvm) = open_kvm(0) else { return };
    let mut mem = hostmem::memory::MemorySystem::new();
    let ram = mem.new_ram_anonymous("pc.ram", 64 * MIB).unwrap();
    let sys = mem.system_memory();
    mem.add_subregion(sys, 0, ram, None).unwrap();
    mem.add_listener(Box::new(kvm.listener())).unwrap();
    // An alias starting 2 KiB into the RAM, placed on a page boundary: guest and host
    // addresses disagree modulo the page size, which KVM refuses.
    let odd = mem.new_alias("odd", ram, 0x800, 16 * MIB).unwrap();
    let e = mem.add_subregion(sys, GIB, odd, None).unwrap_err();
    assert_eq!(
        e.message(),
        "kvm_set_user_memory_region: KVM_SET_USER_MEMORY_REGION failed, slot=1, \
         start=0x40000000, size=0x1000000: Invalid argument"
    );
    assert_eq!(e.errno(), Some(libc::EINVAL));
    // The VM keeps only what it accepted.
    assert_eq!(kvm.slots().len(), 1);
}

#[test]
fn the_kernels_slot_budget_is_used_to_the_last_slot_then_refused_with_an_error() {
    let Some(kvm) = open_kvm(0) else { return };
    let nr = u64::from(kvm.nr_slots());
    let mem = sparse((nr + 1) * 4096);
    let mut l = kvm.listener();
    let started = std::time::Instant::now();
    for i in 0..nr {
        l.region_add(&ram("s", i * 8192, 4096, &mem, i * 4096))
            .unwrap_or_else(|e| panic!("slot {i} of {nr}: {e}"));
    }
    let e = l
        .region_add(&ram("s", nr * 8192, 4096, &mem, nr * 4096))
        .unwrap_err();
    assert_eq!(e.message(), "kvm_alloc_slot: no free slot available");
    assert_eq!(kvm.slots().len() as u64, nr);
    // Freeing one slot makes room again, under the same number.
    l.region_del(&ram("s", 77 * 8192, 4096, &mem, 77 * 4096))
        .unwrap();
    l.region_add(&ram("s", nr * 8192, 4096, &mem, nr * 4096))
        .unwrap();
    let reused = kvm
        .slots()
        .into_iter()
        .find(|s| s.gpa == nr * 8192)
        .unwrap();
    assert_eq!(reused.slot, 77);
    eprintln!("{nr} slots in {:?}", started.elapsed());
}
