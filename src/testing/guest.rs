//! hostmem's x86-64 test guest: two small programs that a vCPU of the VM runs to prove, from
//! the guest's side, what the memslots map.
//!
//! - The **ops program** (`guest/ops.S`) runs a list of 8-byte writes, reads and waits at
//!   guest-physical addresses, then signals completion on an I/O port and halts. The host
//!   checks the results through its own pointers, so a slot at the wrong GPA, HVA or size shows
//!   up as a value in the wrong place (or as an MMIO exit where RAM should be). The guest check
//!   of [`super::check`] is built on it.
//! - The **dirtier** (`guest/dirtier.S`) is the live-migration workload, modelled on the guest
//!   of QEMU's migration test: it zeroes byte 0 of every 4 KiB page of a range, then increments
//!   byte 0 of every page in ascending order, pass after pass, counting passes in a heartbeat
//!   word and stopping at the end of the pass in which the host set a stop word. Once the
//!   zeroing is done, at whatever instant its vCPU stops, the range satisfies
//!   [`check_dirtied_pages`]'s rule, so a page a migration lost or sent stale shows up on the
//!   destination.
//!
//! build.rs assembles both (cc) into a read-only data section of the library; the host copies
//! the bytes into guest RAM. They are position-independent and take their arguments in
//! registers the host sets with KVM_SET_REGS, so the bytes are constants. What they share with
//! this file (done port, spin limit, mailbox addresses) is written once, in `guest/abi.rs`,
//! which build.rs hands to the assembler as `-D` defines. Only x86-64 builds carry the
//! programs; elsewhere the vCPU entry points return an error.
//!
//! The vCPU starts directly in 64-bit long mode: the host writes a GDT, page tables and the code
//! into low guest RAM before the run. Page tables identity-map only the 2 MiB pages the run
//! touches (the ops' addresses, the dirtier's range), which keeps them small even for a 9 TiB
//! guest (1 GiB pages would be simpler, but not every KVM offers them to guests).
//!
//! Low guest RAM a run uses (must be RAM with a slot, below the 640 KiB VGA hole):
//!
//! | GPA        | ops program               | dirtier                                  |
//! |------------|---------------------------|------------------------------------------|
//! | `0x500`    | GDT                       | GDT                                      |
//! | `0x600`    | (untouched)               | pass counter (u64), then stop word (u64) |
//! | `0x1000`   | code                      | code                                     |
//! | `0x2000..` | page tables, then op list | page tables; the range starts above them |

// Other hosts build the layout and the checker but never load a program, so what only feeds
// the x86-64 vCPU code is unused there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

mod abi;

use crate::error::{Error, HmErrorClass, Result};

use std::sync::{Arc, Mutex};

use crate::kvm::table::SlotTable;

pub(crate) use vcpu::{prepare_dirtier, run_dirtier, run_ops, setup_vcpu};

pub(crate) const GDT_ADDR: u64 = 0x500;
pub(crate) const CODE_ADDR: u64 = 0x1000;
pub(crate) const TABLES_ADDR: u64 = 0x2000;
/// The payload must end below the legacy VGA hole of PC layouts.
pub(crate) const PAYLOAD_LIMIT: u64 = 0xa_0000;
/// The port the guest writes [`DONE_VALUE`] to when it has finished.
pub(crate) const DONE_PORT: u16 = abi::DONE_PORT;
pub(crate) const DONE_VALUE: u8 = abi::DONE_VALUE;
/// Identity mapping stays in the lower canonical half.
const MAX_GPA: u64 = 1 << 47;
const PAGE_2M: u64 = 2 << 20;
const PAGE_4K: u64 = 4096;
/// Present, writable, accessed. Accessed (and dirty, for leaves) are set up front so that the
/// CPU never writes the tables: the only guest writes are the programs', which the dirty-log
/// tests count exactly.
const TABLE_FLAGS: u64 = 0x23;
/// Present, writable, accessed, dirty, 2 MiB page.
const LEAF_FLAGS: u64 = 0xe3;

/// One access the guest makes. Addresses must be 8-byte aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestOp {
    Write {
        gpa: u64,
        value: u64,
    },
    Read {
        gpa: u64,
    },
    /// Spin while the word at `gpa` equals `value` (at most 2^28 rounds, seconds): lets
    /// the host act while the guest is running, then release it by writing that word.
    WaitWhile {
        gpa: u64,
        value: u64,
    },
}

impl GuestOp {
    pub fn gpa(&self) -> u64 {
        match *self {
            GuestOp::Write { gpa, .. } | GuestOp::Read { gpa } | GuestOp::WaitWhile { gpa, .. } => {
                gpa
            }
        }
    }
}

