//! Migration for C: a VMM's own device sections (QEMU's `register_savevm_live` in spirit, with
//! QEMU's `qemu_put_*` / `qemu_get_*` for their payloads), the hooks that let a migration stop
//! and resume the VMM's vCPUs, and the incoming side of `-incoming`.
//!
//! Callbacks run on hostmem's migration threads with no hostmem lock held, so they may call
//! hostmem. The `HmQemuFile *` they get is valid for the call only.

use std::ffi::{c_char, c_int, c_void};
use std::io::Write;
use std::sync::Arc;

use super::machine::MachineState;
use super::{guard, guard_report, ref_arg, str_arg};
use crate::error::{Error, HmErrorClass, Result};
use crate::machine::GuestControl;
use crate::migration::error::MigrationError;
use crate::migration::qemu_file::{QemuReader, QemuWriter};
use crate::migration::section::{SectionHandler, SectionPhase, StreamRead};
use crate::migration::state::MigrationStatus;
use crate::registry;

/// A section's payload in a FULL section (non-iterative sections have only this).
pub const HM_SECTION_FULL: c_int = 0;
/// An iterative section's setup, rounds and completion.
pub const HM_SECTION_START: c_int = 1;
pub const HM_SECTION_PART: c_int = 2;
pub const HM_SECTION_END: c_int = 3;

fn phase_number(p: SectionPhase) -> c_int {
    match p {
        SectionPhase::Full => HM_SECTION_FULL,
        SectionPhase::Start => HM_SECTION_START,
        SectionPhase::Part => HM_SECTION_PART,
        SectionPhase::End => HM_SECTION_END,
    }
}

/// The stream a section callback writes or reads. Opaque; valid during the callback only.
pub struct HmQemuFile {
    writer: Option<*mut QemuWriter<dyn Write + 'static>>,
    reader: Option<*mut QemuReader<dyn StreamRead + 'static>>,
    /// The first failure, sticky as QEMUFile's error is: later calls do nothing.
    error: Option<MigrationError>,
}

impl HmQemuFile {
    fn put(
        &mut self,
        f: impl FnOnce(&mut QemuWriter<dyn Write>) -> std::result::Result<(), MigrationError>,
    ) {
        if self.error.is_some() {
            return;
        }
        let Some(w) = self.writer else {
            self.error = Some(MigrationError::Usage(
                "qemu_put_* on a section being loaded".to_string(),
            ));
            return;
        };
        // SAFETY: the pointer was made from a live `&mut QemuWriter` for the duration of the
        // callback that received this file (CSection::save), and is used only on that thread.
        if let Err(e) = f(unsafe { &mut *w }) {
            self.error = Some(e);
        }
    }

    fn get<T: Default>(
        &mut self,
        f: impl FnOnce(&mut QemuReader<dyn StreamRead>) -> std::result::Result<T, MigrationError>,
    ) -> T {
        if self.error.is_some() {
            return T::default();
        }
        let Some(r) = self.reader else {
            self.error = Some(MigrationError::Usage(
                "qemu_get_* on a section being saved".to_string(),
            ));
            return T::default();
        };
        // SAFETY: as in `put`, for the reader CSection::load lent for the callback.
        match f(unsafe { &mut *r }) {
            Ok(v) => v,
            Err(e) => {
                self.error = Some(e);
                T::default()
            }
        }
    }
}

/// # Safety
/// `f` is NULL or the file a section callback received, during that callback.
unsafe fn file<'a>(f: *mut HmQemuFile) -> Option<&'a mut HmQemuFile> {
    // SAFETY: by the caller's contract.
    unsafe { f.as_mut() }
}

/// The body of the `hm_qemu_put_*` exports.
///
/// # Safety
/// `f` is NULL or the file a save callback received, during that callback.
unsafe fn put(
    f: *mut HmQemuFile,
    op: impl FnOnce(&mut QemuWriter<dyn Write>) -> std::result::Result<(), MigrationError>,
) {
    guard_report((), || {
        // SAFETY: forwarded caller contract.
        if let Some(f) = unsafe { file(f) } {
            f.put(op);
        }
        Ok(())
    })
}

