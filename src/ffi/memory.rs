//! `MemoryRegion` for C: caller-provided storage holding a handle into a context's arena, and
//! QEMU's memory API over it.
//!
//! QEMU's memory API is mostly `void`: it aborts on misuse. Here misuse (a NULL or
//! uninitialised region, a stale handle, colliding subregions, a listener such as KVM refusing a
//! change) is printed on stderr and kept as the context's pending error, which
//! `hm_memory_check()` hands over. Where failure is plausible there are `_err` variants taking
//! `Error **errp`.
//!
//! Owners: `Object` / `DeviceState` are opaque; boards usually pass NULL. An owner made with
//! `hm_object_new(path)` gives its path to the region (shown by `info mtree -o`) and, for
//! `vmstate_register_ram`, prefixes the RAMBlock name ("<path>/<name>") as QEMU does with a
//! device's qdev path.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};
use std::sync::{Mutex, OnceLock};

use super::{c_string, guard, guard_report, mut_arg, ref_arg, str_arg};
use crate::error::{Error, HmErrorClass, Result};
use crate::memory::MemorySystem;
use crate::region::{size_from_u64, size_to_u64, RegionId};
use crate::registry::{self, MachineId as ContextId};

/// Storage for a memory region, embedded in board structs as in QEMU. Its content is a handle;
/// boards never read it. A zeroed MemoryRegion is "not initialised" and refused with an error.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryRegion {
    pub magic: u32,
    pub context: u32,
    pub index: u32,
    pub generation: u32,
}

impl MemoryRegion {
    pub(crate) const MAGIC: u32 = 0x686d_6d72; // "hmmr"

    pub fn new(context: ContextId, id: RegionId) -> Self {
        MemoryRegion {
            magic: Self::MAGIC,
            context,
            index: id.index,
            generation: id.generation,
        }
    }

    /// The context and region this storage names, if it was initialised.
    pub fn handle(&self) -> Option<(ContextId, RegionId)> {
        (self.magic == Self::MAGIC).then_some((
            self.context,
            RegionId {
                index: self.index,
                generation: self.generation,
            },
        ))
    }
}

/// An owner for regions: QEMU's `Object` reduced to its path. Opaque to C.
pub struct Object {
    path: CString,
}

/// QEMU passes `DEVICE(obj)` to `vmstate_register_ram`; here a device is just an `Object`.
pub type DeviceState = Object;

impl Object {
    fn path(&self) -> Option<&str> {
        self.path.to_str().ok().filter(|p| !p.is_empty())
    }
}

/// An owner object named `path` (QOM canonical path or qdev path, e.g. "/machine/peripheral/vga"
/// or "0000:00:02.0"). Freed with `hm_object_free`.
///
/// # Safety
/// `path` is NULL or NUL-terminated; `errp` follows the Error convention.
#[no_mangle]
pub unsafe extern "C" fn hm_object_new(path: *const c_char, errp: *mut *mut Error) -> *mut Object {
    guard(errp, std::ptr::null_mut(), || {
        // SAFETY: forwarded caller contract.
        let p = unsafe { str_arg(path, "path") }?;
        let path = CString::new(p).map_err(|_| Error::invalid("Parameter 'path' contains NUL"))?;
        Ok(Box::into_raw(Box::new(Object { path })))
    })
}

/// Frees an owner made by `hm_object_new`. NULL is ignored. Regions keep their copy of the path.
///
/// # Safety
/// `obj` is NULL or from `hm_object_new`, not freed yet.
#[no_mangle]
pub unsafe extern "C" fn hm_object_free(obj: *mut Object) {
    if !obj.is_null() {
        // SAFETY: made by Box::into_raw in hm_object_new and freed once.
        drop(unsafe { Box::from_raw(obj) });
    }
}

