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
