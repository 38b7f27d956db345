//! Migration throughput: hostmem next to QEMU 10 and the machine's limits, every side of a case
//! in turn (the first side rotating each round), free page reporting waited for before each
//! run (timings on this VM move between runs; ratios within one run do not).
//!
//! * A guest half zero pages, half random (alternating 2 MiB stretches; 4 GiB, 256 MiB in the
//!   short form), every page populated on both sides (`-mem-prealloc`, so no side can skip a
//!   page it never touched). Saves to a sink that copies nothing (`fd:` on /dev/null, a
//!   descriptor of its own for every save), onto an existing file, over a unix socket whose reader discards, and to a new file:
//!   hostmem vs QEMU 10 plain precopy, QEMU 10 multifd (2 channels; for `file:` with
//!   mapped-ram, with and without direct-io) and the limits (one read pass testing every page
//!   for zero, on one core and split over every core; one memcpy of the non-zero bytes; a
//!   new-file write of them); to a new file also hostmem with direct-io on. Loads from a file
//!   into a preallocated and into a fresh destination, and over a unix socket fed by a writer
//!   replaying the recorded stream: hostmem vs QEMU plain (and multifd + mapped-ram for the
//!   fresh file load) and one memcpy. The saving QEMU and hostmem machine are each one
//!   process / machine across rounds (`cont` between saves); a load gets a new destination
//!   each run (its start-up is not timed).
//! * Sparse guests (`reserve=off`, 1 GiB written in 1 MiB runs; 64 GiB and 1 TiB, 2 GiB and
//!   16 GiB with 64 MiB written in the short form), saved with `x-skip-unpopulated` to a new
//!   file: hostmem vs writing the same bytes to a new file (plainly, and framed as a stream's
//!   page records: the floor of the format) and vs QEMU plain; the big guest
//!   against the small one. QEMU reads every page, so at 1 TiB its time is scaled from the
//!   small guest (measured there every round). No KVM: no slots are registered.
//!
//! Every side runs without a bandwidth limit (QEMU's default of 128 MiB/s applies to `file:`
//! too). Run through `scripts/bench` (or `cargo bench --bench migration`); needs QEMU 10
//! (`scripts/install-qemu-peers`), about 10 GiB of free memory and 8 GiB of space in the
//! temporary directory.

mod harness;

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hostmem::registry::{self, hmp, transports::HostTransports, MachineId};
use hostmem::testing::machines::{main_ram, none_machine};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const GROUP: &str = "migration";

fn machine(args: &[&str]) -> MachineId {
    none_machine(args).unwrap_or_else(|e| panic!("{args:?}: {}", e.message()))
}

fn ram(id: MachineId) -> (*mut u8, u64) {
    main_ram(id).unwrap()
}

fn run(id: MachineId, line: &str) -> String {
    hmp::hmp(id, line, &HostTransports).unwrap_or_else(|e| panic!("{line}: {}", e.message()))
}

