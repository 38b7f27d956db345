//! `MachineClass` / `MachineState` for C boards and VMMs, board registration, the one call that
//! turns a QEMU command line into a running machine configuration, HMP, and the legacy
//! `memory_region_allocate_system_memory()`.
//!
//! Ownership: a `MachineState *` from `hm_machine_new_from_argv` is freed with
//! `hm_machine_free`, which also drops the machine (regions, RAMBlocks, backends).
//! `MachineClass` structs are the board's, and must outlive the process (static storage).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr::null_mut;
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::ffi::backend::{hm_memory_backend_find, HostMemoryBackend};
use crate::ffi::memory::{forget_machine, take_pending_error, MemoryRegion, Object};
use crate::ffi::{c_string, guard, guard_report, mut_arg, ref_arg, str_arg};
use crate::machine::{BoardInfo, BoardRegistry};
use crate::options::cmdline::{Accel, Cmdline};
use crate::registry::{self, MachineId, PendingMachine};

/// A board type, as board code declares it (the RAM-relevant part of QEMU's MachineClass).
#[repr(C)]
pub struct MachineClass {
    /// Full type name, e.g. "pc-i440fx-10.0".
    pub name: *const c_char,
    /// Short name accepted by -M, e.g. "pc" (may be NULL).
    pub alias: *const c_char,
    pub desc: *const c_char,
    /// Builds the board: maps `machine->ram`, adds its own regions.
    pub init: Option<unsafe extern "C" fn(machine: *mut MachineState)>,
    /// Used when -m is absent or 0.
    pub default_ram_size: u64,
    /// Name of main RAM (implicit backend id and RAMBlock); NULL for boards that take no -m.
    pub default_ram_id: *const c_char,
    /// Whether `-numa node,mem=` (legacy "fake" NUMA) is still accepted: old machine types only.
    pub numa_mem_supported: bool,
    /// The board -M defaults to.
    pub is_default: bool,
    /// The board starts without a CPU unless -smp asks for one (QEMU's `none`).
    pub no_cpus_by_default: bool,
    /// The board has no NUMA: any -numa option is refused (QEMU's `none`, `s390-ccw-virtio`).
    pub no_numa_support: bool,
    /// Releases what `init` allocated for the board (typically `machine->opaque`). Called by
    /// `hm_machine_free` before the machine's regions go, and so also when a machine fails
    /// after its init ran. QEMU has no such hook because its process just exits. May be NULL.
    pub cleanup: Option<unsafe extern "C" fn(machine: *mut MachineState)>,
}

/// One machine, as board code sees it (the RAM-relevant part of QEMU's MachineState), plus the
/// VMM-level options of its command line.
#[repr(C)]
pub struct MachineState {
    pub mc: *const MachineClass,
    /// Main RAM for the board to map: the backend's region or the NUMA container. NULL when the
    /// board has no default_ram_id (it allocates its own, or calls the legacy function).
    pub ram: *mut MemoryRegion,
    pub ram_size: u64,
    pub maxram_size: u64,
    pub ram_slots: u64,
    /// The backend behind `ram` (NULL with NUMA memdevs or without RAM).
    pub memdev: *mut HostMemoryBackend,
    /// The hostmem context of this machine.
    pub context: u32,
    /// Board private state.
    pub opaque: *mut c_void,
    /// -S
    pub start_paused: bool,
    /// -monitor stdio
    pub monitor_stdio: bool,
    /// -accel kvm, -enable-kvm, -machine accel=kvm
    pub accel_kvm: bool,
    /// -accel kvm,max-slot-size=SIZE (0: the kernel's limit)
    pub kvm_max_slot_size: u64,
}

struct ClassPtr(*const MachineClass);
// SAFETY: registered classes are immutable static data owned by board code for the whole
// process (documented contract of hm_machine_class_register); sharing the pointer is sound.
unsafe impl Send for ClassPtr {}

fn boards() -> MutexGuard<'static, BoardRegistry<ClassPtr>> {
    static BOARDS: Mutex<BoardRegistry<ClassPtr>> = Mutex::new(BoardRegistry::new());
    BOARDS.lock().unwrap_or_else(|p| p.into_inner())
}

/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn opt_str(p: *const c_char) -> Option<String> {
    // SAFETY: by the caller's contract.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

fn board_info(mc: &MachineClass) -> BoardInfo {
    // SAFETY: class strings are static NUL-terminated strings (registration contract).
    unsafe {
        BoardInfo {
            name: opt_str(mc.name).unwrap_or_default(),
            alias: opt_str(mc.alias),
            default_ram_size: mc.default_ram_size,
            default_ram_id: opt_str(mc.default_ram_id),
            numa_mem_supported: mc.numa_mem_supported,
            numa_supported: !mc.no_numa_support,
            no_cpus_by_default: mc.no_cpus_by_default,
            is_default: mc.is_default,
        }
    }
}

/// Registers a board type. `mc` and its strings must stay valid for the whole process (static
/// storage, as QEMU's type_init classes are). A name or alias already taken is an error.
///
/// # Safety
/// `mc` is NULL or points to a MachineClass with static lifetime.
#[no_mangle]
pub unsafe extern "C" fn hm_machine_class_register(
    mc: *const MachineClass,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: by this function's contract.
        let class = unsafe { ref_arg(mc, "mc") }?;
        boards().register(board_info(class), ClassPtr(mc))?;
        Ok(true)
    })
}

