//! What a machine knows of migration between and during migrations: QEMU's parameters and
//! capabilities (as `migrate_set_parameter` / `migrate_set_capability` set them and
//! `info migrate_parameters` / `info migrate_capabilities` print them), and the progress of the
//! current or last migration (status and the statistics `info migrate` prints), shared with the
//! thread that runs it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::rate::RateLimit;
use super::stream::KNOWN_CAPABILITIES;
use crate::error::{Error, HmErrorClass};
use crate::options::values::strtosz;
use crate::progress::{self, Activity, Meter};

/// QEMU's MigrationStatus values a hostmem migration passes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationStatus {
    None,
    Setup,
    Active,
    Cancelling,
    Cancelled,
    Completed,
    Failed,
}

impl MigrationStatus {
    /// The name QEMU prints (`MigrationStatus_str`).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Active => "active",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }

    /// Whether a migration in this state has ended.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Cancelled | Self::Completed | Self::Failed)
    }
}

/// QEMU's default and ceiling of `downtime-limit` (ms) and its default `max-bandwidth`.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;

/// How a parameter's value is read and printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A size in QEMU's syntax with a unit printed after it ("ms", "bytes", ...).
    Size(&'static str),
    /// A size whose bare number means MiB (`max-bandwidth`), printed in "bytes/second".
    BandwidthMiB,
    /// An integer of at most `max`.
    Int(u64),
    Bool,
    /// A quoted string.
    Str,
    /// One of `values`.
    Enum(&'static [&'static str]),
}

/// QEMU 10's migration parameters, in `info migrate_parameters` order, with their defaults.
const PARAMETERS: &[(&str, Kind, &str)] = &[
    ("announce-initial", Kind::Size("ms"), "50"),
    ("announce-max", Kind::Size("ms"), "550"),
    ("announce-rounds", Kind::Size(""), "5"),
    ("announce-step", Kind::Size("ms"), "100"),
    ("throttle-trigger-threshold", Kind::Int(100), "50"),
    ("cpu-throttle-initial", Kind::Int(99), "20"),
    ("cpu-throttle-increment", Kind::Int(99), "10"),
    ("cpu-throttle-tailslow", Kind::Bool, "off"),
    ("max-cpu-throttle", Kind::Int(99), "99"),
    ("tls-creds", Kind::Str, ""),
    ("tls-hostname", Kind::Str, ""),
    ("max-bandwidth", Kind::BandwidthMiB, "134217728"),
    ("avail-switchover-bandwidth", Kind::BandwidthMiB, "0"),
    ("downtime-limit", Kind::Size("ms"), "300"),
    ("x-checkpoint-delay", Kind::Int(u32::MAX as u64), "20000"),
    ("multifd-channels", Kind::Int(255), "2"),
    (
        "multifd-compression",
        Kind::Enum(&["none", "zlib", "zstd", "qpl", "uadk", "qatzip"]),
        "none",
    ),
    (
        "zero-page-detection",
        Kind::Enum(&["none", "legacy", "multifd"]),
        "multifd",
    ),
    ("xbzrle-cache-size", Kind::Size("bytes"), "67108864"),
    ("max-postcopy-bandwidth", Kind::Size(""), "0"),
    ("tls-authz", Kind::Str, ""),
    ("x-vcpu-dirty-limit-period", Kind::Size("ms"), "1000"),
    ("vcpu-dirty-limit", Kind::Size("MB/s"), "1"),
    (
        "mode",
        Kind::Enum(&["normal", "cpr-reboot", "cpr-transfer"]),
        "normal",
    ),
    ("direct-io", Kind::Bool, "off"),
];

/// The migration parameters of a machine. Values are kept in their canonical printed form;
/// the ones hostmem acts on have accessors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parameters {
    values: Vec<String>,
}

impl Default for Parameters {
    fn default() -> Self {
        Parameters {
            values: PARAMETERS.iter().map(|p| p.2.to_string()).collect(),
        }
    }
}

fn invalid_parameter(name: &str) -> Error {
    Error::invalid(format!("invalid parameter value: {name}"))
}

impl Parameters {
    fn index(&self, name: &str) -> Option<usize> {
        PARAMETERS.iter().position(|p| p.0 == name)
    }

