//! Guest memory written and summed from the host, for migration tests on guests too large to
//! compare byte for byte: a 9 TiB guest with a few GiB written is filled with a pattern, and
//! each side's memory is summed page by page, reading only what the kernel says was ever
//! populated (a page never touched reads as zero and adds nothing to the sum).
//!
//! The sum depends on where each non-zero page is and what it holds, not on how the memory is
//! cut into RAMBlocks or regions, so a guest laid out as one block and the same guest laid out
//! in chunks sum alike when their guest-physical memory is alike.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::hostmap::HostMapping;
use crate::memory::MemorySystem;
use crate::populated::{Detector, Region};

const PAGE: u64 = 4096;

/// What [`checksum`] found in a range of guest-physical memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checksum {
    /// The sum over the non-zero pages of a hash of (guest address, contents): equal for two
    /// ranges that hold the same bytes at the same guest addresses.
    pub digest: u64,
    /// 4 KiB pages holding a non-zero byte.
    pub nonzero_pages: u64,
    /// Pages read: those the kernel reported as possibly populated.
    pub pages_read: u64,
}

/// A RAM piece of the range: where it is in the guest and in its mapping.
struct Piece {
    gpa: u64,
    mapping: Arc<HostMapping>,
    offset: u64,
    len: u64,
    /// Read-only for the guest (ROM): never written.
    readonly: bool,
}

/// The RAM of `[gpa, gpa+size)` in the flat view of "memory", holes left out: taken with the
/// machine locked, used unlocked (each piece keeps its memory mapped).
fn pieces(mem: &MemorySystem, gpa: u64, size: u64) -> Vec<Piece> {
    let (start, end) = (u128::from(gpa), u128::from(gpa) + u128::from(size));
    let mut out = Vec::new();
    for r in &mem.memory_view().ranges {
        let (s, e) = (u128::from(r.addr).max(start), r.end().min(end));
        if s >= e {
            continue;
        }
        if let Some(ram) = mem.section(r).ram {
            let skip = (s - u128::from(r.addr)) as u64;
            out.push(Piece {
                gpa: s as u64,
                offset: (ram.host_addr - ram.mapping.as_ptr() as usize) as u64 + skip,
                mapping: ram.mapping,
                len: (e - s) as u64,
                readonly: ram.readonly,
            });
        }
    }
    out
}

/// What [`fill`] and [`checksum`] work on, taken from a locked machine.
pub struct GuestRange(Vec<Piece>);

impl GuestRange {
    pub fn of(mem: &MemorySystem, gpa: u64, size: u64) -> GuestRange {
        GuestRange(pieces(mem, gpa, size))
    }
}

