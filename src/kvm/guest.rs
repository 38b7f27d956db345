//! hostmem's x86-64 test guest: a small program that a vCPU of the VM runs to prove, from the
//! guest's side, what the memslots map.
//!
//! - The **ops program** (`guest/ops.S`) runs a list of 8-byte writes, reads and waits at
//!   guest-physical addresses, then signals completion on an I/O port and halts. The host
//!   checks the results through its own pointers, so a slot at the wrong GPA, HVA or size shows
//!   up as a value in the wrong place (or as an MMIO exit where RAM should be). The guest check
//!   of [`super::KvmHandle`] is built on it.
//!
//! build.rs assembles it (cc) into a read-only data section of the library; the host copies the
//! bytes into guest RAM. It is position-independent and takes its argument in a register the
//! host sets with KVM_SET_REGS, so the bytes are a constant. What it shares with this file
//! (done port, spin limit) is written once, in `guest/abi.rs`, which build.rs hands to the
//! assembler as `-D` defines. Only x86-64 builds carry the program; elsewhere the vCPU entry
//! points return an error.
//!
//! The vCPU starts directly in 64-bit long mode: the host writes a GDT, page tables and the code
//! into low guest RAM before the run. Page tables identity-map only the 2 MiB pages the run
//! touches, which keeps them small even for a 9 TiB guest (1 GiB pages would be simpler, but
//! not every KVM offers them to guests).
//!
//! Low guest RAM a run uses (must be RAM with a slot, below the 640 KiB VGA hole):
//!
//! | GPA        | ops program               |
//! |------------|---------------------------|
//! | `0x500`    | GDT                       |
//! | `0x1000`   | code                      |
//! | `0x2000..` | page tables, then op list |

// Other hosts build the payload layout but never load the program, so what only feeds the
// x86-64 vCPU code is unused there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

mod abi;

use crate::error::{Error, HmErrorClass, Result};

use std::sync::{Arc, Mutex};

use super::table::SlotTable;

pub(crate) use vcpu::{create_vcpu, run_ops};

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
/// Present, writable, accessed. Accessed (and dirty, for leaves) are set up front so that the
/// CPU never writes the tables: the only guest writes are the program's, which the dirty-log
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
    tables
        .iter()
        .flat_map(|t| t.iter().flat_map(|e| e.to_le_bytes()))
        .collect()
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

#[cfg(target_arch = "x86_64")]
mod vcpu {
    //! What needs an x86-64 vCPU: the assembled program, placing it in guest RAM, long mode and
    //! the run loop.

    use kvm_bindings::{kvm_regs, kvm_segment, KVM_MAX_CPUID_ENTRIES};
    use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

    use super::super::listener::lock;
    use super::*;

    /// The assembled program (build.rs), as bytes to copy into guest RAM.
    pub(super) mod image {
        extern "C" {
            // Zero-sized on the Rust side: only their addresses are used. The bytes between a
            // start and its end belong to the assembled object, not to these declarations.
            static hm_guest_ops_start: [u8; 0];
            static hm_guest_ops_end: [u8; 0];
        }

        fn between(start: *const [u8; 0], end: *const [u8; 0]) -> &'static [u8] {
            let (start, end) = (start.addr(), end.addr());
            assert!(start <= end, "guest program labels out of order");
            // SAFETY: ops.S defines each start/end pair around one program in one read-only
            // section of one object, end after start (checked above); the linker keeps such a
            // section whole and in order, so the bytes between are initialised and immutable
            // for the life of the process. Rust declares the labels zero-sized, so
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
    }

    /// Host pointer for `len` bytes at `gpa`, which must lie in one slot.
    fn host_ptr(table: &SlotTable, gpa: u64, len: u64) -> Result<*mut u8> {
        match table.lookup(gpa) {
            Some(s) if gpa - s.gpa + len <= s.size => Ok((s.hva + (gpa - s.gpa)) as *mut u8),
            _ => Err(Error::new(
                HmErrorClass::Kvm,
                format!(
                    "guest payload needs RAM with a memslot at 0x{gpa:x}-0x{:x}",
                    gpa + len - 1
                ),
            )),
        }
    }

    fn write_guest(table: &SlotTable, gpa: u64, bytes: &[u8]) -> Result<()> {
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
            let dst = host_ptr(table, at, room as u64)?;
            // SAFETY: `dst..dst+room` lies inside a registered slot's host memory (checked by
            // host_ptr), which stays mapped while the table lock is held; the vCPU is not
            // running.
            unsafe { std::ptr::copy_nonoverlapping(bytes[done..].as_ptr(), dst, room) };
            done += room;
        }
        Ok(())
    }

    fn read_guest_u64(table: &SlotTable, gpa: u64) -> Result<u64> {
        let p = host_ptr(table, gpa, 8)?;
        // SAFETY: 8 bytes inside a registered slot's host memory (see write_guest); unaligned
        // reads are allowed by read_unaligned.
        Ok(unsafe { std::ptr::read_unaligned(p as *const u64) })
    }

    /// Writes what every run needs: the GDT, a program's code and its page tables.
    fn write_program(table: &SlotTable, code: &[u8], tables: &[u8]) -> Result<()> {
        debug_assert!(code.len() as u64 <= TABLES_ADDR - CODE_ADDR);
        let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
        write_guest(table, GDT_ADDR, &gdt)?;
        write_guest(table, CODE_ADDR, code)?;
        write_guest(table, TABLES_ADDR, tables)
    }

    /// Creates the vCPU the payload runs on, with the CPUID KVM supports (long mode needs it).
    pub(crate) fn create_vcpu(kvm: &Kvm, vm: &VmFd) -> Result<VcpuFd> {
        let kvm_err = |what: &str, e: kvm_ioctls::Error| {
            Error::host(what.to_string(), e.errno()).with_class(HmErrorClass::Kvm)
        };
        // The highest id KVM allows: a VMM that drives its own vCPUs on this VM numbers them
        // from 0, so the payload's vCPU stays out of their way.
        let id = kvm.get_max_vcpu_id().saturating_sub(1) as u64;
        let vcpu = vm
            .create_vcpu(id)
            .map_err(|e| kvm_err(&format!("kvm_init_vcpu: creating vCPU {id} failed"), e))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| kvm_err("KVM_GET_SUPPORTED_CPUID failed", e))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| kvm_err("KVM_SET_CPUID2 failed", e))?;
        Ok(vcpu)
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
}

#[cfg(not(target_arch = "x86_64"))]
mod vcpu {
    //! The test guest is x86-64 code: other hosts have the pure parts only.

    use kvm_ioctls::{Kvm, VcpuFd, VmFd};

    use super::*;

    fn x86_only() -> Error {
        Error::new(
            HmErrorClass::Kvm,
            "the KVM guest payload exists on x86-64 hosts only",
        )
    }

    pub(crate) fn create_vcpu(_: &Kvm, _: &VmFd) -> Result<VcpuFd> {
        Err(x86_only())
    }

    pub(crate) fn run_ops(
        _: &mut VcpuFd,
        _: &Arc<Mutex<SlotTable>>,
        _: &[GuestOp],
    ) -> Result<Vec<u64>> {
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
}
