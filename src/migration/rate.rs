//! `max-bandwidth`, as QEMU's migration thread keeps to it: time is cut into 100 ms slices and
//! each may carry `rate / 10` bytes. A sender that spent a slice's budget waits for the next.
//!
//! Two senders use the same accounting ([`SliceBudget`]): the precopy loop, which charges
//! what each chunk of pages cost once it went out (so the switchover, which QEMU never
//! limits, is not limited either), and [`RateLimited`], a writer for any other stream.
//!
//! Where hostmem differs from QEMU: what a slice carried over its budget is owed to the next
//! slices (QEMU forgets it when a slice starts). QEMU charges page by page and runs over by at
//! most a page; hostmem charges a chunk of pages at a time, and forgetting the overrun would
//! let a 1 MiB chunk through per slice whatever the limit.

use std::io::{self, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::transport::Cancel;

/// A `max-bandwidth` in bytes per second, shared between the migration and whoever changes
/// it while it runs (`migrate_set_parameter max-bandwidth`). 0 is unlimited, and, as in QEMU,
/// so is anything under 10 B/s: the budget per slice is `rate / 10`, which is then 0.
#[derive(Clone, Debug)]
pub struct RateLimit(Arc<AtomicU64>);

impl RateLimit {
    /// QEMU's `BUFFER_DELAY`: the rate is enforced per slice of this length.
    pub const SLICE: Duration = Duration::from_millis(100);
    /// QEMU's default `max-bandwidth` (`MAX_THROTTLE`, 128 MiB/s).
    pub const QEMU_DEFAULT: u64 = 128 << 20;

    pub fn new(bytes_per_second: u64) -> RateLimit {
        RateLimit(Arc::new(AtomicU64::new(bytes_per_second)))
    }

    /// Changes the rate; a running sender keeps to it from its next charge.
    pub fn set(&self, bytes_per_second: u64) {
        self.0.store(bytes_per_second, Ordering::SeqCst)
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Bytes allowed per slice; 0 is unlimited.
    pub fn slice_budget(&self) -> u64 {
        self.get() / (1000 / Self::SLICE.as_millis() as u64)
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new(Self::QEMU_DEFAULT)
    }
}

/// One sender's account against a [`RateLimit`]: the current slice and what was sent in it.
/// A slice starts at the first charge after the previous one ended, so idle time earns no
/// credit.
#[derive(Debug)]
pub struct SliceBudget {
    slice_start: Instant,
    used: u64,
}

impl Default for SliceBudget {
    fn default() -> Self {
        SliceBudget::new()
    }
}

impl SliceBudget {
    pub fn new() -> SliceBudget {
        SliceBudget {
            slice_start: Instant::now(),
            used: 0,
        }
    }

    /// Starts the slices that have ended since the last call, each paying `budget` off.
    fn roll(&mut self, budget: u64, now: Instant) {
        while now >= self.slice_start + RateLimit::SLICE {
            self.used = self.used.saturating_sub(budget);
            if self.used == 0 {
                // Idle time is not credit: the next slice starts now.
                self.slice_start = now;
                break;
            }
            self.slice_start += RateLimit::SLICE;
        }
    }

    /// How many of `wanted` bytes may go now under `limit` (all of them when unlimited), or
    /// how long to wait for the next slice when none may.
    pub fn allowance(&mut self, limit: &RateLimit, wanted: u64) -> Result<u64, Duration> {
        let budget = limit.slice_budget();
        if budget == 0 {
            self.used = 0;
            return Ok(wanted);
        }
        let now = Instant::now();
        self.roll(budget, now);
        if self.used < budget {
            Ok((budget - self.used).min(wanted))
        } else {
            Err((self.slice_start + RateLimit::SLICE).saturating_duration_since(now))
        }
    }

    /// Records `bytes` sent in the current slice (possibly over its budget).
    pub fn charge(&mut self, bytes: u64) {
        self.used += bytes;
    }

    /// Waits, with `sleep`, until the budget allows a byte again; `sleep` returning an error
    /// (a cancel) ends the wait with it.
    pub fn wait<E>(
        &mut self,
        limit: &RateLimit,
        mut sleep: impl FnMut(Duration) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Err(left) = self.allowance(limit, 1) {
            sleep(left)?;
        }
        Ok(())
    }
}

/// A writer that keeps to a [`RateLimit`]: writes are split at the slice's budget, so a slice
/// never carries more than `rate / 10` bytes. The wait is cut short by the [`Cancel`], if one
/// is given.
pub struct RateLimited<W> {
    inner: W,
    limit: RateLimit,
    cancel: Option<Cancel>,
    budget: SliceBudget,
    bytes: u64,
}

impl<W: Write> RateLimited<W> {
    pub fn new(inner: W, limit: RateLimit) -> RateLimited<W> {
        RateLimited {
            inner,
            limit,
            cancel: None,
            budget: SliceBudget::new(),
            bytes: 0,
        }
    }

    /// Lets `cancel` interrupt the limiter's waits.
    pub fn with_cancel(mut self, cancel: &Cancel) -> RateLimited<W> {
        self.cancel = Some(cancel.clone());
        self
    }

    pub fn limit(&self) -> &RateLimit {
        &self.limit
    }

    /// Bytes written through the limiter.
    pub fn transferred(&self) -> u64 {
        self.bytes
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for RateLimited<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.budget.allowance(&self.limit, buf.len() as u64) {
                Ok(allowed) => {
                    let n = self.inner.write(&buf[..allowed as usize])?;
                    self.budget.charge(n as u64);
                    self.bytes += n as u64;
                    return Ok(n);
                }
                Err(left) => match &self.cancel {
                    Some(c) => c.sleep(left)?,
                    None => std::thread::sleep(left),
                },
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write + Seek> Seek for RateLimited<W> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::transport::TransportError;

    #[test]
    fn rate_budget_is_a_tenth_of_the_rate_and_tiny_rates_are_unlimited() {
        let r = RateLimit::new(8 << 20);
        assert_eq!(r.slice_budget(), (8 << 20) / 10);
        r.set(9);
        assert_eq!(r.slice_budget(), 0);
        r.set(0);
        assert_eq!(r.slice_budget(), 0);
    }

    #[test]
    fn an_overrun_is_owed_to_the_next_slices() {
        // 10 000 bytes per slice; a 35 000-byte charge owes three more slices.
        let limit = RateLimit::new(100_000);
        let mut b = SliceBudget::new();
        assert_eq!(b.allowance(&limit, 50_000), Ok(10_000));
        b.charge(35_000);
        let t = Instant::now();
        b.wait(&limit, |d| {
            std::thread::sleep(d);
            Ok::<(), ()>(())
        })
        .unwrap();
        let dt = t.elapsed();
        assert!(dt >= Duration::from_millis(295), "{dt:?}");
        // Unlimited forgives what is owed.
        limit.set(0);
        b.charge(1 << 30);
        assert_eq!(b.allowance(&limit, 7), Ok(7));
    }

    #[test]
    fn idle_time_earns_no_credit() {
        let limit = RateLimit::new(100_000);
        let mut b = SliceBudget::new();
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(b.allowance(&limit, 50_000), Ok(10_000));
        b.charge(10_000);
        assert!(b.allowance(&limit, 1).is_err());
    }

    #[test]
    fn limiter_never_puts_more_than_the_budget_in_a_slice() {
        // 100 KB/s: 10 000 bytes per slice; 25 000 bytes need three slices (~0.2 s).
        let mut w = RateLimited::new(Vec::new(), RateLimit::new(100_000));
        let t = Instant::now();
        w.write_all(&[7u8; 25_000]).unwrap();
        let dt = t.elapsed();
        assert!(dt >= Duration::from_millis(195), "{dt:?}");
        assert!(dt < Duration::from_millis(600), "{dt:?}");
        assert_eq!(w.transferred(), 25_000);
        assert_eq!(w.into_inner().len(), 25_000);
    }

    #[test]
    fn a_cancel_ends_a_limiter_wait() {
        let c = Cancel::new();
        let mut w = RateLimited::new(Vec::new(), RateLimit::new(10)).with_cancel(&c);
        w.limit().set(100); // 10 bytes per slice
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            c2.cancel();
        });
        let start = Instant::now();
        let e = w.write_all(&[0u8; 1000]).unwrap_err();
        t.join().unwrap();
        assert!(TransportError::from_io(&e).unwrap().is_cancelled());
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