/// The body of the `hm_qemu_get_*` exports.
///
/// # Safety
/// `f` is NULL or the file a load callback received, during that callback.
unsafe fn get<T: Default>(
    f: *mut HmQemuFile,
    op: impl FnOnce(&mut QemuReader<dyn StreamRead>) -> std::result::Result<T, MigrationError>,
) -> T {
    guard_report(T::default(), || {
        // SAFETY: forwarded caller contract.
        Ok(match unsafe { file(f) } {
            Some(f) => f.get(op),
            None => T::default(),
        })
    })
}

/// `qemu_put_byte`: one byte.
///
/// # Safety
/// `f` is the file a section's save callback received, during that callback.
#[no_mangle]
pub unsafe extern "C" fn hm_qemu_put_byte(f: *mut HmQemuFile, v: u8) {
    // SAFETY: forwarded caller contract.
    unsafe { put(f, |w| w.put_u8(v)) }
}

/// `qemu_put_be16`: a big-endian 16-bit value.
///
/// # Safety
/// `f` is the file a section's save callback received, during that callback.
#[no_mangle]
pub unsafe extern "C" fn hm_qemu_put_be16(f: *mut HmQemuFile, v: u16) {
    // SAFETY: forwarded caller contract.
    unsafe { put(f, |w| w.put_be16(v)) }
}

/// `qemu_put_be32`: a big-endian 32-bit value.
///
/// # Safety
/// `f` is the file a section's save callback received, during that callback.
#[no_mangle]
pub unsafe extern "C" fn hm_qemu_put_be32(f: *mut HmQemuFile, v: u32) {
    // SAFETY: forwarded caller contract.
    unsafe { put(f, |w| w.put_be32(v)) }
}

/// `qemu_put_be64`: a big-endian 64-bit value.
///
/// # Safety
/// `f` is the file a section's save callback received, during that callback.
#[no_mangle]
pub unsafe extern "C" fn hm_qemu_put_be64(f: *mut HmQemuFile, v: u64) {
    // SAFETY: forwarded caller contract.
    unsafe { put(f, |w| w.put_be64(v)) }
}

/// `qemu_get_byte`: one byte (0 once the file has an error).
///
/// # Safety
/// `f` is the file a section's load callback received, during that callback.
#[no_mangle]
pub unsafe extern "C" fn hm_qemu_get_byte(f: *mut HmQemuFile) -> u8 {
    // SAFETY: forwarded caller contract.
    unsafe { get(f, |r| r.get_u8("hm_qemu_get_byte")) }
}

/// `qemu_get_be16` (0 once the file has an error).
///
/// # Safety
/// `f` is the file a section's load callback received, during that callback.
#[no_mangle]
pub unsafe extern "C" fn hm_qemu_get_be16(f: *mut HmQemuFile) -> u16 {
    // SAFETY: forwarded caller contract.
    unsafe { get(f, |r| r.get_be16("hm_qemu_get_be16")) }
}

/// `qemu_get_be32` (0 once the file has an error).
///
/// # Safety
/// `f` is the file a section's load callback received, during that callback.
#[no_mangle]
pub unsafe extern "C" fn hm_qemu_get_be32(f: *mut HmQemuFile) -> u32 {
    // SAFETY: forwarded caller contract.
    unsafe { get(f, |r| r.get_be32("hm_qemu_get_be32")) }
}

/// `qemu_get_be64` (0 once the file has an error).
///
/// # Safety
/// `f` is the file a section's load callback received, during that callback.
#[no_mangle]
pub unsafe extern "C" fn hm_qemu_get_be64(f: *mut HmQemuFile) -> u64 {
    // SAFETY: forwarded caller contract.
    unsafe { get(f, |r| r.get_be64("hm_qemu_get_be64")) }
}

/// `qemu_put_buffer`: `len` bytes.
///
/// # Safety
/// `f` as for `hm_qemu_put_byte`; `buf` points to `len` readable bytes (NULL when `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn hm_qemu_put_buffer(f: *mut HmQemuFile, buf: *const u8, len: usize) {
    guard_report((), || {
        // SAFETY: forwarded caller contract.
        let Some(f) = (unsafe { file(f) }) else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        if buf.is_null() {
            f.error = Some(MigrationError::Usage("qemu_put_buffer of NULL".to_string()));
            return Ok(());
        }
        // SAFETY: `buf` holds `len` readable bytes by contract.
        let data = unsafe { std::slice::from_raw_parts(buf, len) };
        f.put(|w| w.put_buffer(data));
        Ok(())
    })
}

