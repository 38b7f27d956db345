//! The test guest for C (feature `test-guest`): the guest check, and guest runs of 8-byte
//! writes, reads and waits, on the current machine's VM. Test support: the project's `vmm` and
//! C tests use it; a VMM built without the feature has none of it.

use std::ffi::c_int;

use super::kvm::kvm_of;
use super::{guard, mut_arg};
use crate::error::{Error, Result};
use crate::kvm::KvmAccel;
use crate::registry;
use crate::testing::{GuestCheckRun, GuestOp, GuestRun};

/// A clone of the current machine's VM, for guest runs with the machine unlocked.
fn current_kvm() -> Result<KvmAccel> {
    registry::with_current(|_, m| kvm_of(m).cloned())
}

/// What `hm_kvm_guest_check` verified.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HmGuestCheck {
    /// Writable slots that got a signature at their start and end.
    pub slots: u64,
    /// Signatures the guest wrote and the host found through the RAMBlocks.
    pub signatures: u64,
    /// 8 per signature.
    pub bytes_verified: u64,
    /// Signatures left out because they fall in the payload's own low-RAM area.
    pub skipped: u64,
}

/// Runs the guest payload: a vCPU in 64-bit mode writes a signature at the start and at the
/// end of every writable slot and halts; then every signature is read back through the
/// RAMBlocks' host pointers. Fails (saying which signatures) if any is missing or misplaced.
/// Needs RAM with a slot at guest-physical 0..640 KiB for the payload.
///
/// # Safety
/// `out` is NULL or points to a writable `HmGuestCheck`.
#[no_mangle]
pub unsafe extern "C" fn hm_kvm_guest_check(out: *mut HmGuestCheck, errp: *mut *mut Error) -> bool {
    guard(errp, false, || {
        // SAFETY: caller contract.
        let out = unsafe { mut_arg(out, "out") }?;
        // The guest runs with the machine unlocked; the signatures are read back locked.
        let c = registry::run_unlocked(
            registry::current_id(),
            |m| kvm_of(m).cloned(),
            |kvm| GuestCheckRun::run(&kvm),
            |m, run| run?.verify(&m.memory().ramblocks),
        )?;
        *out = HmGuestCheck {
            slots: c.slots as u64,
            signatures: c.signatures as u64,
            bytes_verified: c.bytes_verified,
            skipped: c.skipped as u64,
        };
        Ok(true)
    })
}

/// Slices from C arguments; NULL is allowed only for n == 0.
///
/// # Safety
/// `p` is NULL or points to `n` readable `T`s.
unsafe fn slice_arg<'a, T>(p: *const T, n: usize, name: &str) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::invalid(format!("Parameter '{name}' is missing")));
    }
    // SAFETY: non-NULL, n elements by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// The guest writes `values[i]` (8 bytes) at guest-physical `gpas[i]` (8-byte aligned), in
/// order, then halts.
///
/// # Safety
/// `gpas` and `values` are NULL or point to `n` readable `uint64_t`s each.
#[no_mangle]
pub unsafe extern "C" fn hm_kvm_guest_write(
    gpas: *const u64,
    values: *const u64,
    n: usize,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: caller contract.
        let (g, v) = unsafe { (slice_arg(gpas, n, "gpas")?, slice_arg(values, n, "values")?) };
        let ops: Vec<GuestOp> = g
            .iter()
            .zip(v)
            .map(|(&gpa, &value)| GuestOp::Write { gpa, value })
            .collect();
        current_kvm()?.run_guest(&ops)?;
        Ok(true)
    })
}

