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
use crate::machine::boards::{BoardListing, BoardProperty, PropertyKind};
use crate::machine::cpu::ThisHost;
use crate::machine::{BoardInfo, BoardRegistry, BuildEnv};
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
    /// QEMU's family: the versions of one machine ("pc_piix") list together in
    /// `-machine help`, newest first, before the standalone boards (NULL), which list by name.
    pub family: *const c_char,
    /// Non-NULL marks a deprecated machine type (QEMU 10: versions three years old or more):
    /// `-machine help` adds " (deprecated)", and building the machine warns
    /// "Machine type '<name>' is deprecated: <reason>" on stderr.
    pub deprecation_reason: *const c_char,
    /// QEMU's compat hook of old machine types: gets the RAM size once it is rounded up to
    /// 8 KiB (from -m, or the default size without -m) and returns the size to use, before
    /// anything is created; it may print, as QEMU's do. Not applied to the size of a
    /// `memory-backend` given without -m. Called with no hostmem lock held. May be NULL.
    pub fixup_ram_size: Option<unsafe extern "C" fn(ram_size: u64) -> u64>,
    /// QEMU's `default_cpu_type`, e.g. "qemu64-x86_64-cpu". With an x86 type, `-cpu` is read
    /// against QEMU 10's x86 models and the board's first CPU is resolved before its init
    /// (`MachineState.cpu_*`); NULL: the board has no CPU model and `-cpu` is not read.
    pub default_cpu_type: *const c_char,
    /// The board's own machine properties (QEMU: properties of its machine class), an array
    /// ended by an entry whose name is NULL; NULL for none. `-machine NAME=VALUE` sets them
    /// with QEMU's generic ones; the board reads a value with `hm_machine_get_property`.
    pub properties: *const MachineProperty,
    /// The board's own per-class data (QEMU's TypeInfo.class_data), e.g. compat flags that
    /// differ between versions of one family. hostmem never reads it. May be NULL.
    pub class_data: *const c_void,
}

/// The type of a board's machine property.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HmPropertyKind {
    /// A size ("2G"), as QEMU's size visitor reads it.
    Size = 0,
    /// on/off (the value is 0 or 1).
    Bool = 1,
}

/// A property a board adds to its machine type.
#[repr(C)]
pub struct MachineProperty {
    pub name: *const c_char,
    pub kind: HmPropertyKind,
    /// QEMU's property setter, for its checks and warnings: called when `-machine` sets the
    /// property, with the value read (0 or 1 for a boolean) and no hostmem lock held; returns
    /// false with `*errp` set (`hm_error_set`) to refuse the value. NULL accepts any value.
    pub check: Option<
        unsafe extern "C" fn(
            mc: *const MachineClass,
            name: *const c_char,
            value: u64,
            errp: *mut *mut Error,
        ) -> bool,
    >,
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
    /// The board's first CPU (boards with an x86 `default_cpu_type`; NULL/0/false otherwise):
    /// QEMU's `machine->cpu_type`, e.g. "qemu64-x86_64-cpu" (static storage).
    pub cpu_type: *const c_char,
    /// Its physical address width, as QEMU 10 realizes it (40 by default for 64-bit models,
    /// the host's under KVM with host-phys-bits, 36 or 32 for 32-bit ones).
    pub cpu_phys_bits: u32,
    /// Its vendor is "AuthenticAMD" (QEMU's IS_AMD_CPU; under KVM the host's vendor).
    pub cpu_vendor_amd: bool,
    /// It is 64-bit (long mode).
    pub cpu_long_mode: bool,
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
            default_cpu_type: opt_str(mc.default_cpu_type),
            properties: class_properties(mc)
                .map(|(name, p)| BoardProperty {
                    name,
                    kind: match p.kind {
                        HmPropertyKind::Size => PropertyKind::Size,
                        HmPropertyKind::Bool => PropertyKind::Bool,
                    },
                })
                .collect(),
        }
    }
}

