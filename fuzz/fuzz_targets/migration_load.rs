//! The migration loader over arbitrary streams, into the RAM of a real machine (`-M none
//! -m 16M`, its RAM at 0, as in testdata/migration/qemu10-none-16M.mig, the seed). The first
//! byte picks the reader (a pipe, or a file, which also reads mapped-ram), mapped-ram and
//! whether a configuration section is expected; the rest is the stream. A stream may be
//! refused, never panic or touch memory it should not (ASan watches the heap).
#![no_main]

use std::io::Cursor;
use std::sync::OnceLock;

use hostmem::machine::{BoardInfo, Machine};
use hostmem::migration::blocks::RamSnapshot;
use hostmem::migration::{load, load_file, LoadOptions};
use hostmem::options::cmdline::Cmdline;
use libfuzzer_sys::fuzz_target;

/// One machine for every input: building it is what would dominate otherwise.
fn machine() -> &'static std::sync::Mutex<Machine> {
    static M: OnceLock<std::sync::Mutex<Machine>> = OnceLock::new();
    M.get_or_init(|| {
        let board = BoardInfo {
            name: "none".into(),
            alias: None,
            default_ram_size: 0,
            default_ram_id: Some("ram".into()),
            numa_mem_supported: false,
            numa_supported: false,
            no_cpus_by_default: true,
            is_default: false,
            ..Default::default()
        };
        let cmd = Cmdline::parse(&["-m", "16M"]).unwrap();
        let mut m = Machine::from_cmdline(&cmd, &board).unwrap();
        let ram = m.config().unwrap().ram.unwrap();
        let mem = m.memory_mut();
        let sys = mem.system_memory();
        mem.add_subregion(sys, 0, ram, None).unwrap();
        std::sync::Mutex::new(m)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let guard = machine().lock().unwrap();
    let mut target = RamSnapshot::all(&guard.memory().ramblocks);
    let mut opts = LoadOptions::new("none");
    opts.mapped_ram = mode & 2 != 0;
    opts.expect_configuration = mode & 4 == 0;
    let _ = if mode & 1 == 0 {
        load(stream, &opts, Some(&mut target), &mut [])
    } else {
        load_file(Cursor::new(stream), &opts, Some(&mut target), &mut [])
    };
});
