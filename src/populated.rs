//! Which pages of a guest-RAM mapping may hold data: the detection behind hostmem's own
//! migration capability `x-skip-unpopulated`. A destination that starts from zeroed memory
//! needs only the pages a scan reports, so a sparse 8 TiB guest with 1 GiB written costs time
//! in proportion to the 1 GiB.
//!
//! The answer is a [`PopulatedMap`]: runs of 4 KiB pages (the migration target page) that *may*
//! hold non-zero data. It is a superset: a page it leaves out reads as zeros. Nothing here reads
//! or writes guest memory; it asks the kernel about page tables and files only, so scanning does
//! not populate anything (reading untouched shmem or hugetlbfs through the mapping would).
//!
//! Where the data of a page can live, and how each place is asked:
//!
//! - **Page tables** (private anonymous memory, the private copies of a `MAP_PRIVATE` file, and
//!   every page this process has faulted in): `/proc/self/pagemap`. A page is populated when it
//!   is swapped (bit 62; migration entries and PTE markers look the same, a superset), or
//!   present (bit 63) and not the shared zero page. A read fault of untouched private anonymous
//!   memory maps the zero page (or the 2 MiB huge zero page for a THP-eligible range), which is
//!   why `mincore` says "resident" for memory that was only ever read. The zero pages are told
//!   apart by the kernel itself with `PAGEMAP_SCAN` (`PAGE_IS_PFNZERO`, Linux 6.7, no
//!   privilege needed), or by PFN when reading pagemap entries (bits 0-54, zeroed unless the
//!   reader has CAP_SYS_ADMIN): [`Detector::new`] finds both zero pages' PFNs once by reading
//!   fresh private memory, and checks them against `/proc/kpageflags` (`KPF_ZERO_PAGE`) when
//!   it can. The "exclusively mapped" bit 56 is no help (a data page shared with a forked child
//!   or merged by KSM has it clear, like the zero page), nor soft-dirty bit 55 (it tracks writes
//!   since the last `clear_refs`, not population, and is always 0 without
//!   CONFIG_MEM_SOFT_DIRTY).
//! - **Files** (tmpfs, memfd, shared anonymous memory which is an internal shmem file, disk
//!   files): `lseek(SEEK_DATA/SEEK_HOLE)` on the file, which also sees pages that are swapped
//!   out or were written through another mapping. pagemap would miss both: a swapped-out shmem
//!   page leaves no trace in the page tables. A `MAP_SHARED` anonymous mapping has no fd in
//!   [`HostMapping`]; its shmem file is opened through `/proc/self/map_files/` (CAP_SYS_ADMIN).
//!   The page tables are scanned too and united with the file's data (cheap, and a superset).
//! - **hugetlbfs** (files and `MFD_HUGETLB` memfds): SEEK_DATA there reports the whole file as
//!   data (hugetlbfs uses the default llseek) and `cachestat` refuses it, so the pages are taken
//!   from this process's page tables, and that answer is used only when the file's block count
//!   says it holds exactly the pages found mapped here (before and after the scan). A page
//!   another process or `fallocate` allocated without mapping it here makes the answer
//!   [`Outcome::Unknown`].
//!
//! `mincore` is never trusted alone: "resident" is wrong after reads (zero page), and "not
//! resident" is wrong for a swapped-out page whose swap-cache copy is gone. It is used only as
//! a pre-filter for the pagemap read method, and only while no swap area is active.
//!
//! Scans race with the guest: start dirty tracking before scanning, so a page populated after
//! the scan passed it is caught by the dirty log. A [`Detector`] reads the page tables of the
//! process that created it (its pagemap fd is bound to that process): create it after any
//! `fork`, in the process that owns the memory.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileExt;

use crate::error::{strerror, Error};
use crate::hostmap::{host_page_size, HostMapping};

/// The page size of the answer: QEMU's target page, the unit the migration stream sends.
pub const TARGET_PAGE_SIZE: u64 = 4096;

/// Entries read from `/proc/self/pagemap` at a time when the mincore pre-filter picks the read
/// method: 8192 entries (64 KiB, 32 MiB of address space). Reads of 4 KiB to 4 MiB measured
/// within 15% of each other here (benches/populated.rs).
pub const DEFAULT_READ_ENTRIES: usize = 8192;

// /proc/PID/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
const PM_EXCLUSIVE: u64 = 1 << 56;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

// /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h).
const KPF_THP: u64 = 1 << 22;
const KPF_ZERO_PAGE: u64 = 1 << 24;

// PAGEMAP_SCAN categories (include/uapi/linux/fs.h).
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
const PAGE_IS_HUGE: u64 = 1 << 6;

const HUGE_ZERO_PAGES: u64 = 512;
const PMD_SIZE: usize = 2 << 20;

/// `struct pm_scan_arg` of the PAGEMAP_SCAN ioctl (Linux 6.7).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`: one output range of PAGEMAP_SCAN.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const IOC_READ_WRITE: u64 = 6 << 29;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const IOC_READ_WRITE: u64 = 3 << 30;

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    IOC_READ_WRITE | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;

/// Output regions per PAGEMAP_SCAN call.
const SCAN_REGIONS: usize = 1024;

/// Runs of 4 KiB pages that may hold data, as byte offsets from the start of the scanned range:
/// sorted, disjoint, never adjacent, each a multiple of [`TARGET_PAGE_SIZE`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PopulatedMap {
    range_len: u64,
    runs: Vec<Range<u64>>,
}

impl PopulatedMap {
    /// The answer "any page may hold data": one run over the whole range. What a caller uses
    /// when the detector says [`Outcome::Unknown`].
    pub fn everything(range_len: u64) -> PopulatedMap {
        let mut m = PopulatedMap {
            range_len,
            runs: Vec::new(),
        };
        m.push(0..range_len);
        m
    }

    /// Builds a map from runs (any order, overlapping allowed), rounded out to whole 4 KiB
    /// pages and clipped to `range_len`.
    pub fn from_runs(range_len: u64, runs: impl IntoIterator<Item = Range<u64>>) -> PopulatedMap {
        let mut v: Vec<Range<u64>> = runs.into_iter().collect();
        v.sort_by_key(|r| r.start);
        let mut m = PopulatedMap {
            range_len,
            runs: Vec::new(),
        };
        for r in v {
            m.push(r);
        }
        m
    }

    /// The length in bytes of the range that was scanned.
    pub fn range_len(&self) -> u64 {
        self.range_len
    }

    /// The runs, in bytes from the start of the range.
    pub fn runs(&self) -> &[Range<u64>] {
        &self.runs
    }

