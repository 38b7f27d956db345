//! Populated-page detection cost, every method in the same run (first-touch and host timings
//! vary between runs on this VM; ratios within one run do not): a 1 TiB private anonymous
//! range never touched, 1 GiB all written (4 KiB pages, then THP), 1 TiB with 1 GiB written in
//! runs, a range that was only read (the zero-page trap), and a 1 TiB memfd by SEEK_DATA. Prints the best of a few
//! rounds, costs per TiB of hole and per GiB populated, ratios to PAGEMAP_SCAN, and what an
//! 8 TiB guest with 1 GiB written would cost. Run with `cargo bench --bench populated`.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use hostmem::hostmap::{map_anonymous, HostMapping};
use hostmem::populated::{seek_data_runs, Detector, Method, Outcome, Region};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

fn madvise(m: &HostMapping, off: u64, len: u64, advice: libc::c_int) {
    // SAFETY: advice on part of our own mapping; none used here frees data.
    let r = unsafe {
        libc::madvise(
            m.as_ptr().add(off as usize) as *mut libc::c_void,
            len as usize,
            advice,
        )
    };
    assert_eq!(r, 0, "madvise {advice}");
}

fn best(rounds: usize, mut f: impl FnMut() -> u64) -> (Duration, u64) {
    let mut best = Duration::MAX;
    let mut pages = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        pages = f();
        best = best.min(t.elapsed());
    }
    (best, pages)
}

fn scan(d: &Detector, m: &HostMapping, method: Method) -> u64 {
    match d.scan(&Region::of(m), Some(method)).unwrap() {
        Outcome::Known { map, .. } => map.pages(),
        o => panic!("{method:?}: {o:?}"),
    }
}

fn name(m: Method) -> String {
    match m {
        Method::PagemapScan => "PAGEMAP_SCAN ioctl".into(),
        Method::PagemapRead { entries } => {
            format!("pagemap read, {} KiB reads", entries * 8 / 1024)
        }
        Method::MincoreThenPagemapRead { entries } => {
            format!("mincore, then pagemap read ({} KiB)", entries * 8 / 1024)
        }
    }
}

fn rounds(m: Method) -> usize {
    match m {
        Method::PagemapScan => 20,
        _ => 3,
    }
}

/// Times every method on `m`; returns (method, time, pages) rows.
fn run_all(d: &Detector, m: &HostMapping, methods: &[Method]) -> Vec<(Method, Duration, u64)> {
    methods
        .iter()
        .map(|&method| {
            let (t, pages) = best(rounds(method), || scan(d, m, method));
            (method, t, pages)
        })
        .collect()
}

fn print_rows(title: &str, rows: &[(Method, Duration, u64)], per: impl Fn(Duration) -> String) {
    println!("\n{title}");
    let base = rows[0].1.as_secs_f64();
    for (m, t, pages) in rows {
        println!(
            "  {:<40} {:>12.6} s  {:>14}  {:>10.1}x PAGEMAP_SCAN  ({pages} pages)",
            name(*m),
            t.as_secs_f64(),
            per(*t),
            t.as_secs_f64() / base
        );
    }
}

/// Populates `total` bytes of `m` in `cluster`-byte clusters spread evenly over the mapping.
fn populate_clusters(m: &HostMapping, total: u64, cluster: u64) {
    let n = total / cluster;
    let stride = m.len() as u64 / n;
    for i in 0..n {
        madvise(m, i * stride, cluster, libc::MADV_POPULATE_WRITE);
    }
}

