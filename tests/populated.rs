//! The populated-page detection against real mappings of every backing kind: 64 GiB sparse
//! mappings (MAP_NORESERVE, nothing allocated until touched) with a few pages written at
//! scattered offsets, the zero-page trap (reading everything), THP, shmem, memfd, tmpfs and
//! disk files, hugetlbfs, swap (when a swap area is active), and a process without privilege.

// Runs are ranges: a list of one run is what is meant.
#![allow(clippy::single_range_in_vec_init)]

use std::os::fd::RawFd;
use std::sync::Arc;

use hostmem::backend::{Backend, BackendDefaults};
use hostmem::hostmap::{map_anonymous, HostMapping};
use hostmem::populated::{
    Detector, Method, Outcome, PopulatedMap, Region, Why, DEFAULT_READ_ENTRIES,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 4 * KIB;
const SIZE: u64 = 64 * GIB;

/// The scattered writes: first page, last byte, both sides of a 2 MiB boundary, an unaligned
/// byte, and pages deep inside.
const WRITES: [u64; 7] = [
    0,
    2 * MIB - PAGE,
    2 * MIB,
    2 * MIB + 3 * PAGE + 17,
    GIB + 5 * PAGE,
    32 * GIB + 12345 * PAGE + 100,
    SIZE - 1,
];

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Exactly the 4 KiB pages holding `offsets`.
fn pages_of(len: u64, offsets: &[u64]) -> PopulatedMap {
    PopulatedMap::from_runs(
        len,
        offsets
            .iter()
            .map(|o| o / PAGE * PAGE..o / PAGE * PAGE + PAGE),
    )
}

/// The 2 MiB blocks holding `offsets`.
fn blocks_of(len: u64, offsets: &[u64]) -> PopulatedMap {
    PopulatedMap::from_runs(
        len,
        offsets
            .iter()
            .map(|o| o / (2 * MIB) * 2 * MIB..o / (2 * MIB) * 2 * MIB + 2 * MIB),
    )
}

/// Every written page is reported, and nothing outside the 2 MiB blocks of written pages: the
/// answer where THP (anon or shmem) may back a write with a whole 2 MiB folio.
fn assert_tight_superset(got: &PopulatedMap, len: u64, offsets: &[u64]) {
    for o in offsets {
        assert!(
            got.contains(*o),
            "written offset {o:#x} missing from {got:x?}"
        );
    }
    assert_eq!(
        got.union(&blocks_of(len, offsets)),
        blocks_of(len, offsets),
        "reported beyond the written pages' 2 MiB blocks: {got:x?}"
    );
}

fn write(m: &HostMapping, off: u64, v: u8) {
    assert!(off < m.len() as u64);
    // SAFETY: inside the writable mapping.
    unsafe { m.as_ptr().add(off as usize).write_volatile(v) };
}

fn read(m: &HostMapping, off: u64) -> u8 {
    assert!(off < m.len() as u64);
    // SAFETY: inside the readable mapping.
    unsafe { m.as_ptr().add(off as usize).read_volatile() }
}

fn madvise(m: &HostMapping, off: u64, len: u64, advice: libc::c_int) -> i32 {
    // SAFETY: advice on part of the mapping; none of the advice used here frees data.
    unsafe {
        libc::madvise(
            m.as_ptr().add(off as usize) as *mut libc::c_void,
            len as usize,
            advice,
        )
    }
}

/// A 64 GiB private anonymous mapping with THP off: 4 KiB pages, exact answers.
fn private_anon() -> HostMapping {
    let m = map_anonymous("pc.ram", SIZE, false, true).unwrap();
    assert_eq!(madvise(&m, 0, SIZE, libc::MADV_NOHUGEPAGE), 0);
    m
}

fn backend(ty: &str, props: &[(&str, &str)]) -> (Backend, Arc<HostMapping>) {
    let mut b = Backend::new(ty, "ram0", &BackendDefaults::default()).unwrap();
    for (k, v) in props {
        b.set(k, v).unwrap();
    }
    b.complete().unwrap();
    let m = b.mapping().unwrap();
    (b, m)
}

fn methods(d: &Detector) -> Vec<Method> {
    let mut v = vec![Method::PagemapScan];
    if d.facts().pfns_visible {
        v.push(Method::PagemapRead {
            entries: DEFAULT_READ_ENTRIES,
        });
        v.push(Method::MincoreThenPagemapRead {
            entries: DEFAULT_READ_ENTRIES,
        });
    }
    v
}

fn scan(d: &Detector, m: &HostMapping, method: Method) -> PopulatedMap {
    match d.scan(&Region::of(m), Some(method)).unwrap() {
        Outcome::Known { map, method: used } => {
            let want = match method {
                // With swap active the mincore pre-filter is not trusted: the plain read runs.
                Method::MincoreThenPagemapRead { entries } if hostmem::populated::swap_active() => {
                    Method::PagemapRead { entries }
                }
                m => m,
            };
            assert_eq!(used, want);
            map
        }
        o => panic!("{method:?}: {o:?}"),
    }
}

fn mincore_resident(m: &HostMapping, off: u64) -> bool {
    let mut v = 0u8;
    // SAFETY: one page of the mapping; mincore writes one byte into `v`.
    let r = unsafe {
        libc::mincore(
            m.as_ptr().add(off as usize) as *mut libc::c_void,
            PAGE as usize,
            &mut v,
        )
    };
    assert_eq!(r, 0);
    v & 1 != 0
}

/// The pagemap entry of the page at `addr`, read independently of the module.
fn pagemap_entry(addr: usize) -> u64 {
    use std::os::unix::fs::FileExt;
    let pm = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut b = [0u8; 8];
    pm.read_exact_at(&mut b, (addr / 4096) as u64 * 8).unwrap();
    u64::from_ne_bytes(b)
}

/// Whether the page at `addr` is part of a transparent huge page, asked independently of the
/// module: the PFN from pagemap and KPF_THP from /proc/kpageflags (root), else smaps.
fn thp_at(addr: usize) -> bool {
    use std::os::unix::fs::FileExt;
    if is_root() {
        let e = pagemap_entry(addr);
        if e >> 63 == 0 {
            return false;
        }
        let mut b = [0u8; 8];
        let kpf = std::fs::File::open("/proc/kpageflags").unwrap();
        kpf.read_exact_at(&mut b, (e & ((1 << 55) - 1)) * 8)
            .unwrap();
        return u64::from_ne_bytes(b) & (1 << 22) != 0;
    }
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for l in smaps.lines() {
        if let Some((range, _)) = l.split_once(' ') {
            if let Some((s, e)) = range.split_once('-') {
                if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16))
                {
                    inside = (s..e).contains(&addr);
                    continue;
                }
            }
        }
        if inside && l.starts_with("AnonHugePages:") {
            return !l.contains(" 0 kB");
        }
    }
    false
}

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