/// The class's properties with their names.
fn class_properties(mc: &MachineClass) -> impl Iterator<Item = (String, &MachineProperty)> {
    let mut i = 0;
    std::iter::from_fn(move || {
        if mc.properties.is_null() {
            return None;
        }
        // SAFETY: `properties` is a static array ended by a NULL name (registration contract),
        // and `i` never passes that end.
        let p = unsafe { &*mc.properties.add(i) };
        // SAFETY: property names are static NUL-terminated strings (same contract).
        let name = unsafe { opt_str(p.name) }?;
        i += 1;
        Some((name, p))
    })
}

/// The class's C hooks, as the generic machine code calls them.
struct ClassHooks<'a>(&'a MachineClass);

impl crate::machine::BoardHooks for ClassHooks<'_> {
    fn fixup_ram_size(&mut self, size: u64) -> u64 {
        match self.0.fixup_ram_size {
            // SAFETY: the board's hook takes and returns a size; no hostmem lock is held.
            Some(fixup) => unsafe { fixup(size) },
            None => size,
        }
    }

    fn check_property(&mut self, name: &str, value: u64) -> Result<()> {
        let Some((_, prop)) = class_properties(self.0).find(|(n, _)| n == name) else {
            return Ok(());
        };
        let Some(check) = prop.check else {
            return Ok(());
        };
        let mut err: *mut Error = null_mut();
        // SAFETY: the board's setter gets its class, the property's static name, the value and
        // an errp it may set; no hostmem lock is held.
        let ok = unsafe { check(self.0, prop.name, value, &mut err) };
        // SAFETY: `err` is NULL or an error hostmem made for the hook; C does not use it again.
        let taken = unsafe { crate::ffi::error::take_error(err) };
        match (ok, taken) {
            (true, None) => Ok(()),
            (true, Some(_)) => Ok(()),
            (false, Some(e)) => Err(e),
            (false, None) => Err(Error::invalid(format!(
                "Property '{name}' refused its value without saying why"
            ))),
        }
    }
}

fn board_listing(mc: &MachineClass) -> BoardListing {
    // SAFETY: class strings are static NUL-terminated strings (registration contract).
    unsafe {
        BoardListing {
            desc: opt_str(mc.desc),
            family: opt_str(mc.family),
            deprecation_reason: opt_str(mc.deprecation_reason),
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
        boards().register(board_info(class), board_listing(class), ClassPtr(mc))?;
        Ok(true)
    })
}

/// Storage C boards point into: `machine->ram`, `machine->cpu_type`. Boxed so its address
/// is stable.
#[repr(C)]
struct MachineBox {
    state: MachineState,
    ram: MemoryRegion,
    cpu_type: Option<std::ffi::CString>,
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
        let args = unsafe { argv_strings(argc, argv) }?;
        let mut read_warnings = Vec::new();
        let read = Cmdline::read(&args, &mut read_warnings);
        for w in read_warnings {
            warn(w);
        }
        let cmd = read?;
        if cmd.machine_help {
            return Err(Error::invalid(
                "the command line asks for the list of machine types: use hm_machine_help_from_argv()",
            ));
        }
        machine_from_cmdline(&cmd)
    })
}

/// Builds a machine from a read command line with the registered board it names: the
/// options applied with the class's hooks, the generic code, the board's init, the
/// accelerator. The machine is current afterwards.
pub(crate) fn machine_from_cmdline(cmd: &Cmdline) -> Result<*mut MachineState> {
    let (info, mc) = {
        let boards = boards();
        let (info, class) = boards.find(cmd.machine_type.as_deref())?;
        (info.clone(), class.0)
    };
    // SAFETY: `mc` is a registered class (static, per the registration contract).
    let class = unsafe { &*mc };
    check_objects_as_read(cmd)?;
    // The class's hooks (RAM size fixup, property setters) run with no hostmem lock held.
    let options = crate::machine::options::apply(cmd, &info, &mut ClassHooks(class))?;
    warn_if_deprecated(class, &info);
    let mut env = BuildEnv {
        host: &ThisHost,
        warn: &mut warn,
    };
    let mut pending = PendingMachine::start_with(cmd, &info, &options, &mut env)?;
    let ms = new_machine_state(pending.id(), mc, cmd)?;
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
}