    fn number(&self, name: &str) -> u64 {
        self.index(name)
            .and_then(|i| self.values[i].parse().ok())
            .unwrap_or(0)
    }

    /// Bytes per second the migration may send; 0 means unlimited.
    pub fn max_bandwidth(&self) -> u64 {
        self.number("max-bandwidth")
    }

    /// The longest pause of the guest the migration aims for, in ms.
    pub fn downtime_limit_ms(&self) -> u64 {
        self.number("downtime-limit")
    }

    /// Whether all-zero pages go out as ZERO records (anything but `zero-page-detection=none`).
    pub fn zero_page_detection(&self) -> bool {
        self.index("zero-page-detection")
            .is_some_and(|i| self.values[i] != "none")
    }

    /// `direct-io`: an outgoing `file:` writes whole pages with O_DIRECT (hostmem honours it for
    /// every `file:` stream; QEMU 10 only with multifd and mapped-ram).
    pub fn direct_io(&self) -> bool {
        self.index("direct-io")
            .is_some_and(|i| self.values[i] == "on")
    }

    /// `migrate_set_parameter NAME VALUE`, with QEMU's checks and words.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), Error> {
        let i = self.index(name).ok_or_else(|| invalid_parameter(name))?;
        let invalid_size = || Error::invalid(format!("Invalid size {value}"));
        let canonical = match PARAMETERS[i].1 {
            Kind::Size(_) => {
                let v = strtosz(value).map_err(|_| {
                    Error::invalid(format!("Parameter '{name}' expects a size value"))
                })?;
                if name == "downtime-limit" && v > MAX_DOWNTIME_LIMIT_MS {
                    // QEMU's message carries its macro's text.
                    return Err(Error::invalid(
                        "Parameter 'downtime_limit' expects an integer in the range of 0 to \
                         (2000 * 1000) ms",
                    ));
                }
                v.to_string()
            }
            Kind::BandwidthMiB => {
                // A bare number is MiB here, as qemu_strtosz_MiB reads it.
                let text = if value.ends_with(|c: char| c.is_ascii_digit()) {
                    format!("{value}M")
                } else {
                    value.to_string()
                };
                let v = strtosz(&text).map_err(|_| invalid_size())?;
                if v > i64::MAX as u64 {
                    return Err(invalid_size());
                }
                v.to_string()
            }
            Kind::Int(max) => {
                let v: u64 = value.parse().map_err(|_| {
                    Error::invalid(format!("Parameter '{name}' expects an integer"))
                })?;
                if v > max {
                    return Err(Error::invalid(format!(
                        "Parameter '{}' expects an integer in the range of 0 to {max}",
                        name.replace('-', "_")
                    )));
                }
                v.to_string()
            }
            Kind::Bool => crate::options::values::bool_to_str(
                crate::options::values::parse_bool(value).map_err(|_| {
                    Error::invalid(format!("Parameter '{name}' expects 'on' or 'off'"))
                })?,
            )
            .to_string(),
            Kind::Str => value.to_string(),
            Kind::Enum(values) => {
                if !values.contains(&value) {
                    return Err(Error::invalid(format!(
                        "Parameter '{name}' does not accept value '{value}'"
                    )));
                }
                value.to_string()
            }
        };
        self.values[i] = canonical;
        Ok(())
    }

    /// `info migrate_parameters`, as QEMU 10 prints it.
    pub fn info(&self) -> String {
        let mut out = String::new();
        for ((name, kind, _), v) in PARAMETERS.iter().zip(&self.values) {
            let line = match kind {
                Kind::Size("") | Kind::Int(_) | Kind::Bool | Kind::Enum(_) => {
                    format!("{name}: {v}\n")
                }
                Kind::Size(unit) => format!("{name}: {v} {unit}\n"),
                Kind::BandwidthMiB => format!("{name}: {v} bytes/second\n"),
                Kind::Str => format!("{name}: '{v}'\n"),
            };
            out.push_str(&line);
        }
        out
    }
}

/// QEMU 10's migration capabilities in `info migrate_capabilities` order (the ones its stream
/// may name), then hostmem's own.
fn capabilities() -> impl Iterator<Item = &'static str> {
    KNOWN_CAPABILITIES
        .iter()
        .copied()
        .chain(std::iter::once(SKIP_UNPOPULATED))
}

