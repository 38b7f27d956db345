//! QEMU's command line, as far as machine RAM and the small VMM are concerned: `-m`, `-M` /
//! `-machine`, `-mem-path`, `-mem-prealloc`, `-object`, `-numa`, `-smp`, `-cpu`, `-accel`,
//! `-S`, `-monitor`, and the options users add out of habit. Pure: argv in, [`Cmdline`] out.
//!
//! Errors read as QEMU 10 prints them. Those found while reading one option carry that option as
//! a location prefix ("-m foo: Parameter 'size' expects ..."), exactly where QEMU prints one.
//! QEMU finds some errors only later, while it builds the machine (a chardev in use twice, the
//! machine's "smp" and "memory" properties, the accelerator, each `-numa`); [`Cmdline::read`]
//! keeps those in [`Deferred`] and [`NumaEntry`] for the machine to report at its stage, and
//! [`Cmdline::parse`] reports them at once for callers that build no machine.

use crate::options::error::OptionError;
use crate::options::values::{
    expects, parse_keyval_strict, parse_qemu_opts, parse_u64_any, strtosz, Result, SizeFault,
};

/// `-m [size=]N[,slots=S,maxmem=M]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryOption {
    /// Bytes; `None` when absent (and `-m 0` means "the board's default", also `None`).
    pub size: Option<u64>,
    /// `slots=` as given (`slots=0` counts as given: QEMU then wants `maxmem`).
    pub slots: Option<u64>,
    pub maxmem: Option<u64>,
}

/// `-smp [cpus=]N[,maxcpus=M][,sockets=..,dies=..,clusters=..,modules=..,cores=..,threads=..]`:
/// what was given (books and drawers are s390's, read and otherwise ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmpOption {
    pub cpus: Option<u32>,
    pub maxcpus: Option<u32>,
    pub sockets: Option<u32>,
    pub dies: Option<u32>,
    pub clusters: Option<u32>,
    pub modules: Option<u32>,
    pub cores: Option<u32>,
    pub threads: Option<u32>,
}

/// The CPU topology QEMU 10 derives from `-smp` on a machine that prefers cores over sockets
/// (every machine type since 6.2): missing counts are 1, except the one that makes the
/// product reach `maxcpus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    pub cpus: u32,
    pub max_cpus: u32,
    pub sockets: u32,
    pub dies: u32,
    pub modules: u32,
    pub cores: u32,
    pub threads: u32,
}

impl SmpOption {
    pub fn topology(&self) -> Topology {
        let one = |v: Option<u32>| v.unwrap_or(1).max(1);
        let (dies, clusters, modules) = (one(self.dies), one(self.clusters), one(self.modules));
        let (cpus, maxcpus) = (self.cpus.unwrap_or(0), self.maxcpus.unwrap_or(0));
        let (mut sockets, mut cores, mut threads) = (
            self.sockets.unwrap_or(0),
            self.cores.unwrap_or(0),
            self.threads.unwrap_or(0),
        );
        let maxcpus = if cpus == 0 && maxcpus == 0 {
            sockets = sockets.max(1);
            cores = cores.max(1);
            threads = threads.max(1);
            0
        } else {
            let maxcpus = if maxcpus > 0 { maxcpus } else { cpus };
            let div = |d: u32| maxcpus / d.max(1);
            if cores == 0 {
                sockets = sockets.max(1);
                threads = threads.max(1);
                cores = div(sockets * dies * clusters * modules * threads);
            } else if sockets == 0 {
                threads = threads.max(1);
                sockets = div(dies * clusters * modules * cores * threads);
            }
            if threads == 0 {
                threads = div(sockets * dies * clusters * modules * cores);
            }
            maxcpus
        };
        let total = sockets * dies * clusters * modules * cores * threads;
        let max_cpus = if maxcpus > 0 { maxcpus } else { total };
        Topology {
            cpus: if cpus > 0 { cpus } else { max_cpus },
            max_cpus,
            sockets,
            dies,
            modules,
            cores,
            threads,
        }
    }
}

/// `-numa node,...`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NumaNode {
    pub nodeid: Option<u16>,
    /// CPU indexes, every `cpus=` of the option in order (ranges expanded).
    pub cpus: Vec<u16>,
    pub mem: Option<u64>,
    pub memdev: Option<String>,
    pub initiator: Option<u16>,
}

/// One `-numa` option as QEMU's visitor reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NumaOption {
    Node(NumaNode),
    Dist {
        src: u16,
        dst: u16,
        val: u8,
    },
    Cpu {
        node_id: Option<i64>,
    },
    /// `hmat-lb` and `hmat-cache`: well-formed, refused later as HMAT is off.
    Hmat,
}

/// A `-numa` option: its text (QEMU's location for what is wrong with it) and what reading it
/// gave. QEMU reads `-numa` options only once the machine exists, so a malformed one is kept
/// here and reported then, in its turn among the other `-numa` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaEntry {
    pub text: String,
    pub option: std::result::Result<NumaOption, OptionError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// One `-object` option, kept as text: objects are created after the machine type is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectOption {
    pub text: String,
}

