//! The C skin. One file per C object; each converts arguments, calls the core and converts
//! results back. Shared rules, stated once:
//! - every export runs inside [`guard`]: a panic becomes an `Error`, never an unwind into C;
//! - a fallible call takes `Error **errp` last and returns `bool` or a pointer (NULL on
//!   failure); `errp` may be NULL, `&error_fatal` or `&error_abort` as in QEMU;
//! - a NULL argument is an error naming the argument;
//! - strings returned to C are malloc'd and released with `hm_free`.

pub mod backend;
pub mod error;
pub mod kvm;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod progress;
#[cfg(feature = "test-guest")]
pub mod testing;
pub mod version;

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, HmErrorClass, Result};

pub use self::error::set_error;

/// Runs `f`, turning an `Err` or a panic into an error stored through `errp`, and returning
/// `on_fail` in those cases.
pub(crate) fn guard<T>(errp: *mut *mut Error, on_fail: T, f: impl FnOnce() -> Result<T>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            // SAFETY: every export passes its caller's errp, which QEMU's convention makes
            // NULL, a sentinel, or a valid `Error **`.
            unsafe { set_error(errp, e) };
            on_fail
        }
        Err(panic) => {
            // SAFETY: as above.
            unsafe { set_error(errp, panic_error(panic)) };
            on_fail
        }
    }
}

/// Like [`guard`] for exports with no `errp`: the error is reported on stderr.
pub(crate) fn guard_report<T>(on_fail: T, f: impl FnOnce() -> Result<T>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            error::report(&e);
            on_fail
        }
        Err(panic) => {
            error::report(&panic_error(panic));
            on_fail
        }
    }
}

fn panic_error(panic: Box<dyn std::any::Any + Send>) -> Error {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string());
    Error::generic(format!("hostmem internal error: {what}"))
}

/// Borrows a C string argument; NULL or invalid UTF-8 is an error naming the argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, name: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::invalid(format!("Parameter '{name}' is missing")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| Error::invalid(format!("Parameter '{name}' is not valid UTF-8")))
}

/// Borrows a C object argument; NULL is an error naming the argument.
///
/// # Safety
/// `p` is NULL or points to a live `T` that outlives `'a` and is not mutated meanwhile.
pub(crate) unsafe fn ref_arg<'a, T>(p: *const T, name: &str) -> Result<&'a T> {
    // SAFETY: by the caller's contract, a non-NULL `p` is a live T.
    unsafe { p.as_ref() }.ok_or_else(|| {
        Error::new(
            HmErrorClass::InvalidParameter,
            format!("Parameter '{name}' is missing"),
        )
    })
}

/// Mutable form of [`ref_arg`].
///
/// # Safety
/// `p` is NULL or points to a live `T` that outlives `'a` and has no other users meanwhile.
pub(crate) unsafe fn mut_arg<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T> {
    // SAFETY: by the caller's contract, a non-NULL `p` is a live, exclusively borrowed T.
    unsafe { p.as_mut() }.ok_or_else(|| {
        Error::new(
            HmErrorClass::InvalidParameter,
            format!("Parameter '{name}' is missing"),
        )
    })
}

/// A malloc'd copy of `s` for C, released with `hm_free`. Interior NULs are cut off.
pub(crate) fn c_string(s: &str) -> *mut c_char {
    let bytes = s.as_bytes();
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    // SAFETY: malloc has no preconditions; the result is checked for NULL before use.
    let p = unsafe { libc::malloc(len + 1) } as *mut u8;
    if p.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: `p` has room for len + 1 bytes, and `bytes[..len]` does not overlap it.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, len);
        *p.add(len) = 0;
    }
    p as *mut c_char
}

/// Releases a string or array hostmem returned. NULL is ignored.
///
/// # Safety
/// `p` is NULL or was returned by hostmem as "release with hm_free" and not released yet.
#[no_mangle]
pub unsafe extern "C" fn hm_free(p: *mut std::ffi::c_void) {
    // SAFETY: such pointers come from libc::malloc (see c_string), so free is the matching call.
    unsafe { libc::free(p) }
}
