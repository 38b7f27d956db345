//! Faults injected under machines built and driven as a VMM drives them (the registry and the
//! HMP commands): guest RAM the host stops backing (a file truncated under its mapping, as a
//! full tmpfs does), migration peers that disconnect midway or stall. Each is an error with
//! QEMU's words or ours, the source keeps running, a destination is never resumed, and nothing
//! is left behind: the process has the same descriptors and mappings after as before.
//!
//! The scenarios run one after another in one test: the leak check counts the whole process's
//! descriptors, and looks for the guest RAM of every machine in the process's mappings.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostmem::machine::{GuestControl, RunState};
use hostmem::registry::{self, hmp, transports::HostTransports, MachineId};
use hostmem::testing::machines::none_machine;
use hostmem::Result;

mod open_fds;
use open_fds::open_fds;

const MIB: u64 = 1 << 20;

/// A `-M none` machine built from `args`, its RAM mapped at 0 as the board does.
fn machine(args: &[&str]) -> MachineId {
    none_machine(args).unwrap()
}

/// A machine whose RAM is `size` bytes of a shared file at `path`.
fn file_machine(path: &str, size: u64, incoming: bool) -> MachineId {
    let obj = format!("memory-backend-file,id=ram,size={size},mem-path={path},share=on");
    let mut args = vec![
        "-m",
        "16M",
        "-object",
        &obj,
        "-machine",
        "memory-backend=ram",
    ];
    let m = format!("{}M", size / MIB);
    args[1] = &m;
    if incoming {
        args.extend(["-incoming", "defer"]);
    }
    machine(&args)
}

fn ram(id: MachineId) -> (*mut u8, u64) {
    let r = registry::with(id, |m| {
        let ram = m.config().unwrap().ram.unwrap();
        let size = m.config().unwrap().ram_size;
        Ok((m.memory().ram_ptr(ram)?.unwrap(), size))
    })
    .unwrap();
    RAM_SEEN.lock().unwrap().push((r.0 as usize, r.1));
    r
}

/// The guest RAM of every machine the scenario looked at: none may stay mapped once its
/// machine is gone.
static RAM_SEEN: Mutex<Vec<(usize, u64)>> = Mutex::new(Vec::new());

/// Writes a pattern into the first `len` bytes of the machine's RAM.
fn fill(id: MachineId, len: u64) {
    let (p, size) = ram(id);
    assert!(len <= size);
    for page in 0..len / 4096 {
        // SAFETY: inside the machine's RAM; nothing else touches it meanwhile.
        unsafe { *p.add((page * 4096) as usize) = page as u8 ^ 0x5a };
    }
}

fn run(id: MachineId, line: &str) -> Result<String> {
    hmp::hmp(id, line, &HostTransports)
}

