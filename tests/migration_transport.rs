//! The migration transports end to end: hostmem's channels carry the codec's streams between
//! threads of this process over every URI scheme; real QEMU 10 migrates into hostmem's
//! incoming channels and loads what hostmem's outgoing channels send (`tcp:`, `unix:`,
//! `exec:`, `file:`), QEMU 7.2 does both over `exec:`; QEMU 10 is asked, at test time, what it
//! says for bad URIs and failed connections, and hostmem must say the same; the rate limiter
//! and cancellation are timed; and a transfer crosses two network namespaces.
//!
//! Peers are found as tests/migration_stream.rs finds them: QEMU 10 is `qemu-system-x86_64`
//! on PATH (or `$HOSTMEM_QEMU10`), QEMU 7.2 is unpacked under `$HOSTMEM_PEERS_DIR/qemu72`
//! (default ~/.cache/hostmem-peers; `scripts/install-qemu-peers`). The namespace test needs
//! root and iproute2 (`scripts/netns`). Under CI=true a missing peer or a namespace that cannot
//! be made fails the test; elsewhere the test says why and returns.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use hostmem::migration::format::TARGET_PAGE_SIZE;
use hostmem::migration::ram::{is_zero_page, InPlace};
use hostmem::migration::rate::{RateLimit, RateLimited};
use hostmem::migration::transport::{
    Cancel, ChannelOptions, Incoming, IncomingChannel, IncomingUri, MigrationUri, OutgoingChannel,
    SocketAddress, TransportError,
};
use hostmem::migration::{
    load, load_file, save_mapped_ram_file, save_stream, BufferSection, LoadOptions, LoadSummary,
    LocalRamBlock, RamBlockInfo, RamLoadTarget, RamSource, SaveOptions, SectionHandler,
};
use hostmem::Error;

const M: usize = 1 << 20;
const PAGE: usize = TARGET_PAGE_SIZE;

// ---------------------------------------------------------------- peers and scratch files

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Qemu10,
    Qemu72,
}

fn under_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

fn peers_dir() -> PathBuf {
    std::env::var_os("HOSTMEM_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/hostmem-peers")
        })
}

/// The peer's command line, or `None` (after saying why) when the test should be skipped.
fn require(peer: Peer) -> Option<Vec<String>> {
    let found = match peer {
        Peer::Qemu10 => {
            let bin = std::env::var("HOSTMEM_QEMU10").unwrap_or("qemu-system-x86_64".into());
            Command::new(&bin)
                .arg("--version")
                .output()
                .ok()
                .filter(|o| String::from_utf8_lossy(&o.stdout).contains("version 10."))
                .map(|_| vec![bin])
        }
        Peer::Qemu72 => {
            let dir = peers_dir().join("qemu72");
            let bin = dir.join("usr/bin/qemu-system-x86_64");
            bin.exists().then(|| {
                vec![
                    bin.display().to_string(),
                    "-L".into(),
                    dir.join("usr/share/qemu").display().to_string(),
                    "-L".into(),
                    "/usr/share/seabios".into(),
                ]
            })
        }
    };
    match found {
        Some(c) => Some(c),
        None if under_ci() => {
            panic!("{peer:?} is required under CI=true: run scripts/install-qemu-peers")
        }
        None => {
            eprintln!("skipped: {peer:?} not found (run scripts/install-qemu-peers)");
            None
        }
    }
}

/// A fresh path in a directory of its own under this run's scratch directory; the path, its
/// directory and (once empty) the run's directory are removed on drop. Its own directory keeps
/// the run's directory from vanishing under a QEMU that is about to create a socket there.
struct Scratch(PathBuf);

fn scratch(name: &str) -> Scratch {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir()
        .join(format!("hm-transport-{}", std::process::id()))
        .join(n.to_string());
    // Another test may remove the run's directory between the two mkdirs: try again.
    for _ in 0..10 {
        if std::fs::create_dir_all(&dir).is_ok() {
            break;
        }
    }
    Scratch(dir.join(name))
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
        let own = self.0.parent().unwrap();
        let _ = std::fs::remove_dir(own);
        let _ = std::fs::remove_dir(own.parent().unwrap()); // only once empty
    }
}

fn mkfifo(name: &str) -> Scratch {
    let p = scratch(name);
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    p
}

/// Runs `f` on a thread and waits at most `secs` for it (a hung transfer fails the test
/// instead of hanging it).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs} s"),
    }
}

fn parse(uri: &str) -> MigrationUri {
    MigrationUri::parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"))
}

// ---------------------------------------------------------------- synthetic RAM

/// One RAMBlock `ram` (what `-M none -m 16M` has) over a Vec, as saver source and load target.
struct Ram {
    data: Vec<u8>,
    /// Offer pages in place (as a machine's RAM does), so channels send them with gathering
    /// writes; otherwise the saver copies each page.
    in_place: bool,
}

impl Ram {
    fn zeroed(len: usize) -> Ram {
        Ram {
            data: vec![0; len],
            in_place: true,
        }
    }

    /// Every third page zero, the others pseudo-random (so nothing compresses into a small
    /// stream and zero pages are still exercised).
    fn patterned(len: usize, seed: u64) -> Ram {
        let mut r = Ram::zeroed(len);
        let mut x = seed | 1;
        for (n, page) in r.data.chunks_mut(PAGE).enumerate() {
            if n % 3 == 0 {
                continue;
            }
            for w in page.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
            }
        }
        r
    }
}

impl RamSource for Ram {
    fn blocks(&self) -> Vec<RamBlockInfo> {
        vec![RamBlockInfo::new("ram", self.data.len() as u64)]
    }
    fn read_page(&self, _block: usize, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
    fn zero_test_in_place(
        &self,
        _block: usize,
        offset: u64,
        zero: &mut [bool],
    ) -> Option<Result<InPlace<'_>, Error>> {
        if !self.in_place {
            return None;
        }
        let run = &self.data[offset as usize..offset as usize + zero.len() * PAGE];
        for (z, page) in zero.iter_mut().zip(run.chunks(PAGE)) {
            *z = is_zero_page(page);
        }
        // SAFETY: `run` is borrowed from `self.data`, which nothing changes while the source
        // is borrowed.
        Some(Ok(unsafe { InPlace::new(run.as_ptr(), zero.len()) }))
    }
}

