//! Machines migrating to machines in one process, through the registry and the HMP commands a
//! VMM's monitor forwards: RAM, the VMM's own sections, the run states on both sides, and
//! refusals with QEMU's words.

use std::sync::{Arc, Mutex};

use hostmem::machine::{GuestControl, RunState};
use hostmem::migration::section::BufferSection;
use hostmem::migration::state::ProgressSnapshot;
use hostmem::options::cmdline::Cmdline;
use hostmem::registry::{self, hmp, transports::HostTransports, MachineId, PendingMachine};
use hostmem::testing::machines::{main_ram, none_board, none_machine};
use hostmem::Result;

const MIB: u64 = 1 << 20;

fn machine(args: &[&str]) -> MachineId {
    none_machine(args).unwrap()
}

fn ram(id: MachineId) -> (*mut u8, u64) {
    main_ram(id).unwrap()
}

fn fill(id: MachineId) {
    let (p, size) = ram(id);
    // Half the pages hold a pattern, the others stay zero.
    for page in (0..size / 4096).step_by(2) {
        for i in 0..64 {
            // SAFETY: inside the machine's RAM; nothing else touches it meanwhile.
            unsafe { *p.add((page * 4096 + i) as usize) = (page as u8) ^ (i as u8) ^ 0x5a };
        }
    }
}

fn bytes(id: MachineId) -> Vec<u8> {
    let (p, size) = ram(id);
    // SAFETY: the machine's whole RAM, alive while the machine is.
    unsafe { std::slice::from_raw_parts(p, size as usize) }.to_vec()
}

fn run(id: MachineId, line: &str) -> Result<String> {
    hmp::hmp(id, line, &HostTransports)
}

/// Records what the migration asked of the VMM's vCPUs.
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

