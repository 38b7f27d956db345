//! What every bench shares with `scripts/bench`: how many rounds, whether this is the short
//! form, and the `RESULT` lines the script reads (one per case and side, every round's time).
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// `HOSTMEM_BENCH=quick`: one round of small sizes, so the machinery is run by the test
/// suite and never rots.
pub fn quick() -> bool {
    std::env::var("HOSTMEM_BENCH").is_ok_and(|v| v == "quick")
}

/// Rounds per case: `HOSTMEM_BENCH_ROUNDS`, else 1 in the short form and 5 otherwise.
pub fn rounds() -> usize {
    std::env::var("HOSTMEM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(if quick() { 1 } else { 5 })
}

/// `HOSTMEM_BENCH_CASES=a,b`: only the cases whose name contains one of the comma-separated
/// strings run (to look at one case by hand with `cargo bench`; `scripts/bench` runs all).
pub fn selected(case: &str) -> bool {
    match std::env::var("HOSTMEM_BENCH_CASES") {
        Ok(v) if !v.is_empty() => v.split(',').any(|s| case.contains(s)),
        _ => true,
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One case's times on one side. `x` places a scaling case on the plot's axis (the region
/// count, ...); `note` says what the figure is when that is not obvious.
pub fn report(group: &str, case: &str, side: &str, x: Option<f64>, times: &[Duration]) {
    let secs: Vec<String> = times
        .iter()
        .map(|t| format!("{:.9}", t.as_secs_f64()))
        .collect();
    let x = x.map_or("null".to_string(), |x| format!("{x}"));
    println!(
        "RESULT {{\"group\":{},\"case\":{},\"side\":{},\"x\":{},\"secs\":[{}]}}",
        json_str(group),
        json_str(case),
        json_str(side),
        x,
        secs.join(",")
    );
}

/// A fact the report prints beside the table (a stream size, a count of notifications).
pub fn fact(group: &str, name: &str, value: &str) {
    println!(
        "FACT {{\"group\":{},\"name\":{},\"value\":{}}}",
        json_str(group),
        json_str(name),
        json_str(value)
    );
}

/// Times `f` once.
pub fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let v = f();
    (t.elapsed(), v)
}

/// A measured quantity that is not a time (a stream's size in bytes, a count of records):
/// the report prints it and checks it against its target, if it has one.
pub fn quantity(group: &str, name: &str, value: f64, unit: &str) {
    println!(
        "QUANTITY {{\"group\":{},\"name\":{},\"value\":{},\"unit\":{}}}",
        json_str(group),
        json_str(name),
        value,
        json_str(unit)
    );
}

/// Waits until the host has taken back the memory freed lately (free page reporting's
/// `reported_kib` has not moved for three polls, at most 30 s), as `scripts/bench` does before
/// each run: memory freed by one run and not yet reported would make the next run's first
/// touches warm, and runs would interfere. Nothing to wait for without page reporting.
pub fn wait_reported() {
    const REPORTED: &str = "/sys/module/page_reporting/parameters/reported_kib";
    let read = || {
        std::fs::read_to_string(REPORTED)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let Some(mut last) = read() else {
        return;
    };
    // The kernel reports freed memory in a pass that starts 2 s after the memory is freed
    // (PAGE_REPORTING_DELAY): a counter that has not moved yet has not started.
    std::thread::sleep(Duration::from_millis(2500));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut still = 0;
    while Instant::now() < deadline && still < 3 {
        std::thread::sleep(Duration::from_millis(300));
        let now = read();
        still = if now == Some(last) { still + 1 } else { 0 };
        last = now.unwrap_or(last);
    }
}
