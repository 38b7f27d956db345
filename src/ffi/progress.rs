//! Progress of long work for a VMM's own UI: one handler per process, told of every
//! preallocation and migration of every machine.

use std::ffi::{c_char, c_void, CString};
use std::sync::Arc;

use super::guard_report;
use crate::progress::{self, Activity, Observer, Report};

/// What an `HmProgress` is about.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HmProgressActivity {
    /// A backend's preallocation (`prealloc=on`, `-mem-prealloc`); `subject` is its id.
    Prealloc,
    /// A migration sent from this process; `subject` is "migration".
    MigrationOutgoing,
    /// A migration loaded into this process; only its start and its end are reported.
    MigrationIncoming,
}

/// One observation of long work, valid for the duration of the handler's call only.
#[repr(C)]
pub struct HmProgress {
    pub activity: HmProgressActivity,
    /// NUL-terminated, owned by hostmem.
    pub subject: *const c_char,
    /// Bytes done and bytes in all: guest RAM bytes for both prealloc and migration (a
    /// migration's done is what is no longer dirty, so it may go back down in a new round).
    pub done: u64,
    pub total: u64,
    /// Average since the work began.
    pub bytes_per_second: u64,
    /// Estimated milliseconds left; -1 while unknown (nothing done yet).
    pub ms_left: i64,
    /// This is the work's last report (it succeeded or failed: the call that started the work
    /// says which).
    pub finished: bool,
}

/// The handler of `hm_progress_set_handler`.
pub type HmProgressHandler =
    Option<unsafe extern "C" fn(p: *const HmProgress, opaque: *mut c_void)>;

/// Installs `handler` (NULL removes it) for every preallocation and migration started from now
/// on in this process; work already running keeps the handler it started with.
///
/// Calls come from the thread doing the work — a prealloc worker's coordinator, a migration
/// thread — at most every 100 ms, plus a first report when work begins and a final one
/// (`finished`) when it ends; never two at once for one piece of work, but two pieces of work
/// may report concurrently. The handler runs with no hostmem lock held during prealloc, and
/// while a migration's statistics are being updated for migration: it must not call hostmem's
/// migration functions, and should return quickly (draw a line, post a message).
///
/// # Safety
/// `handler`, if not NULL, may be called with `opaque` from any thread until it is replaced
/// and the work that started with it has ended.
#[no_mangle]
pub unsafe extern "C" fn hm_progress_set_handler(handler: HmProgressHandler, opaque: *mut c_void) {
    guard_report((), || {
        let opaque = opaque as usize;
        let observer = handler.map(|f| {
            let o: Observer = Arc::new(move |r: &Report| {
                let subject = CString::new(r.subject.replace('\0', "")).unwrap_or_default();
                let p = HmProgress {
                    activity: match r.activity {
                        Activity::Prealloc => HmProgressActivity::Prealloc,
                        Activity::MigrationOutgoing => HmProgressActivity::MigrationOutgoing,
                        Activity::MigrationIncoming => HmProgressActivity::MigrationIncoming,
                    },
                    subject: subject.as_ptr(),
                    done: r.done,
                    total: r.total,
                    bytes_per_second: r.bytes_per_second,
                    ms_left: r
                        .time_left
                        .map_or(-1, |d| d.as_millis().min(i64::MAX as u128) as i64),
                    finished: r.finished,
                };
                // SAFETY: the caller installed `f` with `opaque` for exactly these calls; `p`
                // and the subject it points to live until `f` returns.
                unsafe { f(&p, opaque as *mut c_void) }
            });
            o
        });
        progress::set_observer(observer);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;
    use std::sync::Mutex;

    use crate::ffi::backend::{hm_memory_backend_add, hm_memory_backend_del};

    /// (subject, done, total, finished) of each report.
    static SEEN: Mutex<Vec<(String, u64, u64, bool)>> = Mutex::new(Vec::new());

    unsafe extern "C" fn record(p: *const HmProgress, _opaque: *mut c_void) {
        // SAFETY: hostmem passes a valid report whose subject is NUL-terminated.
        let p = unsafe { &*p };
        // SAFETY: as above.
        let subject = unsafe { CStr::from_ptr(p.subject) }
            .to_string_lossy()
            .into_owned();
        if p.activity == HmProgressActivity::Prealloc {
            SEEN.lock()
                .unwrap()
                .push((subject, p.done, p.total, p.finished));
        }
    }

    #[test]
    fn a_preallocation_reports_its_start_and_its_end_to_the_handler() {
        // SAFETY: `record` is a valid handler that ignores `opaque`.
        unsafe { hm_progress_set_handler(Some(record), std::ptr::null_mut()) };
        let opts = c"memory-backend-ram,id=progress-test0,size=64M,prealloc=on";
        // SAFETY: a NUL-terminated option string; a NULL errp reports on stderr.
        let b = unsafe { hm_memory_backend_add(opts.as_ptr(), std::ptr::null_mut()) };
        // SAFETY: no handler from here on.
        unsafe { hm_progress_set_handler(None, std::ptr::null_mut()) };
        assert!(!b.is_null());
        // SAFETY: as above.
        assert!(unsafe { hm_memory_backend_del(c"progress-test0".as_ptr(), std::ptr::null_mut()) });
        let seen: Vec<_> = SEEN
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.0 == "progress-test0")
            .cloned()
            .collect();
        let total = 64 << 20;
        assert_eq!(
            seen.first(),
            Some(&("progress-test0".into(), 0, total, false))
        );
        assert_eq!(
            seen.last(),
            Some(&("progress-test0".into(), total, total, true))
        );
        assert_eq!(seen.iter().filter(|r| r.3).count(), 1);
        assert!(seen.windows(2).all(|w| w[0].1 <= w[1].1), "{seen:?}");
    }
}
