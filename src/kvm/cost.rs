//! What memslots cost the host kernel, and the preflight that refuses slots the host cannot
//! afford before any is registered.
//!
//! x86 KVM allocates per-slot metadata when a slot is created, for every 4 KiB guest page of
//! it, whether or not anything backs it:
//! - the reverse maps (8 bytes per page, and per 2 MiB and 1 GiB frame), unless the TDP MMU
//!   runs the VM (it allocates them only if a shadow page table is ever needed);
//! - write tracking (2 bytes per page) when the host has no two-dimensional paging at all
//!   (shadow paging: no EPT / NPT, or a paravirtual host such as PVM);
//! - the huge-page bookkeeping (4 bytes per 2 MiB and per 1 GiB frame), always;
//! - with dirty logging on, two bitmaps of one bit per page.
//!
//! On this project's hosts (shadow paging) that is ~10.02 bytes per page: ~20 GiB for an 8 TiB
//! slot, which a 24 GiB host pays at once. QEMU registers such slots and the kernel's OOM
//! killer picks victims among the host's other processes; hostmem estimates first and refuses
//! with the numbers. `tests/kvm_cost.rs` measures the real cost (the memory cgroup's kernel
//! memory) against this estimate: on this project's hosts
//! they agree to within 0.1%.

use super::error::KvmError;

/// How the host's KVM maps guest memory, which decides what a slot costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paging {
    /// No EPT / NPT (or a paravirtual host): reverse maps and write tracking.
    Shadow,
    /// EPT / NPT with the TDP MMU off (`kvm.tdp_mmu=N`): reverse maps.
    TdpWithoutTdpMmu,
    /// EPT / NPT with the TDP MMU: only the huge-page bookkeeping up front.
    TdpMmu,
}

impl Paging {
    /// Reads the module parameters: `kvm.tdp_mmu`, and `kvm_intel.ept` / `kvm_amd.npt` for
    /// whichever vendor module is loaded. A host where neither says two-dimensional paging
    /// is on (another vendor module, or none readable) counts as shadow paging: the dearest.
    pub fn of_host() -> Paging {
        Self::from_params(&|path| std::fs::read_to_string(path).ok())
    }

    /// [`Self::of_host`] over a reader of `/sys/module/...` files (tests give their own).
    pub fn from_params(read: &dyn Fn(&str) -> Option<String>) -> Paging {
        let yes = |path: &str| read(path).is_some_and(|v| matches!(v.trim(), "Y" | "y" | "1"));
        let tdp = yes("/sys/module/kvm_intel/parameters/ept")
            || yes("/sys/module/kvm_amd/parameters/npt");
        if !tdp {
            Paging::Shadow
        } else if yes("/sys/module/kvm/parameters/tdp_mmu") {
            Paging::TdpMmu
        } else {
            Paging::TdpWithoutTdpMmu
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Paging::Shadow => "shadow paging",
            Paging::TdpWithoutTdpMmu => "two-dimensional paging without the TDP MMU",
            Paging::TdpMmu => "the TDP MMU",
        }
    }
}

const PAGE: u64 = 4096;
/// 4 KiB pages per 2 MiB and per 1 GiB frame.
const PAGES_2M: u64 = 512;
const PAGES_1G: u64 = 512 * 512;

/// Kernel memory, in bytes, for one slot of `bytes` (rounded up to whole 4 KiB pages).
pub fn slot_cost(paging: Paging, bytes: u64, logging: bool) -> u64 {
    let pages = bytes.div_ceil(PAGE);
    // A slot's frames of each huge size, counting a partial one at each end.
    let frames_2m = pages.div_ceil(PAGES_2M) + 1;
    let frames_1g = pages.div_ceil(PAGES_1G) + 1;
    let mut cost = 4 * (frames_2m + frames_1g);
    if paging != Paging::TdpMmu {
        cost += 8 * (pages + frames_2m + frames_1g);
    }
    if paging == Paging::Shadow {
        cost += 2 * pages;
    }
    if logging {
        cost += dirty_bitmap_cost(bytes);
    }
    cost
}

/// The two dirty bitmaps (one bit per page, whole longs) that logging adds to a slot.
pub fn dirty_bitmap_cost(bytes: u64) -> u64 {
    2 * bytes.div_ceil(PAGE).div_ceil(64) * 8
}

/// What the host can give the kernel for new slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Available {
    /// `MemAvailable` of /proc/meminfo.
    pub mem_available: u64,
    /// What the process's memory cgroup still allows, when it has a limit (KVM charges its
    /// slot metadata to it).
    pub cgroup_room: Option<u64>,
    /// Kept for everything else on the host: 1/32 of its memory, at least 256 MiB.
    pub headroom: u64,
}

