//! KVM: memslots from the flat view, split at the slot limit, dirty logging, and a guest payload
//! that proves the slots on a real vCPU (QEMU's `accel/kvm/kvm-all.c`, memory part).
//!
//! - [`slots`]: the pure split of a RAM section into slots (`kvm_align_section`, the
//!   `kvm_max_slot_size` walk);
//! - [`table`]: the slot table of one VM and the ioctls that keep the kernel in step;
//! - [`listener`]: the [`crate::listener::MemoryListener`] that feeds the table from commits;
//! - [`guest`]: the x86-64 payload;
//! - this file: [`KvmHandle`], the VM of one context, and the `info memslots` text.
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

pub mod guest;
pub mod listener;
pub mod slots;
pub mod table;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::context::Context;
use crate::error::{Error, HmErrorClass, Result};
use crate::memory::MemorySystem;
use crate::ramblock::{RamBlockId, RamBlockRegistry};

pub use guest::GuestOp;
pub use listener::KvmListener;
pub use table::{Slot, SlotTable};

/// The name the KVM listener registers under.
pub const LISTENER_NAME: &str = "kvm-memory";

/// The error of a KVM call on a machine without KVM.
pub fn not_attached() -> Error {
    Error::new(HmErrorClass::Kvm, "KVM is not attached to this machine")
}

/// QEMU's slot budget when the kernel does not report `KVM_CAP_NR_MEMSLOTS`.
const DEFAULT_NR_SLOTS: u32 = 32;