/// The owner's path, valid until `hm_object_free`; NULL for NULL.
///
/// # Safety
/// `obj` is NULL or a live `Object`.
#[no_mangle]
pub unsafe extern "C" fn hm_object_get_path(obj: *const Object) -> *const c_char {
    // SAFETY: caller contract.
    match unsafe { obj.as_ref() } {
        Some(o) => o.path.as_ptr(),
        None => std::ptr::null(),
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn not_initialised(arg: &str) -> Error {
    Error::invalid(format!(
        "Parameter '{arg}' is a MemoryRegion that is not initialised (zeroed or destroyed)"
    ))
}

/// Reads the handle out of caller storage.
///
/// # Safety
/// `mr` is NULL or points to readable MemoryRegion storage.
unsafe fn handle(mr: *const MemoryRegion, arg: &str) -> Result<(ContextId, RegionId)> {
    // SAFETY: forwarded caller contract.
    let m = unsafe { ref_arg(mr, arg) }?;
    m.handle().ok_or_else(|| not_initialised(arg))
}

/// Runs `f` on the memory system of machine `ctx`. Never calls C while the lock is held.
fn with_memory<R>(ctx: ContextId, f: impl FnOnce(&mut MemorySystem) -> Result<R>) -> Result<R> {
    registry::with(ctx, |m| f(m.memory_mut()))
}

/// Owner path of an optional owner.
///
/// # Safety
/// `owner` is NULL or a live `Object`.
unsafe fn owner_path(owner: *const Object) -> Option<String> {
    // SAFETY: caller contract.
    unsafe { owner.as_ref() }
        .and_then(Object::path)
        .map(str::to_string)
}

/// The first error a `void` export hit on each machine (QEMU would have aborted), until
/// `hm_memory_check` or the machine's construction takes it: C calling convention, not memory
/// state, so it lives here.
fn pending_errors() -> std::sync::MutexGuard<'static, HashMap<ContextId, Error>> {
    static PENDING: OnceLock<Mutex<HashMap<ContextId, Error>>> = OnceLock::new();
    PENDING
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Remembers `e` as the pending error of `ctx` (or of the current machine when `ctx` is unknown
/// or gone), unless one is already pending: as with `Error **errp`, the first error wins.
fn remember(ctx: Option<ContextId>, e: Error) {
    let id = ctx
        .filter(|&id| registry::exists(id))
        .unwrap_or_else(registry::current_id);
    pending_errors().entry(id).or_insert(e);
}

/// Takes the pending error of machine `id`, if any.
pub(crate) fn take_pending_error(id: ContextId) -> Option<Error> {
    pending_errors().remove(&id)
}

/// Drops what this file keeps for a machine that is gone (its pending error, the region names
/// handed out); the two root regions' storage stays, as C may keep those pointers forever.
pub(crate) fn forget_machine(id: ContextId) {
    pending_errors().remove(&id);
    names()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(ctx, _), _| *ctx != id);
}

/// The frame of every `void` export: errors and panics are printed and remembered. `f` sets
/// `ctx` as soon as it knows which context the call is about.
pub(crate) fn void_export(f: impl FnOnce(&mut Option<ContextId>) -> Result<()>) {
    let mut ctx = None;
    let mut failure = None;
    let ok = guard_report(false, || match f(&mut ctx) {
        Ok(()) => Ok(true),
        Err(e) => {
            failure = Some(e.clone());
            Err(e)
        }
    });
    if !ok {
        remember(
            ctx,
            failure.unwrap_or_else(|| Error::generic("hostmem internal error in the memory API")),
        );
    }
}

/// Refuses to overwrite storage that still names a live region (QEMU would leak it silently).
fn check_free_storage(mr: &MemoryRegion) -> Result<()> {
    if let Some((ctx, id)) = mr.handle() {
        let live = registry::with(ctx, |m| Ok(m.memory().get(id)?.name.clone())).ok();
        if let Some(name) = live {
            return Err(Error::new(
                HmErrorClass::InUse,
                format!(
                    "MemoryRegion storage already holds region '{name}'; destroy it with \
                     hm_memory_region_destroy() first"
                ),
            ));
        }
    }
    Ok(())
}

/// Common body of the `memory_region_init*` family: creates a region in the current context with
/// `make` and stores its handle in `mr`.
///
/// # Safety
/// `mr` is NULL or writable MemoryRegion storage; `owner` NULL or live.
unsafe fn init_region(
    mr: *mut MemoryRegion,
    owner: *const Object,
    make: impl FnOnce(&mut MemorySystem) -> Result<RegionId>,
    after: impl FnOnce(&mut MemorySystem, RegionId, Option<&str>) -> Result<()>,
) -> Result<ContextId> {
    // SAFETY: forwarded caller contract.
    let storage = unsafe { mut_arg(mr, "mr") }?;
    check_free_storage(storage)?;
    // SAFETY: forwarded caller contract.
    let owner = unsafe { owner_path(owner) };
    let ctx = registry::current_id();
    let id = with_memory(ctx, |m| {
        let id = make(m)?;
        m.set_owner(id, owner.as_deref())?;
        if let Err(e) = after(m, id, owner.as_deref()) {
            let _ = m.destroy_region(id);
            return Err(e);
        }
        Ok(id)
    })?;
    *storage = MemoryRegion::new(ctx, id);
    Ok(ctx)
}

/// Resolves two regions that must live in the same context.
///
/// # Safety
/// Both are NULL or readable MemoryRegion storage.
unsafe fn pair(
    a: *const MemoryRegion,
    an: &str,
    b: *const MemoryRegion,
    bn: &str,
) -> Result<(ContextId, RegionId, RegionId)> {
    // SAFETY: forwarded caller contract.
    let (ca, ra) = unsafe { handle(a, an) }?;
    // SAFETY: forwarded caller contract.
    let (cb, rb) = unsafe { handle(b, bn) }?;
    if ca != cb {
        return Err(Error::invalid(format!(
            "memory regions '{an}' and '{bn}' belong to different machines (contexts {ca} and \
             {cb})"
        )));
    }
    Ok((ca, ra, rb))
}

// ---------------------------------------------------------------------------------------------
// Initialisation

/// `memory_region_init`: a container of `size` bytes (`UINT64_MAX` means 2^64).
///
/// # Safety
/// `mr` is NULL or writable MemoryRegion storage; `owner` NULL or live; `name` NULL or
/// NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn memory_region_init(
    mr: *mut MemoryRegion,
    owner: *mut Object,
    name: *const c_char,
    size: u64,
) {
    void_export(|ctx| {
        // SAFETY: forwarded caller contract.
        let name = unsafe { str_arg(name, "name") }?;
        // SAFETY: forwarded caller contract.
        *ctx = Some(unsafe {
            init_region(
                mr,
                owner,
                |m| Ok(m.new_container(name, size_from_u64(size))),
                |_, _, _| Ok(()),
            )
        }?);
        Ok(())
    })
}

/// The shared body of the four anonymous-RAM initialisers (`memory_region_init_{ram,rom}` and
/// their `_nomigrate` forms): RAM owned by the region, optionally read-only, optionally
/// registered for migration as QEMU's vmstate_register_ram does.
///
/// # Safety
/// As for `memory_region_init_ram_nomigrate`.
unsafe fn init_anonymous(
    mr: *mut MemoryRegion,
    owner: *mut Object,
    name: *const c_char,
    size: u64,
    errp: *mut *mut Error,
    readonly: bool,
    migratable: bool,
) -> bool {
    guard(errp, false, || {
        // SAFETY: forwarded caller contract.
        let name = unsafe { str_arg(name, "name") }?;
        // SAFETY: forwarded caller contract.
        unsafe {
            init_region(
                mr,
                owner,
                |m| m.new_ram_anonymous(name, size),
                |m, id, owner| {
                    if readonly {
                        m.set_readonly(id, true)?;
                    }
                    if migratable {
                        m.vmstate_register_ram(id, owner)?;
                    }
                    Ok(())
                },
            )
        }?;
        Ok(true)
    })
}

/// `memory_region_init_ram_nomigrate`: anonymous RAM owned by the region, not registered for
/// migration.
///
/// # Safety
/// As for `memory_region_init`; `errp` follows the Error convention.
#[no_mangle]
pub unsafe extern "C" fn memory_region_init_ram_nomigrate(
    mr: *mut MemoryRegion,
    owner: *mut Object,
    name: *const c_char,
    size: u64,
    errp: *mut *mut Error,
) -> bool {
    // SAFETY: forwarded caller contract.
    unsafe { init_anonymous(mr, owner, name, size, errp, false, false) }
}

/// `memory_region_init_ram`: anonymous RAM registered for migration under
/// "<owner path>/<name>" (or "<name>" without owner), as QEMU's vmstate_register_ram does.
///
/// # Safety
/// As for `memory_region_init_ram_nomigrate`.
#[no_mangle]
pub unsafe extern "C" fn memory_region_init_ram(
    mr: *mut MemoryRegion,
    owner: *mut Object,
    name: *const c_char,
    size: u64,
    errp: *mut *mut Error,
) -> bool {
    // SAFETY: forwarded caller contract.
    unsafe { init_anonymous(mr, owner, name, size, errp, false, true) }
}

/// `memory_region_init_rom_nomigrate`: read-only anonymous RAM (firmware images), not
/// registered for migration.
///
/// # Safety
/// As for `memory_region_init_ram_nomigrate`.
#[no_mangle]
pub unsafe extern "C" fn memory_region_init_rom_nomigrate(
    mr: *mut MemoryRegion,
    owner: *mut Object,
    name: *const c_char,
    size: u64,
    errp: *mut *mut Error,
) -> bool {
    // SAFETY: forwarded caller contract.
    unsafe { init_anonymous(mr, owner, name, size, errp, true, false) }
}

/// `memory_region_init_rom`: read-only anonymous RAM registered for migration like
/// `memory_region_init_ram` ("pc.bios", "pc.rom").
///
/// # Safety
/// As for `memory_region_init_ram_nomigrate`.
#[no_mangle]
pub unsafe extern "C" fn memory_region_init_rom(
    mr: *mut MemoryRegion,
    owner: *mut Object,
    name: *const c_char,
    size: u64,
    errp: *mut *mut Error,
) -> bool {
    // SAFETY: forwarded caller contract.
    unsafe { init_anonymous(mr, owner, name, size, errp, true, true) }
}

/// `memory_region_init_alias`: a window of `size` bytes (`UINT64_MAX` = 2^64) into `orig`
/// starting at `offset`.
///
/// # Safety
/// `mr` writable storage, `orig` initialised storage (or NULL); `owner` NULL or live; `name`
/// NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn memory_region_init_alias(
    mr: *mut MemoryRegion,
    owner: *mut Object,
    name: *const c_char,
    orig: *mut MemoryRegion,
    offset: u64,
    size: u64,
) {
    void_export(|ctx| {
        // SAFETY: forwarded caller contract.
        let name = unsafe { str_arg(name, "name") }?;
        // SAFETY: forwarded caller contract.
        let (octx, target) = unsafe { handle(orig, "orig") }?;
        *ctx = Some(octx);
        if octx != registry::current_id() {
            return Err(Error::invalid(format!(
                "alias '{name}' would point into another machine's region (context {octx})"
            )));
        }
        // SAFETY: forwarded caller contract.
        unsafe {
            init_region(
                mr,
                owner,
                |m| m.new_alias(name, target, offset, size),
                |_, _, _| Ok(()),
            )
        }?;
        Ok(())
    })
}