/// Errors QEMU finds after reading every option, each reported at its stage of building the
/// machine: the chardevs first, then the machine's properties ("smp" and "memory" among them,
/// in the order of `options::qdict`), then the accelerator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deferred {
    /// A character device refused once the chardevs are created (stdio twice).
    pub chardev: Option<OptionError>,
    /// The machine's "smp" property (the topology).
    pub smp: Option<OptionError>,
    /// The machine's "memory" property (`-m N` read again as "NM").
    pub memory: Option<OptionError>,
    /// The accelerator: its name and properties, `-accel` against `-machine accel=`.
    pub accel: Option<OptionError>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cmdline {
    pub machine_type: Option<String>,
    pub memory_backend: Option<String>,
    /// Other `-machine` properties (name, value), once each where the key first came (a
    /// repeated key keeps its place and takes the last value, as QEMU's dictionary does),
    /// checked once the type is known.
    pub machine_props: Vec<(String, String)>,
    pub memory: MemoryOption,
    /// The text of the last `-m`, for errors that QEMU reports with it.
    pub memory_text: Option<String>,
    pub mem_path: Option<String>,
    pub mem_prealloc: bool,
    pub objects: Vec<ObjectOption>,
    pub numa: Vec<NumaEntry>,
    /// `-smp` when given.
    pub smp: Option<SmpOption>,
    /// The last `-cpu`, as written (read by `machine::cpu` once the board is known).
    pub cpu: Option<String>,
    /// The accelerator the machine runs on.
    pub accel: Option<Accel>,
    /// The first `-accel` / `-enable-kvm`, and `-machine accel=`: QEMU refuses both at once.
    pub accel_option: Option<Accel>,
    pub accel_machine: Option<Accel>,
    /// `-accel kvm,max-slot-size=SIZE` (hostmem's own property; 0 = the kernel's limit).
    pub kvm_max_slot_size: u64,
    /// `-accel kvm,memslot-preflight=off` (hostmem's own property): register memslots even
    /// when their kernel-memory estimate exceeds what the host can spare.
    pub kvm_skip_memslot_preflight: bool,
    pub start_paused: bool,
    /// `-monitor stdio` (`-monitor none` asks for no monitor).
    pub monitor_stdio: bool,
    /// `-incoming URI` (or `defer`).
    pub incoming: Option<String>,
    /// `-global migration.send-switchover-start=on|off` (the machine type's default if absent).
    pub send_switchover_start: Option<bool>,
    /// `-global migration.send-configuration=on|off` (on if absent): off, streams go without
    /// the CONFIGURATION section (so without the machine type check) and none is expected.
    pub send_configuration: Option<bool>,
    /// `-machine help` (`-M help`, `-M ?`): QEMU lists the machine types and exits right there
    /// (with `machine_type` set by it or an earlier `-M`, it lists that type's properties
    /// instead). Parsing stops at that option; the ones after it were only checked for being
    /// known and having their argument.
    pub machine_help: bool,
    /// What QEMU finds wrong only later (see [`Deferred`]).
    pub deferred: Deferred,
}

/// Options taking an argument that mean nothing to hostmem and are accepted as in QEMU.
const IGNORED_WITH_ARG: &[&str] = &[
    "-display", "-serial", "-name", "-vga", "-chardev", "-qmp", "-d", "-D", "-L", "-bios",
];
/// Options without an argument that mean nothing here.
const IGNORED_FLAGS: &[&str] = &[
    "-nodefaults",
    "-nographic",
    "-no-reboot",
    "-no-shutdown",
    "-no-user-config",
];

/// Whether option `opt` (with one leading dash) takes an argument; `None` for an option
/// hostmem does not know.
fn takes_argument(opt: &str) -> Option<bool> {
    if IGNORED_FLAGS.contains(&opt) || matches!(opt, "-S" | "-mem-prealloc" | "-enable-kvm") {
        return Some(false);
    }
    let with_arg = matches!(
        opt,
        "-m" | "-M"
            | "-machine"
            | "-mem-path"
            | "-object"
            | "-numa"
            | "-smp"
            | "-cpu"
            | "-accel"
            | "-monitor"
            | "-incoming"
            | "-global"
    ) || IGNORED_WITH_ARG.contains(&opt);
    with_arg.then_some(true)
}

/// QEMU accepts "--opt" as "-opt".
fn single_dash(raw: &str) -> &str {
    if raw.starts_with("--") {
        &raw[1..]
    } else {
        raw
    }
}

/// QEMU's first pass over argv, before any option is acted on: every option must be known
/// and have its argument. Bare words are left to the second pass.
fn check_options<S: AsRef<str>>(args: &[S]) -> Result<()> {
    let mut i = 0;
    while i < args.len() {
        let raw = args[i].as_ref();
        i += 1;
        if !raw.starts_with('-') || raw == "-" {
            continue;
        }
        match takes_argument(single_dash(raw)) {
            None => return Err(OptionError::InvalidOption(raw.to_string())),
            Some(true) if i == args.len() => {
                return Err(OptionError::RequiresArgument(raw.to_string()))
            }
            Some(true) => i += 1,
            Some(false) => {}
        }
    }
    Ok(())
}

