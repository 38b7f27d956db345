//! One context's memory system: the region arena, the RAMBlock registry, the address spaces,
//! transactions and the listeners told about each commit.
//!
//! Every mutation wraps itself in a transaction, as QEMU's memory API does, so a caller that
//! opened one sees a single flat-view update at its outermost commit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::error::{Error, HmErrorClass, Result};
use crate::flatview::{self, FlatRange, FlatView};
use crate::guarded::{Guard, Span};
use crate::hostmap::HostMapping;
use crate::listener::{MemoryListener, MemorySection, RamSection};
use crate::ramblock::{RamBlockId, RamBlockRegistry};
use crate::region::{size_to_u64, Region, RegionId, RegionKind, RegionLookup};

/// Size of QEMU's "io" region: the x86 port space.
pub const SYSTEM_IO_SIZE: u128 = 0x10000;

/// An address space: a name, a root region and the flat view last rendered from it.
#[derive(Clone, Debug)]
pub struct AddressSpace {
    pub name: String,
    pub root: RegionId,
    pub view: FlatView,
    /// The region the view was rendered from (QEMU's flatview root), `None` for an empty view.
    pub view_root: Option<RegionId>,
}

struct Slot {
    generation: u32,
    region: Option<Region>,
}

pub struct MemorySystem {
    pub ramblocks: RamBlockRegistry,
    slots: Vec<Slot>,
    free: Vec<u32>,
    system: RegionId,
    io: RegionId,
    spaces: Vec<AddressSpace>,
    depth: u32,
    /// What the next outermost commit re-renders.
    stale: Stale,
    /// How many aliases point at each region: a region an alias shows appears in the view
    /// wherever the alias is, so a change to it (or below it) re-renders everything.
    alias_refs: HashMap<RegionId, u32>,
    /// How many ranges of "memory" the last commit rendered: the whole view, or only what
    /// the patched windows held.
    rendered_last: usize,
    listeners: Vec<Box<dyn MemoryListener>>,
    global_dirty_log: bool,
    /// What listeners were told of the "memory" view, one section per range of
    /// `spaces[0].view`: a del must describe a section as it was added, even when its region
    /// has been destroyed since. Keyed by address: a change among 100 000 sections replaces
    /// a few without moving the others.
    memory_sections: BTreeMap<u64, MemorySection>,
    /// Memory of destroyed RAM regions, kept mapped until the outermost commit has told the
    /// listeners that it is gone.
    retired_mappings: Vec<Arc<HostMapping>>,
}

/// What changed since the last commit, as far as the views are concerned.
#[derive(Debug, Default)]
enum Stale {
    #[default]
    Nothing,
    /// Only these windows `(space, start, end)` of these address spaces' views: a change to a
    /// region shows nowhere outside its own extent.
    Windows(Vec<(usize, u128, u128)>),
    /// Re-render every view (a change QEMU's way; also past [`MAX_WINDOWS`] changes, where
    /// one render costs less than many patches).
    Everything,
}

/// Past this many changed windows in one transaction, a commit re-renders whole views.
const MAX_WINDOWS: usize = 64;

/// The end of a 64-bit address space.
const SPACE_END: u128 = 1 << 64;

/// Where a change to one region shows (see `MemorySystem::placement`).
enum Placement {
    At((usize, u128, u128)),
    Nowhere,
    Anywhere,
}

/// Windows sorted and merged where they overlap or touch, so no range is patched twice.
fn coalesce(mut ws: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ws.retain(|w| w.0 < w.1);
    ws.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(ws.len());
    for w in ws {
        match out.last_mut() {
            Some(last) if w.0 <= last.1 => last.1 = last.1.max(w.1),
            _ => out.push(w),
        }
    }
    out
}

impl RegionLookup for MemorySystem {
    fn region(&self, id: RegionId) -> Option<&Region> {
        self.slots
            .get(id.index as usize)
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.region.as_ref())
    }
}

fn stale(id: RegionId) -> Error {
    Error::new(
        HmErrorClass::NotFound,
        format!(
            "memory region handle {}:{} is stale or invalid (the region was destroyed)",
            id.index, id.generation
        ),
    )
}

impl MemorySystem {
    /// A fresh system with the "system" (2^64) and "io" (64 KiB) containers and the address
    /// spaces "memory" and "I/O" over them.
    pub fn new() -> Self {
        let mut m = MemorySystem {
            ramblocks: RamBlockRegistry::new(),
            slots: Vec::new(),
            free: Vec::new(),
            system: RegionId {
                index: 0,
                generation: 0,
            },
            io: RegionId {
                index: 0,
                generation: 0,
            },
            spaces: Vec::new(),
            depth: 0,
            stale: Stale::Nothing,
            alias_refs: HashMap::new(),
            rendered_last: 0,
            listeners: Vec::new(),
            global_dirty_log: false,
            memory_sections: BTreeMap::new(),
            retired_mappings: Vec::new(),
        };
        m.system = m.new_container("system", 1u128 << 64);
        // QEMU's "io" is an I/O region (unassigned ports answer as "io"), not a bare container.
        m.io = m.new_io("io", SYSTEM_IO_SIZE);
        for (name, root) in [("memory", m.system), ("I/O", m.io)] {
            let view_root = flatview::flatview_root(&m, root);
            let view = flatview::render(&m, view_root);
            m.spaces.push(AddressSpace {
                name: name.to_string(),
                root,
                view,
                view_root,
            });
        }
        m
    }

    pub fn system_memory(&self) -> RegionId {
        self.system
    }

    pub fn system_io(&self) -> RegionId {
        self.io
    }

    /// Address spaces in creation order ("memory", then "I/O").
    pub fn address_spaces(&self) -> &[AddressSpace] {
        &self.spaces
    }

    /// The flat view of the "memory" address space.
    pub fn memory_view(&self) -> &FlatView {
        &self.spaces[0].view
    }

    /// The region behind a handle; a destroyed region (stale handle) is an error.
    pub fn get(&self, id: RegionId) -> Result<&Region> {
        self.region(id).ok_or_else(|| stale(id))
    }

