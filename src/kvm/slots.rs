//! Splitting one flat RAM section into KVM memslots: pure arithmetic, no ioctls.
//!
//! KVM refuses a slot of `KVM_MEM_MAX_NR_PAGES` (2^31 − 1) host pages or more, whatever the
//! architecture; QEMU only splits where a board asked for it (s390), so a single 9 TiB section
//! fails on x86. hostmem splits every section, at the kernel's limit unless a lower limit was set
//! (QEMU's `kvm_set_max_memslot_size`). Adding, removing and dirty-syncing a section all walk the
//! same split, so the same section always yields the same slots.

use super::error::KvmError;

type Result<T> = std::result::Result<T, KvmError>;

/// The kernel's per-slot page limit (`KVM_MEM_MAX_NR_PAGES`), counted in host pages.
pub(crate) const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;

/// One contiguous piece of guest RAM as KVM sees it: where it is in the guest, where it is in
/// the host, and where it is in its RAMBlock. Slots cut from one section advance all three
/// addresses by the same amount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRange {
    pub gpa: u64,
    pub size: u64,
    pub hva: u64,
    pub block_offset: u64,
}

/// The largest slot the kernel accepts, in bytes, as a multiple of `page_size` (the page size
/// of the memory behind the section: a slot boundary inside a huge page would cost the guest its
/// large mappings).
pub fn kernel_max_slot_size(host_page: u64, page_size: u64) -> u64 {
    let bytes = KVM_MEM_MAX_NR_PAGES * host_page;
    let page = page_size.max(host_page);
    bytes - bytes % page
}

/// Checks a user-chosen maximum slot size (`-accel kvm,max-slot-size=`). 0 means "the kernel's
/// limit" and yields `None`. QEMU asserts host-page alignment; we report it.
pub fn check_max_slot_size(size: u64, host_page: u64) -> Result<Option<u64>> {
    if size == 0 {
        return Ok(None);
    }
    if !size.is_multiple_of(host_page) {
        return Err(KvmError::SlotSizeNotPageMultiple { size, host_page });
    }
    Ok(Some(size))
}

/// The slot size limit that applies to one section: the configured limit (or the kernel's),
/// never above the kernel's, rounded down to the section's page size.
pub fn effective_max_slot_size(
    configured: Option<u64>,
    host_page: u64,
    page_size: u64,
) -> Result<u64> {
    let kernel = kernel_max_slot_size(host_page, page_size);
    let page = page_size.max(host_page);
    let limit = configured.map_or(kernel, |c| c.min(kernel));
    let limit = limit - limit % page;
    if limit == 0 {
        // The caller knows which region the section is of.
        return Err(KvmError::SlotSizeBelowPage {
            region: String::new(),
            configured: configured.unwrap_or(0),
            page,
        });
    }
    Ok(limit)
}

/// Trims a section to whole host pages as KVM needs them (QEMU's `kvm_align_section`): the start
/// moves up to the next host page boundary and the size is cut to whole pages. HVA and RAMBlock
/// offset move with the start. A section with no whole host page in it yields `None`.
pub fn align_section(section: SlotRange, host_page: u64) -> Option<SlotRange> {
    debug_assert!(host_page.is_power_of_two());
    let delta = (host_page - section.gpa % host_page) % host_page;
    if delta >= section.size {
        return None;
    }
    let size = (section.size - delta) & !(host_page - 1);
    if size == 0 {
        return None;
    }
    Some(SlotRange {
        gpa: section.gpa + delta,
        size,
        hva: section.hva + delta,
        block_offset: section.block_offset + delta,
    })
}

