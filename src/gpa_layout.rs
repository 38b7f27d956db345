//! Laying one block of RAM over a guest-physical address map with holes (the PCI gap below
//! 4 GiB, a device window): the pieces a VMM that keeps its own KVM slots registers, each a
//! guest address, an offset into the RAM and a length.

use crate::error::{Error, Result};

/// A range the RAM must not cover, `[start, start + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hole {
    pub start: u64,
    pub len: u64,
}

/// One piece of RAM in the guest: `len` bytes at guest address `gpa`, from `offset` in the RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub gpa: u64,
    pub offset: u64,
    pub len: u64,
}

/// Lays `size` bytes of RAM from guest address `base` upwards, stepping over `holes` (in any
/// order, non-overlapping, page-aligned like `base` and `size` to `align`); the RAM that would
/// fall into a hole continues after it, as x86 boards move RAM above the PCI gap.
pub fn lay_out(size: u64, base: u64, holes: &[Hole], align: u64) -> Result<Vec<Piece>> {
    let align = align.max(1);
    if !align.is_power_of_two() {
        return Err(Error::invalid(format!(
            "alignment 0x{align:x} must be a power of two"
        )));
    }
    let misaligned = |what: &str, v: u64| {
        Error::invalid(format!("{what} 0x{v:x} is not a multiple of 0x{align:x}"))
    };
    if size == 0 {
        return Err(Error::invalid("RAM size must not be 0"));
    }
    for (what, v) in [("RAM size", size), ("RAM base", base)] {
        if v % align != 0 {
            return Err(misaligned(what, v));
        }
    }
    let mut sorted = holes.to_vec();
    sorted.sort_by_key(|h| h.start);
    for (i, h) in sorted.iter().enumerate() {
        if h.len == 0 {
            return Err(Error::invalid(format!("hole at 0x{:x} is empty", h.start)));
        }
        if h.start % align != 0 || h.len % align != 0 {
            return Err(misaligned(
                "hole",
                if h.start % align != 0 { h.start } else { h.len },
            ));
        }
        let end = h
            .start
            .checked_add(h.len)
            .ok_or_else(|| Error::invalid(format!("hole at 0x{:x} ends beyond 2^64", h.start)))?;
        if let Some(next) = sorted.get(i + 1) {
            if next.start < end {
                return Err(Error::invalid(format!(
                    "holes at 0x{:x} and 0x{:x} overlap",
                    h.start, next.start
                )));
            }
        }
    }
    let mut pieces = Vec::new();
    let (mut gpa, mut offset) = (base, 0u64);
    for h in sorted.iter().filter(|h| h.start + h.len > base) {
        if offset == size {
            break;
        }
        if h.start > gpa {
            let len = (h.start - gpa).min(size - offset);
            pieces.push(Piece { gpa, offset, len });
            offset += len;
        }
        gpa = gpa.max(h.start + h.len);
    }
    if offset < size {
        let len = size - offset;
        gpa.checked_add(len).ok_or_else(|| {
            Error::invalid(format!(
                "0x{size:x} bytes of RAM from 0x{base:x} do not fit below 2^64 with these holes"
            ))
        })?;
        pieces.push(Piece { gpa, offset, len });
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;

    fn p(gpa: u64, offset: u64, len: u64) -> Piece {
        Piece { gpa, offset, len }
    }

    #[test]
    fn ram_steps_over_the_pci_gap_as_on_x86() {
        let gap = Hole {
            start: 3 * G,
            len: G,
        };
        assert_eq!(
            lay_out(6 * G, 0, &[gap], 4096).unwrap(),
            vec![p(0, 0, 3 * G), p(4 * G, 3 * G, 3 * G)]
        );
        // RAM that ends below the gap is one piece.
        assert_eq!(
            lay_out(2 * G, 0, &[gap], 4096).unwrap(),
            vec![p(0, 0, 2 * G)]
        );
        // Exactly up to the gap: still one piece.
        assert_eq!(
            lay_out(3 * G, 0, &[gap], 4096).unwrap(),
            vec![p(0, 0, 3 * G)]
        );
    }

    #[test]
    fn holes_in_any_order_and_below_the_base() {
        let holes = [
            Hole {
                start: 8 * G,
                len: 2 * M,
            },
            Hole { start: 0, len: G },
            Hole {
                start: 2 * G,
                len: G,
            },
        ];
        assert_eq!(
            lay_out(8 * G, G, &holes, 2 * M).unwrap(),
            vec![
                p(G, 0, G),
                p(3 * G, G, 5 * G),
                p(8 * G + 2 * M, 6 * G, 2 * G)
            ]
        );
    }

    #[test]
    fn the_pieces_cover_the_ram_once_and_avoid_every_hole() {
        let holes = [
            Hole {
                start: 5 * M,
                len: M,
            },
            Hole {
                start: 9 * M,
                len: 3 * M,
            },
        ];
        for size in (1..=20).map(|n| n * M) {
            let pieces = lay_out(size, 2 * M, &holes, M).unwrap();
            assert_eq!(pieces.iter().map(|x| x.len).sum::<u64>(), size);
            let mut next = 0;
            for x in &pieces {
                assert_eq!(x.offset, next);
                next += x.len;
                assert!(holes
                    .iter()
                    .all(|h| x.gpa + x.len <= h.start || x.gpa >= h.start + h.len));
            }
        }
    }

    #[test]
    fn bad_maps_are_refused_naming_the_culprit() {
        let msg = |size, base, holes: &[Hole], align| {
            lay_out(size, base, holes, align)
                .unwrap_err()
                .message()
                .to_string()
        };
        assert_eq!(msg(0, 0, &[], 4096), "RAM size must not be 0");
        assert_eq!(
            msg(4097, 0, &[], 4096),
            "RAM size 0x1001 is not a multiple of 0x1000"
        );
        assert_eq!(msg(4096, 0, &[], 3), "alignment 0x3 must be a power of two");
        assert_eq!(
            msg(
                G,
                0,
                &[
                    Hole {
                        start: 0,
                        len: 2 * M
                    },
                    Hole { start: M, len: M }
                ],
                4096
            ),
            "holes at 0x0 and 0x100000 overlap"
        );
        assert_eq!(
            msg(G, 0, &[Hole { start: M, len: 0 }], 4096),
            "hole at 0x100000 is empty"
        );
        assert_eq!(
            msg(2 * G, u64::MAX - G + 1, &[], 4096),
            "0x80000000 bytes of RAM from 0xffffffffc0000000 do not fit below 2^64 with these holes"
        );
    }
}