/// The guest reads 8 bytes at each guest-physical `gpas[i]` into `values[i]`, then halts.
///
/// # Safety
/// `gpas` is NULL or points to `n` readable `uint64_t`s; `values` to `n` writable ones.
#[no_mangle]
pub unsafe extern "C" fn hm_kvm_guest_read(
    gpas: *const u64,
    values: *mut u64,
    n: usize,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: caller contract.
        let g = unsafe { slice_arg(gpas, n, "gpas") }?;
        if n != 0 && values.is_null() {
            return Err(Error::invalid("Parameter 'values' is missing"));
        }
        let ops: Vec<GuestOp> = g.iter().map(|&gpa| GuestOp::Read { gpa }).collect();
        let got = current_kvm()?.run_guest(&ops)?;
        for (i, v) in got.into_iter().enumerate() {
            // SAFETY: i < n, and the caller gave room for n values.
            unsafe { values.add(i).write(v) };
        }
        Ok(true)
    })
}

/// `HmGuestOp.kind`: write `value` at `gpa`.
pub const HM_GUEST_OP_WRITE: c_int = 0;
/// `HmGuestOp.kind`: read the 8 bytes at `gpa` into `value`.
pub const HM_GUEST_OP_READ: c_int = 1;
/// `HmGuestOp.kind`: spin while the 8 bytes at `gpa` equal `value` (seconds at most), so the
/// host can act while the guest runs and then release it.
pub const HM_GUEST_OP_WAIT_WHILE: c_int = 2;

/// One access of `hm_kvm_guest_run`. Addresses are guest-physical and 8-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HmGuestOp {
    /// `HM_GUEST_OP_*`.
    pub kind: c_int,
    pub gpa: u64,
    /// The value written, waited on, or (for reads) found.
    pub value: u64,
}