fn scratch(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("hostmem-mm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name).display().to_string()
}

/// Starts loading `stream` into `dst` (started with `-incoming defer`); how it ended.
fn incoming_file(dst: MachineId, stream: &str) -> ProgressSnapshot {
    run(dst, &format!("migrate_incoming file:{stream}")).unwrap();
    let progress = loop {
        if let Some(p) = registry::with(dst, |m| Ok(m.migration().incoming.clone())).unwrap() {
            break p;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    progress.wait()
}

/// Loads `stream` into `dst` and checks that it completed.
fn load_into(dst: MachineId, stream: &str) {
    let done = incoming_file(dst, stream);
    assert_eq!(done.status.name(), "completed", "{:?}", done.error);
}

#[test]
fn a_machine_migrates_through_a_file_into_another_with_its_sections() {
    let src = machine(&["-m", "16M"]);
    fill(src);
    let vcpus = Arc::new(Vcpus::default());
    registry::with(src, |m| {
        m.run_mut().control = vcpus.clone();
        m.register_section(Box::new(BufferSection::new(
            "vmm-cpu",
            0,
            1,
            b"regs".to_vec(),
        )))
    })
    .unwrap();
    let path = scratch("a.mig");
    assert_eq!(run(src, &format!("migrate file:{path}")).unwrap(), "");
    assert_eq!(*vcpus.0.lock().unwrap(), ["stop"]);
    assert_eq!(
        run(src, "info status").unwrap(),
        "VM status: paused (postmigrate)\n"
    );
    let info = run(src, "info migrate").unwrap();
    assert!(info.contains("\nMigration status: completed\n"), "{info}");
    assert!(info.contains("\ntotal ram: 16384 kbytes\n"), "{info}");
    assert!(
        info.contains("\nduplicate: 2048 pages\nnormal: 2048 pages\n"),
        "{info}"
    );
    assert_eq!(
        run(src, "migrate file:/dev/null").unwrap_err().message(),
        "Can't migrate the vm that was paused due to previous migration"
    );

    let dst = machine(&["-m", "16M", "-incoming", "defer"]);
    let section = Arc::new(Mutex::new(Vec::new()));
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl hostmem::migration::SectionHandler for Capture {
        fn idstr(&self) -> &str {
            "vmm-cpu"
        }
        fn instance_id(&self) -> u32 {
            0
        }
        fn version_id(&self) -> u32 {
            1
        }
        fn save(
            &mut self,
            _: hostmem::migration::SectionPhase,
            out: &mut hostmem::migration::QemuWriter<dyn std::io::Write + '_>,
        ) -> std::result::Result<(), hostmem::migration::MigrationError> {
            out.put_buffer(&self.0.lock().unwrap())
        }
        fn load(
            &mut self,
            _: hostmem::migration::SectionPhase,
            _: u32,
            input: &mut hostmem::migration::QemuReader<dyn hostmem::migration::StreamRead + '_>,
        ) -> std::result::Result<(), hostmem::migration::MigrationError> {
            let mut b = [0u8; 4];
            input.read_exact(&mut b, "regs")?;
            self.0.lock().unwrap().extend_from_slice(&b);
            Ok(())
        }
    }
    let dst_vcpus = Arc::new(Vcpus::default());
    registry::with(dst, |m| {
        m.run_mut().control = dst_vcpus.clone();
        m.register_section(Box::new(Capture(section.clone())))
    })
    .unwrap();
    assert_eq!(
        run(dst, "info status").unwrap(),
        "VM status: paused (inmigrate)\n"
    );
    load_into(dst, &path);
    assert!(bytes(dst) == bytes(src), "the destination's RAM differs");
    assert_eq!(*section.lock().unwrap(), b"regs");
    assert_eq!(*dst_vcpus.0.lock().unwrap(), ["resume"]);
    assert_eq!(
        registry::with(dst, |m| Ok(m.run().state)).unwrap(),
        RunState::Running
    );
    registry::remove(src).unwrap();
    registry::remove(dst).unwrap();
}

#[test]
fn a_destination_that_held_data_ends_with_the_sources_zero_pages_zero() {
    // The loader skips ZERO records for pages it knows read as zeros: never populated, or
    // found zero by its helper before the load wrote them. Old data anywhere must still go,
    // and a fresh destination, whose pages a second reader faults in ahead, loads the same.
    let src = machine(&["-m", "16M"]);
    fill(src);
    let stream = scratch("old-data.mig");
    run(src, &format!("migrate file:{stream}")).unwrap();
    let want = bytes(src);
    let old = |i: usize| (i as u8).wrapping_mul(31) | 1;
    let backing = scratch("old-data.ram");
    let mut ends = Vec::new();
    for (what, args) in [
        ("fresh, never touched (prefaulted ahead)", vec!["-m", "16M"]),
        ("anonymous, every page old", vec!["-m", "16M"]),
        (
            "preallocated, old data in a third",
            vec!["-m", "16M", "-mem-prealloc"],
        ),
        (
            "a shared file's old contents",
            vec!["-object", "FILE,share=on", "-machine", "memory-backend=ram"],
        ),
        (
            "a private file's old contents",
            vec![
                "-object",
                "FILE,share=off",
                "-machine",
                "memory-backend=ram",
            ],
        ),
    ] {
        let file = format!("memory-backend-file,id=ram,size=16M,mem-path={backing}");
        let mut args: Vec<String> = args.iter().map(|a| a.replace("FILE", &file)).collect();
        args.extend(["-incoming".into(), "defer".into()]);
        let through_file = what.contains("file");
        if through_file {
            // The old contents are the file's, never touched through this process's mapping.
            let data: Vec<u8> = (0..16 * MIB as usize).map(old).collect();
            std::fs::write(&backing, data).unwrap();
        }
        let dst = machine(&args.iter().map(String::as_str).collect::<Vec<_>>());
        if !through_file && !what.starts_with("fresh") {
            let (p, size) = ram(dst);
            let every = if what.contains("third") { 3 } else { 1 };
            for page in (0..size as usize / 4096).step_by(every) {
                // SAFETY: inside the destination's RAM; nothing else touches it before the load.
                unsafe { *p.add(page * 4096 + 4095) = old(page) };
            }
        }
        load_into(dst, &stream);
        ends.push((what, bytes(dst) == want));
        registry::remove(dst).unwrap();
    }
    assert!(ends.iter().all(|(_, same)| *same), "{ends:?}");
    registry::remove(src).unwrap();
    let _ = std::fs::remove_file(&stream);
    let _ = std::fs::remove_file(&backing);
}

/// Pages of the file at `path` that are in the page cache, and all its pages.
fn cached_pages(path: &str) -> (usize, usize) {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh read-only shared mapping of the whole file, unmapped below; nothing
    // reads through it (mincore only asks the kernel about it).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `p` maps `len` bytes; `vec` has a byte per page of them.
    assert_eq!(unsafe { libc::mincore(p, len, vec.as_mut_ptr()) }, 0);
    // SAFETY: the mapping made above, unmapped once.
    unsafe { libc::munmap(p, len) };
    (vec.iter().filter(|v| *v & 1 != 0).count(), vec.len())
}

#[test]
fn direct_io_on_writes_a_file_stream_past_the_page_cache_byte_for_byte_the_same() {
    let [plain, direct] = ["plain.mig", "direct.mig"].map(scratch);
    let mut sources = Vec::new();
    for (path, on) in [(&plain, "off"), (&direct, "on")] {
        let src = machine(&["-m", "32M"]);
        fill(src);
        run(src, &format!("migrate_set_parameter direct-io {on}")).unwrap();
        assert_eq!(run(src, &format!("migrate file:{path}")).unwrap(), "");
        let info = run(src, "info migrate").unwrap();
        assert!(info.contains("\nMigration status: completed\n"), "{info}");
        sources.push(src);
    }
    // Whole pages went by O_DIRECT, so the page cache holds next to none of them.
    let (cached, pages) = cached_pages(&direct);
    assert!(cached * 10 < pages, "{cached} of {pages} pages cached");
    assert!(std::fs::read(&plain).unwrap() == std::fs::read(&direct).unwrap());

    let dst = machine(&["-m", "32M", "-incoming", "defer"]);
    load_into(dst, &direct);
    assert!(
        bytes(dst) == bytes(sources[1]),
        "the destination's RAM differs"
    );
    for id in sources.into_iter().chain([dst]) {
        registry::remove(id).unwrap();
    }
}

#[test]
fn a_stream_for_a_bigger_machine_is_refused_and_the_destination_never_starts() {
    let src = machine(&["-m", "32M"]);
    let path = scratch("b.mig");
    run(src, &format!("migrate file:{path}")).unwrap();
    let dst = machine(&["-m", "16M", "-incoming", "defer"]);
    let vcpus = Arc::new(Vcpus::default());
    registry::with(dst, |m| {
        m.run_mut().control = vcpus.clone();
        Ok(())
    })
    .unwrap();
    let done = incoming_file(dst, &path);
    assert_eq!(done.status.name(), "failed");
    assert_eq!(
        done.error.as_deref(),
        Some(
            "Size mismatch: ram: 0x2000000 != 0x1000000: Invalid argument\n\
             error while loading state for instance 0x0 of device 'ram'\n\
             load of migration failed: Invalid argument"
        )
    );
    assert!(
        vcpus.0.lock().unwrap().is_empty(),
        "the guest must not start"
    );
    assert_eq!(
        run(dst, "info status").unwrap(),
        "VM status: paused (inmigrate)\n"
    );
    registry::remove(src).unwrap();
    registry::remove(dst).unwrap();
}

#[test]
fn hmp_refusals_read_like_qemu() {
    let m = machine(&["-m", "16M"]);
    let msg = |line: &str| {
        let e = run(m, line).unwrap_err();
        (e.message().to_string(), e.hint().map(str::to_string))
    };
    assert_eq!(
        msg("migrate foo:bar").0,
        "unknown migration protocol: foo:bar"
    );
    assert_eq!(
        msg("migrate_incoming file:/x").0,
        "'-incoming' was not specified on the command line"
    );
    assert_eq!(
        msg("migrate_set_parameter foo 1").0,
        "invalid parameter value: foo"
    );
    assert_eq!(
        msg("migrate_set_capability events maybe"),
        (
            "Expected 'on' or 'off'".to_string(),
            Some("Try \"help migrate_set_capability\" for more information\n".to_string())
        )
    );
    assert_eq!(
        msg("pmemsave 0 4096 /tmp/x").0,
        "invalid char 't' in expression"
    );
    run(m, "migrate_set_parameter max-bandwidth 1M").unwrap();
    assert!(run(m, "info migrate_parameters")
        .unwrap()
        .contains("\nmax-bandwidth: 1048576 bytes/second\n"));
    run(m, "stop").unwrap();
    assert_eq!(run(m, "info status").unwrap(), "VM status: paused\n");
    run(m, "cont").unwrap();
    assert_eq!(run(m, "info status").unwrap(), "VM status: running\n");
    registry::remove(m).unwrap();
}

#[test]
fn pmemsave_writes_guest_physical_memory() {
    let m = machine(&["-m", "16M"]);
    fill(m);
    let path = scratch("pm.bin");
    run(m, &format!("pmemsave 0x2000 8192 \"{path}\"")).unwrap();
    let got = std::fs::read(&path).unwrap();
    assert_eq!(got, bytes(m)[0x2000..0x4000]);
    // Past the end of RAM reads as zeros.
    run(m, &format!("pmemsave 16*1024*1024-4096 8192 \"{path}\"")).unwrap();
    let got = std::fs::read(&path).unwrap();
    assert_eq!(&got[..4096], &bytes(m)[(16 * MIB - 4096) as usize..]);
    assert!(got[4096..].iter().all(|&b| b == 0));
    registry::remove(m).unwrap();
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn status_is(id: MachineId, status: &str) -> bool {
    run(id, "info migrate")
        .unwrap()
        .contains(&format!("\nMigration status: {status}"))
}

/// The addresses `info migrate` lists for a listening destination.
fn socket_addresses(info: &str) -> Vec<String> {
    let Some((_, rest)) = info.split_once("socket address: [\n") else {
        return Vec::new();
    };
    let (list, _) = rest.split_once("]\n").unwrap();
    list.lines()
        .map(|l| l.trim_start_matches('\t').to_string())
        .collect()
}

#[test]
fn machines_migrate_over_unix_and_tcp_sockets_through_hmp() {
    let unix = scratch("mig.sock");
    for listen in [format!("unix:{unix}"), "tcp:127.0.0.1:0".to_string()] {
        let src = machine(&["-m", "16M"]);
        fill(src);
        let dst = machine(&["-m", "16M", "-incoming", "defer"]);
        run(dst, &format!("migrate_incoming {listen}")).unwrap();
        let info = run(dst, "info migrate").unwrap();
        assert!(info.contains("\nMigration status: setup\n"), "{info}");
        let addresses = socket_addresses(&info);
        assert_eq!(addresses.len(), 1, "{info}");
        if listen.starts_with("unix:") {
            assert_eq!(addresses[0], listen);
        } else {
            assert!(addresses[0].starts_with("tcp:127.0.0.1:"), "{info}");
            assert_ne!(addresses[0], "tcp:127.0.0.1:0");
        }
        // What the destination lists is where a source connects.
        assert_eq!(run(src, &format!("migrate {}", addresses[0])).unwrap(), "");
        assert!(status_is(src, "completed"));
        wait_for("the destination to load", || status_is(dst, "completed"));
        assert_eq!(bytes(src), bytes(dst));
        let info = run(dst, "info migrate").unwrap();
        assert!(socket_addresses(&info).is_empty(), "{info}");
        assert_eq!(run(dst, "info status").unwrap(), "VM status: running\n");
        registry::remove(src).unwrap();
        registry::remove(dst).unwrap();
    }
    assert!(
        !std::path::Path::new(&unix).exists(),
        "the listener's socket goes with it"
    );
}

#[test]
fn an_exec_migration_pipes_the_stream_through_commands_both_ways() {
    let src = machine(&["-m", "16M"]);
    fill(src);
    let path = scratch("exec.mig.gz");
    run(src, &format!("migrate \"exec:gzip -1 > {path}\"")).unwrap();
    assert!(status_is(src, "completed"));
    let dst = machine(&["-m", "16M", "-incoming", "defer"]);
    run(dst, &format!("migrate_incoming \"exec:gzip -dc {path}\"")).unwrap();
    wait_for("the destination to load", || status_is(dst, "completed"));
    assert_eq!(bytes(src), bytes(dst));
    registry::remove(src).unwrap();
    registry::remove(dst).unwrap();
}

#[test]
fn a_failed_connection_fails_the_migration_and_the_source_runs_on() {
    let src = machine(&["-m", "16M"]);
    // Detached, the connect happens on the migration thread, as QEMU's does: the command
    // returns at once and info migrate tells the failure.
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_eq!(
        run(src, &format!("migrate -d tcp:127.0.0.1:{free_port}")).unwrap(),
        ""
    );
    wait_for("the connect to fail", || status_is(src, "failed"));
    let info = run(src, "info migrate").unwrap();
    assert!(
        info.contains(&format!(
            "\nMigration status: failed (Failed to connect to '127.0.0.1:{free_port}': \
             Connection refused)\n"
        )),
        "{info}"
    );
    assert_eq!(run(src, "info status").unwrap(), "VM status: running\n");
    // Waiting, the failure is the command's.
    let missing = scratch("nobody-listens.sock");
    let e = run(src, &format!("migrate unix:{missing}")).unwrap_err();
    assert!(
        e.message()
            .starts_with(&format!("Failed to connect to '{missing}'")),
        "{}",
        e.message()
    );
    registry::remove(src).unwrap();
}

#[test]
fn the_machine_state_is_checked_before_anything_is_opened() {
    let src = machine(&["-m", "16M"]);
    run(src, &format!("migrate file:{}", scratch("first.mig"))).unwrap();
    let second = scratch("second.mig");
    let e = run(src, &format!("migrate file:{second}")).unwrap_err();
    assert_eq!(
        e.message(),
        "Can't migrate the vm that was paused due to previous migration"
    );
    assert!(!std::path::Path::new(&second).exists());
    let sock = scratch("never.sock");
    let e = run(src, &format!("migrate_incoming unix:{sock}")).unwrap_err();
    assert_eq!(
        e.message(),
        "'-incoming' was not specified on the command line"
    );
    assert!(!std::path::Path::new(&sock).exists());
    registry::remove(src).unwrap();
}

#[test]
fn a_bad_incoming_uri_is_refused_while_the_command_line_is_read() {
    let cmd = Cmdline::parse(&["-m", "16M", "-incoming", "bogus"]).unwrap();
    let e = PendingMachine::start(&cmd, &none_board()).err().unwrap();
    assert_eq!(
        e.message(),
        "-incoming bogus: Parameter 'channel-type' does not accept value 'bogus'"
    );
    let cmd = Cmdline::parse(&["-m", "16M", "-incoming", "tcp:localhost"]).unwrap();
    let e = PendingMachine::start(&cmd, &none_board()).err().unwrap();
    assert!(
        e.message().starts_with("-incoming tcp:localhost: "),
        "{}",
        e.message()
    );
}

#[test]
fn a_new_max_bandwidth_reaches_a_running_migration() {
    let src = machine(&["-m", "32M"]);
    fill(src);
    // 16 MiB of data pages at 1 MiB/s would take 16 s.
    run(src, "migrate_set_parameter max-bandwidth 1M").unwrap();
    let dst = machine(&["-m", "32M", "-incoming", "defer"]);
    let sock = scratch("bw.sock");
    run(dst, &format!("migrate_incoming unix:{sock}")).unwrap();
    run(src, &format!("migrate -d unix:{sock}")).unwrap();
    wait_for("the migration to start", || status_is(src, "active"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = |id| {
        let info = run(id, "info migrate").unwrap();
        let line = info
            .lines()
            .find_map(|l| l.strip_prefix("transferred ram: "))
            .unwrap()
            .to_string();
        line.trim_end_matches(" kbytes").parse::<u64>().unwrap()
    };
    assert!(sent(src) < 4 << 10, "the limit holds: {} KiB", sent(src));
    let t = std::time::Instant::now();
    run(src, "migrate_set_parameter max-bandwidth 1G").unwrap();
    wait_for("the migration to complete", || status_is(src, "completed"));
    assert!(
        t.elapsed() < std::time::Duration::from_secs(8),
        "the new limit applied: {:?}",
        t.elapsed()
    );
    wait_for("the destination to load", || status_is(dst, "completed"));
    assert_eq!(bytes(src), bytes(dst));
    registry::remove(src).unwrap();
    registry::remove(dst).unwrap();
}

#[test]
fn removing_a_machine_cancels_its_migration_before_the_hooks_go() {
    let src = machine(&["-m", "64M"]);
    fill(src);
    let vcpus = Arc::new(Vcpus::default());
    registry::with(src, |m| {
        m.run_mut().control = vcpus.clone();
        Ok(())
    })
    .unwrap();
    // A peer that accepts and never reads: the migration blocks in a write.
    let sock = scratch("stuck.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    run(src, &format!("migrate -d unix:{sock}")).unwrap();
    let (_peer, _) = listener.accept().unwrap();
    wait_for("the migration to start", || status_is(src, "active"));
    let progress = registry::with(src, |m| Ok(m.migration().outgoing.clone()))
        .unwrap()
        .unwrap();
    let t = std::time::Instant::now();
    registry::remove(src).unwrap();
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(progress.status().name(), "cancelled");
    assert!(
        vcpus.0.lock().unwrap().is_empty(),
        "the guest was never stopped"
    );
}

/// Where the sparse test writes: the starts of `count` runs spread over `size`, each at a
/// different page of a 2 MiB block.
fn sparse_runs(size: u64, count: u64) -> Vec<u64> {
    let stride = (size / count) & !(2 * MIB - 1);
    (0..count).map(|i| i * stride + (i % 7) * 4096).collect()
}

fn sparse_byte(at: u64) -> u8 {
    (at.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 | 1
}

#[test]
fn a_sparse_9_tib_guest_migrates_in_proportion_to_what_was_written() {
    const SIZE: u64 = 9 << 40;
    const RUN: u64 = MIB;
    let backend = ["-object", "memory-backend-ram,id=mem,size=9T,reserve=off"];
    let args = |extra: &[&'static str]| {
        let mut a = backend.to_vec();
        a.extend(["-machine", "memory-backend=mem"]);
        a.extend(extra);
        a
    };
    let src = machine(&args(&[]));
    let dst = machine(&args(&["-incoming", "defer"]));
    // 1 GiB written, in 1 MiB runs all over the 9 TiB.
    let runs = sparse_runs(SIZE, 1024);
    let (p, size) = ram(src);
    assert_eq!(size, SIZE);
    for &start in &runs {
        for at in (start..start + RUN).step_by(512) {
            // SAFETY: inside the source's RAM; nothing else touches it meanwhile.
            unsafe { *p.add(at as usize) = sparse_byte(at) };
        }
    }
    // The destination's memory held something before: the capability clears it.
    let (q, _) = ram(dst);
    // SAFETY: inside the destination's RAM, which waits for the stream.
    unsafe { *q.add((SIZE / 2 + 12345) as usize) = 0xee };
    for id in [src, dst] {
        run(id, "migrate_set_capability x-skip-unpopulated on").unwrap();
    }
    // Not QEMU's default 128 MiB/s: the test is about what goes, not how fast.
    run(src, "migrate_set_parameter max-bandwidth 100G").unwrap();
    let sock = scratch("sparse.sock");
    run(dst, &format!("migrate_incoming unix:{sock}")).unwrap();
    run(src, &format!("migrate unix:{sock}")).unwrap();
    wait_for("the destination to load", || status_is(dst, "completed"));

    let info = run(src, "info migrate").unwrap();
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no '{name}' in:\n{info}"))
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // Only what was written was read and sent: 1 GiB of pages, not 9 TiB of them. A written
    // run may bring the rest of its 2 MiB block (a transparent huge page), as zero pages.
    let written_pages = runs.len() as u64 * RUN / 4096;
    let sent = field("normal: ") + field("duplicate: ");
    assert_eq!(field("normal: "), written_pages, "{info}");
    assert!(
        sent <= runs.len() as u64 * (2 * MIB / 4096),
        "{sent} pages went:\n{info}"
    );
    assert_eq!(field("unpopulated skipped: "), SIZE / 4096 - sent, "{info}");
    let stream_kib = field("transferred ram: ");
    assert!(
        stream_kib < ((runs.len() as u64 * RUN) >> 10) * 101 / 100,
        "the stream is {stream_kib} KiB:\n{info}"
    );
    // Every written byte arrived; what was not written reads as zero, the old byte included.
    let (q, _) = ram(dst);
    for &start in &runs {
        for at in (start..start + RUN).step_by(512) {
            // SAFETY: inside the destination's RAM, loaded and not running.
            let (got, zero) = unsafe { (*q.add(at as usize), *q.add(at as usize + 1)) };
            assert_eq!((got, zero), (sparse_byte(at), 0), "at {at:#x}");
        }
    }
    // SAFETY: as above.
    assert_eq!(unsafe { *q.add((SIZE / 2 + 12345) as usize) }, 0);
    registry::remove(src).unwrap();
    registry::remove(dst).unwrap();
}