/// GDT: null, 64-bit code (selector 0x8), data (selector 0x10). The vCPU gets the same
/// descriptors through its segment registers; the table is there so a reload would agree.
const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Page tables identity-mapping the 2 MiB pages numbered `pages` (ascending; repeats are
/// harmless), as bytes to place at [`TABLES_ADDR`]: the PML4, then one PDPT per 512 GiB and one
/// PD per 1 GiB touched, in the order first touched.
fn page_tables(pages: impl IntoIterator<Item = u64>) -> Vec<u8> {
    let mut tables: Vec<[u64; 512]> = vec![[0; 512]];
    let mut pdpt_of = std::collections::BTreeMap::new();
    let mut pd_of = std::collections::BTreeMap::new();
    let addr_of = |index: usize| TABLES_ADDR + index as u64 * 4096;
    for page in pages {
        let gpa = page * PAGE_2M;
        let (i4, i3, i2) = ((gpa >> 39) & 511, (gpa >> 30) & 511, (gpa >> 21) & 511);
        let pdpt = *pdpt_of.entry(i4).or_insert_with(|| {
            tables.push([0; 512]);
            let t = tables.len() - 1;
            tables[0][i4 as usize] = addr_of(t) | TABLE_FLAGS;
            t
        });
        let pd = *pd_of.entry((i4, i3)).or_insert_with(|| {
            tables.push([0; 512]);
            let t = tables.len() - 1;
            tables[pdpt][i3 as usize] = addr_of(t) | TABLE_FLAGS;
            t
        });
        tables[pd][i2 as usize] = gpa | LEAF_FLAGS;
    }
    le_bytes(tables.iter().flatten())
}

/// Little-endian bytes of `words`, as the guest reads its tables. A plain loop: valgrind
/// cannot follow the optimised code of nested byte iterators and reports uninitialised reads.
fn le_bytes<'a>(words: impl Iterator<Item = &'a u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

/// The bytes the host writes into low guest RAM for one run of the ops program, and where the
/// op list is.
#[derive(Debug)]
struct Payload {
    tables: Vec<u8>,
    ops_addr: u64,
    ops: Vec<u8>,
}

impl Payload {
    fn build(ops: &[GuestOp]) -> Result<Payload> {
        for op in ops {
            let gpa = op.gpa();
            if gpa % 8 != 0 || gpa >= MAX_GPA - 8 {
                return Err(Error::invalid(format!(
                    "guest payload cannot access gpa 0x{gpa:x} (8-byte aligned, below 0x{MAX_GPA:x})"
                )));
            }
        }
        let mut pages: Vec<u64> = ops.iter().map(|o| o.gpa() / PAGE_2M).collect();
        pages.push(0);
        pages.sort_unstable();
        pages.dedup();
        let table_bytes = page_tables(pages);
        let ops_addr = TABLES_ADDR + table_bytes.len() as u64;
        let mut op_bytes = Vec::with_capacity(8 + ops.len() * 24);
        op_bytes.extend((ops.len() as u64).to_le_bytes());
        for op in ops {
            let (kind, gpa, value) = match *op {
                GuestOp::Write { gpa, value } => (0u64, gpa, value),
                GuestOp::Read { gpa } => (1, gpa, 0),
                GuestOp::WaitWhile { gpa, value } => (2, gpa, value),
            };
            op_bytes.extend(kind.to_le_bytes());
            op_bytes.extend(gpa.to_le_bytes());
            op_bytes.extend(value.to_le_bytes());
        }
        let end = ops_addr + op_bytes.len() as u64;
        if end > PAYLOAD_LIMIT {
            return Err(Error::invalid(format!(
                "guest payload for {} accesses needs guest RAM up to 0x{end:x}, more than the \
                 0x{PAYLOAD_LIMIT:x} it may use",
                ops.len()
            )));
        }
        Ok(Payload {
            tables: table_bytes,
            ops_addr,
            ops: op_bytes,
        })
    }

    fn end(&self) -> u64 {
        self.ops_addr + self.ops.len() as u64
    }
}

/// The end of low guest RAM a run of `ops` overwrites (from 0x500).
pub fn payload_end(ops: &[GuestOp]) -> Result<u64> {
    Payload::build(ops).map(|p| p.end())
}

/// Where the dirtier works: byte 0 of every 4 KiB page of `[start, end)`.
///
/// Both ends must be 4 KiB aligned, the range non-empty, above the program's own page tables
/// and below 2^47; all of it must be RAM with a writable slot, or the run ends with an error
/// naming the first address the guest could not write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtierLayout {
    pub start: u64,
    pub end: u64,
}

/// The dirtier's mailbox and stride. Rust-only: the C header does not carry them.
/// cbindgen:ignore
impl DirtierLayout {
    /// GPA of the u64 the guest increments after every full pass: the heartbeat to watch.
    pub const PASSES_GPA: u64 = abi::DIRTIER_PASSES_GPA;
    /// GPA of the u64 stop word: make it non-zero and the guest stops at the end of its pass.
    pub const STOP_GPA: u64 = abi::DIRTIER_STOP_GPA;
    /// The stride of the dirtier: it writes byte 0 of pages this large.
    pub const PAGE_SIZE: u64 = PAGE_4K;
}

impl DirtierLayout {
    /// The number of pages the guest dirties.
    pub fn pages(&self) -> u64 {
        self.end.saturating_sub(self.start) / PAGE_4K
    }