impl Available {
    /// Reads /proc/meminfo and the memory cgroup (v2 `memory.max`, or v1
    /// `memory.limit_in_bytes`) of this process.
    pub fn of_host() -> Available {
        let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|k| k * 1024)
        };
        let total = kib("MemTotal:").unwrap_or(0);
        Available {
            mem_available: kib("MemAvailable:").unwrap_or(0),
            cgroup_room: cgroup_room(),
            headroom: (total / 32).max(256 << 20),
        }
    }

    /// What slots may take: the smaller of the host's and the cgroup's room, less the headroom.
    pub fn spare(&self) -> u64 {
        self.cgroup_room
            .unwrap_or(u64::MAX)
            .min(self.mem_available)
            .saturating_sub(self.headroom)
    }

    fn describe(&self) -> String {
        let mut s = format!("MemAvailable {}", human(self.mem_available));
        if let Some(room) = self.cgroup_room {
            s += &format!(", memory cgroup room {}", human(room));
        }
        s + &format!(
            ", less {} kept for the rest of the host",
            human(self.headroom)
        )
    }
}

/// The memory cgroup's remaining room, if it has a limit.
fn cgroup_room() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let num =
        |path: String| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (limit, usage) = if controllers.is_empty() {
            let dir = format!("/sys/fs/cgroup{path}");
            (
                num(format!("{dir}/memory.max")),
                num(format!("{dir}/memory.current")),
            )
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            (
                num(format!("{dir}/memory.limit_in_bytes")),
                num(format!("{dir}/memory.usage_in_bytes")),
            )
        } else {
            continue;
        };
        // "max" (v2) does not parse; v1's "unlimited" is a number near 2^63.
        if let (Some(limit), Some(usage)) = (limit, usage) {
            if limit < 1 << 62 {
                return Some(limit.saturating_sub(usage));
            }
        }
    }
    None
}

/// Sizes as people read them: "22.5 GiB", "768 MiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Refuses slots whose estimated kernel memory the host cannot spare. Off with
/// `-accel kvm,memslot-preflight=off`.
#[derive(Clone)]
pub struct Preflight {
    pub paging: Paging,
    available: std::sync::Arc<dyn Fn() -> Available + Send + Sync>,
}

impl std::fmt::Debug for Preflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preflight")
            .field("paging", &self.paging)
            .finish_non_exhaustive()
    }
}

impl Preflight {
    /// This host's paging and memory, read at each check.
    pub fn of_host() -> Preflight {
        Self::new(Paging::of_host(), Available::of_host)
    }

    /// A preflight over given facts (tests).
    pub fn new(paging: Paging, available: impl Fn() -> Available + Send + Sync + 'static) -> Self {
        Preflight {
            paging,
            available: std::sync::Arc::new(available),
        }
    }

    /// The estimate for new slots of the given sizes (each with dirty logging or not).
    pub fn estimate(&self, slots: &[(u64, bool)]) -> u64 {
        slots
            .iter()
            .map(|&(bytes, logging)| slot_cost(self.paging, bytes, logging))
            .sum()
    }

    /// Refuses `slots` (sizes, logging) when their estimate exceeds what the host can spare.
    pub fn check(&self, slots: &[(u64, bool)]) -> Result<(), KvmError> {
        let estimate = self.estimate(slots);
        let bytes: u64 = slots.iter().map(|s| s.0).sum();
        self.check_estimate(bytes, estimate, "registering")
    }

    /// Refuses switching dirty logging on for slots of `bytes` in all when their bitmaps
    /// exceed what the host can spare.
    pub fn check_logging(&self, bytes: u64, slot_sizes: &[u64]) -> Result<(), KvmError> {
        let estimate = slot_sizes.iter().map(|&b| dirty_bitmap_cost(b)).sum();
        self.check_estimate(bytes, estimate, "dirty logging for")
    }