fn pwrite(fd: RawFd, off: u64, v: u8) {
    // SAFETY: one byte from a local into the file.
    let n = unsafe { libc::pwrite(fd, &v as *const u8 as *const _, 1, off as i64) };
    assert_eq!(n, 1, "pwrite at {off:#x}");
}

fn fallocate(fd: RawFd, off: u64, len: u64) {
    // SAFETY: allocating storage in our own file; no memory is passed.
    let r = unsafe { libc::fallocate(fd, 0, off as i64, len as i64) };
    assert_eq!(r, 0, "fallocate");
}

// ---- private anonymous memory (memory-backend-ram share=off) ----

#[test]
fn private_anon_scattered_writes_are_reported_exactly_by_every_method() {
    let d = Detector::new();
    let m = private_anon();
    for o in WRITES {
        write(&m, o, 0x5a);
    }
    let want = pages_of(SIZE, &WRITES);
    assert_eq!(want.pages(), 7);
    for method in methods(&d) {
        assert_eq!(scan(&d, &m, method), want, "{method:?}");
    }
    let auto = d.scan_mapping(&m).unwrap();
    assert_eq!(auto.map(), Some(&want));
}

#[test]
fn private_anon_reading_every_page_changes_nothing() {
    // The trap: a read maps the shared zero page, which mincore calls resident.
    let d = Detector::new();
    let m = private_anon();
    for o in WRITES {
        write(&m, o, 0x5a);
    }
    assert_eq!(madvise(&m, 0, SIZE, libc::MADV_POPULATE_READ), 0);
    for o in (0..64 * MIB)
        .step_by(PAGE as usize)
        .chain((0..SIZE).step_by(2 * MIB as usize))
    {
        read(&m, o);
    }
    assert!(
        mincore_resident(&m, 7 * GIB),
        "mincore calls a page that was only read resident"
    );
    let want = pages_of(SIZE, &WRITES);
    for method in methods(&d) {
        assert_eq!(scan(&d, &m, method), want, "{method:?}");
    }
}