/// An MMIO region of `size` bytes: hostmem dispatches no accesses, but it occupies guest
/// addresses and shows as "i/o" in the dumps (QEMU's memory_region_init_io without ops).
///
/// # Safety
/// As for `memory_region_init`.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_region_init_io(
    mr: *mut MemoryRegion,
    owner: *mut Object,
    name: *const c_char,
    size: u64,
) {
    void_export(|ctx| {
        // SAFETY: forwarded caller contract.
        let name = unsafe { str_arg(name, "name") }?;
        // SAFETY: forwarded caller contract.
        *ctx = Some(unsafe {
            init_region(
                mr,
                owner,
                |m| Ok(m.new_io(name, size_from_u64(size))),
                |_, _, _| Ok(()),
            )
        }?);
        Ok(())
    })
}

/// QEMU's `object_unparent(OBJECT(mr))`: the region leaves its parent, its RAM is freed once
/// nothing maps it, and the storage reads as not initialised again.
///
/// # Safety
/// `mr` is NULL or writable MemoryRegion storage.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_region_destroy(mr: *mut MemoryRegion) {
    void_export(|ctx| {
        // SAFETY: forwarded caller contract.
        let (c, id) = unsafe { handle(mr, "mr") }?;
        *ctx = Some(c);
        with_memory(c, |m| m.destroy_region(id))?;
        forget_name(c, id);
        // SAFETY: handle() checked mr is non-NULL storage.
        unsafe { *mr = MemoryRegion::default() };
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// The two roots

fn root_storage(io: bool) -> Result<*mut MemoryRegion> {
    type Roots = Mutex<HashMap<ContextId, usize>>;
    static ROOTS: OnceLock<Roots> = OnceLock::new();
    let ctx = registry::current_id();
    let (sys, iop) = with_memory(ctx, |m| Ok((m.system_memory(), m.system_io())))?;
    let mut t = ROOTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    // One leaked pair per machine: C keeps these pointers forever, like QEMU's globals. The
    // handles are written once, before the first pointer is handed out, and never change (a
    // machine's roots are fixed), so C readers need no lock.
    let addr = *t.entry(ctx).or_insert_with(|| {
        let pair = [MemoryRegion::new(ctx, sys), MemoryRegion::new(ctx, iop)];
        Box::into_raw(Box::new(pair)) as usize
    });
    let pair = addr as *mut [MemoryRegion; 2];
    // SAFETY: `pair` points to the leaked, never freed array made above; taking the address of
    // one element reads and writes nothing.
    Ok(unsafe { std::ptr::addr_of_mut!((*pair)[usize::from(io)]) })
}

/// The current machine's "system" region (2^64 bytes), root of the "memory" address space.
/// The pointer stays valid for the life of the process.
#[no_mangle]
pub extern "C" fn get_system_memory() -> *mut MemoryRegion {
    guard_report(std::ptr::null_mut(), || root_storage(false))
}

/// The current machine's "io" region (64 KiB), root of the "I/O" address space.
#[no_mangle]
pub extern "C" fn get_system_io() -> *mut MemoryRegion {
    guard_report(std::ptr::null_mut(), || root_storage(true))
}

// ---------------------------------------------------------------------------------------------
// Topology

fn add_subregion_common(
    mr: *mut MemoryRegion,
    offset: u64,
    sub: *mut MemoryRegion,
    priority: Option<i32>,
    ctx: &mut Option<ContextId>,
) -> Result<()> {
    // SAFETY: the exports' callers guarantee NULL or valid storage.
    let (c, parent, child) = unsafe { pair(mr, "mr", sub, "subregion") }?;
    *ctx = Some(c);
    with_memory(c, |m| m.add_subregion(parent, offset, child, priority))
}

/// `memory_region_add_subregion`: maps `subregion` at `offset` inside `mr`. It may not
/// intersect another enabled sibling added this way (use the `_overlap` form to layer).
///
/// # Safety
/// Both are NULL or MemoryRegion storage.
#[no_mangle]
pub unsafe extern "C" fn memory_region_add_subregion(
    mr: *mut MemoryRegion,
    offset: u64,
    subregion: *mut MemoryRegion,
) {
    void_export(|ctx| add_subregion_common(mr, offset, subregion, None, ctx))
}

/// `memory_region_add_subregion_overlap`: maps `subregion` with a priority; among overlapping
/// siblings the highest priority wins, the most recently added among equals.
///
/// # Safety
/// Both are NULL or MemoryRegion storage.
#[no_mangle]
pub unsafe extern "C" fn memory_region_add_subregion_overlap(
    mr: *mut MemoryRegion,
    offset: u64,
    subregion: *mut MemoryRegion,
    priority: i32,
) {
    void_export(|ctx| add_subregion_common(mr, offset, subregion, Some(priority), ctx))
}

/// `memory_region_add_subregion` reporting failure (collision, listener refusal) through
/// `errp` instead of the pending error.
///
/// # Safety
/// Both are NULL or MemoryRegion storage; `errp` follows the Error convention.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_region_add_subregion_err(
    mr: *mut MemoryRegion,
    offset: u64,
    subregion: *mut MemoryRegion,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        add_subregion_common(mr, offset, subregion, None, &mut None).map(|_| true)
    })
}

