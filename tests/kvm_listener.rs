//! The KVM listener on real vCPUs, driven with hand-made flat-view sections (the same calls a
//! memory-system commit makes). Each test would fail if the split, the slot update or the dirty
//! log were wrong: the guest's writes are read back through the host mapping, not through the
//! slot table under test.

mod kvm_support;

use hostmem::kvm::{signature, GuestOp};
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

/// pc-like: ram-below-4g [0, 3 GiB) at 0 and ram-above-4g [3 GiB, 6 GiB) at 4 GiB.
fn pc_sections(m: &hostmem::hostmap::HostMapping) -> [MemorySection; 2] {
    [
        ram("pc.ram", 0, 3 * GIB, m, 0),
        ram("pc.ram", 4 * GIB, 3 * GIB, m, 3 * GIB),
    ]
}

#[test]
fn pc_layout_with_1g_slots_guest_writes_land_in_the_backing_memory() {
    let Some(kvm) = open_kvm(GIB) else { return };
    let mem = sparse(6 * GIB);
    let mut l = kvm.listener();
    for s in pc_sections(&mem) {
        l.region_add(&s).unwrap();
    }
    let slots = kvm.slots();
    let layout: Vec<(u32, u64, u64, u64)> = slots
        .iter()
        .map(|s| (s.slot, s.gpa, s.size, s.block_offset))
        .collect();
    assert_eq!(
        layout,
        vec![
            (0, 0, GIB, 0),
            (1, GIB, GIB, GIB),
            (2, 2 * GIB, GIB, 2 * GIB),
            (3, 4 * GIB, GIB, 3 * GIB),
            (4, 5 * GIB, GIB, 4 * GIB),
            (5, 6 * GIB, GIB, 5 * GIB),
        ]
    );
    let base = mem.as_ptr() as usize;
    let check = kvm
        .run_guest_check_with(&|block, off| {
            assert_eq!(block, RamBlockId(0));
            Some((base + off as usize) as *const u8)
        })
        .unwrap();
    assert_eq!(check.slots, 6);
    assert_eq!(check.signatures, 12);
    assert_eq!(check.bytes_verified, 96);
    // Independently of the checker: the last byte of guest RAM (gpa 7 GiB - 8) is the last
    // word of the backing memory.
    assert_eq!(read_u64(&mem, 6 * GIB - 8), signature(7 * GIB - 8));
    assert_eq!(read_u64(&mem, 3 * GIB), signature(4 * GIB));
}

#[test]
fn pc_layout_with_the_kernel_limit_is_one_slot_per_section() {
    let Some(kvm) = open_kvm(0) else { return };
    let mem = sparse(6 * GIB);
    let mut l = kvm.listener();
    for s in pc_sections(&mem) {
        l.region_add(&s).unwrap();
    }
    assert_eq!(kvm.slots().len(), 2);
    let base = mem.as_ptr() as usize;
    let check = kvm
        .run_guest_check_with(&|_, off| Some((base + off as usize) as *const u8))
        .unwrap();
    assert_eq!((check.slots, check.signatures), (2, 4));
    assert_eq!(read_u64(&mem, 3 * GIB - 8), signature(3 * GIB - 8));
}

#[test]
fn guest_writes_at_chosen_addresses_reach_the_right_host_bytes() {
    let Some(kvm) = open_kvm(GIB / 2) else { return };
    let mem = sparse(6 * GIB);
    let mut l = kvm.listener();
    for s in pc_sections(&mem) {
        l.region_add(&s).unwrap();
    }
    // Around every slot boundary of the high section (slots of 512 MiB).
    let mut ops = Vec::new();
    for k in 0..6u64 {
        let edge = 4 * GIB + k * GIB / 2;
        for gpa in [edge - 8, edge, edge + 8] {
            if gpa >= 4 * GIB {
                ops.push(GuestOp::Write {
                    gpa,
                    value: gpa.rotate_left(17),
                });
            }
        }
    }
    kvm.run_guest(&ops).unwrap();
    for op in &ops {
        let gpa = op.gpa();
        assert_eq!(
            read_u64(&mem, gpa - GIB),
            gpa.rotate_left(17),
            "gpa 0x{gpa:x}"
        );
    }
}