    /// Bytes in the runs.
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.end - r.start).sum()
    }

    /// 4 KiB pages in the runs.
    pub fn pages(&self) -> u64 {
        self.bytes() / TARGET_PAGE_SIZE
    }

    /// Whether the 4 KiB page holding byte `offset` may hold data.
    pub fn contains(&self, offset: u64) -> bool {
        let i = self.runs.partition_point(|r| r.end <= offset);
        self.runs.get(i).is_some_and(|r| r.start <= offset)
    }

    /// The 4 KiB pages of the runs, as byte offsets, in order.
    pub fn page_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs
            .iter()
            .flat_map(|r| (r.start..r.end).step_by(TARGET_PAGE_SIZE as usize))
    }

    /// The union of two maps of the same range.
    pub fn union(&self, other: &PopulatedMap) -> PopulatedMap {
        PopulatedMap::from_runs(
            self.range_len.max(other.range_len),
            self.runs.iter().chain(&other.runs).cloned(),
        )
    }

    /// Appends a run that starts at or after the start of the last one (runs from a walk in
    /// address order), merging overlapping and adjacent runs.
    fn push(&mut self, r: Range<u64>) {
        let start = r.start - r.start % TARGET_PAGE_SIZE;
        let end = r
            .end
            .checked_next_multiple_of(TARGET_PAGE_SIZE)
            .unwrap_or(u64::MAX)
            .min(self.range_len);
        if start >= end {
            return;
        }
        match self.runs.last_mut() {
            Some(last) if start <= last.end => {
                debug_assert!(start >= last.start, "runs out of order");
                last.end = last.end.max(end);
            }
            _ => self.runs.push(start..end),
        }
    }
}

/// How the page tables are read. File data is always asked with SEEK_DATA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// The PAGEMAP_SCAN ioctl (Linux 6.7): the kernel returns ranges and recognises the zero
    /// pages itself; holes cost next to nothing (page-table levels that do not exist are
    /// skipped whole). Needs no privilege.
    PagemapScan,
    /// `read` of `/proc/self/pagemap`, `entries` 8-byte entries at a time, the zero pages told
    /// apart by PFN (needs CAP_SYS_ADMIN, else [`Why::PfnsHidden`]). Costs 8 bytes copied per
    /// 4 KiB of address space, holes included.
    PagemapRead { entries: usize },
    /// `mincore` first (1 byte per page), then pagemap entries only where it says resident.
    /// Valid only while no swap area is active (a swapped-out page can read "not resident");
    /// with swap active it runs as [`Method::PagemapRead`].
    MincoreThenPagemapRead { entries: usize },
}

/// Why there is no answer; the caller then treats every page as populated
/// ([`Outcome::into_map`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Why {
    #[error("/proc/self/pagemap cannot be opened: {}", strerror(*.0))]
    NoPagemap(i32),
    #[error("the kernel has no PAGEMAP_SCAN ioctl")]
    NoPagemapScan,
    #[error("pagemap hides page frame numbers (they need CAP_SYS_ADMIN), so the shared zero page cannot be told apart")]
    PfnsHidden,
    #[error("reading the page tables failed: {what}: {}", strerror(*errno))]
    PageTables { what: &'static str, errno: i32 },
    #[error("the file mapped at {start:#x}-{end:#x} cannot be opened: {}", strerror(*errno))]
    NoFile {
        start: usize,
        end: usize,
        errno: i32,
    },
    #[error("SEEK_DATA failed on the file mapped at {start:#x}: {}", strerror(*errno))]
    Seek { start: usize, errno: i32 },
    #[error("the hugetlbfs file holds {file_bytes} bytes of pages but only {mapped_bytes} are mapped here")]
    HugetlbfsPagesElsewhere { file_bytes: u64, mapped_bytes: u64 },
    #[error("/proc/self/maps cannot be read: {}", strerror(*.0))]
    NoMaps(i32),
}

/// The answer of a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The pages that may hold data (a superset), and how the page tables were read.
    Known { map: PopulatedMap, method: Method },
    /// No answer: every page may hold data.
    Unknown { why: Why, range_len: u64 },
}

impl Outcome {
    pub fn is_known(&self) -> bool {
        matches!(self, Outcome::Known { .. })
    }

    /// The map to act on: the detected runs, or the whole range when there is no answer.
    pub fn into_map(self) -> PopulatedMap {
        match self {
            Outcome::Known { map, .. } => map,
            Outcome::Unknown { range_len, .. } => PopulatedMap::everything(range_len),
        }
    }

    /// The map, if there is an answer.
    pub fn map(&self) -> Option<&PopulatedMap> {
        match self {
            Outcome::Known { map, .. } => Some(map),
            Outcome::Unknown { .. } => None,
        }
    }
}

/// What [`Detector::new`] found out about this kernel and this process's privileges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelFacts {
    /// errno of opening `/proc/self/pagemap`, when that failed.
    pub pagemap_errno: Option<i32>,
    /// The PAGEMAP_SCAN ioctl works.
    pub pagemap_scan: bool,
    /// pagemap shows PFNs (CAP_SYS_ADMIN).
    pub pfns_visible: bool,
    /// The shared zero page's PFN (needs `pfns_visible`).
    pub zero_pfn: Option<u64>,
    /// The huge zero page's 512 PFNs, when THP mapped it for a read of the probe.
    pub huge_zero_pfns: Option<Range<u64>>,
    /// Whether PAGEMAP_SCAN flags the huge zero page PAGE_IS_PFNZERO (kernels before the 2025
    /// fix checked only the small zero page; then huge runs are checked by PFN, or kept when
    /// PFNs are hidden); `None` when no huge zero page was seen.
    pub scan_flags_huge_zero: Option<bool>,
    /// The zero PFNs were confirmed by `/proc/kpageflags` (KPF_ZERO_PAGE).
    pub kpageflags_confirmed: bool,
}

/// Answers "which pages may hold data" for ranges of this process's memory. Create one (it
/// probes the kernel once) and scan as often as needed.
#[derive(Debug)]
pub struct Detector {
    pagemap: Option<File>,
    facts: KernelFacts,
}

/// A range of this process's memory to scan, with the fd of the file behind it when the caller
/// has one (a [`HostMapping`]'s fd); other files are found through `/proc/self/map_files`.
#[derive(Clone, Copy, Debug)]
pub struct Region<'a> {
    addr: usize,
    len: usize,
    fd: Option<BorrowedFd<'a>>,
}

