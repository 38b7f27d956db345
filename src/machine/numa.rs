//! NUMA as QEMU 10's generic machine code has it (hw/core/numa.c, the NUMA parts of
//! hw/core/machine.c): nodes by id, the CPUs of each node, distances, and the checks and words
//! of each step. `-numa` options are taken in command-line order once the machine's backends
//! exist ([`NumaState::parse`]); the configuration is completed when the board is about to be
//! built ([`NumaState::complete`]). Main RAM made of node backends lays them out in node-id
//! order, whatever order the options came in.

use std::collections::BTreeMap;

use crate::error::{Error, HmErrorClass, Result};
use crate::options::cmdline::{NumaEntry, NumaNode, NumaOption, Topology};

/// QEMU's MAX_NODES.
pub const MAX_NODES: usize = 128;
/// The distance of a node to itself (NUMA_DISTANCE_MIN).
const LOCAL_DISTANCE: u8 = 10;

#[derive(Clone, Debug, Default)]
struct Node {
    present: bool,
    mem: u64,
    memdev: Option<String>,
    /// Distance to each node; 0 = not given.
    distance: Vec<u8>,
}

/// What the board's CPUs are: their count and topology (QEMU's possible CPUs).
#[derive(Clone, Copy, Debug)]
pub struct CpuTopology(pub Topology);

/// The ids QEMU gives CPU `index` on a PC (x86_topo_ids_from_idx): threads innermost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CpuIds {
    socket: i64,
    die: i64,
    module: i64,
    core: i64,
    thread: i64,
}

impl CpuTopology {
    fn ids(&self, index: u32) -> CpuIds {
        let t = self.0;
        let (threads, cores, modules, dies) = (
            t.threads.max(1),
            t.cores.max(1),
            t.modules.max(1),
            t.dies.max(1),
        );
        CpuIds {
            thread: i64::from(index % threads),
            core: i64::from(index / threads % cores),
            module: i64::from(index / (threads * cores) % modules),
            die: i64::from(index / (threads * cores * modules) % dies),
            socket: i64::from(index / (threads * cores * modules * dies)),
        }
    }

    /// QEMU's cpu_slot_to_string: the ids a PC CPU has (die and module only when there are
    /// several).
    fn describe(&self, index: u32) -> String {
        let ids = self.ids(index);
        let mut parts = vec![format!("socket-id: {}", ids.socket)];
        if self.0.dies > 1 {
            parts.push(format!("die-id: {}", ids.die));
        }
        if self.0.modules > 1 {
            parts.push(format!("module-id: {}", ids.module));
        }
        parts.push(format!("core-id: {}", ids.core));
        parts.push(format!("thread-id: {}", ids.thread));
        parts.join(", ")
    }
}

/// The machine's NUMA configuration.
#[derive(Clone, Debug)]
pub struct NumaState {
    nodes: Vec<Node>,
    num_nodes: usize,
    /// The highest node id given, plus one.
    max_nodeid: usize,
    have_mem: bool,
    have_memdevs: bool,
    have_distance: bool,
    /// CPU index -> node id, for every CPU an option assigned.
    cpu_nodes: BTreeMap<u32, u16>,
    topology: CpuTopology,
}

/// What NUMA needs to know of the machine while it reads the options.
pub struct NumaContext<'a> {
    /// The machine type still takes `-numa node,mem=` (with QEMU's deprecation warning).
    pub mem_supported: bool,
    pub topology: Topology,
    /// The size of backend `id`, if there is one.
    pub backend_size: &'a dyn Fn(&str) -> Option<u64>,
    pub warn: &'a mut dyn FnMut(String),
}

impl NumaState {
    /// QEMU's parse_numa_opts: every `-numa` option in order, each refused (at its location)
    /// as QEMU refuses it. A malformed option fails in its turn.
    pub fn parse(entries: &[NumaEntry], cx: &mut NumaContext) -> Result<NumaState> {
        let mut state = NumaState {
            nodes: vec![
                Node {
                    distance: vec![0; MAX_NODES],
                    ..Node::default()
                };
                MAX_NODES
            ],
            num_nodes: 0,
            max_nodeid: 0,
            have_mem: false,
            have_memdevs: false,
            have_distance: false,
            cpu_nodes: BTreeMap::new(),
            topology: CpuTopology(cx.topology),
        };
        for entry in entries {
            let at = |e: Error| e.prepend(&format!("-numa {}: ", entry.text));
            let option = entry.option.clone().map_err(Error::from)?;
            match option {
                NumaOption::Node(node) => state.add_node(&node, cx, &entry.text).map_err(at)?,
                NumaOption::Dist { src, dst, val } => {
                    state.add_distance(src, dst, val).map_err(at)?
                }
                NumaOption::Cpu { node_id } => state.add_cpu_option(node_id, entry).map_err(at)?,
                NumaOption::Hmat => return Err(at(hmat_disabled())),
            }
        }
        Ok(state)
    }

