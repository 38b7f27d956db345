//! QEMU's HMP memory dumps (`info mtree [-f] [-o] [-D]`, `info ramblock`, `info memdev`),
//! byte for byte, rendered from the same data the C API returns. Pure formatting: nothing here
//! changes state.
//!
//! Where QEMU's output order is hash order (the address-space groups of `info mtree` and the
//! FlatViews of `info mtree -f` come from GHashTables keyed by pointers, so they vary between
//! runs), hostmem fixes one order: "I/O" first, then "memory". Within a group and within a
//! FlatView everything follows QEMU exactly.

pub mod args;
pub mod migration;

use std::fmt::Write;

use crate::backend::MemdevInfo;
use crate::error::{Error, HmErrorClass, Result};
use crate::kvm::{KvmAccel, Slot};
use crate::listener::HasMemory;
use crate::machine::Machine;
use crate::memory::MemorySystem;
use crate::options::values::size_to_str;
use crate::ramblock::RamBlockRegistry;
use crate::region::{region_type, RegionId, RegionKind, RegionLookup};

/// QEMU's `MR_SIZE`: the inclusive end offset of a size (0 stays 0).
fn last_offset(size: u128) -> u64 {
    if size == 0 {
        0
    } else {
        (size - 1) as u64
    }
}

/// `info mtree` options (`-f`, `-o`, `-D`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MtreeOptions {
    pub flat: bool,
    pub owner: bool,
    pub disabled: bool,
}

fn owner_suffix(mem: &MemorySystem, id: RegionId) -> String {
    match mem.region(id).and_then(|r| r.owner.as_deref()) {
        Some(path) => format!(" owner:{{obj path={path}}}"),
        // Unowned regions hang under /machine/unattached in QEMU's QOM tree.
        None => " parent:{obj path=/machine/unattached}".to_string(),
    }
}

/// Address-space groups as `info mtree` prints them: names sharing a root, sorted by name.
fn as_groups(mem: &MemorySystem, cpu_spaces: u32) -> Vec<(Vec<String>, RegionId)> {
    let mut groups: Vec<(Vec<String>, RegionId)> = Vec::new();
    for space in mem.address_spaces() {
        let mut names = vec![space.name.clone()];
        if space.root == mem.system_memory() {
            names.extend((0..cpu_spaces).map(|i| format!("cpu-memory-{i}")));
        }
        match groups.iter_mut().find(|g| g.1 == space.root) {
            Some(g) => g.0.extend(names),
            None => groups.push((names, space.root)),
        }
    }
    for g in &mut groups {
        g.0.sort();
    }
    // The fixed stand-in for QEMU's hash order: "I/O" before "memory".
    groups.reverse();
    groups
}

struct TreePrinter<'a> {
    mem: &'a MemorySystem,
    opts: MtreeOptions,
    out: String,
    alias_queue: Vec<RegionId>,
}

impl TreePrinter<'_> {
    fn print(&mut self, id: RegionId, level: usize, base: u64) {
        let Some(r) = self.mem.region(id) else { return };
        let cur_start = base.wrapping_add(r.addr);
        let cur_end = cur_start.wrapping_add(last_offset(r.size));
        if cur_start < base || cur_end < cur_start {
            self.out.push_str("[DETECTED OVERFLOW!] ");
        }
        let visible = r.enabled || self.opts.disabled;
        let disabled = if r.enabled { "" } else { " [disabled]" };
        let ty = region_type(self.mem, id);
        if let RegionKind::Alias { target, offset } = r.kind {
            if !self.alias_queue.contains(&target) {
                self.alias_queue.push(target);
            }
            if visible {
                let tname = self
                    .mem
                    .region(target)
                    .map(|t| t.name.as_str())
                    .unwrap_or("");
                let _ = write!(
                    self.out,
                    "{}{cur_start:016x}-{cur_end:016x} (prio {}, {ty}): alias {} @{tname} \
                     {offset:016x}-{:016x}{disabled}",
                    "  ".repeat(level),
                    r.priority,
                    r.name,
                    offset.wrapping_add(last_offset(r.size)),
                );
            }
        } else if visible {
            let _ = write!(
                self.out,
                "{}{cur_start:016x}-{cur_end:016x} (prio {}, {ty}): {}{disabled}",
                "  ".repeat(level),
                r.priority,
                r.name,
            );
        }
        if visible {
            if self.opts.owner {
                self.out.push_str(&owner_suffix(self.mem, id));
            }
            self.out.push('\n');
        }
        // By address, then higher priority first; equal ones keep subregion order.
        let mut children: Vec<(u64, i32, RegionId)> = r
            .subregions
            .iter()
            .filter_map(|&c| self.mem.region(c).map(|cr| (cr.addr, cr.priority, c)))
            .collect();
        children.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        for (_, _, c) in children {
            self.print(c, level + 1, cur_start);
        }
    }
}

