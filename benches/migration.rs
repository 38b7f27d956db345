//! Migration throughput, hostmem next to QEMU 10 in the same run (timings on this VM move
//! between runs; ratios within one run do not):
//!
//! * a 4 GiB guest, half zero pages and half random ones: saved into `exec:cat > /dev/null`
//!   and loaded from a `file:` stream, by hostmem (a machine in this process) and by
//!   `qemu-system-x86_64 -M none -m 4G` (driven through its monitor; its load time is wall
//!   time to "completed" less its own start-up, measured alone);
//! * a sparse 9 TiB guest with 1 GiB written, saved with `x-skip-unpopulated` and loaded: the
//!   time and the stream's size; QEMU reads every page, so its cost per TiB of hole is
//!   measured on a 16 GiB sparse guest and scaled.
//!
//! Both sides run without a bandwidth limit (QEMU's default is 128 MiB/s). Run with
//! `cargo bench --bench migration` (or through `scripts/bench`); needs QEMU 10 (`scripts/install-qemu-peers`) and about
//! 10 GiB of free memory and 3 GiB of space in the temporary directory.

mod harness;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hostmem::registry::{self, hmp, transports::HostTransports, MachineId};
use hostmem::testing::machines::{main_ram, none_machine};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

fn machine(args: &[&str]) -> MachineId {
    none_machine(args).unwrap()
}

fn ram(id: MachineId) -> (*mut u8, u64) {
    main_ram(id).unwrap()
}

fn run(id: MachineId, line: &str) -> String {
    hmp::hmp(id, line, &HostTransports).unwrap_or_else(|e| panic!("{line}: {}", e.message()))
}

/// Waits for `info migrate` of `status` to say completed; returns its text.
fn wait_completed(mut info: impl FnMut() -> String) -> String {
    loop {
        let text = info();
        if text.contains("\nMigration status: completed") {
            return text;
        }
        assert!(
            !text.contains("\nMigration status: failed"),
            "the migration failed:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn field(info: &str, name: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no '{name}' in:\n{info}"))
}

/// xorshift64*: random pages that no compressor or zero test gets through.
fn fill_random(buf: &mut [u8], mut seed: u64) {
    for chunk in buf.chunks_exact_mut(8) {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        chunk.copy_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_ne_bytes());
    }
}

/// QEMU 10 with its monitor on stdio.
struct Qemu {
    child: Child,
    stdin: ChildStdin,
    out: mpsc::Receiver<String>,
    pending: String,
}

impl Qemu {
    fn start(args: &[&str]) -> Qemu {
        let mut child = Command::new("qemu-system-x86_64")
            .args(args)
            .args(["-nodefaults", "-display", "none", "-monitor", "stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 (scripts/install-qemu-peers installs QEMU 10)");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, out) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0
                    || tx
                        .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                        .is_err()
                {
                    break;
                }
            }
        });
        let mut q = Qemu {
            child,
            stdin,
            out,
            pending: String::new(),
        };
        q.until_prompt();
        q
    }

    fn until_prompt(&mut self) -> String {
        loop {
            if let Some(at) = self.pending.find("(qemu) ") {
                let text = self.pending[..at].to_string();
                self.pending.drain(..at + 7);
                // The echo of the command ends at the first newline.
                return text
                    .split_once('\n')
                    .map_or(String::new(), |(_, o)| o.to_string());
            }
            match self.out.recv_timeout(Duration::from_secs(600)) {
                Ok(chunk) => self.pending.push_str(&chunk),
                Err(_) => panic!("QEMU went quiet:\n{}", self.pending),
            }
        }
    }

    fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        self.until_prompt()
    }

    fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

struct Row {
    what: String,
    bytes: u64,
    hostmem: Duration,
    qemu: Option<Duration>,
}

fn gib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / GIB as f64 / d.as_secs_f64()
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hostmem-bench-mig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// QEMU's start-up to its first prompt, the part of an `-incoming` measurement that is not
/// loading: the best of three.
fn qemu_startup(args: &[&str]) -> Duration {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let q = Qemu::start(args);
            let d = t.elapsed();
            q.quit();
            d
        })
        .min()
        .unwrap()
}

/// QEMU loads `stream` into `args`' machine: wall time to "completed", less start-up.
fn qemu_load(args: &[&str], stream: &Path, startup: Duration) -> (Qemu, Duration) {
    let incoming = format!("file:{}", stream.display());
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-S", "-incoming", &incoming]);
    let t = Instant::now();
    let mut q = Qemu::start(&all);
    wait_completed(|| q.cmd("info migrate"));
    let d = t.elapsed().saturating_sub(startup);
    (q, d)
}

/// The dense guest's size: 4 GiB, 256 MiB in the short form.
fn dense_size() -> (u64, &'static str) {
    if harness::quick() {
        (256 * MIB, "256M")
    } else {
        (4 * GIB, "4G")
    }
}