/// Prints one of QEMU's warnings as QEMU does: "<program>: " and the text (which says
/// "warning: " itself, after its location if it has one).
fn warn(text: String) {
    eprintln!("{}: {text}", crate::ffi::error::program_name());
}

/// What QEMU refuses while it reads each `-object` (type, id, members, value syntax): those
/// errors come before anything the machine checks, as in QEMU. Creating the objects comes
/// later ([`PendingMachine::start_with`]), which reads them again.
fn check_objects_as_read(cmd: &Cmdline) -> Result<()> {
    let objects = crate::objects::ObjectRegistry::default();
    for object in &cmd.objects {
        objects
            .parse_opts(&object.text)
            .map_err(|e| e.at("-object", &object.text))?;
    }
    Ok(())
}

/// QEMU's warning for a deprecated machine type, printed where QEMU prints it: once the
/// machine's options are applied and the accelerator chosen (a bad one fails without the
/// warning), before any backend is created.
fn warn_if_deprecated(class: &MachineClass, info: &BoardInfo) {
    // SAFETY: class strings are static NUL-terminated strings (registration contract).
    if let Some(reason) = unsafe { opt_str(class.deprecation_reason) } {
        warn(format!(
            "warning: Machine type '{}' is deprecated: {reason}",
            info.name
        ));
    }
}

/// What QEMU prints for `-machine help` on this command line, or `None` when it asks for no
/// help. Options before the help option are read as QEMU reads them; the `-object` ones among
/// them too (QEMU checks their syntax while reading). A type named with the help request
/// means its property list in QEMU, which hostmem does not have.
fn machine_help(args: &[String]) -> Result<Option<String>> {
    let cmd = Cmdline::read(args, &mut Vec::new())?;
    if !cmd.machine_help {
        return Ok(None);
    }
    check_objects_as_read(&cmd)?;
    let boards = boards();
    if let Some((info, _)) = cmd
        .machine_type
        .as_deref()
        .and_then(|t| boards.find(Some(t)).ok())
    {
        return Err(Error::new(
            crate::error::HmErrorClass::Unsupported,
            format!(
                "listing the properties of machine type '{}' is not supported",
                info.name
            ),
        ));
    }
    Ok(Some(boards.help_text()))
}

/// `-machine help` (`-M help`, `-M ?`): when the command line asks for the list of machine
/// types, returns what QEMU 10 prints for it (header, then every registered board in QEMU's
/// order and format; release with hm_free), and the VMM prints it on stdout and exits 0, as
/// QEMU does. Returns NULL without an error when the command line asks for no help. Fails
/// with QEMU's error where QEMU refuses the line before it lists anything (an option before
/// the help option, an unknown option anywhere; a line without help that does not parse fails
/// here as in hm_machine_new_from_argv), and when the help names a machine type (QEMU then
/// lists that type's properties, which hostmem cannot).
///
/// # Safety
/// `argv` holds `argc` NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn hm_machine_help_from_argv(
    argc: c_int,
    argv: *const *const c_char,
    errp: *mut *mut Error,
) -> *mut c_char {
    guard(errp, null_mut(), || {
        // SAFETY: forwarded caller contract.
        let args = unsafe { argv_strings(argc, argv) }?;
        Ok(machine_help(&args)?.map_or(null_mut(), |text| c_string(&text)))
    })
}

