//! The dirtier as a running guest: its vCPU on a thread of its own that can be paused at any
//! instruction (QEMU's `vm_stop`, for the switchover of a live migration), its registers saved
//! and loaded (the VMM's vCPU section), and resumed — on the same VM or, from saved registers,
//! on a migration's destination.
//!
//! Pausing kicks the vCPU out of KVM_RUN the way QEMU does: `immediate_exit` in the shared
//! `kvm_run` page (so a vCPU about to enter the guest does not), then a signal to the vCPU
//! thread (so one already in the guest leaves it).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::guest::{prepare_dirtier, setup_vcpu, DirtierLayout};
use crate::error::{Error, HmErrorClass, Result};
use crate::kvm::KvmAccel;

/// What the vCPU thread does, and what it was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Running,
    PauseRequested,
    Paused,
    ExitRequested,
    /// The guest halted (its stop word was set) or the thread left.
    Ended,
    Failed(String),
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// The vCPU's `kvm_run` page (stable for the vCPU's life) and its thread, for the kick.
    kvm_run: usize,
    thread: Mutex<Option<libc::pthread_t>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, s: State) {
        *self.lock() = s;
        self.changed.notify_all();
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN. Its handler does nothing: what matters
/// is that KVM_RUN returns EINTR (the handler is installed without SA_RESTART).
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe (it does
        // nothing) and stays installed for the process's life.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(kick_signal(), &act, std::ptr::null_mut());
        }
    });
}

/// The dirtier's vCPU, running or paused.
pub struct DirtierRunner {
    shared: Arc<Shared>,
    vcpu: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
}

/// The saved state's header: "HMVC" and a version.
const STATE_MAGIC: u32 = 0x484d_5643;
const STATE_VERSION: u32 = 1;

fn kvm_err(what: &str, e: kvm_ioctls::Error) -> Error {
    Error::host(what, e.errno()).with_class(HmErrorClass::Kvm)
}

impl DirtierRunner {
    /// Writes the dirtier for `layout` into the VM's RAM and starts it on a thread.
    pub fn start(kvm: &KvmAccel, layout: &DirtierLayout) -> Result<DirtierRunner> {
        let vcpu = Self::vcpu(kvm)?;
        prepare_dirtier(
            &mut vcpu.lock().unwrap_or_else(|p| p.into_inner()),
            kvm.slot_table(),
            layout,
        )?;
        Self::spawn(vcpu, State::Running)
    }

    /// A paused runner whose vCPU continues from `state` (from [`Self::save_state`] on the
    /// migration's source): the program and its data are in the RAM that migrated.
    pub fn resume_from(kvm: &KvmAccel, state: &[u8]) -> Result<DirtierRunner> {
        let (regs, sregs) = decode_state(state)?;
        let vcpu = Self::vcpu(kvm)?;
        {
            let v = vcpu.lock().unwrap_or_else(|p| p.into_inner());
            v.set_sregs(&sregs)
                .map_err(|e| kvm_err("KVM_SET_SREGS failed", e))?;
            v.set_regs(&regs)
                .map_err(|e| kvm_err("KVM_SET_REGS failed", e))?;
        }
        Self::spawn(vcpu, State::Paused)
    }

    fn vcpu(kvm: &KvmAccel) -> Result<Arc<Mutex<VcpuFd>>> {
        kvm.vcpu(kvm.max_vcpu_id().saturating_sub(1), setup_vcpu)
    }

