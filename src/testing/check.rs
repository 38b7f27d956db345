//! The guest check: a vCPU writes a signature at the start and at the end of every writable
//! memslot, and the host reads each back through the RAMBlocks' host pointers, a path to guest
//! memory independent of the slots the guest wrote through. A slot at the wrong GPA, HVA or
//! RAMBlock offset fails it.

use crate::error::{Error, HmErrorClass, Result};
use crate::guarded::{Guard, Span};
use crate::kvm::{KvmAccel, Slot};
use crate::ramblock::{RamBlockId, RamBlockRegistry};

use super::guest::GuestOp;
use super::GuestRun;

/// The guest check writes `HM_KVM_SIGNATURE ^ gpa` at each checked guest-physical address
/// ("hostmem!" in ASCII), so a write landing elsewhere cannot pass for the right one.
pub const HM_KVM_SIGNATURE: u64 = 0x686f_7374_6d65_6d21;

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

/// A guest check whose guest has run and whose signatures are still to be verified
/// ([`GuestCheckRun::run`], then [`GuestCheckRun::verify`]): the two halves let a caller run
/// the guest with its machine unlocked and verify with it locked.
pub struct GuestCheckRun {
    slots: Vec<Slot>,
    targets: Vec<(usize, u64)>,
    skipped: usize,
}

impl GuestCheckRun {
    /// First half of the guest check: the guest writes the signatures and halts.
    pub fn run(kvm: &KvmAccel) -> Result<GuestCheckRun> {
        let slots: Vec<Slot> = kvm.slots().into_iter().filter(|s| !s.readonly).collect();
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
        let end = super::guest::payload_end(&ops_for(&targets))?;
        let before = targets.len();
        targets.retain(|&(_, gpa)| gpa + 8 <= super::guest::GDT_ADDR || gpa >= end);
        let skipped = before - targets.len();
        kvm.run_guest(&ops_for(&targets))?;
        Ok(GuestCheckRun {
            slots,
            targets,
            skipped,
        })
    }

    /// Second half of the guest check: every signature is read back through the RAMBlocks'
    /// host pointers, a path to guest memory independent of the slots the guest wrote through.
    pub fn verify(self, ramblocks: &RamBlockRegistry) -> Result<GuestCheck> {
        let GuestCheckRun {
            slots,
            targets,
            skipped,
        } = self;
        let mut bad = Vec::new();
        let guard = Guard::acquire().map_err(|e| Error::generic(e.to_string()))?;
        for &(i, gpa) in &targets {
            let s = &slots[i];
            let offset = s.block_offset + (gpa - s.gpa);
            // The vCPU has halted, so nothing writes the signature concurrently.
            let found = ramblock_u64(ramblocks, &guard, s.block, offset)?;
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

/// The whole guest check on `kvm`, its RAM read back through `ramblocks`.
pub fn guest_check(kvm: &KvmAccel, ramblocks: &RamBlockRegistry) -> Result<GuestCheck> {
    GuestCheckRun::run(kvm)?.verify(ramblocks)
}

/// The 8 bytes at `offset` of RAMBlock `block`, read through its host mapping under `guard`
/// (the guest check's independent path to guest memory): None when the block has no such
/// bytes, an error when the host cannot back the page.
pub fn ramblock_u64(
    ramblocks: &RamBlockRegistry,
    guard: &Guard,
    block: RamBlockId,
    offset: u64,
) -> Result<Option<u64>> {
    let Some(b) = ramblocks.get(block) else {
        return Ok(None);
    };
    if offset.checked_add(8).is_none_or(|e| e > b.max_length) {
        return Ok(None);
    }
    let mut v = [0u8; 8];
    guard
        .read(
            &Span::of(&b.mapping),
            (b.mapping_offset + offset) as usize,
            &mut v,
        )
        .map_err(|e| {
            Error::new(
                HmErrorClass::Host,
                format!(
                    "guest check: reading RAMBlock \"{}\" at offset 0x{:x} failed: {e}",
                    b.idstr,
                    e.offset().saturating_sub(b.mapping_offset)
                ),
            )
            .with_errno(libc::EFAULT)
        })?;
    Ok(Some(u64::from_le_bytes(v)))
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