/// The strings of `argv[1..argc]`.
///
/// # Safety
/// `argv` holds `argc` NUL-terminated strings.
pub(crate) unsafe fn argv_strings(argc: c_int, argv: *const *const c_char) -> Result<Vec<String>> {
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
    let (ram, ram_size, maxram_size, ram_slots, memdev, cpu) = registry::with(id, |m| {
        let c = m
            .config()
            .ok_or_else(|| Error::generic("the machine has no configuration"))?;
        Ok((
            c.ram,
            c.ram_size,
            c.maxram_size,
            c.ram_slots,
            c.memdev.clone(),
            c.cpu.clone(),
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
            cpu_type: std::ptr::null(),
            cpu_phys_bits: cpu.as_ref().map_or(0, |c| c.phys_bits),
            cpu_vendor_amd: cpu.as_ref().is_some_and(|c| c.is_amd()),
            cpu_long_mode: cpu.as_ref().is_some_and(|c| c.long_mode),
        },
        ram: MemoryRegion::default(),
        cpu_type: cpu.and_then(|c| std::ffi::CString::new(c.type_name).ok()),
    });
    if let Some(t) = &boxed.cpu_type {
        boxed.state.cpu_type = t.as_ptr();
    }
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

/// What other parts of the C skin keep per machine (the test guest's vCPU) goes through these
/// when a machine is freed, before the machine itself.
static FREE_HOOKS: std::sync::Mutex<Vec<fn(registry::MachineId)>> =
    std::sync::Mutex::new(Vec::new());

/// Has `hook` run for every machine freed from now on.
#[cfg_attr(
    not(all(feature = "test-guest", target_arch = "x86_64")),
    allow(dead_code, reason = "the test guest is its only user so far")
)]
pub(crate) fn on_machine_free(hook: fn(registry::MachineId)) {
    let mut hooks = FREE_HOOKS.lock().unwrap_or_else(|p| p.into_inner());
    if !hooks.contains(&hook) {
        hooks.push(hook);
    }
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
        let hooks = FREE_HOOKS.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for hook in hooks {
            hook(id);
        }
        let _ = registry::remove(id);
        forget_machine(id);
        Ok(())
    })
}

/// The value of the board's own machine property `name` (see `MachineClass.properties`), when
/// `-machine` set it: true with `*value` set (a size in bytes, a boolean as 0 or 1); false when
/// it was not given (the board applies its default). An unknown `ms` is false too.
///
/// # Safety
/// `ms` is NULL or a live machine; `name` is NULL or NUL-terminated; `value` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn hm_machine_get_property(
    ms: *const MachineState,
    name: *const c_char,
    value: *mut u64,
) -> bool {
    guard_report(false, || {
        // SAFETY: by contract.
        let (ms, name) = unsafe { (ref_arg(ms, "ms")?, str_arg(name, "name")?) };
        let found = registry::with(ms.context, |m| Ok(m.board_property(name)))?;
        match found {
            Some(v) => {
                if !value.is_null() {
                    // SAFETY: a non-NULL `value` is writable by contract.
                    unsafe { *value = v };
                }
                Ok(true)
            }
            None => Ok(false),
        }
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
/// `cmdline` is the line as typed, in any bytes: QEMU's monitor takes invalid UTF-8 too, so
/// such bytes are not refused but read as U+FFFD (and echoed so in an error message).
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
        if cmdline.is_null() {
            return Err(Error::invalid("Parameter 'cmdline' is missing"));
        }
        // SAFETY: non-NULL and NUL-terminated by the caller's contract.
        let cmd = unsafe { CStr::from_ptr(cmdline) }.to_string_lossy();
        let out = registry::hmp::hmp(ms.context, &cmd, &registry::transports::HostTransports)?;
        Ok(c_string(&out))
    })
}

/// The context id of the current machine (for C APIs keyed by context).
#[no_mangle]
pub extern "C" fn hm_context_current() -> u32 {
    guard_report(0, || Ok(registry::current_id()))
}

