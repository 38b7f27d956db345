//! A tiny x86-64 guest that proves the memslots: it runs a list of 8-byte writes and reads at
//! guest-physical addresses, then signals completion on an I/O port and halts. The host checks
//! the results through its own pointers, so a slot at the wrong GPA, HVA or size shows up as a
//! value in the wrong place (or as an MMIO exit where RAM should be).
//!
//! The vCPU starts directly in 64-bit long mode: the host writes a GDT, page tables and the code
//! into low guest RAM before the run. Page tables identity-map only the 2 MiB pages the run
//! touches, which keeps them small even for a 9 TiB guest (1 GiB pages would be simpler, but
//! not every KVM offers them to guests).
//!
//! Low guest RAM used during a run (must be RAM with a slot, below the 640 KiB VGA hole):
//! `0x500` GDT, `0x1000` code, `0x2000..` page tables, then the op list.

use kvm_bindings::{kvm_segment, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use crate::error::{Error, HmErrorClass, Result};

use std::sync::{Arc, Mutex};

use super::table::lock;
use super::table::SlotTable;

pub(crate) const GDT_ADDR: u64 = 0x500;
pub(crate) const CODE_ADDR: u64 = 0x1000;
pub(crate) const TABLES_ADDR: u64 = 0x2000;
/// The payload must end below the legacy VGA hole of PC layouts.
pub(crate) const PAYLOAD_LIMIT: u64 = 0xa_0000;
/// The port the guest writes [`DONE_VALUE`] to when every op ran.
pub(crate) const DONE_PORT: u16 = 0x510;
pub(crate) const DONE_VALUE: u8 = 0x48;
/// Identity mapping stays in the lower canonical half.
const MAX_GPA: u64 = 1 << 47;
const PAGE_2M: u64 = 2 << 20;
/// Present, writable, accessed. Accessed (and dirty, for leaves) are set up front so that the
/// CPU never writes the tables: the only guest writes are the ops', which the dirty-log tests
/// count exactly.
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

/// How long a [`GuestOp::WaitWhile`] spins at most (iterations of a load, a compare and a
/// `pause`: seconds, not minutes), so a host that never answers cannot hang the run.
pub(crate) const WAIT_SPIN_LIMIT: u32 = 0x1000_0000;

/// The guest code. Register use: rsi walks the op list, rcx counts the ops left, rdi is the
/// op's address, rax its kind and then its value, r8d the spin budget of a wait. An op is three
/// u64s: kind (0 write, 1 read, 2 wait while equal), gpa, value; a read stores what it found
/// into the value field.
fn code(ops_addr: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(0x64);
    // 0x00  mov rsi, imm64          REX.W B8+rsi
    c.extend([0x48, 0xbe]);
    c.extend(ops_addr.to_le_bytes());
    // 0x0a  mov rcx, [rsi]          op count
    c.extend([0x48, 0x8b, 0x0e]);
    // 0x0d  add rsi, 8              first op
    c.extend([0x48, 0x83, 0xc6, 0x08]);
    // 0x11 loop: test rcx, rcx
    c.extend([0x48, 0x85, 0xc9]);
    // 0x14  jz done (0x59)          rel8 = 0x59 - 0x16
    c.extend([0x74, 0x43]);
    // 0x16  mov rax, [rsi]          kind
    c.extend([0x48, 0x8b, 0x06]);
    // 0x19  mov rdi, [rsi+8]        gpa
    c.extend([0x48, 0x8b, 0x7e, 0x08]);
    // 0x1d  test rax, rax
    c.extend([0x48, 0x85, 0xc0]);
    // 0x20  jz write (0x40)         rel8 = 0x40 - 0x22
    c.extend([0x74, 0x1e]);
    // 0x22  cmp rax, 1
    c.extend([0x48, 0x83, 0xf8, 0x01]);
    // 0x26  je read (0x49)          rel8 = 0x49 - 0x28
    c.extend([0x74, 0x21]);
    // 0x28 wait: mov r8d, WAIT_SPIN_LIMIT
    c.extend([0x41, 0xb8]);
    c.extend(WAIT_SPIN_LIMIT.to_le_bytes());
    // 0x2e spin: mov rax, [rdi]     read the watched word (a read: nothing gets dirty)
    c.extend([0x48, 0x8b, 0x07]);
    // 0x31  cmp rax, [rsi+16]
    c.extend([0x48, 0x3b, 0x46, 0x10]);
    // 0x35  jne next (0x50)         rel8 = 0x50 - 0x37
    c.extend([0x75, 0x19]);
    // 0x37  pause
    c.extend([0xf3, 0x90]);
    // 0x39  dec r8d
    c.extend([0x41, 0xff, 0xc8]);
    // 0x3c  jnz spin (0x2e)         rel8 = 0x2e - 0x3e
    c.extend([0x75, 0xf0]);
    // 0x3e  jmp next (0x50)         budget spent: go on
    c.extend([0xeb, 0x10]);
    // 0x40 write: mov rax, [rsi+16] value
    c.extend([0x48, 0x8b, 0x46, 0x10]);
    // 0x44  mov [rdi], rax          the write
    c.extend([0x48, 0x89, 0x07]);
    // 0x47  jmp next (0x50)         rel8 = 0x50 - 0x49
    c.extend([0xeb, 0x07]);
    // 0x49 read: mov rax, [rdi]     the read
    c.extend([0x48, 0x8b, 0x07]);
    // 0x4c  mov [rsi+16], rax       result into the op
    c.extend([0x48, 0x89, 0x46, 0x10]);
    // 0x50 next: add rsi, 24
    c.extend([0x48, 0x83, 0xc6, 0x18]);
    // 0x54  dec rcx
    c.extend([0x48, 0xff, 0xc9]);
    // 0x57  jmp loop (0x11)         rel8 = 0x11 - 0x59
    c.extend([0xeb, 0xb8]);
    // 0x59 done: mov edx, DONE_PORT
    c.push(0xba);
    c.extend(u32::from(DONE_PORT).to_le_bytes());
    // 0x5e  mov al, DONE_VALUE
    c.extend([0xb0, DONE_VALUE]);
    // 0x60  out dx, al              PIO exit: "all ops ran"
    c.push(0xee);
    // 0x61  hlt                     HLT exit: the host stops the run
    c.push(0xf4);
    // 0x62  jmp 0x61                halt again if ever woken
    c.extend([0xeb, 0xfd]);
    c
}

/// GDT: null, 64-bit code (selector 0x8), data (selector 0x10). The vCPU gets the same
/// descriptors through its segment registers; the table is there so a reload would agree.
const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// The bytes the host writes into low guest RAM for one run, and where the op list is.
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
        // Page tables: PML4, then one PDPT per 512 GiB and one PD per 1 GiB touched.
        let mut pages: Vec<u64> = ops.iter().map(|o| o.gpa() / PAGE_2M).collect();
        pages.push(0);
        pages.sort_unstable();
        pages.dedup();
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
        let table_bytes: Vec<u8> = tables
            .iter()
            .flat_map(|t| t.iter().flat_map(|e| e.to_le_bytes()))
            .collect();
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
        // host_ptr), which stays mapped while the table lock is held; the vCPU is not running.
        unsafe { std::ptr::copy_nonoverlapping(bytes[done..].as_ptr(), dst, room) };
        done += room;
    }
    Ok(())
}