/// `memory_region_add_subregion_overlap` reporting failure through `errp`.
///
/// # Safety
/// As for `hm_memory_region_add_subregion_err`.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_region_add_subregion_overlap_err(
    mr: *mut MemoryRegion,
    offset: u64,
    subregion: *mut MemoryRegion,
    priority: i32,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        add_subregion_common(mr, offset, subregion, Some(priority), &mut None).map(|_| true)
    })
}

/// `memory_region_del_subregion`.
///
/// # Safety
/// Both are NULL or MemoryRegion storage.
#[no_mangle]
pub unsafe extern "C" fn memory_region_del_subregion(
    mr: *mut MemoryRegion,
    subregion: *mut MemoryRegion,
) {
    void_export(|ctx| {
        // SAFETY: forwarded caller contract.
        let (c, parent, child) = unsafe { pair(mr, "mr", subregion, "subregion") }?;
        *ctx = Some(c);
        with_memory(c, |m| m.del_subregion(parent, child))
    })
}

/// Runs a one-region `void` mutation.
///
/// # Safety
/// `mr` is NULL or MemoryRegion storage.
unsafe fn mutate(
    mr: *const MemoryRegion,
    f: impl FnOnce(&mut MemorySystem, RegionId) -> Result<()>,
) {
    void_export(|ctx| {
        // SAFETY: forwarded caller contract.
        let (c, id) = unsafe { handle(mr, "mr") }?;
        *ctx = Some(c);
        with_memory(c, |m| f(m, id))
    })
}