/// Waits for `info migrate` to say completed; returns its text.
fn wait_completed(mut info: impl FnMut() -> String) -> String {
    loop {
        let text = info();
        if text.contains("\nMigration status: completed")
            || text.starts_with("Migration status: completed")
        {
            return text;
        }
        assert!(
            !text.contains("Migration status: failed"),
            "the migration failed:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(2));
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

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Reads `p` once so that loads find it in the page cache, whoever wrote it (direct-io
/// leaves nothing there).
fn warm_file(p: &Path) {
    let mut f = File::open(p).unwrap();
    let mut buf = vec![0u8; (8 * MIB) as usize];
    while f.read(&mut buf).unwrap() > 0 {}
}

/// QEMU 10 with its monitor on stdio.
struct Qemu {
    child: Child,
    stdin: ChildStdin,
    out: mpsc::Receiver<String>,
    pending: String,
    /// A second HMP monitor, on a unix socket: `getfd` takes descriptors from it.
    fd_monitor: (UnixStream, PathBuf),
    /// Descriptors handed over so far (their names).
    handed: u32,
}

impl Qemu {
    fn start(args: &[String]) -> Qemu {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let socket = std::env::temp_dir().join(format!(
            "hm-bench-qemu-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new("qemu-system-x86_64")
            .args(args)
            .args(["-nodefaults", "-display", "none", "-monitor", "stdio"])
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
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
            fd_monitor: (UnixStream::pair().unwrap().0, socket.clone()),
            handed: 0,
        };
        q.until_prompt();
        // The socket monitor exists once the stdio one answers.
        let mut fd_monitor = UnixStream::connect(&socket).unwrap();
        read_to_prompt(&mut fd_monitor);
        q.fd_monitor.0 = fd_monitor;
        q
    }

    /// Hands QEMU a new descriptor on /dev/null (`getfd` with the descriptor in the message's
    /// SCM_RIGHTS); returns its name for `fd:`.
    fn hand_null_fd(&mut self) -> String {
        use std::os::fd::AsRawFd;
        self.handed += 1;
        let name = format!("null{}", self.handed);
        let null = File::options().write(true).open("/dev/null").unwrap();
        let line = format!("getfd {name}\n");
        let fd = null.as_raw_fd();
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
        let mut control = vec![0u8; space];
        let mut iov = libc::iovec {
            iov_base: line.as_ptr() as *mut libc::c_void,
            iov_len: line.len(),
        };
        // SAFETY: an all-zero msghdr is a valid empty one; it then names only the locals
        // `iov` (over `line`) and `control`, which outlive the sendmsg; CMSG_FIRSTHDR of a
        // control buffer of CMSG_SPACE(4) bytes is a header with room for one descriptor.
        let sent = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut i32, fd);
            libc::sendmsg(self.fd_monitor.0.as_raw_fd(), &msg, 0)
        };
        assert_eq!(
            sent,
            line.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
        let answer = read_to_prompt(&mut self.fd_monitor.0);
        assert!(!answer.contains("Error"), "getfd: {answer}");
        name
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

    /// A command that answers nothing when it works (the setters).
    fn set(&mut self, line: &str) {
        let out = self.cmd(line);
        assert!(out.trim().is_empty(), "QEMU refused '{line}': {out}");
    }

    /// Sets capabilities and parameters for `mode`, undoing the other modes' (one process
    /// serves every mode in turn).
    fn mode(&mut self, mode: Mode) {
        self.set("migrate_set_parameter max-bandwidth 0");
        self.set("migrate_set_parameter direct-io off");
        self.set("migrate_set_capability mapped-ram off");
        self.set("migrate_set_capability multifd off");
        if mode != Mode::Plain {
            self.set("migrate_set_capability multifd on");
            self.set("migrate_set_parameter multifd-channels 2");
        }
        if matches!(mode, Mode::MappedRam | Mode::MappedRamDirect) {
            self.set("migrate_set_capability mapped-ram on");
        }
        if mode == Mode::MappedRamDirect {
            self.set("migrate_set_parameter direct-io on");
        }
    }

    /// One save in `mode` to `uri` (`fd:null`: the next descriptor on /dev/null): QEMU's own
    /// "total time".
    fn save(&mut self, mode: Mode, uri: &str) -> (Duration, String) {
        self.mode(mode);
        self.cmd("cont");
        if uri == NULL_URI {
            // A descriptor belongs to the monitor that took it: migrate from that one.
            let name = self.hand_null_fd();
            let line = format!("migrate -d fd:{name}\n");
            self.fd_monitor.0.write_all(line.as_bytes()).unwrap();
            let answer = read_to_prompt(&mut self.fd_monitor.0);
            assert!(!answer.contains("Error"), "QEMU refused '{line}': {answer}");
        } else {
            self.set(&format!("migrate -d {uri}"));
        }
        let info = wait_completed(|| self.cmd("info migrate"));
        (Duration::from_millis(field(&info, "total time: ")), info)
    }

    fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    /// A bench that panics leaves no QEMU behind (after `quit` this finds it gone).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.fd_monitor.1);
    }
}

/// Reads a socket monitor's output up to its next prompt.
fn read_to_prompt(s: &mut UnixStream) -> String {
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while !text.ends_with(b"(qemu) ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "QEMU's socket monitor closed");
        text.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// QEMU's migration modes measured here.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Plain,
    /// multifd, 2 channels (a socket per channel).
    Multifd,
    /// multifd, 2 channels, mapped-ram (`file:` only).
    MappedRam,
    /// the same with direct-io on (O_DIRECT channels).
    MappedRamDirect,
}

impl Mode {
    fn side(self) -> &'static str {
        match self {
            Mode::Plain => "QEMU 10 plain",
            Mode::Multifd => "QEMU 10 multifd 2",
            Mode::MappedRam => "QEMU 10 multifd 2 + mapped-ram",
            Mode::MappedRamDirect => "QEMU 10 multifd 2 + mapped-ram + direct-io",
        }
    }
}

/// Runs every side of `case` once per round, the first side rotating, the host's reporting of
/// freed memory waited for before each run; reports every side's times.
fn alternate<S>(case: &str, sides: &mut [(String, S)], run: impl FnMut(&mut S) -> Duration) {
    if !harness::selected(case) {
        return;
    }
    let times = alternate_times(case, sides, run);
    for ((name, _), t) in sides.iter().zip(&times) {
        harness::report(GROUP, case, name, None, t);
    }
}

/// [`alternate`]'s runs, every side's times returned (for cases that share runs).
fn alternate_times<S>(
    what: &str,
    sides: &mut [(String, S)],
    mut run: impl FnMut(&mut S) -> Duration,
) -> Vec<Vec<Duration>> {
    let rounds = harness::rounds();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); sides.len()];
    eprintln!("  migration: {what}");
    for r in 0..rounds {
        for k in 0..sides.len() {
            let i = (r + k) % sides.len();
            // The previous run's dirty page cache written back first: left dirty, it would
            // throttle this run's writes to the disk's pace (a bimodal case of whichever
            // side came after a big write).
            let _ = Command::new("sync").status();
            harness::wait_reported();
            times[i].push(run(&mut sides[i].1));
        }
    }
    times
}

/// The limits' memory: a random source and a destination of 256 MiB each, touched once, so a
/// limit measures the copy or the write and no first touch.
struct LimitBuffers {
    src: Vec<u8>,
    dst: Vec<u8>,
}

impl LimitBuffers {
    fn new() -> LimitBuffers {
        let n = if harness::quick() {
            32 * MIB
        } else {
            256 * MIB
        } as usize;
        let mut src = vec![0u8; n];
        fill_random(&mut src, 99);
        let mut dst = vec![1u8; n];
        dst[0] = 0;
        LimitBuffers { src, dst }
    }

    /// One memcpy of `bytes`, in 2 MiB pieces going round the buffers.
    fn memcpy(&mut self, bytes: u64) -> Duration {
        let piece = (2 * MIB) as usize;
        let n = self.src.len();
        let t = Instant::now();
        let mut done = 0u64;
        let mut at = 0usize;
        while done < bytes {
            self.dst[at..at + piece].copy_from_slice(&self.src[at..at + piece]);
            at = (at + piece) % n;
            done += piece as u64;
        }
        let d = t.elapsed();
        std::hint::black_box(&self.dst);
        d
    }

    /// Writes `bytes` to the new file `path` (removed first; no fsync, as QEMU does none).
    fn new_file_write(&self, path: &Path, bytes: u64) -> Duration {
        let _ = std::fs::remove_file(path);
        let piece = (8 * MIB) as usize;
        let t = Instant::now();
        let mut f = File::create(path).unwrap();
        let mut done = 0u64;
        let mut at = 0usize;
        while done < bytes {
            let len = piece.min((bytes - done) as usize);
            f.write_all(&self.src[at..at + len]).unwrap();
            at = (at + piece) % self.src.len();
            done += len as u64;
        }
        drop(f);
        t.elapsed()
    }

    /// Writes `bytes` of 4 KiB pages to the new file `path` as a precopy stream frames them:
    /// each page after its 8-byte record header, 512 records (1 024 pieces, the kernel's
    /// IOV_MAX) per `writev`. Against [`Self::new_file_write`] it is what the format itself
    /// costs: records that straddle page-cache pages and a piece per header.
    fn new_file_records(&self, path: &Path, bytes: u64) -> Duration {
        const PAGE: usize = 4096;
        const PER_CALL: usize = 512;
        let _ = std::fs::remove_file(path);
        let pages = (bytes as usize) / PAGE;
        let src_pages = self.src.len() / PAGE;
        // A page record's header: the page's offset with QEMU's PAGE | CONTINUE flags.
        let headers: Vec<[u8; 8]> = (0..pages)
            .map(|i| ((i * PAGE) as u64 | 0x28).to_be_bytes())
            .collect();
        let t = Instant::now();
        let mut f = File::create(path).unwrap();
        for first in (0..pages).step_by(PER_CALL) {
            let mut iov: Vec<IoSlice> = (first..pages.min(first + PER_CALL))
                .flat_map(|i| {
                    let at = (i % src_pages) * PAGE;
                    [
                        IoSlice::new(&headers[i]),
                        IoSlice::new(&self.src[at..at + PAGE]),
                    ]
                })
                .collect();
            let mut left = &mut iov[..];
            while !left.is_empty() {
                let n = f.write_vectored(left).unwrap();
                assert!(n > 0, "writev wrote nothing");
                IoSlice::advance_slices(&mut left, n);
            }
        }
        drop(f);
        t.elapsed()
    }
}

/// Reads the file at `path` front to back into one 1 MiB buffer (from the page cache: the
/// caller warmed it).
fn read_file_once(path: &Path) -> Duration {
    let mut buf = vec![0u8; MIB as usize];
    let t = Instant::now();
    let mut f = File::open(path).unwrap();
    while f.read(&mut buf).unwrap() > 0 {}
    let d = t.elapsed();
    std::hint::black_box(&buf);
    d
}

/// One read pass over `mem` testing every 4 KiB page for zero (the test a save must make).
fn zero_scan(mem: &[u8]) -> Duration {
    let t = Instant::now();
    std::hint::black_box(zero_pages(mem));
    t.elapsed()
}

fn zero_scan_all_cores(mem: &[u8]) -> Duration {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = (mem.len() / 4096).div_ceil(cores) * 4096;
    let t = Instant::now();
    let zero: usize = std::thread::scope(|s| {
        let parts: Vec<_> = mem
            .chunks(share)
            .map(|part| s.spawn(move || zero_pages(part)))
            .collect();
        parts.into_iter().map(|p| p.join().unwrap()).sum()
    });
    let d = t.elapsed();
    std::hint::black_box(zero);
    d
}

fn zero_pages(mem: &[u8]) -> usize {
    mem.chunks_exact(4096)
        .filter(|page| {
            // SAFETY: every bit pattern is a valid u64; align_to hands back the unaligned
            // ends apart (none here: guest RAM is page-aligned).
            let (_, words, _) = unsafe { page.align_to::<u64>() };
            words
                .chunks_exact(8)
                .all(|w| w.iter().fold(0, |a, b| a | b) == 0)
        })
        .count()
}

/// A unix socket whose reader discards everything, every connection on its own thread
/// (multifd opens one per channel).
fn discarding_socket(path: &Path) {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; MIB as usize];
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
}

/// Feeds the recorded `stream` into the destination listening at `socket` (connecting as soon
/// as it listens).
fn feed_socket(socket: PathBuf, stream: PathBuf) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut conn = loop {
            match UnixStream::connect(&socket) {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("{}: {e}", socket.display()),
            }
        };
        let mut f = File::open(&stream).unwrap();
        std::io::copy(&mut f, &mut conn).unwrap();
    })
}