/// QEMU's `kvm_set_max_memslot_size`, for a board's init (QEMU's s390 code calls it): the
/// current machine's KVM slots are cut at `max_slot_size` bytes at most, a whole number of
/// host pages; a smaller `-accel kvm,max-slot-size` still wins. Misuse (after the slots
/// exist, an unaligned size) is reported and fails the machine being built.
#[no_mangle]
pub extern "C" fn kvm_set_max_memslot_size(max_slot_size: u64) {
    crate::ffi::memory::void_export(|ctx| {
        let id = registry::current_id();
        *ctx = Some(id);
        registry::with(id, |m| m.set_kvm_max_slot_size(max_slot_size))
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    /// s390's rule for 4.2 and older, in short: whole 2 MiB increments.
    unsafe extern "C" fn round_to_2m(size: u64) -> u64 {
        size & !((2 << 20) - 1)
    }

    /// A size setter that refuses more than 4 GiB.
    unsafe extern "C" fn at_most_4g(
        _mc: *const MachineClass,
        _name: *const c_char,
        value: u64,
        errp: *mut *mut Error,
    ) -> bool {
        if value > 4 << 30 {
            // SAFETY: a valid errp and a NUL-terminated message.
            unsafe { crate::ffi::error::hm_error_set(errp, c"too big".as_ptr()) };
            return false;
        }
        true
    }

    const PROPS: [MachineProperty; 2] = [
        MachineProperty {
            name: c"max-ram-below-4g".as_ptr(),
            kind: HmPropertyKind::Size,
            check: Some(at_most_4g),
        },
        MachineProperty {
            name: std::ptr::null(),
            kind: HmPropertyKind::Size,
            check: None,
        },
    ];

    fn class(fixup: Option<unsafe extern "C" fn(u64) -> u64>) -> MachineClass {
        MachineClass {
            name: c"s390-ccw-virtio-4.2".as_ptr(),
            alias: std::ptr::null(),
            desc: std::ptr::null(),
            init: None,
            default_ram_size: 129 << 20,
            default_ram_id: c"s390.ram".as_ptr(),
            numa_mem_supported: false,
            is_default: false,
            no_cpus_by_default: false,
            no_numa_support: true,
            cleanup: None,
            family: std::ptr::null(),
            deprecation_reason: std::ptr::null(),
            fixup_ram_size: fixup,
            default_cpu_type: std::ptr::null(),
            properties: PROPS.as_ptr(),
            class_data: std::ptr::null(),
        }
    }

    /// (the RAM size, the properties) once the class's hooks ran on `args`.
    fn applied(
        fixup: Option<unsafe extern "C" fn(u64) -> u64>,
        args: &[&str],
    ) -> Result<(u64, Vec<(String, u64)>)> {
        let class = class(fixup);
        let cmd = Cmdline::parse(args).unwrap();
        let o = crate::machine::options::apply(&cmd, &board_info(&class), &mut ClassHooks(&class))?;
        Ok((o.ram_size, o.board_properties))
    }

    #[test]
    fn the_fixup_gets_the_m_size_rounded_up_to_8k() {
        // 4 MiB - 1 byte is rounded up to 8 KiB first (4 MiB), so rounding down to 2 MiB keeps
        // 4 MiB; without the first step it would be 2 MiB.
        assert_eq!(
            applied(Some(round_to_2m), &["-m", "4194303B"]).unwrap().0,
            4 << 20
        );
        assert_eq!(
            applied(Some(round_to_2m), &["-m", "2001M"]).unwrap().0,
            2000 << 20
        );
    }

    #[test]
    fn without_m_the_fixup_gets_the_default_size() {
        assert_eq!(applied(Some(round_to_2m), &[]).unwrap().0, 128 << 20);
        assert_eq!(
            applied(Some(round_to_2m), &["-m", "0"]).unwrap().0,
            128 << 20
        );
        assert_eq!(applied(None, &["-m", "2001M"]).unwrap().0, 2001 << 20);
    }

    #[test]
    fn board_properties_reach_the_class_setter() {
        let (_, props) = applied(None, &["-M", "max-ram-below-4g=2G"]).unwrap();
        assert_eq!(props, [("max-ram-below-4g".to_string(), 2 << 30)]);
        let e = applied(None, &["-M", "max-ram-below-4g=5G"]).unwrap_err();
        assert_eq!(e.message(), "too big");
        let e = applied(None, &["-M", "bogus=1"]).unwrap_err();
        assert_eq!(
            e.message(),
            "Property 's390-ccw-virtio-4.2-machine.bogus' not found"
        );
    }
}