impl<'a> Region<'a> {
    /// The whole of a mapping.
    pub fn of(mapping: &'a HostMapping) -> Region<'a> {
        Region {
            addr: mapping.as_ptr() as usize,
            len: mapping.len(),
            // SAFETY: the fd is owned by the mapping, which outlives the borrow.
            fd: mapping.fd().map(|fd| unsafe { BorrowedFd::borrow_raw(fd) }),
        }
    }

    /// Any range: `addr` and `len` multiples of the host page size. Scanning never touches the
    /// memory, so any address is safe to ask about; an unmapped part is an error.
    pub fn new(addr: usize, len: usize, fd: Option<BorrowedFd<'a>>) -> Region<'a> {
        Region { addr, len, fd }
    }

    /// `len` bytes at `offset` into this region.
    pub fn sub(&self, offset: usize, len: usize) -> Option<Region<'a>> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then_some(Region {
            addr: self.addr + offset,
            len,
            fd: self.fd,
        })
    }

    pub fn addr(&self) -> usize {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for Detector {
    fn default() -> Self {
        Self::new()
    }
}

impl Detector {
    /// Opens `/proc/self/pagemap` and probes the kernel: PAGEMAP_SCAN, PFN visibility, the
    /// zero pages' PFNs. Never fails; what is missing shows in [`Detector::facts`] and in the
    /// outcomes of scans.
    pub fn new() -> Detector {
        match File::open("/proc/self/pagemap") {
            Ok(f) => {
                let facts = probe(&f);
                Detector {
                    pagemap: Some(f),
                    facts,
                }
            }
            Err(e) => Detector {
                pagemap: None,
                facts: KernelFacts {
                    pagemap_errno: Some(e.raw_os_error().unwrap_or(libc::EIO)),
                    pagemap_scan: false,
                    pfns_visible: false,
                    zero_pfn: None,
                    huge_zero_pfns: None,
                    scan_flags_huge_zero: None,
                    kpageflags_confirmed: false,
                },
            },
        }
    }

    pub fn facts(&self) -> &KernelFacts {
        &self.facts
    }

    /// The method [`Detector::scan`] uses when given none: PAGEMAP_SCAN where the kernel has
    /// it, else the pagemap read behind a mincore pre-filter (which itself falls back to the
    /// plain read while swap is active).
    pub fn best_method(&self) -> Method {
        if self.facts.pagemap_scan {
            Method::PagemapScan
        } else {
            Method::MincoreThenPagemapRead {
                entries: DEFAULT_READ_ENTRIES,
            }
        }
    }

    /// Scans a whole mapping with the best method.
    pub fn scan_mapping(&self, mapping: &HostMapping) -> Result<Outcome, Error> {
        self.scan(&Region::of(mapping), None)
    }

    /// Scans `region`. An unaligned or unmapped range is an error (the caller's); anything the
    /// kernel does not tell is [`Outcome::Unknown`].
    pub fn scan(&self, region: &Region<'_>, method: Option<Method>) -> Result<Outcome, Error> {
        let page = host_page_size();
        if !region.addr.is_multiple_of(page) || !region.len.is_multiple_of(page) {
            return Err(Error::invalid(format!(
                "populated-page scan of {:#x}+{:#x}: not aligned to the host page size",
                region.addr, region.len
            )));
        }
        let end = region.addr.checked_add(region.len).ok_or_else(|| {
            Error::invalid(format!(
                "populated-page scan of {:#x}+{:#x}: range wraps",
                region.addr, region.len
            ))
        })?;
        let method = method.unwrap_or_else(|| self.best_method());
        let unknown = |why| {
            Ok(Outcome::Unknown {
                why,
                range_len: region.len as u64,
            })
        };
        // A hugetlbfs answer is void when the file gained pages while it was scanned (a guest
        // faulting one in): a couple of fresh attempts, then no answer.
        for attempt in 1.. {
            match self.scan_once(region, end, method)? {
                Attempt::Done(o) => return Ok(o),
                Attempt::Changed(_) if attempt < 3 => continue,
                Attempt::Changed(why) | Attempt::Failed(why) => return unknown(why),
            }
        }
        unreachable!("the attempts loop returns")
    }

    fn scan_once(&self, region: &Region<'_>, end: usize, method: Method) -> Result<Attempt, Error> {
        let all = match all_vmas() {
            Ok(v) => v,
            Err(e) => {
                return Ok(Attempt::Failed(Why::NoMaps(
                    e.raw_os_error().unwrap_or(libc::EIO),
                )))
            }
        };
        let vmas: Vec<&Vma> = all
            .iter()
            .filter(|v| v.start < end && v.end > region.addr)
            .collect();
        let mut covered = region.addr;
        for v in &vmas {
            if v.start.max(region.addr) != covered {
                break;
            }
            covered = v.end.min(end);
        }
        if covered != end {
            return Err(Error::invalid(format!(
                "populated-page scan of {:#x}+{:#x}: {covered:#x} is not mapped",
                region.addr, region.len
            )));
        }
        let mut scan = ScanState {
            runs: Vec::new(),
            huge_files: Vec::new(),
            used: method,
        };
        for v in &vmas {
            let piece = v.start.max(region.addr)..v.end.min(end);
            if let Err(why) = self.scan_vma(region, v, piece, method, &mut scan) {
                return Ok(Attempt::Failed(why));
            }
        }
        for h in &scan.huge_files {
            // The file's pages mapped here outside the range count too.
            let mut mapped = h.mapped_bytes;
            for v in all.iter().filter(|v| (v.dev, v.inode) == h.identity) {
                for part in [v.start..v.end.min(region.addr), v.start.max(end)..v.end] {
                    if part.start < part.end {
                        match self.page_tables(part, method, true) {
                            Ok(t) => mapped += t.table.file_bytes(),
                            Err(why) => return Ok(Attempt::Failed(why)),
                        }
                    }
                }
            }
            let after = file_bytes_allocated(h.file.as_fd());
            let why = Why::HugetlbfsPagesElsewhere {
                file_bytes: after.unwrap_or(u64::MAX),
                mapped_bytes: mapped,
            };
            if h.before != after {
                return Ok(Attempt::Changed(why));
            }
            if after != Some(mapped) {
                return Ok(Attempt::Failed(why));
            }
        }
        let map = PopulatedMap::from_runs(
            region.len as u64,
            scan.runs.into_iter().map(|r: Range<usize>| {
                (r.start - region.addr) as u64..(r.end - region.addr) as u64
            }),
        );
        Ok(Attempt::Done(Outcome::Known {
            map,
            method: scan.used,
        }))
    }

    /// One VMA's part of the range: its populated runs as absolute addresses, into `scan`.
    fn scan_vma<'a>(
        &self,
        region: &Region<'a>,
        vma: &Vma,
        piece: Range<usize>,
        method: Method,
        scan: &mut ScanState<'a>,
    ) -> Result<(), Why> {
        if vma.inode == 0 {
            if vma.shared {
                // A shared mapping without a file to ask: its data may live off the page tables.
                return Err(Why::NoFile {
                    start: vma.start,
                    end: vma.end,
                    errno: libc::ENOENT,
                });
            }
            let t = self.page_tables(piece, method, false)?;
            scan.add(t.used, t.table.ranges());
            return Ok(());
        }
        let file = open_vma_file(region.fd, vma)?;
        if is_hugetlbfs(file.as_fd()) {
            let identity = (vma.dev, vma.inode);
            let before = file_bytes_allocated(file.as_fd());
            let t = self.page_tables(piece, method, true)?;
            let mapped = t.table.file_bytes();
            match scan.huge_files.iter_mut().find(|h| h.identity == identity) {
                Some(h) => h.mapped_bytes += mapped,
                None => scan.huge_files.push(HugeFile {
                    identity,
                    before,
                    mapped_bytes: mapped,
                    file,
                }),
            }
            scan.add(t.used, t.table.ranges());
            return Ok(());
        }
        let t = self.page_tables(piece.clone(), method, false)?;
        let file_start = vma.offset + (piece.start - vma.start) as u64;
        let data = seek_data_runs(file.as_fd(), file_start, (piece.end - piece.start) as u64)
            .map_err(|errno| Why::Seek {
                start: piece.start,
                errno,
            })?;
        let mut all = t.table.ranges();
        all.extend(
            data.into_iter()
                .map(|r| piece.start + r.start as usize..piece.start + r.end as usize),
        );
        all.sort_by_key(|r| r.start);
        scan.add(t.used, all);
        Ok(())
    }

    /// The page-table half: pages present (and not a zero page) or swapped in `range`, which
    /// lies inside one VMA. `file_bytes`: whether the runs must say which pages are file pages
    /// (hugetlbfs's check); PAGEMAP_SCAN is 5x slower per present page when asked.
    fn page_tables(
        &self,
        range: Range<usize>,
        method: Method,
        file_bytes: bool,
    ) -> Result<Tables, Why> {
        let Some(pagemap) = &self.pagemap else {
            return Err(Why::NoPagemap(
                self.facts.pagemap_errno.unwrap_or(libc::EIO),
            ));
        };
        let done = |table, used| Ok(Tables { table, used });
        match method {
            Method::PagemapScan => {
                if !self.facts.pagemap_scan {
                    return Err(Why::NoPagemapScan);
                }
                let mut t = scan_ioctl(pagemap, range, file_bytes)?;
                if self.facts.scan_flags_huge_zero == Some(false) {
                    if let Some(hz) = &self.facts.huge_zero_pfns {
                        t = drop_huge_zero(pagemap, t, hz)?;
                    }
                }
                done(t, method)
            }
            Method::PagemapRead { entries } => {
                let zero = self.zero_set()?;
                done(
                    read_entries_runs(pagemap, range, entries.max(1), &zero)?,
                    method,
                )
            }
            Method::MincoreThenPagemapRead { entries } => {
                let zero = self.zero_set()?;
                let entries = entries.max(1);
                let plain = Method::PagemapRead { entries };
                if swap_active() {
                    return done(read_entries_runs(pagemap, range, entries, &zero)?, plain);
                }
                let t = mincore_then_read(pagemap, range.clone(), entries, &zero)?;
                if swap_active() {
                    // Swap came up while mincore ran: its "not resident" may be stale.
                    return done(read_entries_runs(pagemap, range, entries, &zero)?, plain);
                }
                done(t, method)
            }
        }
    }

    fn zero_set(&self) -> Result<ZeroSet, Why> {
        if !self.facts.pfns_visible {
            return Err(Why::PfnsHidden);
        }
        Ok(ZeroSet {
            small: self.facts.zero_pfn,
            huge: self.facts.huge_zero_pfns.clone(),
        })
    }
}

