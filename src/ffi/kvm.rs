//! KVM for C: attach the current machine to a new VM, read back the VM fd and the slot table,
//! drive dirty logging, and print `info memslots`. The test guest's exports are in
//! `ffi/testing.rs`.
//!
//! Everything works on the *current* machine (the one a VMM built), so that this API does
//! not depend on how the machine was made.

use std::ffi::{c_char, c_int};

use super::{c_string, guard, guard_report};
use crate::error::{Error, Result};
use crate::kvm::{KvmAccel, KvmError};
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

/// The current machine's VM, when it has one.
pub(crate) fn kvm_of(m: &Machine) -> Result<&KvmAccel> {
    m.kvm().ok_or_else(|| KvmError::NotAttached.into())
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

/// Attaches the current machine to a VM the VMM created and configured itself (VMMs make the
/// VM, its irqchip and its vCPUs before RAM exists), so its RAM gets hostmem's slots — split
/// at the slot limit, following every layout change, with dirty logging — beside slots of the
/// VMM's own. `vm_fd` is duplicated (the VMM keeps and closes its own descriptor); the slot
/// numbers in `vmm_slots[0..n_vmm_slots]` are the VMM's and hostmem never uses them; later
/// ones come from `hm_kvm_slot_reserve` / `hm_kvm_slot_alloc`. The VMM must not delete or
/// change hostmem's slots (`hm_kvm_get_slots` lists them). `max_slot_size` as for
/// `hm_kvm_attach`. hostmem's dirty log expects the VM without
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (the default), and leaves that VM-wide setting alone.
/// Fails if `vm_fd` is not a KVM VM, a number is out of the VM's budget, or KVM is attached
/// already.
///
/// # Safety
/// `vmm_slots` points to `n_vmm_slots` numbers (or is NULL with 0); `errp` as usual.
#[no_mangle]
pub unsafe extern "C" fn hm_kvm_attach_vm_fd(
    vm_fd: c_int,
    max_slot_size: u64,
    vmm_slots: *const u32,
    n_vmm_slots: usize,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        let reserved: &[u32] = if n_vmm_slots == 0 {
            &[]
        } else {
            // SAFETY: caller contract: `vmm_slots` has `n_vmm_slots` entries.
            unsafe {
                std::slice::from_raw_parts(super::ref_arg(vmm_slots, "vmm_slots")?, n_vmm_slots)
            }
        };
        registry::with_current(|_, m| m.adopt_kvm(vm_fd, max_slot_size, reserved))?;
        Ok(true)
    })
}

/// Sets slot number `slot` aside for the VMM's own memory; refused when hostmem uses it, it is
/// reserved already or it is beyond the VM's budget.
#[no_mangle]
pub extern "C" fn hm_kvm_slot_reserve(slot: u32, errp: *mut *mut Error) -> bool {
    guard(errp, false, || {
        with_kvm(|k| k.table().reserve(slot))?;
        Ok(true)
    })
}

/// A free slot number, set aside for the VMM's own memory; -1 on error (no VM, budget spent).
#[no_mangle]
pub extern "C" fn hm_kvm_slot_alloc(errp: *mut *mut Error) -> i64 {
    guard(errp, -1, || {
        Ok(i64::from(with_kvm(|k| k.table().reserve_any())?))
    })
}

/// Gives back a number from `hm_kvm_slot_reserve` / `hm_kvm_slot_alloc` / `vmm_slots` (delete
/// the VMM's slot in KVM first); false if it was not reserved.
#[no_mangle]
pub extern "C" fn hm_kvm_slot_release(slot: u32) -> bool {
    guard_report(false, || with_kvm(|k| Ok(k.table().release(slot))))
}

fn with_kvm<R>(
    f: impl FnOnce(&KvmAccel) -> std::result::Result<R, crate::kvm::KvmError>,
) -> Result<R> {
    registry::with_current(|_, m| Ok(f(kvm_of(m)?)?))
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
