//! One machine touched from several threads at once, in several machines at once: a backend
//! preallocated (unlocked) while another thread tries to delete it, a source's layout changed
//! while it migrates over a unix socket, a migration stalled by its peer cancelled, and a
//! reader dumping every live machine meanwhile. (tests/concurrency.rs runs whole machine
//! lifecycles side by side; this one makes operations on one machine race.) What must hold
//! every time:
//!
//! * a destination's RAM equals its source's, whatever layout changes ran during the migration;
//! * a backend being preallocated (unlocked) cannot be deleted, and ends complete and then
//!   deletable;
//! * a cancelled migration leaves its source running;
//! * no machine's dump names another machine's objects;
//! * at the end no machine, file descriptor or guest-RAM mapping is left.
//!
//! `HOSTMEM_CONCURRENCY_ROUNDS` sets the rounds per worker (scripts/tsan runs fewer under
//! ThreadSanitizer, and `HOSTMEM_TSAN=1` skips the mapping count: TSan keeps its shadow of
//! freed memory mapped).

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hostmem::registry::{self, MachineId};
use hostmem::testing::machines::{main_ram, none_machine};

mod open_fds;
mod stress_support;
use open_fds::open_fds;
use stress_support::{ram_checksum, run};

const MIB: u64 = 1 << 20;
const WORKERS: usize = 4;
/// Guest RAM of every migrating machine.
const RAM_MIB: u64 = 32;

fn iterations() -> usize {
    stress_support::rounds(4)
}

fn scratch(name: &str) -> String {
    stress_support::scratch("races", name)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn migration_status(id: MachineId) -> String {
    let info = run(id, "info migrate").unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("Migration status: "))
        .unwrap_or("none")
        .to_string()
}

/// A deterministic pattern: a third of the pages full of `seed`-derived bytes, the rest zero.
fn fill(id: MachineId, seed: u64) {
    let (p, size) = main_ram(id).unwrap();
    let mut x = seed | 1;
    for page in (0..size / 4096).step_by(3) {
        for word in 0..512 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // SAFETY: inside the machine's RAM, which only this worker writes.
            unsafe {
                (p.add((page * 4096) as usize) as *mut u64)
                    .add(word)
                    .write(x)
            };
        }
    }
}

/// Mappings of memfd backends' memory: every machine here has only those.
fn memfd_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("memfd:memory-backend-memfd"))
        .count()
}

/// Every worker's objects carry its tag `w<N>i<M>`; a dump must name no other tag.
fn foreign_tags<'a>(dump: &'a str, own: &str) -> Vec<&'a str> {
    dump.split(|c: char| !(c.is_ascii_alphanumeric()))
        .filter(|t| {
            let mut parts = t.strip_prefix('w').map(|r| r.splitn(2, 'i'));
            let is_tag = parts.as_mut().is_some_and(|p| {
                p.next().is_some_and(|a| a.parse::<u32>().is_ok())
                    && p.next().is_some_and(|b| b.parse::<u32>().is_ok())
            });
            is_tag && *t != own
        })
        .collect()
}

/// The machines alive now, by id, with their worker's tag: what the reader dumps.
type Live = Mutex<HashMap<MachineId, String>>;

fn machine(live: &Live, tag: &str, args: &[&str]) -> MachineId {
    let id = none_machine(args).unwrap_or_else(|e| panic!("{tag}: {}", e.message()));
    live.lock().unwrap().insert(id, tag.to_string());
    id
}

fn remove(live: &Live, id: MachineId) {
    live.lock().unwrap().remove(&id);
    registry::remove(id).unwrap();
    assert!(!registry::exists(id));
}