/// `memory_region_set_enabled`.
///
/// # Safety
/// `mr` is NULL or MemoryRegion storage.
#[no_mangle]
pub unsafe extern "C" fn memory_region_set_enabled(mr: *mut MemoryRegion, enabled: bool) {
    // SAFETY: forwarded caller contract.
    unsafe { mutate(mr, |m, id| m.set_enabled(id, enabled)) }
}

/// `memory_region_set_address`: moves the region inside its parent.
///
/// # Safety
/// `mr` is NULL or MemoryRegion storage.
#[no_mangle]
pub unsafe extern "C" fn memory_region_set_address(mr: *mut MemoryRegion, addr: u64) {
    // SAFETY: forwarded caller contract.
    unsafe { mutate(mr, |m, id| m.set_address(id, addr)) }
}

/// `memory_region_set_alias_offset`.
///
/// # Safety
/// `mr` is NULL or MemoryRegion storage.
#[no_mangle]
pub unsafe extern "C" fn memory_region_set_alias_offset(mr: *mut MemoryRegion, offset: u64) {
    // SAFETY: forwarded caller contract.
    unsafe { mutate(mr, |m, id| m.set_alias_offset(id, offset)) }
}

/// `memory_region_set_readonly`: read-only RAM is ROM ("rom" in the dumps, "ro" in
/// `info ramblock`, a read-only KVM slot).
///
/// # Safety
/// `mr` is NULL or MemoryRegion storage.
#[no_mangle]
pub unsafe extern "C" fn memory_region_set_readonly(mr: *mut MemoryRegion, readonly: bool) {
    // SAFETY: forwarded caller contract.
    unsafe { mutate(mr, |m, id| m.set_readonly(id, readonly)) }
}