fn read_guest_u64(table: &SlotTable, gpa: u64) -> Result<u64> {
    let p = host_ptr(table, gpa, 8)?;
    // SAFETY: 8 bytes inside a registered slot's host memory (see write_guest); unaligned reads
    // are allowed by read_unaligned.
    Ok(unsafe { std::ptr::read_unaligned(p as *const u64) })
}

/// Prepares a new vCPU for the payload: the CPUID KVM supports (long mode needs it).
pub(crate) fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd) -> Result<()> {
    let kvm_err = |what: &str, e: kvm_ioctls::Error| {
        Error::host(what.to_string(), e.errno()).with_class(HmErrorClass::Kvm)
    };
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| kvm_err("KVM_GET_SUPPORTED_CPUID failed", e))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| kvm_err("KVM_SET_CPUID2 failed", e))
}

fn enter_long_mode(vcpu: &VcpuFd) -> Result<()> {
    let kvm_err = |what: &str, e: kvm_ioctls::Error| {
        Error::host(what, e.errno()).with_class(HmErrorClass::Kvm)
    };
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
    vcpu.set_regs(&regs)
        .map_err(|e| kvm_err("KVM_SET_REGS failed", e))
}

/// Lets KVM finish whatever the previous run left pending (an MMIO access we refused to
/// serve, a port write) without running guest code: KVM completes pending I/O at the start of
/// KVM_RUN, after any registers we set, so it must happen before the new registers go in.
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