    fn spawn(vcpu: Arc<Mutex<VcpuFd>>, initial: State) -> Result<DirtierRunner> {
        install_kick_handler();
        let kvm_run = {
            let mut v = vcpu.lock().unwrap_or_else(|p| p.into_inner());
            v.get_kvm_run() as *mut kvm_bindings::kvm_run as usize
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(initial),
            changed: Condvar::new(),
            kvm_run,
            thread: Mutex::new(None),
        });
        let (s, v) = (shared.clone(), vcpu.clone());
        let thread = std::thread::Builder::new()
            .name("hm-test-vcpu".into())
            .spawn(move || vcpu_thread(&s, &v))
            .map_err(|e| {
                Error::host(
                    "cannot start the vCPU thread",
                    e.raw_os_error().unwrap_or(0),
                )
            })?;
        // The thread records its id first thing; wait for it so a kick has a target.
        let deadline = Instant::now() + Duration::from_secs(5);
        while shared
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            if Instant::now() > deadline {
                return Err(Error::generic("the vCPU thread did not start"));
            }
            std::thread::yield_now();
        }
        Ok(DirtierRunner {
            shared,
            vcpu,
            thread: Some(thread),
        })
    }

    /// Stops the vCPU wherever it is and waits until it no longer runs guest code.
    pub fn pause(&self) -> Result<()> {
        {
            let mut s = self.shared.lock();
            match &*s {
                State::Running => *s = State::PauseRequested,
                State::Paused | State::Ended => return Ok(()),
                State::Failed(e) => return Err(Error::new(HmErrorClass::Kvm, e.clone())),
                _ => {}
            }
        }
        self.kick();
        let mut s = self.shared.lock();
        let deadline = Instant::now() + Duration::from_secs(10);
        while *s == State::PauseRequested {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(HmErrorClass::Kvm, "the vCPU did not pause"));
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        match &*s {
            State::Failed(e) => Err(Error::new(HmErrorClass::Kvm, e.clone())),
            _ => Ok(()),
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) -> Result<()> {
        let mut s = self.shared.lock();
        match &*s {
            State::Paused => {
                *s = State::Running;
                self.shared.changed.notify_all();
                Ok(())
            }
            State::Running | State::PauseRequested => Ok(()),
            State::Failed(e) => Err(Error::new(HmErrorClass::Kvm, e.clone())),
            other => Err(Error::new(
                HmErrorClass::Kvm,
                format!("the vCPU cannot resume: {other:?}"),
            )),
        }
    }

    /// Whether the guest runs (not paused, halted or failed).
    pub fn is_running(&self) -> bool {
        matches!(*self.shared.lock(), State::Running)
    }

    /// The paused vCPU's registers, in the form [`Self::resume_from`] takes.
    pub fn save_state(&self) -> Result<Vec<u8>> {
        if *self.shared.lock() != State::Paused {
            return Err(Error::new(
                HmErrorClass::Kvm,
                "the vCPU's state can only be saved while it is paused",
            ));
        }
        let v = self.vcpu.lock().unwrap_or_else(|p| p.into_inner());
        let regs = v
            .get_regs()
            .map_err(|e| kvm_err("KVM_GET_REGS failed", e))?;
        let sregs = v
            .get_sregs()
            .map_err(|e| kvm_err("KVM_GET_SREGS failed", e))?;
        Ok(encode_state(&regs, &sregs))
    }

    fn kick(&self) {
        // SAFETY: `kvm_run` is the vCPU's mmap'd run page, valid while the VcpuFd lives (this
        // runner holds it); `immediate_exit` is a plain byte KVM reads at entry.
        unsafe {
            let run = self.shared.kvm_run as *mut kvm_bindings::kvm_run;
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1);
        }
        if let Some(t) = *self.shared.thread.lock().unwrap_or_else(|p| p.into_inner()) {
            // SAFETY: `t` is the live vCPU thread (joined only in Drop, after this); the
            // signal's handler is installed and does nothing.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}

impl Drop for DirtierRunner {
    fn drop(&mut self) {
        self.shared.set(State::ExitRequested);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn vcpu_thread(shared: &Shared, vcpu: &Mutex<VcpuFd>) {
    // SAFETY: pthread_self has no preconditions.
    *shared.thread.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(unsafe { libc::pthread_self() });
    let mut signalled = false;
    loop {
        {
            let mut s = shared.lock();
            loop {
                match &*s {
                    State::Running => break,
                    State::PauseRequested => {
                        *s = State::Paused;
                        shared.changed.notify_all();
                    }
                    State::Paused => {
                        s = shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
                    }
                    _ => return,
                }
            }
        }
        let mut v = vcpu.lock().unwrap_or_else(|p| p.into_inner());
        let exit = v.run();
        let outcome = match exit {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Ok(VcpuExit::IoOut(port, data))
                if port == super::guest::DONE_PORT && data == [super::guest::DONE_VALUE] =>
            {
                signalled = true;
                None
            }
            Ok(VcpuExit::Hlt) if signalled => Some(State::Ended),
            Ok(other) => Some(State::Failed(format!(
                "the dirtier's vCPU stopped with an unexpected exit {other:?}"
            ))),
            Err(e) => Some(State::Failed(format!(
                "kvm_cpu_exec: KVM_RUN failed: {}",
                crate::error::strerror(e.errno())
            ))),
        };
        v.set_kvm_immediate_exit(0);
        drop(v);
        if let Some(end) = outcome {
            shared.set(end);
            return;
        }
    }
}

fn encode_state(regs: &kvm_regs, sregs: &kvm_sregs) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(STATE_MAGIC.to_be_bytes());
    out.extend(STATE_VERSION.to_be_bytes());
    // SAFETY: kvm_regs and kvm_sregs are plain repr(C) structs of integers, so viewing their
    // bytes is sound; both ends of a migration run the same x86-64 KVM ABI.
    unsafe {
        out.extend_from_slice(std::slice::from_raw_parts(
            regs as *const kvm_regs as *const u8,
            std::mem::size_of::<kvm_regs>(),
        ));
        out.extend_from_slice(std::slice::from_raw_parts(
            sregs as *const kvm_sregs as *const u8,
            std::mem::size_of::<kvm_sregs>(),
        ));
    }
    out
}

fn decode_state(state: &[u8]) -> Result<(kvm_regs, kvm_sregs)> {
    let (r, s) = (
        std::mem::size_of::<kvm_regs>(),
        std::mem::size_of::<kvm_sregs>(),
    );
    let bad = || Error::invalid("the saved vCPU state is not one hostmem's test guest wrote");
    if state.len() != 8 + r + s
        || state[..4] != STATE_MAGIC.to_be_bytes()
        || state[4..8] != STATE_VERSION.to_be_bytes()
    {
        return Err(bad());
    }
    let mut regs = kvm_regs::default();
    let mut sregs = kvm_sregs::default();
    // SAFETY: the lengths were checked; any byte pattern is a valid value of these integer-only
    // repr(C) structs.
    unsafe {
        std::ptr::copy_nonoverlapping(
            state[8..].as_ptr(),
            &mut regs as *mut kvm_regs as *mut u8,
            r,
        );
        std::ptr::copy_nonoverlapping(
            state[8 + r..].as_ptr(),
            &mut sregs as *mut kvm_sregs as *mut u8,
            s,
        );
    }
    Ok((regs, sregs))
}

/// The length of a saved state.
pub fn state_len() -> usize {
    8 + std::mem::size_of::<kvm_regs>() + std::mem::size_of::<kvm_sregs>()
}
