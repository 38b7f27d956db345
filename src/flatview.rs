//! Rendering a region tree into the flat list of ranges the guest sees (QEMU's FlatView), and
//! the difference between two flat views. INTERFACE STUB: bodies to be written.

use crate::region::RegionId;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatRange {
    pub addr: u64,
    pub size: u128,
    /// The leaf region (RAM or I/O) that answers for this range.
    pub region: RegionId,
    pub offset_in_region: u64,
    pub readonly: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlatView {
    pub ranges: Vec<FlatRange>,
}
