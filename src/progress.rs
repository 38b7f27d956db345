//! Progress of long work (a preallocation, a migration) as a VMM's UI wants it: bytes done out
//! of a total, the rate so far and the time left, delivered to one observer at a bounded
//! frequency so that a fast loop does not flood a terminal and a slow one still shows life.
//!
//! The observer is one per process, installed once like a log handler: the work that reports
//! (a backend's preallocation, a migration thread) runs deep below whoever shows it, often
//! while a machine is still being built, with no handle a caller could have passed in.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// What is making progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    Prealloc,
    MigrationOutgoing,
    MigrationIncoming,
}

/// One observation of long work.
#[derive(Clone, Debug, PartialEq)]
pub struct Report<'a> {
    pub activity: Activity,
    /// What the work is about: a backend's id, a migration's URI.
    pub subject: &'a str,
    pub done: u64,
    pub total: u64,
    /// Average since the work started.
    pub bytes_per_second: u64,
    /// None while no rate is known yet.
    pub time_left: Option<Duration>,
    /// The last report of this work, successful or not.
    pub finished: bool,
}

/// Whoever shows progress. Called from the thread doing the work, with no hostmem lock held
/// for prealloc and with none that the observer could need for migration.
pub type Observer = Arc<dyn Fn(&Report) + Send + Sync>;

static OBSERVER: RwLock<Option<Observer>> = RwLock::new(None);

/// Installs (or, with None, removes) the observer of every later piece of long work; work
/// already running keeps the observer it started with.
pub fn set_observer(observer: Option<Observer>) {
    *OBSERVER.write().unwrap_or_else(|p| p.into_inner()) = observer;
}

/// A meter for new work, when anyone observes.
pub fn meter(activity: Activity, subject: &str) -> Option<Meter> {
    let observer = OBSERVER.read().unwrap_or_else(|p| p.into_inner()).clone()?;
    Some(Meter::new(observer, activity, subject))
}

/// How often a report reaches the observer at most (the last one always does).
pub const REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// The progress of one piece of work, throttled towards one observer.
pub struct Meter {
    observer: Observer,
    activity: Activity,
    subject: String,
    started: Instant,
    interval: Duration,
    /// When the last report went out; None before the first. Also makes `finish` final.
    last: Mutex<Last>,
}

#[derive(Default)]
struct Last {
    at: Option<Instant>,
    finished: bool,
}

impl Meter {
    pub fn new(observer: Observer, activity: Activity, subject: &str) -> Meter {
        Meter::with_interval(observer, activity, subject, REPORT_INTERVAL)
    }

    pub fn with_interval(
        observer: Observer,
        activity: Activity,
        subject: &str,
        interval: Duration,
    ) -> Meter {
        Meter {
            observer,
            activity,
            subject: subject.to_string(),
            started: Instant::now(),
            interval,
            last: Mutex::new(Last::default()),
        }
    }

    /// Reports `done` of `total` unless a report went out less than the interval ago (the
    /// first always goes out, so a user sees at once that work began).
    pub fn tick(&self, done: u64, total: u64) {
        let now = Instant::now();
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if last.finished || last.at.is_some_and(|t| now - t < self.interval) {
                return;
            }
            last.at = Some(now);
        }
        self.emit(done, total, now, false);
    }

    /// The final report; later ticks and finishes are ignored.
    pub fn finish(&self, done: u64, total: u64) {
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if last.finished {
                return;
            }
            last.finished = true;
        }
        self.emit(done, total, Instant::now(), true);
    }

    fn emit(&self, done: u64, total: u64, now: Instant, finished: bool) {
        let elapsed = now.duration_since(self.started).as_secs_f64();
        let rate = if elapsed > 0.0 {
            (done as f64 / elapsed) as u64
        } else {
            0
        };
        let time_left = (rate > 0)
            .then(|| Duration::from_secs_f64(total.saturating_sub(done) as f64 / rate as f64));
        (self.observer)(&Report {
            activity: self.activity,
            subject: &self.subject,
            done,
            total,
            bytes_per_second: rate,
            time_left: if finished {
                Some(Duration::ZERO)
            } else {
                time_left
            },
            finished,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Seen {
        done: u64,
        total: u64,
        rate: u64,
        left: Option<Duration>,
        finished: bool,
    }

    fn recording(interval: Duration) -> (Meter, Arc<Mutex<Vec<Seen>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let obs: Observer = Arc::new(move |r: &Report| {
            assert_eq!(r.subject, "mem0");
            assert_eq!(r.activity, Activity::Prealloc);
            s.lock().unwrap().push(Seen {
                done: r.done,
                total: r.total,
                rate: r.bytes_per_second,
                left: r.time_left,
                finished: r.finished,
            })
        });
        (
            Meter::with_interval(obs, Activity::Prealloc, "mem0", interval),
            seen,
        )
    }

    #[test]
    fn ticks_within_the_interval_are_dropped_but_the_first_and_the_last_go_out() {
        let (m, seen) = recording(Duration::from_secs(3600));
        for i in 0..1000 {
            m.tick(i, 1000);
        }
        m.finish(1000, 1000);
        m.tick(1000, 1000);
        m.finish(1000, 1000);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!((seen[0].done, seen[0].finished), (0, false));
        assert_eq!((seen[1].done, seen[1].total), (1000, 1000));
        assert!(seen[1].finished);
        assert_eq!(seen[1].left, Some(Duration::ZERO));
    }

    #[test]
    fn ticks_apart_by_the_interval_all_go_out() {
        let (m, seen) = recording(Duration::from_millis(5));
        for i in 1..=3 {
            std::thread::sleep(Duration::from_millis(10));
            m.tick(i * 100, 1000);
        }
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[test]
    fn rate_and_time_left_follow_from_what_was_done_so_far() {
        let (m, seen) = recording(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(200));
        m.tick(1 << 30, 4 << 30);
        let s = seen.lock().unwrap()[0].clone();
        // 1 GiB in a bit over 0.2 s: at most 5 GiB/s, and the 3 GiB left take about 3x as
        // long as what was done.
        assert!(s.rate > 0 && s.rate <= 5 << 30, "{s:?}");
        let left = s.left.unwrap().as_secs_f64();
        let expect = (3u64 << 30) as f64 / s.rate as f64;
        assert!((left - expect).abs() < 1e-6, "{left} vs {expect}");
        assert!(left >= 0.6, "{left}");
    }

    #[test]
    fn no_time_left_is_claimed_before_anything_is_done() {
        let (m, seen) = recording(Duration::ZERO);
        m.tick(0, 100);
        assert_eq!(seen.lock().unwrap()[0].left, None);
    }
}
