//! What KVM can refuse, each in QEMU's words where QEMU has them (`kvm-all.c`), converted to
//! the C-facing [`Error`] (class `Kvm`, errno) in one place.

use crate::error::{strerror, Error, HmErrorClass};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvmError {
    #[error("Could not access KVM kernel module: {}", strerror(*errno))]
    Open { errno: i32 },
    #[error("ioctl(KVM_CREATE_VM) failed: {}", strerror(*errno))]
    CreateVm { errno: i32 },
    #[error("kvm_init_vcpu: creating vCPU {id} failed: {}", strerror(*errno))]
    CreateVcpu { id: u64, errno: i32 },
    #[error("KVM is not attached to this machine")]
    NotAttached,
    /// `hm_kvm_attach_vm_fd` with a descriptor that is not a VM.
    #[error("fd {fd} is not a KVM VM: {}", strerror(*errno))]
    NotAVm { fd: i32, errno: i32 },
    #[error("KVM slot {slot} is {why}")]
    SlotNotReservable { slot: u32, why: &'static str },
    #[error("KVM is already attached to this machine")]
    AlreadyAttached,
    #[error("kvm_alloc_slot: no free slot available")]
    NoFreeSlot { nr_slots: u32 },
    #[error("kvm_set_user_memory_region: KVM_SET_USER_MEMORY_REGION failed, slot={slot}, start=0x{gpa:x}, size=0x{size:x}: {}", strerror(*errno))]
    SetMemoryRegion {
        slot: u32,
        gpa: u64,
        size: u64,
        errno: i32,
    },
    #[error("kvm_slot_get_dirty_log: KVM_GET_DIRTY_LOG failed, slot={slot}, start=0x{gpa:x}, size=0x{size:x}: {}", strerror(*errno))]
    GetDirtyLog {
        slot: u32,
        gpa: u64,
        size: u64,
        errno: i32,
    },
    #[error("KVM_CLEAR_DIRTY_LOG failed, slot={slot}, start=0x{gpa:x}, pages={pages}: {}", strerror(*errno))]
    ClearDirtyLog {
        slot: u32,
        gpa: u64,
        pages: u32,
        errno: i32,
    },
    #[error("max-slot-size 0x{size:x} must be a multiple of the host page size 0x{host_page:x}")]
    SlotSizeNotPageMultiple { size: u64, host_page: u64 },
    /// The preflight's estimate of the kernel memory new slots need exceeds what the host can
    /// spare (see `cost`): refused before anything is registered.
    /// The text names the estimate, the paging mode and what the host has.
    #[error("{0}")]
    SlotCost(String),
    /// The configured slot size cannot hold one page of a section's memory (hugetlbfs).
    #[error("memory region '{region}': max-slot-size 0x{configured:x} is smaller than the page size 0x{page:x} of the memory behind the section")]
    SlotSizeBelowPage {
        region: String,
        configured: u64,
        page: u64,
    },
}

impl KvmError {
    fn errno(&self) -> Option<i32> {
        match *self {
            KvmError::Open { errno }
            | KvmError::CreateVm { errno }
            | KvmError::CreateVcpu { errno, .. }
            | KvmError::SetMemoryRegion { errno, .. }
            | KvmError::GetDirtyLog { errno, .. }
            | KvmError::ClearDirtyLog { errno, .. }
            | KvmError::NotAVm { errno, .. } => Some(errno),
            _ => None,
        }
    }
}

impl From<KvmError> for Error {
    fn from(e: KvmError) -> Error {
        let class = match e {
            KvmError::SlotSizeNotPageMultiple { .. } | KvmError::SlotSizeBelowPage { .. } => {
                HmErrorClass::InvalidParameter
            }
            KvmError::AlreadyAttached => HmErrorClass::InUse,
            KvmError::NotAVm { .. } => HmErrorClass::InvalidParameter,
            KvmError::SlotNotReservable { why, .. } if why.starts_with("beyond") => {
                HmErrorClass::InvalidParameter
            }
            KvmError::SlotNotReservable { .. } => HmErrorClass::InUse,
            _ => HmErrorClass::Kvm,
        };
        let mut err = Error::new(class, e.to_string());
        if let Some(errno) = e.errno() {
            err = err.with_errno(errno);
        }
        if let KvmError::SlotCost(_) = e {
            err = err.with_hint(
                "-accel kvm,memslot-preflight=off registers them anyway, at the risk of the \
                 host's OOM killer\n",
            );
        }
        if let KvmError::NoFreeSlot { nr_slots } = e {
            err = err.with_hint(format!(
                "KVM allows {nr_slots} memory slots and all are in use; a larger max-slot-size \
                 needs fewer\n"
            ));
        }
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_slot_start_size_and_errno() {
        let e: Error = KvmError::SetMemoryRegion {
            slot: 3,
            gpa: 0x1000,
            size: 0x2000,
            errno: libc::EEXIST,
        }
        .into();
        assert_eq!(
            e.message(),
            "kvm_set_user_memory_region: KVM_SET_USER_MEMORY_REGION failed, slot=3, \
             start=0x1000, size=0x2000: File exists"
        );
        assert_eq!(
            (e.class(), e.errno()),
            (HmErrorClass::Kvm, Some(libc::EEXIST))
        );
    }

    #[test]
    fn an_exhausted_budget_says_how_many_slots_there_are() {
        let e: Error = KvmError::NoFreeSlot { nr_slots: 32 }.into();
        assert_eq!(e.message(), "kvm_alloc_slot: no free slot available");
        assert!(e.hint().unwrap().starts_with("KVM allows 32 memory slots"));
    }
}