/// Scans the SEEK_DATA runs of `fd` in `[file_start, file_start+len)`, relative to
/// `file_start`, rounded out to 4 KiB. Holes read as zeros; a filesystem without SEEK_DATA
/// reports everything as data. The fd's file offset moves. Err is the errno.
pub fn seek_data_runs(
    fd: BorrowedFd<'_>,
    file_start: u64,
    len: u64,
) -> Result<Vec<Range<u64>>, i32> {
    let end = file_start.saturating_add(len);
    let mut runs = Vec::new();
    let mut pos = file_start;
    while pos < end {
        let data = match lseek(fd.as_raw_fd(), pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(libc::ENXIO) => break,
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = match lseek(fd.as_raw_fd(), data, libc::SEEK_HOLE) {
            Ok(h) => h.min(end),
            // Truncated between the two calls: nothing more.
            Err(libc::ENXIO) => break,
            Err(e) => return Err(e),
        };
        if hole <= data {
            return Err(libc::EIO);
        }
        let start = (data - file_start) / TARGET_PAGE_SIZE * TARGET_PAGE_SIZE;
        let stop = (hole - file_start).next_multiple_of(TARGET_PAGE_SIZE);
        match runs.last_mut() {
            Some(Range { end: e, .. }) if *e >= start => *e = stop.max(*e),
            _ => runs.push(start..stop),
        }
        pos = hole;
    }
    Ok(runs)
}

/// Whether any swap area is active (`/proc/swaps` lists one). Unreadable counts as active.
pub fn swap_active() -> bool {
    match std::fs::read_to_string("/proc/swaps") {
        Ok(s) => s.lines().skip(1).any(|l| !l.trim().is_empty()),
        Err(_) => true,
    }
}

fn lseek(fd: RawFd, pos: u64, whence: libc::c_int) -> Result<u64, i32> {
    let pos = i64::try_from(pos).map_err(|_| libc::EOVERFLOW)?;
    // SAFETY: lseek on a descriptor has no memory-safety preconditions.
    let r = unsafe { libc::lseek(fd, pos, whence) };
    if r < 0 {
        Err(crate::hostmap::errno())
    } else {
        Ok(r as u64)
    }
}

/// Populated runs from the page tables, each marked file page (page cache, shmem included,
/// which hugetlbfs's check counts) and huge (THP or hugetlb, which the huge zero page check
/// looks at).
struct TableRuns {
    runs: Vec<TableRun>,
}

struct TableRun {
    range: Range<usize>,
    file: bool,
    huge: bool,
}

impl TableRuns {
    fn new() -> TableRuns {
        TableRuns { runs: Vec::new() }
    }

    fn push(&mut self, range: Range<usize>, file: bool, huge: bool) {
        if range.start >= range.end {
            return;
        }
        match self.runs.last_mut() {
            Some(last)
                if last.range.end == range.start && last.file == file && last.huge == huge =>
            {
                last.range.end = range.end
            }
            _ => self.runs.push(TableRun { range, file, huge }),
        }
    }

    fn file_bytes(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| r.file)
            .map(|r| (r.range.end - r.range.start) as u64)
            .sum()
    }

    fn ranges(self) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::with_capacity(self.runs.len());
        for r in self.runs {
            match out.last_mut() {
                Some(last) if last.end == r.range.start => last.end = r.range.end,
                _ => out.push(r.range),
            }
        }
        out
    }
}

/// PFNs that are a zero page.
struct ZeroSet {
    small: Option<u64>,
    huge: Option<Range<u64>>,
}

impl ZeroSet {
    fn contains(&self, pfn: u64) -> bool {
        self.small == Some(pfn) || self.huge.as_ref().is_some_and(|h| h.contains(&pfn))
    }
}

/// Whether a pagemap entry may hold data: swapped (or a migration entry or marker), or present
/// and not a zero page.
fn entry_populated(e: u64, zero: &ZeroSet) -> bool {
    e & PM_SWAP != 0 || (e & PM_PRESENT != 0 && !zero.contains(e & PM_PFN_MASK))
}

/// Which pages PAGEMAP_SCAN reports and which categories it returns.
struct ScanFilter {
    inverted: u64,
    mask: u64,
    anyof: u64,
    returned: u64,
}

/// Populated pages: present or swapped, and (inverted) not a zero page. PAGE_IS_FILE is
/// returned only when asked for (the kernel looks up each present page's folio for it).
fn populated_filter(file: bool) -> ScanFilter {
    ScanFilter {
        inverted: PAGE_IS_PFNZERO,
        mask: PAGE_IS_PFNZERO,
        anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        returned: PAGE_IS_PRESENT
            | PAGE_IS_SWAPPED
            | PAGE_IS_HUGE
            | if file { PAGE_IS_FILE } else { 0 },
    }
}

