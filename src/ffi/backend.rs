//! `HostMemoryBackend` for C: QEMU's `-object memory-backend-*` objects, created from option
//! strings or step by step, in the current context.
//!
//! Ownership: a `HostMemoryBackend *` is a handle hostmem owns, kept until the process ends;
//! the same backend always yields the same pointer. It embeds the `MemoryRegion` that
//! `host_memory_backend_get_memory` returns. A handle whose backend is gone (deleted with
//! `hm_memory_backend_del`, its context destroyed, a failed machine setup) stays safe to pass:
//! calls on it fail with "memory backend no longer exists" instead of touching freed memory.
//!
//! Preallocation runs with no hostmem lock held, so a progress callback may call hostmem.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Mutex, OnceLock};

use super::memory::MemoryRegion;
use super::{c_string, guard, guard_report, mut_arg, ref_arg, str_arg};
use crate::error::{Error, HmErrorClass, Result};
use crate::machine::Machine;
use crate::registry::{self, MachineId as ContextId};

/// A memory backend, as C sees it. Opaque.
pub struct HostMemoryBackend {
    context: ContextId,
    serial: u64,
    /// The storage `host_memory_backend_get_memory` hands out. Written through the cell, under
    /// the handle table's lock, because C may hold the handle (and hostmem a shared reference
    /// to it) elsewhere at the same time, e.g. inside a prealloc progress callback. Handles
    /// outlive their backend (and context) on purpose: a stale one gives an error, not a
    /// use-after-free.
    mr: std::cell::UnsafeCell<MemoryRegion>,
}

/// Progress of preallocation: bytes done, bytes total, the caller's opaque pointer. Called on
/// the thread that completes the backend (or switches `prealloc` on), never concurrently:
/// first with done = 0 before any page is touched, last with done = total on success.
pub type HmPreallocProgress =
    Option<unsafe extern "C" fn(done: u64, total: u64, opaque: *mut c_void)>;

type Handles = Mutex<HashMap<(ContextId, u64), Box<HostMemoryBackend>>>;

fn handles() -> &'static Handles {
    static H: OnceLock<Handles> = OnceLock::new();
    H.get_or_init(Default::default)
}

/// The one handle of a backend, made on first use. Boxes never move, so the pointer is stable.
fn handle_for(context: ContextId, serial: u64) -> *mut HostMemoryBackend {
    let mut h = handles().lock().unwrap_or_else(|p| p.into_inner());
    let b = h.entry((context, serial)).or_insert_with(|| {
        Box::new(HostMemoryBackend {
            context,
            serial,
            mr: std::cell::UnsafeCell::new(MemoryRegion::default()),
        })
    });
    &mut **b as *mut HostMemoryBackend
}

fn gone() -> Error {
    Error::new(HmErrorClass::NotFound, "memory backend no longer exists")
}

/// Runs `f` on the machine of a handle's backend; a machine that is gone means the backend is.
fn with_machine<R>(b: &HostMemoryBackend, f: impl FnOnce(&mut Machine) -> Result<R>) -> Result<R> {
    if !registry::exists(b.context) {
        return Err(gone());
    }
    registry::with(b.context, f)
}

/// Runs `f` on the backend a handle names (its machine locked), given by id.
fn with_entry<R>(
    b: &HostMemoryBackend,
    f: impl FnOnce(&mut Machine, &str) -> Result<R>,
) -> Result<R> {
    with_machine(b, |m| {
        let id = backend_id(m, b.serial)?;
        f(m, &id)
    })
}

fn backend_id(m: &Machine, serial: u64) -> Result<String> {
    m.objects()
        .by_serial(serial)
        .map(|e| e.backend.id().to_string())
        .ok_or_else(gone)
}

/// The id of the backend a handle names.
fn id_of(b: &HostMemoryBackend) -> Result<String> {
    with_machine(b, |m| backend_id(m, b.serial))
}

fn serial_of(m: &Machine, id: &str) -> Result<u64> {
    m.objects().get(id).map(|e| e.serial).ok_or_else(gone)
}