/// Splits a section into slots of at most `max_slot_size` bytes, after aligning it to host
/// pages. The slots cover the aligned section exactly, in order, without gaps.
pub fn split_section(section: SlotRange, host_page: u64, max_slot_size: u64) -> Vec<SlotRange> {
    assert!(max_slot_size > 0, "a zero slot limit would never progress");
    let Some(aligned) = align_section(section, host_page) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(aligned.size.div_ceil(max_slot_size) as usize);
    let mut done = 0u64;
    while done < aligned.size {
        let size = (aligned.size - done).min(max_slot_size);
        out.push(SlotRange {
            gpa: aligned.gpa + done,
            size,
            hva: aligned.hva + done,
            block_offset: aligned.block_offset + done,
        });
        done += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIB4: u64 = 4096;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;

    fn sec(gpa: u64, size: u64, hva: u64, off: u64) -> SlotRange {
        SlotRange {
            gpa,
            size,
            hva,
            block_offset: off,
        }
    }

    #[test]
    fn kernel_limit_is_one_page_short_of_8_tib_with_4k_pages() {
        assert_eq!(kernel_max_slot_size(KIB4, KIB4), 8 * TIB - KIB4);
        assert_eq!(kernel_max_slot_size(KIB4, 2 * MIB), 8 * TIB - 2 * MIB);
        assert_eq!(kernel_max_slot_size(KIB4, GIB), 8 * TIB - GIB);
        // 64 KiB host pages (arm64, ppc64): the limit scales with the page.
        assert_eq!(
            kernel_max_slot_size(64 * 1024, 64 * 1024),
            128 * TIB - 64 * 1024
        );
    }

    #[test]
    fn max_slot_size_must_be_page_aligned() {
        assert_eq!(check_max_slot_size(0, KIB4).unwrap(), None);
        assert_eq!(check_max_slot_size(GIB, KIB4).unwrap(), Some(GIB));
        let e: crate::Error = check_max_slot_size(GIB + 512, KIB4).unwrap_err().into();
        assert_eq!(
            e.message(),
            "max-slot-size 0x40000200 must be a multiple of the host page size 0x1000"
        );
        assert_eq!(e.class(), crate::HmErrorClass::InvalidParameter);
    }

    #[test]
    fn effective_limit_is_capped_by_kernel_and_rounded_to_the_page_size() {
        assert_eq!(
            effective_max_slot_size(None, KIB4, KIB4).unwrap(),
            8 * TIB - KIB4
        );
        assert_eq!(
            effective_max_slot_size(Some(16 * TIB), KIB4, KIB4).unwrap(),
            8 * TIB - KIB4
        );
        assert_eq!(
            effective_max_slot_size(Some(4 * TIB), KIB4, KIB4).unwrap(),
            4 * TIB
        );
        assert_eq!(
            effective_max_slot_size(Some(3 * MIB), KIB4, 2 * MIB).unwrap(),
            2 * MIB
        );
        let e = effective_max_slot_size(Some(KIB4), KIB4, 2 * MIB).unwrap_err();
        assert!(
            e.to_string()
                .contains("smaller than the page size 0x200000"),
            "{e}"
        );
    }

    #[test]
    fn a_section_under_the_limit_is_one_slot() {
        let s = sec(0, 6 * GIB, 0x7f00_0000_0000, 0);
        assert_eq!(split_section(s, KIB4, 8 * TIB - KIB4), vec![s]);
    }

    #[test]
    fn nine_tib_splits_at_the_kernel_limit() {
        let max = effective_max_slot_size(None, KIB4, KIB4).unwrap();
        let hva = 0x7000_0000_0000;
        let slots = split_section(sec(0, 9 * TIB, hva, 0), KIB4, max);
        assert_eq!(
            slots,
            vec![
                sec(0, 8 * TIB - KIB4, hva, 0),
                sec(
                    8 * TIB - KIB4,
                    TIB + KIB4,
                    hva + 8 * TIB - KIB4,
                    8 * TIB - KIB4
                ),
            ]
        );
    }

    #[test]
    fn s390_style_4_tib_limit_gives_equal_slots_and_a_tail() {
        let slots = split_section(sec(0, 9 * TIB, 0x1000_0000, 0x2000), KIB4, 4 * TIB);
        let sizes: Vec<u64> = slots.iter().map(|s| s.size).collect();
        assert_eq!(sizes, vec![4 * TIB, 4 * TIB, TIB]);
        assert_eq!(slots[2].gpa, 8 * TIB);
        assert_eq!(slots[2].hva, 0x1000_0000 + 8 * TIB);
        assert_eq!(slots[2].block_offset, 0x2000 + 8 * TIB);
    }

    #[test]
    fn an_exact_multiple_leaves_no_empty_slot() {
        let slots = split_section(sec(GIB, 4 * GIB, 0, 0), KIB4, GIB);
        assert_eq!(slots.len(), 4);
        assert!(slots.iter().all(|s| s.size == GIB));
    }

    #[test]
    fn unaligned_start_moves_up_and_size_is_cut_to_whole_pages() {
        // 0x1800..0x5900: whole pages 0x2000..0x5000.
        let s = sec(0x1800, 0x4100, 0x10_1800, 0x800);
        assert_eq!(
            align_section(s, KIB4),
            Some(sec(0x2000, 0x3000, 0x10_2000, 0x1000))
        );
        assert_eq!(
            split_section(s, KIB4, 0x2000),
            vec![
                sec(0x2000, 0x2000, 0x10_2000, 0x1000),
                sec(0x4000, 0x1000, 0x10_4000, 0x3000)
            ]
        );
    }

    #[test]
    fn sections_without_a_whole_page_get_no_slot() {
        assert_eq!(align_section(sec(0x10, 0x100, 0, 0), KIB4), None);
        assert_eq!(align_section(sec(0x1800, 0x1000, 0, 0), KIB4), None);
        assert_eq!(align_section(sec(0x1000, 0xfff, 0, 0), KIB4), None);
        assert!(split_section(sec(0x1800, 0x1000, 0, 0), KIB4, GIB).is_empty());
    }

    #[test]
    fn a_section_ending_at_the_top_of_the_address_space_does_not_overflow() {
        let s = sec(u64::MAX - 2 * GIB + 1, 2 * GIB, 0x1000, 0);
        let slots = split_section(s, KIB4, GIB);
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[1].gpa + (slots[1].size - 1), u64::MAX);
    }

    proptest! {
        #[test]
        fn slots_cover_the_aligned_section_in_lockstep(
            gpa_pages in 0u64..(1 << 30),
            gpa_sub in 0u64..KIB4,
            size in 1u64..(64 * TIB),
            hva_pages in 0u64..(1 << 30),
            off_pages in 0u64..(1 << 30),
            max_pages in 1u64..(1 << 33),
        ) {
            let gpa = gpa_pages * KIB4 + gpa_sub;
            let hva = hva_pages * KIB4 + gpa_sub;
            let off = off_pages * KIB4 + gpa_sub;
            let max = max_pages * KIB4;
            let s = sec(gpa, size, hva, off);
            let slots = split_section(s, KIB4, max);
            match align_section(s, KIB4) {
                None => prop_assert!(slots.is_empty()),
                Some(a) => {
                    prop_assert!(a.gpa >= gpa && a.gpa % KIB4 == 0);
                    prop_assert!(a.gpa - gpa < KIB4);
                    prop_assert!(a.gpa + a.size <= gpa + size);
                    prop_assert!(gpa + size - (a.gpa + a.size) < 2 * KIB4);
                    prop_assert_eq!(slots.first().unwrap().gpa, a.gpa);
                    let mut next = a.gpa;
                    let mut total = 0;
                    for sl in &slots {
                        prop_assert_eq!(sl.gpa, next);
                        prop_assert!(sl.size > 0 && sl.size <= max);
                        prop_assert_eq!(sl.size % KIB4, 0);
                        prop_assert_eq!(sl.hva - hva, sl.gpa - gpa);
                        prop_assert_eq!(sl.block_offset - off, sl.gpa - gpa);
                        next += sl.size;
                        total += sl.size;
                    }
                    prop_assert_eq!(total, a.size);
                    // Only the last slot may be short of the limit.
                    for sl in &slots[..slots.len() - 1] {
                        prop_assert_eq!(sl.size, max);
                    }
                }
            }
        }
    }
}
