//! The generic machine's RAM rules, end to end on a `Machine` (no C, no registry): which
//! backend becomes `machine->ram`, how it is named in the RAMBlock list, and every refusal with
//! QEMU's words.

use hostmem::machine::{BoardInfo, Machine};
use hostmem::options::cmdline::Cmdline;
use hostmem::Result;

fn pc() -> BoardInfo {
    BoardInfo {
        name: "pc-i440fx-10.0".into(),
        alias: Some("pc".into()),
        default_ram_size: 128 << 20,
        default_ram_id: Some("pc.ram".into()),
        numa_mem_supported: false,
        numa_supported: true,
        no_cpus_by_default: false,
        is_default: false,
        ..Default::default()
    }
}

fn legacy_board() -> BoardInfo {
    BoardInfo {
        name: "legacy".into(),
        alias: None,
        default_ram_size: 64 << 20,
        default_ram_id: None,
        numa_mem_supported: false,
        numa_supported: true,
        no_cpus_by_default: false,
        is_default: false,
        ..Default::default()
    }
}

/// What a configured machine looks like: (ram name, ram size, RAMBlock ids in `info ramblock`
/// order, backend ids).
type Outcome = (Option<String>, u64, Vec<String>, Vec<String>);

/// Builds a machine from `args` and returns its outcome.
fn configure(board: &BoardInfo, args: &str) -> Result<Outcome> {
    let args: Vec<&str> = args.split_whitespace().collect();
    let m = Machine::from_cmdline(&Cmdline::parse(&args)?, board)?;
    let config = m.config().unwrap();
    let mem = m.memory();
    let ram_name = match config.ram {
        Some(r) => Some(mem.region_name(r)?.to_string()),
        None => None,
    };
    let blocks = mem
        .ramblocks
        .ids()
        .into_iter()
        .map(|b| mem.ramblocks.get(b).unwrap().idstr.clone())
        .collect();
    Ok((ram_name, config.ram_size, blocks, m.objects().ids()))
}

/// A machine built from `args`, which must be valid.
fn machine(board: &BoardInfo, args: &[&str]) -> Machine {
    Machine::from_cmdline(&Cmdline::parse(args).unwrap(), board).unwrap()
}

fn error(board: &BoardInfo, args: &str) -> String {
    match configure(board, args) {
        Ok(v) => panic!("expected an error for {args:?}, got {v:?}"),
        Err(e) => format!(
            "{}{}",
            e.message(),
            e.hint().map(|h| format!("\n{h}")).unwrap_or_default()
        ),
    }
}

#[test]
fn implicit_backend_is_named_after_default_ram_id() {
    let (ram, size, blocks, objects) = configure(&pc(), "-m 64M").unwrap();
    assert_eq!(ram.as_deref(), Some("pc.ram"));
    assert_eq!(size, 64 << 20);
    assert_eq!(blocks, ["pc.ram"]);
    assert_eq!(objects, ["pc.ram"]);
}

#[test]
fn no_m_takes_the_board_default_size() {
    let (_, size, _, _) = configure(&pc(), "").unwrap();
    assert_eq!(size, 128 << 20);
}

#[test]
fn explicit_memory_backend_is_consumed_under_its_own_id() {
    let (ram, size, blocks, objects) = configure(
        &pc(),
        "-object memory-backend-ram,id=m0,size=32M -machine memory-backend=m0",
    )
    .unwrap();
    assert_eq!(ram.as_deref(), Some("m0"));
    // Without -m the machine takes the backend's size.
    assert_eq!(size, 32 << 20);
    assert_eq!(blocks, ["m0"]);
    assert_eq!(objects, ["m0"]);
}

#[test]
fn unused_backends_have_unnamed_ramblocks() {
    let (_, _, blocks, _) =
        configure(&pc(), "-m 64M -object memory-backend-ram,id=spare,size=16M").unwrap();
    assert_eq!(blocks, ["pc.ram", ""]);
}

#[test]
fn mem_path_makes_the_implicit_backend_a_file_backend() {
    let dir = std::env::temp_dir();
    let dir = dir.display().to_string();
    let m = machine(&pc(), &["-m", "16M", "-mem-path", &dir]);
    let backend = &m.objects().get("pc.ram").unwrap().backend;
    assert_eq!(backend.type_name(), "memory-backend-file");
    assert_eq!(backend.get("mem-path").unwrap(), dir);
}

#[test]
fn numa_memdevs_become_a_container_with_one_ramblock_per_node() {
    let (ram, size, blocks, _) = configure(
        &pc(),
        "-m 48M -object memory-backend-ram,id=n0,size=32M -object memory-backend-ram,id=n1,size=16M \
         -numa node,memdev=n0 -numa node,memdev=n1",
    )
    .unwrap();
    assert_eq!(ram.as_deref(), Some("pc.ram"));
    assert_eq!(size, 48 << 20);
    assert_eq!(blocks, ["n0", "n1"]);
}