/// Creates and completes a backend from a QEMU `-object` option string, e.g.
/// `"memory-backend-file,id=mem0,size=1G,mem-path=/dev/hugepages,prealloc=on"`. Nothing is
/// left behind on failure. NULL on error.
///
/// # Safety
/// `opts` is NULL or NUL-terminated; `errp` follows the Error convention.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_add(
    opts: *const c_char,
    errp: *mut *mut Error,
) -> *mut HostMemoryBackend {
    guard(errp, std::ptr::null_mut(), || {
        // SAFETY: caller contract.
        let opts = unsafe { str_arg(opts, "opts") }?;
        let (cid, id) =
            registry::with_current(|cid, m| Ok((cid, m.add_backend_uncompleted(opts)?)))?;
        complete_new(cid, &id)
    })
}

/// Completes a backend just created uncompleted in context `cid` and hands out its handle;
/// on failure the backend goes again.
fn complete_new(cid: ContextId, id: &str) -> Result<*mut HostMemoryBackend> {
    registry::complete_backend(cid, id, true)?;
    let serial = registry::with(cid, |m| serial_of(m, id))?;
    Ok(handle_for(cid, serial))
}

/// Creates an uncompleted backend of QOM type `type` ("memory-backend-ram", "-file",
/// "-memfd") named `id`; set properties with `hm_memory_backend_set`, then
/// `hm_memory_backend_complete` it.
///
/// # Safety
/// `type_` and `id` are NULL or NUL-terminated; `errp` follows the Error convention.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_new(
    type_: *const c_char,
    id: *const c_char,
    errp: *mut *mut Error,
) -> *mut HostMemoryBackend {
    guard(errp, std::ptr::null_mut(), || {
        // SAFETY: caller contract.
        let (ty, id) = unsafe { (str_arg(type_, "type")?, str_arg(id, "id")?) };
        registry::with_current(|cid, m| {
            m.create_backend(ty, id)?;
            Ok(handle_for(cid, serial_of(m, id)?))
        })
    })
}

/// The backend named `id` in the current context, or NULL.
///
/// # Safety
/// `id` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_find(id: *const c_char) -> *mut HostMemoryBackend {
    if id.is_null() {
        return std::ptr::null_mut();
    }
    guard_report(std::ptr::null_mut(), || {
        // SAFETY: caller contract.
        let id = unsafe { str_arg(id, "id") }?;
        registry::with_current(|cid, m| {
            Ok(serial_of(m, id).map_or(std::ptr::null_mut(), |s| handle_for(cid, s)))
        })
    })
}

/// `object-del`: deletes backend `id` of the current context; refused while mapped with
/// "object '<id>' is in use, can not be deleted" (and while another thread's completion is
/// preallocating it, "... it is being preallocated"). Calls on its handle fail afterwards with
/// "memory backend no longer exists".
///
/// # Safety
/// `id` is NULL or NUL-terminated; `errp` follows the Error convention.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_del(id: *const c_char, errp: *mut *mut Error) -> bool {
    guard(errp, false, || {
        // SAFETY: caller contract.
        let id = unsafe { str_arg(id, "id") }?;
        registry::with_current(|_, m| {
            serial_of(m, id).map_err(|_| {
                Error::new(HmErrorClass::NotFound, format!("object '{id}' not found"))
            })?;
            m.delete_backend(id)?;
            Ok(true)
        })
    })
}

/// Sets property `prop` from its QEMU string form ("1G", "on", "0-1,3", "bind", ...), with
/// QEMU's guards: some properties refuse changes after completion; `merge`/`dump` apply at once;
/// `prealloc=on` on a complete backend preallocates right away (progress callback included).
///
/// # Safety
/// `b` is NULL or a live handle; `prop`, `value` NULL or NUL-terminated; `errp` as usual.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_set(
    b: *mut HostMemoryBackend,
    prop: *const c_char,
    value: *const c_char,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: caller contract.
        let (b, prop, value) = unsafe {
            (
                ref_arg(b, "b")?,
                str_arg(prop, "prop")?,
                str_arg(value, "value")?,
            )
        };
        registry::set_backend_property(b.context, &id_of(b)?, prop, value)?;
        Ok(true)
    })
}

/// Property `prop` as a string in the syntax `hm_memory_backend_set` takes (sizes in bytes,
/// booleans "on"/"off", host-nodes as "0-1,3"). Release with `hm_free`. NULL on error.
///
/// # Safety
/// `b` is NULL or a live handle; `prop` NULL or NUL-terminated; `errp` as usual.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_get(
    b: *mut HostMemoryBackend,
    prop: *const c_char,
    errp: *mut *mut Error,
) -> *mut c_char {
    guard(errp, std::ptr::null_mut(), || {
        // SAFETY: caller contract.
        let (b, prop) = unsafe { (ref_arg(b, "b")?, str_arg(prop, "prop")?) };
        let v = with_entry(b, |m, id| {
            Ok(m.backend_mut(id).ok_or_else(gone)?.get(prop)?)
        })?;
        Ok(c_string(&v))
    })
}

