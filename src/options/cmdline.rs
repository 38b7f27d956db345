//! QEMU's command line, as far as machine RAM and the small VMM are concerned: `-m`, `-M` /
//! `-machine`, `-mem-path`, `-mem-prealloc`, `-object`, `-numa`, `-smp`, `-accel`, `-S`,
//! `-monitor`, and the options users add out of habit. Pure: argv in, [`Cmdline`] out.
//!
//! Errors read as QEMU 10 prints them. Those found while reading one option carry that option as
//! a location prefix ("-m foo: Parameter 'size' expects ..."), exactly where QEMU prints one.

use crate::options::error::OptionError;
use crate::options::values::{expects, parse_keyval, strtosz, Result, SizeFault};

/// `-m [size=]N[,slots=S,maxmem=M]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryOption {
    /// Bytes; `None` when absent (and `-m 0` means "the board's default", also `None`).
    pub size: Option<u64>,
    pub slots: Option<u64>,
    pub maxmem: Option<u64>,
}

/// `-numa node,...` (other `-numa` types are accepted and ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNode {
    pub nodeid: Option<u32>,
    pub memdev: Option<String>,
    pub mem: Option<u64>,
    /// The option text, for location-prefixed errors found later.
    pub text: String,
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

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cmdline {
    pub machine_type: Option<String>,
    pub memory_backend: Option<String>,
    /// Other `-machine` properties (name, value), checked once the type is known.
    pub machine_props: Vec<(String, String)>,
    pub memory: MemoryOption,
    /// The text of the last `-m`, for errors that QEMU reports with it.
    pub memory_text: Option<String>,
    pub mem_path: Option<String>,
    pub mem_prealloc: bool,
    pub objects: Vec<ObjectOption>,
    pub numa: Vec<NumaNode>,
    pub smp_cpus: Option<u32>,
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
}