/// `info mtree` (tree form). `cpu_spaces` is the number of "cpu-memory-N" address spaces listed
/// beside "memory" (one per vCPU in QEMU, all sharing its root).
pub fn info_mtree(mem: &MemorySystem, cpu_spaces: u32, opts: MtreeOptions) -> String {
    let mut p = TreePrinter {
        mem,
        opts,
        out: String::new(),
        alias_queue: Vec::new(),
    };
    for (names, root) in as_groups(mem, cpu_spaces) {
        for n in names {
            let _ = writeln!(p.out, "address-space: {n}");
        }
        p.print(root, 1, 0);
        p.out.push('\n');
    }
    let mut i = 0;
    while i < p.alias_queue.len() {
        let id = p.alias_queue[i];
        let name = mem.region(id).map(|r| r.name.clone()).unwrap_or_default();
        let _ = writeln!(p.out, "memory-region: {name}");
        p.print(id, 1, 0);
        p.out.push('\n');
        i += 1;
    }
    p.out
}

/// One FlatView of `info mtree -f`: its root, the (name, root) of each address space showing
/// it, and the index of the first such space.
type SharedView = (Option<RegionId>, Vec<(String, RegionId)>, usize);

/// `info mtree -f`. The accelerator, when there is one, is asked about each range of the
/// "memory" view as it is printed (QEMU appends " KVM" to the ranges KVM maps).
pub fn info_mtree_flat(
    mem: &MemorySystem,
    cpu_spaces: u32,
    opts: MtreeOptions,
    accel: Option<&dyn HasMemory>,
) -> String {
    let mut out = String::new();
    // Spaces sharing a flat-view root share one FlatView, listed in creation order.
    let mut views: Vec<SharedView> = Vec::new();
    for (i, space) in mem.address_spaces().iter().enumerate() {
        let mut names = vec![(space.name.clone(), space.root)];
        if space.root == mem.system_memory() {
            names.extend((0..cpu_spaces).map(|c| (format!("cpu-memory-{c}"), space.root)));
        }
        match views.iter_mut().find(|v| v.0 == space.view_root) {
            Some(v) => v.1.extend(names),
            None => views.push((space.view_root, names, i)),
        }
    }
    views.reverse();
    for (n, (view_root, spaces, index)) in views.into_iter().enumerate() {
        let _ = writeln!(out, "FlatView #{n}");
        for (name, root) in &spaces {
            let r = mem.region(*root);
            let _ = write!(
                out,
                " AS \"{name}\", root: {}",
                r.map(|r| r.name.as_str()).unwrap_or("")
            );
            if let Some((t, _)) = r.and_then(|r| r.alias_target()) {
                let tn = mem.region(t).map(|t| t.name.as_str()).unwrap_or("");
                let _ = write!(out, ", alias {tn}");
            }
            out.push('\n');
        }
        let root_name = view_root
            .and_then(|v| mem.region(v))
            .map(|r| r.name.as_str())
            .unwrap_or("(none)");
        let _ = writeln!(out, " Root memory region: {root_name}");
        let space = &mem.address_spaces()[index];
        if space.view.ranges.is_empty() {
            out.push_str("  No rendered FlatView\n\n");
            continue;
        }
        for fr in &space.view.ranges {
            let Some(r) = mem.region(fr.region) else {
                continue;
            };
            let ty = if fr.readonly {
                "rom"
            } else {
                region_type(mem, fr.region)
            };
            let _ = write!(
                out,
                "  {:016x}-{:016x} (prio {}, {ty}): {}",
                fr.addr,
                fr.addr.wrapping_add(last_offset(fr.size)),
                r.priority,
                r.name
            );
            if fr.offset_in_region != 0 {
                let _ = write!(out, " @{:016x}", fr.offset_in_region);
            }
            if opts.owner {
                out.push_str(&owner_suffix(mem, fr.region));
            }
            if let Some(accel) = accel {
                let in_memory_as = spaces.iter().any(|(n, _)| n == "memory");
                if in_memory_as && accel.has_memory(fr.addr, crate::region::size_to_u64(fr.size)) {
                    let _ = write!(out, " {}", accel.accel_name());
                }
            }
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// `info ramblock` (QEMU 8.0+ columns, with HVA and RO).
pub fn info_ramblock(blocks: &RamBlockRegistry) -> String {
    let mut out = format!(
        "{:>24} {:>8}  {:>18} {:>18} {:>18} {:>18} {:>3}\n",
        "Block Name", "PSize", "Offset", "Used", "Total", "HVA", "RO"
    );
    for id in blocks.ids() {
        let Some(b) = blocks.get(id) else { continue };
        let _ = writeln!(
            out,
            "{:>24} {:>8}  0x{:016x} 0x{:016x} 0x{:016x} 0x{:016x} {:>3}",
            b.idstr,
            size_to_str(b.page_size),
            b.offset,
            b.used_length,
            b.max_length,
            b.host_ptr() as usize as u64,
            if b.readonly { "ro" } else { "rw" }
        );
    }
    out
}

/// `info memdev`, in the order given.
pub fn info_memdev(list: &[MemdevInfo]) -> String {
    let tf = |b: bool| if b { "true" } else { "false" };
    let mut out = String::new();
    for m in list {
        let _ = writeln!(out, "memory backend: {}", m.id);
        // QEMU prints the size with PRId64.
        let _ = writeln!(out, "  size:  {}", m.size as i64);
        let _ = writeln!(out, "  merge: {}", tf(m.merge));
        let _ = writeln!(out, "  dump: {}", tf(m.dump));
        let _ = writeln!(out, "  prealloc: {}", tf(m.prealloc));
        let _ = writeln!(out, "  share: {}", tf(m.share));
        if let Some(r) = m.reserve {
            let _ = writeln!(out, "  reserve: {}", tf(r));
        }
        let _ = writeln!(out, "  policy: {}", m.policy);
        let _ = writeln!(out, "  host nodes: {}", m.host_nodes);
    }
    out.push('\n');
    out
}

/// The `info` subcommands hostmem answers, as QEMU's `info` lists them.
pub(crate) const INFO_HELP: &str = "info memdev  -- show memory backends\n\
info memslots  -- show KVM memory slots (hostmem)\n\
info migrate  -- show migration status\n\
info migrate_capabilities  -- show current migration capabilities\n\
info migrate_parameters  -- show current migration parameters\n\
info mtree [-f][-d][-o][-D] -- show memory tree (-f: dump flat view for address spaces;-d: \
dump dispatch tree, valid with -f only);-o: dump region owners/parents;-D: dump disabled \
regions\n\
info ramblock  -- Display system ramblock information\n\
info status  -- show the current VM status (running|paused)\n";

fn usage_error(cmd: &str, message: String) -> Error {
    Error::new(HmErrorClass::InvalidParameter, message)
        .with_hint(format!("Try \"help info {cmd}\" for more information\n"))
}

/// `info mtree`'s flags with QEMU's HMP parser rules: the declared flags `-f -d -o -D` are
/// looked for in that order, one token each, so "-o -f" fails ("unsupported option -f") and
/// "-fD" leaves "D" behind ("extraneous characters"), exactly as in QEMU. `-d` (the dispatch
/// tree of QEMU's TCG/IO dispatcher, which hostmem does not have) is accepted and prints
/// nothing.
fn parse_mtree_flags(args: &str) -> Result<MtreeOptions> {
    const DECLARED: [char; 4] = ['f', 'd', 'o', 'D'];
    let mut opts = MtreeOptions::default();
    let mut p = args;
    for (i, &c) in DECLARED.iter().enumerate() {
        p = p.trim_start();
        let Some(after) = p.strip_prefix('-') else {
            continue;
        };
        let ch = after.chars().next().unwrap_or('\0');
        if ch == c {
            p = &after[ch.len_utf8()..];
            match c {
                'f' => opts.flat = true,
                'o' => opts.owner = true,
                'D' => opts.disabled = true,
                _ => {}
            }
        } else if !DECLARED[i + 1..].contains(&ch) {
            return Err(usage_error(
                "mtree",
                format!("mtree: unsupported option -{ch}"),
            ));
        }
    }
    if !p.trim().is_empty() {
        return Err(usage_error(
            "mtree",
            "mtree: extraneous characters at the end of line".to_string(),
        ));
    }
    Ok(opts)
}

/// Answers an HMP command line about memory. Errors carry QEMU's monitor text: the message,
/// then (for usage errors) the "Try \"help ...\"" line as the hint.
pub fn hmp(machine: &Machine, cmdline: &str) -> Result<String> {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    let unknown = || {
        Error::new(
            HmErrorClass::NotFound,
            format!("unknown command: '{}'", words.join(" ")),
        )
    };
    let mem = machine.memory();
    match words.as_slice() {
        [] => Ok(String::new()),
        ["info"] => Ok(INFO_HELP.to_string()),
        ["info", "memslots", rest @ ..] => {
            if !rest.is_empty() {
                return Err(usage_error(
                    "memslots",
                    "memslots: extraneous characters at the end of line".to_string(),
                ));
            }
            match machine.kvm() {
                Some(kvm) => Ok(info_memslots(kvm, Some(&mem.ramblocks))),
                // The accelerator is not KVM: say so rather than print an empty table.
                None => Err(Error::new(
                    HmErrorClass::Unsupported,
                    "KVM is not enabled for this machine (use -accel kvm)",
                )),
            }
        }
        ["info", "mtree", ..] => {
            let rest = cmdline.trim_start();
            let rest = rest["info".len()..].trim_start();
            let opts = parse_mtree_flags(&rest["mtree".len()..])?;
            let cpus = machine.cpu_address_spaces();
            Ok(if opts.flat {
                let accel = machine.kvm().map(|k| k as &dyn HasMemory);
                info_mtree_flat(mem, cpus, opts, accel)
            } else {
                info_mtree(mem, cpus, opts)
            })
        }
        ["info", cmd @ ("migrate" | "migrate_parameters" | "migrate_capabilities" | "status"), rest @ ..] =>
        {
            if !rest.is_empty() {
                return Err(usage_error(
                    cmd,
                    format!("{cmd}: extraneous characters at the end of line"),
                ));
            }
            let m = machine.migration();
            Ok(match *cmd {
                "migrate" => migration::info_migrate(m),
                "migrate_parameters" => m.parameters().info(),
                "migrate_capabilities" => m.capabilities.info(),
                _ => machine.run().state.info(),
            })
        }
        ["info", cmd @ ("ramblock" | "memdev"), rest @ ..] => {
            if !rest.is_empty() {
                return Err(usage_error(
                    cmd,
                    format!("{cmd}: extraneous characters at the end of line"),
                ));
            }
            if *cmd == "ramblock" {
                return Ok(info_ramblock(&mem.ramblocks));
            }
            let objects = machine.objects();
            let list: Vec<MemdevInfo> = objects
                .ids()
                .iter()
                .filter_map(|id| objects.get(id))
                .map(|e| e.backend.memdev_info())
                .collect();
            Ok(info_memdev(&list))
        }
        _ => Err(unknown()),
    }
}

/// The text of hostmem's own HMP `info memslots`: a summary line, a column header and one row
/// per slot. RAMBlock names come from `ramblocks` when given: a slot of memory that migrates
/// through alias blocks (s390's chunks) names the alias block it lies in, an unnamed block
/// shows its region.
pub fn info_memslots(kvm: &KvmAccel, ramblocks: Option<&RamBlockRegistry>) -> String {
    format_memslots(
        &kvm.slots(),
        kvm.nr_slots(),
        kvm.effective_max_slot_size(),
        kvm.dirty_logging(),
        &|s: &Slot| {
            let named = |id, offset| {
                ramblocks
                    .and_then(|r| r.get(id))
                    .filter(|b| !b.idstr.is_empty())
                    .map(|b| (b.idstr.clone(), offset))
            };
            ramblocks
                .and_then(|r| r.migrating_alias(s.block, s.block_offset, s.size))
                .and_then(|(alias, offset)| named(alias, offset))
                .or_else(|| named(s.block, s.block_offset))
                .unwrap_or_else(|| (s.region_name.clone(), s.block_offset))
        },
    )
}

/// The `info memslots` table of `slots`, each named by `name` (a RAMBlock and the offset there).
pub fn format_memslots(
    slots: &[Slot],
    nr_slots: u32,
    max_slot_size: u64,
    dirty_logging: bool,
    name: &dyn Fn(&Slot) -> (String, u64),
) -> String {
    let mut out = format!(
        "KVM memslots: {} used of {nr_slots}, max slot size 0x{max_slot_size:x}, dirty logging {}\n",
        slots.len(),
        if dirty_logging { "on" } else { "off" }
    );
    let _ = writeln!(
        out,
        "{:>4} {:<37} {:<18} {:<18} {:<6} RAMBlock@offset",
        "slot", "GPA", "size", "HVA", "flags"
    );
    for s in slots {
        let flags = if s.readonly {
            "ro"
        } else if s.logs_dirty_pages() {
            "rw,log"
        } else {
            "rw"
        };
        let (block, offset) = name(s);
        let _ = writeln!(
            out,
            "{:>4} 0x{:016x}-0x{:016x} 0x{:016x} 0x{:016x} {flags:<6} {block}@0x{offset:x}",
            s.slot,
            s.gpa,
            s.gpa + (s.size - 1),
            s.size,
            s.hva,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    macro_rules! qemu {
        ($f:literal) => {
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/qemu/", $f))
        };
    }

    /// The blank-line separated block of `text` that starts with `first_line`, with its
    /// trailing blank line.
    fn block(text: &str, first_line: &str) -> String {
        let start = text
            .find(&format!("{first_line}\n"))
            .unwrap_or_else(|| panic!("no block {first_line:?}"));
        let rest = &text[start..];
        let end = rest.find("\n\n").expect("block ends with a blank line");
        rest[..end + 2].to_string()
    }

    /// Masks the HVA column, which differs on every run.
    fn mask_hva(text: &str) -> String {
        text.lines()
            .map(|l| {
                if l.len() >= 110 && l.as_bytes()[92..94] == *b"0x" {
                    format!("{}<hva>{}", &l[..92], &l[110..])
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn machine_none(ram_mib: u64) -> MemorySystem {
        let mut m = MemorySystem::new();
        let ram = m.new_ram_anonymous("ram", ram_mib << 20).unwrap();
        m.set_owner(ram, Some("/objects/ram")).unwrap();
        m.vmstate_register_ram(ram, None).unwrap();
        m.add_subregion(m.system_memory(), 0, ram, None).unwrap();
        m
    }

    #[test]
    fn mtree_of_machine_none_matches_qemu() {
        let m = machine_none(64);
        let opts = MtreeOptions::default();
        assert_eq!(info_mtree(&m, 0, opts), qemu!("none-m64M.mtree.txt"));
        let owners = MtreeOptions {
            owner: true,
            ..opts
        };
        assert_eq!(info_mtree(&m, 0, owners), qemu!("none-m64M.mtree-o.txt"));
    }

    #[test]
    fn flat_mtree_of_machine_none_matches_qemu() {
        let m = machine_none(64);
        let opts = MtreeOptions {
            flat: true,
            ..Default::default()
        };
        // QEMU's FlatView order is hash order; hostmem's fixed order is one QEMU produced.
        assert_eq!(
            info_mtree_flat(&m, 0, opts, None),
            qemu!("none-m64M.mtree-f.txt")
        );
    }

    #[test]
    fn s390_tree_and_flat_views_match_qemu() {
        let dump = qemu!("s390-ccw-virtio-m64M.txt");
        let mut m = MemorySystem::new();
        let ram = m.new_ram_anonymous("s390.ram", 64 << 20).unwrap();
        m.add_subregion(m.system_memory(), 0, ram, None).unwrap();
        let tree = info_mtree(&m, 1, MtreeOptions::default());
        let expected =
            block(dump, "address-space: I/O") + &block(dump, "address-space: cpu-memory-0");
        assert_eq!(tree, expected);
        let flat = info_mtree_flat(&m, 1, MtreeOptions::default(), None);
        // Same views, QEMU happened to number them the other way round.
        let mem_view = block(dump, "FlatView #0").replace("FlatView #0", "FlatView #1");
        let io_view = block(dump, "FlatView #1").replace("FlatView #1", "FlatView #0");
        assert_eq!(flat, io_view + &mem_view);
    }

    struct Line {
        level: usize,
        start: u64,
        end: u64,
        prio: i32,
        ty: String,
        name: String,
        alias: Option<(String, u64)>,
        enabled: bool,
    }

    fn parse_line(l: &str) -> Line {
        let level = (l.len() - l.trim_start().len()) / 2;
        let l = l.trim_start();
        let start = u64::from_str_radix(&l[0..16], 16).unwrap();
        let end = u64::from_str_radix(&l[17..33], 16).unwrap();
        let (meta, name) = l[35..].split_once("): ").unwrap();
        let (name, enabled) = match name.strip_suffix(" [disabled]") {
            Some(n) => (n, false),
            None => (name, true),
        };
        let (prio, ty) = meta.trim_start_matches("prio ").split_once(", ").unwrap();
        let (name, alias) = match name.strip_prefix("alias ") {
            Some(rest) => {
                let (n, t) = rest.split_once(" @").unwrap();
                let (target, range) = t.split_once(' ').unwrap();
                let off = u64::from_str_radix(&range[..16], 16).unwrap();
                (n.to_string(), Some((target.to_string(), off)))
            }
            None => (name.to_string(), None),
        };
        Line {
            level,
            start,
            end,
            prio: prio.parse().unwrap(),
            ty: ty.to_string(),
            name,
            alias,
            enabled,
        }
    }

    /// Rebuilds region trees from QEMU `info mtree` blocks. Non-leaf "i/o" lines are containers
    /// unless named in `io_with_children`; a child indented two levels deeper than its
    /// predecessor sits in a disabled (unprinted) container at 0, as ACPI PM's does.
    fn rebuild(
        m: &mut MemorySystem,
        blocks: &[(&str, Option<RegionId>)],
        io_with_children: &[&str],
    ) {
        let mut lines: Vec<(Vec<Line>, Option<RegionId>)> = Vec::new();
        for (text, root) in blocks {
            let ls = text
                .lines()
                .filter(|l| l.starts_with("  "))
                .map(parse_line)
                .collect();
            lines.push((ls, *root));
        }
        let mut by_name: HashMap<String, RegionId> = HashMap::new();
        let mut ids: Vec<Vec<Option<RegionId>>> = Vec::new();
        // Pass 1: everything but aliases.
        for (ls, root) in &lines {
            let mut v = Vec::new();
            for (i, l) in ls.iter().enumerate() {
                if i == 0 && root.is_some() {
                    v.push(*root);
                    continue;
                }
                if l.alias.is_some() {
                    v.push(None);
                    continue;
                }
                let size = u128::from(l.end - l.start) + 1;
                let has_children = ls.get(i + 1).is_some_and(|n| n.level > l.level);
                let id = match l.ty.as_str() {
                    "ram" | "rom" => {
                        let id = m.new_ram_anonymous(&l.name, size as u64).unwrap();
                        m.set_readonly(id, l.ty == "rom").unwrap();
                        id
                    }
                    _ if has_children && !io_with_children.contains(&l.name.as_str()) => {
                        m.new_container(&l.name, size)
                    }
                    _ => m.new_io(&l.name, size),
                };
                by_name.entry(l.name.clone()).or_insert(id);
                v.push(Some(id));
            }
            ids.push(v);
        }
        // Pass 2: aliases, then attach every child (in reverse print order, so that the
        // newest-first rule reproduces QEMU's order among equals).
        for (b, (ls, _)) in lines.iter().enumerate() {
            for (i, l) in ls.iter().enumerate() {
                if let Some((t, off)) = &l.alias {
                    let size = l.end - l.start + 1;
                    let id = m.new_alias(&l.name, by_name[t], *off, size).unwrap();
                    ids[b][i] = Some(id);
                }
            }
            // Parent of each line: nearest previous line one level up (or a synthetic
            // disabled container when a level is skipped).
            let mut stack: Vec<(usize, RegionId, u64)> = Vec::new();
            let mut links = Vec::new();
            for (i, l) in ls.iter().enumerate() {
                let id = ids[b][i].unwrap();
                while stack.last().is_some_and(|s| s.0 >= l.level) {
                    stack.pop();
                }
                if let Some(&(plevel, pid, pstart)) = stack.last() {
                    if l.level > plevel + 1 {
                        let hidden = m.new_container("hidden", 0x40);
                        m.set_enabled(hidden, false).unwrap();
                        links.push((pid, 0, hidden, 0));
                        stack.push((plevel + 1, hidden, pstart));
                    }
                    let &(_, pid, pstart) = stack.last().unwrap();
                    links.push((pid, l.start - pstart, id, l.prio));
                }
                stack.push((l.level, id, l.start));
            }
            for &(p, addr, c, prio) in links.iter().rev() {
                m.add_subregion(p, addr, c, Some(prio)).unwrap();
            }
            for (i, l) in ls.iter().enumerate() {
                if !l.enabled {
                    m.set_enabled(ids[b][i].unwrap(), false).unwrap();
                }
            }
        }
    }

    /// Rebuilds the "I/O" and "memory" trees of a pc-like dump and compares hostmem's dumps
    /// with QEMU's: the address-space blocks, the aliased regions hostmem also has, and the
    /// two FlatViews (renumbered: QEMU also has cpu-smm-0, smram and PCI bus-master spaces).
    fn check_pc_like(dump: &str) {
        let m = rebuild_pc_like(dump);
        assert_eq!(
            info_mtree(&m, 1, MtreeOptions::default()),
            pc_like_tree(dump)
        );
        assert_eq!(
            info_mtree_flat(&m, 1, MtreeOptions::default(), None),
            pc_like_flat(dump)
        );
    }

    /// The "I/O" and "memory" trees of a pc-like QEMU dump, rebuilt as hostmem regions.
    fn rebuild_pc_like(dump: &str) -> MemorySystem {
        let mut m = MemorySystem::new();
        let io_block = block(dump, "address-space: I/O");
        let mem_block = block(dump, "address-space: cpu-memory-0");
        let ram_block = block(dump, "memory-region: pc.ram");
        let (sys, io) = (m.system_memory(), m.system_io());
        rebuild(
            &mut m,
            &[
                (&ram_block, None),
                (&io_block, Some(io)),
                (&mem_block, Some(sys)),
            ],
            &["rtc"],
        );
        m
    }

    /// What hostmem's `info mtree` must print for a rebuilt pc-like dump: the blocks of QEMU's
    /// output for the regions hostmem also has.
    fn pc_like_tree(dump: &str) -> String {
        block(dump, "address-space: I/O")
            + &block(dump, "address-space: cpu-memory-0")
            + &block(dump, "memory-region: pc.ram")
            + &block(dump, "memory-region: pc.bios")
            + &block(dump, "memory-region: pci")
    }

    /// The two FlatViews hostmem has, renumbered (QEMU also has cpu-smm-0 and bus-master views).
    fn pc_like_flat(dump: &str) -> String {
        block(dump, "FlatView #0")
            + &block(dump, "FlatView #3").replace("FlatView #3", "FlatView #1")
    }

    #[test]
    fn pc_memory_and_io_trees_match_qemu() {
        check_pc_like(qemu!("pc-m4G.txt"));
    }

    #[test]
    fn q35_memory_and_io_trees_match_qemu() {
        check_pc_like(qemu!("q35-m4G.txt"));
    }

    #[test]
    fn pc_with_disabled_regions_matches_qemu_with_and_without_capital_d() {
        let dump_d = qemu!("pc-m4G.mtree-D.txt");
        let dump = qemu!("pc-m4G.txt");
        let m = rebuild_pc_like(dump_d);
        let with_d = MtreeOptions {
            disabled: true,
            ..Default::default()
        };
        assert_eq!(info_mtree(&m, 1, with_d), pc_like_tree(dump_d));
        // The same tree without -D hides the disabled lines exactly as QEMU did.
        assert_eq!(
            info_mtree(&m, 1, MtreeOptions::default()),
            pc_like_tree(dump)
        );
        assert_eq!(
            info_mtree_flat(&m, 1, MtreeOptions::default(), None),
            pc_like_flat(dump)
        );
    }

    #[test]
    fn disabled_regions_show_only_with_capital_d() {
        let mut m = MemorySystem::new();
        let smram = m.new_container("smram", 1 << 32);
        let ram = m.new_ram_anonymous("pc.ram", 1 << 20).unwrap();
        let low = m.new_alias("smram-low", ram, 0xa0000, 0x20000).unwrap();
        m.add_subregion(smram, 0xa0000, low, None).unwrap();
        m.set_enabled(smram, false).unwrap();
        m.add_subregion(m.system_memory(), 0, smram, Some(1))
            .unwrap();
        let plain = info_mtree(&m, 0, MtreeOptions::default());
        // As in QEMU's pc dump: the disabled container's line is gone, its child is not.
        assert!(plain.contains(
            "\n      00000000000a0000-00000000000bffff (prio 0, ram): alias smram-low @pc.ram \
             00000000000a0000-00000000000bffff\n"
        ));
        assert!(!plain.contains("): smram\n"));
        let all = info_mtree(
            &m,
            0,
            MtreeOptions {
                disabled: true,
                ..Default::default()
            },
        );
        assert!(
            all.contains("    0000000000000000-00000000ffffffff (prio 1, i/o): smram [disabled]\n")
        );
        assert!(all.ends_with(
            "memory-region: pc.ram\n  0000000000000000-00000000000fffff (prio 0, ram): pc.ram\n\n"
        ));
    }

    #[test]
    fn empty_view_says_so_and_kvm_marks_ranges() {
        let mut m = MemorySystem::new();
        let opts = MtreeOptions::default();
        let flat = info_mtree_flat(&m, 0, opts, None);
        assert!(flat.ends_with(
            "FlatView #1\n AS \"memory\", root: system\n Root memory region: (none)\n  No \
             rendered FlatView\n\n"
        ));
        let ram = m.new_ram_anonymous("ram", 1 << 20).unwrap();
        let rom = m.new_ram_anonymous("rom", 1 << 16).unwrap();
        m.set_readonly(rom, true).unwrap();
        m.add_subregion(m.system_memory(), 0, ram, None).unwrap();
        m.add_subregion(m.system_memory(), 1 << 20, rom, None)
            .unwrap();
        struct MapsFirstMiB;
        impl HasMemory for MapsFirstMiB {
            fn accel_name(&self) -> &str {
                "KVM"
            }
            fn has_memory(&self, gpa: u64, _size: u64) -> bool {
                gpa == 0
            }
        }
        let flat = info_mtree_flat(&m, 0, opts, Some(&MapsFirstMiB));
        assert!(flat.contains("  0000000000000000-00000000000fffff (prio 0, ram): ram KVM\n"));
        assert!(flat.contains("  0000000000100000-000000000010ffff (prio 0, rom): rom\n"));
        assert!(flat.contains(" Root memory region: system\n"));
    }

    #[test]
    fn ramblock_matches_qemu_with_unnamed_blocks() {
        let mut reg = RamBlockRegistry::new();
        let map = |size| crate::ramblock::map_anonymous("t", size).unwrap();
        let foo = reg.add(map(1 << 20), 0, 1 << 20, 1 << 20, false).unwrap();
        let ram = reg
            .add(map(64 << 20), 0, 64 << 20, 64 << 20, false)
            .unwrap();
        reg.set_idstr(ram, None, "ram").unwrap();
        let _ = foo;
        assert_eq!(
            mask_hva(&info_ramblock(&reg)),
            mask_hva(qemu!("none-m64M-obj.ramblock.txt"))
        );
    }

    #[test]
    fn ramblock_of_pc_matches_qemu_rows() {
        let dump = qemu!("pc-m4G.txt");
        let mut reg = RamBlockRegistry::new();
        // Creation order of pc's blocks; ids() sorts them as QEMU's RAM list does.
        for (name, used, max, ro) in [
            ("pc.ram", 0x1_0000_0000u64, 0x1_0000_0000u64, false),
            ("pc.bios", 0x40000, 0x40000, true),
            ("pc.rom", 0x20000, 0x20000, true),
            ("/rom@etc/acpi/tables", 0x20000, 0x200000, true),
            ("/rom@etc/table-loader", 0x1000, 0x10000, true),
            ("/rom@etc/acpi/rsdp", 0x1000, 0x1000, true),
        ] {
            let m = crate::ramblock::map_anonymous(name, max).unwrap();
            let id = reg.add(m, 0, used, max, ro).unwrap();
            reg.set_idstr(id, None, name).unwrap();
        }
        let expected: String = dump.lines().take(7).map(|l| format!("{l}\n")).collect();
        assert_eq!(mask_hva(&info_ramblock(&reg)), mask_hva(&expected));
    }

    fn memdev(id: &str, size: u64) -> MemdevInfo {
        MemdevInfo {
            id: id.to_string(),
            size,
            merge: true,
            dump: true,
            prealloc: false,
            share: false,
            reserve: Some(true),
            host_nodes: String::new(),
            policy: "default",
        }
    }

    #[test]
    fn memdev_matches_qemu() {
        let list = [memdev("foo", 1 << 20), memdev("ram", 64 << 20)];
        assert_eq!(info_memdev(&list), qemu!("none-m64M-obj.memdev.txt"));
        assert_eq!(info_memdev(&[]), "\n");
        let mut odd = memdev("n", 1);
        odd.reserve = None;
        odd.host_nodes = "0-1,3".to_string();
        odd.policy = "bind";
        let text = info_memdev(&[odd]);
        assert!(!text.contains("reserve"));
        assert!(text.contains("  policy: bind\n  host nodes: 0-1,3\n\n"));
    }

    fn slot(n: u32, gpa: u64, size: u64, flags: u32, readonly: bool) -> Slot {
        Slot {
            slot: n,
            gpa,
            size,
            hva: 0x7f00_0000_0000 + gpa,
            flags,
            block: crate::ramblock::RamBlockId(0),
            block_offset: gpa,
            region_name: "pc.ram".into(),
            readonly,
            mapping: std::sync::Arc::new(
                crate::hostmap::map_anonymous("fake", 4096, false, true).unwrap(),
            ),
        }
    }

    #[test]
    fn info_memslots_has_a_summary_a_header_and_one_row_per_slot() {
        let text = format_memslots(
            &[
                slot(0, 0, 0xc000_0000, 0, false),
                slot(1, 0x1_0000_0000, 0xc000_0000, 1, false),
                slot(2, 0xfffc_0000, 0x4_0000, 2, true),
            ],
            32764,
            0x7ff_ffff_f000,
            true,
            &|s| (s.region_name.clone(), s.block_offset),
        );
        let expected = "\
KVM memslots: 3 used of 32764, max slot size 0x7fffffff000, dirty logging on
slot GPA                                   size               HVA                flags  RAMBlock@offset
   0 0x0000000000000000-0x00000000bfffffff 0x00000000c0000000 0x00007f0000000000 rw     pc.ram@0x0
   1 0x0000000100000000-0x00000001bfffffff 0x00000000c0000000 0x00007f0100000000 rw,log pc.ram@0x100000000
   2 0x00000000fffc0000-0x00000000ffffffff 0x0000000000040000 0x00007f00fffc0000 ro     pc.ram@0xfffc0000
";
        assert_eq!(text, expected);
    }

    #[test]
    fn mtree_flags_follow_qemus_parser() {
        let ok = |s: &str| parse_mtree_flags(s).unwrap();
        assert_eq!(ok(""), MtreeOptions::default());
        assert!(ok(" -f").flat);
        let all = ok("-f -d -o -D");
        assert!(all.flat && all.owner && all.disabled);
        let e = parse_mtree_flags(" -o -f").unwrap_err();
        assert_eq!(e.message(), "mtree: unsupported option -f");
        assert_eq!(
            e.hint(),
            Some("Try \"help info mtree\" for more information\n")
        );
        let e = parse_mtree_flags(" -x").unwrap_err();
        assert_eq!(e.message(), "mtree: unsupported option -x");
        for bad in [" -fD", " foo"] {
            let e = parse_mtree_flags(bad).unwrap_err();
            assert_eq!(
                e.message(),
                "mtree: extraneous characters at the end of line"
            );
        }
    }

    #[test]
    fn hmp_dispatches_and_answers_unknown_commands_like_qemu() {
        let mut machine = Machine::new();
        machine.set_cpu_address_spaces(0);
        let mem = machine.memory_mut();
        let ram = mem.new_ram_anonymous("ram", 64 << 20).unwrap();
        mem.set_owner(ram, Some("/objects/ram")).unwrap();
        mem.add_subregion(mem.system_memory(), 0, ram, None)
            .unwrap();
        let machine = &machine;
        let tree = hmp(machine, "info mtree").unwrap();
        let flat = hmp(machine, "  info   mtree -f").unwrap();
        let owners = hmp(machine, "info mtree -o").unwrap();
        let blocks = hmp(machine, "info ramblock").unwrap();
        let help = hmp(machine, "info").unwrap();
        let errors: Vec<(String, Option<String>)> = [
            "info foo",
            "foo",
            "info ramblock extra",
            "info memdev x",
            "info mtree -o -f",
        ]
        .iter()
        .map(|c| {
            let e = hmp(machine, c).unwrap_err();
            (e.message().to_string(), e.hint().map(str::to_string))
        })
        .collect();
        assert_eq!(tree, qemu!("none-m64M.mtree.txt"));
        assert_eq!(flat, qemu!("none-m64M.mtree-f.txt"));
        assert_eq!(owners, qemu!("none-m64M.mtree-o.txt"));
        assert!(blocks.starts_with("              Block Name    PSize"));
        assert!(help.contains("info ramblock  -- Display system ramblock information\n"));
        let try_help = |c: &str| Some(format!("Try \"help info {c}\" for more information\n"));
        assert_eq!(
            errors,
            [
                ("unknown command: 'info foo'".to_string(), None),
                ("unknown command: 'foo'".to_string(), None),
                (
                    "ramblock: extraneous characters at the end of line".to_string(),
                    try_help("ramblock")
                ),
                (
                    "memdev: extraneous characters at the end of line".to_string(),
                    try_help("memdev")
                ),
                (
                    "mtree: unsupported option -f".to_string(),
                    try_help("mtree")
                ),
            ]
        );
    }
}