    fn check_estimate(&self, bytes: u64, estimate: u64, what: &str) -> Result<(), KvmError> {
        if estimate == 0 {
            return Ok(());
        }
        let available = (self.available)();
        if estimate <= available.spare() {
            return Ok(());
        }
        let per_page = estimate as f64 / bytes.div_ceil(PAGE).max(1) as f64;
        Err(KvmError::SlotCost(format!(
            "{what} {} of KVM memory slots would take about {} of kernel memory on this host \
             ({per_page:.2} bytes per 4 KiB page with {}), more than the {} it can spare ({})",
            human(bytes),
            human(estimate),
            self.paging.describe(),
            human(available.spare()),
            available.describe()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;

    fn params(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |path| {
            pairs
                .iter()
                .find(|(p, _)| path.ends_with(p))
                .map(|(_, v)| format!("{v}\n"))
        }
    }

    #[test]
    fn paging_is_read_from_the_module_parameters() {
        let p = |pairs| Paging::from_params(&params(pairs));
        assert_eq!(p(&[("kvm/parameters/tdp_mmu", "N")]), Paging::Shadow);
        assert_eq!(
            p(&[
                ("kvm_intel/parameters/ept", "Y"),
                ("kvm/parameters/tdp_mmu", "N")
            ]),
            Paging::TdpWithoutTdpMmu
        );
        assert_eq!(
            p(&[
                ("kvm_amd/parameters/npt", "1"),
                ("kvm/parameters/tdp_mmu", "Y")
            ]),
            Paging::TdpMmu
        );
        assert_eq!(
            p(&[
                ("kvm_intel/parameters/ept", "N"),
                ("kvm/parameters/tdp_mmu", "Y")
            ]),
            Paging::Shadow,
            "the TDP MMU needs EPT"
        );
        assert_eq!(p(&[]), Paging::Shadow, "unknown hosts count as the dearest");
    }

    #[test]
    fn a_slot_costs_what_the_kernel_allocates_for_it() {
        let pages = 64 * GIB / PAGE;
        let frames = (pages / 512 + 1) + (pages / (512 * 512) + 1);
        assert_eq!(
            slot_cost(Paging::Shadow, 64 * GIB, false),
            10 * pages + 12 * frames
        );
        assert_eq!(
            slot_cost(Paging::TdpWithoutTdpMmu, 64 * GIB, false),
            8 * pages + 12 * frames
        );
        assert_eq!(slot_cost(Paging::TdpMmu, 64 * GIB, false), 4 * frames);
        assert_eq!(
            slot_cost(Paging::TdpMmu, 64 * GIB, true),
            4 * frames + pages / 4
        );
        // A partial page costs a whole one; bitmaps come in whole longs.
        assert_eq!(
            slot_cost(Paging::Shadow, 1, true) - slot_cost(Paging::Shadow, 1, false),
            16
        );
        // About 10.02 bytes per page on shadow paging: 20 GiB for an 8 TiB slot.
        let per_page = slot_cost(Paging::Shadow, 8 * TIB, false) as f64 / (8 * TIB / PAGE) as f64;
        assert!((10.02..10.03).contains(&per_page), "{per_page}");
    }

    fn host(avail: u64) -> Available {
        Available {
            mem_available: avail,
            cgroup_room: None,
            headroom: 768 << 20,
        }
    }

    #[test]
    fn the_preflight_refuses_what_the_host_cannot_spare_and_says_why() {
        let pre = Preflight::new(Paging::Shadow, || host(21 * GIB + 600 * (1 << 20)));
        let e = pre
            .check(&[(8 * TIB - 4096, false), (TIB + 4096, false)])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "registering 9 TiB of KVM memory slots would take about 22.6 GiB of kernel memory on \
             this host (10.02 bytes per 4 KiB page with shadow paging), more than the 20.8 GiB \
             it can spare (MemAvailable 21.6 GiB, less 768 MiB kept for the rest of the host)"
        );
        pre.check(&[(8 * TIB + (2 << 20), false)]).unwrap();
        // The cgroup's limit counts when it is tighter.
        let pre = Preflight::new(Paging::Shadow, || Available {
            cgroup_room: Some(GIB),
            ..host(20 * GIB)
        });
        let e = pre.check(&[(512 * GIB, false)]).unwrap_err();
        assert!(
            e.to_string().ends_with(
                "more than the 256 MiB it can spare (MemAvailable 20 GiB, memory cgroup room \
                 1 GiB, less 768 MiB kept for the rest of the host)"
            ),
            "{e}"
        );
        // The TDP MMU makes the same guest cheap.
        let pre = Preflight::new(Paging::TdpMmu, || host(2 * GIB));
        pre.check(&[(9 * TIB, false)]).unwrap();
        let e = pre.check_logging(64 * TIB, &[64 * TIB]).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "dirty logging for 64 TiB of KVM memory slots would take about 4 GiB of kernel \
                 memory"
            ),
            "{e}"
        );
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(0), "0 bytes");
        assert_eq!(human(768 << 20), "768 MiB");
        assert_eq!(human(9 * TIB), "9 TiB");
        assert_eq!(human(22 * GIB + GIB / 2), "22.5 GiB");
    }
}