    /// QEMU's parse_numa_node.
    fn add_node(&mut self, node: &NumaNode, cx: &mut NumaContext, text: &str) -> Result<()> {
        let id = node.nodeid.map_or(self.num_nodes, usize::from);
        if id >= MAX_NODES {
            return Err(Error::invalid(format!(
                "Max number of NUMA nodes reached: {id}"
            )));
        }
        if self.nodes[id].present {
            return Err(Error::new(
                HmErrorClass::Duplicate,
                format!("Duplicate NUMA nodeid: {id}"),
            ));
        }
        if node.initiator.is_some() {
            return Err(hmat_disabled());
        }
        let max_cpus = self.topology.0.max_cpus;
        for &cpu in &node.cpus {
            if u32::from(cpu) >= max_cpus {
                return Err(Error::invalid(format!(
                    "CPU index ({cpu}) should be smaller than maxcpus ({max_cpus})"
                )));
            }
            self.assign_cpu(u32::from(cpu), id as u16)?;
        }
        self.have_memdevs |= node.memdev.is_some();
        self.have_mem |= node.mem.is_some();
        if (node.mem.is_some() && self.have_memdevs) || (node.memdev.is_some() && self.have_mem) {
            return Err(Error::invalid(
                "numa configuration should use either mem= or memdev=,mixing both is not allowed",
            ));
        }
        if let Some(mem) = node.mem {
            if !cx.mem_supported {
                return Err(Error::invalid(
                    "Parameter -numa node,mem is not supported by this machine type",
                )
                .with_hint("Use -numa node,memdev instead\n"));
            }
            self.nodes[id].mem = mem;
            (cx.warn)(format!(
                "-numa {text}: warning: Parameter -numa node,mem is deprecated, use -numa node,memdev instead"
            ));
        }
        if let Some(memdev) = &node.memdev {
            let size = (cx.backend_size)(memdev).ok_or_else(|| {
                Error::new(
                    HmErrorClass::NotFound,
                    format!("memdev={memdev} is ambiguous"),
                )
            })?;
            self.nodes[id].mem = size;
            self.nodes[id].memdev = Some(memdev.clone());
        }
        self.nodes[id].present = true;
        self.max_nodeid = self.max_nodeid.max(id + 1);
        self.num_nodes += 1;
        Ok(())
    }

    /// QEMU's machine_set_cpu_numa_node for one CPU: a CPU already in another node is refused.
    fn assign_cpu(&mut self, cpu: u32, node: u16) -> Result<()> {
        match self.cpu_nodes.get(&cpu) {
            Some(&old) if old != node => Err(Error::invalid(format!(
                "CPU is already assigned to node-id: {old}"
            ))),
            _ => {
                self.cpu_nodes.insert(cpu, node);
                Ok(())
            }
        }
    }

    /// QEMU's parse_numa_distance.
    fn add_distance(&mut self, src: u16, dst: u16, val: u8) -> Result<()> {
        let (s, d) = (usize::from(src), usize::from(dst));
        if s >= MAX_NODES || d >= MAX_NODES {
            return Err(Error::invalid(format!(
                "Parameter '{}' expects an integer between 0 and {}",
                if s >= MAX_NODES { "src" } else { "dst" },
                MAX_NODES - 1
            )));
        }
        if !self.nodes[s].present || !self.nodes[d].present {
            return Err(Error::invalid(
                "Source/Destination NUMA node is missing. Please use '-numa node' option to declare it first.",
            ));
        }
        if val < LOCAL_DISTANCE {
            return Err(Error::invalid(format!(
                "NUMA distance ({val}) is invalid, it shouldn't be less than {LOCAL_DISTANCE}."
            )));
        }
        if s == d && val != LOCAL_DISTANCE {
            return Err(Error::invalid(format!(
                "Local distance of node {s} should be {LOCAL_DISTANCE}."
            )));
        }
        self.nodes[s].distance[d] = val;
        self.have_distance = true;
        Ok(())
    }

