//! FlatView cost: committing a map of N regions (1 000, 10 000, 100 000) in one transaction —
//! render, diff and the listener told — and adding or removing one region in a map of 10 000,
//! next to a whole render of that map (what QEMU does on every commit). Each round measures
//! every side in turn. Prints `RESULT` lines for `scripts/bench`; run it through that script,
//! or alone with `cargo bench --bench flatview`.

mod harness;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hostmem::error::Result;
use hostmem::flatview;
use hostmem::listener::{MemoryListener, MemorySection};
use hostmem::memory::MemorySystem;
use hostmem::region::RegionId;

/// Counts what it is told, as a listener that keeps a table would do its work.
struct Counter(Arc<AtomicUsize>);

impl MemoryListener for Counter {
    fn name(&self) -> &str {
        "counter"
    }
    fn region_add(&mut self, _: &MemorySection) -> Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn region_del(&mut self, _: &MemorySection) -> Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

const STRIDE: u64 = 0x2000;

/// A system with `n` 4 KiB I/O regions 8 KiB apart (I/O: the view's cost is the same as for
/// RAM, without n mappings), added in one transaction; returns the commit's time.
fn build(n: u64) -> (MemorySystem, Arc<AtomicUsize>, Duration) {
    let mut m = MemorySystem::new();
    let told = Arc::new(AtomicUsize::new(0));
    m.add_listener(Box::new(Counter(told.clone()))).unwrap();
    let sys = m.system_memory();
    m.transaction_begin();
    for i in 0..n {
        let r = m.new_io("dev", 0x1000);
        // The overlapping form: the non-overlapping one checks every sibling, which is the
        // caller's cost of building, not the view's.
        m.add_subregion(sys, i * STRIDE, r, Some(0)).unwrap();
    }
    let (t, r) = harness::time(|| m.transaction_commit());
    r.unwrap();
    (m, told, t)
}

fn full_render(m: &MemorySystem) -> Duration {
    let old = m.memory_view().clone();
    let (t, _) = harness::time(|| {
        let view = flatview::render(m, flatview::flatview_root(m, m.system_memory()));
        flatview::diff(&old, &view)
    });
    t
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds = harness::rounds();
    let sizes: &[u64] = if harness::quick() {
        &[100, 1_000, 10_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    for &n in sizes {
        let mut commit = Vec::new();
        let mut render = Vec::new();
        for _ in 0..rounds {
            let (m, told, t) = build(n);
            assert_eq!(told.load(Ordering::Relaxed) as u64, n);
            commit.push(t);
            render.push(full_render(&m));
        }
        harness::report(
            "flatview",
            &format!("commit {n} regions"),
            "hostmem",
            Some(n as f64),
            &commit,
        );
        harness::report(
            "flatview",
            &format!("commit {n} regions"),
            "whole render + diff",
            Some(n as f64),
            &render,
        );
    }

    // One region added to and removed from a map of 10 000, against a whole render of it.
    let n = 10_000;
    let (mut m, told, _) = build(n);
    let sys = m.system_memory();
    let (mut add, mut del, mut whole) = (Vec::new(), Vec::new(), Vec::new());
    let mut extra: Vec<RegionId> = Vec::new();
    for round in 0..rounds.max(1) * 20 {
        let r = m.new_io("extra", 0x1000);
        let at = (n / 2 + round as u64) * STRIDE + 0x1000;
        told.store(0, Ordering::Relaxed);
        let (t, res) = harness::time(|| m.add_subregion(sys, at, r, None));
        res.unwrap();
        assert_eq!(
            told.load(Ordering::Relaxed),
            1,
            "listeners told only of the change"
        );
        add.push(t);
        extra.push(r);
        whole.push(full_render(&m));
        told.store(0, Ordering::Relaxed);
        let (t, res) = harness::time(|| m.del_subregion(sys, r));
        res.unwrap();
        assert_eq!(
            told.load(Ordering::Relaxed),
            1,
            "listeners told only of the change"
        );
        del.push(t);
        m.destroy_region(r).unwrap();
    }
    harness::report("flatview", "add 1 region to 10000", "hostmem", None, &add);
    harness::report(
        "flatview",
        "add 1 region to 10000",
        "whole render + diff",
        None,
        &whole,
    );
    harness::report(
        "flatview",
        "remove 1 region of 10000",
        "hostmem",
        None,
        &del,
    );
    harness::report(
        "flatview",
        "remove 1 region of 10000",
        "whole render + diff",
        None,
        &whole,
    );
    harness::fact(
        "flatview",
        "listener calls per single-region change",
        "1 (checked every round)",
    );
}