impl RamLoadTarget for Ram {
    fn find_block(&mut self, idstr: &str) -> Option<LocalRamBlock> {
        (idstr == "ram").then_some(LocalRamBlock {
            handle: 0,
            used_length: self.data.len() as u64,
            max_length: self.data.len() as u64,
            resizeable: false,
            migratable: true,
        })
    }
    fn resize_block(&mut self, _: usize, _: u64) -> Result<(), Error> {
        unreachable!("ram is not resizeable")
    }
    fn write_page(&mut self, _: usize, offset: u64, data: &[u8]) -> Result<(), Error> {
        let o = offset as usize;
        self.data[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn zero_page(&mut self, _: usize, offset: u64) -> Result<(), Error> {
        let o = offset as usize;
        self.data[o..o + PAGE].fill(0);
        Ok(())
    }
}

/// The device sections of QEMU 10's and 7.2's `-M none -nodefaults` stream (sizes from its
/// VMDESCRIPTION): `timer` v2 (24 bytes) and `globalstate` v1 (104 bytes).
fn none_devices() -> [BufferSection; 2] {
    [
        BufferSection::new("timer", 0, 2, vec![0; 24]),
        BufferSection::new("globalstate", 0, 1, vec![0; 104]),
    ]
}

fn load_none(input: impl Read, ram: &mut Ram) -> LoadSummary {
    let mut devs = none_devices();
    let [a, b] = &mut devs;
    let mut handlers: [&mut dyn SectionHandler; 2] = [a, b];
    load(input, &LoadOptions::new("none"), Some(ram), &mut handlers)
        .unwrap_or_else(|e| panic!("load failed: {:?}", e.qemu_lines()))
}

/// Saves `ram` over an outgoing channel to `uri` and ends the channel.
fn send(uri: &MigrationUri, ram: &Ram, cancel: &Cancel) -> Result<u64, TransportError> {
    let ch = OutgoingChannel::connect(uri, cancel)?;
    let (ch, summary) = save_stream(ch, SaveOptions::new("none"), ram, &mut []).map_err(|e| {
        TransportError::from_migration(&e)
            .map(|t| TransportError::Usage(t.to_string()))
            .unwrap_or(TransportError::Usage(e.to_string()))
    })?;
    assert_eq!(ch.transferred(), summary.bytes);
    ch.finish().map(|f| f.bytes)
}

/// Accepts on `inc` and loads a stream into a fresh 16 MiB `ram`.
fn receive(mut inc: Incoming, len: usize) -> (Ram, LoadSummary, IncomingChannel) {
    let mut ram = Ram::zeroed(len);
    let mut ch = inc.accept(&Cancel::new()).expect("accept");
    let s = load_none(&mut ch, &mut ram);
    (ram, s, ch)
}

/// hostmem to hostmem over `out_uri` into `inc`: every byte arrives, pages sent in place by
/// gathering writes.
fn round_trip(inc: Incoming, out_uri: MigrationUri) {
    round_trip_with(inc, out_uri, true);
}

fn round_trip_with(inc: Incoming, out_uri: MigrationUri, in_place: bool) {
    let mut ram = Ram::patterned(4 * M, 7);
    ram.in_place = in_place;
    let expect = ram.data.clone();
    let receiver = std::thread::spawn(move || receive(inc, 4 * M));
    let sent = within(30, "send", move || send(&out_uri, &ram, &Cancel::new()))
        .unwrap_or_else(|e| panic!("{e}"));
    let (got, summary, ch) = receiver.join().unwrap();
    assert!(got.data == expect, "RAM differs after the transfer");
    assert_eq!(summary.bytes, sent);
    assert_eq!(summary.ram.normal_pages, (4 * M / PAGE) as u64 * 2 / 3);
    ch.finish().unwrap();
}

// ---------------------------------------------------------------- hostmem <-> hostmem

#[test]
fn tcp_ipv4_carries_a_stream_byte_for_byte() {
    let inc = Incoming::open(&parse("tcp:127.0.0.1:0")).unwrap();
    let uri = inc.addresses()[0].connect_uri();
    round_trip(inc, uri);
}

#[test]
fn tcp_ipv6_and_hostnames_carry_a_stream() {
    let inc = Incoming::open(&parse("tcp:[::1]:0")).unwrap();
    assert_eq!(inc.addresses().len(), 1);
    let port = inc.addresses()[0].port().unwrap();
    assert_eq!(inc.addresses()[0].to_string(), format!("tcp:::1:{port}"));
    round_trip(inc, parse(&format!("tcp:[::1]:{port}")));

    let inc = Incoming::open(&parse("tcp:localhost:0")).unwrap();
    let port = inc.addresses()[0].port().unwrap();
    round_trip(inc, parse(&format!("tcp:localhost:{port}")));
}

#[test]
fn tcp_with_no_host_listens_dual_stack_on_every_address_as_qemu_does() {
    // QEMU 10 `-incoming tcp::0` lists [::]:P1 and 0.0.0.0:P2 (see the QEMU test below).
    let inc = Incoming::open(&parse("tcp::0")).unwrap();
    let hosts: Vec<String> = inc
        .addresses()
        .iter()
        .map(|a| match a {
            SocketAddress::Inet { host, .. } => host.clone(),
            a => panic!("{a}"),
        })
        .collect();
    assert_eq!(hosts, ["::", "0.0.0.0"]);
    // The :: listener is dual-stack: IPv4 clients reach it too.
    let port = inc.addresses()[0].port().unwrap();
    round_trip(inc, parse(&format!("tcp:127.0.0.1:{port}")));

    // tcp:0:PORT is 0.0.0.0 only.
    let inc = Incoming::open(&parse("tcp:0:0")).unwrap();
    assert_eq!(inc.addresses().len(), 1);
    assert!(inc.addresses()[0].to_string().starts_with("tcp:0.0.0.0:"));
    // A fixed port on `tcp::PORT`: 0.0.0.0 is bound first, then :: finds the IPv4 port taken
    // and binds IPv6 only, as in QEMU; both listen on PORT.
    let probe = Incoming::open(&parse("tcp:0:0")).unwrap();
    let port = probe.addresses()[0].port().unwrap();
    drop(probe);
    let inc = Incoming::open(&parse(&format!("tcp::{port}"))).unwrap();
    let ports: Vec<_> = inc.addresses().iter().map(|a| a.port().unwrap()).collect();
    assert_eq!(ports, [port, port], "{:?}", inc.addresses());
    round_trip(inc, parse(&format!("tcp:[::1]:{port}")));
}

#[test]
fn unix_carries_a_stream_and_the_socket_file_goes_with_the_listener() {
    let path = scratch("u.sock");
    std::fs::write(&*path, b"stale").unwrap(); // QEMU replaces whatever is there
    let inc = Incoming::open(&MigrationUri::Unix(path.to_path_buf())).unwrap();
    assert_eq!(inc.addresses(), [SocketAddress::Unix(path.to_path_buf())]);
    round_trip(inc, MigrationUri::Unix(path.to_path_buf()));
    assert!(!path.exists(), "the listener left its socket behind");
}

#[test]
fn exec_carries_a_stream_through_a_fifo() {
    let fifo = mkfifo("exec.fifo");
    let inc = Incoming::open(&parse(&format!("exec:cat {}", fifo.display()))).unwrap();
    round_trip(inc, parse(&format!("exec:cat > {}", fifo.display())));
}

#[test]
fn fd_carries_a_stream_over_a_socketpair_and_a_pipe() {
    let (a, b) = UnixStream::pair().unwrap();
    let inc = Incoming::open(&MigrationUri::Fd(b.into_raw_fd())).unwrap();
    round_trip(inc, MigrationUri::Fd(a.into_raw_fd()));

    let mut fds = [0; 2];
    // SAFETY: `fds` is a live array of two ints for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let inc = Incoming::open(&MigrationUri::Fd(fds[0])).unwrap();
    round_trip(inc, MigrationUri::Fd(fds[1]));
}

#[test]
fn pages_sent_in_place_and_copied_give_the_same_stream() {
    let streams: Vec<Vec<u8>> = [true, false]
        .into_iter()
        .map(|in_place| {
            let path = scratch(&format!("in-place-{in_place}.mig"));
            let mut ram = Ram::patterned(4 * M, 9);
            ram.in_place = in_place;
            let uri = MigrationUri::File {
                path: path.to_path_buf(),
                offset: 0,
            };
            send(&uri, &ram, &Cancel::new()).unwrap();
            std::fs::read(&*path).unwrap()
        })
        .collect();
    assert!(streams[0].len() > 2 * M);
    assert!(streams[0] == streams[1], "the streams differ");
    // The copying path still carries a stream over a pipe (the in-place one: above).
    let mut fds = [0; 2];
    // SAFETY: `fds` is a live array of two ints for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let inc = Incoming::open(&MigrationUri::Fd(fds[0])).unwrap();
    round_trip_with(inc, MigrationUri::Fd(fds[1]), false);
}

#[test]
fn fd_that_is_not_open_is_refused_and_a_regular_file_warns_as_qemu_does() {
    let e = OutgoingChannel::connect(&MigrationUri::Fd(987_654), &Cancel::new()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "file descriptor 987654 is not open: Bad file descriptor"
    );
    let f = scratch("fd.mig");
    let fd = std::fs::File::create(&*f).unwrap().into_raw_fd();
    let ch = OutgoingChannel::connect(&MigrationUri::Fd(fd), &Cancel::new()).unwrap();
    assert_eq!(
        ch.warnings(),
        ["warning: fd: migration to a file is deprecated. Use file: instead."]
    );
}

#[test]
fn file_with_offset_keeps_the_bytes_before_it_and_truncates_after_as_qemu_does() {
    let path = scratch("off.mig");
    std::fs::write(&*path, vec![0xffu8; 5 * M]).unwrap();
    let ram = Ram::patterned(4 * M, 11);
    let uri = parse(&format!("file:{},offset=1M", path.display()));
    let sent = send(&uri, &ram, &Cancel::new()).unwrap();
    let bytes = std::fs::read(&*path).unwrap();
    assert_eq!(
        bytes.len() as u64,
        M as u64 + sent,
        "not truncated to offset + stream"
    );
    assert!(
        bytes[..M].iter().all(|&b| b == 0xff),
        "the prefix was touched"
    );
    assert_eq!(&bytes[M..M + 4], b"QEVM");

    let mut got = Ram::zeroed(4 * M);
    let mut ch = Incoming::open(&uri)
        .unwrap()
        .accept(&Cancel::new())
        .unwrap();
    assert!(ch.is_seekable());
    let s = load_none(&mut ch, &mut got);
    assert_eq!(s.bytes, sent);
    assert!(got.data == ram.data);

    // A new file is created 0600, as QEMU creates it.
    let fresh = scratch("fresh.mig");
    send(
        &MigrationUri::File {
            path: fresh.to_path_buf(),
            offset: 0,
        },
        &ram,
        &Cancel::new(),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&*fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & !0o600, 0, "mode {mode:o}");
}

#[test]
fn a_file_saved_over_holds_what_a_new_file_would_with_no_old_byte_left() {
    // hostmem writes over an existing file and cuts it where the stream ends (QEMU cuts it at
    // the offset first): whatever the file held before, plain or mapped-ram, finished or
    // abandoned, the result is QEMU's file.
    let ram = Ram::patterned(3 * M, 17);
    for mapped in [false, true] {
        let fresh = scratch("fresh.mig");
        let fresh_uri = parse(&format!("file:{}", fresh.display()));
        save_direct(&fresh_uri, &ram, false, mapped);
        let want = std::fs::read(&*fresh).unwrap();
        for old_len in [want.len() * 3, want.len() / 2] {
            let over = scratch("over.mig");
            std::fs::write(&*over, vec![0xeeu8; old_len]).unwrap();
            let uri = parse(&format!("file:{}", over.display()));
            save_direct(&uri, &ram, false, mapped);
            let got = std::fs::read(&*over).unwrap();
            assert_eq!(
                got.len(),
                want.len(),
                "mapped {mapped}, old length {old_len}"
            );
            assert!(
                got == want,
                "mapped {mapped}, old length {old_len}: bytes differ"
            );
        }
    }

    // Written over, not cut first: while the stream is under way the old length stands.
    let over = scratch("under-way.mig");
    std::fs::write(&*over, vec![0xeeu8; 8 * M]).unwrap();
    let uri = parse(&format!("file:{},offset=4k", over.display()));
    let mut ch = OutgoingChannel::connect(&uri, &Cancel::new()).unwrap();
    ch.write_all(&[0x51; 3000]).unwrap();
    ch.flush().unwrap();
    assert_eq!(std::fs::metadata(&*over).unwrap().len(), 8 * M as u64);
    // Abandoned: what reached the file stays, nothing after it (buffered bytes never land).
    ch.write_all(&[0x52; 100]).unwrap();
    drop(ch);
    let got = std::fs::read(&*over).unwrap();
    assert_eq!(
        got.len(),
        4096 + 3000,
        "abandoned stream not cut where it ended"
    );
    assert!(
        got[..4096].iter().all(|&b| b == 0xee),
        "the bytes before the offset changed"
    );
    assert!(got[4096..].iter().all(|&b| b == 0x51));

    // Shorter than the offset: extended with zeros to it, as QEMU's cut extends it.
    let short = scratch("short.mig");
    std::fs::write(&*short, [0xeeu8; 100]).unwrap();
    let uri = parse(&format!("file:{},offset=8k", short.display()));
    let sent = send(&uri, &ram, &Cancel::new()).unwrap();
    let got = std::fs::read(&*short).unwrap();
    assert_eq!(got.len() as u64, 8192 + sent);
    assert!(got[..100].iter().all(|&b| b == 0xee));
    assert!(got[100..8192].iter().all(|&b| b == 0));
    assert_eq!(&got[8192..8196], b"QEVM");
}

#[test]
fn mapped_ram_goes_through_the_file_channels_and_is_refused_with_an_offset() {
    let path = scratch("mapped.mig");
    let ram = Ram::patterned(2 * M, 5);
    let uri = MigrationUri::File {
        path: path.to_path_buf(),
        offset: 0,
    };
    let ch = OutgoingChannel::connect(&uri, &Cancel::new()).unwrap();
    let (ch, _) = save_mapped_ram_file(ch, SaveOptions::new("none"), &ram, &mut []).unwrap();
    ch.finish().unwrap();
    let mut got = Ram::zeroed(2 * M);
    let ch = Incoming::open(&uri)
        .unwrap()
        .accept(&Cancel::new())
        .unwrap();
    let mut opts = LoadOptions::new("none");
    opts.mapped_ram = true;
    load_file(ch, &opts, Some(&mut got), &mut []).unwrap();
    assert!(got.data == ram.data);

    let uri = MigrationUri::File {
        path: path.to_path_buf(),
        offset: 4096,
    };
    let ch = OutgoingChannel::connect(&uri, &Cancel::new()).unwrap();
    let e = save_mapped_ram_file(ch, SaveOptions::new("none"), &ram, &mut []).unwrap_err();
    assert!(matches!(
        TransportError::from_migration(&e),
        Some(TransportError::MappedRamOffset { offset: 4096, .. })
    ));
}

// ---------------------------------------------------------------- direct-io

/// Saves `ram` into `uri` (a plain stream, or mapped-ram) with `direct-io` as given; returns
/// the bytes sent and, with direct-io, how many went through the O_DIRECT descriptor.
fn save_direct(uri: &MigrationUri, ram: &Ram, direct_io: bool, mapped: bool) -> (u64, u64) {
    let ch =
        OutgoingChannel::connect_with(uri, &Cancel::new(), &ChannelOptions { direct_io }).unwrap();
    let mut ch = if mapped {
        save_mapped_ram_file(ch, SaveOptions::new("none"), ram, &mut [])
            .unwrap()
            .0
    } else {
        save_stream(ch, SaveOptions::new("none"), ram, &mut [])
            .unwrap()
            .0
    };
    ch.flush().unwrap();
    let direct = ch.direct_stats().map_or(0, |s| s.direct_bytes);
    assert_eq!(ch.direct_stats().is_some(), direct_io);
    let sent = ch.transferred();
    assert_eq!(ch.finish().unwrap().bytes, sent);
    (sent, direct)
}

#[test]
fn direct_io_writes_the_same_file_as_the_page_cache_and_it_loads() {
    // 9 MiB: more than two staging buffers; offsets aligned, unaligned and none; mapped-ram
    // (seeks, holes for the zero pages) only without an offset, as the channel allows.
    let ram = Ram::patterned(9 * M, 11);
    let before: Vec<u8> = (0..(M + 4219)).map(|i| (i % 251) as u8).collect();
    for (offset, mapped) in [(0, false), (4219, false), (M as u64, false), (0, true)] {
        let [plain, direct] = ["plain.mig", "direct.mig"].map(scratch);
        let uri = |p: &Scratch| {
            std::fs::write(&**p, &before).unwrap();
            MigrationUri::File {
                path: p.to_path_buf(),
                offset,
            }
        };
        let (sent_plain, none) = save_direct(&uri(&plain), &ram, false, mapped);
        let (sent_direct, through_direct) = save_direct(&uri(&direct), &ram, true, mapped);
        assert_eq!(none, 0);
        assert_eq!(sent_direct, sent_plain, "offset {offset} mapped {mapped}");
        assert!(
            through_direct > 4 * M as u64,
            "only {through_direct} bytes went by O_DIRECT (offset {offset} mapped {mapped})"
        );
        let (a, b) = (
            std::fs::read(&*plain).unwrap(),
            std::fs::read(&*direct).unwrap(),
        );
        assert!(a == b, "offset {offset} mapped {mapped}: the files differ");

        let mut got = Ram::zeroed(9 * M);
        let ch = Incoming::open(&MigrationUri::File {
            path: direct.to_path_buf(),
            offset,
        })
        .unwrap()
        .accept(&Cancel::new())
        .unwrap();
        let mut opts = LoadOptions::new("none");
        opts.mapped_ram = mapped;
        load_file(ch, &opts, Some(&mut got), &mut []).unwrap();
        assert!(got.data == ram.data, "offset {offset} mapped {mapped}");
    }
}

#[test]
fn direct_io_is_ignored_by_the_other_schemes_as_qemu_ignores_it() {
    // QEMU 10 takes `direct-io on` and migrates over exec: (and sockets) as if it were off.
    let out = scratch("exec.mig");
    let uri = parse(&format!("exec:cat > {}", out.display()));
    let ram = Ram::patterned(2 * M, 12);
    let (sent, direct) = save_direct(&uri, &ram, false, false);
    let plain = std::fs::read(&*out).unwrap();
    let ch =
        OutgoingChannel::connect_with(&uri, &Cancel::new(), &ChannelOptions { direct_io: true })
            .unwrap();
    assert!(ch.direct_stats().is_none());
    let (ch, _) = save_stream(ch, SaveOptions::new("none"), &ram, &mut []).unwrap();
    assert_eq!(ch.finish().unwrap().bytes, sent);
    assert_eq!(direct, 0);
    assert!(std::fs::read(&*out).unwrap() == plain);
}

// ---------------------------------------------------------------- failures in QEMU's words

#[test]
fn refused_connections_and_missing_files_read_as_in_qemu() {
    let c = Cancel::new();
    let probe = Incoming::open(&parse("tcp:127.0.0.1:0")).unwrap();
    let port = probe.addresses()[0].port().unwrap();
    drop(probe);
    let e = OutgoingChannel::connect(&parse(&format!("tcp:127.0.0.1:{port}")), &c).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Failed to connect to '127.0.0.1:{port}': Connection refused")
    );
    assert_eq!(e.errno(), Some(libc::ECONNREFUSED));
    let e = OutgoingChannel::connect(&parse("unix:/nonexistent/s"), &c).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Failed to connect to '/nonexistent/s': No such file or directory"
    );
    let e = OutgoingChannel::connect(&parse("file:/nonexistent/dir/x"), &c).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Could not create '/nonexistent/dir/x': No such file or directory"
    );
    let e = Incoming::open(&parse("file:/nonexistent")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Could not open '/nonexistent': No such file or directory"
    );
    let e = Incoming::open(&parse("unix:/nonexistent/dir/s")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Failed to bind socket to /nonexistent/dir/s: No such file or directory"
    );
    let long = format!("unix:/tmp/{}", "x".repeat(120));
    let e = Incoming::open(&parse(&long)).unwrap_err();
    assert!(e.to_string().ends_with("' is too long"), "{e}");
    assert_eq!(e.hint().unwrap(), "Path must be less than 108 bytes\n");
    let e = OutgoingChannel::connect(&parse("tcp:127.0.0.1:abc"), &c).unwrap_err();
    assert_eq!(
        e.to_string(),
        "address resolution failed for 127.0.0.1:abc: Servname not supported for ai_socktype"
    );
}

