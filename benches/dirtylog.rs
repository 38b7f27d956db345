//! Dirty-log cost on real KVM:
//!
//! * a 4 GiB guest whose vCPU (the test dirtier) wrote 10 % of it: collecting its dirty pages
//!   (`log_sync`: KVM_GET_DIRTY_LOG of every slot, KVM_CLEAR_DIRTY_LOG of each 1 GiB chunk
//!   with a dirty page, folded into the RAMBlock bitmap, then the bitmap taken) next to one
//!   read of a bitmap of that size, and its three parts alone: the GET, the CLEAR (the
//!   kernel's; without TDP MMU it write-protects every dirty page again) and hostmem's own
//!   folding of the fetched words;
//! * 1 TiB of sparse slots: registering them, switching dirty logging on and off, and one
//!   sync with nothing dirty (a KVM without TDP MMU spends ~10 bytes per 4 KiB of slot: about
//!   2.5 GiB of kernel memory, so this part runs only when that much is free).
//!
//! Run it through `scripts/bench` (under `flock /tmp/hostmem-heavy.lock`), or alone with
//! `cargo bench --bench dirtylog`.

mod harness;

use std::hint::black_box;
use std::time::{Duration, Instant};

use hostmem::kvm::table::CLEAR_CHUNK_PAGES;
use hostmem::kvm::KvmAccel;
use hostmem::memory::MemorySystem;
use hostmem::region::RegionId;
use hostmem::testing::guest::DirtierLayout;
use hostmem::testing::GuestRun;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A guest with one RAM region at GPA 0 and KVM following it.
fn flat(size: u64, kvm: &KvmAccel) -> (MemorySystem, RegionId, Duration) {
    let mut mem = MemorySystem::new();
    let ram = mem.new_ram_anonymous("pc.ram", size).unwrap();
    let sys = mem.system_memory();
    mem.add_subregion(sys, 0, ram, None).unwrap();
    let (t, r) = harness::time(|| mem.add_listener(Box::new(kvm.listener())));
    r.unwrap();
    (mem, ram, t)
}

fn word(base: usize, gpa: u64) -> *mut u64 {
    (base + gpa as usize) as *mut u64
}

