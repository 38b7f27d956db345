//! QEMU's option and value syntax, turned into typed configuration. Pure: no side effects.

pub mod cmdline;
pub mod cpu;
pub mod error;
pub mod qdict;
pub mod values;

pub use error::OptionError;