/// `qemu_get_buffer`: reads `len` bytes into `buf`; returns how many were read (`len`, or 0
/// once the file has an error).
///
/// # Safety
/// `f` as for `hm_qemu_get_byte`; `buf` points to `len` writable bytes (NULL when `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn hm_qemu_get_buffer(f: *mut HmQemuFile, buf: *mut u8, len: usize) -> usize {
    guard_report(0, || {
        // SAFETY: forwarded caller contract.
        let Some(f) = (unsafe { file(f) }) else {
            return Ok(0);
        };
        if len == 0 {
            return Ok(0);
        }
        if buf.is_null() {
            f.error = Some(MigrationError::Usage(
                "qemu_get_buffer into NULL".to_string(),
            ));
            return Ok(0);
        }
        // SAFETY: `buf` holds `len` writable bytes by contract.
        let out = unsafe { std::slice::from_raw_parts_mut(buf, len) };
        let ok = f.get(|r| r.read_exact(out, "a device section's buffer").map(|_| true));
        Ok(if ok { len } else { 0 })
    })
}

/// `qemu_file_get_error`: 0, or the negative errno of the file's first failure.
///
/// # Safety
/// `f` is the file a section callback received, during that callback.
#[no_mangle]
pub unsafe extern "C" fn hm_qemu_file_get_error(f: *mut HmQemuFile) -> c_int {
    guard_report(0, || {
        // SAFETY: forwarded caller contract.
        Ok(match unsafe { file(f) }.and_then(|f| f.error.as_ref()) {
            Some(e) => -e.errno(),
            None => 0,
        })
    })
}

/// Saves one section's payload into `f`; returns 0, or a negative errno on failure.
pub type HmSectionSave =
    Option<unsafe extern "C" fn(f: *mut HmQemuFile, phase: c_int, opaque: *mut c_void) -> c_int>;
/// Loads one section's payload written by a saver of `version_id` (at most the registered
/// version); it must read exactly what the saver wrote. Returns 0 or a negative errno.
pub type HmSectionLoad = Option<
    unsafe extern "C" fn(
        f: *mut HmQemuFile,
        phase: c_int,
        version_id: u32,
        opaque: *mut c_void,
    ) -> c_int,
>;

/// A section of a C VMM.
struct CSection {
    idstr: String,
    instance_id: u32,
    version_id: u32,
    iterative: bool,
    save: unsafe extern "C" fn(*mut HmQemuFile, c_int, *mut c_void) -> c_int,
    load: unsafe extern "C" fn(*mut HmQemuFile, c_int, u32, *mut c_void) -> c_int,
    opaque: usize,
}

impl CSection {
    fn outcome(
        &self,
        what: &str,
        rc: c_int,
        file: HmQemuFile,
    ) -> std::result::Result<(), MigrationError> {
        if let Some(e) = file.error {
            return Err(e);
        }
        if rc < 0 {
            return Err(MigrationError::Callback(
                Error::host(format!("{what} of section '{}'", self.idstr), -rc)
                    .with_class(HmErrorClass::Generic),
            ));
        }
        Ok(())
    }
}