fn memfd_ram_args(tag: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "-object".to_string(),
        format!("memory-backend-memfd,id={tag}-ram,size={RAM_MIB}M,prealloc=on,prealloc-threads=2"),
        "-machine".to_string(),
        format!("memory-backend={tag}-ram"),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn argv(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A backend preallocated with the machine unlocked while another thread keeps trying to
/// delete it: every refusal says why, and the backend ends complete, then deleted.
fn preallocate_against_a_deleter(live: &Live, tag: &str, stats: &Stats) {
    let m = machine(live, tag, &argv(&memfd_ram_args(tag, &[])));
    for k in 0..2 {
        let id = format!("{tag}-p{k}");
        registry::with(m, |mm| {
            mm.add_backend_uncompleted(&format!(
                "memory-backend-memfd,id={id},size=128M,prealloc=on,prealloc-threads={}",
                1 + k
            ))
        })
        .unwrap();
        std::thread::scope(|s| {
            let deleter = s.spawn(|| {
                // Waits for the completion to start (or end), then deletes until it may.
                wait_for("the completion to start", || {
                    registry::with(m, |mm| {
                        Ok(mm
                            .objects()
                            .get(&id)
                            .is_some_and(|e| e.backend.is_completing() || e.backend.is_complete()))
                    })
                    .unwrap()
                });
                loop {
                    // Whether it was complete is read under the same lock as the delete.
                    let deleted = registry::with(m, |mm| {
                        let complete = mm.objects().get(&id).map(|e| e.backend.is_complete());
                        mm.delete_backend(&id).map(|()| complete)
                    });
                    match deleted {
                        Ok(complete) => {
                            assert_eq!(complete, Some(true), "{id} deleted before it was complete");
                            return;
                        }
                        Err(e) => {
                            assert_eq!(
                                e.message(),
                                format!(
                                    "object '{id}' is in use, can not be deleted: it is being preallocated"
                                ),
                                "{id}"
                            );
                            stats.refused_deletes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            registry::complete_backend(m, &id, true)
                .unwrap_or_else(|e| panic!("{id}: {}", e.message()));
            deleter.join().unwrap();
        });
        registry::with(m, |mm| {
            assert!(mm.objects().get(&id).is_none(), "{id} is gone");
            Ok(())
        })
        .unwrap();
        stats.preallocated.fetch_add(1, Ordering::Relaxed);
    }
    remove(live, m);
}

/// A migration over a unix socket while the source's layout changes under it (aliases of its
/// RAM mapped and unmapped high in its address space): the destination gets the same RAM.
fn migrate_while_the_layout_changes(live: &Live, tag: &str, seed: u64, stats: &Stats) {
    let src = machine(live, tag, &argv(&memfd_ram_args(tag, &[])));
    fill(src, seed);
    let want = ram_checksum(src);
    let dst = machine(
        live,
        tag,
        &argv(&memfd_ram_args(tag, &["-incoming", "defer"])),
    );
    let sock = scratch(&format!("{tag}.sock"));
    run(dst, &format!("migrate_incoming unix:{sock}")).unwrap();
    // A limit keeps the migration going while the layout changes.
    run(src, "migrate_set_parameter max-bandwidth 256M").unwrap();
    run(src, &format!("migrate -d unix:{sock}")).unwrap();
    let mut k = 0u64;
    loop {
        let status = migration_status(src);
        if status == "completed" {
            break;
        }
        assert!(
            status == "setup" || status == "active" || status == "device",
            "{tag}: migration {status}: {}",
            run(src, "info migrate").unwrap()
        );
        registry::with(src, |m| {
            let ram = m.config().and_then(|c| c.ram).unwrap();
            let mem = m.memory_mut();
            let sys = mem.system_memory();
            let alias = mem.new_alias(&format!("{tag}-alias{k}"), ram, (k % 8) * MIB, MIB)?;
            mem.add_subregion(sys, (1u64 << 32) + (k % 16) * 2 * MIB, alias, None)?;
            mem.del_subregion(sys, alias)?;
            mem.destroy_region(alias)
        })
        .unwrap_or_else(|e| panic!("{tag}: layout change: {}", e.message()));
        k += 1;
    }
    stats
        .layout_changes
        .fetch_add(k as usize, Ordering::Relaxed);
    wait_for("the destination to load", || {
        migration_status(dst) == "completed"
    });
    assert_eq!(
        ram_checksum(dst),
        want,
        "{tag}: the destination's RAM differs"
    );
    assert_eq!(ram_checksum(src), want, "{tag}: the source's RAM changed");
    let blocks = run(dst, "info ramblock").unwrap();
    assert!(blocks.contains(&format!("{tag}-ram")), "{blocks}");
    assert_eq!(run(dst, "info status").unwrap(), "VM status: running\n");
    remove(live, src);
    remove(live, dst);
    assert!(!std::path::Path::new(&sock).exists());
    stats.migrations.fetch_add(1, Ordering::Relaxed);
}

/// A peer that accepts and never reads: the source stays active until cancelled, then runs.
fn cancel_a_stalled_migration(live: &Live, tag: &str, seed: u64, stats: &Stats) {
    let src = machine(live, tag, &argv(&memfd_ram_args(tag, &[])));
    fill(src, seed);
    let path = scratch(&format!("{tag}-stall.sock"));
    let listener = UnixListener::bind(&path).unwrap();
    run(src, &format!("migrate -d unix:{path}")).unwrap();
    let (held, _) = listener.accept().unwrap();
    wait_for("the source to send", || migration_status(src) == "active");
    run(src, "migrate_cancel").unwrap();
    wait_for("the cancel", || migration_status(src) == "cancelled");
    assert_eq!(run(src, "info status").unwrap(), "VM status: running\n");
    drop(held);
    drop(listener);
    std::fs::remove_file(&path).unwrap();
    remove(live, src);
    stats.cancelled.fetch_add(1, Ordering::Relaxed);
}

#[derive(Default)]
struct Stats {
    migrations: AtomicUsize,
    cancelled: AtomicUsize,
    preallocated: AtomicUsize,
    refused_deletes: AtomicUsize,
    layout_changes: AtomicUsize,
    dumps: AtomicUsize,
}

/// Dumps every live machine until told to stop: each dump names only its own machine's tag.
/// A machine may go between listing and dumping; then the error is the registry's.
fn dump_everything(live: &Live, stop: &AtomicBool, stats: &Stats) {
    while !stop.load(Ordering::SeqCst) {
        let machines: Vec<(MachineId, String)> = live
            .lock()
            .unwrap()
            .iter()
            .map(|(i, t)| (*i, t.clone()))
            .collect();
        for (id, tag) in machines {
            for cmd in ["info ramblock", "info mtree -f", "info memdev"] {
                match run(id, cmd) {
                    Ok(dump) => {
                        let foreign = foreign_tags(&dump, &tag);
                        assert!(
                            foreign.is_empty(),
                            "{cmd} of {tag} names {foreign:?}:\n{dump}"
                        );
                        stats.dumps.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => assert!(
                        !registry::exists(id),
                        "{cmd} of live machine {tag}: {}",
                        e.message()
                    ),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn machines_preallocate_migrate_and_change_layout_at_once_and_leave_nothing() {
    // One warm-up machine: lazily created process-wide state (signal guards, thread pools,
    // allocator arenas) is not a leak.
    let warm = none_machine(&argv(&memfd_ram_args("w9i9", &[]))).unwrap();
    registry::remove(warm).unwrap();
    let (fds_before, maps_before) = (open_fds(), memfd_mappings());
    let live = Live::default();
    let stats = Stats::default();
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|s| {
        let reader = s.spawn(|| dump_everything(&live, &stop, &stats));
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (live, stats) = (&live, &stats);
                s.spawn(move || {
                    for i in 0..iterations() {
                        let tag = format!("w{w}i{i}");
                        let seed = (w as u64) << 32 | i as u64;
                        // Workers start on different steps, so every pairing of steps overlaps.
                        for step in 0..3 {
                            match (step + w) % 3 {
                                0 => preallocate_against_a_deleter(live, &tag, stats),
                                1 => migrate_while_the_layout_changes(live, &tag, seed, stats),
                                _ => cancel_a_stalled_migration(live, &tag, seed, stats),
                            }
                        }
                    }
                })
            })
            .collect();
        let failed = workers.into_iter().map(|w| w.join()).find_map(|r| r.err());
        stop.store(true, Ordering::SeqCst);
        reader.join().unwrap();
        if let Some(panic) = failed {
            std::panic::resume_unwind(panic);
        }
    });
    let n = WORKERS * iterations();
    assert_eq!(stats.migrations.load(Ordering::Relaxed), n);
    assert_eq!(stats.cancelled.load(Ordering::Relaxed), n);
    assert_eq!(stats.preallocated.load(Ordering::Relaxed), 2 * n);
    assert!(
        stats.dumps.load(Ordering::Relaxed) > 0,
        "the reader dumped nothing"
    );
    assert!(live.lock().unwrap().is_empty());
    let fds_after = open_fds();
    assert_eq!(
        fds_after.len(),
        fds_before.len(),
        "file descriptors left open: before {fds_before:?}, after {fds_after:?}"
    );
    if std::env::var_os("HOSTMEM_TSAN").is_none() {
        assert_eq!(memfd_mappings(), maps_before, "guest RAM left mapped");
    }
    println!(
        "stress: {WORKERS} workers x {} iterations in {:.1} s: {n} migrations with {} layout \
         changes during them, {n} cancelled, {} backends preallocated against a deleter ({} \
         deletes refused while preallocating), {} dumps",
        iterations(),
        started.elapsed().as_secs_f64(),
        stats.layout_changes.load(Ordering::Relaxed),
        stats.preallocated.load(Ordering::Relaxed),
        stats.refused_deletes.load(Ordering::Relaxed),
        stats.dumps.load(Ordering::Relaxed),
    );
}

#[test]
fn a_tag_from_another_worker_is_found_in_a_dump() {
    // The reader's check itself: it must see a foreign tag, and only that.
    assert_eq!(
        foreign_tags("w1i2-ram: 0x0 ... w3i0-alias7 w1i2", "w1i2"),
        ["w3i0"]
    );
    assert!(foreign_tags("ram pc.ram wx w1 i2 w1iz", "w0i0").is_empty());
}
