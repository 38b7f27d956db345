//! KVM for C: attach the current machine to a new VM, read back the VM fd and the
//! slot table, run the guest check, drive dirty logging, and print `info memslots`.
//!
//! Everything works on the *current* machine (the one a VMM built), so that this API does
//! not depend on how the machine was made.

use std::ffi::{c_char, c_int};

use super::{c_string, guard, guard_report, mut_arg};
use crate::error::{Error, Result};
use crate::kvm::{GuestOp, KvmAccel, KvmError};
use crate::machine::Machine;
use crate::registry;

/// `HmKvmSlot.flags`: the slot logs dirty pages (`KVM_MEM_LOG_DIRTY_PAGES`).
pub const HM_KVM_SLOT_LOG_DIRTY: u32 = 1;
/// `HmKvmSlot.flags`: the slot is read-only for the guest (`KVM_MEM_READONLY`).
pub const HM_KVM_SLOT_READONLY: u32 = 2;

/// One KVM memslot as `hm_kvm_get_slots` reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HmKvmSlot {
    /// KVM slot number.
    pub slot: u32,
    /// `HM_KVM_SLOT_*` bits, as given to the kernel.
    pub flags: u32,
    /// Guest-physical start and length.
    pub gpa: u64,
    pub size: u64,
    /// Host virtual address of the slot's first byte.
    pub hva: u64,
    /// Offset of the slot's first byte in its RAMBlock.
    pub ramblock_offset: u64,
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

/// The current machine's VM, when it has one.
fn kvm_of(m: &Machine) -> Result<&KvmAccel> {
    m.kvm().ok_or_else(|| KvmError::NotAttached.into())
}

/// A clone of the current machine's VM, for guest runs with the machine unlocked.
fn current_kvm() -> Result<KvmAccel> {
    registry::with_current(|_, m| kvm_of(m).cloned())
}

/// Runs `f` on the current machine's memory system, if KVM is attached.
fn with_kvm_memory<R>(f: impl FnOnce(&mut crate::memory::MemorySystem) -> Result<R>) -> Result<R> {
    registry::with_current(|_, m| {
        kvm_of(m)?;
        f(m.memory_mut())
    })
}

/// Attaches the current machine to a new KVM VM: every RAM range of its flat view becomes one
/// or more memslots of at most `max_slot_size` bytes (0: the kernel's limit, 2^31 - 1 pages),
/// and the slots follow every later change of the memory layout. `max_slot_size` must be a
/// multiple of the host page size.
#[no_mangle]
pub extern "C" fn hm_kvm_attach(max_slot_size: u64, errp: *mut *mut Error) -> bool {
    guard(errp, false, || {
        registry::with_current(|_, m| m.attach_kvm(max_slot_size))?;
        Ok(true)
    })
}

/// Removes every slot and closes the VM of the current machine.
#[no_mangle]
pub extern "C" fn hm_kvm_detach(errp: *mut *mut Error) -> bool {
    guard(errp, false, || {
        registry::with_current(|_, m| m.detach_kvm())?;
        Ok(true)
    })
}

/// Whether the current machine is attached to KVM.
#[no_mangle]
pub extern "C" fn hm_kvm_enabled() -> bool {
    guard_report(false, || {
        registry::with_current(|_, m| Ok(m.kvm().is_some()))
    })
}

/// The VM file descriptor of the current machine (owned by hostmem: do not close it), or -1
/// when it is not attached.
#[no_mangle]
pub extern "C" fn hm_kvm_vm_fd() -> c_int {
    guard_report(-1, || {
        registry::with_current(|_, m| Ok(m.kvm().map_or(-1, KvmAccel::vm_fd)))
    })
}