/// Completes the backend: allocate → madvise → mbind (when host-nodes is set) → prealloc, then
/// its RAM region exists. On failure the backend stays uncompleted with nothing allocated.
///
/// # Safety
/// `b` is NULL or a live handle; `errp` as usual.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_complete(
    b: *mut HostMemoryBackend,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: caller contract.
        let b = unsafe { ref_arg(b, "b") }?;
        registry::complete_backend(b.context, &id_of(b)?, false)?;
        Ok(true)
    })
}

/// Sets (or, with `cb` NULL, clears) the preallocation progress callback of a backend.
///
/// # Safety
/// `b` is NULL or a live handle; `cb` may be called with `opaque` until it is replaced or the
/// backend deleted; `errp` as usual.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_set_prealloc_progress(
    b: *mut HostMemoryBackend,
    cb: HmPreallocProgress,
    opaque: *mut c_void,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: caller contract.
        let b = unsafe { ref_arg(b, "b") }?;
        let opaque = opaque as usize;
        let progress = cb.map(|f| {
            let p: crate::backend::ProgressFn = Arc::new(move |done, total| {
                // SAFETY: the caller registered `f` with `opaque` for exactly these calls.
                unsafe { f(done, total, opaque as *mut c_void) }
            });
            p
        });
        with_entry(b, |m, id| {
            m.backend_mut(id)
                .ok_or_else(gone)?
                .set_prealloc_progress(progress);
            Ok(true)
        })
    })
}

/// The backend's memory region once complete (the embedded storage of the handle), or NULL.
///
/// # Safety
/// `b` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn host_memory_backend_get_memory(
    b: *mut HostMemoryBackend,
) -> *mut MemoryRegion {
    guard_report(std::ptr::null_mut(), || {
        // SAFETY: caller contract; the handle is ours and lives in the handle table.
        let b = unsafe { ref_arg(b, "b") }?;
        let region = with_entry(b, |m, id| Ok(m.objects().get(id).and_then(|e| e.region)))?;
        Ok(match region {
            Some(r) => {
                let _table = handles().lock().unwrap_or_else(|p| p.into_inner());
                // SAFETY: the cell's only writes happen here, serialised by the table lock;
                // readers are C code given the pointer, which sees the same value every time
                // (a backend's region never changes once complete).
                unsafe { *b.mr.get() = MemoryRegion::new(b.context, r) };
                b.mr.get()
            }
            None => std::ptr::null_mut(),
        })
    })
}

/// Whether a consumer (machine RAM, a NUMA node, a DIMM) has taken the backend.
///
/// # Safety
/// `b` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn host_memory_backend_is_mapped(b: *mut HostMemoryBackend) -> bool {
    guard_report(false, || {
        // SAFETY: caller contract.
        let b = unsafe { ref_arg(b, "b") }?;
        with_entry(b, |m, id| {
            Ok(m.objects().get(id).is_some_and(|e| e.backend.is_mapped()))
        })
    })
}

/// Marks the backend taken (or free again); a mapped backend cannot be deleted.
///
/// # Safety
/// `b` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn host_memory_backend_set_mapped(b: *mut HostMemoryBackend, mapped: bool) {
    guard_report((), || {
        // SAFETY: caller contract.
        let b = unsafe { ref_arg(b, "b") }?;
        with_entry(b, |m, id| {
            m.backend_mut(id).ok_or_else(gone)?.set_mapped(mapped);
            Ok(())
        })
    })
}

/// Page size backing the memory (2 MiB on hugetlbfs, else the host page size); 0 before
/// allocation.
///
/// # Safety
/// `b` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn host_memory_backend_pagesize(b: *mut HostMemoryBackend) -> usize {
    guard_report(0, || {
        // SAFETY: caller contract.
        let b = unsafe { ref_arg(b, "b") }?;
        with_entry(b, |m, id| {
            Ok(m.objects()
                .get(id)
                .and_then(|e| e.backend.page_size())
                .unwrap_or(0))
        })
    })
}