impl SectionHandler for CSection {
    fn idstr(&self) -> &str {
        &self.idstr
    }
    fn instance_id(&self) -> u32 {
        self.instance_id
    }
    fn version_id(&self) -> u32 {
        self.version_id
    }
    fn is_iterative(&self) -> bool {
        self.iterative
    }
    fn save(
        &mut self,
        phase: SectionPhase,
        out: &mut QemuWriter<dyn Write + '_>,
    ) -> std::result::Result<(), MigrationError> {
        let ptr = out as *mut QemuWriter<dyn Write + '_>;
        let mut file = HmQemuFile {
            // SAFETY: only the lifetime is erased; the pointer is used during the callback
            // below, while `out` is borrowed here.
            writer: Some(unsafe {
                std::mem::transmute::<
                    *mut QemuWriter<dyn Write + '_>,
                    *mut QemuWriter<dyn Write + 'static>,
                >(ptr)
            }),
            reader: None,
            error: None,
        };
        // SAFETY: the VMM registered `save` with `opaque` for exactly these calls; `file`
        // outlives the call.
        let rc = unsafe { (self.save)(&mut file, phase_number(phase), self.opaque as *mut c_void) };
        self.outcome("saving the state", rc, file)
    }
    fn load(
        &mut self,
        phase: SectionPhase,
        version_id: u32,
        input: &mut QemuReader<dyn StreamRead + '_>,
    ) -> std::result::Result<(), MigrationError> {
        let ptr = input as *mut QemuReader<dyn StreamRead + '_>;
        let mut file = HmQemuFile {
            writer: None,
            // SAFETY: as in save, for the reader lent during the callback.
            reader: Some(unsafe {
                std::mem::transmute::<
                    *mut QemuReader<dyn StreamRead + '_>,
                    *mut QemuReader<dyn StreamRead + 'static>,
                >(ptr)
            }),
            error: None,
        };
        // SAFETY: as in save.
        let rc = unsafe {
            (self.load)(
                &mut file,
                phase_number(phase),
                version_id,
                self.opaque as *mut c_void,
            )
        };
        self.outcome("loading the state", rc, file)
    }
}

/// Registers a device section of the VMM's on machine `ms`: it travels in the migration stream
/// in QEMU's section framing under (`idstr`, `instance_id`) at `version_id`. Non-iterative
/// sections are saved once, at the switchover (phase `HM_SECTION_FULL`); iterative ones at
/// setup, every round and the switchover. A stream with a section of this name and a newer
/// version is refused on load with QEMU's message; a stream section no machine registered is
/// refused as unknown. `opaque` is passed back to both callbacks, from hostmem's migration
/// threads, with no hostmem lock held.
///
/// # Safety
/// `ms` is a live machine; `idstr` NUL-terminated; `save` and `load` valid for `opaque` as long
/// as the machine exists.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn hm_migration_register_section(
    ms: *mut MachineState,
    idstr: *const c_char,
    instance_id: u32,
    version_id: u32,
    iterative: bool,
    save: HmSectionSave,
    load: HmSectionLoad,
    opaque: *mut c_void,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: by contract.
        let ms = unsafe { ref_arg(ms, "ms") }?;
        // SAFETY: by contract.
        let idstr = unsafe { str_arg(idstr, "idstr") }?.to_string();
        let save = save.ok_or_else(|| Error::invalid("Parameter 'save' is missing"))?;
        let load = load.ok_or_else(|| Error::invalid("Parameter 'load' is missing"))?;
        let section = CSection {
            idstr,
            instance_id,
            version_id,
            iterative,
            save,
            load,
            opaque: opaque as usize,
        };
        registry::with(ms.context, |m| m.register_section(Box::new(section)))?;
        Ok(true)
    })
}

/// Pauses or resumes a VMM's vCPUs: returns true on success, else false with `errp` set.
pub type HmGuestHook =
    Option<unsafe extern "C" fn(opaque: *mut c_void, errp: *mut *mut Error) -> bool>;

struct CGuestControl {
    stop: unsafe extern "C" fn(*mut c_void, *mut *mut Error) -> bool,
    resume: unsafe extern "C" fn(*mut c_void, *mut *mut Error) -> bool,
    opaque: usize,
}

impl CGuestControl {
    fn call(
        &self,
        what: &str,
        hook: unsafe extern "C" fn(*mut c_void, *mut *mut Error) -> bool,
    ) -> Result<()> {
        let mut err: *mut Error = std::ptr::null_mut();
        // SAFETY: the VMM registered `hook` with `opaque`; `err` is a valid Error slot.
        if unsafe { hook(self.opaque as *mut c_void, &mut err) } {
            return Ok(());
        }
        // SAFETY: a hook that failed stored its error (or nothing) in `err`, which is ours now.
        let taken = unsafe { super::error::take_error(err) };
        Err(taken.unwrap_or_else(|| Error::generic(format!("the VMM could not {what} its vCPUs"))))
    }
}

