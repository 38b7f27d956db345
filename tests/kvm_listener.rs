//! The KVM listener on a real VM, driven with hand-made sections that no flat view would
//! produce (overlapping ones), to see the kernel's refusals come back as errors.

mod kvm_support;

use hostmem::listener::{MemoryListener, MemorySection, RamSection};
use hostmem::ramblock::RamBlockId;
use kvm_support::*;

fn ram(
    name: &str,
    gpa: u64,
    size: u64,
    m: &hostmem::hostmap::HostMapping,
    offset: u64,
) -> MemorySection {
    MemorySection {
        gpa,
        size,
        region_name: name.into(),
        ram: Some(RamSection {
            host_addr: m.as_ptr() as usize + offset as usize,
            block: RamBlockId(0),
            block_offset: offset,
            page_size: 4096,
            readonly: false,
        }),
    }
}

#[test]
fn the_slot_budget_and_bad_slot_sizes_are_errors_not_aborts() {
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
    let e = hostmem::kvm::KvmHandle::open(GIB + 1).err().unwrap();
    assert!(
        e.message()
            .contains("must be a multiple of the host page size"),
        "{e}"
    );
}