    /// The GPA of byte 0 of page `index` of the range.
    pub fn page_gpa(&self, index: u64) -> u64 {
        self.start + index * PAGE_4K
    }

    /// The page tables for a run: low RAM (the program and its mailbox) and every 2 MiB page
    /// the range touches.
    fn tables(&self) -> Result<Vec<u8>> {
        let DirtierLayout { start, end } = *self;
        let bad = |why: &str| {
            Err(Error::invalid(format!(
                "dirtier range 0x{start:x}-0x{end:x}: {why}"
            )))
        };
        if start % PAGE_4K != 0 || end % PAGE_4K != 0 {
            return bad("both ends must be 4 KiB aligned");
        }
        if start >= end {
            return bad("the range is empty");
        }
        if end > MAX_GPA {
            return bad(&format!("the guest maps no address above 0x{MAX_GPA:x}"));
        }
        // Count the tables before building them: a huge range cannot fit. The PML4, then one
        // PDPT per 512 GiB and one PD per GiB, each of the range plus the one of low RAM.
        let span = |shift: u32| {
            let (first, last) = (start >> shift, (end - 1) >> shift);
            last - first + 1 + u64::from(first != 0)
        };
        if TABLES_ADDR + (1 + span(39) + span(30)) * 4096 > PAYLOAD_LIMIT {
            return bad(&format!(
                "its page tables would not fit below 0x{PAYLOAD_LIMIT:x}"
            ));
        }
        let tables = page_tables(std::iter::once(0).chain(start / PAGE_2M..=(end - 1) / PAGE_2M));
        let tables_end = TABLES_ADDR + tables.len() as u64;
        if start < tables_end {
            return bad(&format!(
                "the range must start at or above 0x{tables_end:x}, the end of the program's \
                 page tables"
            ));
        }
        Ok(tables)
    }
}

// The dirtier's two mailbox words lie between the GDT and the code, in the page every run
// writes anyway and out of the range's way.
const _: () = assert!(
    GDT_ADDR + GDT.len() as u64 * 8 <= abi::DIRTIER_PASSES_GPA
        && abi::DIRTIER_STOP_GPA == abi::DIRTIER_PASSES_GPA + 8
        && abi::DIRTIER_STOP_GPA + 8 <= CODE_ADDR
);

/// How a dirtier run ended: at the end of pass `passes` (the heartbeat's final value), with the
/// vCPU halted and its registers as read after the halt. The vCPU is left as it is, so a
/// migration can save its state.
#[derive(Clone, Copy, Debug)]
pub struct DirtierStop {
    pub passes: u64,
    pub regs: kvm_bindings::kvm_regs,
}

/// One page that breaks the dirtier's rule: its byte 0 and the previous page's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadPage {
    pub page: u64,
    pub previous: u8,
    pub found: u8,
}

/// What [`check_dirtied_pages`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageCheck {
    pub pages: u64,
    /// Pages whose byte 0 differs from the previous page's other than at the one allowed edge.
    pub bad: u64,
    /// The page where byte 0 steps down by one, if any: where the guest was when it stopped.
    pub edge: Option<u64>,
    /// The first [`PageCheck::MAX_OFFENDERS`] bad pages, in page order.
    pub offenders: Vec<BadPage>,
}

/// Rust-only, as [`DirtierLayout`]'s constants.
/// cbindgen:ignore
impl PageCheck {
    pub const MAX_OFFENDERS: usize = 8;
}

impl PageCheck {
    pub fn is_consistent(&self) -> bool {
        self.bad == 0
    }
}

/// Checks the rule the dirtier leaves in its range, QEMU's migration-test check: byte 0 is the
/// same in every page, except at most one edge where it steps down by one (mod 256) from the
/// previous page, the point the guest had reached when its vCPU stopped. `byte0(i)` reads byte
/// 0 of page `i` of `pages`, wherever the caller finds it (a destination's RAMBlocks, a file).
///
/// Every other change between neighbours counts as one bad page: a page that lost its last
/// increment (or a stale copy) sits one below its neighbours and makes a step down and a step
/// up; a second step down is a second edge. A lost increment on the very last page looks like
/// an edge: that one is indistinguishable from the guest stopping there.
pub fn check_dirtied_pages(pages: u64, mut byte0: impl FnMut(u64) -> u8) -> PageCheck {
    let mut check = PageCheck {
        pages,
        ..PageCheck::default()
    };
    if pages == 0 {
        return check;
    }
    let mut previous = byte0(0);
    for page in 1..pages {
        let found = byte0(page);
        if found != previous {
            if found.wrapping_add(1) == previous && check.edge.is_none() {
                check.edge = Some(page);
            } else {
                check.bad += 1;
                if check.offenders.len() < PageCheck::MAX_OFFENDERS {
                    check.offenders.push(BadPage {
                        page,
                        previous,
                        found,
                    });
                }
            }
        }
        previous = found;
    }
    check
}

#[cfg(target_arch = "x86_64")]
mod vcpu {
    //! What needs an x86-64 vCPU: the assembled programs, placing them in guest RAM, long mode
    //! and the run loop.

