//! The memslot cost preflight on a real VM: its estimate against what KVM really takes from the
//! host (the kernel memory charged to this process's memory cgroup), and the refusal of a guest
//! this host cannot afford, before any slot is registered. Alone in its own test binary, its
//! tests one at a time (a lock), so that nothing else charges kernel memory while one measures.

mod kvm_support;

use hostmem::backend::{Backend, BackendDefaults};
use hostmem::kvm::cost::{human, Available, Paging, Preflight};
use hostmem::kvm::LISTENER_NAME;
use hostmem::machine::Machine;
use hostmem::memory::MemorySystem;
use hostmem::options::cmdline::Cmdline;
use hostmem::testing::machines::none_board;
use kvm_support::*;
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Kernel memory charged so far to this process's memory cgroup: v2's `kernel` (or `vmalloc`)
/// of memory.stat, v1's memory.kmem.usage_in_bytes. KVM's slot metadata is vmalloc'ed with
/// GFP_KERNEL_ACCOUNT, so it is charged here. None when no memory cgroup is found.
fn cgroup_kernel_memory() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.is_empty() {
            let stat = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.stat"));
            if let Ok(stat) = stat {
                let field = |name: &str| {
                    stat.lines()
                        .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                };
                if let Some(v) = field("kernel ").or_else(|| field("vmalloc ")) {
                    return Some(v);
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let file = format!("/sys/fs/cgroup/memory{path}/memory.kmem.usage_in_bytes");
            if let Some(v) = std::fs::read_to_string(file)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                return Some(v);
            }
        }
    }
    None
}

/// A sparse RAM region of `size` (reserve=off: nothing is backed) mapped at 0.
fn sparse_system(size: u64) -> (MemorySystem, Backend) {
    let mut backend =
        Backend::new("memory-backend-ram", "ram", &BackendDefaults::default()).unwrap();
    backend.set("size", &size.to_string()).unwrap();
    backend.set("reserve", "off").unwrap();
    backend.complete().unwrap();
    let mut mem = MemorySystem::new();
    let ram = mem
        .new_ram_region("ram", backend.mapping().unwrap(), 0, size, false)
        .unwrap();
    let sys = mem.system_memory();
    mem.add_subregion(sys, 0, ram, None).unwrap();
    (mem, backend)
}

/// The median of `f` over five runs: one measurement can catch an unrelated allocation.
fn median(mut f: impl FnMut() -> i64) -> i64 {
    let mut v: Vec<i64> = (0..5).map(|_| f()).collect();
    v.sort();
    v[2]
}

fn within_20_percent(what: &str, estimate: u64, measured: i64) {
    let ratio = measured as f64 / estimate as f64;
    eprintln!(
        "{what}: estimate {} bytes, measured {} bytes (measured/estimate {ratio:.3})",
        estimate, measured
    );
    assert!(
        (0.8..=1.2).contains(&ratio),
        "{what}: the estimate {estimate} is not within 20% of the measured {measured}"
    );
}

#[test]
fn the_estimate_is_within_20_percent_of_what_kvm_takes() {
    let _one = ONE_AT_A_TIME.lock().unwrap();
    if !kvm_usable() {
        return;
    }
    let Some(_) = cgroup_kernel_memory() else {
        let msg = "no memory cgroup with kernel-memory accounting to measure KVM's cost in";
        if under_ci_pub() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return;
    };
    let size = 16 * GIB;
    let paging = Paging::of_host();
    let preflight = Preflight::new(paging, Available::of_host);
    let (mut mem, _backend) = sparse_system(size);
    let kvm = open_kvm(0).unwrap();
    let planned = kvm.table().planned_slots(&mem.current_sections()).unwrap();
    assert_eq!(planned, vec![(size, false)]);
    let estimate = preflight.estimate(&planned);
    let logging_estimate = preflight.estimate(&[(size, true)]) - estimate;

    // Registering: the slot's metadata appears at once (nothing of the guest is backed).
    let registering = median(|| {
        let before = cgroup_kernel_memory().unwrap() as i64;
        mem.add_listener(Box::new(kvm.listener())).unwrap();
        let after = cgroup_kernel_memory().unwrap() as i64;
        assert_eq!(kvm.slots().len(), 1);
        mem.remove_listener(LISTENER_NAME).unwrap();
        assert!(kvm.slots().is_empty());
        after - before
    });
    eprintln!("paging: {}", paging.describe());
    within_20_percent("registering 16 GiB", estimate, registering);

    // Dirty logging adds the two bitmaps.
    mem.add_listener(Box::new(kvm.listener())).unwrap();
    let logging = median(|| {
        let before = cgroup_kernel_memory().unwrap() as i64;
        kvm.log_start().unwrap();
        let after = cgroup_kernel_memory().unwrap() as i64;
        kvm.log_stop().unwrap();
        after - before
    });
    within_20_percent("dirty logging for 16 GiB", logging_estimate, logging);
    mem.remove_listener(LISTENER_NAME).unwrap();
}

