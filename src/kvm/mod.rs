//! KVM: memslots from the flat view, split at the slot limit, dirty logging, and a guest payload
//! that proves the slots on a real vCPU (QEMU's `accel/kvm/kvm-all.c`, memory part).
//!
//! - [`slots`]: the pure split of a RAM section into slots (`kvm_align_section`, the
//!   `kvm_max_slot_size` walk);
//! - [`table`]: the slot table of one VM and the ioctls that keep the kernel in step;
//! - [`listener`]: the [`crate::listener::MemoryListener`] that feeds the table from commits;
//! - [`guest`]: the x86-64 payload;
//! - this file: [`KvmAccel`], the VM of one machine, and the guest check built on the payload.
//!
//! Choices worth knowing:
//! - Every RAM section is split (QEMU splits only where a board set a limit), so a 9 TiB guest
//!   works on x86. Add, remove and has-memory walk the same split, so they agree.
//! - Errors never abort: a refused slot names slot, start, size and errno (QEMU's words) and
//!   the slots registered by that call are removed again; an exhausted budget is
//!   "kvm_alloc_slot: no free slot available".
//! - Dirty bits are never lost: removing a logging slot or switching logging off fetches the
//!   slot's log first and keeps it for the next sync.
//! - KVM's cost per slot is not only the slot: on hosts without the TDP MMU (nested or
//!   paravirtual hosts such as this project's machines) x86 KVM allocates ~10 bytes of kernel
//!   memory per 4 KiB page up front, ~20 GiB for an 8 TiB slot, whatever is backed.

pub mod error;
pub mod guest;
pub mod listener;
pub mod slots;
pub mod table;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::error::{Error, HmErrorClass, Result};
use crate::listener::HasMemory;
use crate::ramblock::{RamBlockId, RamBlockRegistry};

pub use error::KvmError;
pub use guest::GuestOp;
pub use listener::KvmListener;
pub use table::{Slot, SlotTable};

/// The name the KVM listener registers under.
pub const LISTENER_NAME: &str = "kvm-memory";

/// The guest check writes `HM_KVM_SIGNATURE ^ gpa` at each checked guest-physical address
/// ("hostmem!" in ASCII), so a write landing elsewhere cannot pass for the right one.
pub const HM_KVM_SIGNATURE: u64 = 0x686f_7374_6d65_6d21;

/// QEMU's slot budget when the kernel does not report `KVM_CAP_NR_MEMSLOTS`.
const DEFAULT_NR_SLOTS: u32 = 32;

/// The value the guest check writes at `gpa`: different at every address, so a write that
/// lands at the wrong place cannot pass for the right one.
pub fn signature(gpa: u64) -> u64 {
    HM_KVM_SIGNATURE ^ gpa
}

/// What the guest check verified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestCheck {
    /// Slots that got signatures (read-only slots are not written).
    pub slots: usize,
    /// Signatures written by the guest and found by the host.
    pub signatures: usize,
    /// 8 bytes per signature.
    pub bytes_verified: u64,
    /// Signatures left out because they fall inside the payload's own low-RAM area.
    pub skipped: usize,
}

/// The KVM VM of one machine: the VM fd, its vCPUs and the slot table the listener fills.
///
/// Clones share the VM, so a vCPU can run with the machine unlocked (another thread may change
/// the layout or the dirty log meanwhile, as with a real vCPU thread). The VM and every slot's
/// memory live as long as the last clone.
#[derive(Clone)]
pub struct KvmAccel {
    kvm: Arc<Kvm>,
    vm: Arc<VmFd>,
    table: Arc<Mutex<SlotTable>>,
    vcpus: Arc<Mutex<HashMap<u64, Arc<Mutex<VcpuFd>>>>>,
}

/// A guest check whose guest has run and whose signatures are still to be verified
/// ([`KvmAccel::guest_check_run`], then [`KvmAccel::guest_check_verify`]).
pub struct GuestCheckRun {
    slots: Vec<Slot>,
    targets: Vec<(usize, u64)>,
    skipped: usize,
}