#[test]
fn board_without_default_ram_id_gets_no_ram() {
    let (ram, _, blocks, objects) = configure(&legacy_board(), "-m 32M").unwrap();
    assert_eq!(ram, None);
    assert!(blocks.is_empty() && objects.is_empty());
}

#[test]
fn refusals_read_like_qemu() {
    let b = pc();
    assert_eq!(
        error(&b, "-M pc,memory-backend=x"),
        "Memory backend 'x' not found"
    );
    assert_eq!(
        error(
            &b,
            "-object memory-backend-ram,id=m,size=64M -M pc,memory-backend=m -m 128M"
        ),
        "Machine memory size does not match the size of the memory backend"
    );
    assert_eq!(
        error(
            &b,
            "-object memory-backend-ram,id=m,size=64M -M pc,memory-backend=m -mem-path /tmp"
        ),
        "'-mem-path' can't be used together with'-machine memory-backend'"
    );
    assert_eq!(
        error(&b, "-object memory-backend-ram,id=pc.ram,size=64M"),
        "object's id 'pc.ram' is reserved for the default RAM backend, it can't be used for any other purposes\n\
         Change the object's 'id' to something else or disable automatic creation of the default RAM backend by setting 'memory-backend=pc.ram' with '-machine'.\n"
    );
    assert_eq!(
        error(&b, "-m 64M -numa node,mem=64M"),
        "-numa node,mem=64M: Parameter -numa node,mem is not supported by this machine type\nUse -numa node,memdev instead\n"
    );
    assert_eq!(
        error(
            &b,
            "-object memory-backend-ram,id=m,size=64M -M pc,memory-backend=m -numa node,memdev=m"
        ),
        "'-machine memory-backend' and '-numa memdev' properties are mutually exclusive"
    );
    assert_eq!(
        error(&b, "-m 128M -object memory-backend-ram,id=m,size=64M -numa node,memdev=m -numa node,memdev=m"),
        "memory backend m can't be used multiple times."
    );
    assert_eq!(
        error(&b, "-numa node,memdev=zz"),
        "-numa node,memdev=zz: memdev=zz is ambiguous"
    );
    assert_eq!(
        error(
            &b,
            "-m 128M -object memory-backend-ram,id=m,size=64M -numa node,memdev=m"
        ),
        "total memory for NUMA nodes (0x4000000) should equal RAM size (0x8000000)"
    );
    assert_eq!(
        error(&b, "-m 64M -mem-path /nonexistent/x"),
        "can't open backing store /nonexistent/x for guest RAM: No such file or directory"
    );
    assert_eq!(
        error(&b, "-M pc,foo=1"),
        "Property 'pc-i440fx-10.0-machine.foo' not found"
    );
    assert_eq!(
        error(&b, "-object memory-backend-ram,id=m,size=1M,foo=1"),
        "-object memory-backend-ram,id=m,size=1M,foo=1: Invalid parameter 'foo'"
    );
    assert_eq!(
        error(&b, "-object memory-backend-ram,id=m,size=0"),
        "property 'size' of memory-backend-ram doesn't take value '0'"
    );
    assert_eq!(
        error(
            &b,
            "-object memory-backend-ram,id=m,size=1M -object memory-backend-ram,id=m,size=1M"
        ),
        "-object memory-backend-ram,id=m,size=1M: Duplicate ID 'm' for object"
    );
}

#[test]
fn numa_checks_come_in_qemus_order() {
    // Mixing is found before mem= is refused, on the node that mixes.
    assert_eq!(
        error(&pc(), "-object memory-backend-ram,id=m0,size=64M -numa node,memdev=m0 -numa node,mem=64M"),
        "-numa node,mem=64M: numa configuration should use either mem= or memdev=,mixing both is not allowed"
    );
    let no_numa = BoardInfo {
        numa_supported: false,
        ..pc()
    };
    assert_eq!(
        error(
            &no_numa,
            "-m 64M -object memory-backend-ram,id=m0,size=64M -numa node,memdev=m0"
        ),
        "-numa node,memdev=m0: NUMA is not supported by this machine-type"
    );
    // Old machine types still take fake NUMA: main RAM stays one implicit backend.
    let old = BoardInfo {
        numa_mem_supported: true,
        ..pc()
    };
    let (ram, _, blocks, _) =
        configure(&old, "-m 64M -numa node,mem=32M -numa node,mem=32M").unwrap();
    assert_eq!(
        (ram.as_deref(), blocks),
        (Some("pc.ram"), vec!["pc.ram".to_string()])
    );
}

#[test]
fn a_backend_used_twice_is_refused() {
    // Main RAM and a NUMA node cannot share a backend: QEMU refuses both at once.
    assert_eq!(
        error(
            &pc(),
            "-object memory-backend-ram,id=m,size=64M -M pc,memory-backend=m -numa node,memdev=m"
        ),
        "'-machine memory-backend' and '-numa memdev' properties are mutually exclusive"
    );
}