    use kvm_bindings::{kvm_regs, kvm_segment, KVM_MAX_CPUID_ENTRIES};
    use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

    use super::*;
    use crate::guarded::{AccessError, Guard, Span};
    use crate::kvm::table::{lock, Slot};

    /// The assembled programs (build.rs), as bytes to copy into guest RAM.
    pub(super) mod image {
        extern "C" {
            // Zero-sized on the Rust side: only their addresses are used. The bytes between a
            // start and its end belong to the assembled object, not to these declarations.
            static hm_guest_ops_start: [u8; 0];
            static hm_guest_ops_end: [u8; 0];
            static hm_guest_dirtier_start: [u8; 0];
            static hm_guest_dirtier_end: [u8; 0];
        }

        fn between(start: *const [u8; 0], end: *const [u8; 0]) -> &'static [u8] {
            let (start, end) = (start.addr(), end.addr());
            assert!(start <= end, "guest program labels out of order");
            // SAFETY: ops.S and dirtier.S define each start/end pair around one program in one
            // read-only section of one object, end after start (checked above); the linker keeps
            // such a section whole and in order, so the bytes between are initialised and
            // immutable for the life of the process. Rust declares the labels zero-sized, so
            // those bytes are memory outside the abstract machine's statics, which an address
            // may reach with exposed provenance; nothing writes them, so a shared 'static slice
            // is sound.
            unsafe {
                std::slice::from_raw_parts(
                    std::ptr::with_exposed_provenance::<u8>(start),
                    end - start,
                )
            }
        }

