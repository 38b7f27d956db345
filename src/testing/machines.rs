//! Machines for the tests and benchmarks that need no C board: QEMU's `none` board built from a
//! command line, its RAM (if any) mapped at guest-physical 0, as the C board does.

use crate::error::Result;
use crate::machine::BoardInfo;
use crate::options::cmdline::Cmdline;
use crate::registry::{self, MachineId, PendingMachine};

/// QEMU's `none` board: no default size, RAM named "ram", no CPU unless `-smp` asks.
pub fn none_board() -> BoardInfo {
    BoardInfo {
        name: "none".into(),
        alias: None,
        default_ram_size: 0,
        default_ram_id: Some("ram".into()),
        numa_mem_supported: false,
        numa_supported: false,
        no_cpus_by_default: true,
        is_default: false,
        ..Default::default()
    }
}

/// Builds and registers a `none` machine from `args` (QEMU's options, without argv[0]).
pub fn none_machine(args: &[&str]) -> Result<MachineId> {
    let cmd = Cmdline::parse(args)?;
    let mut p = PendingMachine::start(&cmd, &none_board())?;
    registry::with(p.id(), |m| {
        let Some(ram) = m.config().and_then(|c| c.ram) else {
            return Ok(());
        };
        let mem = m.memory_mut();
        let sys = mem.system_memory();
        mem.add_subregion(sys, 0, ram, None)
    })?;
    p.finish_init()?;
    Ok(p.commit())
}

/// The host address and size of machine `id`'s main RAM.
pub fn main_ram(id: MachineId) -> Result<(*mut u8, u64)> {
    registry::with(id, |m| {
        let config = m
            .config()
            .ok_or_else(|| crate::Error::invalid("no configuration"))?;
        let ram = config
            .ram
            .ok_or_else(|| crate::Error::invalid("the machine has no RAM"))?;
        let ptr = m
            .memory()
            .ram_ptr(ram)?
            .ok_or_else(|| crate::Error::invalid("the machine's RAM has no host memory"))?;
        Ok((ptr, config.ram_size))
    })
}
