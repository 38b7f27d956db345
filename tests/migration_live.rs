//! Live precopy on KVM, machine to machine in one process: the dirtier guest keeps writing
//! byte 0 of every page of 64 MiB while the source sends, with a bandwidth limit low enough for
//! several dirty passes; the destination resumes the guest from the migrated registers and RAM,
//! and passes QEMU's invariant (every page equal, or one step down once); the guest goes on
//! incrementing there. Cancelled mid-way, the source guest runs on and passes it too.

mod kvm_support;

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostmem::kvm::KvmAccel;
use hostmem::machine::GuestControl;
use hostmem::migration::error::MigrationError;
use hostmem::migration::section::{SectionHandler, SectionPhase, StreamRead};
use hostmem::migration::state::MigrationStatus;
use hostmem::migration::{QemuReader, QemuWriter};
use hostmem::registry::migrate::{self, IncomingChannel, OutgoingChannel, PendingOutgoing};
use hostmem::registry::{self, hmp, transports::HostTransports, MachineId};
use hostmem::testing::guest::{check_dirtied_pages, DirtierLayout};
use hostmem::testing::machines::none_machine;
use hostmem::testing::runner::DirtierRunner;
use hostmem::Result;
use kvm_support::*;

const LAYOUT: DirtierLayout = DirtierLayout {
    start: MIB,
    end: 65 * MIB,
};

/// The VMM side of a machine running the dirtier: its vCPU, its vCPU section, its hooks.
#[derive(Default)]
struct Vmm {
    runner: Mutex<Option<DirtierRunner>>,
    /// Registers loaded from the stream, for the resume that starts the destination.
    loaded: Mutex<Option<Vec<u8>>>,
    kvm: Mutex<Option<KvmAccel>>,
}

impl GuestControl for Vmm {
    fn stop(&self) -> Result<()> {
        match &*self.runner.lock().unwrap() {
            Some(r) => r.pause(),
            None => Ok(()),
        }
    }
    fn resume(&self) -> Result<()> {
        let mut runner = self.runner.lock().unwrap();
        if runner.is_none() {
            let state = self.loaded.lock().unwrap().take();
            let kvm = self.kvm.lock().unwrap().clone().unwrap();
            *runner = Some(match state {
                Some(s) => DirtierRunner::resume_from(&kvm, &s)?,
                None => DirtierRunner::start(&kvm, &LAYOUT)?,
            });
        }
        runner.as_ref().unwrap().resume()
    }
}

/// The vCPU's registers as a device section.
struct VcpuSection(Arc<Vmm>);

impl SectionHandler for VcpuSection {
    fn idstr(&self) -> &str {
        "x-hm-vcpu"
    }
    fn instance_id(&self) -> u32 {
        0
    }
    fn version_id(&self) -> u32 {
        1
    }
    fn save(
        &mut self,
        _: SectionPhase,
        out: &mut QemuWriter<dyn std::io::Write + '_>,
    ) -> std::result::Result<(), MigrationError> {
        let state = self
            .0
            .runner
            .lock()
            .unwrap()
            .as_ref()
            .map(|r| r.save_state())
            .transpose()
            .map_err(MigrationError::Callback)?
            .unwrap_or_default();
        out.put_be32(state.len() as u32)?;
        out.put_buffer(&state)
    }
    fn load(
        &mut self,
        _: SectionPhase,
        _: u32,
        input: &mut QemuReader<dyn StreamRead + '_>,
    ) -> std::result::Result<(), MigrationError> {
        let n = input.get_be32("x-hm-vcpu length")? as usize;
        let mut state = vec![0; n];
        input.read_exact(&mut state, "x-hm-vcpu state")?;
        *self.0.loaded.lock().unwrap() = Some(state);
        Ok(())
    }
}

fn machine(args: &[&str]) -> (MachineId, Arc<Vmm>) {
    let id = none_machine(args).unwrap();
    let vmm = Arc::new(Vmm::default());
    registry::with(id, |m| {
        m.run_mut().control = vmm.clone();
        m.register_section(Box::new(VcpuSection(vmm.clone())))
    })
    .unwrap();
    *vmm.kvm.lock().unwrap() = registry::with(id, |m| Ok(m.kvm().cloned())).unwrap();
    (id, vmm)
}