/// A machine whose RAM (`-m`, or the backend given) sits at guest-physical 0, in one
/// section, as the board's init would map it.
fn machine(args: &[&str]) -> Machine {
    let mut machine = Machine::from_cmdline(&Cmdline::parse(args).unwrap(), &none_board()).unwrap();
    let ram = machine.config().unwrap().ram.unwrap();
    let mem = machine.memory_mut();
    let sys = mem.system_memory();
    mem.add_subregion(sys, 0, ram, None).unwrap();
    machine
}

#[test]
fn a_9_tib_guest_this_host_cannot_afford_is_refused_before_any_slot_is_registered() {
    let _one = ONE_AT_A_TIME.lock().unwrap();
    if !kvm_usable() {
        return;
    }
    // The estimator alone first: on a host where 9 TiB of slots would fit, this test cannot
    // show a refusal (and must not try to register them).
    let preflight = Preflight::of_host();
    let planned = [(8 * TIB - 4096, false), (TIB + 4096, false)];
    if preflight.check(&planned).is_ok() {
        let msg = format!(
            "this host could afford 9 TiB of slots ({} estimated, {} spare): no refusal to show",
            human(preflight.estimate(&planned)),
            human(Available::of_host().spare())
        );
        if under_ci_pub() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return;
    }
    let mut machine = machine(&[
        "-accel",
        "kvm",
        "-m",
        "9T",
        "-object",
        "memory-backend-ram,id=ram,size=9T,reserve=off",
        "-M",
        "memory-backend=ram",
    ]);
    let kernel_before = cgroup_kernel_memory();
    let e = machine.finish_init().unwrap_err();
    let kernel_after = cgroup_kernel_memory();
    let msg = e.message();
    eprintln!("{msg}");
    let (estimate_words, rest) = msg
        .strip_prefix("registering 9 TiB of KVM memory slots would take about ")
        .and_then(|m| m.split_once(" of kernel memory on this host ("))
        .unwrap_or_else(|| panic!("{msg}"));
    assert_eq!(estimate_words, human(preflight.estimate(&planned)));
    assert!(
        rest.starts_with("10.02 bytes per 4 KiB page with shadow paging), more than the ")
            || preflight.paging != Paging::Shadow,
        "{msg}"
    );
    assert!(rest.contains(" it can spare (MemAvailable "), "{msg}");
    assert!(rest.ends_with(" kept for the rest of the host)"), "{msg}");
    assert_eq!(
        e.hint(),
        Some(
            "-accel kvm,memslot-preflight=off registers them anyway, at the risk of the host's \
             OOM killer\n"
        )
    );
    assert_eq!(e.class(), hostmem::HmErrorClass::Kvm);
    // Nothing was registered: no VM stays attached, and the kernel took nothing for slots
    // (8 TiB of them would be 20 GiB).
    assert!(machine.kvm().is_none());
    if let (Some(before), Some(after)) = (kernel_before, kernel_after) {
        assert!(
            after < before + 64 * MIB,
            "kernel memory grew by {} bytes",
            after as i64 - before as i64
        );
    }
}

#[test]
fn the_preflight_is_on_by_default_and_off_with_the_accel_property() {
    let _one = ONE_AT_A_TIME.lock().unwrap();
    if !kvm_usable() {
        return;
    }
    // A guest the host can afford registers either way; with the property off, the table
    // has no preflight to consult.
    let mut m = machine(&["-accel", "kvm,memslot-preflight=off", "-m", "64M"]);
    m.finish_init().unwrap();
    let kvm = m.kvm().unwrap();
    assert!(kvm.table().preflight().is_none());
    assert_eq!(kvm.slots().len(), 1);
    let mut m = machine(&["-accel", "kvm", "-m", "64M"]);
    m.finish_init().unwrap();
    assert!(m.kvm().unwrap().table().preflight().is_some());
    assert_eq!(m.kvm().unwrap().slots().len(), 1);
}