impl Cmdline {
    /// Reads `args` (without the program name) and reports every error, also those QEMU finds
    /// only once it builds the machine (in the order of its stages: chardevs, `-smp`, `-m`,
    /// the accelerator, `-numa`). For callers that build no machine; QEMU's warnings about the
    /// options are dropped.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Cmdline> {
        let mut c = Cmdline::read(args, &mut Vec::new())?;
        if c.machine_help {
            // QEMU lists the machine types before it could find any of these.
            return Ok(c);
        }
        let d = std::mem::take(&mut c.deferred);
        if let Some(e) = [d.chardev, d.smp, d.memory, d.accel]
            .into_iter()
            .flatten()
            .next()
        {
            return Err(e);
        }
        if let Some(e) = c.numa.iter().find_map(|n| n.option.clone().err()) {
            return Err(e);
        }
        Ok(c)
    }

    /// Reads `args` (without the program name) as QEMU reads its options: an error found while
    /// reading one option (syntax, `-m` sizes, `-monitor`, `-M`) is returned; those QEMU finds
    /// later are kept in [`Cmdline::deferred`] and [`Cmdline::numa`]. QEMU's warnings about
    /// the options read (short-form booleans) are appended to `warnings`, located, each
    /// ready to print after "<program>: ". `-machine help` ends the reading.
    pub fn read<S: AsRef<str>>(args: &[S], warnings: &mut Vec<String>) -> Result<Cmdline> {
        check_options(args)?;
        let mut c = Cmdline::default();
        let (mut smp_pairs, mut smp_given) = (Vec::new(), false);
        let mut i = 0;
        while i < args.len() {
            let raw = args[i].as_ref();
            i += 1;
            if !raw.starts_with('-') || raw == "-" {
                // QEMU takes a bare word as the disk image; hostmem has no disks.
                return Err(OptionError::DiskImage(raw.to_string()));
            }
            let opt = single_dash(raw);
            if IGNORED_FLAGS.contains(&opt) {
                continue;
            }
            let flag = |name: &str| opt == name;
            if flag("-S") {
                c.start_paused = true;
                continue;
            }
            if flag("-mem-prealloc") {
                c.mem_prealloc = true;
                continue;
            }
            if flag("-enable-kvm") {
                c.read_accel("kvm", &mut Vec::new())?;
                continue;
            }
            if takes_argument(opt) != Some(true) {
                return Err(OptionError::InvalidOption(raw.to_string()));
            }
            let Some(arg) = args.get(i).map(|a| a.as_ref()) else {
                return Err(OptionError::RequiresArgument(raw.to_string()));
            };
            i += 1;
            let at = |e: OptionError| e.at(opt, arg);
            let mut opt_warnings = Vec::new();
            match opt {
                "-m" => {
                    // QEMU checks a bare number again once it has appended "M", later and
                    // without the option's location.
                    match parse_memory(arg, &mut opt_warnings) {
                        Ok((m, reparse)) => {
                            c.memory = m;
                            c.deferred.memory = reparse;
                        }
                        Err(e) => {
                            flush_warnings(warnings, opt, arg, opt_warnings);
                            return Err(at(e));
                        }
                    }
                    c.memory_text = Some(arg.to_string());
                }
                "-M" | "-machine" => {
                    if let Some(help_type) = machine_help(arg).map_err(at)? {
                        c.machine_help = true;
                        c.machine_type = help_type.or(c.machine_type.take());
                        return Ok(c);
                    }
                    c.read_machine(arg).map_err(at)?
                }
                "-mem-path" => c.mem_path = Some(arg.to_string()),
                "-object" => c.objects.push(ObjectOption {
                    text: arg.to_string(),
                }),
                // QEMU reads the syntax now and the option once the machine exists.
                "-numa" => {
                    let read = parse_qemu_opts(arg, Some("type"), &mut opt_warnings);
                    flush_warnings(warnings, opt, arg, std::mem::take(&mut opt_warnings));
                    let pairs = read.map_err(at)?;
                    c.numa.push(NumaEntry {
                        text: arg.to_string(),
                        option: parse_numa(&pairs).map_err(at),
                    });
                }
                // The syntax now; QEMU merges every -smp into the machine's "smp" property,
                // whose members it checks with the other properties.
                "-smp" => {
                    for (k, v) in parse_keyval_strict(arg, Some("cpus")).map_err(at)? {
                        match smp_pairs.iter_mut().find(|(key, _)| *key == k) {
                            Some(pair) => pair.1 = v,
                            None => smp_pairs.push((k, v)),
                        }
                    }
                    smp_given = true;
                }
                "-cpu" => c.cpu = Some(arg.to_string()),
                // The syntax now, the accelerator and its properties when it starts.
                "-accel" => {
                    let read = parse_qemu_opts(arg, Some("accel"), &mut opt_warnings);
                    flush_warnings(warnings, opt, arg, std::mem::take(&mut opt_warnings));
                    read.map_err(at)?;
                    if let Err(e) = c.read_accel(arg, &mut Vec::new()) {
                        c.deferred.accel.get_or_insert(at(e));
                    }
                }
                "-incoming" => c.incoming = Some(arg.to_string()),
                "-global" => c.read_global(arg).map_err(at)?,
                "-monitor" => match arg {
                    "stdio" if c.monitor_stdio => {
                        c.deferred
                            .chardev
                            .get_or_insert(at(OptionError::StdioInUse));
                    }
                    "stdio" => c.monitor_stdio = true,
                    "none" => {}
                    _ => return Err(at(OptionError::NotACharDriver(arg.to_string()))),
                },
                _ => {} // accepted and ignored
            }
            flush_warnings(warnings, opt, arg, opt_warnings);
        }
        if smp_given {
            match parse_smp(&smp_pairs) {
                Ok(smp) => c.smp = Some(smp),
                Err(e) => {
                    c.smp = Some(SmpOption::default());
                    c.deferred.smp = Some(e);
                }
            }
        }
        if let Err(e) = c.finish_accel() {
            // QEMU refuses the mix before it starts any accelerator.
            c.deferred.accel = Some(e);
        }
        Ok(c)
    }

    /// `-global DRIVER.PROP=VALUE`: the migration object's `send-switchover-start` and
    /// `send-configuration` are read;
    /// device properties mean nothing to hostmem and are accepted, as QEMU accepts unknown
    /// globals with a warning at most.
    fn read_global(&mut self, arg: &str) -> Result<()> {
        let (key, value) = arg.split_once('=').ok_or_else(|| OptionError::BadValue {
            name: "global".into(),
            value: arg.to_string(),
        })?;
        let parse = |name| crate::options::values::parse_bool_param(name, value);
        match key {
            "migration.send-switchover-start" => {
                self.send_switchover_start = Some(parse("send-switchover-start")?)
            }
            "migration.send-configuration" => {
                self.send_configuration = Some(parse("send-configuration")?)
            }
            _ => {}
        }
        Ok(())
    }

    fn read_machine(&mut self, arg: &str) -> Result<()> {
        for (key, value) in parse_keyval_strict(arg, Some("type"))? {
            match key.as_str() {
                "type" => self.machine_type = Some(value),
                "memory-backend" => self.memory_backend = Some(value),
                "accel" => {
                    self.accel_machine = Some(parse_accel_name(&value)?);
                }
                _ => match self.machine_props.iter_mut().find(|(k, _)| *k == key) {
                    Some(prop) => prop.1 = value,
                    None => self.machine_props.push((key, value)),
                },
            }
        }
        Ok(())
    }

    /// One `-accel`: QEMU tries them in order and keeps the first that starts, so the first
    /// given wins (every accelerator hostmem knows starts when asked).
    fn read_accel(&mut self, arg: &str, warnings: &mut Vec<String>) -> Result<()> {
        let mut accel = None;
        let mut max_slot_size = 0;
        let mut preflight = true;
        for (key, value) in parse_qemu_opts(arg, Some("accel"), warnings)? {
            match key.as_str() {
                "accel" => accel = Some(parse_accel_name(&value)?),
                "max-slot-size" if accel == Some(Accel::Kvm) => {
                    max_slot_size =
                        strtosz(&value).map_err(|_| expects("max-slot-size", "a size value"))?;
                }
                "memslot-preflight" if accel == Some(Accel::Kvm) => {
                    preflight = crate::options::values::parse_bool_param(&key, &value)?;
                }
                _ => {
                    let class = match accel {
                        Some(Accel::Kvm) => "kvm-accel",
                        _ => "tcg-accel",
                    };
                    return Err(OptionError::PropertyNotFound {
                        class: class.to_string(),
                        name: key,
                    });
                }
            }
        }
        if self.accel_option.is_none() {
            self.accel_option = accel;
            self.kvm_max_slot_size = max_slot_size;
            self.kvm_skip_memslot_preflight = !preflight;
        }
        Ok(())
    }

    /// Settles the accelerator once every option is read.
    fn finish_accel(&mut self) -> Result<()> {
        match (self.accel_option, self.accel_machine) {
            (Some(_), Some(_)) => Err(OptionError::AccelConflict),
            (a, m) => {
                self.accel = a.or(m);
                Ok(())
            }
        }
    }

    /// The CPU count and topology `-smp` gives (one CPU without it).
    pub fn topology(&self) -> Topology {
        self.smp.clone().unwrap_or_default().topology()
    }
}