/// Runs the dirtier over `layout` until it completed one whole pass, then stops it.
fn dirty_once(kvm: &KvmAccel, base: usize, layout: DirtierLayout) {
    // SAFETY: the mailbox words are in the guest's RAM (low memory, mapped by the region);
    // the vCPU is not running between runs.
    unsafe {
        word(base, DirtierLayout::STOP_GPA).write_volatile(0);
        word(base, DirtierLayout::PASSES_GPA).write_volatile(0);
    }
    let guest = kvm.clone();
    let run = std::thread::spawn(move || guest.run_dirtier(&layout));
    let deadline = Instant::now() + Duration::from_secs(120);
    // SAFETY: as above; the guest writes the heartbeat concurrently, hence volatile.
    while unsafe { word(base, DirtierLayout::PASSES_GPA).read_volatile() } < 1 {
        assert!(
            Instant::now() < deadline,
            "the dirtier made no pass in 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: as above; the guest only reads the stop word.
    unsafe { word(base, DirtierLayout::STOP_GPA).write_volatile(1) };
    run.join().unwrap().unwrap();
}

/// The kernel's part alone: KVM_GET_DIRTY_LOG of every slot into bitmaps allocated beforehand
/// (what any VMM pays; the rest of `log_sync` is hostmem's folding).
fn raw_get_dirty_log(kvm: &KvmAccel, bitmaps: &mut [Vec<u64>]) {
    const KVM_GET_DIRTY_LOG: libc::c_ulong = 0x4010_ae42;
    for (s, bitmap) in kvm.slots().iter().zip(bitmaps.iter_mut()) {
        let mut log = kvm_bindings::kvm_dirty_log {
            slot: s.slot,
            ..Default::default()
        };
        log.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: the VM's fd and a bitmap of one bit per 4 KiB page of the slot, alive for
        // the call; the kernel writes only inside it.
        let r = unsafe { libc::ioctl(kvm.vm_fd(), KVM_GET_DIRTY_LOG, &mut log) };
        assert_eq!(
            r,
            0,
            "KVM_GET_DIRTY_LOG: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The kernel's other part: KVM_CLEAR_DIRTY_LOG of every 1 GiB chunk of `bitmaps` with a
/// dirty page, as hostmem's sync does (manual protection is on).
fn raw_clear_dirty_log(kvm: &KvmAccel, bitmaps: &[Vec<u64>]) {
    const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;
    for (s, bitmap) in kvm.slots().iter().zip(bitmaps) {
        let pages = s.size / 4096;
        let words = (CLEAR_CHUNK_PAGES / 64) as usize;
        for (i, chunk) in bitmap.chunks(words).enumerate() {
            if chunk.iter().all(|w| *w == 0) {
                continue;
            }
            let first = i as u64 * CLEAR_CHUNK_PAGES;
            let mut log = kvm_bindings::kvm_clear_dirty_log {
                slot: s.slot,
                num_pages: CLEAR_CHUNK_PAGES.min(pages - first) as u32,
                first_page: first,
                ..Default::default()
            };
            log.__bindgen_anon_1.dirty_bitmap = chunk.as_ptr() as *mut libc::c_void;
            // SAFETY: the VM's fd and a chunk of at least num_pages bits, alive for the call;
            // the kernel only reads it.
            let r = unsafe { libc::ioctl(kvm.vm_fd(), KVM_CLEAR_DIRTY_LOG, &mut log) };
            assert_eq!(
                r,
                0,
                "KVM_CLEAR_DIRTY_LOG: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// hostmem's own part alone: the fetched words folded into the RAMBlock bitmaps, as the sync
/// does after its ioctls.
fn fold(kvm: &KvmAccel, mem: &mut MemorySystem, bitmaps: &[Vec<u64>]) {
    for (s, bitmap) in kvm.slots().iter().zip(bitmaps) {
        mem.ramblocks
            .merge_dirty_bitmap(s.block, s.block_offset / 4096, bitmap);
    }
}

fn size_label(size: u64) -> String {
    if size >= GIB {
        format!("{} GiB", size / GIB)
    } else {
        format!("{} MiB", size / MIB)
    }
}

fn bits(bitmap: &[u64]) -> u64 {
    bitmap
        .iter()
        .map(|w| u64::from(black_box(*w).count_ones()))
        .sum()
}

fn dense(kvm: &KvmAccel, size: u64) {
    let (mut mem, ram, _) = flat(size, kvm);
    let block = mem.ram_block_of(ram).unwrap();
    let base = mem.ramblocks.get(block).unwrap().host_ptr() as usize;
    let layout = DirtierLayout {
        start: 2 * MIB,
        end: 2 * MIB + size / 10 / (2 * MIB) * (2 * MIB),
    };
    mem.set_global_dirty_log(true).unwrap();
    mem.log_sync().unwrap();
    let _ = mem.ramblocks.take_dirty(block);
    let (mut collect, mut read, mut get, mut clear, mut folding) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut bitmaps: Vec<Vec<u64>> = kvm
        .slots()
        .iter()
        .map(|s| vec![0u64; (s.size / 4096).div_ceil(64) as usize])
        .collect();
    let mut pages = 0;
    for _ in 0..harness::rounds() {
        // The parts alone, on one dirtying: GET, then CLEAR of what it found, then the fold.
        dirty_once(kvm, base, layout);
        get.push(harness::time(|| raw_get_dirty_log(kvm, &mut bitmaps)).0);
        clear.push(harness::time(|| raw_clear_dirty_log(kvm, &bitmaps)).0);
        folding.push(harness::time(|| fold(kvm, &mut mem, &bitmaps)).0);
        let _ = mem.ramblocks.take_dirty(block);
        // The whole collection, on another.
        dirty_once(kvm, base, layout);
        let (t, bitmap) = harness::time(|| {
            mem.log_sync().unwrap();
            mem.ramblocks.take_dirty(block)
        });
        collect.push(t);
        let (t, n) = harness::time(|| bits(&bitmap));
        read.push(t);
        pages = n;
    }
    mem.set_global_dirty_log(false).unwrap();
    let label = size_label(size);
    let case = format!("collect {label}, 10 % dirtied");
    harness::report("dirty log", &case, "hostmem", None, &collect);
    harness::report("dirty log", &case, "one read of the bitmap", None, &read);
    harness::report("dirty log", &case, "KVM_GET_DIRTY_LOG alone", None, &get);
    harness::report(
        "dirty log",
        &case,
        "KVM_CLEAR_DIRTY_LOG alone",
        None,
        &clear,
    );
    // What hostmem adds to the kernel's two ioctls, against the same read of the bitmap.
    let own = format!("fold {label}, 10 % dirtied (hostmem's part, no ioctl)");
    harness::report("dirty log", &own, "hostmem", None, &folding);
    harness::report("dirty log", &own, "one read of the bitmap", None, &read);
    harness::fact(
        "dirty log",
        &format!("dirty pages found ({case})"),
        &format!("{pages} of {} written by the guest", layout.pages()),
    );
}

fn available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn sparse_slots(kvm_for: impl Fn() -> KvmAccel, size: u64, label: &str) {
    // ~10 bytes of kernel memory per 4 KiB of slot without TDP MMU, plus room to spare.
    let need_kib = size / 4096 * 10 / 1024 + 4 * 1024 * 1024;
    if available_kib() < need_kib {
        harness::fact(
            "dirty log",
            &format!("{label} of slots"),
            &format!(
                "not measured: {} MiB available, {} MiB needed",
                available_kib() / 1024,
                need_kib / 1024
            ),
        );
        return;
    }
    let (mut register, mut start, mut sync, mut stop) = (vec![], vec![], vec![], vec![]);
    for _ in 0..harness::rounds() {
        let kvm = kvm_for();
        let (mut mem, _, t) = flat(size, &kvm);
        register.push(t);
        start.push(harness::time(|| mem.set_global_dirty_log(true).unwrap()).0);
        sync.push(harness::time(|| mem.log_sync().unwrap()).0);
        stop.push(harness::time(|| mem.set_global_dirty_log(false).unwrap()).0);
    }
    for (what, times) in [
        ("register", &register),
        ("dirty logging on", &start),
        ("sync, nothing dirty", &sync),
        ("dirty logging off", &stop),
    ] {
        harness::report(
            "dirty log",
            &format!("{label} of slots: {what}"),
            "hostmem",
            None,
            times,
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let kvm_for = || KvmAccel::open(0).expect("the dirty-log bench needs /dev/kvm");
    let quick = harness::quick();
    dense(&kvm_for(), if quick { 256 * MIB } else { 4 * GIB });
    if quick {
        sparse_slots(kvm_for, 64 * GIB, &size_label(64 * GIB));
    } else {
        sparse_slots(kvm_for, 1 << 40, "1024 GiB");
    }
}