/// Runs PAGEMAP_SCAN over `range` until the walk reaches its end, handing each output region
/// to `each`. Err is the errno.
fn pagemap_scan(
    pagemap: &File,
    range: Range<usize>,
    filter: &ScanFilter,
    mut each: impl FnMut(&PageRegion),
) -> Result<(), i32> {
    let mut regions = vec![PageRegion::default(); SCAN_REGIONS];
    let end = range.end as u64;
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        start: range.start as u64,
        end,
        vec: regions.as_mut_ptr() as u64,
        vec_len: regions.len() as u64,
        category_inverted: filter.inverted,
        category_mask: filter.mask,
        category_anyof_mask: filter.anyof,
        return_mask: filter.returned,
        ..Default::default()
    };
    while arg.start < end {
        // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points at `regions`, `vec_len`
        // entries long, alive and unaliased for the call; the kernel writes only there and
        // into `arg`.
        let n = unsafe {
            libc::ioctl(
                pagemap.as_raw_fd(),
                PAGEMAP_SCAN as libc::Ioctl,
                &mut arg as *mut PmScanArg,
            )
        };
        if n < 0 {
            let e = crate::hostmap::errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        let n = (n as usize).min(regions.len());
        regions[..n].iter().for_each(&mut each);
        if arg.walk_end <= arg.start && n == 0 {
            // No progress: never loop forever on a kernel that misreports.
            return Err(libc::EIO);
        }
        arg.start = arg.walk_end;
    }
    Ok(())
}

fn scan_ioctl(pagemap: &File, range: Range<usize>, file: bool) -> Result<TableRuns, Why> {
    let mut out = TableRuns::new();
    pagemap_scan(pagemap, range, &populated_filter(file), |r| {
        out.push(
            r.start as usize..r.end as usize,
            r.categories & PAGE_IS_FILE != 0,
            r.categories & PAGE_IS_HUGE != 0,
        )
    })
    .map_err(|errno| Why::PageTables {
        what: "PAGEMAP_SCAN",
        errno,
    })?;
    Ok(out)
}

/// A private anonymous read-only mapping of three 2 MiB blocks, for the probe: reading it maps
/// the zero pages.
struct ProbeMap {
    base: *mut libc::c_void,
    len: usize,
}

impl ProbeMap {
    fn new() -> Option<ProbeMap> {
        let len = 3 * PMD_SIZE;
        // SAFETY: a fresh anonymous mapping that nothing else refers to.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        (base != libc::MAP_FAILED).then_some(ProbeMap { base, len })
    }

    /// Two 2 MiB-aligned blocks inside the mapping.
    fn blocks(&self) -> (usize, usize) {
        let a = (self.base as usize).next_multiple_of(PMD_SIZE);
        (a, a + PMD_SIZE)
    }

    fn advise(&self, addr: usize, advice: libc::c_int) {
        // SAFETY: madvise on part of our own mapping; advice only changes how it is backed.
        unsafe { libc::madvise(addr as *mut libc::c_void, PMD_SIZE, advice) };
    }

    fn read(&self, addr: usize) {
        // SAFETY: `addr` lies inside the mapping, which is readable.
        unsafe { std::ptr::read_volatile(addr as *const u8) };
    }
}

impl Drop for ProbeMap {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

fn kpageflags(kpf: &File, pfn: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    kpf.read_exact_at(&mut b, pfn * 8).ok()?;
    Some(u64::from_ne_bytes(b))
}

/// Reads fresh private memory (never written) and looks at what the kernel mapped.
fn probe(pagemap: &File) -> KernelFacts {
    let mut facts = KernelFacts {
        pagemap_errno: None,
        pagemap_scan: false,
        pfns_visible: false,
        zero_pfn: None,
        huge_zero_pfns: None,
        scan_flags_huge_zero: None,
        kpageflags_confirmed: false,
    };
    let Some(p) = ProbeMap::new() else {
        return facts;
    };
    let page = host_page_size();
    let (small, huge) = p.blocks();
    p.advise(small, libc::MADV_NOHUGEPAGE);
    p.advise(huge, libc::MADV_HUGEPAGE);
    let other = small + 17 * page;
    for a in [small, other, huge] {
        p.read(a);
    }
    let entry = |a| read_entry(pagemap, a).unwrap_or(0);
    let pfn = |e: u64| (e & PM_PRESENT != 0).then_some(e & PM_PFN_MASK);
    let kpf = File::open("/proc/kpageflags").ok();
    let flags = |pfn| kpf.as_ref().and_then(|k| kpageflags(k, pfn));

    let (e0, e1) = (entry(small), entry(other));
    facts.pfns_visible = pfn(e0).is_some_and(|p| p != 0);
    if facts.pfns_visible {
        // The zero page: the same PFN behind two untouched pages, mapped by nobody as their own
        // (a real page allocated by the read would be exclusive, and differ between pages).
        let z = e0 & PM_PFN_MASK;
        let looks = pfn(e1) == Some(z) && e0 & (PM_EXCLUSIVE | PM_SWAP) == 0;
        let kf = flags(z);
        if looks && kf.is_none_or(|f| f & KPF_ZERO_PAGE != 0) {
            facts.zero_pfn = Some(z);
            facts.kpageflags_confirmed = kf.is_some();
        }
        // The huge zero page: 512 consecutive PFNs from a 2 MiB-aligned one, behind a read of
        // an untouched THP-eligible block.
        let h = [
            entry(huge),
            entry(huge + page),
            entry(huge + PMD_SIZE - page),
        ]
        .map(pfn);
        if let [Some(h0), Some(h1), Some(hl)] = h {
            let looks = h0.is_multiple_of(HUGE_ZERO_PAGES)
                && h1 == h0 + 1
                && hl == h0 + HUGE_ZERO_PAGES - 1
                && Some(h0) != facts.zero_pfn
                && entry(huge) & PM_EXCLUSIVE == 0;
            let kf = flags(h0);
            if looks && kf.is_none_or(|f| f & (KPF_ZERO_PAGE | KPF_THP) == KPF_ZERO_PAGE | KPF_THP)
            {
                facts.huge_zero_pfns = Some(h0..h0 + HUGE_ZERO_PAGES);
                facts.kpageflags_confirmed &= kf.is_some();
            }
        }
    }
    // PAGEMAP_SCAN: does it work, and does it flag the huge zero page? The probe was never
    // written, so a huge region in it can only be the huge zero page.
    let everything = ScanFilter {
        inverted: 0,
        mask: 0,
        anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        returned: PAGE_IS_PRESENT | PAGE_IS_PFNZERO | PAGE_IS_HUGE,
    };
    let mut huge_cat = None;
    let r = pagemap_scan(pagemap, huge..huge + PMD_SIZE, &everything, |r| {
        if r.categories & PAGE_IS_HUGE != 0 {
            huge_cat = Some(r.categories);
        }
    });
    facts.pagemap_scan = r.is_ok();
    facts.scan_flags_huge_zero = huge_cat.map(|c| c & PAGE_IS_PFNZERO != 0);
    facts
}

/// For kernels whose PAGEMAP_SCAN does not flag the huge zero page: drops the 2 MiB blocks of
/// huge runs whose PFN is the huge zero page's (one pagemap entry per block).
fn drop_huge_zero(pagemap: &File, t: TableRuns, huge_zero: &Range<u64>) -> Result<TableRuns, Why> {
    let zero = ZeroSet {
        small: None,
        huge: Some(huge_zero.clone()),
    };
    let mut out = TableRuns::new();
    for r in t.runs {
        if !r.huge {
            out.push(r.range, r.file, r.huge);
            continue;
        }
        let mut at = r.range.start;
        while at < r.range.end {
            let next = (at + 1).next_multiple_of(PMD_SIZE).min(r.range.end);
            let e = read_entry(pagemap, at)?;
            if entry_populated(e, &zero) {
                out.push(at..next, r.file, true);
            }
            at = next;
        }
    }
    Ok(out)
}

fn read_entry(pagemap: &File, addr: usize) -> Result<u64, Why> {
    let mut b = [0u8; 8];
    let off = (addr / host_page_size()) as u64 * 8;
    pagemap
        .read_exact_at(&mut b, off)
        .map_err(|e| Why::PageTables {
            what: "reading /proc/self/pagemap",
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        })?;
    Ok(u64::from_ne_bytes(b))
}

/// The pagemap read method over `range` (one VMA): `entries` entries per read.
fn read_entries_runs(
    pagemap: &File,
    range: Range<usize>,
    entries: usize,
    zero: &ZeroSet,
) -> Result<TableRuns, Why> {
    let mut out = TableRuns::new();
    let mut buf = vec![0u8; entries * 8];
    read_entries_into(pagemap, range, &mut buf, zero, &mut out)?;
    Ok(out)
}

fn read_entries_into(
    pagemap: &File,
    range: Range<usize>,
    buf: &mut [u8],
    zero: &ZeroSet,
    out: &mut TableRuns,
) -> Result<(), Why> {
    let page = host_page_size();
    let mut at = range.start;
    while at < range.end {
        let want = ((range.end - at) / page).min(buf.len() / 8);
        let off = (at / page) as u64 * 8;
        let got = match pagemap.read_at(&mut buf[..want * 8], off) {
            Ok(0) => {
                return Err(Why::PageTables {
                    what: "reading /proc/self/pagemap: end of file",
                    errno: libc::EIO,
                })
            }
            Ok(n) => n / 8,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Why::PageTables {
                    what: "reading /proc/self/pagemap",
                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                })
            }
        };
        for (i, b) in buf[..got * 8].chunks_exact(8).enumerate() {
            let e = u64::from_ne_bytes(b.try_into().expect("8 bytes"));
            if entry_populated(e, zero) {
                let a = at + i * page;
                out.push(a..a + page, e & PM_FILE != 0, false);
            }
        }
        at += got * page;
    }
    Ok(())
}

