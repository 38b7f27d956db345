//! A guest larger than one KVM slot can be: its RAM is split at the kernel's limit
//! (2^31 - 1 pages) and a 64-bit guest writes on both sides of 8 TiB. Alone in its own test
//! binary because on a shadow-MMU host KVM needs ~20 GiB of host memory for such slots.

mod kvm_support;

use hostmem::kvm::GuestOp;
use hostmem::listener::{MemoryListener, MemorySection, RamSection};
use hostmem::ramblock::RamBlockId;
use kvm_support::*;

/// The guest size: 9 TiB where the host can afford KVM's bookkeeping for it, otherwise the
/// smallest guest that still needs the split (8 TiB + 2 MiB). None: not enough memory.
fn guest_size() -> Option<u64> {
    let margin = GIB;
    for size in [9 * TIB, 8 * TIB + 2 * MIB] {
        if mem_available() >= kvm_slot_overhead(size) + margin {
            return Some(size);
        }
    }
    let smallest = 8 * TIB + 2 * MIB;
    wait_for_memory(kvm_slot_overhead(smallest) + margin, 60).then_some(smallest)
}

#[test]
fn a_guest_above_8_tib_is_split_at_the_limit_and_writes_land_in_one_mapping() {
    if !kvm_usable() {
        return;
    }
    let Some(size) = guest_size() else {
        let msg = format!(
            "not enough host memory for KVM's slot bookkeeping of an 8 TiB slot ({} MiB \
             available)",
            mem_available() >> 20
        );
        if under_ci_pub() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return;
    };
    eprintln!("guest size 0x{size:x}");
    let kvm = open_kvm(0).unwrap();
    let mem = sparse(size);
    let mut l = kvm.listener();
    l.region_add(&MemorySection {
        gpa: 0,
        size,
        region_name: "pc.ram".into(),
        ram: Some(RamSection {
            host_addr: mem.as_ptr() as usize,
            block: RamBlockId(0),
            block_offset: 0,
            page_size: 4096,
            readonly: false,
        }),
    })
    .unwrap();
    let limit = 8 * TIB - 4096;
    let slots: Vec<(u64, u64, u64)> = kvm
        .slots()
        .iter()
        .map(|s| (s.gpa, s.size, s.hva - mem.as_ptr() as u64))
        .collect();
    assert_eq!(slots, vec![(0, limit, 0), (limit, size - limit, limit)]);

    let targets = [8 * TIB - 8, 8 * TIB + 8, limit - 8, limit, size - 8];
    let ops: Vec<GuestOp> = targets
        .iter()
        .map(|&gpa| GuestOp::Write { gpa, value: !gpa })
        .collect();
    kvm.run_guest(&ops).unwrap();
    for gpa in targets {
        assert_eq!(read_u64(&mem, gpa), !gpa, "gpa 0x{gpa:x}");
    }
    let base = mem.as_ptr() as usize;
    let check = kvm
        .run_guest_check_with(&|_, off| Some((base + off as usize) as *const u8))
        .unwrap();
    assert_eq!((check.slots, check.signatures), (2, 4));
    // Drop the slots before the memory.
    l.region_del(&MemorySection {
        gpa: 0,
        size,
        region_name: "pc.ram".into(),
        ram: Some(RamSection {
            host_addr: mem.as_ptr() as usize,
            block: RamBlockId(0),
            block_offset: 0,
            page_size: 4096,
            readonly: false,
        }),
    })
    .unwrap();
    assert!(kvm.slots().is_empty());
}