impl KvmAccel {
    /// Opens `/dev/kvm` and creates a VM. `max_slot_size` 0 means the kernel's limit; otherwise
    /// it must be a multiple of the host page size (QEMU's `kvm_set_max_memslot_size`).
    pub fn open(max_slot_size: u64) -> std::result::Result<Self, KvmError> {
        let host_page = crate::hostmap::host_page_size() as u64;
        let max = slots::check_max_slot_size(max_slot_size, host_page)?;
        let kvm = Kvm::new().map_err(|e| KvmError::Open { errno: e.errno() })?;
        let vm = kvm
            .create_vm()
            .map_err(|e| KvmError::CreateVm { errno: e.errno() })?;
        let nr = match vm.check_extension_int(Cap::NrMemslots) {
            n if n > 0 => n as u32,
            _ => DEFAULT_NR_SLOTS,
        };
        let vm = Arc::new(vm);
        let table = SlotTable::new(vm.clone(), nr, max, host_page);
        Ok(KvmAccel {
            kvm: Arc::new(kvm),
            vm,
            table: Arc::new(Mutex::new(table)),
            vcpus: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// A listener feeding this VM's slot table.
    pub fn listener(&self) -> KvmListener {
        KvmListener::new(self.table.clone())
    }

    pub fn vm_fd(&self) -> RawFd {
        self.vm.as_raw_fd()
    }

    /// The slots in use, by slot number.
    pub fn slots(&self) -> Vec<Slot> {
        self.table().slots()
    }

    /// The slot table, locked; a panic while it was held (reported at the ABI) does not
    /// poison it for good, since every table operation leaves the table matching the kernel.
    pub fn table(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        table::lock(&self.table)
    }

    /// The kernel's slot budget (`KVM_CAP_NR_MEMSLOTS`).
    pub fn nr_slots(&self) -> u32 {
        self.table().nr_slots()
    }

    /// The configured maximum slot size (`None`: the kernel's limit).
    pub fn max_slot_size(&self) -> Option<u64> {
        self.table().max_slot_size()
    }

    /// The maximum slot size in force: the configured one or the kernel's limit.
    pub fn effective_max_slot_size(&self) -> u64 {
        let t = self.table();
        let host_page = t.host_page();
        t.max_slot_size()
            .unwrap_or_else(|| slots::kernel_max_slot_size(host_page, host_page))
    }

    pub fn dirty_logging(&self) -> bool {
        self.table().dirty_logging()
    }

    /// Switches dirty logging on for every writable slot (the guest may be running).
    pub fn log_start(&self) -> std::result::Result<(), KvmError> {
        self.table().log_start()
    }

    pub fn log_stop(&self) -> std::result::Result<(), KvmError> {
        self.table().log_stop()
    }

    /// Fetches the kernel's dirty logs, folds them into the RAMBlocks' dirty bitmaps and returns
    /// the guest-physical pages found dirty since the previous sync.
    pub fn log_sync(
        &self,
        ramblocks: &mut RamBlockRegistry,
    ) -> std::result::Result<Vec<u64>, KvmError> {
        self.table().log_sync(ramblocks)
    }

    /// [`Self::log_sync`] with the folding step given by the caller.
    pub fn log_sync_with(
        &self,
        mark: &mut dyn FnMut(RamBlockId, u64, u64),
    ) -> std::result::Result<Vec<u64>, KvmError> {
        self.table().log_sync_with(mark)
    }

    /// The guest-physical pages the latest sync found dirty.
    pub fn last_dirty(&self) -> Vec<u64> {
        self.table().last_dirty().to_vec()
    }

    /// vCPU `id` of this VM, created on first use with `setup` (e.g. CPUID) run once on it.
    pub fn vcpu(
        &self,
        id: u64,
        setup: impl FnOnce(&Kvm, &VcpuFd) -> Result<()>,
    ) -> Result<Arc<Mutex<VcpuFd>>> {
        let mut vcpus = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = vcpus.get(&id) {
            return Ok(v.clone());
        }
        let vcpu = self.vm.create_vcpu(id).map_err(|e| KvmError::CreateVcpu {
            id,
            errno: e.errno(),
        })?;
        setup(&self.kvm, &vcpu)?;
        let vcpu = Arc::new(Mutex::new(vcpu));
        vcpus.insert(id, vcpu.clone());
        Ok(vcpu)
    }

    /// The highest vCPU id KVM accepts on this host.
    pub fn max_vcpu_id(&self) -> u64 {
        self.kvm.get_max_vcpu_id() as u64
    }

    /// Runs the guest payload over `ops` and returns, per op, the value written or read.
    pub fn run_guest(&self, ops: &[GuestOp]) -> Result<Vec<u64>> {
        let vcpu = self.vcpu(self.guest_vcpu_id(), guest::setup_vcpu)?;
        let mut vcpu = vcpu.lock().unwrap_or_else(|p| p.into_inner());
        guest::run_ops(&mut vcpu, &self.table, ops)
    }

    /// Runs the dirtier guest over `layout` on the calling thread until its stop word is set
    /// ([`guest::DirtierLayout::STOP_GPA`]); the vCPU stays locked meanwhile.
    pub fn run_dirtier(&self, layout: &guest::DirtierLayout) -> Result<guest::DirtierStop> {
        let vcpu = self.vcpu(self.guest_vcpu_id(), guest::setup_vcpu)?;
        let mut vcpu = vcpu.lock().unwrap_or_else(|p| p.into_inner());
        guest::run_dirtier(&mut vcpu, &self.table, layout)
    }

    /// The vCPU the test guests run on: the highest id KVM allows, so a VMM that drives its own
    /// vCPUs on this VM (numbered from 0) never meets it.
    fn guest_vcpu_id(&self) -> u64 {
        self.max_vcpu_id().saturating_sub(1)
    }

    /// The guest writes a signature at the start and at the end of every writable slot and
    /// halts; the host then reads every signature back through the RAMBlocks' host pointers.
    pub fn run_guest_check(&self, ramblocks: &RamBlockRegistry) -> Result<GuestCheck> {
        let run = self.guest_check_run()?;
        Self::guest_check_verify(run, ramblocks)
    }
    /// First half of the guest check: the guest writes the signatures and halts.
    pub fn guest_check_run(&self) -> Result<GuestCheckRun> {
        let slots: Vec<Slot> = self.slots().into_iter().filter(|s| !s.readonly).collect();
        if slots.is_empty() {
            return Err(Error::new(
                HmErrorClass::Kvm,
                "guest check: the VM has no writable memslot",
            ));
        }
        let mut targets: Vec<(usize, u64)> = Vec::new();
        for (i, s) in slots.iter().enumerate() {
            targets.push((i, s.gpa));
            if s.size > 8 {
                targets.push((i, s.gpa + s.size - 8));
            }
        }
        let ops_for = |t: &[(usize, u64)]| -> Vec<GuestOp> {
            t.iter()
                .map(|&(_, gpa)| GuestOp::Write {
                    gpa,
                    value: signature(gpa),
                })
                .collect()
        };
        // The payload occupies low RAM: signatures that would overwrite it are left out. Leaving
        // some out only shrinks the payload, so one pass settles it.
        let end = guest::payload_end(&ops_for(&targets))?;
        let before = targets.len();
        targets.retain(|&(_, gpa)| gpa + 8 <= guest::GDT_ADDR || gpa >= end);
        let skipped = before - targets.len();
        self.run_guest(&ops_for(&targets))?;
        Ok(GuestCheckRun {
            slots,
            targets,
            skipped,
        })
    }

    /// Second half of the guest check: every signature is read back through the RAMBlocks'
    /// host pointers, a path to guest memory independent of the slots the guest wrote through.
    pub fn guest_check_verify(
        run: GuestCheckRun,
        ramblocks: &RamBlockRegistry,
    ) -> Result<GuestCheck> {
        let GuestCheckRun {
            slots,
            targets,
            skipped,
        } = run;
        let mut bad = Vec::new();
        for &(i, gpa) in &targets {
            let s = &slots[i];
            let offset = s.block_offset + (gpa - s.gpa);
            let found = ramblock_u64(ramblocks, s.block, offset).map(|p| {
                // SAFETY: ramblock_u64 returned a pointer to 8 bytes inside the RAMBlock's
                // memory, which its mapping keeps mapped while `ramblocks` is borrowed; the
                // vCPU has halted, so nothing writes it concurrently.
                unsafe { std::ptr::read_unaligned(p as *const u64) }
            });
            if found != Some(signature(gpa)) {
                bad.push(match found {
                    Some(v) => format!(
                        "slot {} gpa 0x{gpa:x}: RAMBlock {} offset 0x{offset:x} holds 0x{v:x}, \
                         expected 0x{:x}",
                        s.slot,
                        s.block.0,
                        signature(gpa)
                    ),
                    None => format!(
                        "slot {} gpa 0x{gpa:x}: RAMBlock {} has no byte at offset 0x{offset:x}",
                        s.slot, s.block.0
                    ),
                });
            }
        }
        if !bad.is_empty() {
            let n = bad.len();
            bad.truncate(8);
            return Err(Error::new(
                HmErrorClass::Kvm,
                format!(
                    "guest check failed: {n} of {} signatures wrong: {}",
                    targets.len(),
                    bad.join("; ")
                ),
            ));
        }
        Ok(GuestCheck {
            slots: slots.len(),
            signatures: targets.len(),
            bytes_verified: 8 * targets.len() as u64,
            skipped,
        })
    }
}

/// Where the 8 bytes at `offset` of RAMBlock `block` live in this process, if the block has
/// them: the guest check's independent path to guest memory.
pub fn ramblock_u64(
    ramblocks: &RamBlockRegistry,
    block: RamBlockId,
    offset: u64,
) -> Option<*const u8> {
    let b = ramblocks.get(block)?;
    (offset.checked_add(8)? <= b.max_length)
        .then(|| b.host_ptr().wrapping_add(offset as usize) as *const u8)
}

impl HasMemory for KvmAccel {
    fn accel_name(&self) -> &str {
        "KVM"
    }

    fn has_memory(&self, gpa: u64, size: u64) -> bool {
        self.table().has_memory(gpa, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_differ_per_address() {
        assert_ne!(signature(0), signature(8));
        assert_eq!(signature(0x1000) ^ signature(0), 0x1000);
    }
}