/// The file descriptor behind a file or memfd backend (owned by hostmem; do not close), or -1.
///
/// # Safety
/// `b` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_get_fd(b: *mut HostMemoryBackend) -> c_int {
    guard_report(-1, || {
        // SAFETY: caller contract.
        let b = unsafe { ref_arg(b, "b") }?;
        with_entry(b, |m, id| {
            Ok(m.objects()
                .get(id)
                .and_then(|e| e.backend.mapping())
                .and_then(|map| map.fd())
                .unwrap_or(-1))
        })
    })
}

/// Host address of the backend's memory as soon as it is allocated (also from inside a
/// progress callback, before preallocation touches it), or NULL.
///
/// # Safety
/// `b` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_get_host_ptr(b: *mut HostMemoryBackend) -> *mut c_void {
    guard_report(std::ptr::null_mut(), || {
        // SAFETY: caller contract.
        let b = unsafe { ref_arg(b, "b") }?;
        with_entry(b, |m, id| {
            Ok(m.objects()
                .get(id)
                .and_then(|e| e.backend.mapping())
                .map_or(std::ptr::null_mut(), |map| map.as_ptr() as *mut c_void))
        })
    })
}

/// The steps the last completion (and later merge/dump/prealloc changes) ran, in order, comma
/// separated: "allocate,hugepage,dontfork,mergeable,bind,prealloc". Release with `hm_free`.
///
/// # Safety
/// `b` is NULL or a live handle; `errp` as usual.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_trace(
    b: *mut HostMemoryBackend,
    errp: *mut *mut Error,
) -> *mut c_char {
    guard(errp, std::ptr::null_mut(), || {
        // SAFETY: caller contract.
        let b = unsafe { ref_arg(b, "b") }?;
        let names = with_entry(b, |m, id| {
            let e = m.objects().get(id).ok_or_else(gone)?;
            Ok(e.backend
                .trace()
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(","))
        })?;
        Ok(c_string(&names))
    })
}

/// The kind of backend `hm_memory_backend_create` makes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HmBackendKind {
    /// `memory-backend-ram`: anonymous memory.
    Ram,
    /// `memory-backend-file`: a file (`mem_path`), e.g. on hugetlbfs or a DAX device.
    File,
    /// `memory-backend-memfd`: an anonymous file, shareable with other processes.
    Memfd,
}

/// `HmBackendConfig.flags`: map it shared (`share=on`; memfd's default).
pub const HM_BACKEND_SHARE: u32 = 1 << 0;
/// `HmBackendConfig.flags`: map it private (`share=off`; ram's and file's default).
pub const HM_BACKEND_PRIVATE: u32 = 1 << 1;
/// `HmBackendConfig.flags`: preallocate every page before returning (`prealloc=on`).
pub const HM_BACKEND_PREALLOC: u32 = 1 << 2;
/// `HmBackendConfig.flags`: reserve no swap space, so a sparse guest larger than the host's
/// memory can be mapped (`reserve=off`).
pub const HM_BACKEND_NORESERVE: u32 = 1 << 3;
/// `HmBackendConfig.flags`: memfd only: back it with huge pages (`hugetlb=on`).
pub const HM_BACKEND_HUGETLB: u32 = 1 << 4;

/// A backend described with C types, for VMMs that do not speak QEMU's option syntax. Zero
/// fields mean the default; set it up with `= { .kind = ..., .size = ... }`.
#[repr(C)]
pub struct HmBackendConfig {
    pub kind: HmBackendKind,
    /// Its id, or NULL for the first free `hm-memN`.
    pub id: *const c_char,
    /// In bytes.
    pub size: u64,
    /// `HM_BACKEND_FILE` only: the file or directory, as is (no `,,` escaping).
    pub mem_path: *const c_char,
    /// `HM_BACKEND_*` bits.
    pub flags: u32,
    /// 0: QEMU's default (1 thread).
    pub prealloc_threads: u32,
    /// memfd with `HM_BACKEND_HUGETLB`: the huge page size; 0: the host's default.
    pub hugetlbsize: u64,
}

fn free_id(m: &Machine) -> String {
    (0u64..)
        .map(|n| format!("hm-mem{n}"))
        .find(|id| m.objects().get(id).is_none())
        .unwrap_or_default()
}

