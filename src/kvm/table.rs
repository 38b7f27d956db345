//! The memslot table of one VM: which slot numbers hold which piece of which RAMBlock, the
//! `KVM_SET_USER_MEMORY_REGION` calls that keep the kernel in step, and the dirty log.
//!
//! The ioctls go through [`SlotIoctls`] so that the bookkeeping (slot reuse, budget, rollback,
//! dirty folding) is tested without a VM; the VM's [`kvm_ioctls::VmFd`] is the real one.

use std::sync::{Arc, Mutex, MutexGuard};

use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};

use super::error::KvmError;
use crate::hostmap::HostMapping;

type Result<T> = std::result::Result<T, KvmError>;
use crate::listener::MemorySection;
use crate::ramblock::{for_each_set_run, RamBlockId, RamBlockRegistry, DIRTY_PAGE_SIZE};

use super::cost::Preflight;
use super::slots::{self, SlotRange};

/// The VM ioctls a slot table needs. Errors are errno values.
pub trait SlotIoctls: Send + Sync {
    /// `KVM_SET_USER_MEMORY_REGION`; `size == 0` deletes the slot.
    fn set_user_memory_region(
        &self,
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        hva: u64,
    ) -> std::result::Result<(), i32>;
    /// `KVM_GET_DIRTY_LOG`: one bit per host page of the slot; it also clears the kernel's log
    /// (and write-protects the pages again) unless manual protection is on.
    fn get_dirty_log(&self, slot: u32, size: u64) -> std::result::Result<Vec<u64>, i32>;
    /// `KVM_CLEAR_DIRTY_LOG` (manual protection only): clears, and write-protects again, the
    /// pages of `bitmap` (bit i = page `first_page + i`; `num_pages` of them).
    fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> std::result::Result<(), i32>;
}

/// Pages one `KVM_CLEAR_DIRTY_LOG` covers: 1 GiB of 4 KiB pages, as QEMU's clear bitmap does
/// by default. A chunk with no dirty bit costs nothing; the kernel holds its MMU lock for one
/// chunk at a time, never for a whole 1 TiB slot.
/// cbindgen:ignore
pub const CLEAR_CHUNK_PAGES: u64 = 1 << 18;

impl SlotIoctls for kvm_ioctls::VmFd {
    fn set_user_memory_region(
        &self,
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        hva: u64,
    ) -> std::result::Result<(), i32> {
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
        };
        // SAFETY: the only caller is SlotTable, which passes either size 0 (delete) or the
        // `hva..hva+size` of a RAM section it keeps in a `Slot` together with the section's
        // `Arc<HostMapping>`; the slot is deleted from the kernel before that Arc is dropped
        // (remove_slot, and SlotTable's Drop), so the range stays mapped for as long as the
        // kernel may access it.
        unsafe { kvm_ioctls::VmFd::set_user_memory_region(self, region) }.map_err(|e| e.errno())
    }

    fn get_dirty_log(&self, slot: u32, size: u64) -> std::result::Result<Vec<u64>, i32> {
        kvm_ioctls::VmFd::get_dirty_log(self, slot, size as usize).map_err(|e| e.errno())
    }

    fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> std::result::Result<(), i32> {
        const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;
        if bitmap.len() as u64 * 64 < u64::from(num_pages) {
            return Err(libc::EINVAL);
        }
        let mut log = kvm_bindings::kvm_clear_dirty_log {
            slot,
            num_pages,
            first_page,
            ..Default::default()
        };
        log.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr() as *mut libc::c_void;
        // SAFETY: the VM's fd and a kvm_clear_dirty_log whose bitmap holds at least num_pages
        // bits (checked above) and outlives the call; the kernel only reads it.
        let r = unsafe { libc::ioctl(self.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &mut log) };
        if r < 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        Ok(())
    }
}

/// Locks a slot table; a panic while it was held (reported at the ABI) does not poison it for
/// good, since every table operation leaves the table matching the kernel.
pub fn lock(t: &Arc<Mutex<SlotTable>>) -> MutexGuard<'_, SlotTable> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// One registered memslot.
#[derive(Clone, Debug)]
pub struct Slot {
    /// KVM slot number (address space 0).
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub hva: u64,
    /// `KVM_MEM_*` flags as last given to the kernel.
    pub flags: u32,
    pub block: RamBlockId,
    pub block_offset: u64,
    /// The leaf region the section came from (for dumps).
    pub region_name: String,
    pub readonly: bool,
    /// The memory `hva` points into: held as long as the slot exists, so the kernel never maps
    /// guest-physical addresses onto memory that was unmapped (or reused by another mapping),
    /// whatever order the VMM frees its machine, its regions and its VM clones in.
    pub mapping: Arc<HostMapping>,
}

impl Slot {
    /// Whether the kernel logs dirty pages of this slot.
    pub fn logs_dirty_pages(&self) -> bool {
        self.flags & KVM_MEM_LOG_DIRTY_PAGES != 0
    }
}

