//! A helper thread that works beside a caller who may no longer need it: it is told to stop
//! through a flag it checks as it goes, and it is stopped and joined when its handle is
//! dropped, so it never outlives what it works on (a load's target, a stream file).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Whether the host has a second core: helpers that run beside a busy caller only take turns
/// with it on one.
pub fn second_core() -> bool {
    std::thread::available_parallelism().map_or(1, |n| n.get()) > 1
}

/// One running helper thread; stopped and joined when dropped.
#[derive(Debug)]
pub struct HelperThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HelperThread {
    /// Starts `work` on a thread named `name`, handing it the flag that is set when it should
    /// stop. `None` if the thread could not start.
    pub fn spawn<F>(name: &str, work: F) -> Option<HelperThread>
    where
        F: FnOnce(Arc<AtomicBool>) + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || work(flag))
            .ok()?;
        Some(HelperThread {
            stop,
            thread: Some(thread),
        })
    }

    /// Waits until the work ends by itself.
    pub fn join(mut self) {
        self.wait();
    }

    /// Tells the work to stop and waits for it.
    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wait();
    }

    fn wait(&mut self) {
        if let Some(t) = self.thread.take() {
            // A panic in the work is the helper's end, not the caller's: what it helped with
            // is correct without it.
            let _ = t.join();
        }
    }
}

impl Drop for HelperThread {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    #[test]
    fn dropping_it_stops_the_work_and_waits_for_it() {
        let ended = Arc::new(AtomicBool::new(false));
        let e = ended.clone();
        let helper = HelperThread::spawn("hm-test", move |stop| {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(20));
            e.store(true, Ordering::SeqCst);
        })
        .unwrap();
        drop(helper);
        assert!(ended.load(Ordering::SeqCst));
    }

    #[test]
    fn join_waits_for_the_work_without_stopping_it() {
        let steps = Arc::new(AtomicU64::new(0));
        let s = steps.clone();
        let helper = HelperThread::spawn("hm-test", move |stop| {
            for _ in 0..50 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                s.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .unwrap();
        helper.join();
        assert_eq!(steps.load(Ordering::SeqCst), 50);
    }

    #[test]
    fn a_panic_in_the_work_ends_only_the_helper() {
        let started = Arc::new(AtomicBool::new(false));
        let s = started.clone();
        let helper = HelperThread::spawn("hm-test", move |_| {
            s.store(true, Ordering::SeqCst);
            panic!("the helper's own failure")
        });
        // Reached only if joining does not pass the helper's panic on to this thread.
        helper.unwrap().join();
        assert!(started.load(Ordering::SeqCst));
    }
}