/// The `-object` properties a config stands for, in the order they are set.
fn config_properties(
    cfg: &HmBackendConfig,
    mem_path: Option<&str>,
) -> Result<Vec<(&'static str, String)>> {
    let known = HM_BACKEND_SHARE
        | HM_BACKEND_PRIVATE
        | HM_BACKEND_PREALLOC
        | HM_BACKEND_NORESERVE
        | HM_BACKEND_HUGETLB;
    if cfg.flags & !known != 0 {
        return Err(Error::invalid(format!(
            "Parameter 'flags' has unknown bits 0x{:x}",
            cfg.flags & !known
        )));
    }
    let on = |bit: u32| cfg.flags & bit != 0;
    if on(HM_BACKEND_SHARE) && on(HM_BACKEND_PRIVATE) {
        return Err(Error::invalid(
            "Parameter 'flags' asks for both HM_BACKEND_SHARE and HM_BACKEND_PRIVATE",
        ));
    }
    let mut props = vec![("size", cfg.size.to_string())];
    match (cfg.kind, mem_path) {
        (HmBackendKind::File, Some(path)) => props.push(("mem-path", path.to_string())),
        (HmBackendKind::File, None) => {
            return Err(Error::invalid("Parameter 'mem_path' is missing"))
        }
        (_, Some(_)) => {
            return Err(Error::invalid(
                "Parameter 'mem_path' is only for HM_BACKEND_KIND_FILE",
            ))
        }
        (_, None) => {}
    }
    if on(HM_BACKEND_HUGETLB) || cfg.hugetlbsize != 0 {
        if cfg.kind != HmBackendKind::Memfd {
            return Err(Error::invalid(
                "HM_BACKEND_HUGETLB and 'hugetlbsize' are for HM_BACKEND_KIND_MEMFD (a file backend on hugetlbfs gets huge pages from its mem_path)",
            ));
        }
        props.push(("hugetlb", "on".into()));
        if cfg.hugetlbsize != 0 {
            props.push(("hugetlbsize", cfg.hugetlbsize.to_string()));
        }
    }
    if on(HM_BACKEND_SHARE) {
        props.push(("share", "on".into()));
    }
    if on(HM_BACKEND_PRIVATE) {
        props.push(("share", "off".into()));
    }
    if on(HM_BACKEND_NORESERVE) {
        props.push(("reserve", "off".into()));
    }
    if cfg.prealloc_threads != 0 {
        props.push(("prealloc-threads", cfg.prealloc_threads.to_string()));
    }
    if on(HM_BACKEND_PREALLOC) {
        props.push(("prealloc", "on".into()));
    }
    Ok(props)
}

/// Creates and completes a backend in the current context from typed fields, with the checks
/// and errors of the `-object` form. Nothing is left behind on failure. NULL on error.
///
/// # Safety
/// `cfg` is NULL or a valid `HmBackendConfig` whose strings are NULL or NUL-terminated;
/// `errp` as usual.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_create(
    cfg: *const HmBackendConfig,
    errp: *mut *mut Error,
) -> *mut HostMemoryBackend {
    guard(errp, std::ptr::null_mut(), || {
        // SAFETY: caller contract.
        let cfg = unsafe { ref_arg(cfg, "cfg") }?;
        // SAFETY: caller contract: the strings are NULL or NUL-terminated.
        let (id, mem_path) = unsafe {
            (
                (!cfg.id.is_null())
                    .then(|| str_arg(cfg.id, "id"))
                    .transpose()?,
                (!cfg.mem_path.is_null())
                    .then(|| str_arg(cfg.mem_path, "mem_path"))
                    .transpose()?,
            )
        };
        let props = config_properties(cfg, mem_path)?;
        let ty = match cfg.kind {
            HmBackendKind::Ram => "memory-backend-ram",
            HmBackendKind::File => "memory-backend-file",
            HmBackendKind::Memfd => "memory-backend-memfd",
        };
        let (cid, id) = registry::with_current(|cid, m| {
            let id = id.map_or_else(|| free_id(m), str::to_string);
            m.create_backend(ty, &id)?;
            let set = props.iter().try_for_each(|(p, v)| {
                m.backend_mut(&id)
                    .ok_or_else(gone)?
                    .set(p, v)
                    .map_err(Error::from)
            });
            if let Err(e) = set {
                let _ = m.delete_backend(&id);
                return Err(e);
            }
            Ok((cid, id))
        })?;
        complete_new(cid, &id)
    })
}