fn dense(rows: &mut Vec<Row>, dir: &Path) {
    // First touches on this VM are slow or fast depending on what the host took back lately,
    // so each side is measured in turn, every round reported.
    let rounds = harness::rounds();
    let (size, m) = dense_size();
    let label = if harness::quick() { "256 MiB" } else { "4 GiB" };
    // hostmem: a machine filled half with zero pages, half with random ones (alternating
    // 2 MiB stretches), saved into a file: that stream is what both loaders read.
    let src = machine(&["-m", m]);
    let (p, len) = ram(src);
    assert_eq!(len, size);
    // SAFETY: the machine's whole RAM, alive until it is removed; nothing else touches it.
    let mem = unsafe { std::slice::from_raw_parts_mut(p, size as usize) };
    for (i, stretch) in mem.chunks_mut((2 * MIB) as usize).enumerate() {
        if i % 2 == 1 {
            fill_random(stretch, i as u64 + 1);
        }
    }
    run(src, "migrate_set_parameter max-bandwidth 100G");
    let stream = dir.join("dense.mig");
    run(src, &format!("migrate file:{}", stream.display()));
    registry::remove(src).unwrap();
    harness::fact(
        "migration",
        &format!("stream of the {label} guest (half zero pages)"),
        &format!("{:.3} GiB", file_len(&stream) as f64 / GIB as f64),
    );

    // Loads, in turn: hostmem into a fresh machine, QEMU into a fresh process.
    let args = ["-M", "none", "-m", m];
    let startup = qemu_startup(&args);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut loaded = None;
    let mut qemu = None;
    for _ in 0..rounds {
        if let Some(id) = loaded.take() {
            registry::remove(id).unwrap();
        }
        let dst = machine(&["-m", m, "-incoming", "defer"]);
        let t = Instant::now();
        run(dst, &format!("migrate_incoming file:{}", stream.display()));
        wait_completed(|| run(dst, "info migrate"));
        ours.push(t.elapsed());
        loaded = Some(dst);
        if let Some(q) = qemu.take() {
            Qemu::quit(q);
        }
        let (q, d) = qemu_load(&args, &stream, startup);
        theirs.push(d);
        qemu = Some(q);
    }
    let case = format!("load {label} into a fresh destination (file:)");
    harness::report("migration", &case, "hostmem", None, &ours);
    harness::report("migration", &case, "QEMU 10 plain", None, &theirs);
    rows.push(Row {
        what: case,
        bytes: size,
        hostmem: ours.iter().copied().min().unwrap(),
        qemu: theirs.iter().copied().min(),
    });

    // Saves of the loaded guests into the same sink, in turn (cont between them: a machine
    // that migrated stays paused and refuses to go again).
    let (id, mut q) = (loaded.unwrap(), qemu.unwrap());
    run(id, "migrate_set_parameter max-bandwidth 100G");
    q.cmd("migrate_set_parameter max-bandwidth 100G");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        run(id, "cont");
        run(id, "migrate -d \"exec:cat > /dev/null\"");
        let info = wait_completed(|| run(id, "info migrate"));
        ours.push(Duration::from_millis(field(&info, "total time: ")));
        q.cmd("cont");
        q.cmd("migrate -d \"exec:cat > /dev/null\"");
        let info = wait_completed(|| q.cmd("info migrate"));
        theirs.push(Duration::from_millis(field(&info, "total time: ")));
    }
    let case = format!("save {label} (exec:cat > /dev/null)");
    harness::report("migration", &case, "hostmem", None, &ours);
    harness::report("migration", &case, "QEMU 10 plain", None, &theirs);
    rows.push(Row {
        what: case,
        bytes: size,
        hostmem: ours.iter().copied().min().unwrap(),
        qemu: theirs.iter().copied().min(),
    });
    registry::remove(id).unwrap();
    q.quit();
    let _ = std::fs::remove_file(&stream);
}