fn ram_u8(id: MachineId, gpa: u64) -> u8 {
    registry::with(id, |m| {
        let ram = m.config().unwrap().ram.unwrap();
        let p = m.memory().ram_ptr(ram)?.unwrap();
        // SAFETY: inside the machine's RAM; a running guest may write it concurrently, hence
        // the volatile read.
        Ok(unsafe { std::ptr::read_volatile(p.add(gpa as usize)) })
    })
    .unwrap()
}

fn passes(id: MachineId) -> u64 {
    let b: Vec<u8> = (0..8)
        .map(|i| ram_u8(id, DirtierLayout::PASSES_GPA + i))
        .collect();
    u64::from_le_bytes(b.try_into().unwrap())
}

fn wait_passes(id: MachineId, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while passes(id) < at_least {
        assert!(Instant::now() < deadline, "the guest made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn check(id: MachineId) {
    let c = check_dirtied_pages(LAYOUT.pages(), |i| ram_u8(id, LAYOUT.page_gpa(i)));
    assert!(c.is_consistent(), "{c:?}");
}

fn socket_channel() -> (PendingOutgoing, IncomingChannel) {
    let (a, b) = UnixStream::pair().unwrap();
    let shut = a.try_clone().unwrap();
    (
        PendingOutgoing::connected(
            OutgoingChannel {
                writer: Box::new(a),
                finish: Box::new(|| Ok(())),
            },
            Box::new(move || {
                let _ = shut.shutdown(std::net::Shutdown::Both);
            }),
        ),
        IncomingChannel::Stream(Box::new(b)),
    )
}

#[test]
fn a_running_guest_migrates_live_and_runs_on_at_the_destination() {
    if !kvm_usable() {
        return;
    }
    let (src, src_vmm) = machine(&["-m", "96M", "-accel", "kvm"]);
    src_vmm.resume().unwrap();
    wait_passes(src, 2);
    // 64 MiB of dirtied pages at 64 MiB/s: each pass over them takes about a second, during
    // which the guest dirties them all again, so the rounds only end at the round limit.
    hmp::hmp(
        src,
        "migrate_set_parameter max-bandwidth 64M",
        &HostTransports,
    )
    .unwrap();
    let (out, inc) = socket_channel();
    let (dst, dst_vmm) = machine(&["-m", "96M", "-accel", "kvm", "-incoming", "defer"]);
    let incoming = migrate::start_incoming(dst, inc).unwrap();
    let progress = migrate::start_outgoing(src, out, 3).unwrap();
    let done = progress.wait();
    assert_eq!(done.status, MigrationStatus::Completed, "{:?}", done.error);
    assert_eq!(done.stats.rounds, 3);
    assert!(done.stats.dirty_sync_count >= 5);
    let arrived = incoming.wait();
    assert_eq!(
        arrived.status,
        MigrationStatus::Completed,
        "{:?}",
        arrived.error
    );

    // The source is paused for good; the destination runs the guest from where it stopped.
    assert!(!src_vmm
        .runner
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .is_running());
    let at_switchover = passes(dst);
    wait_passes(dst, at_switchover + 2);
    dst_vmm.stop().unwrap();
    check(dst);
    registry::remove(src).unwrap();
    registry::remove(dst).unwrap();
}

#[test]
fn a_cancelled_migration_leaves_the_source_guest_running_and_consistent() {
    if !kvm_usable() {
        return;
    }
    let (src, src_vmm) = machine(&["-m", "96M", "-accel", "kvm"]);
    src_vmm.resume().unwrap();
    wait_passes(src, 1);
    hmp::hmp(
        src,
        "migrate_set_parameter max-bandwidth 8M",
        &HostTransports,
    )
    .unwrap();
    let (out, inc) = socket_channel();
    let (dst, dst_vmm) = machine(&["-m", "96M", "-accel", "kvm", "-incoming", "defer"]);
    let incoming = migrate::start_incoming(dst, inc).unwrap();
    let progress = migrate::start_outgoing(src, out, 0).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    hmp::hmp(src, "migrate_cancel", &HostTransports).unwrap();
    let done = progress.wait();
    assert_eq!(done.status, MigrationStatus::Cancelled);
    assert_eq!(incoming.wait().status, MigrationStatus::Failed);
    assert!(
        dst_vmm.runner.lock().unwrap().is_none(),
        "the destination never starts"
    );
    let before = passes(src);
    wait_passes(src, before + 1);
    src_vmm.stop().unwrap();
    check(src);
    assert_eq!(
        hmp::hmp(src, "info status", &HostTransports).unwrap(),
        "VM status: running\n"
    );
    registry::remove(src).unwrap();
    registry::remove(dst).unwrap();
}
