//! The one error type of hostmem: a message for people (QEMU's wording where QEMU has one),
//! an optional hint, and a stable class for programs.

use std::fmt;

/// Stable error classes, for programs that must branch on what went wrong without parsing the
/// message. Values never change meaning once released.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HmErrorClass {
    /// Anything without a more precise class.
    Generic = 0,
    /// A malformed or out-of-range value, an unknown property or option.
    InvalidParameter = 1,
    /// A named object (backend, machine type, region, file) does not exist.
    NotFound = 2,
    /// The object is in use (mapped backend, busy memdev).
    InUse = 3,
    /// An id or RAMBlock name is already taken.
    Duplicate = 4,
    /// The property can no longer change because the object is complete.
    Completed = 5,
    /// The host refused (mmap, open, mbind, madvise, ...); the message carries errno's text.
    Host = 6,
    /// KVM refused or lacks a capability.
    Kvm = 7,
    /// Not supported by this host or build.
    Unsupported = 8,
    /// The host lacks what the request needs (memory, huge pages, KVM's slot budget): change
    /// the size or the host, not the syntax.
    HostResources = 9,
}

/// An error: what went wrong, in words a VMM user recognises from QEMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    class: HmErrorClass,
    message: String,
    hint: Option<String>,
    errno: Option<i32>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(class: HmErrorClass, message: impl Into<String>) -> Self {
        Error {
            class,
            message: message.into(),
            hint: None,
            errno: None,
        }
    }

    /// A generic error; the class most QEMU messages carry.
    pub fn generic(message: impl Into<String>) -> Self {
        Self::new(HmErrorClass::Generic, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(HmErrorClass::InvalidParameter, message)
    }

    /// A host failure: `message` followed by ": " and the text of `errno`, as QEMU's
    /// `error_setg_errno` formats it.
    pub fn host(message: impl Into<String>, errno: i32) -> Self {
        Error {
            class: HmErrorClass::Host,
            message: format!("{}: {}", message.into(), strerror(errno)),
            hint: None,
            errno: Some(errno),
        }
    }

    /// Sets the errno the error carries (for errors built from a typed error that had one).
    pub fn with_errno(mut self, errno: i32) -> Self {
        self.errno = Some(errno);
        self
    }

    /// The calling thread's errno, as `host` takes it.
    pub fn last_os(message: impl Into<String>) -> Self {
        Self::host(
            message,
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        )
    }

    pub fn with_class(mut self, class: HmErrorClass) -> Self {
        self.class = class;
        self
    }

    /// Adds a hint, printed on its own line after the message (QEMU's `error_append_hint`).
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        let hint = hint.into();
        match &mut self.hint {
            Some(h) => h.push_str(&hint),
            None => self.hint = Some(hint),
        }
        self
    }

    /// Prefixes the message, as QEMU's `error_prepend` does.
    pub fn prepend(mut self, prefix: &str) -> Self {
        self.message.insert_str(0, prefix);
        self
    }

    pub fn class(&self) -> HmErrorClass {
        self.class
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    pub fn errno(&self) -> Option<i32> {
        self.errno
    }
}

/// The text of `errno` as C's strerror() gives it ("No such file or directory").
pub fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    // std appends " (os error N)"; QEMU prints strerror() alone.
    match text.rfind(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_error_reads_like_strerror() {
        let e = Error::host("cannot bind memory to host NUMA nodes", libc::EPERM);
        assert_eq!(
            e.message(),
            "cannot bind memory to host NUMA nodes: Operation not permitted"
        );
        assert_eq!(e.class(), HmErrorClass::Host);
        assert_eq!(e.errno(), Some(libc::EPERM));
    }

    #[test]
    fn hints_accumulate_and_prepend_keeps_class() {
        let e = Error::invalid("bad")
            .with_hint("a\n")
            .with_hint("b\n")
            .prepend("x: ");
        assert_eq!(e.message(), "x: bad");
        assert_eq!(e.hint(), Some("a\nb\n"));
        assert_eq!(e.class(), HmErrorClass::InvalidParameter);
    }
}