/// A side of a save case.
enum Save {
    Hostmem,
    /// hostmem with `direct-io on` (whole pages by O_DIRECT, for every `file:` stream).
    HostmemDirect,
    Qemu(Mode),
    /// One read pass testing every page of the guest for zero.
    ZeroScan,
    /// The same pass split evenly over the host's cores: what the zero tests cost when every
    /// core does nothing else.
    ZeroScanAllCores,
    /// One memcpy of the guest's non-zero bytes.
    Memcpy,
    /// A new-file write of the guest's non-zero bytes.
    NewFileWrite,
}

/// Where a save goes.
#[derive(Clone, Copy)]
enum Sink {
    /// `fd:` on /dev/null.
    Null,
    ExistingFile,
    /// A unix socket whose reader discards.
    Unix,
    NewFile,
}

/// A side of a load case.
enum Load {
    Hostmem {
        prealloc: bool,
    },
    Qemu {
        mode: Mode,
        prealloc: bool,
    },
    /// One memcpy of the stream's non-zero bytes into memory already there.
    Memcpy,
    /// What any loader that read(2)s the stream pays: the file read once from the page cache
    /// into a 1 MiB buffer, then one memcpy of its non-zero bytes into memory already there.
    ReadThenMemcpy,
}

/// Stands for a sink that copies nothing: `fd:` on a new descriptor on /dev/null.
const NULL_URI: &str = "fd:null";