#[test]
fn a_taken_port_reads_as_in_qemu() {
    let first = Incoming::open(&parse("tcp:127.0.0.1:0")).unwrap();
    let port = first.addresses()[0].port().unwrap();
    let e = Incoming::open(&parse(&format!("tcp:127.0.0.1:{port}"))).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Failed to find an available port: Address already in use"
    );
    // With to=, the next free port of the range is taken.
    let inc = Incoming::open(&parse(&format!("tcp:127.0.0.1:{port},to={}", port + 20))).unwrap();
    assert_ne!(inc.addresses()[0].port().unwrap(), port);
}

#[test]
fn a_failing_exec_command_is_reported_after_the_stream() {
    let ram = Ram::patterned(M, 3);
    let e = send(&parse("exec:cat > /dev/null; exit 3"), &ram, &Cancel::new()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "exec: cat > /dev/null; exit 3: Child process exited with code 3"
    );
    let TransportError::CommandFailed { status, bytes, .. } = e else {
        panic!()
    };
    assert_eq!(status.code(), Some(3));
    assert!(bytes > M as u64 / 2);
    // A command that does not exist: the shell says so on stderr and exits 127 before or
    // after the stream filled the pipe; either way the migration fails, in QEMU's words for
    // the write ("Unable to write to command: Broken pipe") or glib's for the status.
    let e = send(&parse("exec:hm-no-such-command-xyz"), &ram, &Cancel::new()).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("Unable to write to command: Broken pipe")
            || text.ends_with("Child process exited with code 127"),
        "{text}"
    );
    // An incoming command's status is only reported.
    let mut ch = Incoming::open(&parse("exec:printf QEVM; exit 4"))
        .unwrap()
        .accept(&Cancel::new())
        .unwrap();
    let mut s = String::new();
    ch.read_to_string(&mut s).unwrap();
    assert_eq!(s, "QEVM");
    assert_eq!(ch.finish().unwrap().exit_status.unwrap().code(), Some(4));
}