/// Dirty bits fetched from a slot: from one that went away (removed, or logging switched off)
/// before the next sync could fold them, kept so that no write is lost; or by the latest sync,
/// kept for [`SlotTable::last_dirty`].
#[derive(Debug)]
struct PendingDirty {
    block: RamBlockId,
    block_offset: u64,
    gpa: u64,
    bitmap: Vec<u64>,
}

/// The slot table of one VM.
pub struct SlotTable {
    ioctls: Arc<dyn SlotIoctls>,
    nr_slots: u32,
    max_slot_size: Option<u64>,
    host_page: u64,
    slots: Vec<Option<Slot>>,
    /// Slot numbers the VMM uses for memory of its own (a framebuffer, a device BAR), in the
    /// same VM: never given to hostmem's slots.
    reserved: std::collections::BTreeSet<u32>,
    dirty_logging: bool,
    pending: Vec<PendingDirty>,
    /// The bitmaps the latest sync fetched, for [`SlotTable::last_dirty`].
    last_sync: Vec<PendingDirty>,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is on: fetching leaves the log as it is, and the
    /// table clears what it fetched with KVM_CLEAR_DIRTY_LOG in chunks.
    manual_protect: bool,
    /// Refuses slots the host cannot afford before they are registered (None: off).
    preflight: Option<Preflight>,
}

/// The dirty pages found by one sync, as guest-physical page addresses.
pub type DirtyGpas = Vec<u64>;

impl SlotTable {
    /// `nr_slots` is the budget the kernel reported (`KVM_CAP_NR_MEMSLOTS`); `max_slot_size`
    /// `None` means the kernel's limit.
    pub fn new(
        ioctls: Arc<dyn SlotIoctls>,
        nr_slots: u32,
        max_slot_size: Option<u64>,
        host_page: u64,
    ) -> Self {
        SlotTable {
            ioctls,
            nr_slots,
            max_slot_size,
            host_page,
            slots: Vec::new(),
            reserved: Default::default(),
            dirty_logging: false,
            pending: Vec::new(),
            last_sync: Vec::new(),
            manual_protect: false,
            preflight: None,
        }
    }

    /// Says that the VM has manual dirty-log protection on (`KvmAccel::open` enabled it):
    /// from now on every fetched log is cleared in [`CLEAR_CHUNK_PAGES`] chunks.
    pub fn set_manual_protect(&mut self, on: bool) {
        self.manual_protect = on;
    }

    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// Checks new slots (and dirty logging) against the host's memory from now on.
    pub fn set_preflight(&mut self, preflight: Option<Preflight>) {
        self.preflight = preflight;
    }

    pub fn preflight(&self) -> Option<&Preflight> {
        self.preflight.as_ref()
    }

    /// The slots `sections` would add, as (size, logs dirty pages), for the preflight.
    pub fn planned_slots(&self, sections: &[MemorySection]) -> Result<Vec<(u64, bool)>> {
        let mut out = Vec::new();
        for s in sections {
            let Some(ram) = &s.ram else { continue };
            let logging = self.flags_for(ram.readonly) & KVM_MEM_LOG_DIRTY_PAGES != 0;
            out.extend(self.pieces(s)?.into_iter().map(|p| (p.size, logging)));
        }
        Ok(out)
    }

    pub fn nr_slots(&self) -> u32 {
        self.nr_slots
    }

    pub fn max_slot_size(&self) -> Option<u64> {
        self.max_slot_size
    }

    pub fn host_page(&self) -> u64 {
        self.host_page
    }

    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// The slots in use, by slot number.
    pub fn slots(&self) -> Vec<Slot> {
        self.slots.iter().flatten().cloned().collect()
    }