/// hostmem saves machine `id` to `uri`: its own "total time" (`cont` first: a machine that
/// migrated stays paused). `fd:` takes the descriptor over and closes it.
fn hostmem_save(id: MachineId, uri: &str) -> Duration {
    let uri = if uri == NULL_URI {
        let null = File::options().write(true).open("/dev/null").unwrap();
        format!("fd:{}", std::os::fd::IntoRawFd::into_raw_fd(null))
    } else {
        uri.to_string()
    };
    run(id, "cont");
    run(id, &format!("migrate -d {uri}"));
    let info = wait_completed(|| run(id, "info migrate"));
    Duration::from_millis(field(&info, "total time: "))
}

/// [`hostmem_save`] with `direct-io on` for this save only.
fn hostmem_save_direct_io(id: MachineId, uri: &str) -> Duration {
    run(id, "migrate_set_parameter direct-io on");
    let t = hostmem_save(id, uri);
    run(id, "migrate_set_parameter direct-io off");
    t
}

fn dense(dir: &Path, limits: &mut LimitBuffers) {
    let (size, m, label) = if harness::quick() {
        (256 * MIB, "256M", "256 MiB")
    } else {
        (4 * GIB, "4G", "4 GiB")
    };
    let nonzero = size / 2;
    // hostmem's source: every page populated, half of them random (alternating 2 MiB
    // stretches); its stream is what every plain loader reads.
    let src = machine(&["-m", m, "-mem-prealloc"]);
    let (p, len) = ram(src);
    assert_eq!(len, size);
    // SAFETY: the machine's whole RAM, mapped until the machine is removed at the end of this
    // function; nothing else touches it (the machine has no vCPU, and its saves only read).
    let mem = unsafe { std::slice::from_raw_parts_mut(p, size as usize) };
    for (i, stretch) in mem.chunks_mut((2 * MIB) as usize).enumerate() {
        if i % 2 == 1 {
            fill_random(stretch, i as u64 + 1);
        }
    }
    run(src, "migrate_set_parameter max-bandwidth 0");
    let stream = dir.join("dense.mig");
    run(src, &format!("migrate file:{}", stream.display()));
    harness::quantity(
        GROUP,
        &format!("stream of the {label} guest (half zero pages), hostmem"),
        file_len(&stream) as f64,
        "bytes",
    );
    // QEMU's source: the same pages (preallocated, then loaded from hostmem's stream), one
    // process for every save; its mapped-ram stream is what the multifd loader reads.
    let qemu_args: Vec<String> = ["-M", "none", "-m", m, "-mem-prealloc", "-incoming", "defer"]
        .map(String::from)
        .to_vec();
    let mut q = Qemu::start(&qemu_args);
    q.cmd(&format!("migrate_incoming file:{}", stream.display()));
    wait_completed(|| q.cmd("info migrate"));
    let mapped_stream = dir.join("dense-mapped-ram.mig");
    q.save(
        Mode::MappedRam,
        &format!("file:{}", mapped_stream.display()),
    );

    let existing = dir.join("existing.mig");
    let stream_len = file_len(&stream);
    let new = dir.join("new.mig");
    let socket = dir.join("discard.sock");
    discarding_socket(&socket);
    limits.new_file_write(&existing, nonzero);
    let zero_scan_side = "limit: one read pass testing every page for zero";
    let memcpy_side = "limit: one memcpy of the non-zero bytes";
    let cases = [
        (
            Sink::Null,
            format!("save to a sink that copies nothing, {label} (fd: on /dev/null)"),
            vec![
                Save::Qemu(Mode::Plain),
                Save::ZeroScan,
                Save::ZeroScanAllCores,
            ],
        ),
        (
            Sink::ExistingFile,
            format!("save onto an existing file, {label}"),
            vec![
                Save::Qemu(Mode::Plain),
                Save::Qemu(Mode::MappedRam),
                Save::Qemu(Mode::MappedRamDirect),
                Save::Memcpy,
            ],
        ),
        (
            Sink::Unix,
            format!("save over a unix socket, {label} (reader discards)"),
            vec![
                Save::Qemu(Mode::Plain),
                Save::Qemu(Mode::Multifd),
                Save::Memcpy,
            ],
        ),
        (
            Sink::NewFile,
            format!("save to a new file, {label}"),
            vec![
                Save::HostmemDirect,
                Save::Qemu(Mode::Plain),
                Save::Qemu(Mode::MappedRam),
                Save::Qemu(Mode::MappedRamDirect),
                Save::NewFileWrite,
            ],
        ),
    ];
    for (sink, case, others) in cases {
        let uri = match sink {
            Sink::Null => NULL_URI.to_string(),
            Sink::ExistingFile => format!("file:{}", existing.display()),
            Sink::Unix => format!("unix:{}", socket.display()),
            Sink::NewFile => format!("file:{}", new.display()),
        };
        let mut sides: Vec<(String, Save)> = vec![("hostmem".into(), Save::Hostmem)];
        for s in others {
            let name = match &s {
                Save::Qemu(mode) => mode.side().to_string(),
                Save::ZeroScan => zero_scan_side.into(),
                Save::ZeroScanAllCores => "limit: the same read pass split over every core".into(),
                Save::Memcpy => memcpy_side.into(),
                Save::NewFileWrite => "limit: new-file write of the non-zero bytes".into(),
                Save::HostmemDirect => "hostmem, direct-io on".into(),
                Save::Hostmem => unreachable!(),
            };
            sides.push((name, s));
        }
        alternate(&case, &mut sides, |side| {
            match sink {
                Sink::NewFile => {
                    let _ = std::fs::remove_file(&new);
                }
                // What a save onto this file found there before: a stream of the same
                // length, in the page cache whatever the side before wrote (a mapped-ram
                // file is twice as long; a direct-io writer leaves nothing cached). The sink
                // allocates nothing unless the saver drops the file's pages first.
                Sink::ExistingFile => {
                    File::options()
                        .write(true)
                        .open(&existing)
                        .and_then(|f| f.set_len(stream_len))
                        .unwrap();
                    warm_file(&existing);
                }
                _ => {}
            }
            match side {
                Save::Hostmem => hostmem_save(src, &uri),
                Save::HostmemDirect => hostmem_save_direct_io(src, &uri),
                Save::Qemu(mode) => q.save(*mode, &uri).0,
                Save::ZeroScan => zero_scan(mem),
                Save::ZeroScanAllCores => zero_scan_all_cores(mem),
                Save::Memcpy => limits.memcpy(nonzero),
                Save::NewFileWrite => limits.new_file_write(&new, nonzero),
            }
        });
    }
    q.quit();
    registry::remove(src).unwrap();
    for f in [&existing, &new, &socket] {
        let _ = std::fs::remove_file(f);
    }

    // Loads: a new destination every run, its start-up (and prealloc) not timed.
    warm_file(&stream);
    warm_file(&mapped_stream);
    let load_socket = dir.join("load.sock");
    let cases = [
        (
            false,
            format!("load from a file into a fresh destination, {label}"),
            vec![
                Load::Qemu {
                    mode: Mode::Plain,
                    prealloc: false,
                },
                Load::Qemu {
                    mode: Mode::MappedRam,
                    prealloc: false,
                },
            ],
        ),
        (
            false,
            format!("load from a file into a preallocated destination, {label}"),
            vec![
                Load::Qemu {
                    mode: Mode::Plain,
                    prealloc: true,
                },
                Load::Memcpy,
                Load::ReadThenMemcpy,
            ],
        ),
        (
            true,
            format!("load over a unix socket into a fresh destination, {label}"),
            vec![Load::Qemu {
                mode: Mode::Plain,
                prealloc: false,
            }],
        ),
    ];
    for (over_socket, case, others) in cases {
        let prealloc = case.contains("preallocated");
        let mut sides: Vec<(String, Load)> = vec![("hostmem".into(), Load::Hostmem { prealloc })];
        for s in others {
            let name = match &s {
                Load::Qemu { mode, .. } => mode.side().to_string(),
                Load::Memcpy => memcpy_side.into(),
                Load::ReadThenMemcpy => {
                    "limit: read(2) of the stream file, then one memcpy of the non-zero bytes"
                        .into()
                }
                Load::Hostmem { .. } => unreachable!(),
            };
            sides.push((name, s));
        }
        let incoming = |mode: Mode| {
            if over_socket {
                let _ = std::fs::remove_file(&load_socket);
                format!("unix:{}", load_socket.display())
            } else if mode == Mode::MappedRam {
                format!("file:{}", mapped_stream.display())
            } else {
                format!("file:{}", stream.display())
            }
        };
        let feed = || over_socket.then(|| feed_socket(load_socket.clone(), stream.clone()));
        alternate(&case, &mut sides, |side| match side {
            Load::Hostmem { prealloc } => {
                let mut args = vec!["-m", m];
                if *prealloc {
                    args.push("-mem-prealloc");
                }
                args.extend(["-incoming", "defer"]);
                let dst = machine(&args);
                let t = Instant::now();
                run(dst, &format!("migrate_incoming {}", incoming(Mode::Plain)));
                let feeder = feed();
                wait_completed(|| run(dst, "info migrate"));
                let d = t.elapsed();
                if let Some(f) = feeder {
                    f.join().unwrap();
                }
                registry::remove(dst).unwrap();
                d
            }
            Load::Qemu { mode, prealloc } => {
                let mut args: Vec<String> = ["-M", "none", "-m", m].map(String::from).to_vec();
                if *prealloc {
                    args.push("-mem-prealloc".into());
                }
                args.extend(["-incoming".into(), "defer".into()]);
                let mut q = Qemu::start(&args);
                q.mode(*mode);
                let t = Instant::now();
                q.cmd(&format!("migrate_incoming {}", incoming(*mode)));
                let feeder = feed();
                wait_completed(|| q.cmd("info migrate"));
                let d = t.elapsed();
                if let Some(f) = feeder {
                    f.join().unwrap();
                }
                q.quit();
                d
            }
            Load::Memcpy => limits.memcpy(nonzero),
            Load::ReadThenMemcpy => read_file_once(&stream) + limits.memcpy(nonzero),
        });
    }
    for f in [&stream, &mapped_stream, &load_socket] {
        let _ = std::fs::remove_file(f);
    }
}