#[test]
fn a_page_written_then_zeroed_is_still_reported() {
    // A superset: the page holds zeros again but was allocated; sending it is harmless.
    let d = Detector::new();
    let m = private_anon();
    write(&m, 5 * GIB, 1);
    write(&m, 5 * GIB, 0);
    assert_eq!(
        d.scan_mapping(&m).unwrap().into_map(),
        pages_of(SIZE, &[5 * GIB])
    );
}

#[test]
fn a_thp_with_one_byte_written_reports_its_2mib_block_and_the_huge_zero_page_nothing() {
    let d = Detector::new();
    let m = map_anonymous("pc.ram", 16 * MIB, false, true).unwrap();
    assert_eq!(madvise(&m, 0, 16 * MIB, libc::MADV_HUGEPAGE), 0);
    let byte = 2 * MIB + 5000;
    write(&m, byte, 1);
    // Reading an untouched THP-eligible block maps the huge zero page (use_zero_page=1).
    read(&m, 4 * MIB);
    read(&m, 8 * MIB + 12345);
    let thp = thp_at(m.as_ptr() as usize + byte as usize);
    eprintln!("the written block is a THP: {thp}");
    // The kernel backs the write with a 2 MiB THP when it can (enabled=always, or madvise as
    // here), else with one 4 KiB page. A THP is one folio: all 512 subpages were allocated
    // together and the scan cannot tell which one was written, so the whole block is reported
    // (zeros except one byte): a superset, safe.
    let want = if thp {
        blocks_of(16 * MIB, &[byte])
    } else {
        pages_of(16 * MIB, &[byte])
    };
    for method in methods(&d) {
        assert_eq!(scan(&d, &m, method), want, "{method:?} (THP: {thp})");
    }
    let thp_enabled = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| !s.contains("[never]"));
    let zero_on = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/use_zero_page")
        .is_ok_and(|s| s.trim() == "1");
    if is_root() && thp_enabled && zero_on {
        assert!(d.facts().huge_zero_pfns.is_some(), "{:?}", d.facts());
        assert_eq!(d.facts().scan_flags_huge_zero, Some(true), "Linux 6.18");
    }
}

#[test]
fn a_ram_backend_with_reserve_off_reports_a_tight_superset() {
    // memory-backend-ram advises MADV_HUGEPAGE as QEMU does: writes may get 2 MiB THPs.
    let d = Detector::new();
    let (_b, m) = backend(
        "memory-backend-ram",
        &[("size", "64G"), ("reserve", "off"), ("merge", "off")],
    );
    for o in WRITES {
        write(&m, o, 0x5a);
    }
    for method in methods(&d) {
        assert_tight_superset(&scan(&d, &m, method), SIZE, &WRITES);
    }
}

#[test]
fn a_sub_range_reports_offsets_from_its_own_start() {
    let d = Detector::new();
    let m = private_anon();
    for o in WRITES {
        write(&m, o, 1);
    }
    let sub = Region::of(&m).sub(2 * MIB as usize, GIB as usize).unwrap();
    let o = d.scan(&sub, None).unwrap();
    assert_eq!(
        o.map(),
        Some(&pages_of(
            GIB,
            &[0, 3 * PAGE + 17, GIB - 2 * MIB + 5 * PAGE]
        ))
    );
}

// ---- shared anonymous memory (memory-backend-ram share=on): shmem without an fd ----

#[test]
fn shared_anon_writes_are_reported_and_a_read_allocates() {
    let d = Detector::new();
    if !is_root() {
        eprintln!("SKIPPED: shared anonymous memory is read through /proc/self/map_files (root)");
        return;
    }
    let (_b, m) = backend(
        "memory-backend-ram",
        &[("size", "64G"), ("reserve", "off"), ("share", "on")],
    );
    assert!(m.fd().is_none() && m.is_shared());
    for o in WRITES {
        write(&m, o, 0x5a);
    }
    for method in methods(&d) {
        let got = scan(&d, &m, method);
        // shmem_enabled=never here gives 4 KiB pages; shmem THP would give 2 MiB blocks.
        assert_tight_superset(&got, SIZE, &WRITES);
        if std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .is_ok_and(|s| s.contains("[never]"))
        {
            assert_eq!(got, pages_of(SIZE, &WRITES), "{method:?}");
        }
    }
    // shmem has no zero page: a read fault allocates a real (zeroed) page in the file, so a
    // page that was only read is reported. A superset, but the reason scans must come before
    // anything reads guest RAM; the scan itself never touches it.
    read(&m, 40 * GIB);
    let got = d.scan_mapping(&m).unwrap().into_map();
    assert!(got.contains(40 * GIB));
    assert_eq!(got.pages(), pages_of(SIZE, &WRITES).pages() + 1);
}

