//! QEMU's option and value syntax, turned into typed configuration. Pure: no side effects.

pub mod cmdline;
pub mod values;