#[test]
fn removing_and_re_adding_a_section_moves_what_the_guest_reads() {
    let Some(kvm) = open_kvm(0) else { return };
    let mem = sparse(6 * GIB);
    let mut l = kvm.listener();
    let [low, high] = pc_sections(&mem);
    l.region_add(&low).unwrap();
    l.region_add(&high).unwrap();
    write_u64(&mem, 3 * GIB + 0x100, 0x1234_5678_9abc_def0);
    let r = kvm
        .run_guest(&[GuestOp::Read {
            gpa: 4 * GIB + 0x100,
        }])
        .unwrap();
    assert_eq!(r, vec![0x1234_5678_9abc_def0]);

    // The alias moves from 4 GiB to 8 GiB.
    l.region_del(&high).unwrap();
    assert_eq!(kvm.slots().len(), 1);
    let e = kvm
        .run_guest(&[GuestOp::Read {
            gpa: 4 * GIB + 0x100,
        }])
        .unwrap_err();
    assert!(e.message().contains("reached no memslot"), "{e}");
    let moved = ram("pc.ram", 8 * GIB, 3 * GIB, &mem, 3 * GIB);
    l.region_add(&moved).unwrap();
    // The freed slot number is reused.
    assert_eq!(kvm.slots()[1].slot, 1);
    assert_eq!(kvm.slots()[1].gpa, 8 * GIB);
    let r = kvm
        .run_guest(&[GuestOp::Read {
            gpa: 8 * GIB + 0x100,
        }])
        .unwrap();
    assert_eq!(r, vec![0x1234_5678_9abc_def0]);
    // And the guest's writes there land in the same backing bytes.
    kvm.run_guest(&[GuestOp::Write {
        gpa: 8 * GIB + 0x108,
        value: 77,
    }])
    .unwrap();
    assert_eq!(read_u64(&mem, 3 * GIB + 0x108), 77);
}

#[test]
fn dirty_log_reports_exactly_the_pages_the_guest_wrote() {
    let Some(kvm) = open_kvm(GIB) else { return };
    let mem = sparse(6 * GIB);
    let mut l = kvm.listener();
    for s in pc_sections(&mem) {
        l.region_add(&s).unwrap();
    }
    l.log_global_start().unwrap();
    assert!(kvm.slots().iter().all(|s| s.flags == 1));
    // Nothing ran yet: nothing is dirty.
    assert!(kvm.log_sync_with(&mut |_, _, _| {}).unwrap().is_empty());

    let pages = [
        0x20_0000u64,
        0x20_2000,
        GIB + 0x5000,
        4 * GIB,
        6 * GIB + 0x7000,
    ];
    let ops: Vec<GuestOp> = pages
        .iter()
        .enumerate()
        // Two writes into the first page: still one dirty page.
        .flat_map(|(i, &p)| {
            [
                GuestOp::Write {
                    gpa: p + 8 * i as u64,
                    value: 1,
                },
                GuestOp::Write {
                    gpa: p + 0xff8,
                    value: 2,
                },
            ]
        })
        .collect();
    kvm.run_guest(&ops).unwrap();
    let mut marks = Vec::new();
    let dirty = kvm
        .log_sync_with(&mut |b, off, len| marks.push((b, off, len)))
        .unwrap();
    assert_eq!(dirty, pages.to_vec());
    // Folded at the RAMBlock offsets of those pages (above 4 GiB: offset = gpa - 1 GiB).
    let mut offsets: Vec<(u64, u64)> = marks.iter().map(|&(_, o, n)| (o, n)).collect();
    offsets.sort();
    assert_eq!(
        offsets,
        vec![
            (0x20_0000, 4096),
            (0x20_2000, 4096),
            (GIB + 0x5000, 4096),
            (3 * GIB, 4096),
            (5 * GIB + 0x7000, 4096)
        ]
    );
    assert_eq!(kvm.last_dirty(), pages.to_vec());

    // The log was cleared by the sync; a new run reports only its own page.
    kvm.run_guest(&[GuestOp::Write {
        gpa: 2 * GIB + 0x3000,
        value: 3,
    }])
    .unwrap();
    assert_eq!(
        kvm.log_sync_with(&mut |_, _, _| {}).unwrap(),
        vec![2 * GIB + 0x3000]
    );

    // Logging off: writes are no longer reported, and slots lose the flag.
    l.log_global_stop().unwrap();
    assert!(kvm.slots().iter().all(|s| s.flags == 0));
    kvm.run_guest(&[GuestOp::Write {
        gpa: 0x30_0000,
        value: 4,
    }])
    .unwrap();
    assert!(kvm.log_sync_with(&mut |_, _, _| {}).unwrap().is_empty());
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