// ---- memfd (memory-backend-memfd) ----

#[test]
fn memfd_reports_pages_written_through_the_mapping_and_the_fd() {
    let d = Detector::new();
    let (_b, m) = backend(
        "memory-backend-memfd",
        &[("size", "64G"), ("reserve", "off")],
    );
    assert!(m.is_shared());
    for o in WRITES {
        write(&m, o, 0x5a);
    }
    // Data written through the fd never appears in this process's page tables.
    let via_fd = 48 * GIB + 7 * PAGE;
    pwrite(m.fd().unwrap(), via_fd, 0x77);
    let mut all = WRITES.to_vec();
    all.push(via_fd);
    for method in methods(&d) {
        assert_eq!(scan(&d, &m, method), pages_of(SIZE, &all), "{method:?}");
    }
}

#[test]
fn a_private_memfd_mapping_reports_its_own_copies_and_the_files_data() {
    let d = Detector::new();
    let (_b, m) = backend(
        "memory-backend-memfd",
        &[("size", "64G"), ("reserve", "off"), ("share", "off")],
    );
    assert!(!m.is_shared());
    // A private write copies the page (anonymous, in the page tables); on shmem the fault
    // also allocates the file's page first, so SEEK_DATA sees it too.
    write(&m, 3 * GIB, 1);
    // Data only in the file shows through the private mapping when read: it must be sent.
    let file_only = 9 * GIB + 3 * PAGE;
    pwrite(m.fd().unwrap(), file_only, 0x66);
    assert_eq!(read(&m, file_only), 0x66);
    let untouched_file_data = 20 * GIB;
    pwrite(m.fd().unwrap(), untouched_file_data, 0x55);
    let want = pages_of(SIZE, &[3 * GIB, file_only, untouched_file_data]);
    for method in methods(&d) {
        assert_eq!(scan(&d, &m, method), want, "{method:?}");
    }
}

// ---- files: tmpfs and a disk file with existing data (memory-backend-file) ----

struct TempPath(String);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_tmpfs_file_reports_its_data_shared_or_private() {
    let d = Detector::new();
    for share in ["on", "off"] {
        let path = TempPath(format!(
            "/dev/shm/hostmem-populated-{}-{share}",
            std::process::id()
        ));
        let (_b, m) = backend(
            "memory-backend-file",
            &[
                ("size", "64G"),
                ("reserve", "off"),
                ("mem-path", &path.0),
                ("share", share),
            ],
        );
        for o in WRITES {
            write(&m, o, 0x5a);
        }
        for method in methods(&d) {
            assert_eq!(
                scan(&d, &m, method),
                pages_of(SIZE, &WRITES),
                "share={share} {method:?}"
            );
        }
    }
}

#[test]
fn a_disk_file_with_existing_data_reports_its_extents_in_the_window() {
    let d = Detector::new();
    let path = TempPath(format!(
        "{}/populated-disk-{}",
        env!("CARGO_TARGET_TMPDIR"),
        std::process::id()
    ));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&path.0).unwrap();
        f.set_len(64 * MIB).unwrap();
        f.write_all_at(&[1; 8192], MIB).unwrap(); // before the window
        f.write_all_at(&[2; 100], 10 * MIB + PAGE).unwrap();
        f.write_all_at(&[3; 4096], 64 * MIB - PAGE).unwrap();
        f.sync_all().unwrap();
    }
    for share in ["on", "off"] {
        // The window is the file's [8 MiB, 64 MiB).
        let (_b, m) = backend(
            "memory-backend-file",
            &[
                ("size", "56M"),
                ("offset", "8M"),
                ("mem-path", &path.0),
                ("share", share),
            ],
        );
        assert_eq!(read(&m, 2 * MIB + PAGE), 2);
        let want = pages_of(56 * MIB, &[2 * MIB + PAGE, 56 * MIB - PAGE]);
        for method in methods(&d) {
            assert_eq!(scan(&d, &m, method), want, "share={share} {method:?}");
        }
    }
}