/// mincore over `range` (one VMA), then pagemap entries for the resident runs only.
fn mincore_then_read(
    pagemap: &File,
    range: Range<usize>,
    entries: usize,
    zero: &ZeroSet,
) -> Result<TableRuns, Why> {
    let page = host_page_size();
    // 64 Ki pages (256 MiB of address at 4 KiB) per mincore call.
    let mut vec = vec![0u8; 1 << 16];
    let mut buf = vec![0u8; entries * 8];
    let mut out = TableRuns::new();
    let mut at = range.start;
    let mut retries = 0;
    while at < range.end {
        let pages = ((range.end - at) / page).min(vec.len());
        // SAFETY: mincore writes `pages` bytes into `vec`, which has room for them, and never
        // touches the memory asked about (an address no longer mapped gives ENOMEM).
        let r = unsafe { libc::mincore(at as *mut libc::c_void, pages * page, vec.as_mut_ptr()) };
        if r != 0 {
            let e = crate::hostmap::errno();
            if (e == libc::EAGAIN || e == libc::EINTR) && retries < 100 {
                retries += 1;
                continue;
            }
            return Err(Why::PageTables {
                what: "mincore",
                errno: e,
            });
        }
        let mut i = 0;
        while i < pages {
            if vec[i] & 1 == 0 {
                i += 1;
                continue;
            }
            let j = i + vec[i..pages].iter().take_while(|v| *v & 1 != 0).count();
            read_entries_into(
                pagemap,
                at + i * page..at + j * page,
                &mut buf,
                zero,
                &mut out,
            )?;
            i = j;
        }
        at += pages * page;
    }
    Ok(out)
}

/// One line of /proc/self/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Vma {
    start: usize,
    end: usize,
    shared: bool,
    offset: u64,
    dev: (u32, u32),
    inode: u64,
}

/// Parses `start-end perms offset major:minor inode [path]`.
fn parse_maps_line(line: &str) -> Option<Vma> {
    let mut f = line.split_ascii_whitespace();
    let (start, end) = f.next()?.split_once('-')?;
    let perms = f.next()?;
    let offset = u64::from_str_radix(f.next()?, 16).ok()?;
    let (major, minor) = f.next()?.split_once(':')?;
    let inode = f.next()?.parse().ok()?;
    Some(Vma {
        start: usize::from_str_radix(start, 16).ok()?,
        end: usize::from_str_radix(end, 16).ok()?,
        shared: perms.as_bytes().get(3) == Some(&b's'),
        offset,
        dev: (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode,
    })
}

/// This process's VMAs, in address order.
fn all_vmas() -> io::Result<Vec<Vma>> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    Ok(maps.lines().filter_map(parse_maps_line).collect())
}

/// The file behind a VMA: opened anew (its own file offset), or the caller's fd.
enum VmaFile<'a> {
    Owned(File),
    Borrowed(BorrowedFd<'a>),
}

impl VmaFile<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            VmaFile::Owned(f) => f.as_fd(),
            VmaFile::Borrowed(b) => *b,
        }
    }
}

/// What one attempt of a scan collects.
struct ScanState<'a> {
    runs: Vec<Range<usize>>,
    huge_files: Vec<HugeFile<'a>>,
    /// The method the page tables were read with (the mincore pre-filter falls back to the
    /// plain read while swap is active).
    used: Method,
}

impl ScanState<'_> {
    /// Adds a VMA's runs; a fallback method in any VMA is what the outcome reports.
    fn add(&mut self, used: Method, mut runs: Vec<Range<usize>>) {
        if matches!(used, Method::PagemapRead { .. }) {
            self.used = used;
        }
        self.runs.append(&mut runs);
    }
}

enum Attempt {
    Done(Outcome),
    /// A hugetlbfs file changed while scanned: worth another attempt.
    Changed(Why),
    Failed(Why),
}

/// Page-table runs and the method that read them.
struct Tables {
    table: TableRuns,
    used: Method,
}

/// A hugetlbfs file met in the range: its allocated bytes before the scan and the file pages
/// found mapped in the range.
struct HugeFile<'a> {
    identity: ((u32, u32), u64),
    before: Option<u64>,
    mapped_bytes: u64,
    file: VmaFile<'a>,
}

fn fstat(fd: BorrowedFd<'_>) -> Option<libc::stat> {
    // SAFETY: a zeroed stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open (borrowed); `st` is valid for writes.
    (unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == 0).then_some(st)
}

