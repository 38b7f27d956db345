//! RAMBlocks: the named, migratable units of guest RAM (QEMU's `RAMBlock` and `ram_list`).
//!
//! The registry is the one source of truth for a block's name, lengths and ram_addr offset:
//! `info ramblock`, the migration stream and KVM all read them from here.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, HmErrorClass, Result};
use crate::hostmap::HostMapping;

/// Dirty tracking granule: QEMU's target page for x86 and s390 (TARGET_PAGE_BITS = 12).
pub const DIRTY_PAGE_SIZE: u64 = 4096;

/// ram_addr offsets start on a bitmap word: 64 target pages (QEMU's find_ram_offset rounds to
/// `BITS_PER_LONG << TARGET_PAGE_BITS` so that bitmap syncs take the word-aligned fast path).
pub const RAM_OFFSET_ALIGN: u64 = 64 * DIRTY_PAGE_SIZE;

/// QEMU keeps idstr in a 256-byte array: a longer name is cut to its first 255 bytes (as QEMU
/// cuts it), and the whole name is kept beside it for errors.
pub const IDSTR_MAX: usize = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RamBlockId(pub u32);

/// A dirty bitmap allocated only on first use: a 9 TiB block would otherwise cost 288 MiB of
/// bitmap even when nobody tracks dirty pages.
#[derive(Default)]
struct DirtyBitmap {
    words: Option<Vec<u64>>,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.words {
            None => f.write_str("DirtyBitmap(unallocated)"),
            Some(w) => write!(f, "DirtyBitmap({} words)", w.len()),
        }
    }
}

fn bitmap_words(length: u64) -> usize {
    length.div_ceil(DIRTY_PAGE_SIZE).div_ceil(64) as usize
}

#[derive(Debug)]
pub struct RamBlock {
    /// "" until `vmstate_register_ram` names it (QEMU shows such blocks with an empty name).
    pub idstr: String,
    /// The name asked for when it was longer than [`IDSTR_MAX`] (`idstr` holds its start).
    pub long_name: Option<String>,
    /// ram_addr_t offset in the RAM address space.
    pub offset: u64,
    pub used_length: u64,
    pub max_length: u64,
    pub page_size: u64,
    pub readonly: bool,
    pub migratable: bool,
    /// The memory; alias blocks share their target's mapping.
    pub mapping: Arc<HostMapping>,
    pub mapping_offset: u64,
    /// Set for a RAMBlock that an alias owns: it points into this block's memory.
    pub alias_of: Option<RamBlockId>,
    /// Set while alias blocks registered for migration carry this block's memory in the stream
    /// instead of it (see [`RamBlockRegistry::register_alias`]): the registration it had, given
    /// back when the last of them goes.
    pub displaced: Option<Registration>,
    dirty: DirtyBitmap,
}

/// A block's place in the migration stream: its name and whether it is registered
/// (`vmstate_register_ram`). An unnamed block never migrates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registration {
    pub idstr: String,
    pub migratable: bool,
}

impl RamBlock {
    /// Host address of the block's first byte.
    pub fn host_ptr(&self) -> *mut u8 {
        self.mapping
            .as_ptr()
            .wrapping_add(self.mapping_offset as usize)
    }

    /// Whether a dirty bitmap has been allocated (tests and memory accounting).
    pub fn has_dirty_bitmap(&self) -> bool {
        self.dirty.words.is_some()
    }
}

#[derive(Debug, Default)]
pub struct RamBlockRegistry {
    blocks: BTreeMap<u32, RamBlock>,
    /// `info ramblock` order: max_length descending, earlier blocks first among equals.
    order: Vec<RamBlockId>,
    next_id: u32,
}

