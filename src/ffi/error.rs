//! `Error` for C: QEMU's `Error **errp` convention, `error_fatal`, `error_abort`, and the
//! accessors C code uses. An `Error *` is owned by whoever holds it and freed with
//! `error_free`.

use std::ffi::c_char;
use std::io::Write;
use std::ptr::{addr_of_mut, null_mut};

use crate::error::{Error, HmErrorClass};

/// Pass `&error_fatal` as `errp` to print the error and exit(1), as in QEMU.
#[no_mangle]
pub static mut error_fatal: *mut Error = null_mut();

/// Pass `&error_abort` as `errp` to print the error and abort(), as in QEMU.
#[no_mangle]
pub static mut error_abort: *mut Error = null_mut();

/// The program name errors are prefixed with ("vmm: ..."), like QEMU's g_get_prgname().
pub(crate) fn program_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "hostmem".to_string())
}

/// Prints "<program>: <message>" and the hint on stderr, as QEMU's error_report_err does. A
/// message of several lines is several reports in QEMU, so each line gets the program name.
pub(crate) fn report(err: &Error) {
    let name = program_name();
    let mut text = String::new();
    for line in err.message().split('\n') {
        text.push_str(&format!("{name}: {line}\n"));
    }
    if let Some(h) = err.hint() {
        text.push_str(h);
    }
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// Stores `err` through `errp` following QEMU's error_propagate rules.
///
/// # Safety
/// `errp` is NULL, `&error_fatal`, `&error_abort`, or points to a writable `Error *` that is NULL
/// or a live error.
pub unsafe fn set_error(errp: *mut *mut Error, err: Error) {
    let (fatal, abort) = (addr_of_mut!(error_fatal), addr_of_mut!(error_abort));
    if errp.is_null() {
        return;
    }
    if errp == fatal {
        report(&err);
        std::process::exit(1);
    }
    if errp == abort {
        report(&err);
        std::process::abort();
    }
    // SAFETY: a non-NULL errp that is not one of the sentinels points to the caller's `Error *`.
    unsafe {
        // As in QEMU the first error wins; a second one is dropped rather than leaked.
        if (*errp).is_null() {
            *errp = Box::into_raw(Box::new(err));
        }
    }
}

/// The human-readable message of `err` (valid until `error_free`).
///
/// # Safety
/// `err` is NULL or a live `Error *` from hostmem.
#[no_mangle]
pub unsafe extern "C" fn error_get_pretty(err: *const Error) -> *const c_char {
    // SAFETY: the caller passes NULL or a live Error.
    let Some(err) = (unsafe { err.as_ref() }) else {
        return c"(null error)".as_ptr();
    };
    pretty_cache(err)
}

/// The stable class of `err`; `HM_ERROR_CLASS_GENERIC` for NULL.
///
/// # Safety
/// `err` is NULL or a live `Error *` from hostmem.
#[no_mangle]
pub unsafe extern "C" fn hm_error_get_class(err: *const Error) -> HmErrorClass {
    // SAFETY: the caller passes NULL or a live Error.
    unsafe { err.as_ref() }
        .map(Error::class)
        .unwrap_or(HmErrorClass::Generic)
}

/// The hint of `err` (may be NULL), valid until `error_free`.
///
/// # Safety
/// `err` is NULL or a live `Error *` from hostmem.
#[no_mangle]
pub unsafe extern "C" fn hm_error_get_hint(err: *const Error) -> *const c_char {
    // SAFETY: the caller passes NULL or a live Error.
    match unsafe { err.as_ref() } {
        Some(e) if e.hint().is_some() => hint_cache(e),
        _ => std::ptr::null(),
    }
}

/// Sets `*errp` to a new error with `message` (a C hook's way to refuse, e.g. a board's
/// property setter), following the `errp` conventions (`&error_fatal` prints and exits).
///
/// # Safety
/// `errp` follows the Error convention; `message` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn hm_error_set(errp: *mut *mut Error, message: *const c_char) {
    let text = if message.is_null() {
        "(no message)".to_string()
    } else {
        // SAFETY: a non-NULL message is NUL-terminated by contract.
        unsafe { std::ffi::CStr::from_ptr(message) }
            .to_string_lossy()
            .into_owned()
    };
    // SAFETY: by contract.
    unsafe { set_error(errp, Error::invalid(text)) };
}

/// Takes an error C code handed back (through a hook's `errp`) into Rust; NULL is `None`.
///
/// # Safety
/// `err` is NULL or an `Error *` from hostmem that is not used again by C.
pub(crate) unsafe fn take_error(err: *mut Error) -> Option<Error> {
    if err.is_null() {
        return None;
    }
    // SAFETY: errors are handed out by Box::into_raw in set_error; the caller gives it up.
    let boxed = unsafe { Box::from_raw(err) };
    forget_cached(&boxed);
    Some(*boxed)
}

/// Frees an error. NULL is ignored.
///
/// # Safety
/// `err` is NULL or an `Error *` from hostmem that was not freed yet.
#[no_mangle]
pub unsafe extern "C" fn error_free(err: *mut Error) {
    if !err.is_null() {
        // SAFETY: errors are handed out by Box::into_raw in set_error and freed once.
        let boxed = unsafe { Box::from_raw(err) };
        forget_cached(&boxed);
    }
}

/// Prints `err` as "<program>: <message>" (plus hint) on stderr and frees it.
///
/// # Safety
/// As for `error_free`.
#[no_mangle]
pub unsafe extern "C" fn error_report_err(err: *mut Error) {
    // SAFETY: the caller passes NULL or a live Error.
    if let Some(e) = unsafe { err.as_ref() } {
        report(e);
    }
    // SAFETY: same pointer, same contract as error_free.
    unsafe { error_free(err) };
}

/// Frees `*errp` if set and clears it (QEMU's error_free_or_abort without the abort).
///
/// # Safety
/// `errp` is NULL or points to an `Error *` that is NULL or live.
#[no_mangle]
pub unsafe extern "C" fn hm_error_clear(errp: *mut *mut Error) {
    if errp.is_null() {
        return;
    }
    // SAFETY: errp is valid by contract; the Error it points to is freed once and cleared.
    unsafe {
        error_free(*errp);
        *errp = null_mut();
    }
}

// C wants NUL-terminated text that lives as long as the Error; the core Error holds a Rust
// String. Keep one CString per live Error, keyed by address, dropped in error_free.
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::Mutex;

type Cache = Mutex<HashMap<(usize, bool), CString>>;

fn cache() -> &'static Cache {
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn cached(err: &Error, hint: bool, text: &str) -> *const c_char {
    let key = (err as *const Error as usize, hint);
    let mut c = cache().lock().unwrap_or_else(|p| p.into_inner());
    let s = c
        .entry(key)
        .or_insert_with(|| CString::new(text.replace('\0', " ")).unwrap_or_default());
    s.as_ptr()
}

fn pretty_cache(err: &Error) -> *const c_char {
    cached(err, false, err.message())
}

fn hint_cache(err: &Error) -> *const c_char {
    cached(err, true, err.hint().unwrap_or(""))
}

fn forget_cached(err: &Error) {
    let addr = err as *const Error as usize;
    let mut c = cache().lock().unwrap_or_else(|p| p.into_inner());
    c.remove(&(addr, false));
    c.remove(&(addr, true));
}
