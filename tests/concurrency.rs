//! Several machines in one process at once, on threads, repeated: each preallocates its RAM,
//! changes its layout (a backend added, mapped, refused deletion while mapped, unmapped and
//! deleted, inside transactions), migrates into a new machine over a unix socket or a file, or
//! has its migration cancelled, and is destroyed while the others still work. After every
//! round the invariants are checked: a migrated guest's RAM equals its source's, each
//! machine's `info ramblock` and `info mtree -f` show only what it built, the registry holds
//! none of the round's machines, and no file descriptor or mapping is left behind.
//!
//! `HOSTMEM_CONCURRENCY_ROUNDS` sets the number of rounds (scripts/tsan runs fewer).

use std::sync::Barrier;

use hostmem::registry::{self, MachineId};
use hostmem::testing::machines::{main_ram, none_machine};

mod open_fds;
mod stress_support;
use open_fds::open_fds;
use stress_support::{ram_checksum as checksum, rounds, run};

const WORKERS: usize = 4;
const RAM_MIB: u64 = 32;

fn scratch(name: &str) -> String {
    stress_support::scratch("conc", name)
}

/// A machine whose RAM is a preallocated backend named after its worker.
fn machine(name: &str, incoming: bool) -> MachineId {
    let object = format!(
        "memory-backend-ram,id={name},size={RAM_MIB}M,prealloc=on,prealloc-threads={}",
        1 + name.len() % 2
    );
    let backend = format!("memory-backend={name}");
    let size = format!("{RAM_MIB}M");
    let mut args = vec!["-m", &size, "-object", &object, "-machine", &backend];
    if incoming {
        args.extend(["-incoming", "defer"]);
    }
    none_machine(&args).unwrap()
}

fn fill(id: MachineId, seed: u64) {
    let (p, size) = main_ram(id).unwrap();
    for page in (0..size / 4096).step_by(3) {
        let at = page * 4096 + (page % 61) * 8;
        // SAFETY: inside the machine's RAM, which lives as long as the machine; only this
        // worker touches it and no migration runs yet.
        unsafe { *(p.add(at as usize) as *mut u64) = seed ^ page.wrapping_mul(0x9e37_79b9) };
    }
}

fn status_is(id: MachineId, status: &str) -> bool {
    run(id, "info migrate")
        .unwrap()
        .contains(&format!("\nMigration status: {status}"))
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A backend added, preallocated, mapped at 1 GiB inside a transaction and marked mapped as a
/// memory device marks it, refused deletion while mapped (as is the machine's RAM backend), then unmapped and deleted: the machine's layout is back to its RAM alone.
fn change_layout(id: MachineId, name: &str) {
    let extra = format!("{name}-extra");
    registry::with(id, |m| {
        m.add_backend_uncompleted(&format!(
            "memory-backend-ram,id={extra},size=4M,prealloc=on,prealloc-threads=1"
        ))
    })
    .unwrap();
    registry::complete_backend(id, &extra, true).unwrap();
    let region = registry::with(id, |m| {
        let region = m.objects().get(&extra).unwrap().region.unwrap();
        let mem = m.memory_mut();
        let sys = mem.system_memory();
        mem.transaction_begin();
        mem.add_subregion(sys, 1 << 30, region, None)?;
        mem.transaction_commit()?;
        // As a memory device (pc-dimm) marks the backend it plugs.
        m.backend_mut(&extra).unwrap().set_mapped(true);
        Ok(region)
    })
    .unwrap();
    let mtree = run(id, "info mtree -f").unwrap();
    assert!(
        mtree.contains(&format!(
            "  0000000040000000-00000000403fffff (prio 0, ram): {extra}\n"
        )),
        "{mtree}"
    );
    let busy = registry::with(id, |m| m.delete_backend(&extra)).unwrap_err();
    assert_eq!(
        busy.message(),
        format!("object '{extra}' is in use, can not be deleted")
    );
    // The machine's own RAM backend is as busy.
    let busy = registry::with(id, |m| m.delete_backend(name)).unwrap_err();
    assert_eq!(
        busy.message(),
        format!("object '{name}' is in use, can not be deleted")
    );
    registry::with(id, |m| {
        m.backend_mut(&extra).unwrap().set_mapped(false);
        let mem = m.memory_mut();
        let sys = mem.system_memory();
        mem.transaction_begin();
        mem.del_subregion(sys, region)?;
        mem.transaction_commit()?;
        m.delete_backend(&extra)
    })
    .unwrap();
    let mtree = run(id, "info mtree -f").unwrap();
    assert!(!mtree.contains(&extra), "{mtree}");
}

/// What `info ramblock` and `info mtree -f` show of machine `id`: only its own RAM.
fn check_own_layout(id: MachineId, name: &str) {
    let blocks = run(id, "info ramblock").unwrap();
    let names: Vec<&str> = blocks
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, [name], "{blocks}");
    let mtree = run(id, "info mtree -f").unwrap();
    let ram_lines: Vec<&str> = mtree.lines().filter(|l| l.contains(", ram)")).collect();
    assert_eq!(
        ram_lines,
        [format!(
            "  0000000000000000-{:016x} (prio 0, ram): {name}",
            (RAM_MIB << 20) - 1
        )],
        "{mtree}"
    );
}