// ---------------------------------------------------------------- rate limiting and cancel

/// A unix socket whose other end is drained by a thread; returns the channel and the drain.
fn drained_unix(name: &str) -> (OutgoingChannel, std::thread::JoinHandle<u64>, Scratch) {
    let path = scratch(name);
    let mut inc = Incoming::open(&MigrationUri::Unix(path.to_path_buf())).unwrap();
    let drain = std::thread::spawn(move || {
        let mut ch = inc.accept(&Cancel::new()).unwrap();
        std::io::copy(&mut ch, &mut std::io::sink()).unwrap()
    });
    let ch =
        OutgoingChannel::connect(&MigrationUri::Unix(path.to_path_buf()), &Cancel::new()).unwrap();
    (ch, drain, path)
}

fn timed_limited_write(rate: u64, bytes: usize) -> Duration {
    let (ch, drain, _p) = drained_unix("rate.sock");
    let mut w = RateLimited::new(ch, RateLimit::new(rate));
    let chunk = vec![0x5au8; 4096];
    let t = Instant::now();
    for _ in 0..bytes / chunk.len() {
        w.write_all(&chunk).unwrap();
    }
    w.flush().unwrap();
    let dt = t.elapsed();
    assert_eq!(w.transferred(), bytes as u64);
    w.into_inner().finish().unwrap();
    assert_eq!(drain.join().unwrap(), bytes as u64);
    dt
}

#[test]
fn four_mib_at_eight_mib_per_second_take_half_a_second() {
    let dt = timed_limited_write(8 << 20, 4 << 20);
    eprintln!("4 MiB at 8 MiB/s: {:.3} s", dt.as_secs_f64());
    assert!(
        dt >= Duration::from_millis(350) && dt <= Duration::from_millis(1500),
        "{dt:?}"
    );
}