impl RamBlockRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Best-fit gap after an existing block, as QEMU's find_ram_offset: the space before the
    /// first block is only used when the list is empty.
    fn find_offset(&self, size: u64) -> Result<u64> {
        if self.blocks.is_empty() {
            return Ok(0);
        }
        let mut best: Option<(u64, u64)> = None; // (offset, gap)
        for b in self.blocks.values() {
            let Some(candidate) = b
                .offset
                .checked_add(b.max_length)
                .and_then(|end| end.checked_next_multiple_of(RAM_OFFSET_ALIGN))
            else {
                continue;
            };
            let next = self
                .blocks
                .values()
                .filter(|o| o.offset >= candidate)
                .map(|o| o.offset)
                .min()
                .unwrap_or(u64::MAX);
            let gap = next - candidate;
            if gap >= size && best.is_none_or(|(_, g)| gap < g) {
                best = Some((candidate, gap));
            }
        }
        best.map(|(o, _)| o).ok_or_else(|| {
            Error::new(
                HmErrorClass::Host,
                format!("Failed to find gap of requested size: {size}"),
            )
        })
    }

    fn insert(&mut self, block: RamBlock) -> RamBlockId {
        let id = RamBlockId(self.next_id);
        self.next_id += 1;
        let pos = self
            .order
            .iter()
            .position(|o| self.blocks[&o.0].max_length < block.max_length)
            .unwrap_or(self.order.len());
        self.order.insert(pos, id);
        self.blocks.insert(id.0, block);
        id
    }

    /// A new unnamed, unmigratable block over `mapping[mapping_offset..+max_length]`.
    pub fn add(
        &mut self,
        mapping: Arc<HostMapping>,
        mapping_offset: u64,
        used_length: u64,
        max_length: u64,
        readonly: bool,
    ) -> Result<RamBlockId> {
        if max_length == 0 || used_length > max_length {
            return Err(Error::invalid(format!(
                "invalid RAMBlock lengths: used 0x{used_length:x}, max 0x{max_length:x}"
            )));
        }
        let end = mapping_offset.checked_add(max_length);
        if end.is_none_or(|e| e > mapping.len() as u64) {
            return Err(Error::invalid(format!(
                "RAMBlock of 0x{max_length:x} bytes at offset 0x{mapping_offset:x} exceeds its \
                 mapping of 0x{:x} bytes",
                mapping.len()
            )));
        }
        let offset = self.find_offset(max_length)?;
        let page_size = mapping.page_size() as u64;
        Ok(self.insert(RamBlock {
            idstr: String::new(),
            long_name: None,
            offset,
            used_length,
            max_length,
            page_size,
            readonly,
            migratable: false,
            mapping,
            mapping_offset,
            alias_of: None,
            displaced: None,
            dirty: DirtyBitmap::default(),
        }))
    }

    /// A block that owns no memory of its own: `len` bytes of `of` starting at `offset`.
    pub fn add_alias(&mut self, of: RamBlockId, offset: u64, len: u64) -> Result<RamBlockId> {
        let target = self.get(of).ok_or_else(|| no_block(of))?;
        if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|e| e > target.max_length)
        {
            return Err(Error::invalid(format!(
                "alias of 0x{len:x} bytes at offset 0x{offset:x} does not fit RAMBlock \"{}\" \
                 of 0x{:x} bytes",
                target.idstr, target.max_length
            )));
        }
        let mapping = target.mapping.clone();
        let mapping_offset = target.mapping_offset + offset;
        let page_size = target.page_size;
        let readonly = target.readonly;
        // An alias of an alias points at the block that owns the memory.
        let root = target.alias_of.unwrap_or(of);
        let ram_offset = self.find_offset(len)?;
        Ok(self.insert(RamBlock {
            idstr: String::new(),
            long_name: None,
            offset: ram_offset,
            used_length: len,
            max_length: len,
            page_size,
            readonly,
            migratable: false,
            mapping,
            mapping_offset,
            alias_of: Some(root),
            displaced: None,
            dirty: DirtyBitmap::default(),
        }))
    }

    /// Removes a block. The last migratable alias block over a block's memory gives that block
    /// its registration back.
    pub fn remove(&mut self, id: RamBlockId) {
        if let Some(b) = self.blocks.remove(&id.0) {
            self.order.retain(|&o| o != id);
            if let Some(root) = b.alias_of {
                self.restore_displaced(root);
            }
        }
    }

    pub fn get(&self, id: RamBlockId) -> Option<&RamBlock> {
        self.blocks.get(&id.0)
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Names the block "<owner_path>/<name>" or "<name>"; a name already taken is an error.
    pub fn set_idstr(
        &mut self,
        id: RamBlockId,
        owner_path: Option<&str>,
        name: &str,
    ) -> Result<()> {
        let idstr = match owner_path {
            Some(p) if !p.is_empty() => format!("{p}/{name}"),
            _ => name.to_string(),
        };
        let block = self.get(id).ok_or_else(|| no_block(id))?;
        if !block.idstr.is_empty() {
            if block.long_name.as_deref().unwrap_or(&block.idstr) == idstr {
                return Ok(());
            }
            return Err(Error::new(
                HmErrorClass::Duplicate,
                format!(
                    "RAMBlock \"{}\" is already registered; cannot rename it to \"{idstr}\"",
                    block.idstr
                ),
            ));
        }
        if idstr.is_empty() {
            return Err(Error::invalid("RAMBlock name must not be empty"));
        }
        let (cut, long_name) = if idstr.len() > IDSTR_MAX {
            let mut end = IDSTR_MAX;
            while !idstr.is_char_boundary(end) {
                end -= 1;
            }
            (idstr[..end].to_string(), Some(idstr.clone()))
        } else {
            (idstr, None)
        };
        if let Some(other) = self.find_by_idstr(&cut) {
            let other = &self.blocks[&other.0];
            // QEMU would abort on a collision of cut names; say which two names became one.
            let message = match (&long_name, &other.long_name) {
                (Some(mine), theirs) => format!(
                    "RAMBlock name \"{mine}\" cut to {IDSTR_MAX} bytes is \"{cut}\", the name of RAMBlock \"{}\" already registered",
                    theirs.as_deref().unwrap_or(&cut)
                ),
                (None, Some(theirs)) => format!(
                    "RAMBlock \"{cut}\" already registered (it is \"{theirs}\" cut to {IDSTR_MAX} bytes)"
                ),
                (None, None) => format!("RAMBlock \"{cut}\" already registered"),
            };
            return Err(Error::new(HmErrorClass::Duplicate, message));
        }
        if let Some(b) = self.blocks.get_mut(&id.0) {
            b.idstr = cut;
            b.long_name = long_name;
        }
        Ok(())
    }

    pub fn unset_idstr(&mut self, id: RamBlockId) {
        if let Some(b) = self.blocks.get_mut(&id.0) {
            b.idstr.clear();
            b.long_name = None;
        }
    }

    /// `vmstate_register_ram` of a block that owns its memory: named and migratable. Refused
    /// while alias blocks carry its memory, which would then travel twice.
    pub fn register(&mut self, id: RamBlockId, owner_path: Option<&str>, name: &str) -> Result<()> {
        let block = self.get(id).ok_or_else(|| no_block(id))?;
        if block.displaced.is_some() {
            return Err(Error::new(
                HmErrorClass::InUse,
                format!(
                    "the memory of RAMBlock \"{name}\" migrates through its aliases {}; unregister \
                     them before registering it",
                    self.quoted_aliases(id)
                ),
            ));
        }
        self.set_idstr(id, owner_path, name)?;
        self.set_migratable(id, true);
        Ok(())
    }

    /// `vmstate_unregister_ram`: the block loses its name and leaves the stream. One whose
    /// memory migrates through aliases gets nothing back when they go.
    pub fn unregister(&mut self, id: RamBlockId) {
        let Some(b) = self.blocks.get_mut(&id.0) else {
            return;
        };
        if b.displaced.is_some() {
            b.displaced = Some(Registration::default());
        }
        b.idstr.clear();
        b.migratable = false;
    }

    /// `vmstate_register_ram` of an alias block (QEMU's proposal of 2019 for s390 guests larger
    /// than a KVM slot): named and migratable, it carries its part of the aliased memory in the
    /// stream, and the block that owns that memory leaves the stream. Its name is set aside
    /// first, so the first alias may take it (s390's first chunk is called "s390.ram", like the
    /// whole); the last alias block to go gives it back.
    pub fn register_alias(
        &mut self,
        id: RamBlockId,
        owner_path: Option<&str>,
        name: &str,
    ) -> Result<()> {
        let block = self.get(id).ok_or_else(|| no_block(id))?;
        let root = block
            .alias_of
            .ok_or_else(|| Error::invalid(format!("RAMBlock \"{name}\" is not an alias block")))?;
        let root_block = self.blocks.get_mut(&root.0).ok_or_else(|| no_block(root))?;
        let displaced_now = root_block.displaced.is_none();
        if displaced_now {
            root_block.displaced = Some(Registration {
                idstr: std::mem::take(&mut root_block.idstr),
                migratable: root_block.migratable,
            });
            root_block.migratable = false;
        }
        if let Err(e) = self.set_idstr(id, owner_path, name) {
            if displaced_now {
                self.restore_displaced(root);
            }
            return Err(e);
        }
        self.set_migratable(id, true);
        Ok(())
    }

    /// The migratable alias blocks over `root`'s memory, in `info ramblock` order.
    fn migratable_aliases(&self, root: RamBlockId) -> Vec<RamBlockId> {
        self.order
            .iter()
            .copied()
            .filter(|id| {
                let b = &self.blocks[&id.0];
                b.alias_of == Some(root) && b.migratable
            })
            .collect()
    }

    fn quoted_aliases(&self, root: RamBlockId) -> String {
        let names: Vec<String> = self
            .migratable_aliases(root)
            .iter()
            .map(|id| format!("\"{}\"", self.blocks[&id.0].idstr))
            .collect();
        names.join(", ")
    }

    /// Gives `root` its registration back once no migratable alias block carries its memory;
    /// a name another block took meanwhile stays with that block, and `root` stays unnamed.
    fn restore_displaced(&mut self, root: RamBlockId) {
        if !self.migratable_aliases(root).is_empty() {
            return;
        }
        let Some(d) = self
            .blocks
            .get_mut(&root.0)
            .and_then(|b| b.displaced.take())
        else {
            return;
        };
        if d.idstr.is_empty() || self.find_by_idstr(&d.idstr).is_some() {
            return;
        }
        if let Some(b) = self.blocks.get_mut(&root.0) {
            b.idstr = d.idstr;
            b.migratable = d.migratable;
        }
    }

    /// Where `[offset, offset+len)` of block `id` migrates when the block left the stream for
    /// its aliases: the alias block holding all of it, and the offset there.
    pub fn migrating_alias(
        &self,
        id: RamBlockId,
        offset: u64,
        len: u64,
    ) -> Option<(RamBlockId, u64)> {
        let b = self.get(id)?;
        b.displaced.as_ref()?;
        self.migratable_aliases(id).into_iter().find_map(|a| {
            let blk = &self.blocks[&a.0];
            let at = blk.mapping_offset - b.mapping_offset;
            (offset >= at && offset + len <= at + blk.used_length).then_some((a, offset - at))
        })
    }

    /// Refuses a layout where memory that left the stream for its aliases is in none of them:
    /// it would not migrate at all. Checked when a migration starts.
    pub fn check_displaced_memory_migrates(&self) -> Result<()> {
        for &root in &self.order {
            let b = &self.blocks[&root.0];
            if b.displaced.is_none() {
                continue;
            }
            let mut covered: Vec<(u64, u64)> = self
                .migratable_aliases(root)
                .iter()
                .map(|id| {
                    let a = &self.blocks[&id.0];
                    let at = a.mapping_offset - b.mapping_offset;
                    (at, at + a.used_length)
                })
                .collect();
            covered.sort_unstable();
            let mut reached = 0;
            for (start, end) in covered {
                if start > reached {
                    break;
                }
                reached = reached.max(end);
            }
            if reached < b.used_length {
                let next = self
                    .migratable_aliases(root)
                    .iter()
                    .map(|id| self.blocks[&id.0].mapping_offset - b.mapping_offset)
                    .filter(|&at| at > reached)
                    .min()
                    .unwrap_or(b.used_length)
                    .min(b.used_length);
                return Err(Error::invalid(format!(
                    "bytes 0x{reached:x}-0x{:x} of the RAM the aliases {} migrate are in none of \
                     them: that memory would not migrate",
                    next - 1,
                    self.quoted_aliases(root)
                )));
            }
        }
        Ok(())
    }

    pub fn set_migratable(&mut self, id: RamBlockId, migratable: bool) {
        if let Some(b) = self.blocks.get_mut(&id.0) {
            b.migratable = migratable;
        }
    }

    pub fn set_readonly(&mut self, id: RamBlockId, readonly: bool) {
        if let Some(b) = self.blocks.get_mut(&id.0) {
            b.readonly = readonly;
        }
    }

    pub fn find_by_idstr(&self, idstr: &str) -> Option<RamBlockId> {
        if idstr.is_empty() {
            return None;
        }
        self.order
            .iter()
            .copied()
            .find(|id| self.blocks[&id.0].idstr == idstr)
    }

    /// Blocks in `info ramblock` order.
    pub fn ids(&self) -> Vec<RamBlockId> {
        self.order.clone()
    }

    /// Marks `[offset, offset+len)` of the block dirty (target pages of 4 KiB), and the same
    /// memory in every other block that shows it: the block that owns the memory and each alias
    /// block over it. A page written through any mapping is thus dirty in whichever block
    /// migrates it (the s390 partition migrates alias blocks, not the backend's). Ranges beyond
    /// the block are clipped.
    pub fn set_dirty(&mut self, id: RamBlockId, offset: u64, len: u64) {
        let Some(b) = self.blocks.get(&id.0) else {
            return;
        };
        let end = offset.saturating_add(len).min(b.max_length);
        if len == 0 || offset >= end {
            return;
        }
        let (base, shown) = self.blocks_showing(id);
        let (start, end) = (base + offset, base + end);
        for (key, at) in shown {
            let blk = self.blocks.get_mut(&key).expect("listed by blocks_showing");
            let (s, e) = (start.max(at), end.min(at + blk.max_length));
            if s < e {
                mark_dirty(blk, s - at, e - at);
            }
        }
    }

    /// Where block `id` starts in the memory of the block that owns it, and every block
    /// showing that memory (the owner and its aliases) with where each starts; just `id` at 0
    /// when the owner is unknown.
    fn blocks_showing(&self, id: RamBlockId) -> (u64, Vec<(u32, u64)>) {
        let Some(b) = self.blocks.get(&id.0) else {
            return (0, Vec::new());
        };
        let root = b.alias_of.unwrap_or(id);
        match self.blocks.get(&root.0).map(|r| r.mapping_offset) {
            None => (0, vec![(id.0, 0)]),
            Some(root_start) => (
                b.mapping_offset - root_start,
                self.blocks
                    .iter()
                    .filter(|(k, blk)| **k == root.0 || blk.alias_of == Some(root))
                    .map(|(k, blk)| (*k, blk.mapping_offset - root_start))
                    .collect(),
            ),
        }
    }

    /// ORs a dirty bitmap in KVM's layout (bit i of word w = page 64*w+i, little-endian u64
    /// words) into the block, starting at the block's page `first_page`, with the same result
    /// as [`Self::set_dirty`] for each run of set bits (so alias blocks see the pages too).
    /// Pages beyond the block are ignored. It works a word at a time and skips zero words, so
    /// a sync's cost is the bitmap's length, not the number of dirty pages.
    pub fn merge_dirty_bitmap(&mut self, id: RamBlockId, first_page: u64, bitmap: &[u64]) {
        let Some(b) = self.blocks.get(&id.0) else {
            return;
        };
        if bitmap.iter().all(|w| *w == 0) {
            return;
        }
        let block_pages = b.max_length.div_ceil(DIRTY_PAGE_SIZE) as i64;
        let (base, shown) = self.blocks_showing(id);
        if shown.iter().any(|(_, at)| at % DIRTY_PAGE_SIZE != 0) {
            return for_each_set_run(bitmap, |first, count| {
                self.set_dirty(
                    id,
                    (first_page + first) * DIRTY_PAGE_SIZE,
                    count * DIRTY_PAGE_SIZE,
                )
            });
        }
        let block_at = (base / DIRTY_PAGE_SIZE) as i64;
        let src_at = block_at + first_page as i64;
        for (key, at) in shown {
            let at = (at / DIRTY_PAGE_SIZE) as i64;
            let blk = self.blocks.get_mut(&key).expect("listed by blocks_showing");
            let pages = blk.max_length.div_ceil(DIRTY_PAGE_SIZE) as i64;
            // In this block's pages: the pages the source block covers, within this block.
            let lo = (block_at - at).max(0);
            let hi = (block_at - at + block_pages).min(pages);
            if lo >= hi {
                continue;
            }
            let words = blk
                .dirty
                .words
                .get_or_insert_with(|| vec![0; bitmap_words(blk.max_length)]);
            or_bitmap_at(words, lo, hi, src_at - at, bitmap);
        }
    }

    /// Returns the block's dirty bitmap (one bit per 4 KiB page of max_length, little-endian
    /// u64 words) and clears it. Asking is using dirty tracking, so this allocates the bitmap
    /// if nothing was dirtied yet. An unknown block yields an empty vector.
    pub fn take_dirty(&mut self, id: RamBlockId) -> Vec<u64> {
        let Some(b) = self.blocks.get_mut(&id.0) else {
            return Vec::new();
        };
        let n = bitmap_words(b.max_length);
        match b.dirty.words.as_mut() {
            Some(w) => std::mem::replace(w, vec![0; n]),
            None => {
                b.dirty.words = Some(vec![0; n]);
                vec![0; n]
            }
        }
    }

    /// Number of dirty 4 KiB pages, without clearing (0 when tracking never started).
    pub fn dirty_pages(&self, id: RamBlockId) -> u64 {
        self.get(id)
            .and_then(|b| b.dirty.words.as_ref())
            .map(|w| w.iter().map(|x| u64::from(x.count_ones())).sum())
            .unwrap_or(0)
    }
}