/// Storage C boards point into: `machine->ram`. Boxed so its address is stable.
#[repr(C)]
struct MachineBox {
    state: MachineState,
    ram: MemoryRegion,
}

/// Builds a machine from a QEMU command line (`argv[0]` is the program name): parses the
/// options, creates the machine and makes it current, creates the `-object` backends, decides
/// `machine->ram` (explicit memory-backend, implicit backend from -m/-mem-path/-mem-prealloc,
/// or NUMA container), then runs the board's init and attaches the accelerator. Errors carry
/// QEMU 10's message for the same command line; nothing is left behind on failure, and the
/// machine that was current before stays current.
///
/// # Safety
/// `argv` holds `argc` NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hm_machine_new_from_argv(
    argc: c_int,
    argv: *const *const c_char,
    errp: *mut *mut Error,
) -> *mut MachineState {
    guard(errp, null_mut(), || {
        // SAFETY: forwarded caller contract.
        let cmd = Cmdline::parse(&unsafe { argv_strings(argc, argv) }?)?;
        let (info, mc) = {
            let boards = boards();
            let (info, class) = boards.find(cmd.machine_type.as_deref())?;
            (info.clone(), class.0)
        };
        let mut pending = PendingMachine::start(&cmd, &info)?;
        let ms = new_machine_state(pending.id(), mc, &cmd)?;
        // The board runs with no hostmem lock held, so it may call any hostmem function.
        // SAFETY: `mc` is a registered static class; `ms` is a live MachineState we own.
        if let Some(init) = unsafe { (*mc).init } {
            // SAFETY: board init receives the machine it is building, as in QEMU.
            unsafe { init(ms) };
        }
        // A board that misused the memory API (reported when it happened) fails the machine.
        let finished = match take_pending_error(pending.id()) {
            Some(e) => Err(e),
            None => pending.finish_init(),
        };
        if let Err(e) = finished {
            // SAFETY: `ms` is the live machine made above, not shared beyond the board.
            unsafe { free_machine_state(ms) };
            return Err(e);
        }
        pending.commit();
        Ok(ms)
    })
}

/// The strings of `argv[1..argc]`.
///
/// # Safety
/// `argv` holds `argc` NUL-terminated strings.
unsafe fn argv_strings(argc: c_int, argv: *const *const c_char) -> Result<Vec<String>> {
    if argv.is_null() && argc > 0 {
        return Err(Error::invalid("Parameter 'argv' is missing"));
    }
    let mut args = Vec::new();
    for i in 1..argc.max(0) as usize {
        // SAFETY: argv holds argc pointers by contract.
        let p = unsafe { *argv.add(i) };
        // SAFETY: each is NUL-terminated by contract.
        args.push(unsafe { str_arg(p, "argv") }?.to_string());
    }
    Ok(args)
}

/// The `MachineState` board code sees for machine `id`, which must be current.
fn new_machine_state(
    id: MachineId,
    mc: *const MachineClass,
    cmd: &Cmdline,
) -> Result<*mut MachineState> {
    let (ram, ram_size, maxram_size, ram_slots, memdev) = registry::with(id, |m| {
        let c = m
            .config()
            .ok_or_else(|| Error::generic("the machine has no configuration"))?;
        Ok((
            c.ram,
            c.ram_size,
            c.maxram_size,
            c.ram_slots,
            c.memdev.clone(),
        ))
    })?;
    let memdev = match memdev.map(std::ffi::CString::new) {
        // SAFETY: a valid NUL-terminated string; the machine is current.
        Some(Ok(name)) => unsafe { hm_memory_backend_find(name.as_ptr()) },
        _ => null_mut(),
    };
    let mut boxed = Box::new(MachineBox {
        state: MachineState {
            mc,
            ram: null_mut(),
            ram_size,
            maxram_size,
            ram_slots,
            memdev,
            context: id,
            opaque: null_mut(),
            start_paused: cmd.start_paused,
            monitor_stdio: cmd.monitor_stdio,
            accel_kvm: cmd.accel == Some(Accel::Kvm),
            kvm_max_slot_size: cmd.kvm_max_slot_size,
        },
        ram: MemoryRegion::default(),
    });
    if let Some(r) = ram {
        boxed.ram = MemoryRegion::new(id, r);
        boxed.state.ram = &mut boxed.ram;
    }
    Ok(Box::into_raw(boxed) as *mut MachineState)
}

