//! QEMU's migration stream: a pure codec, both ways, byte for byte as QEMU 10.0 and 7.2
//! write and read it.
//!
//! The codec sits below the memory layers: it knows nothing of RAMBlocks, regions or KVM and
//! reaches guest RAM only through the traits in [`ram`], which the layer above implements over
//! its RAMBlock registry. The later save/load/precopy layer drives it:
//!
//! | module | what it holds | QEMU counterpart |
//! |---|---|---|
//! | [`format`](mod@format) | magic, version, section types, commands, `RAM_SAVE_FLAG_*` | `savevm.h`, `ram.h` |
//! | [`qemu_file`] | big-endian primitives with a byte counter; truncation vs I/O errors | `qemu-file.c` |
//! | [`error`] | [`MigrationError`] (QEMU's messages) and [`LoadError`] (QEMU's stderr lines) | the `error_report`s of the loader |
//! | [`section`] | [`SectionHandler`]: device state keyed by (idstr, instance), opaque payloads | `SaveStateEntry`, `SaveVMHandlers` |
//! | [`ram`] | the `ram` section: setup, page records, zero test, loader checks, mapped-ram reader | `ram.c` (precopy half) |
//! | [`stream`] | header, CONFIGURATION, framing, commands, EOF, VMDESCRIPTION; [`Saver`] and [`load`] | `savevm.c` |
//! | [`rate`] | `max-bandwidth`: 100 ms slices of `rate / 10` bytes, live-adjustable | `migration_rate_set`, `migration_rate_exceeded` |
//! | [`compat`] | would this source's stream load there: every break, in the loader's words | nothing: QEMU finds out by migrating |
//! | [`direct_file`] | `direct-io`: a `file:` stream staged in aligned buffers, whole pages written with O_DIRECT by a writer thread | `multifd`'s O_DIRECT channels of `file.c` (hostmem: every `file:` stream) |
//! | [`transport`] | URIs (`tcp:`, `unix:`, `exec:`, `fd:`, `file:`) as channels; cancel | `migration.c` (URIs), `socket.c`, `exec.c`, `fd.c`, `file.c`, `qemu-sockets.c` |
//!
//! Shape, and why:
//! * RAM is not a [`SectionHandler`]: its loader needs a [`RamLoadTarget`] and reports its
//!   own statistics, and the page source of its saver is driven round by round by the precopy
//!   loop, not by the codec. Everything else is a handler, so a C VMM registers device state
//!   through one trait.
//! * Handlers read from `QemuReader<dyn StreamRead>`: one concrete, non-generic type a C
//!   adapter can implement against, while the loader itself stays generic over the transport.
//! * Errors keep QEMU's words in `Display` and QEMU's whole stderr transcript in
//!   [`LoadError::qemu_lines`], because the users compare the two.
//! * Writing defaults to what every supported peer loads: no SWITCHOVER_START (7.2 refuses
//!   it), footers on, a VMDESCRIPTION trailer listing the FULL sections.
//!
//! Decisions where QEMU is weak or silent (each has a test):
//! * Machine type: QEMU compares with `strncmp` over the *received* length, so "pc" or ""
//!   loads into "pc-i440fx-10.0". Kept as the default ([`MachineTypeCheck::QemuPrefix`]) so
//!   that whatever QEMU 10 accepts, hostmem accepts; [`MachineTypeCheck::Exact`] is there for
//!   VMMs that want the check QEMU meant.
//! * ZERO records: 10.0 refuses a non-zero fill byte, 7.2 filled the page with it. The
//!   loader follows 10.0; the saver always writes 0, which both accept.
//! * Section ids: the saver never uses 0 (QEMU's loader starts every handler's remembered id
//!   at 0, so a PART with id 0 could reach a handler that was never started), and the loader
//!   matches PART/END only against sections started in this stream.
//! * Stricter than QEMU where QEMU would misparse or write where it should not: a block list
//!   longer than the MEM_SIZE total is refused (QEMU's counter wraps); page records for
//!   non-migratable blocks are refused (QEMU 10 checks only x-ignore-shared there); in
//!   mapped-ram files the migratable and length checks still apply (QEMU skips them) and
//!   holes are zeroed (QEMU leaves stale data in them); a machine type name over 4096 bytes
//!   is refused before allocating.
//! * Truncation: QEMU reads zeros past the end and reports whatever check fails next (see
//!   [`error`]); the codec says where the stream ended, always with EIO.
//! * Commands: SWITCHOVER_START and PING are accepted; postcopy, COLO, PACKAGED and the
//!   return path are refused as unsupported (a precopy loader has nothing to do with them).
//!   XBZRLE, multifd, RDMA and compressed pages are refused as unknown flag combinations.
//!
//! The submodules carry `cbindgen:ignore`: the crate's C header is the memory API, and the
//! stream's constants and Rust-only types are not part of it.

/// cbindgen:ignore
pub mod blocks;
/// cbindgen:ignore
pub mod builtin;
/// cbindgen:ignore
pub mod chunked;
/// cbindgen:ignore
pub mod compat;
/// cbindgen:ignore
pub mod direct_file;
/// cbindgen:ignore
pub mod error;
#[cfg(test)]
mod fixtures;
/// cbindgen:ignore
pub mod format;
/// cbindgen:ignore
pub mod known_zero;
/// cbindgen:ignore
pub mod parallel;
/// cbindgen:ignore
pub mod precopy;
/// cbindgen:ignore
pub mod prefault;
/// cbindgen:ignore
pub mod qemu_file;
/// cbindgen:ignore
pub mod ram;
/// cbindgen:ignore
pub mod rate;
/// cbindgen:ignore
pub mod section;
/// cbindgen:ignore
pub mod state;
/// cbindgen:ignore
pub mod stream;
/// cbindgen:ignore
pub mod transport;

pub use error::{LoadError, MigrationError, SectionContext};
pub use qemu_file::{QemuReader, QemuWriter};
pub use ram::{
    LocalRamBlock, PageRef, RamBlockInfo, RamLoadStats, RamLoadTarget, RamLoader, RamSaveStats,
    RamSaver, RamSource,
};
pub use section::{BufferSection, SectionHandler, SectionPhase, StreamRead};
pub use stream::{
    load, load_file, load_from, save_mapped_ram_file, save_stream, Configuration, LoadOptions,
    LoadSummary, MachineTypeCheck, SaveOptions, SaveSummary, Saver,
};