/// Appends the warnings of one option, located at it.
fn flush_warnings(out: &mut Vec<String>, opt: &str, arg: &str, warnings: Vec<String>) {
    out.extend(
        warnings
            .into_iter()
            .map(|w| format!("{opt} {arg}: warning: {w}")),
    );
}

fn parse_accel_name(name: &str) -> Result<Accel> {
    match name {
        "kvm" => Ok(Accel::Kvm),
        "tcg" => Ok(Accel::Tcg),
        _ => Err(OptionError::InvalidAccelerator(name.to_string())),
    }
}

/// keyval's help request in a `-machine` argument: an element "help" or "?" without '='
/// (QEMU's `keyval_parse_one`). `None` when there is none; otherwise the machine type the same
/// argument names, if any (the implied first value or `type=`, the last one winning). An
/// argument that asks for help and is malformed is refused as keyval refuses it, since QEMU
/// fails before it can list anything.
fn machine_help(arg: &str) -> Result<Option<Option<String>>> {
    let (mut help, mut ty, mut error) = (false, None, None);
    let mut rest = arg;
    let mut first = true;
    while !rest.is_empty() {
        let len = rest.find(['=', ',']).unwrap_or(rest.len());
        let word = &rest[..len];
        rest = &rest[len..];
        if len > 0 && !rest.starts_with('=') {
            if word == "help" || word == "?" {
                help = true;
            } else if first {
                ty = Some(word.to_string());
            } else {
                error.get_or_insert(OptionError::ExpectedEquals(word.to_string()));
            }
            rest = rest.strip_prefix(',').unwrap_or(rest);
        } else {
            if word.is_empty() {
                error.get_or_insert(OptionError::InvalidParameter(String::new()));
            }
            // The value runs to the next single ','; ",," is a comma.
            let mut value = String::new();
            let body = rest.strip_prefix('=').unwrap_or(rest);
            let mut chars = body.char_indices();
            rest = "";
            while let Some((n, ch)) = chars.next() {
                if ch != ',' {
                    value.push(ch);
                } else if body[n + 1..].starts_with(',') {
                    value.push(',');
                    chars.next();
                } else {
                    rest = &body[n + 1..];
                    break;
                }
            }
            if word == "type" {
                ty = Some(value);
            }
        }
        first = false;
    }
    match (help, error) {
        (false, _) => Ok(None),
        (true, Some(e)) => Err(e),
        (true, None) => Ok(Some(ty)),
    }
}

/// `-m`: MiB when the number has no suffix; 0 means the board's default. Returns the option
/// and the error QEMU finds when it reads a bare number again as MiB (reported later).
pub fn parse_memory(
    arg: &str,
    warnings: &mut Vec<String>,
) -> Result<(MemoryOption, Option<OptionError>)> {
    let mut m = MemoryOption::default();
    let mut reparse = None;
    for (key, value) in parse_qemu_opts(arg, Some("size"), warnings)? {
        match key.as_str() {
            "size" => {
                // The value must be a size as written; a bare number then means MiB.
                let bytes = strtosz(&value).map_err(|fault| {
                    if value.starts_with('-') || fault == SizeFault::Range {
                        OptionError::OutOfRange {
                            name: "size".into(),
                            value: value.clone(),
                        }
                    } else {
                        OptionError::ExpectsSize("size".into())
                    }
                })?;
                reparse = None;
                let bytes = if value.ends_with(|ch: char| ch.is_ascii_digit()) && bytes != 0 {
                    match strtosz(&format!("{value}M")) {
                        Ok(b) => b,
                        Err(_) => {
                            reparse = Some(OptionError::MemorySizeReparse);
                            0
                        }
                    }
                } else {
                    bytes
                };
                m.size = (bytes != 0).then_some(bytes);
            }
            "slots" => m.slots = Some(crate::options::values::parse_opts_number("slots", &value)?),
            "maxmem" => {
                m.maxmem = Some(strtosz(&value).map_err(|fault| {
                    if value.starts_with('-') || fault == SizeFault::Range {
                        OptionError::OutOfRange {
                            name: "maxmem".into(),
                            value: value.clone(),
                        }
                    } else {
                        OptionError::ExpectsSize("maxmem".into())
                    }
                })?)
            }
            _ => return Err(OptionError::InvalidParameter(key)),
        }
    }
    Ok((m, reparse))
}

/// How QEMU's options visitor reads a member of a `-numa` option.
#[derive(Clone, Copy)]
enum Member {
    U8,
    U16,
    U32,
    U64,
    I64,
    Size,
    Str,
    U16List,
    Enum(&'static [&'static str]),
}

/// The members of each `-numa` type, in the order QEMU's visitor takes them (QAPI's
/// NumaNodeOptions, NumaDistOptions, NumaCpuOptions, NumaHmatLBOptions,
/// NumaHmatCacheOptions), and whether each is required.
fn numa_members(ty: &str) -> Option<&'static [(&'static str, Member, bool)]> {
    use Member::*;
    const HIERARCHY: &[&str] = &["memory", "first-level", "second-level", "third-level"];
    const DATA_TYPE: &[&str] = &[
        "access-latency",
        "read-latency",
        "write-latency",
        "access-bandwidth",
        "read-bandwidth",
        "write-bandwidth",
    ];
    const ASSOCIATIVITY: &[&str] = &["none", "direct", "complex"];
    const POLICY: &[&str] = &["none", "write-back", "write-through"];
    Some(match ty {
        "node" => &[
            ("nodeid", U16, false),
            ("cpus", U16List, false),
            ("mem", Size, false),
            ("memdev", Str, false),
            ("initiator", U16, false),
        ],
        "dist" => &[("src", U16, true), ("dst", U16, true), ("val", U8, true)],
        "cpu" => &[
            ("node-id", I64, false),
            ("drawer-id", I64, false),
            ("book-id", I64, false),
            ("socket-id", I64, false),
            ("die-id", I64, false),
            ("cluster-id", I64, false),
            ("module-id", I64, false),
            ("core-id", I64, false),
            ("thread-id", I64, false),
        ],
        "hmat-lb" => &[
            ("initiator", U16, true),
            ("target", U16, true),
            ("hierarchy", Enum(HIERARCHY), true),
            ("data-type", Enum(DATA_TYPE), true),
            ("latency", U64, false),
            ("bandwidth", Size, false),
        ],
        "hmat-cache" => &[
            ("node-id", U32, true),
            ("size", Size, true),
            ("level", U8, true),
            ("associativity", Enum(ASSOCIATIVITY), true),
            ("policy", Enum(POLICY), true),
            ("line", U16, true),
        ],
        _ => return None,
    })
}

