//! hostmem: guest RAM for C virtual-machine monitors, with QEMU's semantics.
//!
//! Data flows one way: options → machine → backends → regions → flat view → listeners (KVM).
//! See DESIGN.md for the map from each module to the QEMU code it replaces.

pub mod backend;
pub mod error;
pub mod ffi;
pub mod flat_ranges;
pub mod flatview;
pub mod gpa_layout;
pub mod guarded;
pub mod helper_thread;
pub mod hostmap;
pub mod kvm;
pub mod listener;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod monitor;
pub mod objects;
pub mod options;
pub mod populated;
pub mod progress;
pub mod ramblock;
pub mod region;
pub mod registry;
#[cfg(feature = "test-guest")]
pub mod testing;

pub use error::{Error, HmErrorClass, Result};