/// One worker's round: returns the ids it made, all removed by the time it returns.
fn worker(round: usize, index: usize) -> Vec<MachineId> {
    let name = format!("r{round}w{index}");
    let src = machine(&name, false);
    fill(src, (round * WORKERS + index) as u64 + 1);
    change_layout(src, &name);
    check_own_layout(src, &name);
    let before = checksum(src);
    let dst = machine(&name, true);
    match (round + index) % 3 {
        0 => {
            // Over a unix socket, the destination loading while the source sends.
            let sock = scratch(&format!("{name}.sock"));
            run(dst, &format!("migrate_incoming unix:{sock}")).unwrap();
            run(src, &format!("migrate unix:{sock}")).unwrap();
            wait_for("the destination to load", || status_is(dst, "completed"));
            assert_eq!(checksum(dst), before, "{name}: the guest's RAM changed");
            check_own_layout(dst, &name);
            assert_eq!(run(dst, "info status").unwrap(), "VM status: running\n");
        }
        1 => {
            // Through a file, the destination loading after the source is done.
            let path = scratch(&format!("{name}.mig"));
            run(src, &format!("migrate file:{path}")).unwrap();
            run(dst, &format!("migrate_incoming file:{path}")).unwrap();
            wait_for("the destination to load", || status_is(dst, "completed"));
            std::fs::remove_file(&path).unwrap();
            assert_eq!(checksum(dst), before, "{name}: the guest's RAM changed");
            check_own_layout(dst, &name);
        }
        _ => {
            // Cancelled: a peer that accepts and never reads, so the source blocks writing.
            let sock = scratch(&format!("{name}.stuck"));
            let _ = std::fs::remove_file(&sock);
            let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
            run(src, &format!("migrate -d unix:{sock}")).unwrap();
            let (peer, _) = listener.accept().unwrap();
            wait_for("the migration to start", || status_is(src, "active"));
            run(src, "migrate_cancel").unwrap();
            wait_for("the cancel", || status_is(src, "cancelled"));
            drop(peer);
            drop(listener);
            std::fs::remove_file(&sock).unwrap();
            assert_eq!(run(src, "info status").unwrap(), "VM status: running\n");
            assert_eq!(checksum(src), before, "{name}: the source's RAM changed");
            // The destination never got a stream: it waits, never started.
            assert_eq!(
                run(dst, "info status").unwrap(),
                "VM status: paused (inmigrate)\n"
            );
        }
    }
    check_own_layout(src, &name);
    registry::remove(src).unwrap();
    registry::remove(dst).unwrap();
    vec![src, dst]
}

/// Accessible mappings of 4 MiB to 256 MiB: guest RAM (every backend here is 4 or 32 MiB)
/// and nothing of the allocator's, whose arenas come and go per thread (their heaps start
/// at 132 KiB, their 64 MiB reservations are inaccessible). Under ThreadSanitizer
/// (`HOSTMEM_TSAN`, set by scripts/tsan) its shadow of each guest's RAM stays mapped after the
/// guest goes, so there the count is 0 and only the fds are compared (the plain run in
/// `cargo test` compares both).
fn big_mappings() -> usize {
    if std::env::var_os("HOSTMEM_TSAN").is_some() {
        return 0;
    }
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let mut f = l.split_whitespace();
            let range = f.next().unwrap();
            let perms = f.next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let size = u64::from_str_radix(b, 16).unwrap() - u64::from_str_radix(a, 16).unwrap();
            !perms.starts_with("---") && (4 << 20..=256 << 20).contains(&size)
        })
        .count()
}

#[test]
fn machines_preallocate_migrate_and_change_layout_at_once() {
    // The mapping count sees a guest's RAM: one machine adds to it, and its removal takes it
    // back.
    let idle = big_mappings();
    let probe = machine("probe", false);
    if std::env::var_os("HOSTMEM_TSAN").is_none() {
        assert!(big_mappings() > idle, "a machine's RAM is not counted");
    }
    registry::remove(probe).unwrap();
    assert_eq!(big_mappings(), idle);
    let mut baseline = None;
    let rounds = rounds(8);
    for round in 0..rounds {
        let start = Barrier::new(WORKERS);
        let made: Vec<MachineId> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..WORKERS)
                .map(|index| {
                    let start = &start;
                    s.spawn(move || {
                        start.wait();
                        worker(round, index)
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        assert_eq!(made.len(), 2 * WORKERS);
        for id in &made {
            assert!(!registry::exists(*id), "machine {id} is still registered");
        }
        let now = (open_fds().len(), big_mappings());
        // The first round settles what the process keeps for good; every later round must
        // end where it did.
        match baseline {
            None => baseline = Some(now),
            Some(b) => assert_eq!(now, b, "round {round}: (fds, mappings) leaked"),
        }
        eprintln!(
            "round {round}: {} machines, {} fds, {} mappings of 4-256 MiB",
            made.len(),
            now.0,
            now.1
        );
    }
    let _ = std::fs::remove_dir_all(scratch("").trim_end_matches('/'));
}