        pub(in super::super) fn ops() -> &'static [u8] {
            between(&raw const hm_guest_ops_start, &raw const hm_guest_ops_end)
        }

        pub(in super::super) fn dirtier() -> &'static [u8] {
            between(
                &raw const hm_guest_dirtier_start,
                &raw const hm_guest_dirtier_end,
            )
        }
    }

    /// The slot holding `len` bytes at `gpa`, and the offset of `gpa` in the slot's mapping.
    fn slot_at(table: &SlotTable, gpa: u64, len: u64) -> Result<(&Slot, usize)> {
        match table.lookup(gpa) {
            Some(s) if gpa - s.gpa + len <= s.size => Ok((
                s,
                s.hva as usize - s.mapping.as_ptr() as usize + (gpa - s.gpa) as usize,
            )),
            _ => Err(Error::new(
                HmErrorClass::Kvm,
                format!(
                    "guest payload needs RAM with a memslot at 0x{gpa:x}-0x{:x}",
                    gpa + len - 1
                ),
            )),
        }
    }

    /// A guarded access to guest RAM that failed: the host could not back the page.
    fn access_failed(what: &str, slot: &Slot, at: u64, e: AccessError) -> Error {
        Error::new(
            HmErrorClass::Host,
            format!(
                "guest payload: {what} guest-physical 0x{at:x} (memory region '{}') failed: {e}",
                slot.region_name
            ),
        )
        .with_errno(libc::EFAULT)
    }

    fn guard() -> Result<Guard> {
        Guard::acquire().map_err(|e| Error::generic(e.to_string()))
    }

    /// Copies `bytes` to guest-physical `gpa` through the slots' host memory (the vCPU is not
    /// running); a page the host cannot back is an error, not the process's end.
    fn write_guest(table: &SlotTable, gpa: u64, bytes: &[u8]) -> Result<()> {
        let guard = guard()?;
        let mut done = 0usize;
        while done < bytes.len() {
            let at = gpa + done as u64;
            let slot = table.lookup(at).ok_or_else(|| {
                Error::new(
                    HmErrorClass::Kvm,
                    format!("guest payload needs RAM with a memslot at 0x{at:x}"),
                )
            })?;
            let room = (slot.gpa + slot.size - at).min((bytes.len() - done) as u64) as usize;
            let (slot, offset) = slot_at(table, at, room as u64)?;
            let span = Span::of(&slot.mapping);
            guard
                .write(&span, offset, &bytes[done..done + room])
                .map_err(|e| {
                    let page_gpa = at + (e.offset() as usize).saturating_sub(offset) as u64;
                    access_failed("writing", slot, page_gpa, e)
                })?;
            done += room;
        }
        Ok(())
    }

    fn read_guest_u64(table: &SlotTable, gpa: u64) -> Result<u64> {
        let (slot, offset) = slot_at(table, gpa, 8)?;
        let mut v = [0u8; 8];
        guard()?
            .read(&Span::of(&slot.mapping), offset, &mut v)
            .map_err(|e| access_failed("reading", slot, gpa, e))?;
        Ok(u64::from_le_bytes(v))
    }

    /// Writes what every run needs: the GDT, a program's code and its page tables.
    fn write_program(table: &SlotTable, code: &[u8], tables: &[u8]) -> Result<()> {
        debug_assert!(code.len() as u64 <= TABLES_ADDR - CODE_ADDR);
        let gdt = le_bytes(GDT.iter());
        write_guest(table, GDT_ADDR, &gdt)?;
        write_guest(table, CODE_ADDR, code)?;
        write_guest(table, TABLES_ADDR, tables)
    }

    /// Prepares a new vCPU for the payload: the CPUID KVM supports (long mode needs it).
    pub(crate) fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd) -> Result<()> {
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| kvm_err("KVM_GET_SUPPORTED_CPUID failed", e))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| kvm_err("KVM_SET_CPUID2 failed", e))
    }

    fn kvm_err(what: &str, e: kvm_ioctls::Error) -> Error {
        Error::host(what, e.errno()).with_class(HmErrorClass::Kvm)
    }

    /// Puts the vCPU in 64-bit mode at [`CODE_ADDR`] with the host's tables; `args` sets the
    /// registers the program takes its arguments in.
    fn enter_long_mode(vcpu: &VcpuFd, args: impl FnOnce(&mut kvm_regs)) -> Result<()> {
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| kvm_err("KVM_GET_SREGS failed", e))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x8,
            type_: 0xb, // execute/read, accessed
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1, // 64-bit
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 0x3, // read/write, accessed
            l: 0,
            db: 1,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
        sregs.cr3 = TABLES_ADDR;
        sregs.cr4 = 1 << 5; // PAE
        sregs.cr0 = 0x8005_0033; // PG, AM, WP, NE, ET, MP, PE
        sregs.efer = 0x500; // LMA, LME
        vcpu.set_sregs(&sregs)
            .map_err(|e| kvm_err("KVM_SET_SREGS failed", e))?;
        let mut regs = vcpu
            .get_regs()
            .map_err(|e| kvm_err("KVM_GET_REGS failed", e))?;
        regs.rip = CODE_ADDR;
        regs.rflags = 0x2;
        regs.rsp = 0;
        args(&mut regs);
        vcpu.set_regs(&regs)
            .map_err(|e| kvm_err("KVM_SET_REGS failed", e))
    }

    /// Lets KVM finish whatever the previous run left pending (an MMIO access we refused to
    /// serve, a port write) without running guest code: KVM completes pending I/O at the start
    /// of KVM_RUN, after any registers we set, so it must happen before the new registers go in.
    fn settle(vcpu: &mut VcpuFd) -> Result<()> {
        vcpu.set_kvm_immediate_exit(1);
        let r = vcpu.run().map(|_| ());
        vcpu.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e.errno() != libc::EINTR => {
                Err(Error::host("kvm_cpu_exec: KVM_RUN failed", e.errno())
                    .with_class(HmErrorClass::Kvm))
            }
            _ => Ok(()),
        }
    }

    /// Runs the vCPU until the program reports on [`DONE_PORT`] and halts; any other exit is an
    /// error that `where_` places (the vCPU's registers say where the program was).
    fn run_until_done(vcpu: &mut VcpuFd, where_: &dyn Fn(&VcpuFd) -> String) -> Result<()> {
        let fail = |msg: String| Error::new(HmErrorClass::Kvm, msg);
        let mut signalled = false;
        // A program makes exactly one PIO and one HLT exit; anything beyond a few is a bug.
        for _ in 0..64 {
            let exit = vcpu.run();
            match exit {
                Ok(VcpuExit::IoOut(port, data)) if port == DONE_PORT && data == [DONE_VALUE] => {
                    signalled = true;
                }
                Ok(VcpuExit::Hlt) if signalled => return Ok(()),
                Ok(VcpuExit::MmioWrite(addr, _)) => {
                    return Err(fail(format!(
                        "guest write to 0x{addr:x} reached no writable memslot (MMIO exit, {})",
                        where_(vcpu)
                    )))
                }
                Ok(VcpuExit::MmioRead(addr, _)) => {
                    return Err(fail(format!(
                        "guest read of 0x{addr:x} reached no memslot (MMIO exit, {})",
                        where_(vcpu)
                    )))
                }
                Ok(VcpuExit::Shutdown) => {
                    return Err(fail(format!(
                        "guest payload triple-faulted ({})",
                        where_(vcpu)
                    )))
                }
                Ok(other) => {
                    let what = format!("{other:?}");
                    return Err(fail(format!(
                        "guest payload stopped with an unexpected exit {what} ({})",
                        where_(vcpu)
                    )));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    return Err(Error::host("kvm_cpu_exec: KVM_RUN failed", e.errno())
                        .with_class(HmErrorClass::Kvm))
                }
            }
        }
        Err(fail(format!(
            "guest payload did not halt ({})",
            where_(vcpu)
        )))
    }

    /// Runs `ops` on the vCPU and returns, for each op, the value it wrote or read.
    ///
    /// The slot table is locked only to place the payload and to read the results, not while
    /// the vCPU runs: the host may change the layout or switch dirty logging meanwhile.
    pub(crate) fn run_ops(
        vcpu: &mut VcpuFd,
        table: &Arc<Mutex<SlotTable>>,
        ops: &[GuestOp],
    ) -> Result<Vec<u64>> {
        let payload = Payload::build(ops)?;
        {
            let t = lock(table);
            write_program(&t, image::ops(), &payload.tables)?;
            write_guest(&t, payload.ops_addr, &payload.ops)?;
        }
        settle(vcpu)?;
        enter_long_mode(vcpu, |regs| regs.rsi = payload.ops_addr)?;

        let where_ = |vcpu: &VcpuFd| match vcpu.get_regs() {
            Ok(r) => {
                let left = r.rcx.min(ops.len() as u64) as usize;
                format!(
                    "rip=0x{:x}, at op {} of {}",
                    r.rip,
                    ops.len() - left,
                    ops.len()
                )
            }
            Err(_) => "registers unavailable".to_string(),
        };
        run_until_done(vcpu, &where_)?;
        let table = lock(table);
        let table = &*table;
        let mut out = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            out.push(match *op {
                GuestOp::Write { value, .. } | GuestOp::WaitWhile { value, .. } => value,
                GuestOp::Read { .. } => {
                    read_guest_u64(table, payload.ops_addr + 8 + i as u64 * 24 + 16)?
                }
            });
        }
        Ok(out)
    }

    /// Writes the dirtier for `layout` into low guest RAM: GDT, code, page tables, and a zero
    /// pass counter and stop word.
    pub(crate) fn write_dirtier(table: &SlotTable, layout: &DirtierLayout) -> Result<()> {
        let tables = layout.tables()?;
        write_program(table, image::dirtier(), &tables)?;
        write_guest(table, DirtierLayout::PASSES_GPA, &0u64.to_le_bytes())?;
        write_guest(table, DirtierLayout::STOP_GPA, &0u64.to_le_bytes())
    }

    /// Writes the dirtier for `layout` into guest RAM and puts the vCPU at its first
    /// instruction, ready for KVM_RUN.
    pub(crate) fn prepare_dirtier(
        vcpu: &mut VcpuFd,
        table: &Arc<Mutex<SlotTable>>,
        layout: &DirtierLayout,
    ) -> Result<()> {
        write_dirtier(&lock(table), layout)?;
        settle(vcpu)?;
        enter_long_mode(vcpu, |regs| {
            regs.rdi = layout.start;
            regs.rsi = layout.end;
        })
    }

    /// Writes the dirtier for `layout` and runs it on the calling thread until the host sets
    /// the stop word ([`DirtierLayout::STOP_GPA`]) and the guest halts at the end of that pass.
    ///
    /// As with [`run_ops`], the slot table is not locked while the guest runs, so another
    /// thread can read the heartbeat, sync the dirty log or set the stop word meanwhile.
    pub(crate) fn run_dirtier(
        vcpu: &mut VcpuFd,
        table: &Arc<Mutex<SlotTable>>,
        layout: &DirtierLayout,
    ) -> Result<DirtierStop> {
        prepare_dirtier(vcpu, table, layout)?;
        let where_ = |vcpu: &VcpuFd| match vcpu.get_regs() {
            Ok(r) => format!("rip=0x{:x}, dirtier at 0x{:x}", r.rip, r.rax),
            Err(_) => "registers unavailable".to_string(),
        };
        run_until_done(vcpu, &where_)?;
        let regs = vcpu
            .get_regs()
            .map_err(|e| kvm_err("KVM_GET_REGS failed", e))?;
        let passes = read_guest_u64(&lock(table), DirtierLayout::PASSES_GPA)?;
        Ok(DirtierStop { passes, regs })
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod vcpu {
    //! The test guest is x86-64 code: other hosts have the pure parts only.

    use kvm_ioctls::{Kvm, VcpuFd};

    use super::*;

    fn x86_only() -> Error {
        Error::new(
            HmErrorClass::Kvm,
            "the KVM guest payload exists on x86-64 hosts only",
        )
    }

    pub(crate) fn setup_vcpu(_: &Kvm, _: &VcpuFd) -> Result<()> {
        Err(x86_only())
    }

    pub(crate) fn prepare_dirtier(
        _: &mut VcpuFd,
        _: &Arc<Mutex<SlotTable>>,
        _: &DirtierLayout,
    ) -> Result<()> {
        Err(x86_only())
    }

    pub(crate) fn run_ops(
        _: &mut VcpuFd,
        _: &Arc<Mutex<SlotTable>>,
        _: &[GuestOp],
    ) -> Result<Vec<u64>> {
        Err(x86_only())
    }

    pub(crate) fn run_dirtier(
        _: &mut VcpuFd,
        _: &Arc<Mutex<SlotTable>>,
        _: &DirtierLayout,
    ) -> Result<DirtierStop> {
        Err(x86_only())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tail each program ends with: `mov edx, DONE_PORT; mov al, DONE_VALUE; out dx, al;
    /// hlt; jmp <the hlt>`. Built from the Rust constants, so it also fails if the assembler
    /// got other values.
    fn done_tail() -> Vec<u8> {
        let mut t = vec![0xba];
        t.extend(u32::from(DONE_PORT).to_le_bytes());
        t.extend([0xb0, DONE_VALUE, 0xee, 0xf4, 0xeb, 0xfd]);
        t
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_ops_program_is_assembled_with_the_rust_constants_and_ends_by_reporting_and_halting() {
        let c = vcpu::image::ops();
        // The hand-encoded program was 0x64 bytes with a 10-byte imm64 the host patched; the
        // assembled one takes rsi from the host instead.
        assert!((0x40..0x100).contains(&c.len()), "{} bytes", c.len());
        assert!(c.len() as u64 <= TABLES_ADDR - CODE_ADDR);
        // Starts with `mov rcx, [rsi]`: the op count from the list the host points rsi at.
        assert_eq!(&c[..3], &[0x48, 0x8b, 0x0e]);
        assert!(c.ends_with(&done_tail()), "{c:02x?}");
        // `mov r8d, WAIT_SPIN_LIMIT`.
        let mut spin = vec![0x41, 0xb8];
        spin.extend(abi::WAIT_SPIN_LIMIT.to_le_bytes());
        assert!(contains(c, &spin), "{c:02x?}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_dirtier_is_assembled_with_the_rust_mailbox_and_ends_by_reporting_and_halting() {
        let c = vcpu::image::dirtier();
        assert!((0x30..0x100).contains(&c.len()), "{} bytes", c.len());
        assert!(c.ends_with(&done_tail()), "{c:02x?}");
        // `inc qword [PASSES_GPA]` and `cmp qword [STOP_GPA], 0`, absolute 32-bit addresses.
        let mut inc = vec![0x48, 0xff, 0x04, 0x25];
        inc.extend((DirtierLayout::PASSES_GPA as u32).to_le_bytes());
        assert!(contains(c, &inc), "{c:02x?}");
        let mut cmp = vec![0x48, 0x83, 0x3c, 0x25];
        cmp.extend((DirtierLayout::STOP_GPA as u32).to_le_bytes());
        cmp.push(0);
        assert!(contains(c, &cmp), "{c:02x?}");
        // `mov byte [rax], 0` then `inc byte [rax]`, each followed by `add rax, 4096`.
        assert!(contains(
            c,
            &[0xc6, 0x00, 0x00, 0x48, 0x05, 0x00, 0x10, 0x00, 0x00]
        ));
        assert!(contains(
            c,
            &[0xfe, 0x00, 0x48, 0x05, 0x00, 0x10, 0x00, 0x00]
        ));
    }

    fn entry(tables: &[u8], addr: u64, index: u64) -> u64 {
        let at = (addr - TABLES_ADDR + index * 8) as usize;
        u64::from_le_bytes(tables[at..at + 8].try_into().unwrap())
    }

    /// The leaf entry the tables give for `gpa` (0 if the PDPT or PD is missing).
    fn walk(tables: &[u8], gpa: u64) -> u64 {
        let pml4e = entry(tables, TABLES_ADDR, (gpa >> 39) & 511);
        if pml4e == 0 {
            return 0;
        }
        let pdpte = entry(tables, pml4e & !0xfff, (gpa >> 30) & 511);
        if pdpte == 0 {
            return 0;
        }
        entry(tables, pdpte & !0xfff, (gpa >> 21) & 511)
    }

    #[test]
    fn page_tables_identity_map_the_touched_2m_pages_only() {
        let ops = [
            GuestOp::Write {
                gpa: (8 << 40) - 8,
                value: 1,
            },
            GuestOp::Read { gpa: (8 << 40) + 8 },
        ];
        let p = Payload::build(&ops).unwrap();
        // PML4 + PDPT(0) + PD(0) + PDPT(15) + PD(15,511) + PDPT(16) + PD(16,0).
        assert_eq!(p.tables.len(), 7 * 4096);
        assert_eq!(p.ops_addr, TABLES_ADDR + 7 * 4096);
        assert_eq!(walk(&p.tables, (8 << 40) - 8), ((8 << 40) - PAGE_2M) | 0xe3);
        assert_eq!(walk(&p.tables, (8 << 40) + 8), (8 << 40) | 0xe3);
        assert_eq!(walk(&p.tables, 0x1000), 0xe3);
        // Op list: count, then kind/gpa/value triples.
        assert_eq!(&p.ops[..8], &2u64.to_le_bytes());
        assert_eq!(&p.ops[8..16], &0u64.to_le_bytes());
        assert_eq!(&p.ops[16..24], &((8u64 << 40) - 8).to_le_bytes());
        assert_eq!(&p.ops[32..40], &1u64.to_le_bytes());
    }

    #[test]
    fn unreachable_or_unaligned_addresses_are_refused() {
        assert!(Payload::build(&[GuestOp::Read { gpa: 4 }]).is_err());
        assert!(Payload::build(&[GuestOp::Read { gpa: 1 << 47 }]).is_err());
    }

    #[test]
    fn too_many_ops_for_low_ram_is_an_error_not_an_overwrite() {
        let ops: Vec<GuestOp> = (0..30_000).map(|i| GuestOp::Read { gpa: i * 8 }).collect();
        let e = Payload::build(&ops).unwrap_err();
        assert!(e.message().contains("needs guest RAM up to"), "{e}");
    }

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn dirtier_tables_map_every_2m_page_of_the_range_and_low_ram() {
        let layout = DirtierLayout {
            start: MIB,
            end: 100 * MIB,
        };
        assert_eq!(layout.pages(), 99 * 256);
        assert_eq!(layout.page_gpa(1), MIB + 4096);
        let t = layout.tables().unwrap();
        assert_eq!(t.len(), 3 * 4096, "PML4, PDPT, PD");
        for page in 0..50 {
            assert_eq!(walk(&t, page * PAGE_2M), (page * PAGE_2M) | 0xe3, "{page}");
        }
        assert_eq!(walk(&t, 100 * MIB), 0, "nothing beyond the range");

        // Across a 1 GiB line, away from low RAM: one PD for low RAM and one per GiB touched.
        let layout = DirtierLayout {
            start: 3 * GIB - 4096,
            end: 3 * GIB + 4096,
        };
        let t = layout.tables().unwrap();
        assert_eq!(t.len(), 5 * 4096);
        assert_eq!(walk(&t, 3 * GIB - 4096), (3 * GIB - PAGE_2M) | 0xe3);
        assert_eq!(walk(&t, 3 * GIB), (3 * GIB) | 0xe3);
        assert_eq!(walk(&t, 0x600), 0xe3);
        assert_eq!(walk(&t, 2 * GIB), 0);
    }

    #[test]
    fn dirtier_ranges_it_cannot_run_are_refused() {
        let refused = |start, end| {
            DirtierLayout { start, end }
                .tables()
                .unwrap_err()
                .message()
                .to_string()
        };
        assert!(refused(MIB + 8, 2 * MIB).contains("4 KiB aligned"));
        assert!(refused(MIB, MIB).contains("empty"));
        assert!(refused(2 * MIB, MIB).contains("empty"));
        assert!(refused(MIB, MAX_GPA + 4096).contains("no address above"));
        // Over the program's own tables (0x2000..0x5000 for a range in the first GiB).
        assert!(refused(0x4000, MIB).contains("at or above 0x5000"));
        assert!(DirtierLayout {
            start: 0x5000,
            end: MIB
        }
        .tables()
        .is_ok());
        // One PD per GiB: ~150 GiB fit below the VGA hole, 1 TiB does not.
        assert!(refused(MIB, 1 << 40).contains("would not fit below 0xa0000"));
        assert!(DirtierLayout {
            start: MIB,
            end: 100 * GIB
        }
        .tables()
        .is_ok());
    }

    fn check(bytes: &[u8]) -> PageCheck {
        check_dirtied_pages(bytes.len() as u64, |i| bytes[i as usize])
    }

    #[test]
    fn pages_all_equal_are_consistent_with_no_edge() {
        let c = check(&[7; 64]);
        assert_eq!((c.pages, c.bad, c.edge), (64, 0, None));
        assert!(c.is_consistent() && c.offenders.is_empty());
        assert!(check(&[]).is_consistent());
        assert!(check(&[3]).is_consistent());
    }

    #[test]
    fn one_step_down_by_one_is_the_edge_where_the_guest_stopped() {
        let c = check(&[8, 8, 8, 7, 7]);
        assert_eq!((c.bad, c.edge), (0, Some(3)));
        // At the last page, too: the guest stopped before incrementing it.
        assert_eq!(check(&[8, 8, 8, 8, 7]).edge, Some(4));
    }

    #[test]
    fn the_edge_may_be_the_wrap_from_0x00_to_0xff() {
        let c = check(&[0x00, 0x00, 0xff, 0xff]);
        assert_eq!((c.bad, c.edge), (0, Some(2)));
    }

    #[test]
    fn two_edges_are_one_bad_page() {
        let c = check(&[6, 6, 5, 5, 4, 4]);
        assert_eq!((c.bad, c.edge), (1, Some(2)));
        assert_eq!(
            c.offenders,
            vec![BadPage {
                page: 4,
                previous: 5,
                found: 4
            }]
        );
        assert!(!c.is_consistent());
    }

    #[test]
    fn a_page_that_lost_its_increment_is_bad() {
        // The lost page looks like an edge, the step back up after it cannot be one.
        let c = check(&[5, 5, 5, 4, 5, 5]);
        assert_eq!(c.bad, 1);
        assert_eq!(
            c.offenders,
            vec![BadPage {
                page: 4,
                previous: 4,
                found: 5
            }]
        );
        // At the first page there is no edge to hide behind.
        assert_eq!(check(&[4, 5, 5, 5]).bad, 1);
        // A page stale by more than one increment breaks the rule on both sides.
        assert_eq!(check(&[9, 9, 3, 9, 9]).bad, 2);
        // A step up by one is no edge (the guest only ever moves upwards in value).
        assert_eq!(check(&[5, 5, 6, 6]).bad, 1);
    }

    #[test]
    fn offenders_stop_at_a_few_while_bad_counts_them_all() {
        let bytes: Vec<u8> = (0..100u32).map(|i| (i * 3) as u8).collect();
        let c = check(&bytes);
        assert_eq!(c.bad, 99);
        assert_eq!(c.offenders.len(), PageCheck::MAX_OFFENDERS);
        assert_eq!(c.offenders[0].page, 1);
    }
}