/// Runs `ops` on the vCPU and returns, for each op, the value it wrote or read.
///
/// The slot table is locked only to place the payload and to read the results, not while the
/// vCPU runs: the host may change the layout or switch dirty logging meanwhile.
pub(crate) fn run_ops(
    vcpu: &mut VcpuFd,
    table: &Arc<Mutex<SlotTable>>,
    ops: &[GuestOp],
) -> Result<Vec<u64>> {
    let payload = Payload::build(ops)?;
    {
        let t = lock(table);
        let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
        write_guest(&t, GDT_ADDR, &gdt)?;
        write_guest(&t, CODE_ADDR, &code(payload.ops_addr))?;
        write_guest(&t, TABLES_ADDR, &payload.tables)?;
        write_guest(&t, payload.ops_addr, &payload.ops)?;
    }
    settle(vcpu)?;
    enter_long_mode(vcpu)?;

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
    let fail = |msg: String| Error::new(HmErrorClass::Kvm, msg);
    let mut signalled = false;
    // The code makes exactly one PIO and one HLT exit; anything beyond a few is a bug.
    for _ in 0..64 {
        let exit = vcpu.run();
        match exit {
            Ok(VcpuExit::IoOut(port, data)) if port == DONE_PORT && data == [DONE_VALUE] => {
                signalled = true;
            }
            Ok(VcpuExit::Hlt) if signalled => {
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
                return Ok(out);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_jumps_land_on_their_labels() {
        let c = code(0x1234_5678);
        assert_eq!(&c[2..10], &0x1234_5678u64.to_le_bytes());
        let target = |at: usize| (at as i64 + 2 + i64::from(c[at + 1] as i8)) as usize;
        // jz done -> `mov edx, DONE_PORT`.
        assert_eq!((c[0x14], c[target(0x14)]), (0x74, 0xba));
        assert_eq!(target(0x14), 0x59);
        // jz write -> `mov rax, [rsi+16]`; je read -> `mov rax, [rdi]`.
        assert_eq!(
            &c[target(0x20)..target(0x20) + 4],
            &[0x48, 0x8b, 0x46, 0x10]
        );
        assert_eq!(&c[target(0x26)..target(0x26) + 3], &[0x48, 0x8b, 0x07]);
        assert_eq!(target(0x26), 0x49);
        // The spin loop goes back to its load; its exits and the op ends go to `add rsi, 24`.
        assert_eq!(target(0x3c), 0x2e);
        for at in [0x35, 0x3e, 0x47] {
            assert_eq!(
                &c[target(at)..target(at) + 4],
                &[0x48, 0x83, 0xc6, 0x18],
                "{at:#x}"
            );
        }
        // jmp loop -> `test rcx, rcx`.
        assert_eq!(target(0x57), 0x11);
        assert_eq!(&c[0x11..0x14], &[0x48, 0x85, 0xc9]);
        assert_eq!(&c[0x2a..0x2e], &WAIT_SPIN_LIMIT.to_le_bytes());
        assert_eq!(&c[0x60..], &[0xee, 0xf4, 0xeb, 0xfd]);
    }

    fn entry(tables: &[u8], addr: u64, index: u64) -> u64 {
        let at = (addr - TABLES_ADDR + index * 8) as usize;
        u64::from_le_bytes(tables[at..at + 8].try_into().unwrap())
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
        let walk = |gpa: u64| {
            let pdpt = entry(&p.tables, TABLES_ADDR, (gpa >> 39) & 511) & !0xfff;
            let pd = entry(&p.tables, pdpt, (gpa >> 30) & 511) & !0xfff;
            entry(&p.tables, pd, (gpa >> 21) & 511)
        };
        assert_eq!(walk((8 << 40) - 8), ((8 << 40) - PAGE_2M) | 0xe3);
        assert_eq!(walk((8 << 40) + 8), (8 << 40) | 0xe3);
        assert_eq!(walk(0x1000), 0xe3);
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