/// Options taking an argument that mean nothing to hostmem and are accepted as in QEMU.
const IGNORED_WITH_ARG: &[&str] = &[
    "-display", "-serial", "-name", "-vga", "-cpu", "-chardev", "-qmp", "-d", "-D", "-L", "-bios",
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
    /// Reads `args` (without the program name).
    ///
    /// As in QEMU, a value is refused either while its option is read (syntax, `-m` sizes,
    /// `-object`, `-monitor`) or once all options are read (`-accel`, `-numa`, `-smp`, a bare
    /// `-m` that overflows as MiB); the first error of the first kind wins, then the first of
    /// the second. `-machine help` ends the reading: only errors of the first kind before it
    /// count.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Cmdline> {
        check_options(args)?;
        let mut c = Cmdline::default();
        let mut later: Option<OptionError> = None;
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
                c.parse_accel("kvm")?;
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
            let mut defer = |e: OptionError| {
                later.get_or_insert(e);
            };
            match opt {
                "-m" => {
                    // QEMU checks a bare number again once it has appended "M", later and
                    // without the option's location.
                    match parse_memory(arg) {
                        Ok(m) => c.memory = m,
                        Err(e) if e.is_located() => return Err(at(e)),
                        Err(e) => defer(e),
                    }
                    c.memory_text = Some(arg.to_string());
                }
                "-M" | "-machine" => {
                    if let Some(help_type) = machine_help(arg).map_err(at)? {
                        c.machine_help = true;
                        c.machine_type = help_type.or(c.machine_type.take());
                        return Ok(c);
                    }
                    c.parse_machine(arg).map_err(at)?
                }
                "-mem-path" => c.mem_path = Some(arg.to_string()),
                "-object" => c.objects.push(ObjectOption {
                    text: arg.to_string(),
                }),
                // QEMU reads the syntax now and the nodes once all options are read.
                "-numa" => {
                    parse_keyval(arg, Some("type")).map_err(at)?;
                    match parse_numa(arg) {
                        Ok(Some(node)) => c.numa.push(node),
                        Ok(None) => {}
                        Err(e) => defer(at(e)),
                    }
                }
                // QEMU checks the topology after reading the options, without the location.
                "-smp" => match parse_smp(arg) {
                    Ok(n) => c.smp_cpus = Some(n),
                    Err(e) => defer(located(e, at)),
                },
                // The syntax now, the accelerator and its properties when it starts.
                "-accel" => {
                    parse_keyval(arg, Some("accel")).map_err(at)?;
                    if let Err(e) = c.parse_accel(arg) {
                        defer(at(e));
                    }
                }
                "-incoming" => c.incoming = Some(arg.to_string()),
                "-global" => c.parse_global(arg).map_err(at)?,
                "-monitor" => {
                    if arg != "stdio" {
                        return Err(at(OptionError::NotACharDriver(arg.to_string())));
                    }
                    c.monitor_stdio = true;
                }
                _ => {} // accepted and ignored
            }
        }
        if let Some(e) = later {
            return Err(e);
        }
        c.finish_accel()?;
        Ok(c)
    }

    /// `-global DRIVER.PROP=VALUE`: the migration object's `send-switchover-start` and
    /// `send-configuration` are read;
    /// device properties mean nothing to hostmem and are accepted, as QEMU accepts unknown
    /// globals with a warning at most.
    fn parse_global(&mut self, arg: &str) -> Result<()> {
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

    fn parse_machine(&mut self, arg: &str) -> Result<()> {
        for (key, value) in parse_keyval(arg, Some("type"))? {
            match key.as_str() {
                "type" => self.machine_type = Some(value),
                "memory-backend" => self.memory_backend = Some(value),
                "accel" => {
                    self.accel_machine = Some(parse_accel_name(&value)?);
                }
                _ => self.machine_props.push((key, value)),
            }
        }
        Ok(())
    }

    /// One `-accel`: QEMU tries them in order and keeps the first that starts, so the first
    /// given wins (every accelerator hostmem knows starts when asked).
    fn parse_accel(&mut self, arg: &str) -> Result<()> {
        let mut accel = None;
        let mut max_slot_size = 0;
        let mut preflight = true;
        for (key, value) in parse_keyval(arg, Some("accel"))? {
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

/// `e` at the option being read, unless QEMU reports it without (a check made after reading).
fn located(e: OptionError, at: impl FnOnce(OptionError) -> OptionError) -> OptionError {
    if e.is_located() {
        at(e)
    } else {
        e
    }
}

/// `-m`: MiB when the number has no suffix; 0 means the board's default.
pub fn parse_memory(arg: &str) -> Result<MemoryOption> {
    let mut m = MemoryOption::default();
    for (key, value) in parse_keyval(arg, Some("size"))? {
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
                let bytes = if value.ends_with(|ch: char| ch.is_ascii_digit()) {
                    strtosz(&format!("{value}M")).map_err(|_| OptionError::MemorySizeReparse)?
                } else {
                    bytes
                };
                m.size = (bytes != 0).then_some(bytes);
            }
            "slots" => m.slots = Some(crate::options::values::parse_opts_number("slots", &value)?),
            "maxmem" => {
                m.maxmem =
                    Some(strtosz(&value).map_err(|_| OptionError::ExpectsSize("maxmem".into()))?)
            }
            _ => return Err(OptionError::InvalidParameter(key)),
        }
    }
    Ok(m)
}

fn parse_numa(arg: &str) -> Result<Option<NumaNode>> {
    let pairs = parse_keyval(arg, Some("type"))?;
    let ty = pairs
        .iter()
        .find(|(k, _)| k == "type")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    match ty {
        "node" => {}
        "dist" | "cpu" | "hmat-lb" | "hmat-cache" => return Ok(None),
        _ => {
            return Err(OptionError::BadValue {
                name: "type".into(),
                value: ty.to_string(),
            })
        }
    }
    let mut node = NumaNode {
        nodeid: None,
        memdev: None,
        mem: None,
        text: arg.to_string(),
    };
    for (key, value) in pairs {
        match key.as_str() {
            "type" | "cpus" | "initiator" => {}
            "nodeid" => {
                node.nodeid = Some(
                    value
                        .parse()
                        .map_err(|_| expects("nodeid", "a uint64 value"))?,
                )
            }
            "memdev" => node.memdev = Some(value),
            "mem" => node.mem = Some(crate::options::values::parse_size(&value)?),
            _ => return Err(OptionError::InvalidParameter(key)),
        }
    }
    if node.mem.is_some() && node.memdev.is_some() {
        return Err(OptionError::NumaMemAndMemdev);
    }
    Ok(Some(node))
}

fn parse_smp(arg: &str) -> Result<u32> {
    let mut cpus = None;
    for (key, value) in parse_keyval(arg, Some("cpus"))? {
        if key == "cpus" {
            let n: u32 = value.parse().map_err(|_| OptionError::SmpCpusNotInteger)?;
            if n == 0 {
                return Err(OptionError::ZeroTopology);
            }
            cpus = Some(n);
        }
    }
    Ok(cpus.unwrap_or(1))
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
            "-monitor stdio2: 'stdio2' is not a valid char driver"
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
        assert_eq!(c.numa.len(), 2);
        assert_eq!(c.numa[1].nodeid, Some(1));
        assert_eq!(
            parse("-numa node,memdev=m,mem=64M").unwrap_err().message(),
            "-numa node,memdev=m,mem=64M: numa configuration should use either mem= or memdev=,mixing both is not allowed"
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
        assert_eq!(parse("-smp 2").unwrap().smp_cpus, Some(2));
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
        assert_eq!(
            parse("-accel foo -numa foo").unwrap_err().message(),
            "-accel foo: invalid accelerator foo"
        );
        assert_eq!(
            parse("-numa foo -accel foo").unwrap_err().message(),
            "-numa foo: Parameter 'type' does not accept value 'foo'"
        );
    }
}
