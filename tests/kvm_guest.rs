//! KVM memslots following a real memory system on real vCPUs: regions and aliases are
//! committed, the KVM listener turns the flat view into slots, and a 64-bit guest writes and
//! reads through them. What the guest did is read back through the RAM region's own host
//! pointer (not through the slot table under test), so a wrong split, a stale slot or a lost
//! dirty bit fails these tests.

mod kvm_support;

use hostmem::kvm::KvmAccel;
use hostmem::machine::Machine;
use hostmem::memory::MemorySystem;
use hostmem::region::RegionId;
use hostmem::testing::guest::{check_dirtied_pages, DirtierLayout};
use hostmem::testing::{signature, GuestOp, GuestRun};
use kvm_support::*;

/// QEMU's pc layout over one RAM region: ram-below-4g = pc.ram[0, below) at 0,
/// ram-above-4g = pc.ram[below, size) at 4 GiB.
struct Pc {
    mem: MemorySystem,
    ram: RegionId,
    above: RegionId,
}

fn pc(size: u64, below: u64) -> Pc {
    let mut mem = MemorySystem::new();
    let ram = mem.new_ram_anonymous("pc.ram", size).unwrap();
    let lo = mem.new_alias("ram-below-4g", ram, 0, below).unwrap();
    let above = mem
        .new_alias("ram-above-4g", ram, below, size - below)
        .unwrap();
    let sys = mem.system_memory();
    mem.add_subregion(sys, 0, lo, None).unwrap();
    mem.add_subregion(sys, 4 * GIB, above, None).unwrap();
    Pc { mem, ram, above }
}

impl Pc {
    fn attach(&mut self, kvm: &KvmAccel) {
        self.mem.add_listener(Box::new(kvm.listener())).unwrap();
    }

    /// The u64 at `offset` of pc.ram, read through the region's host pointer.
    fn ram_u64(&self, offset: u64) -> u64 {
        let p = self.mem.ram_ptr(self.ram).unwrap().unwrap();
        // SAFETY: pc.ram is mapped for its whole size and offset + 8 stays inside it (tests
        // only ask for offsets they wrote); no vCPU runs during the read.
        unsafe { std::ptr::read_unaligned(p.add(offset as usize) as *const u64) }
    }

    fn set_ram_u64(&self, offset: u64, v: u64) {
        let p = self.mem.ram_ptr(self.ram).unwrap().unwrap();
        // SAFETY: as in ram_u64; no vCPU runs during the write.
        unsafe { std::ptr::write_unaligned(p.add(offset as usize) as *mut u64, v) }
    }
}

#[test]
fn pc_6g_with_1g_slots_the_guest_writes_into_every_slot_and_the_host_sees_it() {
    let Some(kvm) = open_kvm(GIB) else { return };
    let mut pc = pc(6 * GIB, 3 * GIB);
    pc.attach(&kvm);
    let layout: Vec<(u64, u64, u64)> = kvm
        .slots()
        .iter()
        .map(|s| (s.gpa, s.size, s.block_offset))
        .collect();
    assert_eq!(
        layout,
        vec![
            (0, GIB, 0),
            (GIB, GIB, GIB),
            (2 * GIB, GIB, 2 * GIB),
            (4 * GIB, GIB, 3 * GIB),
            (5 * GIB, GIB, 4 * GIB),
            (6 * GIB, GIB, 5 * GIB),
        ]
    );
    let check = kvm.run_guest_check(&pc.mem.ramblocks).unwrap();
    assert_eq!((check.slots, check.signatures), (6, 12));
    assert_eq!(check.bytes_verified, 96);
    // Every slot's first and last word, seen through pc.ram's pointer: GPA g lives at offset g
    // below 4 GiB and g - 1 GiB above.
    for s in kvm.slots() {
        for gpa in [s.gpa, s.gpa + s.size - 8] {
            let off = if gpa < 4 * GIB { gpa } else { gpa - GIB };
            assert_eq!(pc.ram_u64(off), signature(gpa), "gpa 0x{gpa:x}");
        }
    }
}