#[test]
fn mem_prealloc_is_a_default_for_every_backend() {
    let m = machine(
        &pc(),
        &[
            "-m",
            "8M",
            "-mem-prealloc",
            "-object",
            "memory-backend-ram,id=x,size=4M",
        ],
    );
    let prealloc = |id: &str| m.objects().get(id).unwrap().backend.get("prealloc");
    let (main, other) = (prealloc("pc.ram").unwrap(), prealloc("x").unwrap());
    assert_eq!((main.as_str(), other.as_str()), ("on", "on"));
}

#[test]
fn mem_prealloc_uses_the_hosts_cores_unless_a_backend_pins_a_count() {
    let cores = hostmem::backend::prealloc::online_cpus().to_string();
    let threads = |args: &[&str], id: &str| {
        machine(&pc(), args)
            .objects()
            .get(id)
            .unwrap()
            .backend
            .get("prealloc-threads")
            .unwrap()
    };
    // QEMU would take the vCPU count: 1 here, 3 with -smp 3.
    assert_eq!(threads(&["-m", "8M", "-mem-prealloc"], "pc.ram"), cores);
    assert_eq!(
        threads(&["-m", "8M", "-smp", "3", "-mem-prealloc"], "pc.ram"),
        cores
    );
    let pinned = [
        "-m",
        "8M",
        "-mem-prealloc",
        "-object",
        "memory-backend-ram,id=x,size=4M,prealloc-threads=1",
    ];
    assert_eq!(threads(&pinned, "x"), "1");
    // Without -mem-prealloc a backend's default stays QEMU's: the vCPU count.
    assert_eq!(threads(&["-m", "8M", "-smp", "3"], "pc.ram"), "3");
}

#[test]
fn legacy_allocation_works_once_and_refuses_a_second_call() {
    let mut m = machine(&legacy_board(), &["-m", "16M"]);
    let r = m.allocate_system_memory("legacy.ram", 16 << 20).unwrap();
    let block = m.memory().ram_block_of(r).unwrap();
    let idstr = m.memory().ramblocks.get(block).unwrap().idstr.clone();
    let second = m
        .allocate_system_memory("legacy.ram2", 16 << 20)
        .unwrap_err();
    assert_eq!(idstr, "legacy.ram");
    assert!(
        second.message().contains("called twice"),
        "{}",
        second.message()
    );
    assert_eq!(second.class(), hostmem::HmErrorClass::InUse);
}

#[test]
fn failed_configuration_leaves_no_backend_behind() {
    let cmd = Cmdline::parse(&["-m", "64M", "-mem-path", "/nonexistent/x"]).unwrap();
    let mut m = Machine::new();
    let options =
        hostmem::machine::options::apply(&cmd, &pc(), &mut hostmem::machine::NoHooks).unwrap();
    let mut env = hostmem::machine::BuildEnv {
        host: &hostmem::machine::cpu::ThisHost,
        warn: &mut |_| {},
    };
    assert!(m.configure(&cmd, &pc(), &options, &mut env).is_err());
    assert_eq!(
        (m.objects().ids(), m.memory().ramblocks.ids().len()),
        (Vec::<String>::new(), 0)
    );
}

fn board_with_chunk_property() -> BoardInfo {
    BoardInfo {
        properties: vec![hostmem::machine::boards::BoardProperty {
            name: "x-ram-chunk-size".into(),
            kind: hostmem::machine::boards::PropertyKind::Size,
        }],
        ..pc()
    }
}

#[test]
fn a_boards_own_properties_take_sizes_and_others_are_refused() {
    let board = board_with_chunk_property();
    // Not given: the board applies its own default.
    let m = machine(&board, &["-m", "64M"]);
    assert_eq!(m.board_property("x-ram-chunk-size"), None);
    let m = machine(&board, &["-m", "64M", "-machine", "x-ram-chunk-size=256M"]);
    assert_eq!(m.board_property("x-ram-chunk-size"), Some(256 << 20));
    assert_eq!(m.board_property("x-other"), None);
    assert_eq!(
        error(&board, "-machine x-ram-chunk-size=lots"),
        "Parameter 'x-ram-chunk-size' expects size"
    );
    // Another board does not have it.
    assert_eq!(
        error(&pc(), "-machine x-ram-chunk-size=256M"),
        "Property 'pc-i440fx-10.0-machine.x-ram-chunk-size' not found"
    );
}

#[test]
fn a_board_sets_a_kvm_slot_limit_before_the_accelerator_comes() {
    let mut m = machine(&pc(), &["-m", "64M"]);
    assert_eq!(
        m.set_kvm_max_slot_size(4097).unwrap_err().message(),
        "max-slot-size 0x1001 must be a multiple of the host page size 0x1000"
    );
    m.set_kvm_max_slot_size(4 << 40).unwrap();
    assert_eq!(m.config().unwrap().board_max_slot_size, 4 << 40);
    // 0 takes the limit away again (the kernel's applies).
    m.set_kvm_max_slot_size(0).unwrap();
    assert_eq!(m.config().unwrap().board_max_slot_size, 0);
}