/// The value the guest check writes at `gpa`: different at every address, so a write that
/// lands at the wrong place cannot pass for the right one.
pub fn signature(gpa: u64) -> u64 {
    crate::ffi::kvm::HM_KVM_SIGNATURE ^ gpa
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

/// The KVM VM of one context: the VM fd, its vCPU and the slot table the listener fills.
///
/// Clones share the VM: the C API clones the handle out of the locked context so that a guest
/// run does not keep the context locked (another thread may change the layout or the dirty log
/// meanwhile, as with a real vCPU thread).
#[derive(Clone)]
pub struct KvmHandle {
    kvm: Arc<Kvm>,
    vm: Arc<VmFd>,
    table: Arc<Mutex<SlotTable>>,
    vcpu: Arc<Mutex<Option<VcpuFd>>>,
}

/// A guest check whose guest has run and whose signatures are still to be verified
/// ([`KvmHandle::guest_check_run`], then [`KvmHandle::guest_check_verify`]).
pub struct GuestCheckRun {
    slots: Vec<Slot>,
    targets: Vec<(usize, u64)>,
    skipped: usize,
}

impl KvmHandle {
    /// Opens `/dev/kvm` and creates a VM. `max_slot_size` 0 means the kernel's limit; otherwise
    /// it must be a multiple of the host page size (QEMU's `kvm_set_max_memslot_size`).
    pub fn open(max_slot_size: u64) -> Result<Self> {
        let host_page = crate::hostmap::host_page_size() as u64;
        let max = slots::check_max_slot_size(max_slot_size, host_page)?;
        let kvm = Kvm::new().map_err(|e| {
            Error::host("Could not access KVM kernel module", e.errno())
                .with_class(HmErrorClass::Kvm)
        })?;
        let vm = kvm.create_vm().map_err(|e| {
            Error::host("ioctl(KVM_CREATE_VM) failed", e.errno()).with_class(HmErrorClass::Kvm)
        })?;
        let nr = match vm.check_extension_int(Cap::NrMemslots) {
            n if n > 0 => n as u32,
            _ => DEFAULT_NR_SLOTS,
        };
        let vm = Arc::new(vm);
        let table = SlotTable::new(vm.clone(), nr, max, host_page);
        Ok(KvmHandle {
            kvm: Arc::new(kvm),
            vm,
            table: Arc::new(Mutex::new(table)),
            vcpu: Arc::new(Mutex::new(None)),
        })
    }

    /// Attaches a new VM to a context: registers the KVM listener, which gets the current flat
    /// view replayed as slots, and stores the handle in `ctx.kvm`.
    pub fn attach(ctx: &mut Context, max_slot_size: u64) -> Result<()> {
        if ctx.kvm.is_some() {
            return Err(Error::new(
                HmErrorClass::InUse,
                "KVM is already attached to this machine",
            ));
        }
        let handle = KvmHandle::open(max_slot_size)?;
        ctx.memory.add_listener(Box::new(handle.listener()))?;
        let table = handle.table.clone();
        ctx.memory.set_accel_query(
            "KVM",
            Some(Box::new(move |gpa, size| {
                listener::lock(&table).has_memory(gpa, size)
            })),
        );
        ctx.kvm = Some(handle);
        Ok(())
    }

    /// Detaches the context's VM: the listener leaves the memory system (every slot is removed
    /// on the way) and the VM is closed.
    pub fn detach(ctx: &mut Context) -> Result<()> {
        if ctx.kvm.take().is_none() {
            return Err(not_attached());
        }
        ctx.memory.remove_listener(LISTENER_NAME);
        ctx.memory.set_accel_query("KVM", None);
        Ok(())
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
        listener::lock(&self.table).slots()
    }

    /// The kernel's slot budget (`KVM_CAP_NR_MEMSLOTS`).
    pub fn nr_slots(&self) -> u32 {
        listener::lock(&self.table).nr_slots()
    }

    /// The configured maximum slot size (`None`: the kernel's limit).
    pub fn max_slot_size(&self) -> Option<u64> {
        listener::lock(&self.table).max_slot_size()
    }

    pub fn dirty_logging(&self) -> bool {
        listener::lock(&self.table).dirty_logging()
    }

    /// Switches dirty logging on for every writable slot (the guest may be running).
    pub fn log_start(&self) -> Result<()> {
        listener::lock(&self.table).log_start()
    }

    pub fn log_stop(&self) -> Result<()> {
        listener::lock(&self.table).log_stop()
    }

    /// Fetches the kernel's dirty logs, folds them into the RAMBlocks' dirty bitmaps and returns
    /// the guest-physical pages found dirty since the previous sync.
    pub fn log_sync(&self, ramblocks: &mut RamBlockRegistry) -> Result<Vec<u64>> {
        listener::lock(&self.table).log_sync(ramblocks)
    }

    /// [`Self::log_sync`] with the folding step given by the caller.
    pub fn log_sync_with(&self, mark: &mut dyn FnMut(RamBlockId, u64, u64)) -> Result<Vec<u64>> {
        listener::lock(&self.table).log_sync_with(mark)
    }

    /// The guest-physical pages the latest sync found dirty.
    pub fn last_dirty(&self) -> Vec<u64> {
        listener::lock(&self.table).last_dirty().to_vec()
    }

    /// Runs the guest payload over `ops` and returns, per op, the value written or read.
    pub fn run_guest(&self, ops: &[GuestOp]) -> Result<Vec<u64>> {
        let mut vcpu = self.vcpu.lock().unwrap_or_else(|p| p.into_inner());
        if vcpu.is_none() {
            *vcpu = Some(guest::create_vcpu(&self.kvm, &self.vm)?);
        }
        guest::run_ops(vcpu.as_mut().expect("created above"), &self.table, ops)
    }

    /// Runs the dirtier guest over `layout` on the calling thread until its stop word is set
    /// ([`guest::DirtierLayout::STOP_GPA`]); the vCPU stays locked meanwhile.
    pub fn run_dirtier(&self, layout: &guest::DirtierLayout) -> Result<guest::DirtierStop> {
        let mut vcpu = self.vcpu.lock().unwrap_or_else(|p| p.into_inner());
        if vcpu.is_none() {
            *vcpu = Some(guest::create_vcpu(&self.kvm, &self.vm)?);
        }
        guest::run_dirtier(vcpu.as_mut().expect("created above"), &self.table, layout)
    }

    /// The guest writes a signature at the start and at the end of every writable slot and
    /// halts; the host then reads every signature back through the RAMBlocks' host pointers.
    pub fn run_guest_check(&self, mem: &MemorySystem) -> Result<GuestCheck> {
        self.run_guest_check_with(&|block, offset| ramblock_u64(&mem.ramblocks, block, offset))
    }

    /// [`Self::run_guest_check`] with the host-side lookup given by the caller:
    /// `resolve(block, offset)` returns where that RAMBlock byte lives in this process.
    pub fn run_guest_check_with(
        &self,
        resolve: &dyn Fn(RamBlockId, u64) -> Option<*const u8>,
    ) -> Result<GuestCheck> {
        let run = self.guest_check_run()?;
        Self::guest_check_verify(run, resolve)
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

    /// Second half of the guest check: every signature is read back through `resolve`, which
    /// returns where a RAMBlock byte lives in this process.
    pub fn guest_check_verify(
        run: GuestCheckRun,
        resolve: &dyn Fn(RamBlockId, u64) -> Option<*const u8>,
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
            let found = resolve(s.block, offset).map(|p| {
                // SAFETY: `resolve` returned a pointer to 8 readable bytes of the RAMBlock's
                // memory; the vCPU has halted, so nothing writes it concurrently.
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

    /// The text of our HMP `info memslots`: a summary line, a column header and one row per
    /// slot. RAMBlock names come from `ramblocks` when given (unnamed blocks show the region).
    pub fn info_memslots(&self, ramblocks: Option<&RamBlockRegistry>) -> String {
        let t = listener::lock(&self.table);
        let host_page = t.host_page();
        format_memslots(
            &t.slots(),
            t.nr_slots(),
            t.max_slot_size()
                .unwrap_or_else(|| slots::kernel_max_slot_size(host_page, host_page)),
            t.dirty_logging(),
            &|s: &Slot| {
                ramblocks
                    .and_then(|r| r.get(s.block))
                    .map(|b| b.idstr.clone())
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| s.region_name.clone())
            },
        )
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

/// Formats the `info memslots` table (see [`KvmHandle::info_memslots`]).
pub fn format_memslots(
    slots: &[Slot],
    nr_slots: u32,
    max_slot_size: u64,
    dirty_logging: bool,
    name: &dyn Fn(&Slot) -> String,
) -> String {
    let mut out = format!(
        "KVM memslots: {} used of {}, max slot size 0x{:x}, dirty logging {}\n",
        slots.len(),
        nr_slots,
        max_slot_size,
        if dirty_logging { "on" } else { "off" }
    );
    out.push_str(&format!(
        "{:>4} {:<37} {:<18} {:<18} {:<6} {}\n",
        "slot", "GPA", "size", "HVA", "flags", "RAMBlock@offset"
    ));
    for s in slots {
        let flags = if s.readonly {
            "ro"
        } else if s.flags & kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES != 0 {
            "rw,log"
        } else {
            "rw"
        };
        out.push_str(&format!(
            "{:>4} 0x{:016x}-0x{:016x} 0x{:016x} 0x{:016x} {:<6} {}@0x{:x}\n",
            s.slot,
            s.gpa,
            s.gpa + (s.size - 1),
            s.size,
            s.hva,
            flags,
            name(s),
            s.block_offset
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(n: u32, gpa: u64, size: u64, flags: u32, readonly: bool) -> Slot {
        Slot {
            slot: n,
            gpa,
            size,
            hva: 0x7f00_0000_0000 + gpa,
            flags,
            block: RamBlockId(0),
            block_offset: gpa,
            region_name: "pc.ram".into(),
            readonly,
        }
    }

    #[test]
    fn info_memslots_has_a_summary_a_header_and_one_row_per_slot() {
        let text = format_memslots(
            &[
                slot(0, 0, 0xc000_0000, 0, false),
                slot(1, 0x1_0000_0000, 0xc000_0000, 1, false),
                slot(2, 0xfffc_0000, 0x4_0000, 2, true),
            ],
            32764,
            0x7ff_ffff_f000,
            true,
            &|s| s.region_name.clone(),
        );
        let expected = "\
KVM memslots: 3 used of 32764, max slot size 0x7fffffff000, dirty logging on
slot GPA                                   size               HVA                flags  RAMBlock@offset
   0 0x0000000000000000-0x00000000bfffffff 0x00000000c0000000 0x00007f0000000000 rw     pc.ram@0x0
   1 0x0000000100000000-0x00000001bfffffff 0x00000000c0000000 0x00007f0100000000 rw,log pc.ram@0x100000000
   2 0x00000000fffc0000-0x00000000ffffffff 0x0000000000040000 0x00007f00fffc0000 ro     pc.ram@0xfffc0000
";
        assert_eq!(text, expected);
    }

    #[test]
    fn signatures_differ_per_address() {
        assert_ne!(signature(0), signature(8));
        assert_eq!(signature(0x1000) ^ signature(0), 0x1000);
    }
}