#[test]
fn pc_6g_at_the_kernel_limit_is_one_slot_per_alias_and_the_guest_check_passes() {
    let Some(kvm) = open_kvm(0) else { return };
    let mut pc = pc(6 * GIB, 3 * GIB);
    pc.attach(&kvm);
    let slots = kvm.slots();
    assert_eq!(slots.len(), 2);
    assert_eq!((slots[1].gpa, slots[1].size), (4 * GIB, 3 * GIB));
    let check = kvm.run_guest_check(&pc.mem.ramblocks).unwrap();
    assert_eq!((check.slots, check.signatures), (2, 4));
    assert_eq!(pc.ram_u64(6 * GIB - 8), signature(7 * GIB - 8));
    // Guest writes on both sides of every 512 MiB boundary above 4 GiB.
    let ops: Vec<GuestOp> = (0..6u64)
        .flat_map(|k| {
            let edge = 4 * GIB + k * GIB / 2;
            [edge, edge + 8, edge + GIB / 2 - 8]
        })
        .map(|gpa| GuestOp::Write {
            gpa,
            value: gpa.rotate_left(17),
        })
        .collect();
    kvm.run_guest(&ops).unwrap();
    for op in &ops {
        assert_eq!(pc.ram_u64(op.gpa() - GIB), op.gpa().rotate_left(17));
    }
}

#[test]
fn attaching_to_a_machine_replays_the_layout_and_info_memslots_shows_it() {
    if !kvm_usable() {
        return;
    }
    let mut machine = Machine::new();
    let mem = machine.memory_mut();
    let ram = mem.new_ram_anonymous("pc.ram", 2 * GIB).unwrap();
    let sys = mem.system_memory();
    mem.add_subregion(sys, 0, ram, None).unwrap();
    mem.vmstate_register_ram(ram, None).unwrap();
    machine.attach_kvm(GIB).unwrap();
    let again = machine.attach_kvm(0).unwrap_err();
    assert_eq!(again.message(), "KVM is already attached to this machine");
    // `info mtree -f` marks the ranges KVM maps, as QEMU does.
    let flat = hostmem::monitor::hmp(&machine, "info mtree -f").unwrap();
    assert!(
        flat.contains("  0000000000000000-000000007fffffff (prio 0, ram): pc.ram KVM\n"),
        "{flat}"
    );
    let kvm = machine.kvm().unwrap();
    assert_eq!(kvm.slots().len(), 2);
    let check = kvm.run_guest_check(&machine.memory().ramblocks).unwrap();
    assert_eq!(check.signatures, 4);
    let text = hostmem::monitor::hmp(&machine, "info memslots").unwrap();
    let nr = kvm.nr_slots();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        format!("KVM memslots: 2 used of {nr}, max slot size 0x40000000, dirty logging off")
    );
    assert!(
        lines[2].starts_with("   0 0x0000000000000000-0x000000003fffffff 0x0000000040000000 0x")
    );
    assert!(lines[2].ends_with(" rw     pc.ram@0x0"), "{}", lines[2]);
    assert!(
        lines[3].ends_with(" rw     pc.ram@0x40000000"),
        "{}",
        lines[3]
    );
    assert_eq!(lines.len(), 4);
}

#[test]
fn moving_an_alias_while_the_vm_exists_changes_what_the_guest_reads() {
    let Some(kvm) = open_kvm(0) else { return };
    let mut pc = pc(6 * GIB, 3 * GIB);
    pc.attach(&kvm);
    pc.set_ram_u64(3 * GIB + 0x100, 0x1234_5678_9abc_def0);
    let read = |gpa| kvm.run_guest(&[GuestOp::Read { gpa }]);
    assert_eq!(read(4 * GIB + 0x100).unwrap(), vec![0x1234_5678_9abc_def0]);

    // ram-above-4g removed: its slot goes, the guest finds no RAM there any more.
    let sys = pc.mem.system_memory();
    pc.mem.del_subregion(sys, pc.above).unwrap();
    assert_eq!(kvm.slots().len(), 1);
    let e = read(4 * GIB + 0x100).unwrap_err();
    assert!(
        e.message()
            .contains("read of 0x100000100 reached no memslot"),
        "{e}"
    );

    // ... and added again at 8 GiB: same memory, new address, the freed slot number reused.
    pc.mem.add_subregion(sys, 8 * GIB, pc.above, None).unwrap();
    let slots = kvm.slots();
    assert_eq!(
        (slots[1].slot, slots[1].gpa, slots[1].size),
        (1, 8 * GIB, 3 * GIB)
    );
    assert_eq!(read(8 * GIB + 0x100).unwrap(), vec![0x1234_5678_9abc_def0]);
    assert!(read(4 * GIB + 0x100).is_err());
    kvm.run_guest(&[GuestOp::Write {
        gpa: 11 * GIB - 8,
        value: 99,
    }])
    .unwrap();
    assert_eq!(pc.ram_u64(6 * GIB - 8), 99);
}