    /// `-numa cpu,node-id=N[,socket-id=..][,die-id=..][,module-id=..][,core-id=..][,thread-id=..]`:
    /// every CPU whose ids match goes to node N.
    fn add_cpu_option(&mut self, node_id: Option<i64>, entry: &NumaEntry) -> Result<()> {
        let node_id =
            node_id.ok_or_else(|| Error::invalid("Missing mandatory node-id property"))?;
        let present = usize::try_from(node_id)
            .ok()
            .filter(|&n| n < MAX_NODES)
            .is_some_and(|n| self.nodes[n].present);
        if !present {
            return Err(Error::invalid(format!(
                "Invalid node-id={node_id}, NUMA node must be defined with -numa node,nodeid=ID before it's used with -numa cpu,node-id=ID"
            )));
        }
        let given = |key: &str| {
            crate::options::values::parse_keyval(&entry.text, Some("type"))
                .ok()
                .and_then(|kv| kv.into_iter().rev().find(|(k, _)| k == key))
                .and_then(|(_, v)| crate::options::values::parse_i64_any(&v))
        };
        let t = self.topology.0;
        for (key, supported) in [
            ("cluster-id", false),
            ("die-id", t.dies > 1),
            ("module-id", t.modules > 1),
        ] {
            if given(key).is_some() && !supported {
                return Err(Error::invalid(format!("{key} is not supported")));
            }
        }
        let want = (
            given("socket-id"),
            given("die-id"),
            given("module-id"),
            given("core-id"),
            given("thread-id"),
        );
        let mut matched = false;
        for cpu in 0..t.max_cpus {
            let ids = self.topology.ids(cpu);
            let fits = |w: Option<i64>, v: i64| w.is_none_or(|w| w == v);
            if fits(want.0, ids.socket)
                && fits(want.1, ids.die)
                && fits(want.2, ids.module)
                && fits(want.3, ids.core)
                && fits(want.4, ids.thread)
            {
                matched = true;
                self.assign_cpu(cpu, node_id as u16)?;
            }
        }
        if !matched {
            return Err(Error::invalid("no match found"));
        }
        Ok(())
    }

    /// How many nodes there are.
    pub fn num_nodes(&self) -> usize {
        self.num_nodes
    }

    /// Whether main RAM is made of the nodes' backends (QEMU's !numa_uses_legacy_mem).
    pub fn uses_memdevs(&self) -> bool {
        self.have_memdevs
    }

    /// The node backends in node-id order, with their sizes (nodes without one skipped).
    pub fn memdevs(&self) -> Vec<(String, u64)> {
        self.nodes[..self.num_nodes]
            .iter()
            .filter_map(|n| n.memdev.clone().map(|m| (m, n.mem)))
            .collect()
    }

    /// The first half of QEMU's numa_complete_configuration: node ids without gaps (the
    /// largest missing one reported, as QEMU does), and the nodes' memory adding up to
    /// `ram_size`.
    pub fn check_nodes(&self, ram_size: u64) -> Result<()> {
        if let Some(missing) = (0..self.max_nodeid).rev().find(|&i| !self.nodes[i].present) {
            return Err(Error::invalid(format!("numa: Node ID missing: {missing}")));
        }
        if self.num_nodes == 0 {
            return Ok(());
        }
        let total = self.nodes[..self.num_nodes]
            .iter()
            .fold(0u64, |t, n| t.wrapping_add(n.mem));
        if total != ram_size {
            return Err(Error::invalid(format!(
                "total memory for NUMA nodes (0x{total:x}) should equal RAM size (0x{ram_size:x})"
            )));
        }
        Ok(())
    }

    /// The end of numa_complete_configuration: with distances given, every pair of nodes
    /// needs one in at least one direction, and both directions once any pair is asymmetric.
    pub fn check_distances(&self) -> Result<()> {
        if self.num_nodes == 0 || !self.have_distance {
            return Ok(());
        }
        let n = self.num_nodes;
        let d = |s: usize, t: usize| self.nodes[s].distance[t];
        let mut asymmetric = false;
        for src in 0..n {
            for dst in src..n {
                if d(src, dst) == 0 && d(dst, src) == 0 && src != dst {
                    return Err(Error::invalid(format!(
                        "The distance between node {src} and {dst} is missing, at least one distance value between each nodes should be provided."
                    )));
                }
                if d(src, dst) != 0 && d(dst, src) != 0 && d(src, dst) != d(dst, src) {
                    asymmetric = true;
                }
            }
        }
        if asymmetric && (0..n).any(|s| (0..n).any(|t| s != t && d(s, t) == 0)) {
            return Err(Error::invalid(
                "At least one asymmetrical pair of distances is given, please provide distances for both directions of all node pairs.",
            ));
        }
        Ok(())
    }

