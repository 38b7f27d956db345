//! QEMU's command-line options for machine RAM (-m, -machine, -mem-path, -mem-prealloc, -object,
//! -numa). INTERFACE STUB.