#[test]
fn the_rate_can_change_while_a_transfer_runs() {
    let (ch, drain, _p) = drained_unix("rate2.sock");
    let limit = RateLimit::new(1 << 20); // 4 MiB would take 4 s
    let mut w = RateLimited::new(ch, limit.clone());
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(250));
        limit.set(0); // unlimited, as migrate_set_parameter max-bandwidth 0
    });
    let t = Instant::now();
    w.write_all(&vec![1u8; 4 << 20]).unwrap();
    let dt = t.elapsed();
    setter.join().unwrap();
    w.into_inner().finish().unwrap();
    drain.join().unwrap();
    eprintln!(
        "4 MiB, 1 MiB/s then unlimited after 0.25 s: {:.3} s",
        dt.as_secs_f64()
    );
    assert!(
        dt >= Duration::from_millis(200) && dt < Duration::from_millis(1500),
        "{dt:?}"
    );
}

/// Precise numbers for the report (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn rate_limiter_accuracy_report() {
    for (rate, bytes) in [
        (1 << 20, 1 << 20),
        (8 << 20, 4 << 20),
        (32 << 20, 16 << 20),
        (100 << 20, 50 << 20),
    ] {
        let expect = bytes as f64 / rate as f64;
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(timed_limited_write(rate, bytes).as_secs_f64());
        }
        let mean = runs.iter().sum::<f64>() / runs.len() as f64;
        eprintln!(
            "rate {:>4} MiB/s, {:>3} MiB: expected {expect:.3} s, runs {runs:.3?}, mean {mean:.3} s, \
             achieved {:.2} MiB/s ({:+.1}%)",
            rate >> 20,
            bytes >> 20,
            bytes as f64 / mean / M as f64,
            (expect / mean - 1.0) * 100.0
        );
    }
    let t = timed_limited_write(0, 64 << 20);
    eprintln!("unlimited, 64 MiB: {:.3} s", t.as_secs_f64());
}

/// Cancels a writer blocked on a peer that never reads; the writer must see
/// [`TransportError::Cancelled`] within a second.
fn cancel_blocked_writer(
    mut write: impl FnMut(&Cancel) -> std::io::Result<()> + Send + 'static,
    what: &str,
) {
    let cancel = Cancel::new();
    let c = cancel.clone();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = write(&c);
        d.store(true, Ordering::SeqCst);
        let _ = tx.send(r);
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !done.load(Ordering::SeqCst),
        "{what}: the writer was not blocked"
    );
    let t = Instant::now();
    cancel.cancel();
    let r = rx
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_else(|_| panic!("{what}: still blocked 1 s after the cancel"));
    let e = r.expect_err("a cancelled write succeeded");
    let te = TransportError::from_io(&e).unwrap_or_else(|| panic!("{what}: {e}"));
    assert!(te.is_cancelled(), "{what}: {te}");
    assert_eq!(e.to_string(), "migration cancelled");
    eprintln!("{what}: cancelled after {:?}", t.elapsed());
}

fn write_forever(ch: &mut OutgoingChannel) -> std::io::Result<()> {
    let chunk = vec![0xa5u8; 1 << 20];
    loop {
        ch.write_all(&chunk)?;
    }
}

#[test]
fn cancel_unblocks_a_tcp_transfer_the_peer_never_reads() {
    let mut inc = Incoming::open(&parse("tcp:127.0.0.1:0")).unwrap();
    let uri = inc.addresses()[0].connect_uri();
    let peer = std::thread::spawn(move || {
        let mut ch = inc.accept(&Cancel::new()).unwrap();
        // Never reads; waits for the sender's shutdown to arrive as EOF or an error.
        std::thread::sleep(Duration::from_millis(600));
        let mut sink = Vec::new();
        let _ = ch.read_to_end(&mut sink);
    });
    cancel_blocked_writer(
        move |c| {
            let mut ch = OutgoingChannel::connect(&uri, c).unwrap();
            write_forever(&mut ch)
        },
        "tcp",
    );
    within(10, "the peer sees the shutdown", move || {
        peer.join().unwrap()
    });
}

#[test]
fn cancel_unblocks_a_codec_save_over_unix() {
    let path = scratch("c.sock");
    let mut inc = Incoming::open(&MigrationUri::Unix(path.to_path_buf())).unwrap();
    let held = std::thread::spawn(move || {
        let ch = inc.accept(&Cancel::new()).unwrap();
        std::thread::sleep(Duration::from_millis(700));
        drop(ch);
    });
    let uri = MigrationUri::Unix(path.to_path_buf());
    let ram = Arc::new(Ram::patterned(16 * M, 9));
    cancel_blocked_writer(
        move |c| {
            let ch = OutgoingChannel::connect(&uri, c).unwrap();
            match save_stream(ch, SaveOptions::new("none"), &*ram, &mut []) {
                Ok(_) => Ok(()),
                Err(hostmem::migration::MigrationError::Io(e)) => Err(e),
                Err(e) => panic!("{e}"),
            }
        },
        "codec over unix",
    );
    held.join().unwrap();
}

#[test]
fn cancel_unblocks_an_exec_command_that_never_reads_and_a_pipe() {
    cancel_blocked_writer(
        |c| {
            let mut ch = OutgoingChannel::connect(&parse("exec:exec sleep 30"), c).unwrap();
            let r = write_forever(&mut ch);
            let t = Instant::now();
            drop(ch); // terminates the command
            assert!(t.elapsed() < Duration::from_secs(1));
            r
        },
        "exec",
    );
    let mut fds = [0; 2];
    // SAFETY: `fds` is a live array of two ints for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 just made fds[0]; nothing else owns it.
    let reader = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    let w = fds[1];
    cancel_blocked_writer(
        move |c| {
            let mut ch = OutgoingChannel::connect(&MigrationUri::Fd(w), c).unwrap();
            write_forever(&mut ch)
        },
        "fd pipe",
    );
    drop(reader);
}

#[test]
fn cancel_unblocks_an_accept_and_a_connect_yet_to_start() {
    let mut inc = Incoming::open(&parse("tcp:127.0.0.1:0")).unwrap();
    let cancel = Cancel::new();
    let c = cancel.clone();
    let t = std::thread::spawn(move || inc.accept(&c).map(|_| ()));
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    cancel.cancel();
    let r = within(2, "accept", move || t.join().unwrap());
    assert!(matches!(r, Err(TransportError::Cancelled)), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(1));
    let e = OutgoingChannel::connect(&parse("tcp:127.0.0.1:1"), &cancel).unwrap_err();
    assert!(e.is_cancelled());
}

// ---------------------------------------------------------------- a little QMP

struct Qemu {
    child: Child,
    qmp_r: BufReader<UnixStream>,
    qmp_w: UnixStream,
    _sock: Scratch,
}