    fn get_mut(&mut self, id: RegionId) -> Result<&mut Region> {
        self.slots
            .get_mut(id.index as usize)
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.region.as_mut())
            .ok_or_else(|| stale(id))
    }

    fn insert(&mut self, region: Region) -> RegionId {
        match self.free.pop() {
            Some(index) => {
                let slot = &mut self.slots[index as usize];
                slot.region = Some(region);
                RegionId {
                    index,
                    generation: slot.generation,
                }
            }
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    region: Some(region),
                });
                RegionId {
                    index: (self.slots.len() - 1) as u32,
                    generation: 0,
                }
            }
        }
    }

    /// A RAM region over existing memory (a backend's), with an unnamed, unmigratable RAMBlock.
    pub fn new_ram_region(
        &mut self,
        name: &str,
        mapping: Arc<HostMapping>,
        mapping_offset: u64,
        size: u64,
        readonly: bool,
    ) -> Result<RegionId> {
        if size == 0 {
            return Err(Error::invalid(format!(
                "RAM region '{name}' cannot have size 0"
            )));
        }
        // RAMBlock lengths are whole host pages (QEMU's HOST_PAGE_ALIGN), as far as the
        // mapping goes; the region keeps the exact size.
        let page = crate::hostmap::host_page_size() as u64;
        let avail = (mapping.len() as u64).saturating_sub(mapping_offset);
        let len = size
            .checked_next_multiple_of(page)
            .unwrap_or(size)
            .min(avail.max(size));
        let block = self
            .ramblocks
            .add(mapping, mapping_offset, len, len, readonly)?;
        let mut r = Region::new(name, u128::from(size), RegionKind::Ram { block });
        r.readonly = readonly;
        Ok(self.insert(r))
    }

    /// `memory_region_init_ram`'s memory: anonymous, private, reserved lazily.
    pub fn new_ram_anonymous(&mut self, name: &str, size: u64) -> Result<RegionId> {
        if size == 0 {
            return Err(Error::host(
                format!("cannot set up guest memory '{name}'"),
                libc::EINVAL,
            ));
        }
        let mapping = crate::ramblock::map_anonymous(name, size)?;
        self.new_ram_region(name, mapping, 0, size, false)
    }

    pub fn new_container(&mut self, name: &str, size: u128) -> RegionId {
        self.insert(Region::new(name, size, RegionKind::Container))
    }

    /// An MMIO placeholder ("i/o" in the dumps).
    pub fn new_io(&mut self, name: &str, size: u128) -> RegionId {
        self.insert(Region::new(name, size, RegionKind::Io))
    }

    /// `size` as in QEMU's C API: `u64::MAX` means 2^64.
    pub fn new_alias(
        &mut self,
        name: &str,
        target: RegionId,
        offset: u64,
        size: u64,
    ) -> Result<RegionId> {
        self.get(target)?;
        let size = crate::region::size_from_u64(size);
        *self.alias_refs.entry(target).or_default() += 1;
        Ok(self.insert(Region::new(
            name,
            size,
            RegionKind::Alias { target, offset },
        )))
    }

    /// Runs `f` inside begin/commit; the change's own error wins over a listener's.
    fn in_transaction<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.transaction_begin();
        let r = f(self);
        let c = self.transaction_commit();
        let v = r?;
        c?;
        Ok(v)
    }

    /// Whether `from` can reach `to` by subregion or alias edges.
    fn reaches(&self, from: RegionId, to: RegionId) -> bool {
        let mut stack = vec![from];
        let mut seen = std::collections::HashSet::new();
        while let Some(id) = stack.pop() {
            if id == to {
                return true;
            }
            if !seen.insert(id) {
                continue;
            }
            if let Some(r) = self.region(id) {
                stack.extend(r.subregions.iter().copied());
                if let Some((t, _)) = r.alias_target() {
                    stack.push(t);
                }
            }
        }
        false
    }

    /// `memory_region_add_subregion[_overlap]`: `priority` None means the non-overlapping form.
    pub fn add_subregion(
        &mut self,
        parent: RegionId,
        addr: u64,
        child: RegionId,
        priority: Option<i32>,
    ) -> Result<()> {
        let p = self.get(parent)?;
        let c = self.get(child)?;
        if matches!(p.kind, RegionKind::Alias { .. }) {
            return Err(Error::invalid(format!(
                "memory region '{}' is an alias and cannot have subregions",
                p.name
            )));
        }
        if let Some(cur) = c.parent {
            let cur = self.get(cur).map(|r| r.name.clone()).unwrap_or_default();
            return Err(Error::new(
                HmErrorClass::InUse,
                format!(
                    "memory region '{}' is already a subregion of '{cur}'",
                    c.name
                ),
            ));
        }
        if child == self.system || child == self.io {
            return Err(Error::invalid(format!(
                "memory region '{}' is the root of an address space and cannot be a subregion",
                c.name
            )));
        }
        if self.reaches(child, parent) {
            return Err(Error::invalid(format!(
                "adding memory region '{}' to '{}' would make a cycle",
                c.name, p.name
            )));
        }
        if u128::from(addr) + c.size > 1u128 << 64 {
            return Err(Error::invalid(format!(
                "memory region '{}' of 0x{:x} bytes at 0x{addr:x} ends beyond 2^64",
                c.name, c.size
            )));
        }
        let start = u128::from(addr);
        let end = start + c.size;
        if priority.is_none() && c.enabled {
            for s in p.subregions.overlapping(start, end) {
                let o = self.get(s)?;
                if !o.may_overlap && o.enabled {
                    return Err(Error::invalid(format!(
                        "memory region '{}' at 0x{addr:x} overlaps '{}' at 0x{:x} in '{}'; use \
                         memory_region_add_subregion_overlap to layer regions",
                        c.name, o.name, o.addr, p.name
                    )));
                }
            }
        }
        self.in_transaction(|m| {
            {
                let c = m.get_mut(child)?;
                c.addr = addr;
                c.priority = priority.unwrap_or(0);
                c.may_overlap = priority.is_some();
            }
            m.link(parent, child)
        })
    }

    /// Inserts `child` among `parent`'s subregions before the first sibling of equal or lower
    /// priority, so the newest of equals comes first, and marks the view stale.
    fn link(&mut self, parent: RegionId, child: RegionId) -> Result<()> {
        let c = self.get(child)?;
        let (addr, size, prio) = (c.addr, c.size, c.priority);
        self.get_mut(parent)?
            .subregions
            .insert(child, addr, size, prio);
        self.get_mut(child)?.parent = Some(parent);
        self.touched(child);
        Ok(())
    }

    fn unlink(&mut self, child: RegionId) -> Result<()> {
        if let Some(parent) = self.get(child)?.parent {
            self.touched(child);
            if let Ok(p) = self.get_mut(parent) {
                p.subregions.remove(child);
            }
            self.get_mut(child)?.parent = None;
        }
        Ok(())
    }

    pub fn del_subregion(&mut self, parent: RegionId, child: RegionId) -> Result<()> {
        let p = self.get(parent)?;
        let c = self.get(child)?;
        if c.parent != Some(parent) {
            return Err(Error::new(
                HmErrorClass::NotFound,
                format!(
                    "memory region '{}' is not a subregion of '{}'",
                    c.name, p.name
                ),
            ));
        }
        self.in_transaction(|m| m.unlink(child))
    }

    pub fn set_enabled(&mut self, id: RegionId, enabled: bool) -> Result<()> {
        if self.get(id)?.enabled == enabled {
            return Ok(());
        }
        self.in_transaction(|m| {
            m.get_mut(id)?.enabled = enabled;
            m.touched(id);
            Ok(())
        })
    }

    /// Moves a region inside its parent; like QEMU it re-inserts it, so it becomes the newest
    /// among siblings of equal priority.
    pub fn set_address(&mut self, id: RegionId, addr: u64) -> Result<()> {
        let r = self.get(id)?;
        if r.addr == addr {
            return Ok(());
        }
        if u128::from(addr) + r.size > 1u128 << 64 {
            return Err(Error::invalid(format!(
                "memory region '{}' of 0x{:x} bytes at 0x{addr:x} ends beyond 2^64",
                r.name, r.size
            )));
        }
        let parent = r.parent;
        self.in_transaction(|m| {
            if let Some(p) = parent {
                m.unlink(id)?;
                m.get_mut(id)?.addr = addr;
                m.link(p, id)
            } else {
                // A root or a detached region: nothing it shows is in a view (an alias of it
                // makes touched() re-render everything).
                m.touched(id);
                m.get_mut(id)?.addr = addr;
                m.touched(id);
                Ok(())
            }
        })
    }

    pub fn set_alias_offset(&mut self, id: RegionId, offset: u64) -> Result<()> {
        let r = self.get(id)?;
        let RegionKind::Alias {
            target,
            offset: cur,
        } = r.kind
        else {
            return Err(Error::invalid(format!(
                "memory region '{}' is not an alias",
                r.name
            )));
        };
        if cur == offset {
            return Ok(());
        }
        if r.alias_block.is_some() {
            return Err(Error::new(
                HmErrorClass::InUse,
                format!(
                    "alias '{}' is registered for migration; unregister it before moving it",
                    r.name
                ),
            ));
        }
        self.in_transaction(|m| {
            m.get_mut(id)?.kind = RegionKind::Alias { target, offset };
            m.touched(id);
            Ok(())
        })
    }

    pub fn set_readonly(&mut self, id: RegionId, readonly: bool) -> Result<()> {
        let r = self.get(id)?;
        if r.readonly == readonly {
            return Ok(());
        }
        let block = match r.kind {
            RegionKind::Ram { block } => Some(block),
            _ => None,
        };
        self.in_transaction(|m| {
            m.get_mut(id)?.readonly = readonly;
            if let Some(b) = block {
                m.ramblocks.set_readonly(b, readonly);
            }
            m.touched(id);
            Ok(())
        })
    }

    /// Records the owner's canonical path (shown by `info mtree -o`, prefixed to RAMBlock
    /// names registered with an owner).
    pub fn set_owner(&mut self, id: RegionId, owner: Option<&str>) -> Result<()> {
        self.get_mut(id)?.owner = owner.map(str::to_string);
        Ok(())
    }

    pub fn region_size(&self, id: RegionId) -> Result<u128> {
        Ok(self.get(id)?.size)
    }

    pub fn region_name(&self, id: RegionId) -> Result<&str> {
        Ok(&self.get(id)?.name)
    }

    /// The region's own RAMBlock: a RAM region's block, or the alias block of an alias
    /// registered for migration.
    pub fn ram_block_of(&self, id: RegionId) -> Option<RamBlockId> {
        let r = self.region(id)?;
        match r.kind {
            RegionKind::Ram { block } => Some(block),
            _ => r.alias_block,
        }
    }

    /// Follows aliases down to a RAM region: (RAM region, offset into it). `None` when the
    /// chain ends in a container or I/O.
    pub fn resolve_ram(&self, id: RegionId) -> Result<Option<(RegionId, u64)>> {
        let mut id = id;
        let mut off: u64 = 0;
        loop {
            let r = self.get(id)?;
            match r.kind {
                RegionKind::Ram { .. } => return Ok(Some((id, off))),
                RegionKind::Alias { target, offset } => {
                    off = off.saturating_add(offset);
                    id = target;
                }
                _ => return Ok(None),
            }
        }
    }

    /// `memory_region_get_ram_ptr`: host address of the region's first byte, through aliases;
    /// `None` for regions without RAM or an alias window starting past its target's end.
    pub fn ram_ptr(&self, id: RegionId) -> Result<Option<*mut u8>> {
        let Some((ram, off)) = self.resolve_ram(id)? else {
            return Ok(None);
        };
        let r = self.get(ram)?;
        let RegionKind::Ram { block } = r.kind else {
            return Ok(None);
        };
        if u128::from(off) >= r.size {
            return Ok(None);
        }
        Ok(self
            .ramblocks
            .get(block)
            .map(|b| b.host_ptr().wrapping_add(off as usize)))
    }

    /// Names the region's RAMBlock and makes it migratable (`vmstate_register_ram`). For an
    /// alias of RAM this gives the alias a RAMBlock of its own over the aliased memory (a
    /// migratable alias), so a big region can travel as several named blocks; the aliased
    /// region's own block then leaves the stream (see [`RamBlockRegistry::register_alias`]).
    pub fn vmstate_register_ram(&mut self, id: RegionId, owner_path: Option<&str>) -> Result<()> {
        let r = self.get(id)?;
        let name = r.name.clone();
        let is_alias = r.alias_target().is_some();
        let (block, created) = match self.ram_block_of(id) {
            Some(block) => (block, false),
            None if is_alias => (self.new_alias_block(id)?, true),
            None => return Err(not_ram(&name)),
        };
        let registered = if is_alias {
            self.ramblocks.register_alias(block, owner_path, &name)
        } else {
            self.ramblocks.register(block, owner_path, &name)
        };
        if let Err(e) = registered {
            if created {
                self.ramblocks.remove(block);
            }
            return Err(e);
        }
        if created {
            self.get_mut(id)?.alias_block = Some(block);
        }
        Ok(())
    }

    /// A RAMBlock for alias `id` over the memory it shows (clipped to its RAM target).
    fn new_alias_block(&mut self, id: RegionId) -> Result<RamBlockId> {
        let r = self.get(id)?;
        let (name, size) = (r.name.clone(), r.size);
        let Some((ram, off)) = self.resolve_ram(id)? else {
            return Err(not_ram(&name));
        };
        let target = self.get(ram)?;
        let RegionKind::Ram { block } = target.kind else {
            return Err(not_ram(&name));
        };
        let len = size.min(target.size.saturating_sub(u128::from(off)));
        if len == 0 {
            return Err(Error::invalid(format!(
                "alias '{name}' starts beyond the end of '{}'",
                target.name
            )));
        }
        self.ramblocks.add_alias(block, off, size_to_u64(len))
    }

    /// `vmstate_unregister_ram`: the block loses its name and leaves the migration stream; an
    /// alias's block, which exists only to be migrated, goes away (the last one over a region
    /// gives that region's block its registration back).
    pub fn vmstate_unregister_ram(&mut self, id: RegionId) -> Result<()> {
        let r = self.get(id)?;
        match r.kind {
            RegionKind::Ram { block } => {
                self.ramblocks.unregister(block);
                Ok(())
            }
            _ => {
                if let Some(b) = r.alias_block {
                    self.ramblocks.remove(b);
                    self.get_mut(id)?.alias_block = None;
                }
                Ok(())
            }
        }
    }

    /// QEMU's `object_unparent` of a region: it leaves its parent, its children are detached,
    /// its RAMBlock (if any) is freed, and its handle becomes stale.
    pub fn destroy_region(&mut self, id: RegionId) -> Result<()> {
        let r = self.get(id)?;
        if id == self.system || id == self.io {
            return Err(Error::invalid(format!(
                "memory region '{}' is the root of an address space and cannot be destroyed",
                r.name
            )));
        }
        let name = r.name.clone();
        if let Some(alias) = self
            .alias_refs
            .contains_key(&id)
            .then(|| {
                self.slots
                    .iter()
                    .filter_map(|s| s.region.as_ref())
                    .find(|o| o.alias_target().is_some_and(|(t, _)| t == id))
            })
            .flatten()
        {
            return Err(Error::new(
                HmErrorClass::InUse,
                format!(
                    "memory region '{name}' is still the target of alias '{}'",
                    alias.name
                ),
            ));
        }
        self.in_transaction(|m| {
            m.unlink(id)?;
            let children = m.get(id)?.subregions.to_vec();
            for c in children {
                m.unlink(c)?;
            }
            let r = m.get(id)?;
            let alias_of = r.alias_target().map(|(t, _)| t);
            let blocks: Vec<RamBlockId> = match r.kind {
                RegionKind::Ram { block } => vec![block],
                _ => vec![],
            }
            .into_iter()
            .chain(r.alias_block)
            .collect();
            for b in blocks {
                // Listeners (KVM) still map this memory until the commit tells them it went.
                if let Some(blk) = m.ramblocks.get(b) {
                    m.retired_mappings.push(blk.mapping.clone());
                }
                m.ramblocks.remove(b);
            }
            if let Some(target) = alias_of {
                if let Some(n) = m.alias_refs.get_mut(&target) {
                    *n -= 1;
                    if *n == 0 {
                        m.alias_refs.remove(&target);
                    }
                }
            }
            let slot = &mut m.slots[id.index as usize];
            slot.region = None;
            slot.generation = slot.generation.wrapping_add(1);
            m.free.push(id.index);
            Ok(())
        })
    }

    pub fn transaction_begin(&mut self) {
        self.depth += 1;
    }

    /// Ends a transaction; at depth 0 renders the flat views and tells every listener. The
    /// first listener error is returned; the region tree keeps the change either way.
    pub fn transaction_commit(&mut self) -> Result<()> {
        if self.depth == 0 {
            return Err(Error::generic(
                "memory_region_transaction_commit called without \
                 memory_region_transaction_begin",
            ));
        }
        self.depth -= 1;
        if self.depth > 0 {
            return Ok(());
        }
        let result = match std::mem::take(&mut self.stale) {
            Stale::Nothing => Ok(()),
            stale => self.update_topology(stale),
        };
        self.retired_mappings.clear();
        result
    }

    /// How many ranges of the "memory" view the last commit that changed something rendered
    /// (a change re-renders only the windows it touched; see `Stale`).
    pub fn last_commit_rendered_ranges(&self) -> usize {
        self.rendered_last
    }

    pub fn transaction_depth(&self) -> u32 {
        self.depth
    }

    /// Records that `id` changed (call it with the region where it is placed, before a move
    /// and again after): its extent in the view of the space it is under must be re-rendered.
    fn touched(&mut self, id: RegionId) {
        if matches!(self.stale, Stale::Everything) {
            return;
        }
        let window = self.placement(id);
        let stale = std::mem::take(&mut self.stale);
        self.stale = match (stale, window) {
            (Stale::Everything, _) | (_, Placement::Anywhere) => Stale::Everything,
            (stale, Placement::Nowhere) => stale,
            (Stale::Nothing, Placement::At(w)) => Stale::Windows(vec![w]),
            (Stale::Windows(mut ws), Placement::At(w)) => {
                ws.push(w);
                if ws.len() > MAX_WINDOWS {
                    Stale::Everything
                } else {
                    Stale::Windows(ws)
                }
            }
        };
    }

    /// Where a change to `id` can show: the window of its extent in one space's view (the sum
    /// of the addresses up to the space's root), nowhere (it hangs under no address space),
    /// or anywhere (an alias shows it, or a view is rooted below the space's root).
    fn placement(&self, id: RegionId) -> Placement {
        let Some(size) = self.region(id).map(|r| r.size) else {
            return Placement::Anywhere;
        };
        let mut start: u128 = 0;
        let mut cur = id;
        // A tree is acyclic (add_subregion refuses cycles); the bound guards corrupt arenas.
        for _ in 0..4096 {
            if self.alias_refs.contains_key(&cur) {
                return Placement::Anywhere;
            }
            let Some(r) = self.region(cur) else {
                return Placement::Anywhere;
            };
            let Some(parent) = r.parent else {
                return match self.spaces.iter().position(|s| s.root == cur) {
                    Some(i) if self.spaces[i].view_root == Some(cur) => {
                        let end = (start + size).min(SPACE_END);
                        Placement::At((i, start.min(end), end))
                    }
                    Some(_) => Placement::Anywhere,
                    None => Placement::Nowhere,
                };
            };
            start += u128::from(r.addr);
            cur = parent;
        }
        Placement::Anywhere
    }

    fn update_topology(&mut self, stale: Stale) -> Result<()> {
        let mut result = Ok(());
        for i in 0..self.spaces.len() {
            let root = self.spaces[i].root;
            let view_root = flatview::flatview_root(self, root);
            let windows = match &stale {
                Stale::Windows(ws) if view_root == Some(root) => Some(coalesce(
                    ws.iter()
                        .filter(|w| w.0 == i)
                        .map(|&(_, a, b)| (a, b))
                        .collect(),
                )),
                _ => None,
            };
            let r = match windows {
                Some(windows) => self.patch_space(i, &windows),
                None => self.rerender_space(i, view_root),
            };
            if i == 0 {
                result = r;
            }
        }
        result
    }

    /// Re-renders space `i` whole and tells listeners (of "memory") what the diff with the
    /// old view says.
    fn rerender_space(&mut self, i: usize, view_root: Option<RegionId>) -> Result<()> {
        let new = flatview::render(self, view_root);
        self.spaces[i].view_root = view_root;
        let old = std::mem::replace(&mut self.spaces[i].view, new);
        // Listeners (KVM) follow the "memory" address space only.
        if i != 0 {
            return Ok(());
        }
        let new = &self.spaces[0].view;
        self.rendered_last = new.ranges.len();
        let new_sections: Vec<MemorySection> = new.ranges.iter().map(|r| self.section(r)).collect();
        let old_sections = std::mem::take(&mut self.memory_sections);
        let (removed, added) = flatview::diff(&old, new);
        let removed: Vec<MemorySection> = old
            .ranges
            .iter()
            .zip(old_sections.into_values())
            .filter(|(r, _)| flatview::sorted_contains(&removed, r))
            .map(|(_, s)| s)
            .collect();
        let added: Vec<MemorySection> = new
            .ranges
            .iter()
            .zip(&new_sections)
            .filter(|(r, _)| flatview::sorted_contains(&added, r))
            .map(|(_, s)| s.clone())
            .collect();
        self.memory_sections = new_sections.into_iter().map(|s| (s.gpa, s)).collect();
        self.notify(&removed, &added)
    }

    /// Re-renders only `windows` of space `i`'s view (its root unchanged) and tells listeners
    /// (of "memory") only of the ranges that changed there.
    fn patch_space(&mut self, i: usize, windows: &[(u128, u128)]) -> Result<()> {
        let root = self.spaces[i].root;
        let mut view = std::mem::take(&mut self.spaces[i].view);
        // Net changes over all windows: a range one window's patch added and a later one's
        // removed (a neighbour merged twice) was never there for listeners.
        let mut removed: Vec<(FlatRange, MemorySection)> = Vec::new();
        let mut added: Vec<FlatRange> = Vec::new();
        let mut rendered = 0;
        for &w in windows {
            let patch = flatview::patch_window(self, Some(root), &mut view, w);
            if i != 0 {
                continue;
            }
            rendered += patch.replaced_by;
            let sections: Vec<MemorySection> = view
                .ranges
                .slice(patch.at.start..patch.at.start + patch.replaced_by)
                .map(|r| self.section(r))
                .collect();
            let old: Vec<MemorySection> = patch
                .replaced_addrs
                .iter()
                .filter_map(|gpa| self.memory_sections.remove(gpa))
                .collect();
            self.memory_sections
                .extend(sections.into_iter().map(|s| (s.gpa, s)));
            for s in old {
                let Some(r) = patch.removed.iter().find(|r| r.addr == s.gpa) else {
                    continue;
                };
                match added.iter().position(|a| a == r) {
                    Some(k) => {
                        added.remove(k);
                    }
                    None => removed.push((r.clone(), s)),
                }
            }
            for r in patch.added {
                match removed.iter().position(|(g, _)| *g == r) {
                    Some(k) => {
                        removed.remove(k);
                    }
                    None => added.push(r),
                }
            }
        }
        self.spaces[i].view = view;
        if i == 0 {
            self.rendered_last = rendered;
        }
        if i != 0 || (removed.is_empty() && added.is_empty()) {
            return Ok(());
        }
        removed.sort_by_key(|(r, _)| r.addr);
        added.sort_by_key(|r| r.addr);
        let removed: Vec<MemorySection> = removed.into_iter().map(|(_, s)| s).collect();
        let added: Vec<MemorySection> = added
            .iter()
            .map(|r| self.memory_sections[&r.addr].clone())
            .collect();
        self.notify(&removed, &added)
    }

    /// What a listener sees of a flat range.
    pub fn section(&self, r: &FlatRange) -> MemorySection {
        let region = self.region(r.region);
        let ram = region.and_then(|reg| match reg.kind {
            RegionKind::Ram { block } => self.ramblocks.get(block).map(|b| RamSection {
                host_addr: b.host_ptr() as usize + r.offset_in_region as usize,
                mapping: b.mapping.clone(),
                block,
                block_offset: r.offset_in_region,
                page_size: b.page_size,
                readonly: r.readonly,
            }),
            _ => None,
        });
        MemorySection {
            gpa: r.addr,
            size: size_to_u64(r.size),
            region_name: region.map(|r| r.name.clone()).unwrap_or_default(),
            ram,
        }
    }

    fn notify(&mut self, removed: &[MemorySection], added: &[MemorySection]) -> Result<()> {
        let mut first: Option<Error> = None;
        let mut keep = |r: Result<()>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        for l in self.listeners.iter_mut() {
            keep(l.begin());
        }
        // QEMU removes in reverse listener order and adds in forward order.
        for l in self.listeners.iter_mut().rev() {
            for s in removed {
                keep(l.region_del(s));
            }
        }
        for l in self.listeners.iter_mut() {
            for s in added {
                keep(l.region_add(s));
            }
        }
        for l in self.listeners.iter_mut() {
            keep(l.commit());
        }
        first.map_or(Ok(()), Err)
    }

    /// The sections of the "memory" view, as listeners were told them.
    pub fn current_sections(&self) -> Vec<MemorySection> {
        self.memory_sections.values().cloned().collect()
    }

    /// Registers a listener and replays the current flat view to it as `region_add`s. If the
    /// replay fails the listener is not kept.
    pub fn add_listener(&mut self, mut l: Box<dyn MemoryListener>) -> Result<()> {
        let sections = self.current_sections();
        l.begin()?;
        if self.global_dirty_log {
            l.log_global_start()?;
        }
        for s in &sections {
            l.region_add(s)?;
        }
        l.commit()?;
        self.listeners.push(l);
        Ok(())
    }

    /// Unregisters the first listener named `name`, telling it every current section is gone
    /// (QEMU's memory_listener_unregister). Its errors are ignored: it is leaving anyway.
    pub fn remove_listener(&mut self, name: &str) -> Option<Box<dyn MemoryListener>> {
        let i = self.listeners.iter().position(|l| l.name() == name)?;
        let mut l = self.listeners.remove(i);
        let sections = self.current_sections();
        let _ = l.begin();
        for s in &sections {
            let _ = l.region_del(s);
        }
        let _ = l.commit();
        Some(l)
    }

    pub fn listener_names(&self) -> Vec<String> {
        self.listeners
            .iter()
            .map(|l| l.name().to_string())
            .collect()
    }

    /// QEMU's memory_global_dirty_log_start/stop: every listener is told; the first error is
    /// returned.
    pub fn set_global_dirty_log(&mut self, on: bool) -> Result<()> {
        if self.global_dirty_log == on {
            return Ok(());
        }
        self.global_dirty_log = on;
        let mut first = None;
        for l in self.listeners.iter_mut() {
            let r = if on {
                l.log_global_start()
            } else {
                l.log_global_stop()
            };
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    pub fn global_dirty_log(&self) -> bool {
        self.global_dirty_log
    }

    /// Asks every listener to fold its dirty pages into the RAMBlock bitmaps.
    pub fn log_sync(&mut self) -> Result<()> {
        let mut first = None;
        for l in self.listeners.iter_mut() {
            if let Err(e) = l.log_sync(&mut self.ramblocks) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// A piece of guest-physical memory, as [`ram_chunks`] cuts a range.
pub struct GuestChunk {
    /// Guest-physical start.
    pub gpa: u64,
    pub len: u64,
    /// None: no RAM there (I/O, or nothing mapped).
    pub ram: Option<ChunkRam>,
}

/// The RAM behind a [`GuestChunk`]: `offset` of `mapping`, which is RAMBlock `block` from
/// `block_offset` on (for errors that name where guest memory failed).
pub struct ChunkRam {
    pub mapping: Arc<HostMapping>,
    pub offset: u64,
    pub block: String,
    pub block_offset: u64,
}

impl GuestChunk {
    /// Reads `buf.len()` bytes from `at` bytes into the chunk: zeros where there is no RAM,
    /// volatile reads where there is (a vCPU may write meanwhile). A page the host cannot back
    /// is an error naming the guest-physical address, the RAMBlock and the offset in it.
    pub fn read(&self, guard: &Guard, at: u64, buf: &mut [u8]) -> Result<(), Error> {
        let Some(ram) = &self.ram else {
            buf.fill(0);
            return Ok(());
        };
        if at
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(Error::invalid(format!(
                "0x{:x} bytes at 0x{:x} are outside guest memory 0x{:x}+0x{:x}",
                buf.len(),
                self.gpa.wrapping_add(at),
                self.gpa,
                self.len
            )));
        }
        guard
            .read(&Span::of(&ram.mapping), (ram.offset + at) as usize, buf)
            .map_err(|e| {
                let into = e.offset().saturating_sub(ram.offset);
                Error::new(
                    HmErrorClass::Host,
                    format!(
                        "reading guest-physical 0x{:x} (RAMBlock \"{}\" offset 0x{:x}) failed: {e}",
                        self.gpa.wrapping_add(into),
                        ram.block,
                        ram.block_offset + into
                    ),
                )
                .with_errno(libc::EFAULT)
            })
    }
}

/// `[addr, addr+size)` of the "memory" address space cut into RAM and holes, in address order:
/// what reading guest-physical memory (`pmemsave`) goes through.
pub fn ram_chunks(mem: &MemorySystem, addr: u64, size: u64) -> Vec<GuestChunk> {
    let end = u128::from(addr) + u128::from(size);
    let mut at = u128::from(addr);
    let mut out = Vec::new();
    let hole = |from: u128, to: u128| GuestChunk {
        gpa: from as u64,
        len: (to - from) as u64,
        ram: None,
    };
    for r in &mem.memory_view().ranges {
        if r.end() <= at || u128::from(r.addr) >= end {
            continue;
        }
        if u128::from(r.addr) > at {
            out.push(hole(at, u128::from(r.addr)));
            at = u128::from(r.addr);
        }
        let stop = r.end().min(end);
        let into = (at - u128::from(r.addr)) as u64;
        let section = mem.section(r);
        let ram = section.ram.map(|ram| ChunkRam {
            offset: (ram.host_addr - ram.mapping.as_ptr() as usize) as u64 + into,
            block: mem
                .ramblocks
                .get(ram.block)
                .map(|b| b.idstr.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or(section.region_name),
            block_offset: ram.block_offset + into,
            mapping: ram.mapping,
        });
        out.push(GuestChunk {
            gpa: at as u64,
            len: (stop - at) as u64,
            ram,
        });
        at = stop;
    }
    if at < end {
        out.push(hole(at, end));
    }
    out
}

fn not_ram(name: &str) -> Error {
    Error::invalid(format!(
        "memory region '{name}' is not RAM; only RAM can be registered for migration"
    ))
}

impl Default for MemorySystem {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const MIB: u64 = 1 << 20;

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<String>>>);

    impl Log {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    struct Recorder {
        name: &'static str,
        log: Log,
        fail_add: bool,
    }

    impl MemoryListener for Recorder {
        fn name(&self) -> &str {
            self.name
        }
        fn begin(&mut self) -> Result<()> {
            self.log
                .0
                .lock()
                .unwrap()
                .push(format!("{} begin", self.name));
            Ok(())
        }
        fn region_del(&mut self, s: &MemorySection) -> Result<()> {
            self.log.0.lock().unwrap().push(format!(
                "{} del {} {:#x}+{:#x}",
                self.name, s.region_name, s.gpa, s.size
            ));
            Ok(())
        }
        fn region_add(&mut self, s: &MemorySection) -> Result<()> {
            self.log.0.lock().unwrap().push(format!(
                "{} add {} {:#x}+{:#x}",
                self.name, s.region_name, s.gpa, s.size
            ));
            if self.fail_add {
                return Err(Error::new(HmErrorClass::Kvm, "no slot"));
            }
            Ok(())
        }
        fn commit(&mut self) -> Result<()> {
            self.log
                .0
                .lock()
                .unwrap()
                .push(format!("{} commit", self.name));
            Ok(())
        }
        fn log_global_start(&mut self) -> Result<()> {
            self.log
                .0
                .lock()
                .unwrap()
                .push(format!("{} start", self.name));
            Ok(())
        }
        fn log_global_stop(&mut self) -> Result<()> {
            self.log
                .0
                .lock()
                .unwrap()
                .push(format!("{} stop", self.name));
            Ok(())
        }
        fn log_sync(&mut self, rb: &mut RamBlockRegistry) -> Result<()> {
            for id in rb.ids() {
                rb.set_dirty(id, 0, 1);
            }
            Ok(())
        }
    }

    fn recorder(m: &mut MemorySystem, name: &'static str) -> Log {
        let log = Log::default();
        m.add_listener(Box::new(Recorder {
            name,
            log: log.clone(),
            fail_add: false,
        }))
        .unwrap();
        log
    }

    #[test]
    fn guest_ranges_cut_into_ram_and_holes_in_address_order() {
        let mut m = MemorySystem::new();
        let ram = m.new_ram_anonymous("ram", 4 * MIB).unwrap();
        let alias = m.new_alias("hi", ram, MIB, MIB).unwrap();
        let sys = m.system_memory();
        m.add_subregion(sys, 0, ram, None).unwrap();
        m.add_subregion(sys, 8 * MIB, alias, None).unwrap();
        let chunks = ram_chunks(&m, 3 * MIB, 6 * MIB);
        let got: Vec<(bool, u64, u64)> = chunks
            .iter()
            .map(|c| match &c.ram {
                Some(r) => (true, r.offset, c.len),
                None => (false, 0, c.len),
            })
            .collect();
        // 1 MiB of RAM at 3 MiB, 4 MiB of nothing, then the alias's first MiB (RAM at 1 MiB).
        assert_eq!(
            got,
            [(true, 3 * MIB, MIB), (false, 0, 4 * MIB), (true, MIB, MIB)]
        );
    }

    #[test]
    fn new_system_has_qemu_roots_and_spaces() {
        let m = MemorySystem::new();
        let sys = m.get(m.system_memory()).unwrap();
        assert_eq!((sys.name.as_str(), sys.size), ("system", 1u128 << 64));
        let io = m.get(m.system_io()).unwrap();
        assert_eq!((io.name.as_str(), io.size), ("io", 0x10000));
        let names: Vec<_> = m.address_spaces().iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["memory", "I/O"]);
        assert!(m.memory_view().ranges.is_empty());
        assert_eq!(m.address_spaces()[1].view.ranges.len(), 1);
    }

    #[test]
    fn mapping_ram_tells_listeners_with_host_addresses() {
        let mut m = MemorySystem::new();
        let log = recorder(&mut m, "l");
        assert_eq!(log.take(), ["l begin", "l commit"]);
        let ram = m.new_ram_anonymous("pc.ram", 4 * MIB).unwrap();
        m.add_subregion(m.system_memory(), 0x1000_0000, ram, None)
            .unwrap();
        assert_eq!(
            log.take(),
            ["l begin", "l add pc.ram 0x10000000+0x400000", "l commit"]
        );
        let r = &m.memory_view().ranges[0];
        let s = m.section(r);
        let ptr = m.ram_ptr(ram).unwrap().unwrap();
        let rs = s.ram.unwrap();
        assert_eq!(rs.host_addr, ptr as usize);
        assert_eq!(Some(rs.block), m.ram_block_of(ram));
        assert_eq!(rs.block_offset, 0);
        assert_eq!(rs.page_size, crate::hostmap::host_page_size() as u64);
        m.del_subregion(m.system_memory(), ram).unwrap();
        assert_eq!(
            log.take(),
            ["l begin", "l del pc.ram 0x10000000+0x400000", "l commit"]
        );
    }

    #[test]
    fn a_change_in_a_big_map_re_renders_and_announces_only_what_it_touches() {
        let mut m = MemorySystem::new();
        let log = recorder(&mut m, "l");
        let sys = m.system_memory();
        m.transaction_begin();
        for i in 0..2000u64 {
            let r = m.new_io("dev", 0x1000);
            m.add_subregion(sys, i * 0x2000, r, None).unwrap();
        }
        m.transaction_commit().unwrap();
        // One render for the whole batch (past MAX_WINDOWS changes).
        assert_eq!(m.last_commit_rendered_ranges(), 2000);
        log.take();
        let extra = m.new_io("extra", 0x1000);
        m.add_subregion(sys, 1001 * 0x2000 + 0x1000, extra, None)
            .unwrap();
        // The new range and its two neighbours (which it could have merged with).
        assert_eq!(m.last_commit_rendered_ranges(), 3);
        assert_eq!(
            log.take(),
            ["l begin", "l add extra 0x7d3000+0x1000", "l commit"]
        );
        m.del_subregion(sys, extra).unwrap();
        assert_eq!(m.last_commit_rendered_ranges(), 2);
        assert_eq!(
            log.take(),
            ["l begin", "l del extra 0x7d3000+0x1000", "l commit"]
        );
        // A region under an alias shows wherever the alias is: that change renders it all.
        let c = m.new_container("c", 0x1000);
        let a = m.new_alias("a", c, 0, 0x1000).unwrap();
        m.add_subregion(sys, 0x1_0000_0000, a, None).unwrap();
        let leaf = m.new_io("leaf", 0x1000);
        m.add_subregion(c, 0, leaf, None).unwrap();
        assert_eq!(m.last_commit_rendered_ranges(), 2001);
        assert_eq!(
            log.take(),
            ["l begin", "l add leaf 0x100000000+0x1000", "l commit"]
        );
    }

    #[test]
    fn transactions_batch_into_one_update() {
        let mut m = MemorySystem::new();
        let log = recorder(&mut m, "l");
        log.take();
        let a = m.new_ram_anonymous("a", MIB).unwrap();
        let b = m.new_ram_anonymous("b", MIB).unwrap();
        m.transaction_begin();
        m.add_subregion(m.system_memory(), 0, a, None).unwrap();
        m.add_subregion(m.system_memory(), MIB, b, None).unwrap();
        m.set_address(b, 2 * MIB).unwrap();
        assert!(log.take().is_empty());
        m.transaction_commit().unwrap();
        assert_eq!(
            log.take(),
            [
                "l begin",
                "l add a 0x0+0x100000",
                "l add b 0x200000+0x100000",
                "l commit"
            ]
        );
        assert!(m.transaction_commit().is_err());
    }

    #[test]
    fn unchanged_sections_are_not_reannounced_and_dels_come_first() {
        let mut m = MemorySystem::new();
        let a = m.new_ram_anonymous("a", MIB).unwrap();
        let b = m.new_ram_anonymous("b", MIB).unwrap();
        m.add_subregion(m.system_memory(), 0, a, None).unwrap();
        m.add_subregion(m.system_memory(), MIB, b, None).unwrap();
        let log = recorder(&mut m, "l");
        log.take();
        m.set_enabled(b, false).unwrap();
        m.set_enabled(b, false).unwrap();
        assert_eq!(
            log.take(),
            ["l begin", "l del b 0x100000+0x100000", "l commit"]
        );
        m.set_address(a, 4 * MIB).unwrap();
        assert_eq!(
            log.take(),
            [
                "l begin",
                "l del a 0x0+0x100000",
                "l add a 0x400000+0x100000",
                "l commit"
            ]
        );
    }

    #[test]
    fn listener_errors_come_back_from_commit_and_the_change_stays() {
        let mut m = MemorySystem::new();
        let log = Log::default();
        m.add_listener(Box::new(Recorder {
            name: "KVM",
            log: log.clone(),
            fail_add: true,
        }))
        .unwrap();
        let other = recorder(&mut m, "other");
        other.take();
        let a = m.new_ram_anonymous("a", MIB).unwrap();
        let e = m.add_subregion(m.system_memory(), 0, a, None).unwrap_err();
        assert_eq!(e.message(), "no slot");
        assert_eq!(e.class(), HmErrorClass::Kvm);
        // The other listener was still told, and the region is mapped.
        assert!(other
            .take()
            .contains(&"other add a 0x0+0x100000".to_string()));
        assert_eq!(m.memory_view().ranges.len(), 1);
    }

    #[test]
    fn add_listener_replays_and_failed_replay_is_not_kept() {
        let mut m = MemorySystem::new();
        let a = m.new_ram_anonymous("a", MIB).unwrap();
        m.add_subregion(m.system_memory(), 0, a, None).unwrap();
        let log = recorder(&mut m, "l");
        assert_eq!(log.take(), ["l begin", "l add a 0x0+0x100000", "l commit"]);
        let bad = Box::new(Recorder {
            name: "bad",
            log: Log::default(),
            fail_add: true,
        });
        assert!(m.add_listener(bad).is_err());
        assert_eq!(m.listener_names(), ["l"]);
        let l = m.remove_listener("l").unwrap();
        assert_eq!(l.name(), "l");
        assert_eq!(log.take(), ["l begin", "l del a 0x0+0x100000", "l commit"]);
        assert!(m.listener_names().is_empty());
    }

    #[test]
    fn dirty_log_start_stop_and_sync_reach_listeners() {
        let mut m = MemorySystem::new();
        let log = recorder(&mut m, "l");
        log.take();
        let a = m.new_ram_anonymous("a", MIB).unwrap();
        m.set_global_dirty_log(true).unwrap();
        m.set_global_dirty_log(true).unwrap();
        assert!(m.global_dirty_log());
        m.log_sync().unwrap();
        let block = m.ram_block_of(a).unwrap();
        assert_eq!(m.ramblocks.dirty_pages(block), 1);
        m.set_global_dirty_log(false).unwrap();
        assert_eq!(log.take(), ["l start", "l stop"]);
    }

    #[test]
    fn stale_handles_are_errors_even_after_slot_reuse() {
        let mut m = MemorySystem::new();
        let a = m.new_container("a", 0x1000);
        m.destroy_region(a).unwrap();
        let b = m.new_container("b", 0x1000);
        assert_eq!(a.index, b.index);
        let e = m.region_size(a).unwrap_err();
        assert_eq!(e.class(), HmErrorClass::NotFound);
        assert!(m.add_subregion(m.system_memory(), 0, a, None).is_err());
        assert_eq!(m.region_size(b).unwrap(), 0x1000);
    }

    #[test]
    fn non_overlapping_form_refuses_collisions_but_overlap_form_layers() {
        let mut m = MemorySystem::new();
        let sys = m.system_memory();
        let a = m.new_io("a", 0x1000);
        let b = m.new_io("b", 0x1000);
        let c = m.new_io("c", 0x1000);
        let d = m.new_io("d", 0x1000);
        m.add_subregion(sys, 0x1000, a, None).unwrap();
        let e = m.add_subregion(sys, 0x1800, b, None).unwrap_err();
        assert!(e.message().contains("overlaps 'a'"), "{}", e.message());
        assert!(m.get(b).unwrap().parent.is_none());
        m.add_subregion(sys, 0x1800, c, Some(1)).unwrap();
        // A disabled region does not collide.
        m.set_enabled(d, false).unwrap();
        m.add_subregion(sys, 0x1000, d, None).unwrap();
        assert_eq!(m.memory_view().lookup(0x1900).unwrap().region, c);
    }

    #[test]
    fn misuse_is_refused_with_an_error() {
        let mut m = MemorySystem::new();
        let sys = m.system_memory();
        let c = m.new_container("c", 0x10000);
        let a = m.new_alias("al", c, 0, 0x1000).unwrap();
        let x = m.new_io("x", 0x100);
        m.add_subregion(sys, 0, c, None).unwrap();
        assert!(m.add_subregion(sys, 0x100000, c, None).is_err()); // already mapped
        assert!(m.add_subregion(a, 0, x, None).is_err()); // alias parent
        assert!(m.add_subregion(c, 0, a, None).is_err()); // cycle through alias
        assert!(m.add_subregion(c, 0, c, None).is_err()); // self
        assert!(m.add_subregion(c, 0, sys, None).is_err()); // root
        assert!(m.add_subregion(sys, u64::MAX, x, None).is_err()); // beyond 2^64
        assert!(m.del_subregion(c, x).is_err()); // not a child
        assert!(m.set_alias_offset(c, 4).is_err()); // not an alias
        assert!(m.destroy_region(c).is_err()); // alias target
        assert!(m.destroy_region(sys).is_err());
        assert!(m.vmstate_register_ram(c, None).is_err()); // not RAM
    }

    #[test]
    fn priorities_newest_first_among_equals() {
        let mut m = MemorySystem::new();
        let sys = m.system_memory();
        let a = m.new_io("a", 0x1000);
        let b = m.new_io("b", 0x1000);
        let c = m.new_io("c", 0x1000);
        m.add_subregion(sys, 0, a, Some(0)).unwrap();
        m.add_subregion(sys, 0, b, Some(0)).unwrap();
        m.add_subregion(sys, 0, c, Some(-1)).unwrap();
        assert_eq!(m.get(sys).unwrap().subregions.to_vec(), [b, a, c]);
        assert_eq!(m.memory_view().lookup(0).unwrap().region, b);
        // Moving re-inserts: a becomes the newest of its priority.
        m.set_address(a, 0x1000).unwrap();
        m.set_address(a, 0).unwrap();
        assert_eq!(m.get(sys).unwrap().subregions.to_vec(), [a, b, c]);
    }

    #[test]
    fn ram_ptr_follows_aliases_and_is_none_for_io() {
        let mut m = MemorySystem::new();
        let ram = m.new_ram_anonymous("ram", 4 * MIB).unwrap();
        let a1 = m.new_alias("a1", ram, MIB, 2 * MIB).unwrap();
        let a2 = m.new_alias("a2", a1, 0x1000, 0x1000).unwrap();
        let base = m.ram_ptr(ram).unwrap().unwrap();
        assert_eq!(
            m.ram_ptr(a2).unwrap().unwrap(),
            base.wrapping_add(MIB as usize + 0x1000)
        );
        let io = m.new_io("io", 4);
        assert_eq!(m.ram_ptr(io).unwrap(), None);
        let past = m.new_alias("past", ram, 4 * MIB, 0x1000).unwrap();
        assert_eq!(m.ram_ptr(past).unwrap(), None);
        // The memory is really there and writable.
        // SAFETY: base points at 4 MiB of our own anonymous mapping.
        unsafe { base.write(7) };
    }

    #[test]
    fn vmstate_register_names_blocks_and_refuses_duplicates() {
        let mut m = MemorySystem::new();
        let a = m.new_ram_anonymous("pc.ram", MIB).unwrap();
        let b = m.new_ram_anonymous("pc.ram", MIB).unwrap();
        let ba = m.ram_block_of(a).unwrap();
        assert_eq!(m.ramblocks.get(ba).unwrap().idstr, "");
        assert!(!m.ramblocks.get(ba).unwrap().migratable);
        m.vmstate_register_ram(a, None).unwrap();
        assert_eq!(m.ramblocks.get(ba).unwrap().idstr, "pc.ram");
        assert!(m.ramblocks.get(ba).unwrap().migratable);
        let e = m.vmstate_register_ram(b, None).unwrap_err();
        assert_eq!(e.message(), "RAMBlock \"pc.ram\" already registered");
        assert_eq!(e.class(), HmErrorClass::Duplicate);
        m.vmstate_register_ram(b, Some("/machine/dev")).unwrap();
        let bb = m.ram_block_of(b).unwrap();
        assert_eq!(m.ramblocks.get(bb).unwrap().idstr, "/machine/dev/pc.ram");
        m.vmstate_unregister_ram(a).unwrap();
        assert_eq!(m.ramblocks.get(ba).unwrap().idstr, "");
        assert!(!m.ramblocks.get(ba).unwrap().migratable);
    }

    #[test]
    fn registered_alias_gets_its_own_block_over_the_target_memory() {
        let mut m = MemorySystem::new();
        let whole = m.new_ram_anonymous("s390.whole.ram", 8 * MIB).unwrap();
        let lo = m.new_alias("s390.ram", whole, 0, 4 * MIB).unwrap();
        let hi = m.new_alias("s390.ram.1", whole, 4 * MIB, 4 * MIB).unwrap();
        m.vmstate_register_ram(lo, None).unwrap();
        m.vmstate_register_ram(hi, None).unwrap();
        let hb = m.ram_block_of(hi).unwrap();
        let blk = m.ramblocks.get(hb).unwrap();
        assert_eq!(blk.idstr, "s390.ram.1");
        assert!(blk.migratable);
        assert_eq!(blk.max_length, 4 * MIB);
        assert_eq!(blk.alias_of, m.ram_block_of(whole));
        assert_eq!(blk.host_ptr(), m.ram_ptr(hi).unwrap().unwrap());
        assert_eq!(m.ramblocks.len(), 3);
        m.vmstate_unregister_ram(hi).unwrap();
        assert_eq!(m.ram_block_of(hi), None);
        assert_eq!(m.ramblocks.len(), 2);
        m.vmstate_register_ram(hi, None).unwrap();
        m.destroy_region(hi).unwrap();
        assert_eq!(m.ramblocks.len(), 2);
    }

    /// (idstr, migratable) of every block, in `info ramblock` order.
    fn registrations(m: &MemorySystem) -> Vec<(String, bool)> {
        m.ramblocks
            .ids()
            .iter()
            .map(|&b| {
                let blk = m.ramblocks.get(b).unwrap();
                (blk.idstr.clone(), blk.migratable)
            })
            .collect()
    }

    fn reg(list: &[(&str, bool)]) -> Vec<(String, bool)> {
        list.iter().map(|&(n, b)| (n.to_string(), b)).collect()
    }

    #[test]
    fn the_aliased_block_leaves_the_stream_and_its_name_goes_to_the_first_alias() {
        let mut m = MemorySystem::new();
        let whole = m.new_ram_anonymous("s390.ram", 8 * MIB).unwrap();
        m.vmstate_register_ram(whole, None).unwrap();
        assert_eq!(registrations(&m), reg(&[("s390.ram", true)]));
        let lo = m.new_alias("s390.ram", whole, 0, 4 * MIB).unwrap();
        let hi = m.new_alias("s390.ram.1", whole, 4 * MIB, 4 * MIB).unwrap();
        m.vmstate_register_ram(lo, None).unwrap();
        m.vmstate_register_ram(hi, None).unwrap();
        // info ramblock shows all three: the whole, unnamed, then the chunks.
        assert_eq!(
            registrations(&m),
            reg(&[("", false), ("s390.ram", true), ("s390.ram.1", true)])
        );
        let hb = m.ramblocks.get(m.ram_block_of(hi).unwrap()).unwrap();
        assert_eq!((hb.used_length, hb.max_length), (4 * MIB, 4 * MIB));
        m.ramblocks.check_displaced_memory_migrates().unwrap();
        // The whole cannot travel as well as its chunks.
        let e = m.vmstate_register_ram(whole, None).unwrap_err();
        assert_eq!(e.class(), HmErrorClass::InUse);
        assert_eq!(
            e.message(),
            "the memory of RAMBlock \"s390.ram\" migrates through its aliases \"s390.ram\", \
             \"s390.ram.1\"; unregister them before registering it"
        );
        // The last alias to go gives the whole its name back.
        m.vmstate_unregister_ram(lo).unwrap();
        assert_eq!(registrations(&m), reg(&[("", false), ("s390.ram.1", true)]));
        m.destroy_region(hi).unwrap();
        assert_eq!(registrations(&m), reg(&[("s390.ram", true)]));
    }

    #[test]
    fn a_whole_unregistered_while_its_aliases_migrate_gets_nothing_back() {
        let mut m = MemorySystem::new();
        let whole = m.new_ram_anonymous("mem", 2 * MIB).unwrap();
        m.vmstate_register_ram(whole, None).unwrap();
        let a = m.new_alias("chunk", whole, 0, 2 * MIB).unwrap();
        m.vmstate_register_ram(a, None).unwrap();
        m.vmstate_unregister_ram(whole).unwrap();
        m.vmstate_unregister_ram(a).unwrap();
        assert_eq!(registrations(&m), reg(&[("", false)]));
        // A whole that never was registered stays so.
        let other = m.new_ram_anonymous("other", MIB).unwrap();
        let b = m.new_alias("other.0", other, 0, MIB).unwrap();
        m.vmstate_register_ram(b, None).unwrap();
        m.vmstate_unregister_ram(b).unwrap();
        let ob = m.ramblocks.get(m.ram_block_of(other).unwrap()).unwrap();
        assert_eq!(
            (ob.idstr.as_str(), ob.migratable, &ob.displaced),
            ("", false, &None)
        );
    }

    #[test]
    fn a_refused_alias_name_leaves_the_whole_in_the_stream() {
        let mut m = MemorySystem::new();
        let whole = m.new_ram_anonymous("s390.ram", 2 * MIB).unwrap();
        m.vmstate_register_ram(whole, None).unwrap();
        let taken = m.new_ram_anonymous("taken", MIB).unwrap();
        m.vmstate_register_ram(taken, None).unwrap();
        let a = m.new_alias("taken", whole, 0, 2 * MIB).unwrap();
        let e = m.vmstate_register_ram(a, None).unwrap_err();
        assert_eq!(e.message(), "RAMBlock \"taken\" already registered");
        assert_eq!(m.ram_block_of(a), None);
        assert_eq!(
            registrations(&m),
            reg(&[("s390.ram", true), ("taken", true)])
        );
    }

    #[test]
    fn memory_no_alias_carries_is_refused_when_a_migration_starts() {
        let mut m = MemorySystem::new();
        let whole = m.new_ram_anonymous("s390.ram", 8 * MIB).unwrap();
        let first = m.new_alias("s390.ram", whole, 0, 2 * MIB).unwrap();
        let last = m.new_alias("s390.ram.2", whole, 6 * MIB, 2 * MIB).unwrap();
        m.vmstate_register_ram(first, None).unwrap();
        m.vmstate_register_ram(last, None).unwrap();
        let e = m.ramblocks.check_displaced_memory_migrates().unwrap_err();
        assert_eq!(
            e.message(),
            "bytes 0x200000-0x5fffff of the RAM the aliases \"s390.ram\", \"s390.ram.2\" \
             migrate are in none of them: that memory would not migrate"
        );
        let mid = m.new_alias("s390.ram.1", whole, 2 * MIB, 4 * MIB).unwrap();
        m.vmstate_register_ram(mid, None).unwrap();
        m.ramblocks.check_displaced_memory_migrates().unwrap();
        m.vmstate_unregister_ram(last).unwrap();
        assert!(m
            .ramblocks
            .check_displaced_memory_migrates()
            .unwrap_err()
            .message()
            .starts_with("bytes 0x600000-0x7fffff of the RAM"));
    }

    #[test]
    fn pages_written_through_the_whole_are_dirty_in_the_chunk_that_migrates_them() {
        let mut m = MemorySystem::new();
        let whole = m.new_ram_anonymous("s390.ram", 8 * MIB).unwrap();
        let lo = m.new_alias("s390.ram", whole, 0, 4 * MIB).unwrap();
        let hi = m.new_alias("s390.ram.1", whole, 4 * MIB, 4 * MIB).unwrap();
        m.vmstate_register_ram(lo, None).unwrap();
        m.vmstate_register_ram(hi, None).unwrap();
        // KVM folds its log into the block of the flat range: the whole's.
        let wb = m.ram_block_of(whole).unwrap();
        m.ramblocks.set_dirty(wb, 4 * MIB - 4096, 2 * 4096);
        let lb = m.ram_block_of(lo).unwrap();
        let hb = m.ram_block_of(hi).unwrap();
        assert_eq!(m.ramblocks.dirty_pages(lb), 1);
        assert_eq!(m.ramblocks.take_dirty(lb)[15], 1 << 63);
        assert_eq!(m.ramblocks.take_dirty(hb)[0], 1);
    }

    #[test]
    fn destroy_unmaps_frees_the_block_and_detaches_children() {
        let mut m = MemorySystem::new();
        let sys = m.system_memory();
        let c = m.new_container("c", 0x100000);
        let ram = m.new_ram_anonymous("r", 0x10000).unwrap();
        m.add_subregion(c, 0, ram, None).unwrap();
        m.add_subregion(sys, 0, c, None).unwrap();
        assert_eq!(m.memory_view().ranges.len(), 1);
        m.destroy_region(c).unwrap();
        assert!(m.memory_view().ranges.is_empty());
        assert_eq!(m.get(ram).unwrap().parent, None);
        m.destroy_region(ram).unwrap();
        assert!(m.ramblocks.is_empty());
    }

    #[test]
    fn destroyed_ram_stays_mapped_until_the_commit_told_listeners() {
        let mut m = MemorySystem::new();
        let r = m.new_ram_anonymous("r", 0x10000).unwrap();
        m.add_subregion(m.system_memory(), 0, r, None).unwrap();
        let mapping = Arc::downgrade(&m.ramblocks.get(m.ram_block_of(r).unwrap()).unwrap().mapping);
        m.transaction_begin();
        m.destroy_region(r).unwrap();
        assert!(m.ramblocks.is_empty());
        assert!(mapping.upgrade().is_some());
        m.transaction_commit().unwrap();
        assert!(mapping.upgrade().is_none());
    }

    #[test]
    fn readonly_ram_is_rom_in_view_and_block() {
        let mut m = MemorySystem::new();
        let r = m.new_ram_anonymous("bios", 0x10000).unwrap();
        m.add_subregion(m.system_memory(), 0, r, None).unwrap();
        m.set_readonly(r, true).unwrap();
        assert!(m.memory_view().ranges[0].readonly);
        let b = m.ram_block_of(r).unwrap();
        assert!(m.ramblocks.get(b).unwrap().readonly);
        let s = m.section(&m.memory_view().ranges[0]);
        assert!(s.ram.unwrap().readonly);
    }

    #[test]
    fn ram_region_lengths_are_page_aligned_but_region_keeps_its_size() {
        let mut m = MemorySystem::new();
        let r = m.new_ram_anonymous("rsdp", 36).unwrap();
        assert_eq!(m.region_size(r).unwrap(), 36);
        let b = m.ramblocks.get(m.ram_block_of(r).unwrap()).unwrap();
        assert_eq!(b.used_length, crate::hostmap::host_page_size() as u64);
        assert!(m.new_ram_anonymous("zero", 0).is_err());
    }

    /// A listener that keeps what it was told as a map; a del of something it does not hold,
    /// or an add over something it holds, is recorded as a protocol error.
    /// Sections held by gpa, and protocol errors.
    type MirrorState = (std::collections::BTreeMap<u64, MemorySection>, Vec<String>);

    struct Mirror(Arc<Mutex<MirrorState>>);

    impl MemoryListener for Mirror {
        fn name(&self) -> &str {
            "mirror"
        }
        fn region_del(&mut self, s: &MemorySection) -> Result<()> {
            let mut g = self.0.lock().unwrap();
            if g.0.remove(&s.gpa).as_ref() != Some(s) {
                g.1.push(format!("del of unknown {s:?}"));
            }
            Ok(())
        }
        fn region_add(&mut self, s: &MemorySection) -> Result<()> {
            let mut g = self.0.lock().unwrap();
            if let Some(old) = g.0.insert(s.gpa, s.clone()) {
                g.1.push(format!("add over {old:?}"));
            }
            Ok(())
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        NewRam(u8),
        NewIo(u8),
        NewContainer(u8),
        NewAlias(usize, u8, u8),
        Add(usize, usize, u8, i8),
        Del(usize),
        Enable(usize, bool),
        Move(usize, u8),
        AliasOffset(usize, u8),
        Readonly(usize, bool),
        Destroy(usize),
        Begin,
        Commit,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (1u8..8).prop_map(Op::NewRam),
            (1u8..8).prop_map(Op::NewIo),
            (1u8..16).prop_map(Op::NewContainer),
            (any::<usize>(), 0u8..8, 1u8..8).prop_map(|(t, o, s)| Op::NewAlias(t, o, s)),
            (any::<usize>(), any::<usize>(), 0u8..16, -2i8..3)
                .prop_map(|(p, c, a, pr)| Op::Add(p, c, a, pr)),
            any::<usize>().prop_map(Op::Del),
            (any::<usize>(), any::<bool>()).prop_map(|(r, e)| Op::Enable(r, e)),
            (any::<usize>(), 0u8..16).prop_map(|(r, a)| Op::Move(r, a)),
            (any::<usize>(), 0u8..8).prop_map(|(r, o)| Op::AliasOffset(r, o)),
            (any::<usize>(), prop::bool::weighted(0.3)).prop_map(|(r, ro)| Op::Readonly(r, ro)),
            any::<usize>().prop_map(Op::Destroy),
            Just(Op::Begin),
            Just(Op::Commit),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Whatever the sequence of operations (errors included), a listener that applies
        /// every del/add it is told ends each outermost commit holding exactly the current view.
        #[test]
        fn listeners_track_the_view_through_any_operations(
            ops in proptest::collection::vec(op(), 1..40)
        ) {
            const P: u64 = 0x1000;
            let mut m = MemorySystem::new();
            let state = Arc::new(Mutex::new(Default::default()));
            m.add_listener(Box::new(Mirror(state.clone()))).unwrap();
            let mut ids = vec![m.system_memory(), m.system_io()];
            let pick = |ids: &Vec<RegionId>, i: usize| ids[i % ids.len()];
            for op in ops {
                let _ = match op {
                    Op::NewRam(s) => m.new_ram_anonymous("ram", u64::from(s) * P).map(|r| ids.push(r)),
                    Op::NewIo(s) => {
                        ids.push(m.new_io("io", u128::from(s) * u128::from(P)));
                        Ok(())
                    }
                    Op::NewContainer(s) => {
                        ids.push(m.new_container("c", u128::from(s) * u128::from(P)));
                        Ok(())
                    }
                    Op::NewAlias(t, o, s) => m
                        .new_alias("a", pick(&ids, t), u64::from(o) * P, u64::from(s) * P)
                        .map(|r| ids.push(r)),
                    Op::Add(p, c, a, pr) => m.add_subregion(
                        pick(&ids, p),
                        u64::from(a) * P,
                        pick(&ids, c),
                        Some(i32::from(pr)),
                    ),
                    Op::Del(c) => {
                        let c = pick(&ids, c);
                        match m.get(c).ok().and_then(|r| r.parent) {
                            Some(p) => m.del_subregion(p, c),
                            None => Ok(()),
                        }
                    }
                    Op::Enable(r, e) => m.set_enabled(pick(&ids, r), e),
                    Op::Move(r, a) => m.set_address(pick(&ids, r), u64::from(a) * P),
                    Op::AliasOffset(r, o) => m.set_alias_offset(pick(&ids, r), u64::from(o) * P),
                    Op::Readonly(r, ro) => m.set_readonly(pick(&ids, r), ro),
                    Op::Destroy(r) => m.destroy_region(pick(&ids, r)),
                    Op::Begin => {
                        m.transaction_begin();
                        Ok(())
                    }
                    Op::Commit => m.transaction_commit(),
                };
                if m.transaction_depth() == 0 {
                    let g = state.lock().unwrap();
                    proptest::prop_assert!(g.1.is_empty(), "{:?}", g.1);
                    let held: Vec<MemorySection> = g.0.values().cloned().collect();
                    let fresh: Vec<MemorySection> =
                        m.memory_view().ranges.iter().map(|r| m.section(r)).collect();
                    proptest::prop_assert_eq!(&held, &fresh);
                    proptest::prop_assert_eq!(&held, &m.current_sections());
                    // The stored views (patched where a change touched them) are the ones a
                    // fresh render gives.
                    for space in m.address_spaces() {
                        let fresh = flatview::render(&m, flatview::flatview_root(&m, space.root));
                        proptest::prop_assert_eq!(&fresh, &space.view, "{}", space.name);
                    }
                }
            }
        }
    }
}
