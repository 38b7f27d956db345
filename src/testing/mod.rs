//! Test support, not product: guest programs that prove from inside a real vCPU what the
//! memslots map and what migration carries, and the checks built on them. Behind the cargo
//! feature `test-guest`, which the project's own tests, its `vmm` and its demo turn on; a VMM
//! that links hostmem for its guests does not carry them.
//!
//! - [`guest`]: the x86-64 programs (an op list; the dirtier) and their host side;
//! - [`check`]: the guest check over every writable slot;
//! - [`memory`]: guest memory filled with a pattern and summed from the host (for guests too
//!   large to compare byte for byte);
//! - `runner`: the dirtier as a running guest that pauses, saves and resumes (x86-64);
//! - [`machines`]: `none` machines for tests and benchmarks without a C board.

pub mod check;
pub mod guest;
pub mod machines;
pub mod memory;
#[cfg(target_arch = "x86_64")]
pub mod runner;

use std::sync::Mutex;

use crate::error::Result;
use crate::kvm::KvmAccel;

pub use check::{guest_check, signature, GuestCheck, GuestCheckRun, HM_KVM_SIGNATURE};
pub use guest::GuestOp;

/// The test guests on a VM. They run on the highest vCPU id KVM allows, so a VMM that drives
/// its own vCPUs on the same VM (numbered from 0) never meets them.
pub trait GuestRun {
    /// Runs the ops program over `ops` and returns, per op, the value written or read.
    fn run_guest(&self, ops: &[GuestOp]) -> Result<Vec<u64>>;
    /// Runs the dirtier over `layout` on the calling thread until its stop word is set
    /// ([`guest::DirtierLayout::STOP_GPA`]); the vCPU stays locked meanwhile.
    fn run_dirtier(&self, layout: &guest::DirtierLayout) -> Result<guest::DirtierStop>;
    /// The guest check: signatures written by the guest, read back through `ramblocks`.
    fn run_guest_check(&self, ramblocks: &crate::ramblock::RamBlockRegistry) -> Result<GuestCheck>;
}

fn test_vcpu(kvm: &KvmAccel) -> Result<std::sync::Arc<Mutex<kvm_ioctls::VcpuFd>>> {
    kvm.vcpu(kvm.max_vcpu_id().saturating_sub(1), guest::setup_vcpu)
}

impl GuestRun for KvmAccel {
    fn run_guest(&self, ops: &[GuestOp]) -> Result<Vec<u64>> {
        let vcpu = test_vcpu(self)?;
        let mut vcpu = vcpu.lock().unwrap_or_else(|p| p.into_inner());
        guest::run_ops(&mut vcpu, self.slot_table(), ops)
    }

    fn run_dirtier(&self, layout: &guest::DirtierLayout) -> Result<guest::DirtierStop> {
        let vcpu = test_vcpu(self)?;
        let mut vcpu = vcpu.lock().unwrap_or_else(|p| p.into_inner());
        guest::run_dirtier(&mut vcpu, self.slot_table(), layout)
    }

    fn run_guest_check(&self, ramblocks: &crate::ramblock::RamBlockRegistry) -> Result<GuestCheck> {
        guest_check(self, ramblocks)
    }
}