// SAFETY: the hooks are plain C functions and `opaque` is the VMM's, which promises (contract
// of hm_machine_set_guest_control) that they may be called from any thread.
unsafe impl Send for CGuestControl {}
// SAFETY: see Send; the struct is never mutated after creation.
unsafe impl Sync for CGuestControl {}

impl GuestControl for CGuestControl {
    fn stop(&self) -> Result<()> {
        self.call("stop", self.stop)
    }
    fn resume(&self) -> Result<()> {
        self.call("resume", self.resume)
    }
}

/// Gives machine `ms` the VMM's hooks that stop and resume its vCPUs: `stop`, `cont`, a
/// migration's switchover and the start after an incoming migration call them, from any thread
/// and with no hostmem lock held.
///
/// # Safety
/// `ms` is a live machine; the hooks are valid for `opaque` from any thread while it exists.
#[no_mangle]
pub unsafe extern "C" fn hm_machine_set_guest_control(
    ms: *mut MachineState,
    stop: HmGuestHook,
    resume: HmGuestHook,
    opaque: *mut c_void,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: by contract.
        let ms = unsafe { ref_arg(ms, "ms") }?;
        let control = CGuestControl {
            stop: stop.ok_or_else(|| Error::invalid("Parameter 'stop' is missing"))?,
            resume: resume.ok_or_else(|| Error::invalid("Parameter 'resume' is missing"))?,
            opaque: opaque as usize,
        };
        registry::with(ms.context, |m| {
            m.run_mut().control = Arc::new(control);
            Ok(true)
        })
    })
}

/// Whether machine `ms`'s guest should be running now (QEMU's `runstate_is_running`): false
/// with `-S`, during an incoming migration and after `stop` or a completed migration.
///
/// # Safety
/// `ms` is NULL or a live machine.
#[no_mangle]
pub unsafe extern "C" fn hm_machine_is_running(ms: *mut MachineState) -> bool {
    guard_report(false, || {
        // SAFETY: by contract.
        let ms = unsafe { ref_arg(ms, "ms") }?;
        registry::with(ms.context, |m| Ok(m.run().state.is_running()))
    })
}

/// Whether machine `ms` waits for or loads an incoming migration (`-incoming`, until it has
/// completed).
///
/// # Safety
/// `ms` is NULL or a live machine.
#[no_mangle]
pub unsafe extern "C" fn hm_machine_is_incoming(ms: *mut MachineState) -> bool {
    guard_report(false, || {
        // SAFETY: by contract.
        let ms = unsafe { ref_arg(ms, "ms") }?;
        registry::with(ms.context, |m| {
            Ok(m.run().state == crate::machine::RunState::InMigrate)
        })
    })
}

/// Starts the incoming migration `-incoming URI` asked for (nothing with `-incoming defer`,
/// which waits for `migrate_incoming`, nor without `-incoming`): listens now, loads on a thread
/// once the peer connects. Call it once the VMM's sections and hooks are registered.
///
/// # Safety
/// `ms` is a live machine.
#[no_mangle]
pub unsafe extern "C" fn hm_migration_start_incoming(
    ms: *mut MachineState,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: by contract.
        let ms = unsafe { ref_arg(ms, "ms") }?;
        let uri = registry::with(ms.context, |m| {
            Ok(m.config().and_then(|c| c.cmdline.incoming.clone()))
        })?;
        match uri.as_deref() {
            None | Some("defer") => {}
            Some(uri) => {
                registry::hmp::incoming(ms.context, uri, &registry::transports::HostTransports)
                    .map_err(|e| e.prepend(&format!("-incoming {uri}: ")))?
            }
        }
        Ok(true)
    })
}