/// Deletes the backend a handle names, as `hm_memory_backend_del` does by id (refused while
/// mapped or pinned). The handle stays valid but stale: using it again (a second free
/// included) gives "memory backend no longer exists", never a use-after-free.
///
/// # Safety
/// `b` is NULL or a handle from this library; `errp` as usual.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_free(
    b: *mut HostMemoryBackend,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: caller contract.
        let b = unsafe { ref_arg(b, "b") }?;
        with_entry(b, |m, id| m.delete_backend(id))?;
        Ok(true)
    })
}

/// A reference a VMM holds on a backend's memory (its own KVM slots, DMA): the memory stays
/// mapped at the same address until `hm_memory_pin_release`, whatever else is freed first
/// (the backend, its machine), and deleting the backend is refused meanwhile. Opaque.
pub struct HmMemoryPin {
    context: ContextId,
    serial: u64,
    mapping: Arc<crate::hostmap::HostMapping>,
}

/// Pins a complete backend's memory; NULL on error (not complete, stale handle).
///
/// # Safety
/// `b` is NULL or a live handle; `errp` as usual.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_pin(
    b: *mut HostMemoryBackend,
    errp: *mut *mut Error,
) -> *mut HmMemoryPin {
    guard(errp, std::ptr::null_mut(), || {
        // SAFETY: caller contract.
        let b = unsafe { ref_arg(b, "b") }?;
        let mapping = with_entry(b, |m, id| Ok(m.backend_mut(id).ok_or_else(gone)?.pin()?))?;
        Ok(Box::into_raw(Box::new(HmMemoryPin {
            context: b.context,
            serial: b.serial,
            mapping,
        })))
    })
}

/// The pinned memory's host address (valid until the pin is released).
///
/// # Safety
/// `pin` is NULL or a live pin.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_pin_host_ptr(pin: *const HmMemoryPin) -> *mut c_void {
    // SAFETY: caller contract.
    unsafe { pin.as_ref() }.map_or(std::ptr::null_mut(), |p| p.mapping.as_ptr().cast())
}

/// The pinned memory's length in bytes.
///
/// # Safety
/// `pin` is NULL or a live pin.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_pin_size(pin: *const HmMemoryPin) -> u64 {
    // SAFETY: caller contract.
    unsafe { pin.as_ref() }.map_or(0, |p| p.mapping.len() as u64)
}

/// Releases a pin (NULL: nothing). The memory is unmapped now if nothing else holds it.
///
/// # Safety
/// `pin` is NULL or a live pin, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_pin_release(pin: *mut HmMemoryPin) {
    if pin.is_null() {
        return;
    }
    // SAFETY: caller contract: a pin from hm_memory_pin, released once.
    let pin = unsafe { Box::from_raw(pin) };
    guard_report((), || {
        // The backend (or its machine) may be gone: then there is no count to drop.
        let _ = registry::with(pin.context, |m| {
            let id = backend_id(m, pin.serial)?;
            m.backend_mut(&id).ok_or_else(gone)?.unpin();
            Ok(())
        });
        Ok(())
    });
}

/// The backend of the current context whose memory contains host address `hva`, and the
/// offset of `hva` in it (through `offset`, if not NULL); NULL when no backend maps it.
///
/// # Safety
/// `offset` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_from_host(
    hva: *const c_void,
    offset: *mut u64,
) -> *mut HostMemoryBackend {
    guard_report(std::ptr::null_mut(), || {
        let addr = hva as usize;
        registry::with_current(|cid, m| {
            let hit = m.objects().entries().find_map(|e| {
                let map = e.backend.mapping()?;
                let start = map.as_ptr() as usize;
                (addr >= start && addr - start < map.len())
                    .then(|| (e.serial, (addr - start) as u64))
            });
            let Some((serial, off)) = hit else {
                return Ok(std::ptr::null_mut());
            };
            // SAFETY: caller contract.
            if let Some(o) = unsafe { offset.as_mut() } {
                *o = off;
            }
            Ok(handle_for(cid, serial))
        })
    })
}

/// A range of guest-physical addresses that RAM must not cover (`hm_memory_backend_lay_out`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HmGpaHole {
    pub start: u64,
    pub size: u64,
}

/// One piece of a backend in the guest: `size` bytes at guest address `gpa`, at `host` (the
/// backend's memory at `offset`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HmRamRange {
    pub gpa: u64,
    pub host: *mut c_void,
    pub offset: u64,
    pub size: u64,
}