/// Runs the board's cleanup hook and frees the C side of a machine (not the machine itself).
///
/// # Safety
/// `ms` is a live machine from `new_machine_state`, freed only here.
unsafe fn free_machine_state(ms: *mut MachineState) -> MachineId {
    // The board releases its own state first, with no hostmem lock held.
    // SAFETY: `ms` is a live machine (contract); its class is a registered static.
    if let Some(cleanup) = unsafe { (*(*ms).mc).cleanup } {
        // SAFETY: the board's hook receives the machine its init built, as documented.
        unsafe { cleanup(ms) };
    }
    // SAFETY: MachineState is the first field of the #[repr(C)] MachineBox allocated in
    // new_machine_state, so the pointer is the box's; we cast back to it.
    let boxed = unsafe { Box::from_raw(ms as *mut MachineBox) };
    boxed.state.context
}

/// Frees a machine: the board's cleanup hook, then the machine (regions, RAMBlocks, backends,
/// the KVM VM once no vCPU of it runs). NULL is ignored.
///
/// # Safety
/// `ms` is NULL or a machine from `hm_machine_new_from_argv`, not freed yet.
#[no_mangle]
pub unsafe extern "C" fn hm_machine_free(ms: *mut MachineState) {
    guard_report((), || {
        if ms.is_null() {
            return Ok(());
        }
        // SAFETY: by this function's contract.
        let id = unsafe { free_machine_state(ms) };
        #[cfg(all(feature = "test-guest", target_arch = "x86_64"))]
        crate::ffi::testing::forget_machine(id);
        let _ = registry::remove(id);
        forget_machine(id);
        Ok(())
    })
}

/// Makes `ms`'s context current, so QEMU-style globals (get_system_memory(), backends by id)
/// resolve to it. For VMMs running two machines in one process.
///
/// # Safety
/// `ms` is NULL or a live machine.
#[no_mangle]
pub unsafe extern "C" fn hm_machine_make_current(
    ms: *mut MachineState,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: by contract.
        let ms = unsafe { ref_arg(ms, "ms") }?;
        registry::set_current(ms.context)?;
        Ok(true)
    })
}

/// Runs one HMP command on the machine and returns its output (release with hm_free).
///
/// # Safety
/// `ms` is NULL or a live machine; `cmdline` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn hm_hmp(
    ms: *mut MachineState,
    cmdline: *const c_char,
    errp: *mut *mut Error,
) -> *mut c_char {
    guard(errp, null_mut(), || {
        // SAFETY: by contract.
        let ms = unsafe { ref_arg(ms, "ms") }?;
        // SAFETY: by contract.
        let cmd = unsafe { str_arg(cmdline, "cmdline") }?;
        let out = registry::hmp::hmp(ms.context, cmd, &registry::transports::HostTransports)?;
        Ok(c_string(&out))
    })
}

/// The context id of the current machine (for C APIs keyed by context).
#[no_mangle]
pub extern "C" fn hm_context_current() -> u32 {
    guard_report(0, || Ok(registry::current_id()))
}

fn legacy_allocate(mr: *mut MemoryRegion, name: *const c_char, size: u64) -> Result<()> {
    // SAFETY: `mr` is the caller's MemoryRegion storage (checked for NULL by mut_arg).
    let mr = unsafe { mut_arg(mr, "mr") }?;
    // SAFETY: `name` is NULL or NUL-terminated (QEMU's contract for region names).
    let name = unsafe { str_arg(name, "name") }?;
    let (id, region) =
        registry::with_current(|id, m| Ok((id, m.allocate_system_memory(name, size)?)))?;
    *mr = MemoryRegion::new(id, region);
    Ok(())
}

/// The legacy main-RAM allocation of QEMU before 5.0, for boards not converted yet. Exits
/// with the error, like QEMU, when it fails (see the `_err` form to handle it instead).
///
/// # Safety
/// `mr` is NULL or MemoryRegion storage that outlives the machine; `name` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn memory_region_allocate_system_memory(
    mr: *mut MemoryRegion,
    _owner: *mut Object,
    name: *const c_char,
    ram_size: u64,
) {
    let fatal = std::ptr::addr_of_mut!(crate::ffi::error::error_fatal);
    guard(fatal, (), || legacy_allocate(mr, name, ram_size));
}

/// `memory_region_allocate_system_memory` with an error instead of an exit.
///
/// # Safety
/// As for `memory_region_allocate_system_memory`.
#[no_mangle]
pub unsafe extern "C" fn hm_memory_region_allocate_system_memory(
    mr: *mut MemoryRegion,
    _owner: *mut Object,
    name: *const c_char,
    ram_size: u64,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        legacy_allocate(mr, name, ram_size).map(|_| true)
    })
}

/// QEMU's size_to_str ("32 MiB"); release with hm_free.
#[no_mangle]
pub extern "C" fn size_to_str(size: u64) -> *mut c_char {
    guard_report(null_mut(), || {
        Ok(c_string(&crate::options::values::size_to_str(size)))
    })
}