    /// QEMU's machine_numa_finish_cpu_init: when some CPUs were given nodes and others not,
    /// its two warnings (the others go to node 0); none when no CPU was given one.
    pub fn cpu_warnings(&self) -> Vec<String> {
        if self.num_nodes == 0 || self.cpu_nodes.is_empty() {
            return Vec::new();
        }
        let missing: Vec<String> = (0..self.topology.0.max_cpus)
            .filter(|c| !self.cpu_nodes.contains_key(c))
            .map(|c| format!("CPU {c} [{}]", self.topology.describe(c)))
            .collect();
        if missing.is_empty() {
            return Vec::new();
        }
        vec![
            format!(
                "warning: CPU(s) not present in any NUMA nodes: {}",
                missing.join(", ")
            ),
            "warning: All CPU(s) up to maxcpus should be described in NUMA config, ability to start up with partial NUMA mappings is obsoleted and will be removed in future".to_string(),
        ]
    }
}

fn hmat_disabled() -> Error {
    Error::invalid(
        "ACPI Heterogeneous Memory Attribute Table (HMAT) is disabled, enable it with -machine hmat=on before using any of hmat specific options",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::cmdline::Cmdline;

    /// Reads the -numa options of `line` against backends m0..m3 of 64 MiB each.
    fn numa(line: &str) -> (Result<NumaState>, Vec<String>) {
        let args: Vec<&str> = line.split_whitespace().collect();
        let cmd = Cmdline::read(&args, &mut Vec::new()).unwrap();
        let sizes = |id: &str| ["m0", "m1", "m2", "m3"].contains(&id).then_some(64 << 20);
        let mut warnings = Vec::new();
        let mut warn = |w: String| warnings.push(w);
        let mut cx = NumaContext {
            mem_supported: false,
            topology: cmd.topology(),
            backend_size: &sizes,
            warn: &mut warn,
        };
        let state = NumaState::parse(&cmd.numa, &mut cx);
        (state, warnings)
    }

    fn refusal(line: &str) -> String {
        numa(line).0.unwrap_err().message().to_string()
    }

    #[test]
    fn nodes_come_in_node_id_order() {
        let (s, _) = numa("-numa node,nodeid=1,memdev=m1 -numa node,nodeid=0,memdev=m0");
        let s = s.unwrap();
        assert_eq!(
            s.memdevs(),
            [("m0".to_string(), 64 << 20), ("m1".to_string(), 64 << 20)]
        );
        s.check_nodes(128 << 20).unwrap();
        // Without nodeid, a node takes the count so far.
        let (s, _) = numa("-numa node,nodeid=1,memdev=m1 -numa node,memdev=m0");
        assert_eq!(
            s.unwrap_err().message(),
            "-numa node,memdev=m0: Duplicate NUMA nodeid: 1"
        );
    }

    #[test]
    fn node_ids_are_checked_as_qemu_does() {
        assert_eq!(
            refusal("-numa node,nodeid=128,memdev=m0"),
            "-numa node,nodeid=128,memdev=m0: Max number of NUMA nodes reached: 128"
        );
        let many: String = (0..129).map(|_| " -numa node").collect();
        assert_eq!(
            refusal(&many),
            "-numa node: Max number of NUMA nodes reached: 128"
        );
        let (s, _) = numa("-numa node,nodeid=3,memdev=m0 -numa node,nodeid=1,memdev=m1");
        assert_eq!(
            s.unwrap().check_nodes(128 << 20).unwrap_err().message(),
            "numa: Node ID missing: 2"
        );
        let (s, _) = numa("-numa node -numa node");
        assert_eq!(
            s.unwrap().check_nodes(128 << 20).unwrap_err().message(),
            "total memory for NUMA nodes (0x0) should equal RAM size (0x8000000)"
        );
        assert_eq!(
            refusal("-numa node,memdev=m0,mem=64M"),
            "-numa node,memdev=m0,mem=64M: numa configuration should use either mem= or memdev=,mixing both is not allowed"
        );
        assert_eq!(
            refusal("-numa node,memdev=m9"),
            "-numa node,memdev=m9: memdev=m9 is ambiguous"
        );
        assert_eq!(
            refusal("-numa node,initiator=0"),
            "-numa node,initiator=0: ACPI Heterogeneous Memory Attribute Table (HMAT) is disabled, enable it with -machine hmat=on before using any of hmat specific options"
        );
    }

    #[test]
    fn cpus_are_checked_against_maxcpus_and_each_other() {
        assert_eq!(
            refusal("-numa node,cpus=5,memdev=m0"),
            "-numa node,cpus=5,memdev=m0: CPU index (5) should be smaller than maxcpus (1)"
        );
        assert_eq!(
            refusal("-smp 2,maxcpus=4 -numa node,cpus=3-4,memdev=m0"),
            "-numa node,cpus=3-4,memdev=m0: CPU index (4) should be smaller than maxcpus (4)"
        );
        assert_eq!(
            refusal("-smp 2 -numa node,cpus=0,memdev=m0 -numa node,cpus=0,memdev=m1"),
            "-numa node,cpus=0,memdev=m1: CPU is already assigned to node-id: 0"
        );
        // The same CPU twice in one node is no error.
        assert!(numa("-smp 2 -numa node,cpus=1,cpus=1,memdev=m0").0.is_ok());
    }

    #[test]
    fn partly_assigned_cpus_warn_as_qemu_does() {
        let (s, _) = numa("-smp 2,maxcpus=4 -numa node,cpus=0-1,memdev=m0 -numa node,memdev=m1");
        assert_eq!(
            s.unwrap().cpu_warnings(),
            [
                "warning: CPU(s) not present in any NUMA nodes: CPU 2 [socket-id: 0, core-id: 2, thread-id: 0], CPU 3 [socket-id: 0, core-id: 3, thread-id: 0]",
                "warning: All CPU(s) up to maxcpus should be described in NUMA config, ability to start up with partial NUMA mappings is obsoleted and will be removed in future"
            ]
        );
        let (s, _) = numa("-smp 2 -numa node,memdev=m0 -numa node,memdev=m1");
        assert!(s.unwrap().cpu_warnings().is_empty());
        let (s, _) = numa("-smp 4,sockets=2,dies=2 -numa node,cpus=0,memdev=m0");
        let w = s.unwrap().cpu_warnings();
        assert!(
            w[0].contains("CPU 3 [socket-id: 1, die-id: 1, core-id: 0, thread-id: 0]"),
            "{w:?}"
        );
    }

    #[test]
    fn numa_cpu_options() {
        assert_eq!(
            refusal("-numa cpu"),
            "-numa cpu: Missing mandatory node-id property"
        );
        assert_eq!(
            refusal("-numa cpu,node-id=0"),
            "-numa cpu,node-id=0: Invalid node-id=0, NUMA node must be defined with -numa node,nodeid=ID before it's used with -numa cpu,node-id=ID"
        );
        let (s, _) = numa(
            "-smp 2 -numa node,memdev=m0 -numa node,memdev=m1 -numa cpu,node-id=1,core-id=1 -numa cpu,node-id=0,core-id=0",
        );
        assert!(s.unwrap().cpu_warnings().is_empty());
        assert_eq!(
            refusal("-smp 2 -numa node,memdev=m0 -numa cpu,node-id=0,die-id=0"),
            "-numa cpu,node-id=0,die-id=0: die-id is not supported"
        );
    }

    #[test]
    fn distances_as_qemu_checks_them() {
        let two = "-numa node,memdev=m0 -numa node,memdev=m1";
        assert_eq!(
            refusal(&format!("{two} -numa dist,src=0,dst=2,val=20")),
            "-numa dist,src=0,dst=2,val=20: Source/Destination NUMA node is missing. Please use '-numa node' option to declare it first."
        );
        assert_eq!(
            refusal(&format!("{two} -numa dist,src=0,dst=128,val=20")),
            "-numa dist,src=0,dst=128,val=20: Parameter 'dst' expects an integer between 0 and 127"
        );
        assert_eq!(
            refusal(&format!("{two} -numa dist,src=0,dst=1,val=5")),
            "-numa dist,src=0,dst=1,val=5: NUMA distance (5) is invalid, it shouldn't be less than 10."
        );
        assert_eq!(
            refusal(&format!("{two} -numa dist,src=0,dst=0,val=20")),
            "-numa dist,src=0,dst=0,val=20: Local distance of node 0 should be 10."
        );
        let three = format!("{two} -numa node,memdev=m2 -numa dist,src=0,dst=1,val=20");
        let (s, _) = numa(&three);
        assert_eq!(
            s.unwrap().check_distances().unwrap_err().message(),
            "The distance between node 0 and 2 is missing, at least one distance value between each nodes should be provided."
        );
        let (s, _) = numa(&format!(
            "{two} -numa dist,src=0,dst=1,val=20 -numa dist,src=1,dst=0,val=30"
        ));
        s.unwrap().check_distances().unwrap();
        let asym = format!(
            "{two} -numa node,memdev=m2 -numa dist,src=0,dst=1,val=20 -numa dist,src=1,dst=0,val=30 -numa dist,src=0,dst=2,val=20 -numa dist,src=1,dst=2,val=20"
        );
        assert_eq!(
            numa(&asym).0.unwrap().check_distances().unwrap_err().message(),
            "At least one asymmetrical pair of distances is given, please provide distances for both directions of all node pairs."
        );
    }
}
