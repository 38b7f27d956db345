//! KVM: memslots from the flat view, split at the slot limit, and dirty logging (QEMU's
//! `accel/kvm/kvm-all.c`, memory part). The guest programs that prove the slots from inside a
//! vCPU are test support (`crate::testing`, feature `test-guest`).
//!
//! - [`slots`]: the pure split of a RAM section into slots (`kvm_align_section`, the
//!   `kvm_max_slot_size` walk);
//! - [`table`]: the slot table of one VM and the ioctls that keep the kernel in step;
//! - [`listener`]: the [`crate::listener::MemoryListener`] that feeds the table from commits;
//! - [`cost`]: what slots cost the host kernel, and the preflight that refuses them first;
//! - [`error`]: what KVM refuses, in QEMU's words;
//! - this file: [`KvmAccel`], the VM of one machine and its vCPUs.
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
//!   memory per 4 KiB page up front, ~20 GiB for an 8 TiB slot, whatever is backed. The
//!   preflight ([`cost`]) refuses slots whose estimate exceeds what the host can spare, before
//!   the kernel is asked (QEMU lets the OOM killer decide).

pub mod cost;
pub mod error;
pub mod listener;
pub mod slots;
pub mod table;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::error::Result;
use crate::listener::HasMemory;
use crate::ramblock::{RamBlockId, RamBlockRegistry};

pub use error::KvmError;
pub use listener::KvmListener;
pub use table::{Slot, SlotTable};

/// The name the KVM listener registers under.
pub const LISTENER_NAME: &str = "kvm-memory";

/// QEMU's slot budget when the kernel does not report `KVM_CAP_NR_MEMSLOTS`.
const DEFAULT_NR_SLOTS: u32 = 32;

/// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (bit 0 of its value: KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE).
const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;

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

impl KvmAccel {
    /// Opens `/dev/kvm` and creates a VM whose slots pass this host's preflight. `max_slot_size`
    /// 0 means the kernel's limit; otherwise it must be a multiple of the host page size
    /// (QEMU's `kvm_set_max_memslot_size`).
    pub fn open(max_slot_size: u64) -> std::result::Result<Self, KvmError> {
        Self::open_with(max_slot_size, Some(cost::Preflight::of_host()))
    }

    /// [`Self::open`] with the preflight given (None: slots are registered whatever they cost).
    pub fn open_with(
        max_slot_size: u64,
        preflight: Option<cost::Preflight>,
    ) -> std::result::Result<Self, KvmError> {
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
        // Manual dirty-log protection (QEMU turns it on too): a sync re-protects only the 1 GiB
        // chunks that hold dirty pages, one KVM_CLEAR_DIRTY_LOG each. Not INITIALLY_SET: the
        // first sync after logging starts reports only pages written since, as before.
        let manual = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) & 1 != 0
            && vm
                .enable_cap(&kvm_bindings::kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [1, 0, 0, 0],
                    ..Default::default()
                })
                .is_ok();
        let vm = Arc::new(vm);
        let mut table = SlotTable::new(vm.clone(), nr, max, host_page);
        table.set_manual_protect(manual);
        table.set_preflight(preflight);
        Ok(KvmAccel {
            kvm: Arc::new(kvm),
            vm,
            table: Arc::new(Mutex::new(table)),
            vcpus: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Refuses, before anything is registered, a layout whose slots the host cannot afford:
    /// the whole of `sections` is estimated at once (a listener's replay registers one section
    /// at a time). Nothing to do when the preflight is off.
    pub fn preflight(&self, sections: &[crate::listener::MemorySection]) -> Result<()> {
        let t = self.table();
        if let Some(p) = t.preflight() {
            p.check(&t.planned_slots(sections)?)?;
        }
        Ok(())
    }

    /// Adopts a VM the VMM created and configured itself (`vm_fd` is duplicated: the VMM keeps
    /// its descriptor), with slot numbers `vmm_slots` set aside for the VMM's own memory.
    /// `max_slot_size` as for [`KvmAccel::open`].
    pub fn adopt(
        vm_fd: RawFd,
        max_slot_size: u64,
        vmm_slots: &[u32],
    ) -> std::result::Result<Self, KvmError> {
        let host_page = crate::hostmap::host_page_size() as u64;
        let max = slots::check_max_slot_size(max_slot_size, host_page)?;
        let not_a_vm = |errno| KvmError::NotAVm { fd: vm_fd, errno };
        // SAFETY: F_GETFD reads a descriptor's flags; any integer is a valid argument.
        if unsafe { libc::fcntl(vm_fd, libc::F_GETFD) } < 0 {
            return Err(not_a_vm(crate::hostmap::errno()));
        }
        match std::fs::read_link(format!("/proc/self/fd/{vm_fd}")) {
            Ok(target) if target.as_os_str() == "anon_inode:kvm-vm" => {}
            Ok(_) => return Err(not_a_vm(libc::EINVAL)),
            Err(e) => return Err(not_a_vm(e.raw_os_error().unwrap_or(libc::EBADF))),
        }
        let kvm = Kvm::new().map_err(|e| KvmError::Open { errno: e.errno() })?;
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor just checked to be open; the copy is ours.
        let dup = unsafe { libc::fcntl(vm_fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(not_a_vm(crate::hostmap::errno()));
        }
        // SAFETY: `dup` is an open KVM VM descriptor owned by nobody else; the VmFd takes it.
        let vm = unsafe { kvm.create_vmfd_from_rawfd(dup) }
            .map_err(|e| KvmError::CreateVm { errno: e.errno() })?;
        let nr = match vm.check_extension_int(Cap::NrMemslots) {
            n if n > 0 => n as u32,
            _ => DEFAULT_NR_SLOTS,
        };
        let vm = Arc::new(vm);
        let mut table = SlotTable::new(vm.clone(), nr, max, host_page);
        for &n in vmm_slots {
            table.reserve(n)?;
        }
        table.set_preflight(Some(cost::Preflight::of_host()));
        // Manual dirty-log protection stays as the VMM left it (off for hostmem's table): it
        // is VM-wide, and switching it on would stop KVM_GET_DIRTY_LOG from clearing the
        // VMM's own slots' logs.
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
    /// how many pages were found dirty since the previous sync ([`Self::last_dirty`] lists them).
    pub fn log_sync(&self, ramblocks: &mut RamBlockRegistry) -> std::result::Result<u64, KvmError> {
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
        self.table().last_dirty()
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

    /// The slot table the test guest places its programs through (see [`crate::testing`]).
    #[cfg(feature = "test-guest")]
    pub(crate) fn slot_table(&self) -> &Arc<Mutex<SlotTable>> {
        &self.table
    }
}

impl HasMemory for KvmAccel {
    fn accel_name(&self) -> &str {
        "KVM"
    }

    fn has_memory(&self, gpa: u64, size: u64) -> bool {
        self.table().has_memory(gpa, size)
    }
}