/// Marks bytes `[start, end)` of a block dirty (every page they touch), allocating its bitmap
/// on first use. `start < end <= max_length`.
fn mark_dirty(b: &mut RamBlock, start: u64, end: u64) {
    let words = b
        .dirty
        .words
        .get_or_insert_with(|| vec![0; bitmap_words(b.max_length)]);
    set_bits(words, start / DIRTY_PAGE_SIZE, (end - 1) / DIRTY_PAGE_SIZE);
}

/// Calls `f(first_bit, count)` for each run of set bits of a little-endian bitmap.
pub fn for_each_set_run(bitmap: &[u64], mut f: impl FnMut(u64, u64)) {
    let mut start: Option<u64> = None;
    for (wi, &word) in bitmap.iter().enumerate() {
        let base = wi as u64 * 64;
        if start.is_none() && word == 0 {
            continue;
        }
        if start.is_some() && word == !0 {
            continue;
        }
        for b in 0..64u64 {
            let set = word & (1 << b) != 0;
            match (set, start) {
                (true, None) => start = Some(base + b),
                (false, Some(s)) => {
                    f(s, base + b - s);
                    start = None;
                }
                _ => {}
            }
        }
    }
    if let Some(s) = start {
        f(s, bitmap.len() as u64 * 64 - s);
    }
}