#[test]
fn shrinking_an_alias_removes_the_slot_beyond_its_new_end() {
    let Some(kvm) = open_kvm(GIB) else { return };
    let mut pc = pc(6 * GIB, 3 * GIB);
    pc.attach(&kvm);
    assert_eq!(kvm.slots().len(), 6);
    // ram-below-4g becomes 2 GiB long (QEMU boards do this with a new alias).
    let sys = pc.mem.system_memory();
    let lo2 = pc
        .mem
        .new_alias("ram-below-2g", pc.ram, 0, 2 * GIB)
        .unwrap();
    pc.mem.transaction_begin();
    let lo = pc.mem.get(sys).unwrap().subregions.to_vec();
    for r in lo {
        if pc.mem.region_name(r).unwrap() == "ram-below-4g" {
            pc.mem.del_subregion(sys, r).unwrap();
        }
    }
    pc.mem.add_subregion(sys, 0, lo2, None).unwrap();
    pc.mem.transaction_commit().unwrap();
    let gpas: Vec<u64> = kvm.slots().iter().map(|s| s.gpa).collect();
    assert_eq!(gpas, vec![0, GIB, 4 * GIB, 5 * GIB, 6 * GIB]);
    assert!(kvm
        .run_guest(&[GuestOp::Write {
            gpa: 2 * GIB,
            value: 1
        }])
        .is_err());
    let check = kvm.run_guest_check(&pc.mem.ramblocks).unwrap();
    assert_eq!(check.slots, 5);
}

/// The set bits of a RAMBlock bitmap, as byte offsets of 4 KiB pages.
fn dirty_offsets(bitmap: &[u64]) -> Vec<u64> {
    let mut v = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        for b in 0..64 {
            if word & (1 << b) != 0 {
                v.push((w as u64 * 64 + b) * 4096);
            }
        }
    }
    v
}