/// `memory_region_transaction_begin` on the current machine.
#[no_mangle]
pub extern "C" fn memory_region_transaction_begin() {
    void_export(|ctx| {
        let c = registry::current_id();
        *ctx = Some(c);
        with_memory(c, |m| {
            m.transaction_begin();
            Ok(())
        })
    })
}

fn commit_current(ctx: &mut Option<ContextId>) -> Result<()> {
    let c = registry::current_id();
    *ctx = Some(c);
    with_memory(c, |m| m.transaction_commit())
}

/// `memory_region_transaction_commit`: at the outermost level the flat views are rendered and
/// listeners (KVM) told; their refusal becomes the pending error.
#[no_mangle]
pub extern "C" fn memory_region_transaction_commit() {
    void_export(commit_current)
}

/// `memory_region_transaction_commit` reporting a listener's refusal through `errp`.
///
/// # Safety
/// `errp` follows the Error convention.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_region_transaction_commit_err(errp: *mut *mut Error) -> bool {
    guard(errp, false, || commit_current(&mut None).map(|_| true))
}

// ---------------------------------------------------------------------------------------------
// Queries

/// `memory_region_size`: the size in bytes; a 2^64 region answers `UINT64_MAX`, as in QEMU.
/// 0 (plus a pending error) for a bad handle.
///
/// # Safety
/// `mr` is NULL or MemoryRegion storage.
#[no_mangle]
pub unsafe extern "C" fn memory_region_size(mr: *mut MemoryRegion) -> u64 {
    let mut size = 0;
    void_export(|ctx| {
        // SAFETY: forwarded caller contract.
        let (c, id) = unsafe { handle(mr, "mr") }?;
        *ctx = Some(c);
        size = with_memory(c, |m| m.region_size(id).map(size_to_u64))?;
        Ok(())
    });
    size
}