/// The command line of a sparse `none` guest of `size` (a QEMU size).
fn sparse_args(size: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-object".into(),
        format!("memory-backend-ram,id=mem,size={size},reserve=off"),
        "-machine".into(),
        "memory-backend=mem".into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A sparse guest with `written` bytes written in 1 MiB runs spread over it, ready to migrate
/// with `x-skip-unpopulated` and no bandwidth limit.
fn sparse_guest(size: &str, written: u64) -> MachineId {
    let args = sparse_args(size, &[]);
    let id = machine(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (p, len) = ram(id);
    let runs = written / MIB;
    let stride = (len / runs) & !(2 * MIB - 1);
    for i in 0..runs {
        // SAFETY: inside the machine's RAM (i * stride + 1 MiB <= len); nothing else touches
        // it meanwhile (no vCPU, no migration running).
        let run =
            unsafe { std::slice::from_raw_parts_mut(p.add((i * stride) as usize), MIB as usize) };
        fill_random(run, i + 7);
    }
    run(id, "migrate_set_capability x-skip-unpopulated on");
    run(id, "migrate_set_parameter max-bandwidth 0");
    id
}

/// A side of the sparse saves.
enum SparseSave {
    HostmemSmall,
    HostmemBig,
    QemuSmall,
    /// Writing the guest's written bytes to a new file.
    Write,
    /// Writing them framed as a stream's page records.
    Records,
}

fn sparse(dir: &Path, limits: &mut LimitBuffers) {
    let (small, big, written, small_label, big_label, written_label, scale) = if harness::quick() {
        ("2G", "16G", 64 * MIB, "2 GiB", "16 GiB", "64 MiB", 8.0)
    } else {
        ("64G", "1T", GIB, "64 GiB", "1 TiB", "1 GiB", 16.0)
    };
    let small_id = sparse_guest(small, written);
    let big_id = sparse_guest(big, written);
    let small_stream = dir.join("sparse-small.mig");
    let big_stream = dir.join("sparse-big.mig");
    let qemu_stream = dir.join("sparse-qemu.mig");
    let limit_file = dir.join("sparse-limit.mig");
    // QEMU's guest: the small one, loaded once from hostmem's stream.
    run(
        small_id,
        &format!("migrate file:{}", small_stream.display()),
    );
    let args = sparse_args(small, &["-M", "none", "-incoming", "defer"]);
    let mut q = Qemu::start(&args);
    q.cmd(&format!("migrate_incoming file:{}", small_stream.display()));
    wait_completed(|| q.cmd("info migrate"));

    let write_side = format!("limit: write {written_label} to a new file");
    let records_side =
        format!("floor of the format: {written_label} as page records to a new file");
    let mut sides = vec![
        ("hostmem, small".to_string(), SparseSave::HostmemSmall),
        ("hostmem, big".to_string(), SparseSave::HostmemBig),
        ("QEMU, small".to_string(), SparseSave::QemuSmall),
        (write_side.clone(), SparseSave::Write),
        (records_side.clone(), SparseSave::Records),
    ];
    let mut qemu_info = String::new();
    let times = alternate_times("sparse saves", &mut sides, |side| match side {
        SparseSave::HostmemSmall => {
            let _ = std::fs::remove_file(&small_stream);
            hostmem_save(small_id, &format!("file:{}", small_stream.display()))
        }
        SparseSave::HostmemBig => {
            let _ = std::fs::remove_file(&big_stream);
            hostmem_save(big_id, &format!("file:{}", big_stream.display()))
        }
        SparseSave::QemuSmall => {
            let _ = std::fs::remove_file(&qemu_stream);
            let (d, info) = q.save(Mode::Plain, &format!("file:{}", qemu_stream.display()));
            qemu_info = info;
            d
        }
        SparseSave::Write => limits.new_file_write(&limit_file, written),
        SparseSave::Records => limits.new_file_records(&limit_file, written),
    });
    q.quit();
    let [host_small, host_big, qemu_small, write, records] = &times[..] else {
        unreachable!()
    };
    let small_case = format!("sparse save, {small_label}, {written_label} written (new file)");
    harness::report(GROUP, &small_case, "hostmem", None, host_small);
    harness::report(GROUP, &small_case, &write_side, None, write);
    harness::report(GROUP, &small_case, &records_side, None, records);
    harness::report(GROUP, &small_case, Mode::Plain.side(), None, qemu_small);
    let big_case = format!("sparse save, {big_label}, {written_label} written (new file)");
    harness::report(GROUP, &big_case, "hostmem", None, host_big);
    harness::report(
        GROUP,
        &big_case,
        &format!("{small_label} guest, hostmem"),
        None,
        host_small,
    );
    harness::report(GROUP, &big_case, &write_side, None, write);
    let scaled: Vec<Duration> = qemu_small.iter().map(|d| d.mul_f64(scale)).collect();
    harness::report(
        GROUP,
        &big_case,
        &format!("QEMU 10 plain, scaled from {small_label} (×{scale})"),
        None,
        &scaled,
    );
    harness::fact(
        GROUP,
        &format!("QEMU at {big_label}"),
        &format!(
            "not measured: QEMU tests every page of the guest, so its {big_label} time is its \
             {small_label} time of the same round × {scale}"
        ),
    );
    let prefix = format!("sparse {small_label}, {written_label} written");
    harness::quantity(
        GROUP,
        &format!("{prefix}: hostmem stream"),
        file_len(&small_stream) as f64,
        "bytes",
    );
    harness::quantity(
        GROUP,
        &format!("{prefix}: QEMU 10 stream"),
        file_len(&qemu_stream) as f64,
        "bytes",
    );
    harness::quantity(
        GROUP,
        &format!("{prefix}: QEMU 10 zero records"),
        field(&qemu_info, "duplicate: ") as f64,
        "records",
    );
    harness::quantity(
        GROUP,
        &format!("sparse {big_label}, {written_label} written: hostmem stream"),
        file_len(&big_stream) as f64,
        "bytes",
    );
    registry::remove(small_id).unwrap();
    registry::remove(big_id).unwrap();

    // The big guest's stream loaded into a fresh sparse destination.
    let mut sides = vec![("hostmem".to_string(), ())];
    alternate(
        &format!("sparse load, {big_label}, {written_label} written (file)"),
        &mut sides,
        |_| {
            let args = sparse_args(big, &["-incoming", "defer"]);
            let dst = machine(&args.iter().map(String::as_str).collect::<Vec<_>>());
            run(dst, "migrate_set_capability x-skip-unpopulated on");
            let t = Instant::now();
            run(
                dst,
                &format!("migrate_incoming file:{}", big_stream.display()),
            );
            wait_completed(|| run(dst, "info migrate"));
            let d = t.elapsed();
            registry::remove(dst).unwrap();
            d
        },
    );
    for f in [&small_stream, &big_stream, &qemu_stream, &limit_file] {
        let _ = std::fs::remove_file(f);
    }
}

/// The streams' directory, removed however the bench ends (its files are GiBs).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir =
        Scratch(std::env::temp_dir().join(format!("hostmem-bench-mig-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let mut limits = LimitBuffers::new();
    dense(&dir.0, &mut limits);
    if harness::selected("sparse") {
        sparse(&dir.0, &mut limits);
    }
}