/// One member's value, checked as QEMU's options visitor checks it.
fn check_member(name: &str, kind: Member, value: &str) -> Result<()> {
    let unsigned = |max: u64, ty: &'static str| {
        let v = parse_u64_any(value).ok_or_else(|| expects(name, "a uint64 value"))?;
        if v > max {
            return Err(expects(name, ty));
        }
        Ok(())
    };
    match kind {
        Member::U8 => unsigned(u8::MAX.into(), "uint8_t"),
        Member::U16 => unsigned(u16::MAX.into(), "uint16_t"),
        Member::U32 => unsigned(u32::MAX.into(), "uint32_t"),
        Member::U64 => unsigned(u64::MAX, "uint64_t"),
        Member::I64 => crate::options::values::parse_i64_any(value)
            .map(|_| ())
            .ok_or_else(|| expects(name, "an int64 value")),
        Member::Size => strtosz(value)
            .map(|_| ())
            .map_err(|_| expects(name, "a size value")),
        Member::Str => Ok(()),
        // QEMU's options visitor names the element "null" when it does not fit.
        Member::U16List => crate::options::values::parse_u16_list(name, value)
            .map(|_| ())
            .map_err(|e| match e {
                OptionError::Expects {
                    expected: "uint16_t",
                    ..
                } => expects("null", "uint16_t"),
                e => e,
            }),
        Member::Enum(values) if values.contains(&value) => Ok(()),
        Member::Enum(_) => Err(OptionError::BadValue {
            name: name.to_string(),
            value: value.to_string(),
        }),
    }
}