fn identity(fd: BorrowedFd<'_>) -> Option<((u32, u32), u64)> {
    let st = fstat(fd)?;
    Some(((libc::major(st.st_dev), libc::minor(st.st_dev)), st.st_ino))
}

/// Bytes of storage allocated to the file (st_blocks × 512): on hugetlbfs, its huge pages.
fn file_bytes_allocated(fd: BorrowedFd<'_>) -> Option<u64> {
    fstat(fd).map(|st| st.st_blocks as u64 * 512)
}

fn is_hugetlbfs(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: a zeroed statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open (borrowed); `st` is valid for writes.
    let ok = unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } == 0;
    ok && st.f_type == libc::HUGETLBFS_MAGIC as _
}

/// Opens the file a VMA maps: the caller's fd when it is that file (reopened through
/// /proc/self/fd so its file offset stays untouched), else /proc/self/map_files (needs
/// CAP_SYS_ADMIN).
fn open_vma_file<'a>(hint: Option<BorrowedFd<'a>>, vma: &Vma) -> Result<VmaFile<'a>, Why> {
    if let Some(fd) = hint {
        if identity(fd) == Some((vma.dev, vma.inode)) {
            if let Ok(f) = File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
                if identity(std::os::fd::AsFd::as_fd(&f)) == Some((vma.dev, vma.inode)) {
                    return Ok(VmaFile::Owned(f));
                }
            }
            // Not reopenable (permissions): SEEK_DATA on the caller's fd moves its offset,
            // which hostmem never uses.
            return Ok(VmaFile::Borrowed(fd));
        }
    }
    match File::open(format!(
        "/proc/self/map_files/{:x}-{:x}",
        vma.start, vma.end
    )) {
        Ok(f) => Ok(VmaFile::Owned(f)),
        Err(e) => Err(Why::NoFile {
            start: vma.start,
            end: vma.end,
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        }),
    }
}