    pub fn used(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// The slot holding guest-physical address `gpa`.
    pub fn lookup(&self, gpa: u64) -> Option<&Slot> {
        self.slots
            .iter()
            .flatten()
            .find(|s| gpa >= s.gpa && gpa - s.gpa < s.size)
    }

    /// Whether KVM maps the guest range `[gpa, gpa+size)` of a flat view (QEMU's
    /// `kvm_accel_has_memory`, which `info mtree -f` marks with " KVM"): the first slot the
    /// range's split would produce is registered.
    pub fn has_memory(&self, gpa: u64, size: u64) -> bool {
        let probe = SlotRange {
            gpa,
            size,
            hva: 0,
            block_offset: 0,
        };
        let Some(aligned) = slots::align_section(probe, self.host_page) else {
            return false;
        };
        self.slots
            .iter()
            .flatten()
            .any(|s| s.gpa == aligned.gpa && s.size <= aligned.size)
    }

    /// The walk every operation on a section uses (add, remove): its slots in order.
    fn pieces(&self, section: &MemorySection) -> Result<Vec<SlotRange>> {
        let Some(ram) = &section.ram else {
            return Ok(Vec::new());
        };
        let max = slots::effective_max_slot_size(self.max_slot_size, self.host_page, ram.page_size)
            .map_err(|e| match e {
                KvmError::SlotSizeBelowPage {
                    configured, page, ..
                } => KvmError::SlotSizeBelowPage {
                    region: section.region_name.clone(),
                    configured,
                    page,
                },
                other => other,
            })?;
        Ok(slots::split_section(
            SlotRange {
                gpa: section.gpa,
                size: section.size,
                hva: ram.host_addr as u64,
                block_offset: ram.block_offset,
            },
            self.host_page,
            max,
        ))
    }

    fn flags_for(&self, readonly: bool) -> u32 {
        if readonly {
            // A guest cannot write a read-only slot, so there is nothing to log.
            KVM_MEM_READONLY
        } else if self.dirty_logging {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        }
    }

    fn alloc_slot(&self) -> Result<u32> {
        (0..self.nr_slots)
            .find(|&n| !self.is_taken(n))
            .ok_or(KvmError::NoFreeSlot {
                nr_slots: self.nr_slots,
            })
    }

    fn is_taken(&self, n: u32) -> bool {
        self.reserved.contains(&n) || matches!(self.slots.get(n as usize), Some(Some(_)))
    }

    /// Sets slot number `n` aside for the VMM's own use.
    pub fn reserve(&mut self, n: u32) -> Result<()> {
        if n >= self.nr_slots {
            return Err(KvmError::SlotNotReservable {
                slot: n,
                why: "beyond the VM's slot budget",
            });
        }
        if self.reserved.contains(&n) {
            return Err(KvmError::SlotNotReservable {
                slot: n,
                why: "already reserved for the VMM",
            });
        }
        if self.is_taken(n) {
            return Err(KvmError::SlotNotReservable {
                slot: n,
                why: "in use by hostmem",
            });
        }
        self.reserved.insert(n);
        Ok(())
    }

    /// A free slot number, set aside for the VMM's own use.
    pub fn reserve_any(&mut self) -> Result<u32> {
        let n = self.alloc_slot()?;
        self.reserved.insert(n);
        Ok(n)
    }

    /// Gives a number set aside by [`Self::reserve`] back; whether it was reserved.
    pub fn release(&mut self, n: u32) -> bool {
        self.reserved.remove(&n)
    }

    pub fn reserved(&self) -> impl Iterator<Item = u32> + '_ {
        self.reserved.iter().copied()
    }

    fn ioctl(&self, slot: u32, flags: u32, gpa: u64, size: u64, hva: u64) -> Result<()> {
        self.ioctls
            .set_user_memory_region(slot, flags, gpa, size, hva)
            .map_err(|errno| KvmError::SetMemoryRegion {
                slot,
                gpa,
                size,
                errno,
            })
    }

    /// Registers the slots of a RAM section (I/O sections have none). On failure the slots this
    /// call registered are removed again, so the table and the kernel agree.
    pub fn add_section(&mut self, section: &MemorySection) -> Result<()> {
        let Some(ram) = &section.ram else {
            return Ok(());
        };
        let pieces = self.pieces(section)?;
        let flags = self.flags_for(ram.readonly);
        if let Some(p) = &self.preflight {
            let logging = flags & KVM_MEM_LOG_DIRTY_PAGES != 0;
            p.check(&pieces.iter().map(|p| (p.size, logging)).collect::<Vec<_>>())?;
        }
        let mut added = Vec::new();
        for p in pieces {
            let res = self
                .alloc_slot()
                .and_then(|slot| self.ioctl(slot, flags, p.gpa, p.size, p.hva).map(|_| slot));
            let slot = match res {
                Ok(slot) => slot,
                Err(e) => {
                    for slot in added {
                        // Best effort: the first error is the one worth reporting.
                        let _ = self.remove_slot(slot);
                    }
                    return Err(e);
                }
            };
            let entry = Slot {
                slot,
                gpa: p.gpa,
                size: p.size,
                hva: p.hva,
                flags,
                block: ram.block,
                block_offset: p.block_offset,
                region_name: section.region_name.clone(),
                readonly: ram.readonly,
                mapping: ram.mapping.clone(),
            };
            let i = slot as usize;
            // Numbers the VMM reserved leave gaps below a new slot.
            if i >= self.slots.len() {
                self.slots.resize_with(i + 1, || None);
            }
            self.slots[i] = Some(entry);
            added.push(slot);
        }
        Ok(())
    }

    /// Removes the slots of a section, walking the same split as [`Self::add_section`]. Dirty
    /// bits the slot still holds are kept for the next sync. A piece with no matching slot is
    /// skipped, as QEMU does (the section never got one, e.g. it was smaller than a page).
    pub fn remove_section(&mut self, section: &MemorySection) -> Result<()> {
        for p in self.pieces(section)? {
            let found = self
                .slots
                .iter()
                .flatten()
                .find(|s| s.gpa == p.gpa && s.size == p.size)
                .map(|s| s.slot);
            if let Some(slot) = found {
                self.remove_slot(slot)?;
            }
        }
        Ok(())
    }

    fn remove_slot(&mut self, slot: u32) -> Result<()> {
        let s = self.slots[slot as usize]
            .clone()
            .expect("remove_slot is called for slots in use");
        if s.flags & KVM_MEM_LOG_DIRTY_PAGES != 0 {
            self.stash_dirty(&s)?;
        }
        self.ioctl(slot, 0, s.gpa, 0, s.hva)?;
        self.slots[slot as usize] = None;
        while matches!(self.slots.last(), Some(None)) {
            self.slots.pop();
        }
        Ok(())
    }