/// hostmem's own capability: pages never populated on the source are not sent.
pub const SKIP_UNPOPULATED: &str = "x-skip-unpopulated";

/// The capabilities hostmem implements; QEMU's others change the stream in ways hostmem does not
/// speak, so turning them on is refused rather than silently ignored.
const IMPLEMENTED: &[&str] = &["events", "mapped-ram", SKIP_UNPOPULATED];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    on: Vec<&'static str>,
}

impl Capabilities {
    pub fn is_on(&self, name: &str) -> bool {
        self.on.contains(&name)
    }

    /// `migrate_set_capability NAME on|off`.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), Error> {
        let known = capabilities()
            .find(|c| *c == name)
            .ok_or_else(|| invalid_parameter(name))?;
        let on = crate::options::values::parse_bool(value)
            .map_err(|_| Error::invalid("Parameter 'value' expects 'on' or 'off'"))?;
        if on && !IMPLEMENTED.contains(&known) {
            return Err(Error::new(
                HmErrorClass::Unsupported,
                format!("hostmem does not implement migration capability '{known}'"),
            ));
        }
        self.on.retain(|c| *c != known);
        if on {
            self.on.push(known);
        }
        Ok(())
    }

    /// `info migrate_capabilities`.
    pub fn info(&self) -> String {
        capabilities()
            .map(|c| format!("{c}: {}\n", if self.is_on(c) { "on" } else { "off" }))
            .collect()
    }
}

/// The statistics of one migration, in QEMU's units.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Bytes put on the channel.
    pub transferred: u64,
    /// RAM still to send (dirty pages x page size) as of the latest sync.
    pub remaining: u64,
    /// RAM of every migrated block.
    pub total: u64,
    /// Pages sent as ZERO records.
    pub duplicate: u64,
    /// Pages sent in full, and their bytes.
    pub normal: u64,
    pub normal_bytes: u64,
    /// Dirty bitmap syncs, the one at setup included.
    pub dirty_sync_count: u64,
    pub pages_per_second: u64,
    /// Pages the guest dirtied per second over the latest round (0 until known).
    pub dirty_pages_rate: u64,
    /// Megabits per second over the latest interval, or over the whole migration once over.
    pub mbps: f64,
    /// Bytes sent while the guest ran, and while it was paused for the switchover.
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    /// Passes over the dirty pages after the bulk pass.
    pub rounds: u64,
    /// Pages left out because they were never populated (`x-skip-unpopulated`).
    pub skipped_unpopulated: u64,
}

/// Everything `info migrate` prints of one migration.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressSnapshot {
    pub status: MigrationStatus,
    pub error: Option<String>,
    pub total_time_ms: u64,
    pub setup_time_ms: Option<u64>,
    pub expected_downtime_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub stats: Stats,
    pub incoming: bool,
    /// Where an incoming migration listens, while it does (`info migrate`'s `socket address`).
    pub socket_addresses: Vec<String>,
}

struct ProgressInner {
    status: MigrationStatus,
    error: Option<String>,
    started: Instant,
    ended: Option<Instant>,
    setup_time: Option<Duration>,
    expected_downtime_ms: Option<u64>,
    downtime: Option<Duration>,
    stats: Stats,
    socket_addresses: Vec<String>,
}

/// The progress of one migration, shared by the thread that runs it and whoever asks.
pub struct Progress {
    inner: Mutex<ProgressInner>,
    changed: Condvar,
    cancel: AtomicBool,
    /// What interrupts a transfer blocked in the channel (shutting a socket down).
    interrupt: Mutex<Option<Box<dyn Fn() + Send>>>,
    incoming: bool,
    /// The process's progress observer, for migrations someone watches.
    meter: Mutex<Option<Meter>>,
}

impl Progress {
    pub fn new(incoming: bool) -> Progress {
        Progress {
            inner: Mutex::new(ProgressInner {
                status: MigrationStatus::Setup,
                error: None,
                started: Instant::now(),
                ended: None,
                setup_time: None,
                expected_downtime_ms: None,
                downtime: None,
                stats: Stats::default(),
                socket_addresses: Vec::new(),
            }),
            changed: Condvar::new(),
            cancel: AtomicBool::new(false),
            interrupt: Mutex::new(None),
            incoming,
            meter: Mutex::new(None),
        }
    }

