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