impl Qemu {
    /// Starts `cmd -M none -m 16M -nodefaults -display none -S ARGS` with QMP on a socket.
    fn start(cmd: &[String], args: &[&str], tag: &str) -> Qemu {
        let sock = scratch(&format!("{tag}.qmp"));
        let mut child = Command::new(&cmd[0])
            .args(&cmd[1..])
            .args([
                "-M",
                "none",
                "-m",
                "16M",
                "-nodefaults",
                "-display",
                "none",
                "-S",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start QEMU");
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            if let Ok(s) = UnixStream::connect(&*sock) {
                break s;
            }
            if let Some(st) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("{tag}: QEMU exited ({st}): {err}");
            }
            assert!(Instant::now() < deadline, "{tag}: no QMP socket");
            std::thread::sleep(Duration::from_millis(10));
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qemu {
            child,
            qmp_r: BufReader::new(s.try_clone().unwrap()),
            qmp_w: s,
            _sock: sock,
        };
        q.line();
        q.execute(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.qmp_r.read_line(&mut l).expect("QMP read");
        assert!(!l.is_empty(), "QEMU closed QMP");
        l
    }

    /// One command's reply line (events skipped).
    fn execute(&mut self, json: &str) -> String {
        writeln!(self.qmp_w, "{json}").unwrap();
        loop {
            let l = self.line();
            if !l.starts_with("{\"event\"") {
                return l;
            }
        }
    }

    fn hmp(&mut self, command: &str) -> String {
        let r = self.execute(&format!(
            r#"{{"execute":"human-monitor-command","arguments":{{"command-line":{}}}}}"#,
            json_quote(command)
        ));
        json_strings(&r, "return").pop().unwrap_or_default()
    }

    fn migrate(&mut self, uri: &str) {
        if let Some(e) = self.try_migrate(uri) {
            panic!("migrate {uri}: {e}");
        }
    }

    /// `migrate`; the error QMP answers with, if it fails at once.
    fn try_migrate(&mut self, uri: &str) -> Option<String> {
        let r = self.execute(&format!(
            r#"{{"execute":"migrate","arguments":{{"uri":{}}}}}"#,
            json_quote(uri)
        ));
        json_strings(&r, "desc").pop()
    }

    /// (status, error-desc) once the migration is over, or what it is after `secs`.
    fn wait_migration(&mut self, secs: u64) -> (String, Option<String>) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let r = self.execute(r#"{"execute":"query-migrate"}"#);
            let status = json_strings(&r, "status").pop().unwrap_or_default();
            if ["completed", "failed", "cancelled"].contains(&status.as_str())
                || Instant::now() > deadline
            {
                return (status, json_strings(&r, "error-desc").pop());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn query_migrate(&mut self) -> String {
        self.execute(r#"{"execute":"query-migrate"}"#)
    }

    fn pmemsave(&mut self, addr: u64, size: usize) -> Vec<u8> {
        let f = scratch("pmem");
        let r = self.execute(&format!(
            r#"{{"execute":"pmemsave","arguments":{{"val":{addr},"size":{size},"filename":"{}"}}}}"#,
            f.display()
        ));
        assert!(r.contains("\"return\""), "{r}");
        std::fs::read(&*f).unwrap()
    }

    /// Quits; what QEMU printed on stderr, without the program name.
    fn quit(mut self) -> Vec<String> {
        let _ = writeln!(self.qmp_w, r#"{{"execute":"quit"}}"#);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("QEMU did not quit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        qemu_lines(&err)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn qemu_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .map(|l| {
            l.strip_prefix("qemu-system-x86_64: ")
                .unwrap_or(l)
                .to_string()
        })
        .collect()
}

fn json_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Every string value of `"key": "..."` in a JSON line, unescaped.
fn json_strings(json: &str, key: &str) -> Vec<String> {
    let pat = format!("\"{key}\": \"");
    let mut out = Vec::new();
    let mut rest = json;
    while let Some(i) = rest.find(&pat) {
        rest = &rest[i + pat.len()..];
        let mut s = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => s.push('\n'),
                    Some('r') => {}
                    Some('t') => s.push('\t'),
                    Some('u') => {
                        let hex: String = chars.by_ref().take(4).collect();
                        s.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                    }
                    Some(o) => s.push(o),
                    None => break,
                },
                c => s.push(c),
            }
        }
        out.push(s);
    }
    out
}

/// `-incoming ARG` on a QEMU that fails at once: its message, after "-incoming ARG: ".
fn qemu_incoming_error(cmd: &[String], arg: &str) -> String {
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .args([
            "-M",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-incoming",
            arg,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "-incoming {arg}: QEMU started");
    let err = String::from_utf8_lossy(&out.stderr);
    let line = qemu_lines(&err).into_iter().next().unwrap_or_default();
    line.strip_prefix(&format!("-incoming {arg}: "))
        .unwrap_or(&line)
        .to_string()
}

/// A 1 MiB pattern QEMU loads at 1 MiB with `-device loader` (the rest of its RAM is zero).
fn qemu_pattern() -> (Scratch, Vec<u8>) {
    let blob = Ram::patterned(M, 0x1234).data;
    let f = scratch("pattern.bin");
    std::fs::write(&*f, &blob).unwrap();
    (f, blob)
}

fn loader_arg(f: &Path) -> String {
    format!("loader,file={},addr=0x100000,force-raw=on", f.display())
}

fn assert_holds_pattern(ram: &Ram, blob: &[u8]) {
    assert!(ram.data[M..2 * M] == *blob, "the pattern did not arrive");
    assert!(ram.data[..M].iter().all(|&b| b == 0));
    assert!(ram.data[2 * M..].iter().all(|&b| b == 0));
}

// ---------------------------------------------------------------- QEMU 10's words, live

#[test]
fn bad_uris_get_the_messages_qemu10_gives_them() {
    let Some(cmd) = require(Peer::Qemu10) else {
        return;
    };
    let mut q = Qemu::start(&cmd, &[], "words");
    for uri in [
        "foo:bar",
        "defer",
        "Tcp:0:1",
        "tcp:nohost",
        "tcp:",
        "tcp::",
        "tcp:host:",
        "tcp:[::1",
        "tcp:[::1]",
        "tcp:h:1,to=x",
        "tcp:h:1,ipv4=yes",
        "tcp:h:1,ipv6=on,,x",
        "unix:",
        "fd:",
        "file:/x,offset=abc",
        "file:/x,offset=-1",
        "file:/x,offset=1k,foo",
        "file:/x,offset=0x10k",
    ] {
        let qemu = q.hmp(&format!("migrate {uri}"));
        let qemu = qemu
            .trim_end()
            .strip_prefix("Error: ")
            .unwrap_or(&qemu)
            .to_string();
        let ours = MigrationUri::parse(uri).unwrap_err().to_string();
        assert_eq!(ours, qemu, "migrate {uri}");
    }
    q.quit();
    for arg in [
        "bogus",
        "tcp1:0:0",
        "",
        "a=b",
        "tcp:nohost",
        "fd:abc",
        "fd:",
        "file:/x,offset=-1",
    ] {
        let qemu = qemu_incoming_error(&cmd, arg);
        let ours = IncomingUri::parse(arg).unwrap_err().to_string();
        assert_eq!(ours, qemu, "-incoming {arg}");
    }
}

#[test]
fn failed_connections_and_opens_get_the_messages_qemu10_gives_them() {
    let Some(cmd) = require(Peer::Qemu10) else {
        return;
    };
    let probe = Incoming::open(&parse("tcp:127.0.0.1:0")).unwrap();
    let closed = probe.addresses()[0].port().unwrap();
    drop(probe);
    let dir = scratch("nodir");
    let mut q = Qemu::start(&cmd, &[], "connect");
    for uri in [
        format!("tcp:127.0.0.1:{closed}"),
        format!("unix:{}/s", dir.display()),
        format!("file:{}/x", dir.display()),
        "tcp:127.0.0.1:abc".to_string(),
        "tcp:127.0.0.1:1,ipv4=off,ipv6=off".to_string(),
    ] {
        // Some fail in the command, the others in the migration that it starts.
        let desc = q.try_migrate(&uri).or_else(|| {
            let (status, desc) = q.wait_migration(10);
            assert_eq!(status, "failed", "{uri}");
            desc
        });
        let ours = OutgoingChannel::connect(&parse(&uri), &Cancel::new()).unwrap_err();
        assert_eq!(Some(ours.to_string()), desc, "migrate {uri}");
    }
    q.quit();

    // -incoming: a taken port, a socket in a missing directory, a missing file.
    let taken = Incoming::open(&parse("tcp:127.0.0.1:0")).unwrap();
    let port = taken.addresses()[0].port().unwrap();
    for arg in [
        format!("tcp:127.0.0.1:{port}"),
        format!("tcp:0:{port}"),
        format!("unix:{}/s", dir.display()),
        format!("file:{}/x", dir.display()),
        "tcp:0:0,ipv4=off,ipv6=off".to_string(),
    ] {
        let qemu = qemu_incoming_error(&cmd, &arg);
        let ours = Incoming::open(&parse(&arg)).unwrap_err().to_string();
        assert_eq!(ours, qemu, "-incoming {arg}");
    }
}

#[test]
fn incoming_tcp_listens_on_the_addresses_qemu10_listens_on() {
    let Some(cmd) = require(Peer::Qemu10) else {
        return;
    };
    for arg in ["tcp::0", "tcp:0:0", "tcp:localhost:0", "tcp:[::]:0"] {
        let mut q = Qemu::start(&cmd, &["-incoming", arg], "listen");
        let reply = q.query_migrate();
        let qemu_hosts = json_strings(&reply, "host");
        let qemu_ports = json_strings(&reply, "port");
        let info = q.hmp("info migrate");
        q.quit();
        let inc = Incoming::open(&parse(arg)).unwrap();
        let ours: Vec<String> = inc
            .addresses()
            .iter()
            .map(|a| match a {
                SocketAddress::Inet { host, .. } => host.clone(),
                a => panic!("{a}"),
            })
            .collect();
        assert_eq!(ours, qemu_hosts, "-incoming {arg}");
        // `info migrate` prints them as hostmem's Display does.
        for (h, p) in qemu_hosts.iter().zip(&qemu_ports) {
            let line = SocketAddress::Inet {
                host: h.clone(),
                port: p.parse().unwrap(),
            }
            .to_string();
            assert!(
                info.contains(&format!("\t{line}\n")),
                "{line} not in {info:?}"
            );
        }
    }
}

// ---------------------------------------------------------------- QEMU 10 -> hostmem

fn qemu_migrates_into_hostmem(
    peer: Peer,
    incoming: &str,
    qemu_uri: impl FnOnce(&Incoming) -> String,
) {
    let Some(cmd) = require(peer) else { return };
    let (blob_file, blob) = qemu_pattern();
    let inc = Incoming::open(&parse(incoming)).unwrap();
    let uri = qemu_uri(&inc);
    let mut q = Qemu::start(&cmd, &["-device", &loader_arg(&blob_file)], "out");
    let receiver = std::thread::spawn(move || receive(inc, 16 * M));
    q.migrate(&uri);
    let (status, desc) = q.wait_migration(30);
    assert_eq!(status, "completed", "{peer:?} migrate {uri}: {desc:?}");
    let (ram, summary, ch) = within(30, "load", move || receiver.join().unwrap());
    assert_holds_pattern(&ram, &blob);
    assert_eq!(summary.configuration.unwrap().machine_type, "none");
    assert_eq!(
        summary.commands,
        if peer == Peer::Qemu10 {
            vec![0x0b]
        } else {
            vec![]
        }
    );
    ch.finish().unwrap();
    assert_eq!(q.quit(), [""; 0], "QEMU printed something");
}

#[test]
fn qemu10_migrates_over_tcp_into_hostmem() {
    qemu_migrates_into_hostmem(Peer::Qemu10, "tcp:127.0.0.1:0", |inc| {
        inc.addresses()[0].connect_uri().to_string()
    });
}

#[test]
fn qemu10_migrates_over_unix_into_hostmem() {
    let path = scratch("q10.sock");
    let uri = format!("unix:{}", path.display());
    qemu_migrates_into_hostmem(Peer::Qemu10, &uri.clone(), move |_| uri);
}

#[test]
fn qemu10_migrates_over_exec_into_hostmem() {
    let fifo = mkfifo("q10.fifo");
    let out = format!("exec:cat > {}", fifo.display());
    qemu_migrates_into_hostmem(
        Peer::Qemu10,
        &format!("exec:cat {}", fifo.display()),
        |_| out,
    );
}

#[test]
fn qemu72_migrates_over_exec_into_hostmem() {
    let fifo = mkfifo("q72.fifo");
    let out = format!("exec:cat > {}", fifo.display());
    qemu_migrates_into_hostmem(
        Peer::Qemu72,
        &format!("exec:cat {}", fifo.display()),
        |_| out,
    );
}

#[test]
fn qemu10_migrates_to_a_file_at_an_offset_that_hostmem_loads() {
    let Some(cmd) = require(Peer::Qemu10) else {
        return;
    };
    let (blob_file, blob) = qemu_pattern();
    let path = scratch("q10-off.mig");
    std::fs::write(&*path, vec![0xeeu8; 3 * M]).unwrap();
    let uri = format!("file:{},offset=64k", path.display());
    let mut q = Qemu::start(&cmd, &["-device", &loader_arg(&blob_file)], "file");
    q.migrate(&uri);
    assert_eq!(q.wait_migration(30).0, "completed");
    assert_eq!(q.quit(), [""; 0]);
    let bytes = std::fs::read(&*path).unwrap();
    assert!(
        bytes[..64 << 10].iter().all(|&b| b == 0xee),
        "QEMU kept the prefix"
    );
    let (ram, summary, _) = receive(Incoming::open(&parse(&uri)).unwrap(), 16 * M);
    assert_holds_pattern(&ram, &blob);
    // QEMU truncated to the offset as hostmem does: the file ends where the stream ends.
    assert_eq!(bytes.len() as u64, (64 << 10) + summary.bytes);

    // Mapped-ram at an offset: the page offsets in the stream are absolute, and the file
    // channel seeks to them.
    let mapped = scratch("q10-mapped.mig");
    let uri = format!("file:{},offset=1M", mapped.display());
    let mut q = Qemu::start(&cmd, &["-device", &loader_arg(&blob_file)], "mapped");
    q.execute(
        r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"mapped-ram","state":true}]}}"#,
    );
    q.migrate(&uri);
    assert_eq!(q.wait_migration(30).0, "completed");
    assert_eq!(q.quit(), [""; 0]);
    let ch = Incoming::open(&parse(&uri))
        .unwrap()
        .accept(&Cancel::new())
        .unwrap();
    let mut ram = Ram::zeroed(16 * M);
    ram.data.fill(0x33); // holes must come out zero
    let mut opts = LoadOptions::new("none");
    opts.mapped_ram = true;
    let mut devs = none_devices();
    let [a, b] = &mut devs;
    let mut handlers: [&mut dyn SectionHandler; 2] = [a, b];
    load_file(ch, &opts, Some(&mut ram), &mut handlers)
        .unwrap_or_else(|e| panic!("{:?}", e.qemu_lines()));
    assert_holds_pattern(&ram, &blob);
}

