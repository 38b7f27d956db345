//! The library's version at run time, to compare with the header's `HOSTMEM_VERSION_*` a VMM
//! was compiled against.

use std::ffi::c_char;

/// The version of the linked library, "MAJOR.MINOR.MICRO" (`HOSTMEM_VERSION_STRING` of the
/// header it was built with). Static storage: never free it.
#[no_mangle]
pub extern "C" fn hm_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_is_cargos() {
        // SAFETY: hm_version returns a NUL-terminated static string.
        let v = unsafe { std::ffi::CStr::from_ptr(super::hm_version()) };
        assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }
}