/// Runs `ops` in order on the guest, then halts; reads store what they found in `value`. The
/// call returns when the guest halts: with a `HM_GUEST_OP_WAIT_WHILE` another thread may change
/// the machine meanwhile (even free it: the VM keeps its slots' memory mapped until the run
/// ends).
///
/// # Safety
/// `ops` is NULL or points to `n` writable `HmGuestOp`s.
#[no_mangle]
pub unsafe extern "C" fn hm_kvm_guest_run(
    ops: *mut HmGuestOp,
    n: usize,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: caller contract.
        let given = unsafe { slice_arg(ops, n, "ops") }?;
        let guest_ops = given
            .iter()
            .map(|op| match op.kind {
                HM_GUEST_OP_WRITE => Ok(GuestOp::Write {
                    gpa: op.gpa,
                    value: op.value,
                }),
                HM_GUEST_OP_READ => Ok(GuestOp::Read { gpa: op.gpa }),
                HM_GUEST_OP_WAIT_WHILE => Ok(GuestOp::WaitWhile {
                    gpa: op.gpa,
                    value: op.value,
                }),
                k => Err(Error::invalid(format!(
                    "Parameter 'ops' has an op of unknown kind {k}"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let got = current_kvm()?.run_guest(&guest_ops)?;
        for (i, v) in got.into_iter().enumerate() {
            // SAFETY: i < n, the caller gave n writable ops at `ops`, and the shared borrow
            // `given` of them ended above.
            unsafe { (*ops.add(i)).value = v };
        }
        Ok(true)
    })
}

#[cfg(target_arch = "x86_64")]
mod dirtier {
    //! The dirtier guest for a C VMM: one running vCPU per machine, paused and resumed by the
    //! VMM's guest-control hooks, its registers carried by the VMM's own migration section.

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

    use super::super::machine::MachineState;
    use super::super::{guard, ref_arg};
    use crate::error::{Error, HmErrorClass, Result};
    use crate::guarded::Guard;
    use crate::memory::{ram_chunks, MemorySystem};
    use crate::registry::{self, MachineId};
    use crate::testing::guest::{check_dirtied_pages, DirtierLayout};
    use crate::testing::runner::DirtierRunner;

    /// What the C side keeps per machine: the running vCPU, or registers loaded from a
    /// migration stream for the vCPU to start from.
    #[derive(Default)]
    struct Entry {
        runner: Option<Arc<DirtierRunner>>,
        loaded: Option<Vec<u8>>,
    }

    fn table() -> MutexGuard<'static, HashMap<MachineId, Entry>> {
        static T: OnceLock<Mutex<HashMap<MachineId, Entry>>> = OnceLock::new();
        T.get_or_init(|| {
            super::super::machine::on_machine_free(forget_machine);
            Default::default()
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner())
    }

    /// Drops a freed machine's vCPU (its thread stops).
    fn forget_machine(id: MachineId) {
        let entry = table().remove(&id);
        drop(entry);
    }

    fn runner(id: MachineId) -> Option<Arc<DirtierRunner>> {
        table().get(&id).and_then(|e| e.runner.clone())
    }

    fn kvm(id: MachineId) -> Result<crate::kvm::KvmAccel> {
        registry::with(id, |m| {
            m.kvm()
                .cloned()
                .ok_or_else(|| crate::kvm::KvmError::NotAttached.into())
        })
    }

    /// Runs the dirtier guest over guest-physical `[start, end)` of machine `ms` (KVM
    /// attached), or — when a migration stream brought its registers — resumes it from there.
    /// A dirtier already there only resumes.
    ///
    /// # Safety
    /// `ms` is a live machine.
    #[no_mangle]
    pub unsafe extern "C" fn hm_test_dirtier_run(
        ms: *mut MachineState,
        start: u64,
        end: u64,
        errp: *mut *mut Error,
    ) -> bool {
        guard(errp, false, || {
            // SAFETY: by contract.
            let id = unsafe { ref_arg(ms, "ms") }?.context;
            if let Some(r) = runner(id) {
                r.resume()?;
                return Ok(true);
            }
            let loaded = table().entry(id).or_default().loaded.take();
            let kvm = kvm(id)?;
            let r = Arc::new(match loaded {
                Some(state) => DirtierRunner::resume_from(&kvm, &state)?,
                None => DirtierRunner::start(&kvm, &DirtierLayout { start, end })?,
            });
            r.resume()?;
            table().entry(id).or_default().runner = Some(r);
            Ok(true)
        })
    }

    /// Pauses the dirtier of `ms` (nothing when it does not run).
    ///
    /// # Safety
    /// `ms` is a live machine.
    #[no_mangle]
    pub unsafe extern "C" fn hm_test_dirtier_pause(
        ms: *mut MachineState,
        errp: *mut *mut Error,
    ) -> bool {
        guard(errp, false, || {
            // SAFETY: by contract.
            let id = unsafe { ref_arg(ms, "ms") }?.context;
            if let Some(r) = runner(id) {
                r.pause()?;
            }
            Ok(true)
        })
    }

    /// The paused dirtier's registers into `buf` (`cap` bytes); `*len` gets their length. With
    /// no dirtier, `*len` is 0.
    ///
    /// # Safety
    /// `ms` is a live machine; `buf` has `cap` writable bytes; `len` is writable.
    #[no_mangle]
    pub unsafe extern "C" fn hm_test_dirtier_save_state(
        ms: *mut MachineState,
        buf: *mut u8,
        cap: usize,
        len: *mut usize,
        errp: *mut *mut Error,
    ) -> bool {
        guard(errp, false, || {
            // SAFETY: by contract.
            let id = unsafe { ref_arg(ms, "ms") }?.context;
            // SAFETY: by contract.
            let len = unsafe { super::super::mut_arg(len, "len") }?;
            let state = match runner(id) {
                Some(r) => r.save_state()?,
                None => Vec::new(),
            };
            if state.len() > cap || (buf.is_null() && !state.is_empty()) {
                return Err(Error::new(
                    HmErrorClass::InvalidParameter,
                    format!(
                        "the vCPU state needs {} bytes, the buffer has {cap}",
                        state.len()
                    ),
                ));
            }
            if !state.is_empty() {
                // SAFETY: `buf` has `cap` >= state.len() writable bytes by contract.
                unsafe { std::ptr::copy_nonoverlapping(state.as_ptr(), buf, state.len()) };
            }
            *len = state.len();
            Ok(true)
        })
    }

    /// Keeps registers from a migration stream for the next `hm_test_dirtier_run` of `ms`.
    ///
    /// # Safety
    /// `ms` is a live machine; `buf` has `len` readable bytes.
    #[no_mangle]
    pub unsafe extern "C" fn hm_test_dirtier_load_state(
        ms: *mut MachineState,
        buf: *const u8,
        len: usize,
        errp: *mut *mut Error,
    ) -> bool {
        guard(errp, false, || {
            // SAFETY: by contract.
            let id = unsafe { ref_arg(ms, "ms") }?.context;
            // SAFETY: by contract.
            let state = unsafe { super::slice_arg(buf, len, "buf") }?.to_vec();
            table().entry(id).or_default().loaded = Some(state);
            Ok(true)
        })
    }

    /// What `hm_test_dirtier_check` found in the dirtier's range.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct HmDirtierCheck {
        /// Pages in the range.
        pub pages: u64,
        /// Pages that break QEMU's invariant (0: the range is consistent).
        pub bad_pages: u64,
        /// The first bad page, or UINT64_MAX.
        pub first_bad_page: u64,
        /// The page where the counter steps down by one (where the guest was when it
        /// stopped), or UINT64_MAX when every page holds the same value.
        pub edge_page: u64,
        /// Full passes the guest has made, from its mailbox.
        pub passes: u64,
    }

    /// Checks QEMU's migration-test invariant over guest-physical `[start, end)` of `ms`
    /// (byte 0 of every page the same, or stepping down by one exactly once), reading through
    /// the machine's flat view. The dirtier must be paused (`stop` first): a running one moves
    /// under the check.
    ///
    /// # Safety
    /// `ms` is a live machine; `out` points to a writable `HmDirtierCheck`.
    #[no_mangle]
    pub unsafe extern "C" fn hm_test_dirtier_check(
        ms: *mut MachineState,
        start: u64,
        end: u64,
        out: *mut HmDirtierCheck,
        errp: *mut *mut Error,
    ) -> bool {
        guard(errp, false, || {
            // SAFETY: by contract.
            let id = unsafe { ref_arg(ms, "ms") }?.context;
            // SAFETY: by contract.
            let out = unsafe { super::mut_arg(out, "out") }?;
            if runner(id).is_some_and(|r| r.is_running()) {
                return Err(Error::new(
                    HmErrorClass::InUse,
                    "the dirtier is running: stop the machine before checking it",
                ));
            }
            if !start.is_multiple_of(DirtierLayout::PAGE_SIZE)
                || !end.is_multiple_of(DirtierLayout::PAGE_SIZE)
            {
                return Err(Error::invalid(format!(
                    "the dirtier's range [{start:#x}, {end:#x}) is not page-aligned"
                )));
            }
            let layout = DirtierLayout { start, end };
            let guard = Guard::acquire().map_err(|e| Error::generic(e.to_string()))?;
            let (byte0, passes) = registry::with(id, |m| {
                let byte0 = page_bytes(m.memory(), &guard, &layout)?;
                let passes = read_u64(m.memory(), &guard, DirtierLayout::PASSES_GPA)?;
                Ok((byte0, passes))
            })?;
            let c = check_dirtied_pages(layout.pages(), |i| byte0[i as usize]);
            *out = HmDirtierCheck {
                pages: c.pages,
                bad_pages: c.bad,
                first_bad_page: c.offenders.first().map_or(u64::MAX, |b| b.page),
                edge_page: c.edge.unwrap_or(u64::MAX),
                passes,
            };
            Ok(true)
        })
    }

    /// Byte 0 of every page of `layout`, through the flat view (0 where there is no RAM).
    fn page_bytes(mem: &MemorySystem, guard: &Guard, layout: &DirtierLayout) -> Result<Vec<u8>> {
        let mut bytes = Vec::with_capacity(layout.pages() as usize);
        for chunk in ram_chunks(mem, layout.start, layout.pages() * DirtierLayout::PAGE_SIZE) {
            // Chunks may start mid-page: the next page's byte 0 is the first this one holds.
            let mut gpa = chunk.gpa.next_multiple_of(DirtierLayout::PAGE_SIZE);
            while gpa < chunk.gpa + chunk.len {
                let mut b = [0u8];
                chunk.read(guard, gpa - chunk.gpa, &mut b)?;
                bytes.push(b[0]);
                gpa += DirtierLayout::PAGE_SIZE;
            }
        }
        bytes.resize(layout.pages() as usize, 0);
        Ok(bytes)
    }

    fn read_u64(mem: &MemorySystem, guard: &Guard, gpa: u64) -> Result<u64> {
        let mut v = [0u8; 8];
        let mut at = 0usize;
        for chunk in ram_chunks(mem, gpa, 8) {
            chunk.read(guard, 0, &mut v[at..at + chunk.len as usize])?;
            at += chunk.len as usize;
        }
        Ok(u64::from_le_bytes(v))
    }

    /// The longest state `hm_test_dirtier_save_state` writes.
    #[no_mangle]
    pub extern "C" fn hm_test_dirtier_state_size() -> usize {
        crate::testing::runner::state_len()
    }
}

/// What `hm_test_memory_checksum` found.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HmMemoryChecksum {
    /// A sum over the non-zero pages of a hash of each page's guest address and contents.
    pub digest: u64,
    /// 4 KiB pages holding a non-zero byte.
    pub nonzero_pages: u64,
    /// Pages read (those the kernel reported as possibly populated).
    pub pages_read: u64,
}

/// Runs `work` on `[gpa, gpa+size)` of machine `id`'s guest memory with the machine unlocked
/// (filling or summing gigabytes must not hold up the monitor).
fn on_guest_range<T>(
    id: registry::MachineId,
    gpa: u64,
    size: u64,
    work: impl FnOnce(&crate::testing::memory::GuestRange) -> T,
) -> crate::Result<T> {
    registry::run_unlocked(
        id,
        |m| {
            Ok(crate::testing::memory::GuestRange::of(
                m.memory(),
                gpa,
                size,
            ))
        },
        |range| work(&range),
        |_, r| Ok(r),
    )
}

/// Writes a pattern (non-zero words, a function of `seed` and each word's guest address) over
/// the RAM of guest-physical `[gpa, gpa+size)` of `ms`, skipping holes and ROM; `*written` gets
/// the bytes written. With the machine unlocked: the guest should be paused.
///
/// # Safety
/// `ms` is a live machine; `written` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hm_test_memory_fill(
    ms: *mut super::machine::MachineState,
    gpa: u64,
    size: u64,
    seed: u64,
    written: *mut u64,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: by contract.
        let id = unsafe { super::ref_arg(ms, "ms") }?.context;
        let n = on_guest_range(id, gpa, size, |range| {
            crate::testing::memory::fill(range, seed)
        })?;
        // SAFETY: by contract, NULL or writable.
        if let Some(w) = unsafe { written.as_mut() } {
            *w = n;
        }
        Ok(true)
    })
}

/// Sums guest-physical `[gpa, gpa+size)` of `ms` page by page into `*out`, reading only pages
/// that may have been populated: equal sums for equal guest-physical memory, however it is cut
/// into RAMBlocks (a never-touched page adds nothing, as a zero page does).
///
/// # Safety
/// `ms` is a live machine; `out` points to a writable `HmMemoryChecksum`.
#[no_mangle]
pub unsafe extern "C" fn hm_test_memory_checksum(
    ms: *mut super::machine::MachineState,
    gpa: u64,
    size: u64,
    out: *mut HmMemoryChecksum,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: by contract.
        let id = unsafe { super::ref_arg(ms, "ms") }?.context;
        // SAFETY: by contract.
        let out = unsafe { mut_arg(out, "out") }?;
        let c = on_guest_range(id, gpa, size, crate::testing::memory::checksum)??;
        *out = HmMemoryChecksum {
            digest: c.digest,
            nonzero_pages: c.nonzero_pages,
            pages_read: c.pages_read,
        };
        Ok(true)
    })
}