/// A `-numa` option as QEMU's options visitor reads it: the type, then its members in order
/// (a repeated member takes the last value, except `cpus`, a list), then any key left over.
fn parse_numa(pairs: &[(String, String)]) -> Result<NumaOption> {
    let last = |name: &str| {
        pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let ty = last("type").ok_or_else(|| OptionError::Missing("type".into()))?;
    let members = numa_members(ty).ok_or_else(|| OptionError::BadValue {
        name: "type".into(),
        value: ty.to_string(),
    })?;
    for &(name, kind, required) in members {
        match kind {
            Member::U16List => {
                for (_, v) in pairs.iter().filter(|(k, _)| k == name) {
                    check_member(name, kind, v)?;
                }
            }
            _ => match last(name) {
                Some(v) => check_member(name, kind, v)?,
                None if required => return Err(OptionError::Missing(name.to_string())),
                None => {}
            },
        }
    }
    if let Some((k, _)) = pairs
        .iter()
        .find(|(k, _)| k != "type" && !members.iter().any(|(n, _, _)| n == k))
    {
        return Err(OptionError::InvalidParameter(k.clone()));
    }
    let u16_of = |name: &str| last(name).and_then(parse_u64_any).map(|v| v as u16);
    Ok(match ty {
        "node" => NumaOption::Node(NumaNode {
            nodeid: u16_of("nodeid"),
            cpus: pairs
                .iter()
                .filter(|(k, _)| k == "cpus")
                .flat_map(|(_, v)| {
                    crate::options::values::parse_u16_list("cpus", v).unwrap_or_default()
                })
                .collect(),
            // A bare number is MiB here, as in QEMU's legacy syntax.
            mem: last("mem").map(|v| {
                let v = if v.ends_with(|c: char| c.is_ascii_digit()) {
                    format!("{v}M")
                } else {
                    v.to_string()
                };
                strtosz(&v).unwrap_or(0)
            }),
            memdev: last("memdev").map(str::to_string),
            initiator: u16_of("initiator"),
        }),
        "dist" => NumaOption::Dist {
            src: u16_of("src").unwrap_or(0),
            dst: u16_of("dst").unwrap_or(0),
            val: last("val").and_then(parse_u64_any).unwrap_or(0) as u8,
        },
        "cpu" => NumaOption::Cpu {
            node_id: last("node-id").and_then(crate::options::values::parse_i64_any),
        },
        _ => NumaOption::Hmat,
    })
}

/// `-smp`'s members (the syntax was checked while reading). A value that is no number is
/// QEMU's "Parameter 'smp.KEY' expects integer"; a zero count is refused.
fn parse_smp(pairs: &[(String, String)]) -> Result<SmpOption> {
    let mut smp = SmpOption::default();
    for (key, value) in pairs {
        let slot = match key.as_str() {
            "cpus" => &mut smp.cpus,
            "maxcpus" => &mut smp.maxcpus,
            "sockets" => &mut smp.sockets,
            "dies" => &mut smp.dies,
            "clusters" => &mut smp.clusters,
            "modules" => &mut smp.modules,
            "cores" => &mut smp.cores,
            "threads" => &mut smp.threads,
            "books" | "drawers" => {
                value
                    .parse::<u32>()
                    .map_err(|_| OptionError::SmpNotInteger(key.clone()))?;
                continue;
            }
            _ => return Err(OptionError::SmpUnexpected(key.clone())),
        };
        *slot = Some(
            value
                .parse::<u32>()
                .map_err(|_| OptionError::SmpNotInteger(key.clone()))?,
        );
    }
    let counts = [
        smp.cpus,
        smp.maxcpus,
        smp.sockets,
        smp.dies,
        smp.clusters,
        smp.modules,
        smp.cores,
        smp.threads,
    ];
    if counts.contains(&Some(0)) {
        return Err(OptionError::ZeroTopology);
    }
    Ok(smp)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::options::error::SIZE_HINT;

    /// Parses `s`, with errors as C callers get them (message, hint, class).
    fn parse(s: &str) -> crate::Result<Cmdline> {
        let args: Vec<&str> = s.split_whitespace().collect();
        Ok(Cmdline::parse(&args)?)
    }

    #[test]
    fn bare_m_is_mebibytes_and_suffixes_are_kept() {
        assert_eq!(parse("-m 64").unwrap().memory.size, Some(64 << 20));
        assert_eq!(parse("-m 4G").unwrap().memory.size, Some(4 << 30));
        assert_eq!(
            parse("-m size=2G,slots=4,maxmem=8G").unwrap().memory,
            MemoryOption {
                size: Some(2 << 30),
                slots: Some(4),
                maxmem: Some(8 << 30)
            }
        );
    }

    #[test]
    fn m_zero_means_board_default() {
        assert_eq!(parse("-m 0").unwrap().memory.size, None);
    }

    #[test]
    fn malformed_m_reads_like_qemu() {
        let e = parse("-m foo").unwrap_err();
        assert_eq!(
            e.message(),
            "-m foo: Parameter 'size' expects a non-negative number below 2^64"
        );
        assert_eq!(e.hint(), Some(SIZE_HINT));
        assert_eq!(
            parse("-m -5").unwrap_err().message(),
            "-m -5: Value '-5' is out of range for parameter 'size'"
        );
        assert_eq!(
            parse("-m 64M,foo=1").unwrap_err().message(),
            "-m 64M,foo=1: Invalid parameter 'foo'"
        );
        assert_eq!(
            parse("-m").unwrap_err().message(),
            "-m: requires an argument"
        );
    }

    #[test]
    fn machine_options_split_type_and_backend() {
        let c = parse("-M pc,memory-backend=m0 -object memory-backend-ram,id=m0,size=1G").unwrap();
        assert_eq!(c.machine_type.as_deref(), Some("pc"));
        assert_eq!(c.memory_backend.as_deref(), Some("m0"));
        assert_eq!(c.objects[0].text, "memory-backend-ram,id=m0,size=1G");
        let c = parse("-machine memory-backend=m0 -machine q35").unwrap();
        assert_eq!(c.machine_type.as_deref(), Some("q35"));
        assert_eq!(c.memory_backend.as_deref(), Some("m0"));
    }

    #[test]
    fn habitual_options_are_accepted() {
        let c = parse("-nodefaults -nographic -display none -accel tcg -S -monitor stdio").unwrap();
        assert!(c.start_paused && c.monitor_stdio);
        assert_eq!(c.accel, Some(Accel::Tcg));
    }

    #[test]
    fn unknown_options_are_refused_as_qemu_does() {
        assert_eq!(parse("-foo").unwrap_err().message(), "-foo: invalid option");
        assert_eq!(
            parse("-accel foo").unwrap_err().message(),
            "-accel foo: invalid accelerator foo"
        );
        assert_eq!(
            parse("-monitor stdio2").unwrap_err().message(),
            "-monitor stdio2: 'stdio2' is not a valid char driver\n-monitor stdio2: parse error: stdio2"
        );
    }

    #[test]
    fn the_first_accel_wins_and_machine_accel_does_not_mix() {
        assert_eq!(
            parse("-accel tcg -accel kvm").unwrap().accel,
            Some(Accel::Tcg)
        );
        assert_eq!(
            parse("-enable-kvm -accel tcg").unwrap().accel,
            Some(Accel::Kvm)
        );
        assert_eq!(parse("-machine accel=kvm").unwrap().accel, Some(Accel::Kvm));
        assert_eq!(
            parse("-accel tcg -machine accel=kvm")
                .unwrap_err()
                .message(),
            "The -accel and \"-machine accel=\" options are incompatible"
        );
    }

    #[test]
    fn m_values_are_checked_as_written_then_as_mebibytes() {
        // "1.5" is no size without a suffix, so QEMU refuses it before appending "M".
        assert_eq!(
            parse("-m 1.5").unwrap_err().message(),
            "-m 1.5: Parameter 'size' expects a non-negative number below 2^64"
        );
        assert_eq!(parse("-m 1.5G").unwrap().memory.size, Some(3 << 29));
        // A number that only overflows once it means MiB fails later, without the location.
        assert_eq!(
            parse("-m 17592186044416").unwrap_err().message(),
            "Parameter 'memory.size' expects size"
        );
        assert_eq!(
            parse("-m 100000000000000000000").unwrap_err().message(),
            "-m 100000000000000000000: Value '100000000000000000000' is out of range for parameter 'size'"
        );
        assert_eq!(
            parse("-m 64M,slots=x,maxmem=1G").unwrap_err().message(),
            "-m 64M,slots=x,maxmem=1G: Parameter 'slots' expects a number"
        );
        let e = parse("-m 64M,maxmem=x").unwrap_err();
        assert_eq!(
            e.message(),
            "-m 64M,maxmem=x: Parameter 'maxmem' expects a non-negative number below 2^64"
        );
        assert_eq!(e.hint(), Some(SIZE_HINT));
        assert_eq!(
            parse("-smp x").unwrap_err().message(),
            "Parameter 'smp.cpus' expects integer"
        );
        assert_eq!(
            parse("-numa node,nodeid=x").unwrap_err().message(),
            "-numa node,nodeid=x: Parameter 'nodeid' expects a uint64 value"
        );
        assert_eq!(
            parse("-smp 2,sockets=x").unwrap_err().message(),
            "Parameter 'smp.sockets' expects integer"
        );
    }

    #[test]
    fn migration_globals_are_read_and_other_globals_accepted() {
        let c = Cmdline::parse(&[
            "-global",
            "migration.send-configuration=off",
            "-global",
            "migration.send-switchover-start=on",
            "-global",
            "virtio-blk-device.scsi=off",
        ])
        .unwrap();
        assert_eq!(
            (c.send_configuration, c.send_switchover_start),
            (Some(false), Some(true))
        );
        assert_eq!(
            Cmdline::parse::<&str>(&[]).unwrap().send_configuration,
            None
        );
        assert_eq!(
            Cmdline::parse(&["-global", "migration.send-configuration=maybe"])
                .unwrap_err()
                .to_string(),
            "-global migration.send-configuration=maybe: Parameter 'send-configuration' expects 'on' or 'off'"
        );
    }

    #[test]
    fn kvm_max_slot_size_is_ours_and_only_for_kvm() {
        let c = parse("-accel kvm,max-slot-size=1G").unwrap();
        assert_eq!((c.accel, c.kvm_max_slot_size), (Some(Accel::Kvm), 1 << 30));
        assert_eq!(
            parse("-accel tcg,max-slot-size=1G").unwrap_err().message(),
            "-accel tcg,max-slot-size=1G: Property 'tcg-accel.max-slot-size' not found"
        );
    }

    #[test]
    fn memslot_preflight_is_ours_on_by_default_and_only_for_kvm() {
        assert!(!parse("-accel kvm").unwrap().kvm_skip_memslot_preflight);
        assert!(
            !parse("-accel kvm,memslot-preflight=on")
                .unwrap()
                .kvm_skip_memslot_preflight
        );
        assert!(
            parse("-accel kvm,memslot-preflight=off")
                .unwrap()
                .kvm_skip_memslot_preflight
        );
        assert_eq!(
            parse("-accel kvm,memslot-preflight=maybe").unwrap_err().message(),
            "-accel kvm,memslot-preflight=maybe: Parameter 'memslot-preflight' expects 'on' or 'off'"
        );
        assert_eq!(
            parse("-accel tcg,memslot-preflight=off")
                .unwrap_err()
                .message(),
            "-accel tcg,memslot-preflight=off: Property 'tcg-accel.memslot-preflight' not found"
        );
    }

    #[test]
    fn numa_nodes_and_their_refusals() {
        let c = parse(
            "-numa node,memdev=m0 -numa node,nodeid=1,memdev=m1 -numa dist,src=0,dst=1,val=20",
        )
        .unwrap();
        assert_eq!(c.numa.len(), 3);
        let Ok(NumaOption::Node(node)) = &c.numa[1].option else {
            panic!("not a node: {:?}", c.numa[1]);
        };
        assert_eq!(node.nodeid, Some(1));
        assert_eq!(
            c.numa[2].option,
            Ok(NumaOption::Dist {
                src: 0,
                dst: 1,
                val: 20
            })
        );
        assert_eq!(
            parse("-numa foo").unwrap_err().message(),
            "-numa foo: Parameter 'type' does not accept value 'foo'"
        );
        assert_eq!(
            parse("-numa node,foo=1").unwrap_err().message(),
            "-numa node,foo=1: Invalid parameter 'foo'"
        );
    }

    #[test]
    fn smp_zero_is_refused() {
        assert_eq!(parse("-smp 2").unwrap().topology().cpus, 2);
        assert_eq!(
            parse("-smp 0").unwrap_err().message(),
            "Invalid CPU topology: CPU topology parameters must be greater than zero"
        );
    }

    #[test]
    fn machine_help_is_any_bare_help_or_question_mark() {
        for line in [
            "-M help",
            "-machine help",
            "-M ?",
            "-machine ?",
            "-M help,",
            "-M help,accel=kvm",
        ] {
            let c = parse(line).unwrap();
            assert!(c.machine_help, "{line}");
            assert_eq!(c.machine_type, None, "{line}");
        }
        // With a type, from the same option or an earlier one (QEMU then lists its properties).
        for line in [
            "-M help,type=q35",
            "-M type=q35,help",
            "-M q35,help",
            "-M q35 -M help",
        ] {
            let c = parse(line).unwrap();
            assert!(c.machine_help, "{line}");
            assert_eq!(c.machine_type.as_deref(), Some("q35"), "{line}");
        }
        let c = parse("-M memory-backend=a,,help,help").unwrap();
        assert!(c.machine_help);
        // Not help: a value "help", or a key help with a value.
        assert_eq!(
            parse("-M type=help").unwrap().machine_type.as_deref(),
            Some("help")
        );
        assert!(!parse("-M help=on").unwrap().machine_help);
        assert!(!parse("-M memory-backend=a,,help").unwrap().machine_help);
    }

    #[test]
    fn a_malformed_help_option_is_refused_as_keyval_refuses_it() {
        assert_eq!(
            parse("-M help,pc").unwrap_err().message(),
            "-M help,pc: Expected '=' after parameter 'pc'"
        );
        assert_eq!(
            parse("-M ,help").unwrap_err().message(),
            "-M ,help: Invalid parameter ''"
        );
    }

    #[test]
    fn machine_help_stops_reading_but_every_option_must_exist() {
        // What comes after -machine help is not read...
        let c = parse("-M help -m foo -smp 0").unwrap();
        assert!(c.machine_help && c.memory.size.is_none());
        // ...but QEMU's first pass checks every option and its argument.
        assert_eq!(
            parse("-M help -bogus").unwrap_err().message(),
            "-bogus: invalid option"
        );
        assert_eq!(
            parse("-M help -m").unwrap_err().message(),
            "-m: requires an argument"
        );
        // What comes before is read, and what QEMU refuses while reading stops it.
        assert_eq!(
            parse("-m foo -M help").unwrap_err().message(),
            "-m foo: Parameter 'size' expects a non-negative number below 2^64"
        );
        assert_eq!(
            parse("-m 64M,slots=x -M help").unwrap_err().message(),
            "-m 64M,slots=x: Parameter 'slots' expects a number"
        );
        // What QEMU checks only once all options are read does not.
        for line in [
            "-accel foo -M help",
            "-numa foo -M help",
            "-numa node,foo=1 -M help",
            "-smp 0 -M help",
            "-smp x -M help",
            "-m 17592186044416 -M help",
            "-accel kvm -M help -machine accel=tcg",
        ] {
            assert!(parse(line).unwrap().machine_help, "{line}");
        }
    }

    #[test]
    fn errors_found_while_reading_come_before_those_found_after() {
        assert_eq!(
            parse("-m foo -bogus").unwrap_err().message(),
            "-bogus: invalid option"
        );
        assert_eq!(
            parse("-smp x -m foo").unwrap_err().message(),
            "-m foo: Parameter 'size' expects a non-negative number below 2^64"
        );
        // Later errors come in the order of QEMU's stages (observed with QEMU 10), whatever
        // the order of the options: the accelerator before -numa, -smp before both.
        for line in ["-accel foo -numa foo", "-numa foo -accel foo"] {
            assert_eq!(
                parse(line).unwrap_err().message(),
                "-accel foo: invalid accelerator foo",
                "{line}"
            );
        }
        assert_eq!(
            parse("-accel foo -smp x").unwrap_err().message(),
            "Parameter 'smp.cpus' expects integer"
        );
        assert_eq!(
            parse("-monitor stdio -smp x -monitor stdio")
                .unwrap_err()
                .message(),
            "-monitor stdio: cannot use stdio by multiple character devices"
        );
    }

    /// Reads `s` keeping what QEMU finds later, with the warnings.
    fn read(s: &str) -> (Cmdline, Vec<String>) {
        let args: Vec<&str> = s.split_whitespace().collect();
        let mut warnings = Vec::new();
        let c = Cmdline::read(&args, &mut warnings).unwrap();
        (c, warnings)
    }

    #[test]
    fn later_errors_wait_for_their_stage() {
        let (c, _) = read("-smp x -m 17592186044416 -accel foo -monitor stdio -monitor stdio");
        let e = |o: &Option<OptionError>| {
            o.clone()
                .map(|e| crate::Error::from(e).message().to_string())
        };
        assert_eq!(
            e(&c.deferred.smp).unwrap(),
            "Parameter 'smp.cpus' expects integer"
        );
        assert_eq!(
            e(&c.deferred.memory).unwrap(),
            "Parameter 'memory.size' expects size"
        );
        assert_eq!(
            e(&c.deferred.accel).unwrap(),
            "-accel foo: invalid accelerator foo"
        );
        assert_eq!(
            e(&c.deferred.chardev).unwrap(),
            "-monitor stdio: cannot use stdio by multiple character devices"
        );
        // A later -m replaces the failed one, and its reparse error with it.
        assert_eq!(read("-m 17592186044416 -m 1G").0.deferred.memory, None);
    }

    #[test]
    fn short_form_booleans_warn_where_qemu_warns() {
        let args = ["-m", "1G,slots", "-numa", "node,foo"];
        let mut warnings = Vec::new();
        let e = Cmdline::read(&args, &mut warnings).unwrap_err();
        assert_eq!(
            crate::Error::from(e).message(),
            "-m 1G,slots: Parameter 'slots' expects a number"
        );
        assert_eq!(
            warnings,
            ["-m 1G,slots: warning: short-form boolean option 'slots' deprecated\nPlease use slots=on instead"]
        );
        let (c, w) = read("-numa node,foo");
        assert_eq!(w.len(), 1);
        assert_eq!(
            c.numa[0].option,
            Err(OptionError::InvalidParameter("foo".into()).at("-numa", "node,foo"))
        );
        // -machine and -smp are keyval: no short form at all.
        assert_eq!(
            parse("-M pc,foo").unwrap_err().message(),
            "-M pc,foo: Expected '=' after parameter 'foo'"
        );
        assert_eq!(
            parse("-smp 2,foo").unwrap_err().message(),
            "-smp 2,foo: Expected '=' after parameter 'foo'"
        );
    }

    #[test]
    fn slots_zero_is_given_and_machine_keys_keep_their_first_place() {
        assert_eq!(parse("-m 1G,slots=0").unwrap().memory.slots, Some(0));
        let c = parse("-M pc,b=1,a=2 -M b=3").unwrap();
        assert_eq!(
            c.machine_props,
            [
                ("b".to_string(), "3".to_string()),
                ("a".to_string(), "2".to_string())
            ]
        );
    }

    #[test]
    fn monitor_none_stdio_and_others() {
        assert!(!parse("-monitor none").unwrap().monitor_stdio);
        assert!(parse("-monitor none -monitor stdio").unwrap().monitor_stdio);
        let e = parse("-monitor foo").unwrap_err();
        assert_eq!(
            e.message(),
            "-monitor foo: 'foo' is not a valid char driver\n-monitor foo: parse error: foo"
        );
    }

    #[test]
    fn numa_members_as_qemus_visitor_reads_them() {
        let err = |s: &str| {
            let (c, _) = read(s);
            crate::Error::from(c.numa[0].option.clone().unwrap_err())
                .message()
                .to_string()
        };
        assert_eq!(
            err("-numa nodeid=0"),
            "-numa nodeid=0: Parameter 'type' is missing"
        );
        assert_eq!(
            err("-numa node,nodeid=65536"),
            "-numa node,nodeid=65536: Parameter 'nodeid' expects uint16_t"
        );
        assert_eq!(
            err("-numa node,nodeid=-1"),
            "-numa node,nodeid=-1: Parameter 'nodeid' expects a uint64 value"
        );
        for bad in ["x", "1-0", "0-", "", "0:1", "0-65536"] {
            assert_eq!(
                err(&format!("-numa node,cpus={bad}")),
                format!("-numa node,cpus={bad}: Parameter 'cpus' expects a uint64 value or range")
            );
        }
        assert_eq!(
            err("-numa node,cpus=65536"),
            "-numa node,cpus=65536: Parameter 'null' expects uint16_t"
        );
        assert_eq!(
            err("-numa node,mem=x"),
            "-numa node,mem=x: Parameter 'mem' expects a size value"
        );
        assert_eq!(
            err("-numa dist,src=0,dst=1,val=300"),
            "-numa dist,src=0,dst=1,val=300: Parameter 'val' expects uint8_t"
        );
        assert_eq!(
            err("-numa dist,dst=1,foo=1"),
            "-numa dist,dst=1,foo=1: Parameter 'src' is missing"
        );
        assert_eq!(
            err("-numa dist,src=0,dst=1,val=20,foo=1"),
            "-numa dist,src=0,dst=1,val=20,foo=1: Invalid parameter 'foo'"
        );
        assert_eq!(
            err("-numa cpu,node-id=x"),
            "-numa cpu,node-id=x: Parameter 'node-id' expects an int64 value"
        );
        assert_eq!(
            err("-numa hmat-lb,initiator=0"),
            "-numa hmat-lb,initiator=0: Parameter 'target' is missing"
        );
        let (c, _) = read("-numa node,cpus=0,cpus=2-3,nodeid=1,nodeid=0,mem=64");
        let Ok(NumaOption::Node(n)) = &c.numa[0].option else {
            panic!()
        };
        assert_eq!(n.cpus, [0, 2, 3]);
        assert_eq!(n.nodeid, Some(0), "the last nodeid wins");
        assert_eq!(n.mem, Some(64 << 20), "a bare mem= is MiB");
    }

    #[test]
    fn smp_topology_prefers_cores_and_merges_options() {
        let t = parse("-smp 4").unwrap().topology();
        assert_eq!(
            (t.cpus, t.max_cpus, t.sockets, t.cores, t.threads),
            (4, 4, 1, 4, 1)
        );
        let t = parse("-smp 2 -smp maxcpus=8,threads=2").unwrap().topology();
        assert_eq!(
            (t.cpus, t.max_cpus, t.sockets, t.cores, t.threads),
            (2, 8, 1, 4, 2)
        );
        let t = parse("-smp sockets=2,cores=3").unwrap().topology();
        assert_eq!((t.cpus, t.max_cpus), (6, 6));
        let t = parse("").unwrap().topology();
        assert_eq!((t.cpus, t.max_cpus), (1, 1));
        assert_eq!(
            parse("-smp 2,foo=1").unwrap_err().message(),
            "Parameter 'smp.foo' is unexpected"
        );
    }

    #[test]
    fn cpu_is_kept_as_written_the_last_one_winning() {
        assert_eq!(
            parse("-cpu qemu64 -cpu max,phys-bits=41")
                .unwrap()
                .cpu
                .as_deref(),
            Some("max,phys-bits=41")
        );
    }
}