// ---------------------------------------------------------------- hostmem -> QEMU

fn hostmem_migrates_into_qemu(peer: Peer, incoming: &str, out: impl FnOnce(&mut Qemu) -> String) {
    let Some(cmd) = require(peer) else { return };
    let mut q = Qemu::start(&cmd, &["-incoming", incoming], "in");
    let uri = parse(&out(&mut q));
    let ram = Ram::patterned(16 * M, 0xfeed);
    let expect = ram.data.clone();
    within(30, "send", move || send(&uri, &ram, &Cancel::new()))
        .unwrap_or_else(|e| panic!("{peer:?}: {e}"));
    let (status, desc) = q.wait_migration(30);
    assert_eq!(
        status, "completed",
        "{peer:?} -incoming {incoming}: {desc:?}"
    );
    assert!(
        q.pmemsave(0, 16 * M) == expect,
        "{peer:?}: guest RAM differs"
    );
    assert_eq!(q.quit(), [""; 0], "QEMU printed something");
}

/// The port of QEMU's `-incoming tcp:...:0` listener.
fn qemu_listen_port(q: &mut Qemu) -> String {
    json_strings(&q.query_migrate(), "port")
        .pop()
        .expect("a socket-address")
}

#[test]
fn hostmem_migrates_over_tcp_into_qemu10() {
    hostmem_migrates_into_qemu(Peer::Qemu10, "tcp:127.0.0.1:0", |q| {
        format!("tcp:127.0.0.1:{}", qemu_listen_port(q))
    });
}

