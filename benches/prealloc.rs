//! Preallocation speed: the same 512 MiB anonymous backend preallocated with
//! `prealloc-threads=1` (the baseline, measured in the same run) and with 2 threads, reported
//! as a ratio. Run with `cargo bench --bench prealloc`.

use std::time::{Duration, Instant};

use hostmem::backend::{Backend, BackendDefaults};

const SIZE: &str = "512M";
const ROUNDS: usize = 5;

fn prealloc_once(threads: u32) -> Duration {
    let mut b =
        Backend::new("memory-backend-ram", "bench", &BackendDefaults::default()).expect("backend");
    b.set("size", SIZE).expect("size");
    b.set("prealloc-threads", &threads.to_string())
        .expect("threads");
    b.set("prealloc", "on").expect("prealloc");
    let start = Instant::now();
    b.complete().expect("complete");
    let took = start.elapsed();
    drop(b); // unmapped before the next round
    took
}

fn best_of(threads: u32) -> Duration {
    (0..ROUNDS)
        .map(|_| prealloc_once(threads))
        .min()
        .expect("rounds > 0")
}

fn main() {
    let one = best_of(1);
    let two = best_of(2);
    println!("prealloc {SIZE}: 1 thread {:?}, 2 threads {:?}", one, two);
    println!(
        "speedup with 2 threads (baseline: 1 thread, same run): {:.2}x",
        one.as_secs_f64() / two.as_secs_f64()
    );
}