fn status_is(id: MachineId, status: &str) -> bool {
    run(id, "info migrate")
        .unwrap()
        .contains(&format!("\nMigration status: {status}"))
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Records what a migration asked of the VMM's vCPUs.
#[derive(Default)]
struct Vcpus(Mutex<Vec<&'static str>>);

impl GuestControl for Vcpus {
    fn stop(&self) -> Result<()> {
        self.0.lock().unwrap().push("stop");
        Ok(())
    }
    fn resume(&self) -> Result<()> {
        self.0.lock().unwrap().push("resume");
        Ok(())
    }
}

fn watch_vcpus(id: MachineId) -> Arc<Vcpus> {
    let v = Arc::new(Vcpus::default());
    registry::with(id, |m| {
        m.run_mut().control = v.clone();
        Ok(())
    })
    .unwrap();
    v
}

fn scratch(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("hostmem-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    p.display().to_string()
}

fn truncate(path: &str, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Checks that a scenario left nothing behind: the same descriptors as before it (threads
/// that end close theirs, so the check waits a little for them), and none of the guest RAM it
/// saw still mapped at the same place with the same length.
fn nothing_left(before: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds() != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(open_fds(), before, "descriptors left behind");
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for (addr, len) in RAM_SEEN.lock().unwrap().drain(..) {
        let same = format!("{:x}-{:x} ", addr, addr + len as usize);
        assert!(
            !maps.lines().any(|l| l.starts_with(&same)),
            "guest RAM still mapped: {same}"
        );
    }
}

/// Waits for the machine's incoming migration to be recorded and to end.
fn incoming_result(dst: MachineId) -> (String, Option<String>) {
    let progress = loop {
        if let Some(p) = registry::with(dst, |m| Ok(m.migration().incoming.clone())).unwrap() {
            break p;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let done = progress.wait();
    (done.status.name().to_string(), done.error)
}

const CAUSE: &str = "SIGBUS: the host could not back the page (a full file system, a file \
                     shorter than its mapping, or no free huge page)";

/// Warms up what the first use of each path allocates once per process (thread-locals,
/// lazily built tables), so that the leak checks compare steady states.
fn warm_up() {
    let a = machine(&["-m", "16M"]);
    let path = scratch("warm.mig");
    run(a, &format!("migrate file:{path}")).unwrap();
    run(a, &format!("pmemsave 0 4096 \"{}\"", scratch("warm.bin"))).unwrap();
    let b = machine(&["-m", "16M", "-incoming", "defer"]);
    run(b, &format!("migrate_incoming file:{path}")).unwrap();
    assert_eq!(incoming_result(b).0, "completed");
    registry::remove(a).unwrap();
    registry::remove(b).unwrap();
}

fn a_source_whose_ram_faults_fails_its_migration_and_runs_on() {
    let before = open_fds();
    let backing = scratch("src.ram");
    let src = file_machine(&backing, 16 * MIB, false);
    fill(src, 16 * MIB);
    let vcpus = watch_vcpus(src);
    // The host takes the second half of the RAM's file away, as a full tmpfs refuses pages.
    truncate(&backing, 8 * MIB);
    let stream = scratch("src.mig");
    let e = run(src, &format!("migrate file:{stream}")).unwrap_err();
    assert_eq!(
        e.message(),
        format!("RAMBlock \"ram\": reading the page at offset 0x800000 failed: {CAUSE}")
    );
    let info = run(src, "info migrate").unwrap();
    assert!(info.contains("\nMigration status: failed ("), "{info}");
    assert_eq!(run(src, "info status").unwrap(), "VM status: running\n");
    assert!(
        vcpus.0.lock().unwrap().is_empty(),
        "the bulk pass failed before the switchover: the guest was never stopped"
    );
    // pmemsave meets the same page with the same kind of error, and the guest goes on.
    let e = run(
        src,
        &format!("pmemsave 0x7ff000 0x2000 \"{}\"", scratch("pm.bin")),
    )
    .unwrap_err();
    assert_eq!(
        e.message(),
        format!(
            "pmemsave: reading guest-physical 0x800000 (RAMBlock \"ram\" offset 0x800000) \
             failed: {CAUSE}"
        )
    );
    // Once the host backs the pages again, the same machine migrates.
    truncate(&backing, 16 * MIB);
    run(src, &format!("migrate file:{stream}")).unwrap();
    assert!(status_is(src, "completed"));
    registry::remove(src).unwrap();
    std::fs::remove_file(&backing).unwrap();
    std::fs::remove_file(&stream).unwrap();
    nothing_left(&before);
}

/// `size` bytes of RAM whose file is cut to `cut`: with a cut past the first 16 MiB of page
/// records, the loader writes pages from its writer threads on a host of more than 2 cores
/// (`ram::default_writer_threads`), and must report the same first failing page.
fn a_destination_whose_ram_faults_while_loading_fails_and_is_never_resumed(size: u64, cut: u64) {
    let before = open_fds();
    let m = format!("{}M", size / MIB);
    let src = machine(&["-m", &m]);
    fill(src, size);
    let stream = scratch("dst.mig");
    run(src, &format!("migrate file:{stream}")).unwrap();
    registry::remove(src).unwrap();

    let backing = scratch("dst.ram");
    let dst = file_machine(&backing, size, true);
    let vcpus = watch_vcpus(dst);
    truncate(&backing, cut);
    run(dst, &format!("migrate_incoming file:{stream}")).unwrap();
    let (status, error) = incoming_result(dst);
    assert_eq!(status, "failed");
    assert_eq!(
        error.as_deref(),
        Some(
            format!(
                "RAMBlock \"ram\": writing the page at offset {cut:#x} failed: {CAUSE}\n\
                 error while loading state section id 1(ram)\n\
                 load of migration failed: Bad address"
            )
            .as_str()
        )
    );
    assert!(vcpus.0.lock().unwrap().is_empty(), "never resumed");
    assert_eq!(
        run(dst, "info status").unwrap(),
        "VM status: paused (inmigrate)\n"
    );
    assert_eq!(
        registry::with(dst, |m| Ok(m.run().state)).unwrap(),
        RunState::InMigrate
    );
    registry::remove(dst).unwrap();
    std::fs::remove_file(&backing).unwrap();
    std::fs::remove_file(&stream).unwrap();
    nothing_left(&before);
}

/// Forwards a unix-socket connection to `to`, `limit` bytes of it, then either drops both
/// ends (`stall: false`: a peer that disconnects midway) or keeps them open reading nothing
/// more (`stall: true`) until `release` is dropped.
fn proxy(
    listener: UnixListener,
    to: String,
    limit: usize,
    stall: bool,
    release: std::sync::mpsc::Receiver<()>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let (mut from, _) = listener.accept().unwrap();
        let mut out = UnixStream::connect(&to).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut passed = 0;
        while passed < limit {
            let n = from
                .read(&mut buf[..(limit - passed).min(64 << 10)])
                .unwrap();
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).unwrap();
            passed += n;
        }
        if stall {
            let _ = release.recv();
        }
        drop(from);
        drop(out);
        passed
    })
}

fn a_peer_that_disconnects_midway_fails_both_sides_and_the_source_runs_on() {
    let before = open_fds();
    let src = machine(&["-m", "32M"]);
    fill(src, 32 * MIB);
    let src_vcpus = watch_vcpus(src);
    let dst = machine(&["-m", "32M", "-incoming", "defer"]);
    let dst_vcpus = watch_vcpus(dst);
    let dst_sock = scratch("mid-dst.sock");
    run(dst, &format!("migrate_incoming unix:{dst_sock}")).unwrap();
    let via = scratch("mid-proxy.sock");
    let (_keep, release) = std::sync::mpsc::channel();
    let p = proxy(
        UnixListener::bind(&via).unwrap(),
        dst_sock,
        4 << 20,
        false,
        release,
    );
    let e = run(src, &format!("migrate unix:{via}")).unwrap_err();
    assert_eq!(p.join().unwrap(), 4 << 20);
    assert!(
        [
            "migration stream I/O error: Unable to write to socket: Broken pipe",
            "migration stream I/O error: Unable to write to socket: Connection reset by peer"
        ]
        .contains(&e.message()),
        "{}",
        e.message()
    );
    assert_eq!(run(src, "info status").unwrap(), "VM status: running\n");
    let sv = src_vcpus.0.lock().unwrap().clone();
    assert!(sv.is_empty() || sv == ["stop", "resume"], "{sv:?}");
    let (status, error) = incoming_result(dst);
    assert_eq!(status, "failed");
    let error = error.unwrap();
    assert!(
        error.ends_with("load of migration failed: Input/output error"),
        "{error}"
    );
    assert!(dst_vcpus.0.lock().unwrap().is_empty(), "never resumed");
    assert_eq!(
        run(dst, "info status").unwrap(),
        "VM status: paused (inmigrate)\n"
    );
    registry::remove(src).unwrap();
    registry::remove(dst).unwrap();
    let _ = std::fs::remove_file(&via);
    nothing_left(&before);
}

fn a_peer_that_stalls_leaves_the_source_running_until_cancelled_and_the_destination_waiting() {
    let before = open_fds();
    let src = machine(&["-m", "32M"]);
    fill(src, 32 * MIB);
    let src_vcpus = watch_vcpus(src);
    let dst = machine(&["-m", "32M", "-incoming", "defer"]);
    let dst_vcpus = watch_vcpus(dst);
    let dst_sock = scratch("stall-dst.sock");
    run(dst, &format!("migrate_incoming unix:{dst_sock}")).unwrap();
    let via = scratch("stall-proxy.sock");
    let (release_tx, release) = std::sync::mpsc::channel();
    let p = proxy(
        UnixListener::bind(&via).unwrap(),
        dst_sock,
        2 << 20,
        true,
        release,
    );
    run(src, &format!("migrate -d unix:{via}")).unwrap();
    wait_for("the source to start sending", || status_is(src, "active"));
    wait_for("the destination to start loading", || {
        status_is(dst, "active")
    });
    // Stalled: nothing moves, the source's guest runs, the destination waits paused.
    std::thread::sleep(Duration::from_millis(500));
    assert!(status_is(src, "active"));
    assert_eq!(run(src, "info status").unwrap(), "VM status: running\n");
    assert!(status_is(dst, "active"));
    assert_eq!(
        run(dst, "info status").unwrap(),
        "VM status: paused (inmigrate)\n"
    );
    run(src, "migrate_cancel").unwrap();
    wait_for("the cancel", || status_is(src, "cancelled"));
    assert_eq!(run(src, "info status").unwrap(), "VM status: running\n");
    let sv = src_vcpus.0.lock().unwrap().clone();
    assert!(
        sv.is_empty(),
        "the source's guest was never stopped: {sv:?}"
    );
    // The destination still waits for the rest of the stream; when the peer goes, it fails.
    assert!(status_is(dst, "active"));
    drop(release_tx);
    assert_eq!(p.join().unwrap(), 2 << 20);
    let (status, _) = incoming_result(dst);
    assert_eq!(status, "failed");
    assert!(dst_vcpus.0.lock().unwrap().is_empty(), "never resumed");
    registry::remove(src).unwrap();
    registry::remove(dst).unwrap();
    let _ = std::fs::remove_file(&via);
    nothing_left(&before);
}

#[test]
fn faults_fail_cleanly_and_leave_nothing_behind() {
    warm_up();
    a_source_whose_ram_faults_fails_its_migration_and_runs_on();
    a_destination_whose_ram_faults_while_loading_fails_and_is_never_resumed(16 * MIB, 4 * MIB);
    a_destination_whose_ram_faults_while_loading_fails_and_is_never_resumed(64 * MIB, 40 * MIB);
    a_peer_that_disconnects_midway_fails_both_sides_and_the_source_runs_on();
    a_peer_that_stalls_leaves_the_source_running_until_cancelled_and_the_destination_waiting();
}