#[test]
fn hostmem_migrates_over_ipv6_tcp_into_qemu10() {
    hostmem_migrates_into_qemu(Peer::Qemu10, "tcp:[::1]:0", |q| {
        format!("tcp:[::1]:{}", qemu_listen_port(q))
    });
}

#[test]
fn hostmem_migrates_over_unix_into_qemu10() {
    let path = scratch("h10.sock");
    let uri = format!("unix:{}", path.display());
    hostmem_migrates_into_qemu(Peer::Qemu10, &uri.clone(), move |_| uri);
}

#[test]
fn hostmem_migrates_over_exec_into_qemu10() {
    let fifo = mkfifo("h10.fifo");
    let out = format!("exec:cat > {}", fifo.display());
    hostmem_migrates_into_qemu(
        Peer::Qemu10,
        &format!("exec:cat {}", fifo.display()),
        |_| out,
    );
}

#[test]
fn hostmem_migrates_over_exec_into_qemu72() {
    let fifo = mkfifo("h72.fifo");
    let out = format!("exec:cat > {}", fifo.display());
    hostmem_migrates_into_qemu(
        Peer::Qemu72,
        &format!("exec:cat {}", fifo.display()),
        |_| out,
    );
}

// ---------------------------------------------------------------- network namespaces

const NS_SRC: &str = "hm-src";
const NS_DST: &str = "hm-dst";
const IP_SRC: &str = "10.77.0.1";
const IP_DST: &str = "10.77.0.2";

fn netns_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/netns")
}

/// Brings the namespaces up (scripts/netns up); `Some(created)` when they are usable, `None`
/// (after saying why) when the test should be skipped. Fails under CI instead of skipping.
fn netns_up() -> Option<bool> {
    let skip = |why: String| {
        if under_ci() {
            panic!("network namespaces are required under CI=true: {why}");
        }
        eprintln!("skipped: {why}");
        None
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("not root".into());
    }
    if Command::new("ip")
        .arg("-V")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        return skip("ip (iproute2) not found; apt-get install iproute2".into());
    }
    let was_up = Command::new(netns_script())
        .arg("status")
        .status()
        .unwrap()
        .success();
    let out = Command::new(netns_script()).arg("up").output().unwrap();
    if !out.status.success() {
        return skip(format!(
            "scripts/netns up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Some(!was_up)
}

/// Takes the namespaces down again on drop (also when the test fails) if this run made them.
struct NetnsGuard {
    created: bool,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if self.created {
            let ok = Command::new(netns_script()).arg("down").status();
            if !std::thread::panicking() {
                assert!(ok.unwrap().success(), "scripts/netns down failed");
            }
        }
    }
}

/// The next `HM-NETNS ...` line of the receiver, split at blanks.
fn next_tagged(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> Vec<String> {
    for l in lines.by_ref() {
        let l = l.unwrap();
        // libtest may have written "test netns_receiver ... " on the same line.
        if let Some(i) = l.find("HM-NETNS ") {
            return l[i + 9..].split(' ').map(String::from).collect();
        }
    }
    panic!("the receiver ended without its report");
}

/// Moves the calling thread into network namespace `ns`.
fn enter_netns(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    // SAFETY: setns on a namespace descriptor we hold; it changes only this thread's network
    // namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The receiving half of the namespace test, run by it inside `hm-dst` as
/// `ip netns exec hm-dst <this test binary> --exact netns_receiver --ignored --nocapture`;
/// does nothing unless `HM_NETNS_LISTEN` is set. Prints `HM-NETNS LISTENING port`, then
/// `HM-NETNS LOADED hash peer`.
#[test]
#[ignore]
fn netns_receiver() {
    let Ok(listen) = std::env::var("HM_NETNS_LISTEN") else {
        return;
    };
    let mut inc = Incoming::open(&parse(&listen)).unwrap();
    println!("HM-NETNS LISTENING {}", inc.addresses()[0].port().unwrap());
    std::io::stdout().flush().unwrap();
    let cancel = Cancel::new();
    let c = cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(30));
        c.cancel();
    });
    let mut ch = inc.accept(&cancel).unwrap();
    let mut ram = Ram::zeroed(4 * M);
    load_none(&mut ch, &mut ram);
    let peer = match ch.peer_address() {
        Some(SocketAddress::Inet { host, .. }) => host,
        a => panic!("{a:?}"),
    };
    println!("HM-NETNS LOADED {:016x} {peer}", fnv1a(&ram.data));
}

#[test]
fn netns_migration_crosses_two_namespaces_over_tcp() {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(created) = netns_up() else { return };
    let _netns = NetnsGuard { created };
    let mut receiver = Command::new("ip")
        .args(["netns", "exec", NS_DST])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "netns_receiver",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HM_NETNS_LISTEN", format!("tcp:{IP_DST}:0"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(receiver.stdout.take().unwrap()).lines();
    let listening = next_tagged(&mut lines);
    assert_eq!(listening[0], "LISTENING");
    let port = listening[1].clone();

    let ram = Ram::patterned(4 * M, 0x77);
    let expect = fnv1a(&ram.data);
    let local = within(30, "send from hm-src", move || {
        enter_netns(NS_SRC);
        let uri = parse(&format!("tcp:{IP_DST}:{port}"));
        let ch = OutgoingChannel::connect(&uri, &Cancel::new()).unwrap();
        let local = ch.local_address();
        let (ch, _) = save_stream(ch, SaveOptions::new("none"), &ram, &mut []).unwrap();
        ch.finish().unwrap();
        local
    });
    assert!(
        matches!(&local, Some(SocketAddress::Inet { host, .. }) if host == IP_SRC),
        "{local:?}"
    );
    let loaded = within(30, "the receiver's report", move || {
        let loaded = next_tagged(&mut lines);
        lines.for_each(drop); // read to the end: libtest's last lines need a reader
        loaded
    });
    assert_eq!(loaded[0], "LOADED");
    assert_eq!(
        loaded[1],
        format!("{expect:016x}"),
        "RAM differs across the namespaces"
    );
    assert_eq!(loaded[2], IP_SRC, "the connection did not come from hm-src");
    assert!(receiver.wait().unwrap().success());

    // The same with QEMU 10 listening in hm-dst.
    if let Some(cmd) = require(Peer::Qemu10) {
        let mut args = vec![
            "ip".to_string(),
            "netns".into(),
            "exec".into(),
            NS_DST.into(),
        ];
        args.extend(cmd);
        let mut q = Qemu::start(&args, &["-incoming", &format!("tcp:{IP_DST}:0")], "netns");
        let port = qemu_listen_port(&mut q);
        let ram = Ram::patterned(16 * M, 0x99);
        let expect = ram.data.clone();
        within(30, "send to QEMU in hm-dst", move || {
            enter_netns(NS_SRC);
            send(
                &parse(&format!("tcp:{IP_DST}:{port}")),
                &ram,
                &Cancel::new(),
            )
            .unwrap()
        });
        assert_eq!(q.wait_migration(30).0, "completed");
        assert!(q.pmemsave(0, 16 * M) == expect, "QEMU's RAM differs");
        assert_eq!(q.quit(), [""; 0]);
    }
}