/// ORs `src` (bit i = page i) into `dst` with src's bit 0 at dst's page `at` (negative: src
/// starts before dst), touching only dst pages in `lo..hi` (`0 <= lo`, `hi <= 64 * dst.len()`).
fn or_bitmap_at(dst: &mut [u64], lo: i64, hi: i64, at: i64, src: &[u64]) {
    for (wi, &w) in src.iter().enumerate() {
        if w == 0 {
            continue;
        }
        let first = at + wi as i64 * 64;
        let (a, e) = (lo.max(first) - first, hi.min(first + 64) - first);
        if a >= e {
            continue;
        }
        let keep = if e >= 64 { !0 } else { (1u64 << e) - 1 } & (!0u64 << a);
        let word = w & keep;
        if word == 0 {
            continue;
        }
        let (q, r) = (first.div_euclid(64), first.rem_euclid(64) as u32);
        // Bits outside lo..hi were masked off, so a half that would land outside dst is zero.
        if q >= 0 && (q as usize) < dst.len() {
            dst[q as usize] |= word << r;
        }
        if r > 0 && q + 1 >= 0 && ((q + 1) as usize) < dst.len() {
            dst[(q + 1) as usize] |= word >> (64 - r);
        }
    }
}

/// Sets pages `first..=last` in a bitmap, a word at a time.
fn set_bits(words: &mut [u64], first: u64, last: u64) {
    let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
    let head = !0u64 << (first % 64);
    let tail = !0u64 >> (63 - last % 64);
    if fw == lw {
        words[fw] |= head & tail;
        return;
    }
    words[fw] |= head;
    for w in &mut words[fw + 1..lw] {
        *w = !0;
    }
    words[lw] |= tail;
}