/// Waits until machine `ms`'s incoming migration has ended (returns at once when none was
/// started): true when it completed, false with QEMU's lines for the failure in `errp` (one
/// per line of the message) when it failed. The guest is then never started.
///
/// # Safety
/// `ms` is a live machine.
#[no_mangle]
pub unsafe extern "C" fn hm_migration_wait_incoming(
    ms: *mut MachineState,
    errp: *mut *mut Error,
) -> bool {
    guard(errp, false, || {
        // SAFETY: by contract.
        let ms = unsafe { ref_arg(ms, "ms") }?;
        let incoming = loop {
            let (waiting, progress) = registry::with(ms.context, |m| {
                let uri = m.config().and_then(|c| c.cmdline.incoming.clone());
                Ok((uri.is_some(), m.migration().incoming.clone()))
            })?;
            match progress {
                Some(p) => break Some(p),
                None if !waiting => break None,
                // `-incoming defer`: no migrate_incoming yet.
                None => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        let Some(p) = incoming else {
            return Ok(true);
        };
        let done = p.wait();
        if done.status == MigrationStatus::Completed {
            return Ok(true);
        }
        Err(Error::generic(done.error.unwrap_or_else(|| {
            format!("incoming migration {}", done.status.name())
        })))
    })
}

/// Builds the machine `argv` describes for the migration-compat check: as a VMM would, but
/// with no accelerator, no `-incoming` and no `-mem-prealloc` (nothing runs, listens or
/// touches guest memory). `side` names the command line in errors.
///
/// # Safety
/// `argv` holds `argc` NUL-terminated strings (argv[0], the program name, is skipped).
unsafe fn check_machine(
    side: &str,
    argc: c_int,
    argv: *const *const c_char,
) -> Result<*mut MachineState> {
    // SAFETY: forwarded caller contract.
    let args = unsafe { super::machine::argv_strings(argc, argv) }?;
    let mut cmd = crate::options::cmdline::Cmdline::parse(&args)
        .map_err(|e| Error::from(e).prepend(&format!("{side}: ")))?;
    if cmd.machine_help {
        return Err(Error::invalid(format!(
            "{side}: -machine help builds no machine"
        )));
    }
    cmd.accel = None;
    cmd.accel_option = None;
    cmd.accel_machine = None;
    cmd.incoming = None;
    cmd.mem_prealloc = false;
    super::machine::machine_from_cmdline(&cmd).map_err(|e| e.prepend(&format!("{side}: ")))
}

/// Would a guest started with the command line `src_argv` migrate to a VMM started with
/// `dst_argv`? Both machines are built (with the registered boards, see `check_machine`:
/// no accelerator, no `-incoming`, no preallocation) and freed again; the current machine
/// stays current. Returns a JSON object (release it with `hm_free`):
///
/// `{"compatible": BOOL, "breaks": [{"side": "source"|"destination", "message": STR}, ...],
///   "notes": [STR, ...]}`
///
/// `breaks` lists every reason the migration fails, in the order a real migration meets them
/// and in QEMU's words where QEMU has them (the first is what the destination's loader
/// prints first); `notes` what loads but loses memory (a destination block the stream does
/// not carry). NULL with `errp` set when a command line cannot be built into a machine.
///
/// # Safety
/// `src_argv` / `dst_argv` hold `src_argc` / `dst_argc` NUL-terminated strings, each starting
/// with a program name.
#[no_mangle]
pub unsafe extern "C" fn hm_migration_check(
    src_argc: c_int,
    src_argv: *const *const c_char,
    dst_argc: c_int,
    dst_argv: *const *const c_char,
    errp: *mut *mut Error,
) -> *mut c_char {
    guard(errp, std::ptr::null_mut(), || {
        let previous = registry::current_if_any();
        // SAFETY: forwarded caller contract.
        let built = unsafe { check_machine("source", src_argc, src_argv) }.and_then(|src| {
            // SAFETY: forwarded caller contract.
            let report =
                unsafe { check_machine("destination", dst_argc, dst_argv) }.and_then(|dst| {
                    // SAFETY: both are live machines built above.
                    let ids = unsafe { ((*src).context, (*dst).context) };
                    let report = registry::migrate::check_compat(ids.0, ids.1);
                    // SAFETY: built above, freed once.
                    unsafe { super::machine::hm_machine_free(dst) };
                    report
                });
            // SAFETY: built above, freed once.
            unsafe { super::machine::hm_machine_free(src) };
            report
        });
        if let Some(prev) = previous {
            registry::set_current(prev)?;
        }
        Ok(super::c_string(&built?.to_json()))
    })
}