/// The command line of a sparse `none` guest of `size` (a QEMU size).
fn sparse_args(size: &str, extra: &[&'static str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-object".into(),
        format!("memory-backend-ram,id=mem,size={size},reserve=off"),
        "-machine".into(),
        "memory-backend=mem".into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A sparse guest with 1 GiB written in 1 MiB runs spread over it, ready to migrate with
/// `x-skip-unpopulated` and no bandwidth limit.
fn sparse_guest(size: &str) -> MachineId {
    let args = sparse_args(size, &[]);
    let id = machine(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (p, len) = ram(id);
    let stride = (len / 1024) & !(2 * MIB - 1);
    for i in 0..1024u64 {
        // SAFETY: inside the machine's RAM; nothing else touches it meanwhile.
        let run =
            unsafe { std::slice::from_raw_parts_mut(p.add((i * stride) as usize), MIB as usize) };
        fill_random(run, i + 7);
    }
    run(id, "migrate_set_capability x-skip-unpopulated on");
    run(id, "migrate_set_parameter max-bandwidth 100G");
    id
}

fn sparse(rows: &mut Vec<Row>, dir: &Path) {
    let src = sparse_guest("9T");
    let stream = dir.join("sparse.mig");
    run(src, &format!("migrate -d file:{}", stream.display()));
    let info = wait_completed(|| run(src, "info migrate"));
    let save = Duration::from_millis(field(&info, "total time: "));
    let stream_len = file_len(&stream);
    registry::remove(src).unwrap();
    let dst_args = sparse_args("9T", &["-incoming", "defer"]);
    let dst = machine(&dst_args.iter().map(String::as_str).collect::<Vec<_>>());
    run(dst, "migrate_set_capability x-skip-unpopulated on");
    let t = Instant::now();
    run(dst, &format!("migrate_incoming file:{}", stream.display()));
    wait_completed(|| run(dst, "info migrate"));
    let load = t.elapsed();
    registry::remove(dst).unwrap();

    // QEMU on 16 GiB sparse with the same 1 GiB: it reads every page of the hole.
    let small = [
        "-object",
        "memory-backend-ram,id=mem,size=16G,reserve=off",
        "-M",
        "none,memory-backend=mem",
    ];
    let src = sparse_guest("16G");
    let size16 = ram(src).1;
    let stream16 = dir.join("sparse16.mig");
    run(src, &format!("migrate file:{}", stream16.display()));
    registry::remove(src).unwrap();
    let startup = qemu_startup(&small);
    let (mut q, _) = qemu_load(&small, &stream16, startup);
    q.cmd("migrate_set_parameter max-bandwidth 100G");
    let qstream = dir.join("sparse16-qemu.mig");
    q.cmd(&format!("migrate -d file:{}", qstream.display()));
    let info = wait_completed(|| q.cmd("info migrate"));
    let qemu16 = Duration::from_millis(field(&info, "total time: "));
    q.quit();
    let qemu_stream = file_len(&qstream);
    let per_tib = qemu16.as_secs_f64() * (TIB as f64 / size16 as f64);
    println!(
        "sparse 9 TiB, 1 GiB written: stream {:.3} GiB; QEMU's stream of the 16 GiB guest {:.3} \
         GiB; QEMU took {:.2} s for 16 GiB, {:.0} s per TiB, so ~{:.1} h for 9 TiB",
        stream_len as f64 / GIB as f64,
        qemu_stream as f64 / GIB as f64,
        qemu16.as_secs_f64(),
        per_tib,
        per_tib * 9.0 / 3600.0
    );
    harness::report(
        "migration",
        "save sparse 9 TiB, 1 GiB written (x-skip-unpopulated)",
        "hostmem",
        None,
        &[save],
    );
    harness::report(
        "migration",
        "save sparse 9 TiB, 1 GiB written (x-skip-unpopulated)",
        "QEMU 10 plain (16 GiB measured, scaled)",
        None,
        &[Duration::from_secs_f64(per_tib * 9.0)],
    );
    harness::report(
        "migration",
        "load sparse 9 TiB, 1 GiB written",
        "hostmem",
        None,
        &[load],
    );
    harness::fact(
        "migration",
        "stream of the sparse 9 TiB guest",
        &format!("{stream_len} bytes (QEMU's of 16 GiB sparse: {qemu_stream} bytes)"),
    );
    rows.push(Row {
        what: "save sparse 9 TiB, 1 GiB written (x-skip-unpopulated)".into(),
        bytes: GIB,
        hostmem: save,
        qemu: Some(Duration::from_secs_f64(per_tib * 9.0)),
    });
    rows.push(Row {
        what: "load sparse 9 TiB, 1 GiB written".into(),
        bytes: GIB,
        hostmem: load,
        qemu: None,
    });
    for f in [&stream, &stream16, &qstream] {
        let _ = std::fs::remove_file(f);
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = scratch();
    let mut rows = Vec::new();
    dense(&mut rows, &dir);
    // The sparse case's QEMU side reads 16 GiB: not for the short form.
    if !harness::quick() {
        sparse(&mut rows, &dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!();
    println!(
        "{:<56} {:>12} {:>12} {:>9}",
        "case", "hostmem", "QEMU 10", "ratio"
    );
    for r in &rows {
        let ours = format!(
            "{:.2} s {:.1}G/s",
            r.hostmem.as_secs_f64(),
            gib_per_s(r.bytes, r.hostmem)
        );
        let (theirs, ratio) = match r.qemu {
            Some(q) => (
                format!("{:.2} s", q.as_secs_f64()),
                format!("{:.2}x", q.as_secs_f64() / r.hostmem.as_secs_f64()),
            ),
            None => ("-".into(), "-".into()),
        };
        println!("{:<56} {:>16} {:>10} {:>9}", r.what, ours, theirs, ratio);
    }
    println!("ratio: QEMU's time over hostmem's (above 1: hostmem is faster)");
}