#[test]
fn dirty_logging_reports_exactly_the_pages_the_guest_wrote() {
    let Some(kvm) = open_kvm(GIB) else { return };
    // Every KVM since Linux 5.8 has manual protection: the syncs below then clear what they
    // fetched with KVM_CLEAR_DIRTY_LOG, and a page seen once is not reported again.
    assert!(
        kvm.table().manual_protect(),
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not on"
    );
    let mut pc = pc(6 * GIB, 3 * GIB);
    pc.attach(&kvm);
    let block = pc.mem.ram_block_of(pc.ram).unwrap();
    pc.mem.set_global_dirty_log(true).unwrap();
    assert!(kvm.slots().iter().all(|s| s.flags == 1), "every slot logs");
    pc.mem.log_sync().unwrap();
    assert!(dirty_offsets(&pc.mem.ramblocks.take_dirty(block)).is_empty());

    // Pages in four different slots, two of them adjacent, some written twice.
    let pages = [
        0x20_0000u64,
        0x20_1000,
        GIB + 0x5000,
        4 * GIB,
        6 * GIB + 0x7000,
    ];
    let ops: Vec<GuestOp> = pages
        .iter()
        .flat_map(|&p| {
            [
                GuestOp::Write {
                    gpa: p + 0x10,
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
    pc.mem.log_sync().unwrap();
    assert_eq!(kvm.last_dirty(), pages.to_vec());
    let expected: Vec<u64> = vec![
        0x20_0000,
        0x20_1000,
        GIB + 0x5000,
        3 * GIB,
        5 * GIB + 0x7000,
    ];
    assert_eq!(dirty_offsets(&pc.mem.ramblocks.take_dirty(block)), expected);

    // The sync cleared the kernel's log: nothing new without guest activity.
    pc.mem.log_sync().unwrap();
    assert!(kvm.last_dirty().is_empty());
    assert!(dirty_offsets(&pc.mem.ramblocks.take_dirty(block)).is_empty());

    // A write into a slot that then goes away is still reported by the next sync.
    kvm.run_guest(&[GuestOp::Write {
        gpa: 5 * GIB + 0x9000,
        value: 3,
    }])
    .unwrap();
    let sys = pc.mem.system_memory();
    pc.mem.del_subregion(sys, pc.above).unwrap();
    pc.mem.log_sync().unwrap();
    assert_eq!(kvm.last_dirty(), vec![5 * GIB + 0x9000]);
    assert_eq!(
        dirty_offsets(&pc.mem.ramblocks.take_dirty(block)),
        vec![4 * GIB + 0x9000]
    );

    // Logging off: the flag leaves the slots and guest writes are no longer reported.
    pc.mem.set_global_dirty_log(false).unwrap();
    assert!(kvm.slots().iter().all(|s| s.flags == 0));
    kvm.run_guest(&[GuestOp::Write {
        gpa: 0x30_0000,
        value: 4,
    }])
    .unwrap();
    pc.mem.log_sync().unwrap();
    assert!(dirty_offsets(&pc.mem.ramblocks.take_dirty(block)).is_empty());
}

#[test]
fn a_read_only_region_is_a_read_only_slot_the_guest_can_read_but_not_write() {
    let Some(kvm) = open_kvm(0) else { return };
    let mut pc = pc(2 * GIB, 2 * GIB);
    let rom_mem = sparse(256 * 1024);
    write_u64(&rom_mem, 0x3fff0, 0xf4f4_f4f4_0000_ea5e);
    let rom = pc
        .mem
        .new_ram_region("pc.bios", rom_mem.clone(), 0, 256 * 1024, true)
        .unwrap();
    let sys = pc.mem.system_memory();
    pc.mem.add_subregion(sys, 0xfffc_0000, rom, None).unwrap();
    pc.attach(&kvm);
    let slots = kvm.slots();
    let bios = slots.iter().find(|s| s.gpa == 0xfffc_0000).unwrap();
    assert!(bios.readonly);
    assert_eq!(bios.flags, 2, "KVM_MEM_READONLY");
    let r = kvm
        .run_guest(&[GuestOp::Read { gpa: 0xffff_fff0 }])
        .unwrap();
    assert_eq!(r, vec![0xf4f4_f4f4_0000_ea5e]);
    let e = kvm
        .run_guest(&[GuestOp::Write {
            gpa: 0xffff_fff0,
            value: 0,
        }])
        .unwrap_err();
    assert!(
        e.message()
            .contains("write to 0xfffffff0 reached no writable memslot"),
        "{e}"
    );
    assert_eq!(read_u64(&rom_mem, 0x3fff0), 0xf4f4_f4f4_0000_ea5e);
    // The guest check leaves read-only slots alone.
    let check = kvm.run_guest_check(&pc.mem.ramblocks).unwrap();
    assert_eq!((check.slots, check.signatures), (1, 2));
}

#[test]
fn detaching_unregisters_the_listener_and_drops_the_vm() {
    if !kvm_usable() {
        return;
    }
    let mut machine = Machine::new();
    let mem = machine.memory_mut();
    let ram = mem.new_ram_anonymous("pc.ram", GIB).unwrap();
    let sys = mem.system_memory();
    mem.add_subregion(sys, 0, ram, None).unwrap();
    machine.attach_kvm(256 * MIB).unwrap();
    assert_eq!(
        machine.memory().listener_names(),
        vec!["kvm-memory".to_string()]
    );
    machine.detach_kvm().unwrap();
    assert!(machine.kvm().is_none());
    let flat = hostmem::monitor::hmp(&machine, "info mtree -f").unwrap();
    assert!(!flat.contains(" KVM"), "{flat}");
    assert!(machine.memory().listener_names().is_empty());
    assert_eq!(
        machine.detach_kvm().unwrap_err().message(),
        "KVM is not attached to this machine"
    );
}

/// Polls pc.ram's word at `offset` until it holds `want` (the running guest wrote it).
fn wait_for_guest(pc: &Pc, offset: u64, want: u64) {
    let p = pc.mem.ram_ptr(pc.ram).unwrap().unwrap() as usize + offset as usize;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // SAFETY: inside pc.ram; the guest writes the word concurrently, hence the volatile read.
    while unsafe { std::ptr::read_volatile(p as *const u64) } != want {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never wrote 0x{offset:x}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn dirty_logging_switched_on_and_off_while_the_guest_runs_sees_only_writes_in_between() {
    let Some(kvm) = open_kvm(0) else { return };
    let mut pc = pc(6 * GIB, 3 * GIB);
    pc.attach(&kvm);
    let flag = 0x10_0000u64;
    let (a, b, c) = (0x20_0000u64, 5 * GIB + 0x4000, 0x30_0000u64);
    pc.set_ram_u64(flag, 0);
    // A before logging starts, B while it is on, C after it stopped; the guest waits for the
    // host between them.
    let ops = [
        GuestOp::Write { gpa: a, value: 0xa },
        GuestOp::WaitWhile {
            gpa: flag,
            value: 0,
        },
        GuestOp::Write { gpa: b, value: 0xb },
        GuestOp::WaitWhile {
            gpa: flag,
            value: 1,
        },
        GuestOp::Write { gpa: c, value: 0xc },
    ];
    std::thread::scope(|s| {
        let guest = s.spawn(|| kvm.run_guest(&ops));
        wait_for_guest(&pc, a, 0xa);
        pc.mem.set_global_dirty_log(true).unwrap();
        pc.set_ram_u64(flag, 1);
        wait_for_guest(&pc, b - GIB, 0xb);
        pc.mem.set_global_dirty_log(false).unwrap();
        pc.set_ram_u64(flag, 2);
        guest.join().unwrap().unwrap();
    });
    assert_eq!(pc.ram_u64(c), 0xc);
    // B's bit was fetched when logging stopped and is delivered by the next sync.
    pc.mem.log_sync().unwrap();
    assert_eq!(kvm.last_dirty(), vec![b]);
    let block = pc.mem.ram_block_of(pc.ram).unwrap();
    assert_eq!(
        dirty_offsets(&pc.mem.ramblocks.take_dirty(block)),
        vec![b - GIB]
    );
}

#[test]
fn the_payload_vcpu_leaves_vcpu_0_to_the_vmm() {
    let Some(kvm) = open_kvm(0) else { return };
    let mut pc = pc(GIB, GIB);
    pc.attach(&kvm);
    // A VMM creates its own vCPU 0 on the VM fd hostmem hands out (KVM_CREATE_VCPU).
    // SAFETY: a plain ioctl on a VM fd we own; the returned fd is closed below.
    let vcpu0 = unsafe { libc::ioctl(kvm.vm_fd(), 0xae41, 0) };
    assert!(
        vcpu0 >= 0,
        "KVM_CREATE_VCPU 0: {}",
        std::io::Error::last_os_error()
    );
    let check = kvm.run_guest_check(&pc.mem.ramblocks).unwrap();
    assert_eq!(check.slots, 1);
    // SAFETY: the vCPU fd from above, closed once.
    unsafe { libc::close(vcpu0) };
}

/// QEMU 4.1's s390-ccw-virtio board as far as RAM goes: 128 MiB by default, main RAM "s390.ram".
fn s390_41_board() -> hostmem::machine::BoardInfo {
    hostmem::machine::BoardInfo {
        name: "s390-ccw-virtio-4.1".into(),
        default_ram_size: 128 * MIB,
        default_ram_id: Some("s390.ram".into()),
        ..Default::default()
    }
}

/// An s390-shaped board that migrates main RAM as two alias blocks ("s390.ram" and
/// "s390.ram.1", 1 GiB each) instead of the backend's own block, as the s390 partition does.
fn s390_partitioned(ram_size: u64, chunk: u64) -> (Machine, Vec<RegionId>) {
    let board = s390_41_board();
    let size = format!("{}M", ram_size / MIB);
    let cmd = hostmem::options::cmdline::Cmdline::parse(&["-m", &size]).unwrap();
    let mut machine = Machine::from_cmdline(&cmd, &board).unwrap();
    let ram = machine.config().unwrap().ram.unwrap();
    let mem = machine.memory_mut();
    // Registering the aliases takes the backend's block out of the stream.
    let sys = mem.system_memory();
    let mut aliases = Vec::new();
    for (i, start) in (0..ram_size).step_by(chunk as usize).enumerate() {
        let name = match i {
            0 => "s390.ram".to_string(),
            n => format!("s390.ram.{n}"),
        };
        let a = mem.new_alias(&name, ram, start, chunk).unwrap();
        mem.vmstate_register_ram(a, None).unwrap();
        mem.add_subregion(sys, start, a, None).unwrap();
        aliases.push(a);
    }
    (machine, aliases)
}

#[test]
fn pages_the_guest_writes_through_an_alias_are_dirty_in_that_alias_block() {
    if !kvm_usable() {
        return;
    }
    let (mut machine, aliases) = s390_partitioned(2 * GIB, GIB);
    let ram = machine.config().unwrap().ram.unwrap();
    machine.attach_kvm(0).unwrap();
    let mem = machine.memory();
    let block = |r: RegionId| mem.ram_block_of(r).unwrap();
    let (b0, b1, backend) = (block(aliases[0]), block(aliases[1]), block(ram));
    let migrated: Vec<&str> = mem
        .ramblocks
        .ids()
        .into_iter()
        .filter_map(|b| mem.ramblocks.get(b))
        .filter(|b| b.migratable)
        .map(|b| b.idstr.as_str())
        .collect();
    assert_eq!(migrated, ["s390.ram", "s390.ram.1"]);
    assert_eq!(mem.ramblocks.get(backend).unwrap().idstr, "");

    let mem = machine.memory_mut();
    mem.set_global_dirty_log(true).unwrap();
    mem.log_sync().unwrap();
    for b in [b0, b1] {
        mem.ramblocks.take_dirty(b);
    }
    let written = [0x20_0000u64, 0x20_1000, GIB + 0x5000, 2 * GIB - 0x1000];
    let ops: Vec<GuestOp> = written
        .iter()
        .map(|&gpa| GuestOp::Write { gpa, value: gpa })
        .collect();
    machine.kvm().unwrap().run_guest(&ops).unwrap();
    let mem = machine.memory_mut();
    mem.log_sync().unwrap();
    assert_eq!(
        dirty_offsets(&mem.ramblocks.take_dirty(b0)),
        vec![0x20_0000, 0x20_1000]
    );
    assert_eq!(
        dirty_offsets(&mem.ramblocks.take_dirty(b1)),
        vec![0x5000, GIB - 0x1000]
    );
    // The backend's own block saw the same pages at its own offsets.
    assert_eq!(dirty_offsets(&mem.ramblocks.take_dirty(backend)), written);
}

#[test]
fn a_vm_clone_keeps_its_slots_memory_mapped_after_the_machine_is_gone() {
    if !kvm_usable() {
        return;
    }
    let cmd = hostmem::options::cmdline::Cmdline::parse(&["-m", "64M"]).unwrap();
    let board = hostmem::testing::machines::none_board();
    let mut machine = Machine::from_cmdline(&cmd, &board).unwrap();
    let ram = machine.config().unwrap().ram.unwrap();
    let mem = machine.memory_mut();
    let sys = mem.system_memory();
    mem.add_subregion(sys, 0, ram, None).unwrap();
    let host = mem.ram_ptr(ram).unwrap().unwrap() as usize;
    machine.attach_kvm(0).unwrap();
    let kvm = machine.kvm().unwrap().clone();
    let (started, release, result) = (0x10_0000u64, 0x20_0000u64, 0x30_0000u64);
    let guest = std::thread::spawn(move || {
        kvm.run_guest(&[
            GuestOp::Write {
                gpa: started,
                value: 1,
            },
            GuestOp::WaitWhile {
                gpa: release,
                value: 0,
            },
            GuestOp::Write {
                gpa: result,
                value: 0x600d,
            },
            GuestOp::Read { gpa: result },
        ])
    });
    let word = |gpa: u64| (host + gpa as usize) as *mut u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // SAFETY: inside the machine's 64 MiB of RAM, which is still alive here; the guest writes
    // the word concurrently, hence the volatile read.
    while unsafe { std::ptr::read_volatile(word(started)) } != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never started"
        );
        std::thread::yield_now();
    }
    // The machine goes while its vCPU runs: only the VM clone's slots hold the RAM now.
    drop(machine);
    // SAFETY: the slots of the running VM keep the mapping alive (that is what this test
    // checks: were it unmapped, this write would fault); the guest only reads this word.
    unsafe { std::ptr::write_volatile(word(release), 1) };
    let got = guest.join().unwrap().unwrap();
    assert_eq!(got[3], 0x600d);
}

/// A guest with one RAM region at GPA 0 (`pc.ram`, so GPA = RAMBlock offset), for the dirtier.
fn flat(size: u64, kvm: &KvmAccel) -> (MemorySystem, RegionId) {
    let mut mem = MemorySystem::new();
    let ram = mem.new_ram_anonymous("pc.ram", size).unwrap();
    let sys = mem.system_memory();
    mem.add_subregion(sys, 0, ram, None).unwrap();
    mem.add_listener(Box::new(kvm.listener())).unwrap();
    (mem, ram)
}

/// The RAMBlock behind `ram`, as a host address (usize: the vCPU thread shares the memory).
fn ramblock_base(mem: &MemorySystem, ram: RegionId) -> usize {
    let block = mem.ram_block_of(ram).unwrap();
    mem.ramblocks.get(block).unwrap().host_ptr() as usize
}

fn guest_u64(base: usize, gpa: u64) -> u64 {
    // SAFETY: `gpa` is one of the dirtier's mailbox words, inside the RAMBlock; the guest may
    // write it concurrently, hence the volatile read.
    unsafe { std::ptr::read_volatile((base + gpa as usize) as *const u64) }
}

fn set_guest_u64(base: usize, gpa: u64, v: u64) {
    // SAFETY: as in guest_u64; the guest only reads this word.
    unsafe { std::ptr::write_volatile((base + gpa as usize) as *mut u64, v) }
}

/// Waits until the dirtier's heartbeat reaches `passes`.
fn wait_for_passes(base: usize, passes: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while guest_u64(base, DirtierLayout::PASSES_GPA) < passes {
        assert!(
            std::time::Instant::now() < deadline,
            "the dirtier is stuck at pass {}",
            guest_u64(base, DirtierLayout::PASSES_GPA)
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn the_dirtier_dirties_its_whole_range_every_pass_and_stops_consistent_when_asked() {
    let Some(kvm) = open_kvm(0) else { return };
    let (mut mem, ram) = flat(128 * MIB, &kvm);
    let base = ramblock_base(&mem, ram);
    // QEMU's migration-test range.
    let layout = DirtierLayout {
        start: MIB,
        end: 100 * MIB,
    };
    // The vCPU runs on its own thread until told to stop. Not scoped: if an assertion below
    // fails, the test ends instead of waiting for a guest nobody will stop.
    let (done, result) = std::sync::mpsc::channel();
    let guest = kvm.clone();
    std::thread::spawn(move || {
        // Nobody listens any more if the test already failed.
        let _ = done.send(guest.run_dirtier(&layout));
    });
    wait_for_passes(base, 1);

    // Logging on while the guest runs: a whole pass later, every page of the range is dirty.
    mem.set_global_dirty_log(true).unwrap();
    let from = guest_u64(base, DirtierLayout::PASSES_GPA);
    wait_for_passes(base, from + 2);
    mem.log_sync().unwrap();
    let dirty: std::collections::BTreeSet<u64> = kvm.last_dirty().into_iter().collect();
    let block = mem.ram_block_of(ram).unwrap();
    let bitmap: std::collections::BTreeSet<u64> = dirty_offsets(&mem.ramblocks.take_dirty(block))
        .into_iter()
        .collect();
    let missing: Vec<u64> = (0..layout.pages())
        .map(|i| layout.page_gpa(i))
        .filter(|gpa| !dirty.contains(gpa) || !bitmap.contains(gpa))
        .collect();
    assert!(
        missing.is_empty(),
        "{} pages of the range not reported dirty, first 0x{:x}",
        missing.len(),
        missing[0]
    );
    // Beyond the range only the heartbeat's page is written.
    assert!(!dirty.contains(&(100 * MIB)), "page past the range");
    assert!(dirty.contains(&0), "the heartbeat's page");

    set_guest_u64(base, DirtierLayout::STOP_GPA, 1);
    let stop = result
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the dirtier stops within a minute of its stop word")
        .unwrap();
    mem.set_global_dirty_log(false).unwrap();
    assert!(stop.passes >= from + 2, "{} passes", stop.passes);
    assert_eq!(stop.passes, guest_u64(base, DirtierLayout::PASSES_GPA));

    // Stopped at the end of a pass: every page went through every pass, no edge.
    // SAFETY: every page's byte 0 lies inside the RAMBlock; the guest has halted.
    let byte0 = |i: u64| unsafe { *((base + layout.page_gpa(i) as usize) as *const u8) };
    let check = check_dirtied_pages(layout.pages(), byte0);
    assert!(check.is_consistent(), "{check:?}");
    assert_eq!((check.pages, check.edge), (99 * 256, None));
    assert_eq!(byte0(0), stop.passes as u8);
    // The registers a migration would save: halted in the program, its arguments intact.
    assert!(
        (0x1000..0x2000).contains(&stop.regs.rip),
        "{:x?}",
        stop.regs
    );
    assert_eq!((stop.regs.rdi, stop.regs.rsi), (layout.start, layout.end));

    // The vCPU goes on serving the ops program, which finds the heartbeat the host read.
    let read = kvm.run_guest(&[GuestOp::Read {
        gpa: DirtierLayout::PASSES_GPA,
    }]);
    assert_eq!(read.unwrap(), vec![stop.passes]);
}

#[test]
fn a_dirtier_range_beyond_the_ram_ends_the_run_with_an_error_not_a_hang() {
    let Some(kvm) = open_kvm(0) else { return };
    let (_mem, _ram) = flat(64 * MIB, &kvm);
    let e = kvm
        .run_dirtier(&DirtierLayout {
            start: MIB,
            end: 128 * MIB,
        })
        .unwrap_err();
    assert!(
        e.message()
            .contains("write to 0x4000000 reached no writable memslot"),
        "{e}"
    );
}

#[test]
fn the_boards_slot_limit_and_the_users_give_the_lower_one() {
    if !kvm_usable() {
        return;
    }
    let board = s390_41_board();
    for (accel, board_limit, slot) in [
        ("kvm", 256 * MIB, 256 * MIB),
        ("kvm,max-slot-size=128M", 256 * MIB, 128 * MIB),
        ("kvm,max-slot-size=512M", 256 * MIB, 256 * MIB),
        ("kvm,max-slot-size=512M", 0, 512 * MIB),
    ] {
        let cmd =
            hostmem::options::cmdline::Cmdline::parse(&["-m", "1G", "-accel", accel]).unwrap();
        let mut machine = Machine::from_cmdline(&cmd, &board).unwrap();
        let ram = machine.config().unwrap().ram.unwrap();
        let mem = machine.memory_mut();
        let sys = mem.system_memory();
        mem.add_subregion(sys, 0, ram, None).unwrap();
        machine.set_kvm_max_slot_size(board_limit).unwrap();
        machine.finish_init().unwrap();
        let sizes: Vec<u64> = machine
            .kvm()
            .unwrap()
            .slots()
            .iter()
            .map(|s| s.size)
            .collect();
        assert_eq!(
            sizes,
            vec![slot; (GIB / slot) as usize],
            "{accel}, board {board_limit:#x}"
        );
        // Once the slots exist, the board is too late.
        assert_eq!(
            machine.set_kvm_max_slot_size(MIB).unwrap_err().message(),
            "kvm_set_max_memslot_size: the KVM slots exist already; call it from the board's init"
        );
    }
}