/// `memory_region_get_ram_ptr`: host address of the region's first byte, following aliases;
/// NULL for a region without RAM behind it.
///
/// # Safety
/// `mr` is NULL or MemoryRegion storage.
#[no_mangle]
pub unsafe extern "C" fn memory_region_get_ram_ptr(mr: *mut MemoryRegion) -> *mut c_void {
    let mut ptr = std::ptr::null_mut();
    void_export(|ctx| {
        // SAFETY: forwarded caller contract.
        let (c, id) = unsafe { handle(mr, "mr") }?;
        *ctx = Some(c);
        if let Some(p) = with_memory(c, |m| m.ram_ptr(id))? {
            ptr = p as *mut c_void;
        }
        Ok(())
    });
    ptr
}

type NameCache = Mutex<HashMap<(ContextId, RegionId), CString>>;

fn names() -> &'static NameCache {
    static NAMES: OnceLock<NameCache> = OnceLock::new();
    NAMES.get_or_init(Default::default)
}

fn forget_name(ctx: ContextId, id: RegionId) {
    names()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&(ctx, id));
}

/// `memory_region_name`: borrowed, valid while the region exists (like QEMU's). NULL for a bad
/// handle.
///
/// # Safety
/// `mr` is NULL or MemoryRegion storage.
#[no_mangle]
pub unsafe extern "C" fn memory_region_name(mr: *const MemoryRegion) -> *const c_char {
    let mut out = std::ptr::null();
    void_export(|ctx| {
        // SAFETY: forwarded caller contract.
        let (c, id) = unsafe { handle(mr, "mr") }?;
        *ctx = Some(c);
        let name = with_memory(c, |m| m.region_name(id).map(str::to_string))?;
        let mut t = names().lock().unwrap_or_else(|p| p.into_inner());
        // The CString's heap buffer does not move when the map rehashes.
        let s = t
            .entry((c, id))
            .or_insert_with(|| CString::new(name.replace('\0', " ")).unwrap_or_default());
        out = s.as_ptr();
        Ok(())
    });
    out
}

/// `memory_region_is_mapped`: whether the region is a subregion of some container.
///
/// # Safety
/// `mr` is NULL or MemoryRegion storage.
#[no_mangle]
pub unsafe extern "C" fn memory_region_is_mapped(mr: *const MemoryRegion) -> bool {
    let mut out = false;
    void_export(|ctx| {
        // SAFETY: forwarded caller contract.
        let (c, id) = unsafe { handle(mr, "mr") }?;
        *ctx = Some(c);
        out = with_memory(c, |m| Ok(m.get(id)?.parent.is_some()))?;
        Ok(())
    });
    out
}

/// The idstr of the region's RAMBlock, malloc'd (free with `hm_free`): "" while unregistered,
/// NULL with an error for a region that has no RAMBlock of its own.
///
/// # Safety
/// `mr` is NULL or MemoryRegion storage; `errp` follows the Error convention.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_region_ram_block_idstr(
    mr: *const MemoryRegion,
    errp: *mut *mut Error,
) -> *mut c_char {
    guard(errp, std::ptr::null_mut(), || {
        // SAFETY: forwarded caller contract.
        let (c, id) = unsafe { handle(mr, "mr") }?;
        let idstr = with_memory(c, |m| {
            let name = m.region_name(id)?.to_string();
            let b = m.ram_block_of(id).ok_or_else(|| {
                Error::new(
                    HmErrorClass::NotFound,
                    format!("memory region '{name}' has no RAMBlock"),
                )
            })?;
            Ok(m.ramblocks
                .get(b)
                .map(|b| b.idstr.clone())
                .unwrap_or_default())
        })?;
        Ok(c_string(&idstr))
    })
}