/// The pattern's word at guest address `gpa` (8-byte aligned): never zero.
fn pattern_word(seed: u64, gpa: u64) -> u64 {
    mix(seed ^ gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes a pattern of non-zero words (a function of `seed` and each word's guest address)
/// over the RAM of the range, skipping holes and read-only memory. Returns the bytes written.
pub fn fill(range: &GuestRange, seed: u64) -> u64 {
    let mut written = 0;
    for p in range
        .0
        .iter()
        .filter(|p| !p.readonly && !p.mapping.is_readonly())
    {
        let base = p.mapping.as_ptr().wrapping_add(p.offset as usize);
        let words = p.len / 8;
        for w in 0..words {
            // SAFETY: `base + 8w` lies inside the piece, which lies inside its writable mapping
            // (pieces are clipped to their flat ranges); the Arc keeps it mapped; guest RAM is
            // only ever accessed with volatile or raw writes, never through references.
            unsafe {
                std::ptr::write_unaligned(
                    base.add((w * 8) as usize) as *mut u64,
                    pattern_word(seed, p.gpa + w * 8),
                )
            };
        }
        written += words * 8;
    }
    written
}

/// Sums the range page by page (see [`Checksum`]), reading only the pages that may have been
/// populated; a range not page-aligned is summed over its whole pages.
pub fn checksum(range: &GuestRange) -> Result<Checksum> {
    let detector = Detector::new();
    let mut sum = Checksum::default();
    let mut page = vec![0u64; (PAGE / 8) as usize];
    for p in &range.0 {
        let region = Region::of(&p.mapping)
            .sub(p.offset as usize, p.len as usize)
            .ok_or_else(|| Error::invalid("a RAM piece lies outside its mapping"))?;
        if !(p.mapping.as_ptr() as u64 + p.offset).is_multiple_of(8) {
            return Err(Error::invalid(format!(
                "the RAM at guest address {:#x} is not 8-byte aligned in its mapping",
                p.gpa
            )));
        }
        let map = detector.scan(&region, None)?.into_map();
        for offset in map.page_offsets().filter(|o| o + PAGE <= p.len) {
            let src = p
                .mapping
                .as_ptr()
                .wrapping_add((p.offset + offset) as usize);
            for (i, word) in page.iter_mut().enumerate() {
                // SAFETY: the page lies inside the piece (checked above), inside its mapping,
                // which the Arc keeps mapped, and is 8-byte aligned (the piece is, checked above); a
                // volatile read of a word the guest may change is some value of it.
                *word = unsafe { std::ptr::read_volatile((src as *const u64).add(i)) };
            }
            sum.pages_read += 1;
            if page.iter().all(|&w| w == 0) {
                continue;
            }
            sum.nonzero_pages += 1;
            sum.digest = sum.digest.wrapping_add(page_hash(p.gpa + offset, &page));
        }
    }
    Ok(sum)
}

fn page_hash(gpa: u64, page: &[u64]) -> u64 {
    page.iter().fold(mix(gpa ^ 0x51_7cc1_b727_220a), |h, &w| {
        mix(h ^ w).rotate_left(17)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_sum_sees_where_the_bytes_are_not_how_ram_is_cut() {
        // One 8 MiB region at 0, and the same memory as two 4 MiB regions.
        let mut whole = MemorySystem::new();
        let r = whole.new_ram_anonymous("whole", 8 * MIB).unwrap();
        let sys = whole.system_memory();
        whole.add_subregion(sys, 0, r, None).unwrap();
        let mut cut = MemorySystem::new();
        let sys = cut.system_memory();
        for i in 0..2 {
            let r = cut.new_ram_anonymous("chunk", 4 * MIB).unwrap();
            cut.add_subregion(sys, i * 4 * MIB, r, None).unwrap();
        }
        let empty = checksum(&GuestRange::of(&whole, 0, 8 * MIB)).unwrap();
        assert_eq!((empty.digest, empty.nonzero_pages), (0, 0));
        // Across the boundary of the chunks.
        for mem in [&whole, &cut] {
            assert_eq!(fill(&GuestRange::of(mem, 3 * MIB, 2 * MIB), 7), 2 * MIB);
        }
        let a = checksum(&GuestRange::of(&whole, 0, 8 * MIB)).unwrap();
        let b = checksum(&GuestRange::of(&cut, 0, 8 * MIB)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.nonzero_pages, 512);
        // Only populated pages are read: the 2 MiB written, give or take huge pages.
        assert!(a.pages_read >= 512 && a.pages_read < 2048, "{a:?}");
        // One byte more, or the same bytes a page further, change the sum.
        fill(&GuestRange::of(&cut, 6 * MIB, 8), 7);
        assert_ne!(checksum(&GuestRange::of(&cut, 0, 8 * MIB)).unwrap(), a);
        let mut moved = MemorySystem::new();
        let r = moved.new_ram_anonymous("whole", 8 * MIB).unwrap();
        let sys = moved.system_memory();
        moved.add_subregion(sys, 0, r, None).unwrap();
        fill(&GuestRange::of(&moved, 3 * MIB, 2 * MIB), 8);
        assert_ne!(
            checksum(&GuestRange::of(&moved, 0, 8 * MIB))
                .unwrap()
                .digest,
            a.digest
        );
    }

    #[test]
    fn holes_and_rom_are_left_alone() {
        let mut m = MemorySystem::new();
        let sys = m.system_memory();
        let ram = m.new_ram_anonymous("ram", MIB).unwrap();
        m.add_subregion(sys, 0, ram, None).unwrap();
        let rom = m.new_ram_anonymous("rom", MIB).unwrap();
        m.set_readonly(rom, true).unwrap();
        m.add_subregion(sys, 4 * MIB, rom, None).unwrap();
        // RAM, 3 MiB of nothing, ROM (writable underneath here, but read-only as guest RAM).
        assert_eq!(fill(&GuestRange::of(&m, 0, 5 * MIB), 1), MIB);
        assert_eq!(
            checksum(&GuestRange::of(&m, 0, 5 * MIB))
                .unwrap()
                .nonzero_pages,
            256
        );
    }
}