fn main() {
    let d = Detector::new();
    println!("kernel facts: {:?}", d.facts());
    let mut methods = vec![Method::PagemapScan];
    if d.facts().pfns_visible {
        for entries in [512, 8192, 65536, 524288] {
            methods.push(Method::PagemapRead { entries });
        }
        methods.push(Method::MincoreThenPagemapRead { entries: 8192 });
    } else {
        println!("(not root: the pagemap read methods need PFNs and are left out)");
    }

    // 1. A 1 TiB private anonymous range, never touched.
    let hole = {
        let m = map_anonymous("bench", TIB, false, true).unwrap();
        madvise(&m, 0, TIB, libc::MADV_NOHUGEPAGE);
        let rows = run_all(&d, &m, &methods);
        print_rows("1 TiB private anonymous, unpopulated:", &rows, |t| {
            format!("{:.6} s/TiB", t.as_secs_f64())
        });
        rows
    };

    // 2. 1 GiB fully populated, 4 KiB pages and then THPs: the cost per GiB of data.
    let mut per_gib = Vec::new();
    for (advice, what) in [
        (libc::MADV_NOHUGEPAGE, "4 KiB pages"),
        (libc::MADV_HUGEPAGE, "THP"),
    ] {
        let m = map_anonymous("bench", GIB, false, true).unwrap();
        madvise(&m, 0, GIB, advice);
        madvise(&m, 0, GIB, libc::MADV_POPULATE_WRITE);
        let rows = run_all(&d, &m, &methods);
        print_rows(
            &format!("1 GiB private anonymous, all written ({what}):"),
            &rows,
            |t| format!("{:.6} s/GiB", t.as_secs_f64()),
        );
        per_gib.push(rows);
    }

    // 3. A sparse mix: 1 TiB with 1 GiB written in 1024 runs of 1 MiB, one per GiB.
    {
        let m = map_anonymous("bench", TIB, false, true).unwrap();
        madvise(&m, 0, TIB, libc::MADV_NOHUGEPAGE);
        populate_clusters(&m, GIB, MIB);
        let rows = run_all(&d, &m, &methods);
        print_rows(
            "1 TiB private anonymous, 1 GiB written in 1024 x 1 MiB (4 KiB pages):",
            &rows,
            |_| String::new(),
        );
    }

    // 4. The zero-page trap: 16 GiB only read (every page maps the zero page).
    {
        let m = map_anonymous("bench", 16 * GIB, false, true).unwrap();
        madvise(&m, 0, 16 * GIB, libc::MADV_NOHUGEPAGE);
        let t = Instant::now();
        madvise(&m, 0, 16 * GIB, libc::MADV_POPULATE_READ);
        println!(
            "\n(reading 16 GiB to map the zero page everywhere took {:.2} s)",
            t.elapsed().as_secs_f64()
        );
        let rows = run_all(&d, &m, &methods);
        print_rows(
            "16 GiB private anonymous, every page read, none written:",
            &rows,
            |t| format!("{:.3} s/TiB", t.as_secs_f64() * 64.0),
        );
    }

    // 5. A 1 TiB memfd: SEEK_DATA alone, and the whole scan (SEEK_DATA + page tables).
    {
        let mut b = hostmem::backend::Backend::new(
            "memory-backend-memfd",
            "bench",
            &hostmem::backend::BackendDefaults::default(),
        )
        .unwrap();
        b.set("size", "1T").unwrap();
        b.set("reserve", "off").unwrap();
        b.complete().unwrap();
        let m = b.mapping().unwrap();
        // SAFETY: the memfd's fd belongs to the mapping, alive for this block.
        let fd = unsafe { BorrowedFd::borrow_raw(m.fd().unwrap()) };
        let seek = || seek_data_runs(fd, 0, TIB).unwrap().len() as u64;
        let (empty, _) = best(20, seek);
        let (empty_scan, _) = best(20, || scan(&d, &m, Method::PagemapScan));
        populate_clusters(&m, GIB, MIB);
        let (full, runs) = best(20, seek);
        let (full_scan, pages) = best(20, || scan(&d, &m, Method::PagemapScan));
        println!("\n1 TiB memfd (memory-backend-memfd), SEEK_DATA:");
        println!(
            "  SEEK_DATA alone, unpopulated             {:>12.6} s/TiB",
            empty.as_secs_f64()
        );
        println!(
            "  SEEK_DATA alone, 1 GiB in 1024 runs      {:>12.6} s  ({runs} runs)",
            full.as_secs_f64()
        );
        println!(
            "  whole scan (SEEK_DATA + PAGEMAP_SCAN)    {:>12.6} s unpopulated, {:.6} s with 1 GiB ({pages} pages)",
            empty_scan.as_secs_f64(),
            full_scan.as_secs_f64()
        );
    }

    // 6. Measured: an 8 TiB guest with 1 GiB written in 1024 runs of 1 MiB (one per 8 GiB).
    {
        let m = map_anonymous("bench", 8 * TIB, false, true).unwrap();
        madvise(&m, 0, 8 * TIB, libc::MADV_NOHUGEPAGE);
        populate_clusters(&m, GIB, MIB);
        println!("\n8 TiB private anonymous, 1 GiB written in 1024 x 1 MiB, measured:");
        let mut base = 0.0;
        for &method in &methods {
            if matches!(method, Method::PagemapRead { entries } if entries != 8192) {
                continue;
            }
            let n = if method == Method::PagemapScan { 20 } else { 1 };
            let (t, pages) = best(n, || scan(&d, &m, method));
            if method == Method::PagemapScan {
                base = t.as_secs_f64();
            }
            println!(
                "  {:<40} {:>10.6} s  {:>10.1}x PAGEMAP_SCAN  ({pages} pages)",
                name(method),
                t.as_secs_f64(),
                t.as_secs_f64() / base
            );
        }
    }

    // What an 8 TiB guest with 1 GiB written costs: 8 x the hole, plus 1 GiB of data.
    println!("\n8 TiB private anonymous guest, 1 GiB written, projected (8 x hole + 1 GiB):");
    for (i, (m, h, _)) in hole.iter().enumerate() {
        let small = per_gib[0][i].1.as_secs_f64();
        let thp = per_gib[1][i].1.as_secs_f64();
        println!(
            "  {:<40} {:>8.3} s (4 KiB pages), {:>8.3} s (THP)",
            name(*m),
            8.0 * h.as_secs_f64() + small,
            8.0 * h.as_secs_f64() + thp
        );
    }
}
