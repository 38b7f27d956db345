//! MachineClass / MachineState and QEMU's machine-level RAM rules. INTERFACE STUB.

/// Per-context machine state kept on the Rust side. INTERFACE STUB.
pub struct MachineRuntime {}