fn no_block(id: RamBlockId) -> Error {
    Error::new(
        HmErrorClass::NotFound,
        format!("no RAMBlock with id {}", id.0),
    )
}

/// Anonymous private memory for RAM that no backend provides (`memory_region_init_ram`).
/// MAP_NORESERVE: pages are only committed when touched, so sparse huge guests stay cheap.
pub fn map_anonymous(name: &str, size: u64) -> Result<Arc<HostMapping>> {
    Ok(Arc::new(crate::hostmap::map_anonymous(
        name, size, false, true,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn mapping(size: u64) -> Arc<HostMapping> {
        map_anonymous("test", size).unwrap()
    }

    fn add(r: &mut RamBlockRegistry, size: u64) -> RamBlockId {
        r.add(mapping(size), 0, size, size, false).unwrap()
    }

    #[test]
    fn first_block_starts_at_zero_and_next_ones_follow_aligned() {
        let mut r = RamBlockRegistry::new();
        let a = add(&mut r, 64 * MIB);
        let b = add(&mut r, 4096);
        let c = add(&mut r, 4096);
        assert_eq!(r.get(a).unwrap().offset, 0);
        assert_eq!(r.get(b).unwrap().offset, 64 * MIB);
        // 256 KiB alignment: the 4 KiB block does not pack right after b.
        assert_eq!(r.get(c).unwrap().offset, 64 * MIB + RAM_OFFSET_ALIGN);
    }

    #[test]
    fn offsets_fill_the_smallest_fitting_gap() {
        let mut r = RamBlockRegistry::new();
        let a = add(&mut r, MIB); // 0
        let b = add(&mut r, MIB); // 1M
        let c = add(&mut r, 4 * MIB); // 2M
        let d = add(&mut r, MIB); // 6M
        assert_eq!(r.get(d).unwrap().offset, 6 * MIB);
        r.remove(b); // gap of 1M at 1M
        r.remove(c); // now a gap [1M, 6M)
        let e = add(&mut r, 512 * 1024);
        assert_eq!(r.get(e).unwrap().offset, MIB);
        let _ = a;
        // Gap [1.5M, 6M) is smaller than the open end after d: best fit picks it.
        let f = add(&mut r, MIB);
        assert_eq!(r.get(f).unwrap().offset, MIB + 512 * 1024);
    }

    #[test]
    fn pc_layout_matches_qemu_offsets() {
        // From a real `info ramblock` of `-M pc -m 4G`: creation order and sizes.
        let mut r = RamBlockRegistry::new();
        let mut offs = Vec::new();
        for (used, max) in [
            (0x1_0000_0000u64, 0x1_0000_0000u64),
            (0x40000, 0x40000),
            (0x20000, 0x20000),
            (0x20000, 0x200000),
            (0x1000, 0x10000),
            (0x1000, 0x1000),
        ] {
            let id = r.add(mapping(max), 0, used, max, false).unwrap();
            offs.push(r.get(id).unwrap().offset);
        }
        assert_eq!(
            offs,
            [
                0,
                0x100000000,
                0x100040000,
                0x100080000,
                0x100280000,
                0x1002c0000
            ]
        );
        let maxes: Vec<u64> = r
            .ids()
            .iter()
            .map(|&i| r.get(i).unwrap().max_length)
            .collect();
        assert_eq!(
            maxes,
            [0x100000000, 0x200000, 0x40000, 0x20000, 0x10000, 0x1000]
        );
    }

    #[test]
    fn ids_are_sorted_by_max_length_keeping_creation_order_among_equals() {
        let mut r = RamBlockRegistry::new();
        let a = add(&mut r, MIB);
        let b = add(&mut r, 2 * MIB);
        let c = add(&mut r, MIB);
        assert_eq!(r.ids(), vec![b, a, c]);
    }

    #[test]
    fn duplicate_idstr_is_an_error_of_class_duplicate() {
        let mut r = RamBlockRegistry::new();
        let a = add(&mut r, MIB);
        let b = add(&mut r, MIB);
        r.set_idstr(a, None, "pc.ram").unwrap();
        let e = r.set_idstr(b, None, "pc.ram").unwrap_err();
        assert_eq!(e.message(), "RAMBlock \"pc.ram\" already registered");
        assert_eq!(e.class(), HmErrorClass::Duplicate);
        r.set_idstr(b, Some("/machine/unattached/device[0]"), "pc.ram")
            .unwrap();
        assert_eq!(
            r.get(b).unwrap().idstr,
            "/machine/unattached/device[0]/pc.ram"
        );
        assert_eq!(r.find_by_idstr("pc.ram"), Some(a));
        r.unset_idstr(a);
        assert_eq!(r.find_by_idstr("pc.ram"), None);
        r.set_idstr(b, None, "x").unwrap_err();
    }

    #[test]
    fn long_names_are_cut_as_qemu_cuts_them_and_a_collision_names_both() {
        let mut r = RamBlockRegistry::new();
        let (a, b, c) = (add(&mut r, MIB), add(&mut r, MIB), add(&mut r, MIB));
        let long_a = "a".repeat(300);
        let long_b = format!("{}b", "a".repeat(300));
        let cut = "a".repeat(IDSTR_MAX);
        r.set_idstr(a, None, &long_a).unwrap();
        assert_eq!(r.get(a).unwrap().idstr, cut);
        // Naming it again with the same long name is no rename.
        r.set_idstr(a, None, &long_a).unwrap();
        let e = r.set_idstr(b, None, &long_b).unwrap_err();
        assert_eq!(e.class(), HmErrorClass::Duplicate);
        assert_eq!(
            e.message(),
            format!(
                "RAMBlock name \"{long_b}\" cut to 255 bytes is \"{cut}\", the name of \
                 RAMBlock \"{long_a}\" already registered"
            )
        );
        let e = r.set_idstr(c, None, &cut).unwrap_err();
        assert_eq!(
            e.message(),
            format!("RAMBlock \"{cut}\" already registered (it is \"{long_a}\" cut to 255 bytes)")
        );
        // Cut on a character boundary: a 2-byte character straddling byte 255 goes whole.
        let wide = format!("{}é", "x".repeat(254));
        r.set_idstr(c, None, &wide).unwrap();
        assert_eq!(r.get(c).unwrap().idstr, "x".repeat(254));
        assert_eq!(
            r.set_idstr(b, None, "").unwrap_err().message(),
            "RAMBlock name must not be empty"
        );
    }

    #[test]
    fn host_ptr_adds_mapping_offset_and_aliases_share_memory() {
        let mut r = RamBlockRegistry::new();
        let m = mapping(4 * MIB);
        let a = r.add(m.clone(), MIB, 2 * MIB, 2 * MIB, false).unwrap();
        assert_eq!(
            r.get(a).unwrap().host_ptr(),
            m.as_ptr().wrapping_add(MIB as usize)
        );
        let al = r.add_alias(a, MIB, MIB).unwrap();
        let blk = r.get(al).unwrap();
        assert_eq!(blk.host_ptr(), m.as_ptr().wrapping_add(2 * MIB as usize));
        assert_eq!(blk.alias_of, Some(a));
        assert_ne!(blk.offset, r.get(a).unwrap().offset);
        let al2 = r.add_alias(al, 0, 4096).unwrap();
        assert_eq!(r.get(al2).unwrap().alias_of, Some(a));
        assert!(r.add_alias(a, MIB, MIB + 1).is_err());
        r.set_migratable(al, true);
        assert!(r.get(al).unwrap().migratable);
    }

    #[test]
    fn anonymous_memory_is_aligned_like_qemu_and_usable() {
        let m = map_anonymous("rsdp", 36).unwrap();
        assert_eq!(m.as_ptr() as usize % crate::hostmap::VMALLOC_ALIGN, 0);
        assert_eq!(m.len(), crate::hostmap::host_page_size());
        // SAFETY: the mapping is ours and at least one page long.
        unsafe { m.as_ptr().write(1) };
        let e = map_anonymous("zero", 0).unwrap_err();
        assert_eq!(
            e.message(),
            "cannot set up guest memory 'zero': Invalid argument"
        );
    }

    #[test]
    fn block_beyond_mapping_is_refused() {
        let mut r = RamBlockRegistry::new();
        assert!(r.add(mapping(MIB), 4096, MIB, MIB, false).is_err());
        assert!(r.add(mapping(MIB), 0, 0, 0, false).is_err());
    }

    #[test]
    fn dirty_bitmap_is_lazy_and_take_clears() {
        let mut r = RamBlockRegistry::new();
        let a = add(&mut r, MIB);
        assert!(!r.get(a).unwrap().has_dirty_bitmap());
        r.set_dirty(a, 4096, 8192 + 1); // pages 1, 2, 3
        r.set_dirty(a, 64 * 4096, 1); // page 64
        assert_eq!(r.dirty_pages(a), 4);
        let bm = r.take_dirty(a);
        assert_eq!(bm.len(), 4); // 256 pages
        assert_eq!(bm[0], 0b1110);
        assert_eq!(bm[1], 1);
        assert_eq!(r.dirty_pages(a), 0);
        assert!(r.take_dirty(a).iter().all(|&w| w == 0));
    }

    #[test]
    fn dirty_ranges_across_words_set_exactly_those_pages() {
        let mut r = RamBlockRegistry::new();
        let a = add(&mut r, MIB); // 256 pages
        r.set_dirty(a, 60 * 4096, 70 * 4096); // pages 60..=129
        let bm = r.take_dirty(a);
        assert_eq!(bm[0], 0xf << 60);
        assert_eq!(bm[1], !0);
        assert_eq!(bm[2], 0b11);
        assert_eq!(bm[3], 0);
        r.set_dirty(a, 255 * 4096, 10 * 4096); // clipped to the last page
        assert_eq!(r.take_dirty(a)[3], 1 << 63);
    }

    #[test]
    fn kvm_bitmaps_merge_at_any_page_offset() {
        let mut r = RamBlockRegistry::new();
        let a = add(&mut r, MIB - 4096); // 255 pages
        r.merge_dirty_bitmap(a, 0, &[0b101]);
        r.merge_dirty_bitmap(a, 62, &[0b111]); // pages 62, 63, 64
        r.merge_dirty_bitmap(a, 192, &[!0]); // pages 192..=254, 255 does not exist
        let bm = r.take_dirty(a);
        assert_eq!(bm[0], 0b101 | (0b11 << 62));
        assert_eq!(bm[1], 1);
        assert_eq!(bm[3], !0 >> 1);
        assert_eq!(r.dirty_pages(a), 0);
        r.merge_dirty_bitmap(a, 300, &[1]);
        r.merge_dirty_bitmap(a, 0, &[0]);
        assert!(r.take_dirty(a).iter().all(|&w| w == 0));
    }

    #[test]
    fn runs_of_bits_are_found_across_word_boundaries() {
        let mut runs = Vec::new();
        for_each_set_run(&[0x8000_0000_0000_0001, 0x3, 0, 1 << 63], |s, n| {
            runs.push((s, n))
        });
        assert_eq!(runs, vec![(0, 1), (63, 3), (255, 1)]);
        runs.clear();
        // Whole words inside a run, and a run that ends with the bitmap.
        for_each_set_run(&[1 << 63, !0, !0, 1, 0, 1 << 63, !0], |s, n| {
            runs.push((s, n))
        });
        assert_eq!(runs, vec![(63, 130), (383, 65)]);
    }

    /// (root, alias at `at` of `len` bytes over it) with both named, for dirty tests.
    fn root_and_alias(r: &mut RamBlockRegistry, at: u64, len: u64) -> (RamBlockId, RamBlockId) {
        let root = add(r, 4 * MIB);
        let alias = r.add_alias(root, at, len).unwrap();
        (root, alias)
    }

    fn pages(bitmap: &[u64]) -> Vec<u64> {
        let mut v = Vec::new();
        for_each_set_run(bitmap, |s, n| v.extend(s..s + n));
        v
    }

    #[test]
    fn a_page_dirtied_in_the_owner_is_dirty_in_every_alias_block_over_it() {
        let mut r = RamBlockRegistry::new();
        let (root, alias) = root_and_alias(&mut r, MIB, MIB);
        let other = r.add_alias(root, 3 * MIB, MIB).unwrap();
        // Pages 255..=257 of the root: the first is below the alias, the others are its 0, 1.
        r.set_dirty(root, 255 * 4096, 3 * 4096);
        assert_eq!(pages(&r.take_dirty(root)), vec![255, 256, 257]);
        assert_eq!(pages(&r.take_dirty(alias)), vec![0, 1]);
        assert!(pages(&r.take_dirty(other)).is_empty());
        // Taking one block's bits leaves the others' alone.
        r.set_dirty(root, 2 * MIB - 4096, 4096);
        assert_eq!(pages(&r.take_dirty(alias)), vec![255]);
        assert_eq!(pages(&r.take_dirty(root)), vec![511]);
    }

    #[test]
    fn a_page_dirtied_through_an_alias_block_is_dirty_in_the_owner_too() {
        let mut r = RamBlockRegistry::new();
        let (root, alias) = root_and_alias(&mut r, MIB, MIB);
        let overlapping = r.add_alias(root, MIB + 512 * 1024, MIB).unwrap();
        r.set_dirty(alias, 128 * 4096, 4096);
        assert_eq!(pages(&r.take_dirty(alias)), vec![128]);
        assert_eq!(pages(&r.take_dirty(root)), vec![256 + 128]);
        assert_eq!(pages(&r.take_dirty(overlapping)), vec![0]);
        // An alias of an alias points at the owner, so it is covered the same way.
        let nested = r.add_alias(alias, 4096, 4096).unwrap();
        r.set_dirty(root, MIB + 4096, 1);
        assert_eq!(pages(&r.take_dirty(nested)), vec![0]);
        assert_eq!(pages(&r.take_dirty(alias)), vec![1]);
    }

    #[test]
    fn an_alias_at_an_odd_offset_gets_every_page_a_dirty_page_touches() {
        let mut r = RamBlockRegistry::new();
        let (root, alias) = root_and_alias(&mut r, 2048, 64 * 4096);
        r.set_dirty(root, 4096, 4096);
        // Root page 1 is bytes 2048..6144 of the alias: its pages 0 and 1.
        assert_eq!(pages(&r.take_dirty(alias)), vec![0, 1]);
    }

    /// merge_dirty_bitmap works by words; set_dirty by runs: for bitmaps at every kind of page
    /// offset, through the owner and through aliases (page-aligned and not), they must agree.
    #[test]
    fn a_merged_bitmap_marks_what_set_dirty_marks_run_by_run() {
        let patterns: [&[u64]; 4] = [
            &[!0, !0, 1],
            &[0x8000_0000_0000_0001, 0, 0xf0],
            &[0, 0],
            &[!0],
        ];
        for alias_at in [MIB - 8192, MIB, 2048] {
            for (via_alias, first_page) in [
                (false, 0),
                (false, 250),
                (false, 1000),
                (true, 0),
                (true, 37),
                (true, 250),
            ] {
                for bitmap in patterns {
                    let (mut words, mut runs) = (RamBlockRegistry::new(), RamBlockRegistry::new());
                    let mut blocks = Vec::new();
                    for r in [&mut words, &mut runs] {
                        let (root, alias) = root_and_alias(r, alias_at, MIB);
                        let nested = r.add_alias(alias, 8192, 64 * 4096).unwrap();
                        blocks = vec![root, alias, nested];
                    }
                    let target = blocks[usize::from(via_alias)];
                    words.merge_dirty_bitmap(target, first_page, bitmap);
                    for_each_set_run(bitmap, |f, n| {
                        runs.set_dirty(target, (first_page + f) * 4096, n * 4096)
                    });
                    for b in &blocks {
                        assert_eq!(
                            pages(&words.take_dirty(*b)),
                            pages(&runs.take_dirty(*b)),
                            "block {b:?}, alias at {alias_at:#x}, via alias {via_alias}, page {first_page}, {bitmap:x?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn huge_sparse_block_allocates_no_bitmap_until_used() {
        let mut r = RamBlockRegistry::new();
        let nine_tib = 9u64 << 40;
        let id = r
            .add(mapping(nine_tib), 0, nine_tib, nine_tib, false)
            .unwrap();
        assert!(!r.get(id).unwrap().has_dirty_bitmap());
        assert_eq!(r.dirty_pages(id), 0);
        assert_eq!(r.get(id).unwrap().used_length, nine_tib);
    }
}