// ---- hugetlbfs (memory-backend-file on hugetlbfs, memory-backend-memfd hugetlb=on) ----

fn hugetlb_writes() -> [u64; 3] {
    [0, 6 * MIB + 1, SIZE - 2 * MIB + 5]
}

fn check_hugetlb(d: &Detector, m: &HostMapping) {
    assert_eq!(m.page_size() as u64, 2 * MIB);
    let w = hugetlb_writes();
    for o in w {
        write(m, o, 1);
    }
    // hugetlbfs's SEEK_DATA calls the whole file data; the answer comes from the page tables,
    // checked against the file's block count.
    for method in methods(d) {
        assert_eq!(scan(d, m, method), blocks_of(SIZE, &w), "{method:?}");
    }
    // A part of the mapping: the file's pages mapped outside it count for the check.
    let part = Region::of(m).sub(4 * MIB as usize, GIB as usize).unwrap();
    assert_eq!(
        d.scan(&part, None).unwrap().map(),
        Some(&blocks_of(GIB, &[2 * MIB + 1]))
    );
    // A huge page allocated without being mapped here (fallocate, or another process writing
    // a shared file) makes the page tables incomplete: no answer, so everything is sent.
    fallocate(m.fd().unwrap(), 30 * GIB, 2 * MIB);
    match d.scan_mapping(m).unwrap() {
        Outcome::Unknown {
            why:
                Why::HugetlbfsPagesElsewhere {
                    file_bytes,
                    mapped_bytes,
                },
            range_len,
        } => {
            assert_eq!((file_bytes, mapped_bytes), (8 * MIB, 6 * MIB));
            assert_eq!(range_len, SIZE);
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn a_hugetlbfs_file_reports_its_huge_pages() {
    let Some(dir) = hugetlbfs() else { return };
    let d = Detector::new();
    let (_b, m) = backend(
        "memory-backend-file",
        &[
            ("size", "64G"),
            ("reserve", "off"),
            ("mem-path", &dir),
            ("share", "on"),
        ],
    );
    check_hugetlb(&d, &m);
}

#[test]
fn a_hugetlb_memfd_reports_its_huge_pages() {
    if hugetlbfs().is_none() {
        return;
    }
    let d = Detector::new();
    let (_b, m) = backend(
        "memory-backend-memfd",
        &[("size", "64G"), ("reserve", "off"), ("hugetlb", "on")],
    );
    check_hugetlb(&d, &m);
}

#[test]
fn a_private_hugetlbfs_mapping_reports_its_copies() {
    let Some(dir) = hugetlbfs() else { return };
    let d = Detector::new();
    let (_b, m) = backend(
        "memory-backend-file",
        &[
            ("size", "64G"),
            ("reserve", "off"),
            ("mem-path", &dir),
            ("share", "off"),
        ],
    );
    // Private writes allocate anonymous huge pages: not the file's, found in the page tables.
    write(&m, 10 * GIB + 3, 1);
    for method in methods(&d) {
        assert_eq!(
            scan(&d, &m, method),
            blocks_of(SIZE, &[10 * GIB]),
            "{method:?}"
        );
    }
}

// ---- swap (runs only when a swap area is active) ----

#[test]
fn swapped_out_pages_are_still_reported() {
    if !hostmem::populated::swap_active() {
        eprintln!("SKIPPED: no active swap area (swapon one to run this test)");
        return;
    }
    let d = Detector::new();
    let m = private_anon();
    let (_b, shm) = backend(
        "memory-backend-ram",
        &[("size", "1G"), ("share", "on"), ("reserve", "off")],
    );
    for o in [0, 5 * PAGE, 7 * GIB] {
        write(&m, o, 0x5a);
    }
    write(&shm, 3 * PAGE, 0x5a);
    assert_eq!(madvise(&m, 0, SIZE, libc::MADV_PAGEOUT), 0);
    assert_eq!(madvise(&shm, 0, GIB, libc::MADV_PAGEOUT), 0);
    let at = |m: &HostMapping, o: u64| pagemap_entry(m.as_ptr() as usize + o as usize);
    assert_eq!(at(&m, 5 * PAGE) >> 62, 1, "swapped, not present");
    assert_eq!(
        at(&shm, 3 * PAGE) >> 61,
        0,
        "a swapped-out shmem page leaves nothing in the page tables"
    );
    for method in methods(&d) {
        assert_eq!(
            scan(&d, &m, method),
            pages_of(SIZE, &[0, 5 * PAGE, 7 * GIB]),
            "{method:?}"
        );
        if is_root() {
            // A swapped-out shmem page leaves no trace in the page tables: SEEK_DATA finds it.
            assert_eq!(scan(&d, &shm, method), pages_of(GIB, &[3 * PAGE]));
        }
    }
    assert_eq!(read(&m, 7 * GIB), 0x5a);
}

// ---- without privilege ----

const AS_NOBODY: &str = "HOSTMEM_POPULATED_AS_NOBODY";

/// Runs `unprivileged_scans` in a child process as uid/gid 65534 (no CAP_SYS_ADMIN: pagemap
/// hides PFNs, /proc/self/map_files is closed).
#[test]
fn without_privilege_the_scan_ioctl_still_answers_and_the_rest_says_unknown() {
    use std::os::unix::process::CommandExt;
    if !is_root() {
        unprivileged_scans_body();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "unprivileged_scans", "--ignored", "--nocapture"])
        .env(AS_NOBODY, "1")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child: {text}"
    );
}

#[test]
#[ignore = "run by without_privilege_the_scan_ioctl_still_answers_and_the_rest_says_unknown"]
fn unprivileged_scans() {
    if std::env::var(AS_NOBODY).is_err() {
        return;
    }
    unprivileged_scans_body();
}

fn unprivileged_scans_body() {
    let d = Detector::new();
    let f = d.facts();
    assert!(!f.pfns_visible && f.zero_pfn.is_none(), "{f:?}");
    assert!(f.pagemap_scan, "{f:?}");
    let m = map_anonymous("pc.ram", 4 * GIB, false, true).unwrap();
    assert_eq!(madvise(&m, 0, 4 * GIB, libc::MADV_NOHUGEPAGE), 0);
    let w = [0, 3 * GIB + 5 * PAGE, 4 * GIB - 1];
    for o in w {
        write(&m, o, 1);
    }
    assert_eq!(madvise(&m, 0, 4 * GIB, libc::MADV_POPULATE_READ), 0);
    // PAGEMAP_SCAN tells the zero page apart in the kernel: exact without privilege.
    assert_eq!(scan(&d, &m, Method::PagemapScan), pages_of(4 * GIB, &w));
    // The read methods need PFNs: no answer, and the caller's fallback is everything.
    for method in [
        Method::PagemapRead { entries: 512 },
        Method::MincoreThenPagemapRead { entries: 512 },
    ] {
        let o = d.scan(&Region::of(&m), Some(method)).unwrap();
        assert_eq!(
            o,
            Outcome::Unknown {
                why: Why::PfnsHidden,
                range_len: 4 * GIB
            }
        );
        assert_eq!(o.into_map(), PopulatedMap::everything(4 * GIB));
    }
    // Shared anonymous memory: its shmem file is out of reach, and pagemap alone would miss
    // swapped-out pages: no answer.
    let shm = map_anonymous("pc.ram", GIB, true, true).unwrap();
    write(&shm, 0, 1);
    match d.scan_mapping(&shm).unwrap() {
        Outcome::Unknown {
            why: Why::NoFile { .. },
            ..
        } => {}
        o => panic!("{o:?}"),
    }
    // A memfd's own fd is enough.
    let (_b, mfd) = backend("memory-backend-memfd", &[("size", "1G")]);
    write(&mfd, 5 * PAGE, 1);
    assert_eq!(
        d.scan(&Region::of(&mfd), Some(Method::PagemapScan))
            .unwrap()
            .map(),
        Some(&pages_of(GIB, &[5 * PAGE]))
    );
}

#[test]
fn unknown_falls_back_to_everything() {
    let o = Outcome::Unknown {
        why: Why::NoPagemapScan,
        range_len: SIZE,
    };
    let all = o.into_map();
    assert_eq!(all.runs(), &[0..SIZE]);
    assert_eq!(all.pages(), SIZE / PAGE);
}
