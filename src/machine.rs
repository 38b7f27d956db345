//! MachineClass / MachineState and QEMU's machine-level RAM rules. INTERFACE STUB.