/// Lays a complete backend over guest addresses from `base` upwards, stepping over `holes`
/// (e.g. the PCI gap below 4 GiB): RAM that would fall in a hole continues after it. Writes
/// at most `max` ranges to `out` and returns how many the layout has (more than `max`: call
/// again with room for all); -1 on error (holes overlapping or not page-aligned, the backend
/// not complete, the end beyond 2^64). For VMMs that register KVM slots themselves; pin the
/// backend (`hm_memory_pin`) while the slots exist.
///
/// # Safety
/// `b` is NULL or a live handle; `holes` points to `n_holes` entries (or is NULL with 0);
/// `out` has room for `max` entries (or is NULL with 0); `errp` as usual.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_backend_lay_out(
    b: *mut HostMemoryBackend,
    base: u64,
    holes: *const HmGpaHole,
    n_holes: usize,
    out: *mut HmRamRange,
    max: usize,
    errp: *mut *mut Error,
) -> isize {
    guard(errp, -1, || {
        // SAFETY: caller contract.
        let b = unsafe { ref_arg(b, "b") }?;
        let holes: Vec<crate::gpa_layout::Hole> = if n_holes == 0 {
            Vec::new()
        } else {
            // SAFETY: caller contract: `holes` has `n_holes` entries.
            unsafe { std::slice::from_raw_parts(ref_arg(holes, "holes")?, n_holes) }
                .iter()
                .map(|h| crate::gpa_layout::Hole {
                    start: h.start,
                    len: h.size,
                })
                .collect()
        };
        let mapping = with_entry(b, |m, id| {
            m.objects()
                .get(id)
                .and_then(|e| e.backend.mapping())
                .ok_or_else(|| crate::backend::BackendError::NotAllocated(id.to_string()).into())
        })?;
        let pieces = crate::gpa_layout::lay_out(
            mapping.len() as u64,
            base,
            &holes,
            mapping.page_size() as u64,
        )?;
        if max > 0 {
            // SAFETY: caller contract: `out` has room for `max` entries.
            let out = unsafe { std::slice::from_raw_parts_mut(mut_arg(out, "out")?, max) };
            for (slot, p) in out.iter_mut().zip(&pieces) {
                *slot = HmRamRange {
                    gpa: p.gpa,
                    // SAFETY: `p.offset` lies inside the mapping (the pieces cover its length).
                    host: unsafe { mapping.as_ptr().add(p.offset as usize) }.cast(),
                    offset: p.offset,
                    size: p.len,
                };
            }
        }
        Ok(pieces.len() as isize)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;
    use std::ptr::null_mut;

    fn with_fresh_context<R>(f: impl FnOnce() -> R) -> R {
        // Tests run in parallel threads; the current context is process-wide, so each test
        // makes its own and the table lock keeps them apart only per call. Serialise them.
        static LOCK: Mutex<()> = Mutex::new(());
        let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let id = registry::insert(Machine::new());
        registry::set_current(id).unwrap();
        let r = f();
        registry::remove(id).unwrap();
        r
    }

    fn take_err(e: *mut Error) -> String {
        // SAFETY: e is a live error from hostmem, freed here.
        unsafe {
            let m = CStr::from_ptr(super::super::error::error_get_pretty(e))
                .to_string_lossy()
                .into_owned();
            super::super::error::error_free(e);
            m
        }
    }

    #[test]
    fn add_find_get_set_del_round_trip() {
        with_fresh_context(|| {
            // SAFETY: valid C strings and errp.
            unsafe {
                let mut err = null_mut();
                let b =
                    hm_memory_backend_add(c"memory-backend-ram,id=r,size=2M".as_ptr(), &mut err);
                assert!(!b.is_null());
                assert_eq!(hm_memory_backend_find(c"r".as_ptr()), b);
                assert!(hm_memory_backend_find(c"nope".as_ptr()).is_null());
                let mr = host_memory_backend_get_memory(b);
                assert!(!mr.is_null());
                assert_eq!(super::super::memory::memory_region_size(mr), 2 << 20);
                let v = hm_memory_backend_get(b, c"size".as_ptr(), &mut err);
                assert_eq!(CStr::from_ptr(v).to_str().unwrap(), "2097152");
                super::super::hm_free(v as *mut c_void);
                assert!(!hm_memory_backend_set(
                    b,
                    c"share".as_ptr(),
                    c"on".as_ptr(),
                    &mut err
                ));
                assert_eq!(take_err(err), "cannot change property value");
                err = null_mut();
                host_memory_backend_set_mapped(b, true);
                assert!(host_memory_backend_is_mapped(b));
                assert!(!hm_memory_backend_del(c"r".as_ptr(), &mut err));
                assert_eq!(take_err(err), "object 'r' is in use, can not be deleted");
                err = null_mut();
                host_memory_backend_set_mapped(b, false);
                assert!(hm_memory_backend_del(c"r".as_ptr(), &mut err));
                assert!(hm_memory_backend_find(c"r".as_ptr()).is_null());
                // The deleted backend's handle is still safe to pass, and says so.
                assert!(hm_memory_backend_get(b, c"size".as_ptr(), &mut err).is_null());
                assert_eq!(take_err(err), "memory backend no longer exists");
                assert!(host_memory_backend_get_memory(b).is_null());
            }
        });
    }

    #[test]
    fn a_handle_outliving_its_machine_says_the_backend_is_gone() {
        // SAFETY: valid C strings and errp.
        let b = with_fresh_context(|| unsafe {
            hm_memory_backend_add(c"memory-backend-ram,id=r,size=2M".as_ptr(), null_mut())
        });
        assert!(!b.is_null());
        let mut err = null_mut();
        // SAFETY: b is a handle hostmem made; its machine was removed by with_fresh_context.
        unsafe {
            assert!(!hm_memory_backend_set(
                b,
                c"merge".as_ptr(),
                c"on".as_ptr(),
                &mut err
            ));
        }
        assert_eq!(take_err(err), "memory backend no longer exists");
    }

    #[test]
    fn null_arguments_are_errors() {
        with_fresh_context(|| {
            // SAFETY: NULLs are allowed by the contract and must be refused.
            unsafe {
                let mut err = null_mut();
                assert!(hm_memory_backend_add(std::ptr::null(), &mut err).is_null());
                assert_eq!(take_err(err), "Parameter 'opts' is missing");
                err = null_mut();
                assert!(!hm_memory_backend_set(
                    null_mut(),
                    c"size".as_ptr(),
                    c"1".as_ptr(),
                    &mut err
                ));
                assert_eq!(take_err(err), "Parameter 'b' is missing");
                assert!(host_memory_backend_get_memory(null_mut()).is_null());
                assert!(hm_memory_backend_find(std::ptr::null()).is_null());
            }
        });
    }

    static CALLS: Mutex<Vec<(u64, u64, usize)>> = Mutex::new(Vec::new());

    unsafe extern "C" fn record(done: u64, total: u64, opaque: *mut c_void) {
        CALLS.lock().unwrap().push((done, total, opaque as usize));
    }

    #[test]
    fn step_by_step_with_progress_callback() {
        with_fresh_context(|| {
            // SAFETY: valid C strings, handles and errp.
            unsafe {
                let mut err = null_mut();
                let b = hm_memory_backend_new(
                    c"memory-backend-memfd".as_ptr(),
                    c"f".as_ptr(),
                    &mut err,
                );
                assert!(!b.is_null());
                assert!(host_memory_backend_get_memory(b).is_null());
                for (p, v) in [(c"size", c"8M"), (c"prealloc", c"on")] {
                    assert!(hm_memory_backend_set(b, p.as_ptr(), v.as_ptr(), &mut err));
                }
                assert!(hm_memory_backend_set_prealloc_progress(
                    b,
                    Some(record),
                    42 as *mut c_void,
                    &mut err
                ));
                assert!(
                    hm_memory_backend_complete(b, &mut err),
                    "{}",
                    if err.is_null() {
                        String::new()
                    } else {
                        take_err(err)
                    }
                );
                let calls = CALLS.lock().unwrap().clone();
                assert_eq!(calls.first(), Some(&(0, 8 << 20, 42)));
                assert_eq!(calls.last(), Some(&(8 << 20, 8 << 20, 42)));
                assert!(hm_memory_backend_get_fd(b) >= 0);
                assert_eq!(host_memory_backend_pagesize(b), 4096);
                let t = hm_memory_backend_trace(b, &mut err);
                assert_eq!(
                    CStr::from_ptr(t).to_str().unwrap(),
                    "allocate,hugepage,dontfork,mergeable,prealloc"
                );
                super::super::hm_free(t as *mut c_void);
                assert!(!hm_memory_backend_complete(b, &mut err));
                take_err(err);
            }
        });
    }
}