    /// Reports this migration to the process's progress observer (if one is installed): RAM
    /// bytes done of the RAM's total while it runs (outgoing: what is no longer dirty; an
    /// incoming load tells only its start and end), and a final report when it ends.
    pub fn observe(&self) {
        let activity = if self.incoming {
            Activity::MigrationIncoming
        } else {
            Activity::MigrationOutgoing
        };
        *self.meter.lock().unwrap_or_else(|p| p.into_inner()) =
            progress::meter(activity, "migration");
    }

    fn report(&self, finished: bool) {
        let meter = self.meter.lock().unwrap_or_else(|p| p.into_inner());
        let Some(meter) = meter.as_ref() else {
            return;
        };
        let (status, stats) = {
            let g = self.lock();
            (g.status, g.stats.clone())
        };
        let done = if self.incoming {
            if status == MigrationStatus::Completed {
                stats.total
            } else {
                0
            }
        } else {
            stats.total.saturating_sub(stats.remaining)
        };
        if finished {
            meter.finish(done, stats.total);
        } else if status == MigrationStatus::Active {
            meter.tick(done, stats.total);
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProgressInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> MigrationStatus {
        self.lock().status
    }

    /// Sets the migration's status; a final one (completed, failed, cancelled) first drops
    /// the interrupt, and with it what the interrupt holds of the channel, so that nothing of
    /// the channel is left open once anyone can see the migration has ended.
    pub fn set_status(&self, status: MigrationStatus) {
        if status.is_finished() && !self.status().is_finished() {
            let interrupt = self
                .interrupt
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            drop(interrupt);
        }
        let mut g = self.lock();
        if g.status.is_finished() {
            return;
        }
        if status == MigrationStatus::Active && g.setup_time.is_none() {
            g.setup_time = Some(g.started.elapsed());
        }
        g.status = status;
        if status.is_finished() {
            g.ended = Some(Instant::now());
        }
        drop(g);
        // The observer hears of the end before any waiter wakes, so a UI has cleared its
        // line when the monitor answers.
        self.report(status.is_finished());
        self.changed.notify_all();
    }

    /// Ends the migration as failed with `error` (kept for `info migrate`).
    pub fn fail(&self, error: &Error) {
        self.lock().error = Some(error.message().to_string());
        self.set_status(MigrationStatus::Failed);
    }

    pub fn update(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.lock().stats);
        self.report(false);
    }

    pub fn set_expected_downtime(&self, ms: u64) {
        self.lock().expected_downtime_ms = Some(ms);
    }

    pub fn set_socket_addresses(&self, addresses: Vec<String>) {
        self.lock().socket_addresses = addresses;
    }

    pub fn set_downtime(&self, d: Duration) {
        let mut g = self.lock();
        g.downtime = Some(d);
        g.expected_downtime_ms = None;
    }

    /// Asks the migration to stop; `interrupt` runs at once so a blocked transfer wakes up.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        if !self.status().is_finished() {
            self.set_status(MigrationStatus::Cancelling);
        }
        if let Some(f) = self
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            f();
        }
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// What [`Self::cancel`] runs to wake a transfer blocked in its channel.
    pub fn set_interrupt(&self, f: Option<Box<dyn Fn() + Send>>) {
        *self.interrupt.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// Blocks until the migration has ended, and returns its final state.
    pub fn wait(&self) -> ProgressSnapshot {
        let mut g = self.lock();
        while !g.status.is_finished() {
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        drop(g);
        self.snapshot()
    }

    /// Waits up to `timeout` for the migration to end; whether it has.
    pub fn wait_for(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while !g.status.is_finished() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    pub fn snapshot(&self) -> ProgressSnapshot {
        let g = self.lock();
        let end = g.ended.unwrap_or_else(Instant::now);
        let total = end.duration_since(g.started);
        let mut stats = g.stats.clone();
        if g.status == MigrationStatus::Completed && total.as_millis() > 0 {
            // Once over, QEMU's throughput is the whole migration's.
            stats.mbps = stats.transferred as f64 * 8.0 / 1e6 / total.as_secs_f64();
        }
        ProgressSnapshot {
            status: g.status,
            error: g.error.clone(),
            total_time_ms: total.as_millis() as u64,
            setup_time_ms: g.setup_time.map(|d| d.as_millis() as u64),
            expected_downtime_ms: g.expected_downtime_ms,
            downtime_ms: g.downtime.map(|d| d.as_millis() as u64),
            stats,
            incoming: self.incoming,
            socket_addresses: g.socket_addresses.clone(),
        }
    }
}

/// The migration side of a machine: parameters, capabilities, the VMM's own sections, and the
/// progress of the latest migration each way.
#[derive(Default)]
pub struct MigrationState {
    parameters: Parameters,
    /// What a running migration reads as it goes, so that a change applies at once.
    pub limits: LiveLimits,
    pub capabilities: Capabilities,
    pub outgoing: Option<std::sync::Arc<Progress>>,
    pub incoming: Option<std::sync::Arc<Progress>>,
    /// `-global migration.send-switchover-start`: the machine type's default unless set.
    pub send_switchover_start: bool,
    /// `-global migration.send-configuration=off`: no CONFIGURATION section either way.
    pub no_configuration: bool,
}

impl MigrationState {
    pub fn parameters(&self) -> &Parameters {
        &self.parameters
    }

    /// `migrate_set_parameter NAME VALUE`; a new `max-bandwidth` or `downtime-limit` reaches
    /// a running migration, as QEMU's does.
    pub fn set_parameter(&mut self, name: &str, value: &str) -> Result<(), Error> {
        self.parameters.set(name, value)?;
        self.limits.update(&self.parameters);
        Ok(())
    }
}

/// The parameters a running precopy reads as it goes: `max-bandwidth` (per chunk of pages)
/// and `downtime-limit` (per round). Clones share the values.
#[derive(Clone, Debug)]
pub struct LiveLimits {
    pub rate: RateLimit,
    downtime_limit_ms: Arc<AtomicU64>,
}

impl Default for LiveLimits {
    fn default() -> Self {
        LiveLimits::new(&Parameters::default())
    }
}

impl LiveLimits {
    pub fn new(params: &Parameters) -> LiveLimits {
        LiveLimits {
            rate: RateLimit::new(params.max_bandwidth()),
            downtime_limit_ms: Arc::new(AtomicU64::new(params.downtime_limit_ms())),
        }
    }

    pub fn update(&self, params: &Parameters) {
        self.rate.set(params.max_bandwidth());
        self.downtime_limit_ms
            .store(params.downtime_limit_ms(), Ordering::SeqCst);
    }

    pub fn downtime_limit_ms(&self) -> u64 {
        self.downtime_limit_ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn parameters_print_as_qemu_10_with_its_defaults() {
        let p = Parameters::default();
        let text = p.info();
        assert!(
            text.starts_with("announce-initial: 50 ms\nannounce-max: 550 ms\nannounce-rounds: 5\n")
        );
        assert!(text.contains("\ntls-creds: ''\n"));
        assert!(text.contains("\nmax-bandwidth: 134217728 bytes/second\n"));
        assert!(text.contains("\ndowntime-limit: 300 ms\n"));
        assert!(text.contains("\nxbzrle-cache-size: 67108864 bytes\nmax-postcopy-bandwidth: 0\n"));
        assert!(text.ends_with("vcpu-dirty-limit: 1 MB/s\nmode: normal\ndirect-io: off\n"));
        assert_eq!(text.lines().count(), PARAMETERS.len());
        assert_eq!(p.max_bandwidth(), DEFAULT_MAX_BANDWIDTH);
        assert_eq!(p.downtime_limit_ms(), DEFAULT_DOWNTIME_LIMIT_MS);
    }

    #[test]
    fn setting_parameters_follows_qemus_parsers() {
        let mut p = Parameters::default();
        p.set("max-bandwidth", "1M").unwrap();
        assert_eq!(p.max_bandwidth(), 1 << 20);
        // A bare number is MiB for the bandwidth.
        p.set("max-bandwidth", "2").unwrap();
        assert_eq!(p.max_bandwidth(), 2 << 20);
        p.set("downtime-limit", "100").unwrap();
        assert_eq!(p.downtime_limit_ms(), 100);
        assert_eq!(
            p.set("max-bandwidth", "x").unwrap_err().message(),
            "Invalid size x"
        );
        assert_eq!(
            p.set("foo", "1").unwrap_err().message(),
            "invalid parameter value: foo"
        );
        assert_eq!(
            p.set("downtime-limit", "3000000").unwrap_err().message(),
            "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
        );
        p.set("zero-page-detection", "none").unwrap();
        assert!(!p.zero_page_detection());
        assert!(p.set("zero-page-detection", "maybe").is_err());
        p.set("direct-io", "on").unwrap();
        assert!(p.info().ends_with("direct-io: on\n"));
    }

    #[test]
    fn capabilities_list_qemus_then_hostmems_and_refuse_what_is_not_implemented() {
        let mut c = Capabilities::default();
        let text = c.info();
        assert!(text.starts_with("xbzrle: off\nrdma-pin-all: off\n"));
        assert!(text.ends_with("mapped-ram: off\nx-skip-unpopulated: off\n"));
        c.set(SKIP_UNPOPULATED, "on").unwrap();
        assert!(c.is_on(SKIP_UNPOPULATED));
        c.set("xbzrle", "off").unwrap();
        let e = c.set("xbzrle", "on").unwrap_err();
        assert_eq!(
            e.message(),
            "hostmem does not implement migration capability 'xbzrle'"
        );
        assert_eq!(
            c.set("foo", "on").unwrap_err().message(),
            "invalid parameter value: foo"
        );
        c.set(SKIP_UNPOPULATED, "off").unwrap();
        assert!(!c.is_on(SKIP_UNPOPULATED));
    }

    #[test]
    fn progress_ends_once_and_wakes_waiters() {
        let p = std::sync::Arc::new(Progress::new(false));
        assert_eq!(p.status(), MigrationStatus::Setup);
        p.set_status(MigrationStatus::Active);
        let q = p.clone();
        let t = std::thread::spawn(move || q.wait().status);
        p.fail(&Error::generic("Unable to write to command: Broken pipe"));
        assert_eq!(t.join().unwrap(), MigrationStatus::Failed);
        // A finished migration stays finished.
        p.set_status(MigrationStatus::Completed);
        let s = p.snapshot();
        assert_eq!(s.status, MigrationStatus::Failed);
        assert_eq!(
            s.error.as_deref(),
            Some("Unable to write to command: Broken pipe")
        );
        assert!(s.setup_time_ms.is_some());
    }

    /// Runs its closure when dropped.
    pub(crate) struct OnDrop<F: FnMut()>(pub(crate) F);

    impl<F: FnMut()> Drop for OnDrop<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }

    #[test]
    fn a_final_status_drops_the_interrupt_before_anyone_can_see_it() {
        for end in [
            MigrationStatus::Completed,
            MigrationStatus::Failed,
            MigrationStatus::Cancelled,
        ] {
            let p = std::sync::Arc::new(Progress::new(false));
            p.set_status(MigrationStatus::Active);
            let seen = std::sync::Arc::new(Mutex::new(None));
            let (progress, record) = (std::sync::Arc::downgrade(&p), seen.clone());
            let held = OnDrop(move || {
                *record.lock().unwrap() = progress.upgrade().map(|p| p.status());
            });
            p.set_interrupt(Some(Box::new(move || {
                let _ = &held;
            })));
            p.set_status(end);
            assert_eq!(
                *seen.lock().unwrap(),
                Some(MigrationStatus::Active),
                "{end:?}: the interrupt outlived the status change"
            );
            assert_eq!(p.status(), end);
        }
    }

    #[test]
    fn cancel_runs_the_interrupt_and_is_seen_by_the_worker() {
        let p = Progress::new(false);
        let hit = std::sync::Arc::new(AtomicBool::new(false));
        let h = hit.clone();
        p.set_interrupt(Some(Box::new(move || h.store(true, Ordering::SeqCst))));
        p.cancel();
        assert!(p.cancel_requested() && hit.load(Ordering::SeqCst));
        assert_eq!(p.status(), MigrationStatus::Cancelling);
    }
}