#[cfg(test)]
// Runs are ranges: a list of one run is what is meant.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    const MIB: usize = 1 << 20;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A private anonymous read-write test mapping, unmapped on drop.
    struct Anon {
        addr: usize,
        len: usize,
    }

    impl Anon {
        fn new(len: usize, advice: libc::c_int) -> Anon {
            let m = crate::hostmap::map_anonymous("t", len as u64, false, true).unwrap();
            let addr = m.as_ptr() as usize;
            std::mem::forget(m);
            // SAFETY: advising our own fresh mapping.
            unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
            Anon { addr, len }
        }

        fn write(&self, off: usize, v: u8) {
            assert!(off < self.len);
            // SAFETY: inside our writable mapping.
            unsafe { ((self.addr + off) as *mut u8).write_volatile(v) };
        }

        fn read(&self, off: usize) -> u8 {
            assert!(off < self.len);
            // SAFETY: inside our readable mapping.
            unsafe { ((self.addr + off) as *const u8).read_volatile() }
        }

        fn region(&self) -> Region<'static> {
            Region::new(self.addr, self.len, None)
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: our own mapping, unmapped once.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }

    fn page(n: u64) -> Range<u64> {
        n * 4096..(n + 1) * 4096
    }

    #[test]
    fn runs_merge_round_out_and_clip() {
        let m = PopulatedMap::from_runs(
            10 * 4096,
            [
                8192..8193,
                0..4096,
                4096..5000,
                30000..50000,
                12 * 4096..13 * 4096,
            ],
        );
        assert_eq!(m.runs(), &[0..3 * 4096, 7 * 4096..10 * 4096]);
        assert_eq!((m.pages(), m.bytes()), (6, 6 * 4096));
        assert!(m.contains(0) && m.contains(3 * 4096 - 1) && !m.contains(3 * 4096));
        assert!(m.contains(9 * 4096) && !m.contains(10 * 4096));
        assert_eq!(
            m.page_offsets().collect::<Vec<_>>(),
            [0, 1, 2, 7, 8, 9].map(|p| p * 4096)
        );
        let u = m.union(&PopulatedMap::from_runs(10 * 4096, [page(3), page(5)]));
        assert_eq!(u.runs(), &[0..4 * 4096, page(5), 7 * 4096..10 * 4096]);
        assert_eq!(PopulatedMap::everything(8192).runs(), &[0..8192]);
        assert_eq!(PopulatedMap::everything(0).runs(), &[] as &[Range<u64>]);
    }

    #[test]
    fn unknown_means_everything() {
        let o = Outcome::Unknown {
            why: Why::PfnsHidden,
            range_len: 1 << 30,
        };
        assert!(!o.is_known() && o.map().is_none());
        assert_eq!(o.into_map().runs(), &[0..1 << 30]);
        assert_eq!(
            Why::PfnsHidden.to_string(),
            "pagemap hides page frame numbers (they need CAP_SYS_ADMIN), so the shared zero page cannot be told apart"
        );
    }

    #[test]
    fn maps_lines_parse() {
        let anon = parse_maps_line("7f0000000000-7f0000200000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(
            anon,
            Vma {
                start: 0x7f00_0000_0000,
                end: 0x7f00_0020_0000,
                shared: false,
                offset: 0,
                dev: (0, 0),
                inode: 0
            }
        );
        let shm = parse_maps_line(
            "7f1000000000-7f1000001000 rw-s 00003000 00:01 4242   /dev/zero (deleted)",
        )
        .unwrap();
        assert!(shm.shared);
        assert_eq!((shm.offset, shm.dev, shm.inode), (0x3000, (0, 1), 4242));
        let file = parse_maps_line("55d0-55e0 r--p 00001000 fd:01 123 /usr/bin/a b").unwrap();
        assert_eq!((file.dev, file.inode, file.shared), ((0xfd, 1), 123, false));
        assert!(parse_maps_line("garbage").is_none());
    }

    #[test]
    fn entries_are_populated_when_swapped_or_present_and_not_zero() {
        let zero = ZeroSet {
            small: Some(0x3b36),
            huge: Some(0x132400..0x132600),
        };
        assert!(!entry_populated(0, &zero));
        assert!(!entry_populated(PM_PRESENT | 0x3b36, &zero));
        assert!(!entry_populated(PM_PRESENT | PM_FILE | 0x1325ff, &zero));
        assert!(entry_populated(PM_PRESENT | 0x132600, &zero));
        assert!(entry_populated(PM_PRESENT | PM_EXCLUSIVE | 0x2ee4b3, &zero));
        assert!(entry_populated(PM_SWAP | 0x20, &zero));
        // Without PFNs every present page counts (the read method refuses this case).
        let none = ZeroSet {
            small: None,
            huge: None,
        };
        assert!(entry_populated(PM_PRESENT, &none));
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn pagemap_scan_ioctl_number_is_the_kernels() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }

    #[test]
    fn probe_finds_the_zero_pages() {
        let d = Detector::new();
        let f = d.facts();
        assert_eq!(f.pagemap_errno, None);
        assert!(f.pagemap_scan, "this kernel (6.7+) has PAGEMAP_SCAN: {f:?}");
        if !is_root() {
            assert!(!f.pfns_visible && f.zero_pfn.is_none());
            return;
        }
        assert!(f.pfns_visible, "{f:?}");
        assert!(f.zero_pfn.is_some() && f.kpageflags_confirmed, "{f:?}");
        if let Some(h) = &f.huge_zero_pfns {
            assert_eq!(h.end - h.start, 512);
            assert_eq!(h.start % 512, 0);
            assert!(f.scan_flags_huge_zero.is_some());
        }
    }

    #[test]
    fn every_method_agrees_on_a_small_mapping() {
        let d = Detector::new();
        let a = Anon::new(64 * MIB, libc::MADV_NOHUGEPAGE);
        for off in [0, 5 * 4096, 6 * 4096, 2 * MIB - 4096, 2 * MIB, 64 * MIB - 1] {
            a.write(off, 1);
        }
        for off in (0..64 * MIB).step_by(4096 * 3) {
            a.read(off);
        }
        let want = PopulatedMap::from_runs(
            64 << 20,
            [
                page(0),
                5 * 4096..7 * 4096,
                511 * 4096..513 * 4096,
                page(64 * 256 - 1),
            ],
        );
        let mut methods = vec![Method::PagemapScan];
        if is_root() {
            for entries in [1, 7, 512, DEFAULT_READ_ENTRIES] {
                methods.push(Method::PagemapRead { entries });
                methods.push(Method::MincoreThenPagemapRead { entries });
            }
        }
        for m in methods {
            let o = d.scan(&a.region(), Some(m)).unwrap();
            assert_eq!(o.map(), Some(&want), "{m:?}");
        }
    }

    #[test]
    fn without_pagemap_every_method_is_unknown() {
        let d = Detector {
            pagemap: None,
            facts: KernelFacts {
                pagemap_errno: Some(libc::EACCES),
                ..Detector::new().facts
            },
        };
        let a = Anon::new(4 * MIB, libc::MADV_NOHUGEPAGE);
        a.write(0, 1);
        for m in [
            Method::PagemapScan,
            Method::PagemapRead { entries: 64 },
            Method::MincoreThenPagemapRead { entries: 64 },
        ] {
            let o = d.scan(&a.region(), Some(m)).unwrap();
            assert_eq!(
                o,
                Outcome::Unknown {
                    why: Why::NoPagemap(libc::EACCES),
                    range_len: 4 * MIB as u64
                },
                "{m:?}"
            );
            assert_eq!(o.into_map().pages(), 1024);
        }
    }

    #[test]
    fn read_method_without_pfns_is_unknown() {
        let mut d = Detector::new();
        d.facts.pfns_visible = false;
        let a = Anon::new(4 * MIB, libc::MADV_NOHUGEPAGE);
        let o = d
            .scan(&a.region(), Some(Method::PagemapRead { entries: 64 }))
            .unwrap();
        assert_eq!(
            o,
            Outcome::Unknown {
                why: Why::PfnsHidden,
                range_len: 4 * MIB as u64
            }
        );
    }

    #[test]
    fn huge_zero_pages_are_dropped_by_pfn_when_the_scan_does_not_flag_them() {
        let d = Detector::new();
        let Some(hz) = d.facts().huge_zero_pfns.clone() else {
            eprintln!("SKIPPED: no huge zero page here (THP off or use_zero_page=0)");
            return;
        };
        let a = Anon::new(8 * MIB, libc::MADV_HUGEPAGE);
        a.read(0);
        a.read(2 * MIB);
        a.write(4 * MIB + 100, 1);
        // What an older kernel's PAGEMAP_SCAN gives: the huge zero page as plain huge pages.
        let mut t = TableRuns::new();
        let unflagged = ScanFilter {
            inverted: 0,
            mask: 0,
            anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            returned: PAGE_IS_PRESENT | PAGE_IS_PFNZERO | PAGE_IS_HUGE,
        };
        let pagemap = d.pagemap.as_ref().unwrap();
        pagemap_scan(pagemap, a.addr..a.addr + a.len, &unflagged, |r| {
            if r.categories & PAGE_IS_HUGE != 0 || r.categories & PAGE_IS_PFNZERO == 0 {
                t.push(r.start as usize..r.end as usize, false, true);
            }
        })
        .unwrap();
        let before: Vec<_> = t.runs.iter().map(|r| r.range.clone()).collect();
        assert!(
            before
                .iter()
                .any(|r| r.start == a.addr && r.end >= a.addr + 4 * MIB),
            "the two read blocks are huge zero pages: {before:x?}"
        );
        let kept = drop_huge_zero(pagemap, t, &hz).unwrap().ranges();
        let thp = kept.iter().any(|r| r.end - r.start == 2 * MIB);
        let want = if thp {
            a.addr + 4 * MIB..a.addr + 6 * MIB
        } else {
            a.addr + 4 * MIB..a.addr + 4 * MIB + 4096
        };
        assert_eq!(kept, vec![want]);
    }

    fn memfd(len: u64) -> OwnedFd {
        // SAFETY: a fresh memfd we own.
        let fd = unsafe { libc::memfd_create(c"populated-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
        fd
    }

    fn pwrite(fd: BorrowedFd<'_>, off: u64, b: u8) {
        // SAFETY: writing one byte from a local into our file.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), &b as *const u8 as *const _, 1, off as i64) };
        assert_eq!(n, 1);
    }

    #[test]
    fn seek_data_gives_the_files_runs_relative_to_the_start() {
        let fd = memfd(1 << 40);
        for off in [0u64, 3 * 4096 + 7, 4 * 4096, (1 << 40) - 1] {
            pwrite(fd.as_fd(), off, 1);
        }
        assert_eq!(
            seek_data_runs(fd.as_fd(), 0, 1 << 40).unwrap(),
            vec![page(0), 3 * 4096..5 * 4096, page((1 << 28) - 1)]
        );
        assert_eq!(
            seek_data_runs(fd.as_fd(), 2 * 4096, 3 * 4096).unwrap(),
            vec![4096..3 * 4096]
        );
        assert_eq!(seek_data_runs(fd.as_fd(), 1 << 41, 4096).unwrap(), vec![]);
        // A pipe cannot seek.
        let mut p = [0; 2];
        // SAFETY: pipe writes two fds into the array.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: fresh fds we own.
        let (r, _w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        assert_eq!(seek_data_runs(r.as_fd(), 0, 4096), Err(libc::ESPIPE));
    }

    #[test]
    fn unaligned_or_unmapped_ranges_are_refused() {
        let d = Detector::new();
        let a = Anon::new(4 * MIB, libc::MADV_NOHUGEPAGE);
        let e = d
            .scan(&Region::new(a.addr + 1, 4096, None), None)
            .unwrap_err();
        assert!(e.message().contains("not aligned"), "{e}");
        let e = d
            .scan(&Region::new(a.addr, a.len + 4096 * 1024, None), None)
            .unwrap_err();
        assert!(e.message().contains("is not mapped"), "{e}");
        assert!(a.region().sub(4 * MIB - 4096, 8192).is_none());
        let s = a.region().sub(MIB, 4096).unwrap();
        assert_eq!((s.addr(), s.len()), (a.addr + MIB, 4096));
    }
}
