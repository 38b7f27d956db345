//! What the concurrency stress tests (tests/concurrency.rs, tests/races.rs) share: their
//! rounds, the monitor, a scratch directory, and the process-wide counts and sums they check.

use hostmem::registry::{hmp, transports::HostTransports, MachineId};
use hostmem::testing::machines::main_ram;
use hostmem::Result;

/// `HOSTMEM_CONCURRENCY_ROUNDS`, else `default` (scripts/tsan sets fewer).
pub fn rounds(default: usize) -> usize {
    std::env::var("HOSTMEM_CONCURRENCY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn run(id: MachineId, line: &str) -> Result<String> {
    hmp::hmp(id, line, &HostTransports)
}

/// A path `name` in this process's scratch directory for test `test`.
pub fn scratch(test: &str, name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("hostmem-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name).display().to_string()
}

/// What this process's open descriptors point at, sorted, leaving out the pipes to a
/// sanitizer's symbolizer: ThreadSanitizer starts one (llvm-symbolizer, else addr2line) as a
/// child the first time it must name a frame, to match a suppression, and keeps its pipes open
/// for good, so under scripts/tsan they appear whenever the first intended race does.
pub fn open_fds() -> Vec<String> {
    let symbolizer_pipes = symbolizer_pipes();
    let mut v: Vec<String> = links("/proc/self/fd")
        .into_iter()
        .filter(|l| !symbolizer_pipes.contains(l))
        .collect();
    v.sort();
    v
}

fn links(dir: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            Some(
                std::fs::read_link(e.ok()?.path())
                    .ok()?
                    .display()
                    .to_string(),
            )
        })
        .collect()
}

fn symbolizer_pipes() -> Vec<String> {
    let mut pipes = Vec::new();
    for task in names("/proc/self/task") {
        let children = std::fs::read_to_string(format!("/proc/self/task/{task}/children"));
        for pid in children.unwrap_or_default().split_whitespace() {
            let cmdline =
                std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let program = cmdline.split('\0').next().unwrap_or("");
            if program.ends_with("llvm-symbolizer") || program.ends_with("addr2line") {
                pipes.extend(
                    links(&format!("/proc/{pid}/fd"))
                        .into_iter()
                        .filter(|l| l.starts_with("pipe:")),
                );
            }
        }
    }
    pipes
}

fn names(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// An FNV-1a sum over the u64 words of machine `id`'s RAM.
pub fn ram_checksum(id: MachineId) -> u64 {
    let (p, size) = main_ram(id).unwrap();
    // SAFETY: the machine's whole RAM, alive while the machine is; the caller owns the machine
    // and nothing writes the RAM meanwhile.
    let words = unsafe { std::slice::from_raw_parts(p as *const u64, (size / 8) as usize) };
    words.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &w| {
        (h ^ w).wrapping_mul(0x0100_0000_01b3)
    })
}