    /// The slot's dirty log, cleared in the kernel (by the fetch itself, or chunk by chunk
    /// where a chunk has a dirty bit when protection is manual).
    fn fetch_dirty(&self, s: &Slot) -> Result<Vec<u64>> {
        let bitmap =
            self.ioctls
                .get_dirty_log(s.slot, s.size)
                .map_err(|errno| KvmError::GetDirtyLog {
                    slot: s.slot,
                    gpa: s.gpa,
                    size: s.size,
                    errno,
                })?;
        if self.manual_protect {
            let pages = s.size / self.host_page;
            let words = (CLEAR_CHUNK_PAGES / 64) as usize;
            for (i, chunk) in bitmap.chunks(words).enumerate() {
                if chunk.iter().all(|w| *w == 0) {
                    continue;
                }
                let first = i as u64 * CLEAR_CHUNK_PAGES;
                let n = CLEAR_CHUNK_PAGES.min(pages - first) as u32;
                self.ioctls
                    .clear_dirty_log(s.slot, first, n, chunk)
                    .map_err(|errno| KvmError::ClearDirtyLog {
                        slot: s.slot,
                        gpa: s.gpa + first * self.host_page,
                        pages: n,
                        errno,
                    })?;
            }
        }
        Ok(bitmap)
    }

    fn stash_dirty(&mut self, s: &Slot) -> Result<()> {
        let bitmap = self.fetch_dirty(s)?;
        if bitmap.iter().any(|w| *w != 0) {
            self.pending.push(PendingDirty {
                block: s.block,
                block_offset: s.block_offset,
                gpa: s.gpa,
                bitmap,
            });
        }
        Ok(())
    }

    fn set_flags(&mut self, slot: u32, flags: u32) -> Result<()> {
        let s = self.slots[slot as usize].clone().expect("slot in use");
        if s.flags == flags {
            return Ok(());
        }
        if s.flags & KVM_MEM_LOG_DIRTY_PAGES != 0 {
            self.stash_dirty(&s)?;
        }
        self.ioctl(slot, flags, s.gpa, s.size, s.hva)?;
        if let Some(e) = self.slots[slot as usize].as_mut() {
            e.flags = flags;
        }
        Ok(())
    }

    fn slot_numbers(&self) -> Vec<u32> {
        self.slots.iter().flatten().map(|s| s.slot).collect()
    }

    /// Switches dirty logging on for every writable slot, now and for slots added later
    /// (QEMU's `log_global_start`). The guest may be running.
    pub fn log_start(&mut self) -> Result<()> {
        self.set_logging(true)
    }

    /// Switches dirty logging off; bits logged so far are kept for the next sync.
    pub fn log_stop(&mut self) -> Result<()> {
        self.set_logging(false)
    }

    /// Re-registers every slot with the flags that logging `on` asks for.
    fn set_logging(&mut self, on: bool) -> Result<()> {
        if let (true, false, Some(p)) = (on, self.dirty_logging, &self.preflight) {
            let sizes: Vec<u64> = self
                .slots
                .iter()
                .flatten()
                .filter(|s| !s.readonly)
                .map(|s| s.size)
                .collect();
            p.check_logging(sizes.iter().sum(), &sizes)?;
        }
        self.dirty_logging = on;
        for slot in self.slot_numbers() {
            let readonly = self.slots[slot as usize]
                .as_ref()
                .is_some_and(|s| s.readonly);
            self.set_flags(slot, self.flags_for(readonly))?;
        }
        Ok(())
    }

    /// Fetches every logging slot's dirty log (which clears it in the kernel) and folds it into
    /// the RAMBlocks' dirty bitmaps a word at a time (zero words cost a test each). Returns the
    /// number of dirty host pages found; [`Self::last_dirty`] lists them when asked.
    pub fn log_sync(&mut self, ramblocks: &mut RamBlockRegistry) -> Result<u64> {
        let batches = self.fetch_all()?;
        let page = self.host_page;
        for b in &batches {
            if page == DIRTY_PAGE_SIZE && b.block_offset % page == 0 {
                ramblocks.merge_dirty_bitmap(b.block, b.block_offset / page, &b.bitmap);
            } else {
                for_each_set_run(&b.bitmap, |first, count| {
                    ramblocks.set_dirty(b.block, b.block_offset + first * page, count * page)
                });
            }
        }
        Ok(self.keep_last(batches))
    }

    /// [`Self::log_sync`] with the folding step given by the caller (`mark(block, offset, len)`
    /// for each run of dirty pages). Returns the guest-physical addresses of the dirty pages.
    pub fn log_sync_with(
        &mut self,
        mark: &mut dyn FnMut(RamBlockId, u64, u64),
    ) -> Result<DirtyGpas> {
        let batches = self.fetch_all()?;
        let page = self.host_page;
        for b in &batches {
            for_each_set_run(&b.bitmap, |first, count| {
                mark(b.block, b.block_offset + first * page, count * page);
            });
        }
        self.keep_last(batches);
        Ok(self.last_dirty())
    }