/// Copies up to `max` slots, by slot number, into `out` (which may be NULL when `max` is 0)
/// and returns how many slots there are in all (0 when KVM is not attached).
///
/// # Safety
/// `out` is NULL or points to `max` writable `HmKvmSlot`s.
#[no_mangle]
pub unsafe extern "C" fn hm_kvm_get_slots(out: *mut HmKvmSlot, max: usize) -> usize {
    guard_report(0, || {
        let slots =
            registry::with_current(|_, m| Ok(m.kvm().map(KvmAccel::slots)))?.unwrap_or_default();
        if !out.is_null() {
            for (i, s) in slots.iter().take(max).enumerate() {
                // SAFETY: i < max, and the caller gave room for max entries.
                unsafe {
                    out.add(i).write(HmKvmSlot {
                        slot: s.slot,
                        flags: s.flags,
                        gpa: s.gpa,
                        size: s.size,
                        hva: s.hva,
                        ramblock_offset: s.block_offset,
                    })
                };
            }
        }
        Ok(slots.len())
    })
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
            |kvm| kvm.guest_check_run(),
            |m, run| KvmAccel::guest_check_verify(run?, &m.memory().ramblocks),
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

/// Switches dirty logging on for all RAM (QEMU's `memory_global_dirty_log_start`): every
/// writable slot is re-registered with `KVM_MEM_LOG_DIRTY_PAGES`; the guest may be running.
#[no_mangle]
pub extern "C" fn hm_kvm_dirty_log_start(errp: *mut *mut Error) -> bool {
    guard(errp, false, || {
        with_kvm_memory(|m| m.set_global_dirty_log(true))?;
        Ok(true)
    })
}

/// Switches dirty logging off; pages logged so far are kept for the next sync.
#[no_mangle]
pub extern "C" fn hm_kvm_dirty_log_stop(errp: *mut *mut Error) -> bool {
    guard(errp, false, || {
        with_kvm_memory(|m| m.set_global_dirty_log(false))?;
        Ok(true)
    })
}

/// Fetches KVM's dirty logs (clearing them), folds them into the RAMBlocks' dirty bitmaps and
/// remembers the dirty guest pages for `hm_kvm_dirty_pages`.
#[no_mangle]
pub extern "C" fn hm_kvm_dirty_log_sync(errp: *mut *mut Error) -> bool {
    guard(errp, false, || {
        with_kvm_memory(|m| m.log_sync())?;
        Ok(true)
    })
}

/// The guest-physical addresses of the host pages the latest `hm_kvm_dirty_log_sync` found
/// dirty (written by the guest since the sync before it), ascending: copies up to `max` into
/// `gpas` (NULL allowed when `max` is 0) and returns how many there are.
///
/// # Safety
/// `gpas` is NULL or points to `max` writable `uint64_t`s.
#[no_mangle]
pub unsafe extern "C" fn hm_kvm_dirty_pages(gpas: *mut u64, max: usize) -> usize {
    guard_report(0, || {
        let pages = registry::with_current(|_, m| Ok(m.kvm().map(KvmAccel::last_dirty)))?
            .unwrap_or_default();
        if !gpas.is_null() {
            for (i, g) in pages.iter().take(max).enumerate() {
                // SAFETY: i < max, and the caller gave room for max entries.
                unsafe { gpas.add(i).write(*g) };
            }
        }
        Ok(pages.len())
    })
}

/// The text of the HMP command `info memslots` (hostmem's own): a summary line, a column
/// header, and one row per slot with slot, GPA start-end (inclusive), size, HVA, flags
/// (`rw`, `ro`, `rw,log`) and RAMBlock@offset. Without KVM: "KVM is not attached to this
/// machine\n". Release with `hm_free`.
#[no_mangle]
pub extern "C" fn hm_kvm_info_memslots() -> *mut c_char {
    guard_report(std::ptr::null_mut(), || {
        let text = registry::with_current(|_, m| {
            Ok(match m.kvm() {
                Some(k) => crate::monitor::info_memslots(k, Some(&m.memory().ramblocks)),
                None => format!("{}\n", KvmError::NotAttached),
            })
        })?;
        Ok(c_string(&text))
    })
}
