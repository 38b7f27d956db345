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
