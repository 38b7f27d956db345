//! The binding policy is in place before the first page is touched, as the kernel itself
//! reports it in /proc/self/numa_maps: "bind:0" and no resident page after bind, every page on
//! node 0 after preallocation.

use hostmem::backend::BackendDefaults;
use hostmem::memory::MemorySystem;
use hostmem::objects::ObjectRegistry;

/// The numa_maps line of the mapping starting at `addr`.
fn numa_maps_line(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
    let key = format!("{addr:x} ");
    maps.lines()
        .find(|l| l.starts_with(&key))
        .unwrap_or_else(|| panic!("no numa_maps line for {addr:x}"))
        .to_string()
}

/// Bytes on node 0 according to a numa_maps line ("N0=<pages>" times "kernelpagesize_kB").
fn bytes_on_node0(line: &str) -> u64 {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .map(|v| v.parse::<u64>().unwrap())
    };
    field("N0=").unwrap_or(0) * field("kernelpagesize_kB=").unwrap_or(4) * 1024
}

#[test]
fn bind_policy_precedes_the_first_touch() {
    let mut objects = ObjectRegistry::default();
    let mut mem = MemorySystem::new();
    let (id, backend) = objects
        .build_from_opts(
            "memory-backend-ram,id=numa,size=64M,host-nodes=0,policy=bind,prealloc=on,prealloc-threads=2",
            &BackendDefaults::default(),
        )
        .unwrap();
    objects.insert(backend).unwrap();
    let job = objects.begin_complete(&id).unwrap().expect("prealloc=on");
    let addr = job.mapping().as_ptr() as usize;

    let before = numa_maps_line(addr);
    assert!(before.contains(" bind:0"), "{before}");
    assert_eq!(
        bytes_on_node0(&before),
        0,
        "pages touched before prealloc: {before}"
    );

    let outcome = job.run();
    objects
        .finish_complete(&id, &mut mem, Some(outcome))
        .unwrap();
    let after = numa_maps_line(addr);
    assert!(after.contains(" bind:0"), "{after}");
    assert_eq!(bytes_on_node0(&after), 64 << 20, "{after}");

    let names: Vec<_> = objects
        .get(&id)
        .unwrap()
        .backend
        .trace()
        .iter()
        .map(|s| s.name())
        .collect();
    let bind = names.iter().position(|&n| n == "bind").unwrap();
    let prealloc = names.iter().position(|&n| n == "prealloc").unwrap();
    assert!(bind < prealloc, "{names:?}");
}