    /// The dirty logs of every logging slot, and those kept from slots that changed since the
    /// previous sync. On an error nothing is lost: what was fetched waits for the next sync.
    fn fetch_all(&mut self) -> Result<Vec<PendingDirty>> {
        let mut batches = std::mem::take(&mut self.pending);
        for s in self.slots.iter().flatten() {
            if s.flags & KVM_MEM_LOG_DIRTY_PAGES != 0 {
                match self.fetch_dirty(s) {
                    Ok(bitmap) => batches.push(PendingDirty {
                        block: s.block,
                        block_offset: s.block_offset,
                        gpa: s.gpa,
                        bitmap,
                    }),
                    Err(e) => {
                        self.pending = batches;
                        return Err(e);
                    }
                }
            }
        }
        Ok(batches)
    }

    /// Keeps a sync's bitmaps for [`Self::last_dirty`] (the list of pages is built only when
    /// asked for) and returns how many pages they mark.
    fn keep_last(&mut self, mut batches: Vec<PendingDirty>) -> u64 {
        // A clean 1 TiB slot's bitmap is 32 MiB: keep only those with a dirty page.
        batches.retain(|b| b.bitmap.iter().any(|w| *w != 0));
        self.last_sync = batches;
        self.last_sync
            .iter()
            .flat_map(|b| &b.bitmap)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The guest-physical pages the latest sync found dirty (dirtied between the two latest
    /// syncs), sorted.
    pub fn last_dirty(&self) -> DirtyGpas {
        let page = self.host_page;
        let mut gpas = Vec::new();
        for b in &self.last_sync {
            for_each_set_run(&b.bitmap, |first, count| {
                gpas.extend((first..first + count).map(|i| b.gpa + i * page));
            });
        }
        gpas.sort_unstable();
        gpas.dedup();
        gpas
    }
}

/// The last user of the table lets go: its slots leave the kernel before their memory may be
/// unmapped. The VM itself may outlive the table in the kernel (a vCPU fd keeps it), so closing
/// the VM fd is not enough to say the slots are gone.
impl Drop for SlotTable {
    fn drop(&mut self) {
        for s in self.slots.iter().flatten() {
            // Best effort: a refusal here leaves a slot on memory that nothing else maps, and
            // no vCPU of this VM can run any more.
            let _ = self
                .ioctls
                .set_user_memory_region(s.slot, 0, s.gpa, 0, s.hva);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::RamSection;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    const GIB: u64 = 1 << 30;

    /// A kernel stand-in: records the slots it holds, fails on request, and serves dirty logs.
    #[derive(Default)]
    struct FakeVm {
        regions: Mutex<BTreeMap<u32, (u32, u64, u64, u64)>>,
        calls: Mutex<Vec<(u32, u32, u64, u64)>>,
        fail_gpa: Mutex<Option<(u64, i32)>>,
        dirty: Mutex<BTreeMap<u32, Vec<u64>>>,
        /// Manual protection: fetching keeps the log, clears are recorded (slot, first, n).
        manual: std::sync::atomic::AtomicBool,
        clears: Mutex<Vec<(u32, u64, u32)>>,
    }

    impl SlotIoctls for FakeVm {
        fn set_user_memory_region(
            &self,
            slot: u32,
            flags: u32,
            gpa: u64,
            size: u64,
            hva: u64,
        ) -> std::result::Result<(), i32> {
            self.calls.lock().unwrap().push((slot, flags, gpa, size));
            if let Some((g, errno)) = *self.fail_gpa.lock().unwrap() {
                if g == gpa && size != 0 {
                    return Err(errno);
                }
            }
            let mut r = self.regions.lock().unwrap();
            if size == 0 {
                r.remove(&slot);
            } else {
                r.insert(slot, (flags, gpa, size, hva));
            }
            Ok(())
        }
        fn get_dirty_log(&self, slot: u32, size: u64) -> std::result::Result<Vec<u64>, i32> {
            let words = (size / 4096).div_ceil(64) as usize;
            let mut dirty = self.dirty.lock().unwrap();
            let mut v = if self.manual.load(std::sync::atomic::Ordering::Relaxed) {
                dirty.get(&slot).cloned().unwrap_or_default()
            } else {
                dirty.remove(&slot).unwrap_or_default()
            };
            v.resize(words, 0);
            Ok(v)
        }
        fn clear_dirty_log(
            &self,
            slot: u32,
            first_page: u64,
            num_pages: u32,
            bitmap: &[u64],
        ) -> std::result::Result<(), i32> {
            assert!(self.manual.load(std::sync::atomic::Ordering::Relaxed));
            assert_eq!(first_page % 64, 0, "KVM wants 64-page aligned clears");
            self.clears
                .lock()
                .unwrap()
                .push((slot, first_page, num_pages));
            if let Some(v) = self.dirty.lock().unwrap().get_mut(&slot) {
                for (i, w) in bitmap.iter().enumerate() {
                    if let Some(k) = v.get_mut(first_page as usize / 64 + i) {
                        *k &= !w;
                    }
                }
            }
            Ok(())
        }
    }

    fn ram(gpa: u64, size: u64, hva: usize, block: u32, off: u64) -> MemorySection {
        MemorySection {
            gpa,
            size,
            region_name: "pc.ram".into(),
            ram: Some(RamSection {
                host_addr: hva,
                mapping: any_mapping(),
                block: RamBlockId(block),
                block_offset: off,
                page_size: 4096,
                readonly: false,
            }),
        }
    }

    /// The table keeps a section's mapping alive but never touches its bytes, so one small
    /// real mapping stands in for the memory of every fake section.
    fn any_mapping() -> Arc<HostMapping> {
        static M: std::sync::OnceLock<Arc<HostMapping>> = std::sync::OnceLock::new();
        M.get_or_init(|| {
            Arc::new(crate::hostmap::map_anonymous("fake", 4096, false, true).unwrap())
        })
        .clone()
    }

    fn table(nr: u32, max: Option<u64>) -> (Arc<FakeVm>, SlotTable) {
        let vm = Arc::new(FakeVm::default());
        let t = SlotTable::new(vm.clone(), nr, max, 4096);
        (vm, t)
    }

    #[test]
    fn sections_become_split_slots_in_the_kernel() {
        let (vm, mut t) = table(32, Some(GIB));
        t.add_section(&ram(4 * GIB, 3 * GIB, 0x7000_0000_0000, 0, 3 * GIB))
            .unwrap();
        let r = vm.regions.lock().unwrap().clone();
        assert_eq!(
            r.into_iter().collect::<Vec<_>>(),
            vec![
                (0, (0, 4 * GIB, GIB, 0x7000_0000_0000)),
                (1, (0, 5 * GIB, GIB, 0x7000_4000_0000)),
                (2, (0, 6 * GIB, GIB, 0x7000_8000_0000)),
            ]
        );
        let s = t.slots();
        assert_eq!(s[2].block_offset, 5 * GIB);
        assert_eq!(t.lookup(6 * GIB + 5).unwrap().slot, 2);
        assert!(t.lookup(7 * GIB).is_none());
    }

    #[test]
    fn numbers_the_vmm_reserved_are_never_hostmems() {
        let (vm, mut t) = table(5, Some(GIB));
        t.reserve(0).unwrap();
        t.reserve(2).unwrap();
        t.add_section(&ram(0, 2 * GIB, 0x7000_0000_0000, 0, 0))
            .unwrap();
        let numbers: Vec<u32> = vm.regions.lock().unwrap().keys().copied().collect();
        assert_eq!(numbers, vec![1, 3]);
        assert_eq!(
            t.slots().iter().map(|s| s.slot).collect::<Vec<_>>(),
            vec![1, 3]
        );
        // The VMM's numbers count against the budget: one left.
        assert_eq!(t.reserve_any().unwrap(), 4);
        let e = t
            .add_section(&ram(8 * GIB, GIB, 0x7100_0000_0000, 1, 0))
            .unwrap_err();
        assert_eq!(e, KvmError::NoFreeSlot { nr_slots: 5 });
        let refused = |t: &mut SlotTable, n| t.reserve(n).unwrap_err().to_string();
        assert_eq!(refused(&mut t, 1), "KVM slot 1 is in use by hostmem");
        assert_eq!(
            refused(&mut t, 2),
            "KVM slot 2 is already reserved for the VMM"
        );
        assert_eq!(
            refused(&mut t, 5),
            "KVM slot 5 is beyond the VM's slot budget"
        );
        assert!(t.release(2));
        assert!(!t.release(2));
        t.add_section(&ram(8 * GIB, GIB, 0x7100_0000_0000, 1, 0))
            .unwrap();
        assert_eq!(t.lookup(8 * GIB).unwrap().slot, 2);
        assert_eq!(t.reserved().collect::<Vec<_>>(), vec![0, 4]);
    }

    #[test]
    fn has_memory_answers_for_ranges_whose_first_slot_is_registered() {
        let (_vm, mut t) = table(32, Some(GIB));
        t.add_section(&ram(4 * GIB, 3 * GIB, 0x7000_0000_0000, 0, 0))
            .unwrap();
        assert!(t.has_memory(4 * GIB, 3 * GIB));
        assert!(!t.has_memory(0, 3 * GIB));
        // A range that is not the one registered (starts inside it) is not KVM's.
        assert!(!t.has_memory(4 * GIB + 0x1000, GIB));
        // Sub-page ranges never get a slot.
        assert!(!t.has_memory(4 * GIB, 0x800));
    }

    #[test]
    fn io_sections_get_no_slot() {
        let (vm, mut t) = table(32, None);
        let io = MemorySection {
            gpa: 0xfee0_0000,
            size: 0x1000,
            region_name: "apic".into(),
            ram: None,
        };
        t.add_section(&io).unwrap();
        t.remove_section(&io).unwrap();
        assert!(vm.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn removal_walks_the_same_split_and_frees_the_numbers_for_reuse() {
        let (vm, mut t) = table(32, Some(GIB));
        let low = ram(0, 2 * GIB, 0x1000_0000_0000, 0, 0);
        let high = ram(4 * GIB, GIB, 0x2000_0000_0000, 0, 2 * GIB);
        t.add_section(&low).unwrap();
        t.add_section(&high).unwrap();
        assert_eq!(t.used(), 3);
        t.remove_section(&low).unwrap();
        assert_eq!(
            vm.regions
                .lock()
                .unwrap()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![2]
        );
        // The freed numbers 0 and 1 are taken first.
        t.add_section(&ram(8 * GIB, 2 * GIB, 0x3000_0000_0000, 1, 0))
            .unwrap();
        let nums: Vec<(u32, u64)> = t.slots().iter().map(|s| (s.slot, s.gpa)).collect();
        assert_eq!(nums, vec![(0, 8 * GIB), (1, 9 * GIB), (2, 4 * GIB)]);
    }

    #[test]
    fn the_slot_budget_is_an_error_and_leaves_nothing_half_done() {
        let (vm, mut t) = table(3, Some(GIB));
        t.add_section(&ram(0, GIB, 0x1000_0000_0000, 0, 0)).unwrap();
        let e = crate::Error::from(
            t.add_section(&ram(4 * GIB, 3 * GIB, 0x2000_0000_0000, 0, GIB))
                .unwrap_err(),
        );
        assert_eq!(e.message(), "kvm_alloc_slot: no free slot available");
        assert_eq!(e.class(), crate::HmErrorClass::Kvm);
        assert!(e.hint().unwrap().contains("KVM allows 3 memory slots"));
        assert_eq!(t.used(), 1);
        assert_eq!(vm.regions.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_refused_slot_names_slot_start_size_and_errno_and_is_rolled_back() {
        let (vm, mut t) = table(32, Some(GIB));
        *vm.fail_gpa.lock().unwrap() = Some((5 * GIB, libc::EINVAL));
        let e = crate::Error::from(
            t.add_section(&ram(4 * GIB, 2 * GIB, 0x2000_0000_0000, 0, 0))
                .unwrap_err(),
        );
        assert_eq!(
            e.message(),
            "kvm_set_user_memory_region: KVM_SET_USER_MEMORY_REGION failed, slot=1, \
             start=0x140000000, size=0x40000000: Invalid argument"
        );
        assert_eq!(e.class(), crate::HmErrorClass::Kvm);
        assert_eq!(e.errno(), Some(libc::EINVAL));
        assert_eq!(t.used(), 0);
        assert!(vm.regions.lock().unwrap().is_empty());
    }

    #[test]
    fn readonly_sections_get_the_readonly_flag_and_are_never_logged() {
        let (vm, mut t) = table(32, None);
        let mut rom = ram(0xfffc_0000, 0x4_0000, 0x5000_0000, 3, 0);
        rom.ram.as_mut().unwrap().readonly = true;
        t.add_section(&rom).unwrap();
        t.log_start().unwrap();
        assert_eq!(vm.regions.lock().unwrap()[&0].0, KVM_MEM_READONLY);
    }

    #[test]
    fn log_start_and_stop_reregister_slots_and_new_slots_follow_the_mode() {
        let (vm, mut t) = table(32, None);
        t.add_section(&ram(0, GIB, 0x1000_0000, 0, 0)).unwrap();
        t.log_start().unwrap();
        assert_eq!(vm.regions.lock().unwrap()[&0].0, KVM_MEM_LOG_DIRTY_PAGES);
        t.add_section(&ram(4 * GIB, GIB, 0x9000_0000, 1, 0))
            .unwrap();
        assert_eq!(vm.regions.lock().unwrap()[&1].0, KVM_MEM_LOG_DIRTY_PAGES);
        t.log_stop().unwrap();
        assert!(vm.regions.lock().unwrap().values().all(|r| r.0 == 0));
    }

    /// The real sync folds the kernel's words straight into the RAMBlock bitmap: the pages it
    /// marks, the count it returns and last_dirty must be those of the bits, at their offsets.
    #[test]
    fn sync_merges_bitmap_words_into_the_block_at_the_slot_offset() {
        let mut blocks = RamBlockRegistry::new();
        let mapping = crate::ramblock::map_anonymous("t", 8 * GIB).unwrap();
        let block = blocks.add(mapping, 0, 8 * GIB, 8 * GIB, false).unwrap();
        let (vm, mut t) = table(32, Some(GIB));
        // Two slots: gpa 4 GiB at block offset 3 GiB (slot 0), gpa 5 GiB at 4 GiB (slot 1).
        t.add_section(&ram(4 * GIB, 2 * GIB, 0x1000_0000_0000, block.0, 3 * GIB))
            .unwrap();
        t.log_start().unwrap();
        let words = (GIB / 4096 / 64) as usize;
        let (mut first, mut second) = (vec![0u64; words], vec![0u64; words]);
        first[words - 1] = 1 << 63;
        second[0] = 0b101;
        second[3] = !0;
        vm.dirty.lock().unwrap().insert(0, first);
        vm.dirty.lock().unwrap().insert(1, second);
        assert_eq!(t.log_sync(&mut blocks).unwrap(), 1 + 2 + 64);
        let page = |gib: u64, p: u64| (gib * GIB) / 4096 + p;
        let mut want = vec![page(4, 0) - 1, page(4, 0), page(4, 2)];
        want.extend((0..64).map(|i| page(4, 192 + i)));
        let bitmap = blocks.take_dirty(block);
        let mut got = Vec::new();
        for_each_set_run(&bitmap, |s, n| got.extend(s..s + n));
        assert_eq!(got, want);
        let gpas: Vec<u64> = want.iter().map(|p| (p * 4096) + GIB).collect();
        assert_eq!(t.last_dirty(), gpas);
        // Cleared by the fetch: the next sync finds nothing, and last_dirty says so.
        assert_eq!(t.log_sync(&mut blocks).unwrap(), 0);
        assert!(t.last_dirty().is_empty());
    }

    #[test]
    fn sync_folds_dirty_bits_into_the_right_block_offsets() {
        let (vm, mut t) = table(32, Some(GIB));
        t.add_section(&ram(4 * GIB, 2 * GIB, 0x1000_0000_0000, 7, 3 * GIB))
            .unwrap();
        t.log_start().unwrap();
        // Slot 1 (gpa 5 GiB, block offset 4 GiB): pages 0, 1, 2 and 65.
        let mut bm = vec![0u64; (GIB / 4096 / 64) as usize];
        bm[0] = 0b111;
        bm[1] = 0b10;
        vm.dirty.lock().unwrap().insert(1, bm);
        let mut marks = Vec::new();
        let gpas = t
            .log_sync_with(&mut |b, off, len| marks.push((b, off, len)))
            .unwrap();
        assert_eq!(
            marks,
            vec![
                (RamBlockId(7), 4 * GIB, 3 * 4096),
                (RamBlockId(7), 4 * GIB + 65 * 4096, 4096)
            ]
        );
        assert_eq!(
            gpas,
            vec![5 * GIB, 5 * GIB + 4096, 5 * GIB + 8192, 5 * GIB + 65 * 4096]
        );
        // The kernel's log was cleared by the fetch: a second sync finds nothing.
        let again = t
            .log_sync_with(&mut |_, _, _| panic!("nothing is dirty"))
            .unwrap();
        assert!(again.is_empty());
    }

    #[test]
    fn with_manual_protection_a_sync_clears_only_the_chunks_that_hold_dirty_pages() {
        let (vm, mut t) = table(32, None);
        vm.manual.store(true, std::sync::atomic::Ordering::Relaxed);
        t.set_manual_protect(true);
        // 3.5 GiB: chunks of 1 GiB, the last one half.
        t.add_section(&ram(0, 7 * GIB / 2, 0x1000_0000_0000, 1, 0))
            .unwrap();
        t.log_start().unwrap();
        let words_per_chunk = (CLEAR_CHUNK_PAGES / 64) as usize;
        let mut bm = vec![0u64; (7 * GIB / 2 / 4096 / 64) as usize];
        bm[1] = 1; // page 64, chunk 0
        bm[3 * words_per_chunk + 2] = 1 << 3; // the last, half chunk
        vm.dirty.lock().unwrap().insert(0, bm);
        let gpas = t.log_sync_with(&mut |_, _, _| {}).unwrap();
        assert_eq!(gpas, vec![64 * 4096, 3 * GIB + (128 + 3) * 4096]);
        assert_eq!(
            *vm.clears.lock().unwrap(),
            vec![
                (0, 0, CLEAR_CHUNK_PAGES as u32),
                (0, 3 * CLEAR_CHUNK_PAGES, (CLEAR_CHUNK_PAGES / 2) as u32)
            ]
        );
        // What was cleared is not reported again.
        let again = t
            .log_sync_with(&mut |_, _, _| panic!("nothing is dirty"))
            .unwrap();
        assert!(again.is_empty());
        assert_eq!(
            vm.clears.lock().unwrap().len(),
            2,
            "no chunk without dirty bits"
        );
    }

    #[test]
    fn bits_of_removed_or_unlogged_slots_survive_until_the_next_sync() {
        let (vm, mut t) = table(32, None);
        let s = ram(0, GIB, 0x1000_0000, 2, 0);
        t.add_section(&s).unwrap();
        t.log_start().unwrap();
        vm.dirty.lock().unwrap().insert(0, vec![1 << 5]);
        t.remove_section(&s).unwrap();
        let mut marks = Vec::new();
        t.log_sync_with(&mut |b, off, len| marks.push((b, off, len)))
            .unwrap();
        assert_eq!(marks, vec![(RamBlockId(2), 5 * 4096, 4096)]);

        t.add_section(&s).unwrap();
        vm.dirty.lock().unwrap().insert(0, vec![1 << 9]);
        t.log_stop().unwrap();
        let gpas = t.log_sync_with(&mut |_, _, _| {}).unwrap();
        assert_eq!(gpas, vec![9 * 4096]);
    }
}
