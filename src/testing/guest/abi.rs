//! The constants the guest programs' assembly shares with the host: the one place they are
//! written. `guest.rs` uses these items and `build.rs` includes this file and hands each value
//! to the assembler as a `-D` define, so the Rust side and the assembled bytes cannot disagree.
//!
//! Only plain integer `const`s belong here: build.rs compiles this file on its own, without the
//! crate. They are `pub(crate)` so that cbindgen leaves them out of the C header.

/// The port a program writes [`DONE_VALUE`] to when it has finished (then it halts).
pub(crate) const DONE_PORT: u16 = 0x510;
pub(crate) const DONE_VALUE: u8 = 0x48;

/// How long a wait op of the ops program spins at most (iterations of a load, a compare and a
/// `pause`: seconds, not minutes), so a host that never answers cannot hang the run. Only the
/// assembler and the tests read it.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const WAIT_SPIN_LIMIT: u32 = 0x1000_0000;

/// The dirtier's heartbeat: a u64 the guest increments after every full pass over its range.
pub(crate) const DIRTIER_PASSES_GPA: u64 = 0x600;
/// The dirtier's stop word: the guest reads it once per pass and stops when it is not zero.
pub(crate) const DIRTIER_STOP_GPA: u64 = 0x608;