/// Whether the region's RAMBlock is in the migration stream (registered with
/// vmstate_register_ram). False for regions without a RAMBlock.
///
/// # Safety
/// `mr` is NULL or MemoryRegion storage.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_region_is_migratable(mr: *const MemoryRegion) -> bool {
    let mut out = false;
    void_export(|ctx| {
        // SAFETY: forwarded caller contract.
        let (c, id) = unsafe { handle(mr, "mr") }?;
        *ctx = Some(c);
        out = with_memory(c, |m| {
            m.get(id)?;
            Ok(m.ram_block_of(id)
                .and_then(|b| m.ramblocks.get(b))
                .is_some_and(|b| b.migratable))
        })?;
        Ok(())
    });
    out
}

// ---------------------------------------------------------------------------------------------
// Migration registration

/// Shared body of the vmstate exports; errors go through `errp` when given, else pending.
///
/// # Safety
/// `mr` NULL or storage; `owner` NULL or live.
unsafe fn register(mr: *mut MemoryRegion, owner: *const Object) -> Result<ContextId> {
    // SAFETY: forwarded caller contract.
    let (c, id) = unsafe { handle(mr, "mr") }?;
    // SAFETY: forwarded caller contract.
    let owner = unsafe { owner_path(owner) };
    with_memory(c, |m| m.vmstate_register_ram(id, owner.as_deref()))?;
    Ok(c)
}

/// `vmstate_register_ram`: names the region's RAMBlock "<owner path>/<region name>" (or the
/// region name with a NULL owner) and puts it in the migration stream. A name already taken
/// is an error ("RAMBlock \"%s\" already registered"; QEMU aborted). On an alias of RAM it
/// gives the alias a RAMBlock of its own.
///
/// # Safety
/// `mr` NULL or storage; `owner` NULL or live.
#[no_mangle]
pub unsafe extern "C" fn vmstate_register_ram(mr: *mut MemoryRegion, owner: *mut DeviceState) {
    void_export(|ctx| {
        // SAFETY: handle() inside only reads; used here for the context hint.
        *ctx = unsafe { handle(mr, "mr") }.ok().map(|h| h.0);
        // SAFETY: forwarded caller contract.
        unsafe { register(mr, owner) }.map(|_| ())
    })
}

/// `vmstate_register_ram_global`: `vmstate_register_ram` without owner.
///
/// # Safety
/// `mr` NULL or storage.
#[no_mangle]
pub unsafe extern "C" fn vmstate_register_ram_global(mr: *mut MemoryRegion) {
    // SAFETY: forwarded caller contract.
    unsafe { vmstate_register_ram(mr, std::ptr::null_mut()) }
}

/// `vmstate_register_ram` reporting a duplicate name through `errp`.
///
/// # Safety
/// `mr` NULL or storage; `owner` NULL or live; `errp` follows the Error convention.
#[no_mangle]
pub unsafe extern "C" fn hm_vmstate_register_ram_err(
    mr: *mut MemoryRegion,
    owner: *mut DeviceState,
    errp: *mut *mut Error,
) -> bool {
    // SAFETY: forwarded caller contract.
    guard(errp, false, || unsafe { register(mr, owner) }.map(|_| true))
}

/// `vmstate_unregister_ram`: the RAMBlock leaves the migration stream and loses its name.
/// `owner` is accepted for QEMU's signature and not needed.
///
/// # Safety
/// `mr` NULL or storage.
#[no_mangle]
pub unsafe extern "C" fn vmstate_unregister_ram(mr: *mut MemoryRegion, _owner: *mut DeviceState) {
    // SAFETY: forwarded caller contract.
    unsafe { mutate(mr, |m, id| m.vmstate_unregister_ram(id)) }
}

// ---------------------------------------------------------------------------------------------
// Pending errors

/// Hands over the current machine's first pending memory-API error: returns true when there
/// was none; otherwise false, with the error stored through `errp` and cleared.
///
/// # Safety
/// `errp` follows the Error convention.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_check(errp: *mut *mut Error) -> bool {
    guard(errp, false, || {
        match take_pending_error(registry::current_id()) {
            None => Ok(true),
            Some(e) => Err(e),
        }
    })
}
