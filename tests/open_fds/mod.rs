//! The listing of open descriptors that the leak checks of tests/faults.rs,
//! tests/concurrency.rs and tests/races.rs compare before and after.

/// What this process's open descriptors point at, sorted, leaving out the one that reads them
/// and the pipes to a sanitizer's symbolizer: ThreadSanitizer starts one (llvm-symbolizer,
/// else addr2line) as a child the first time it must name a frame, to match a suppression,
/// and keeps its pipes open for good, so under scripts/tsan they appear whenever the first
/// intended race does.
pub fn open_fds() -> Vec<String> {
    let symbolizer_pipes = symbolizer_pipes();
    let mut v: Vec<String> = links("/proc/self/fd")
        .into_iter()
        .filter(|l| !l.contains("/proc/") && !symbolizer_pipes.contains(l))
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
