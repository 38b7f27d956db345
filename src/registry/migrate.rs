//! Migrations of registered machines, each on a thread of its own: the outgoing precopy and
//! the incoming load. A migration locks its machine only for what needs it (the dirty log, the
//! run state, the RAMBlock list at setup); pages move with the machine unlocked, so the monitor
//! answers and the guest runs meanwhile.

use std::io::{Read, Seek};
use std::sync::Arc;

use super::{with, MachineId};
use crate::error::{Error, HmErrorClass, Result};
use crate::machine::{GuestControl, Machine, RunState, SharedSection};
use crate::migration::blocks::RamSnapshot;
use crate::migration::builtin::{GlobalState, Timer};
use crate::migration::compat;
use crate::migration::precopy::{run_outgoing, PrecopyHost, SectionsFn};
use crate::migration::prefault::Prefault;
use crate::migration::qemu_file::StreamWrite;
use crate::migration::ram::PageRef;
use crate::migration::section::SectionHandler;
use crate::migration::state::{MigrationStatus, Progress};
use crate::migration::stream::{load, load_file, LoadOptions, SaveOptions};
pub use crate::migration::transport::ChannelOptions;
use crate::populated::{Detector, PopulatedMap};

/// Opens migration channels from QEMU's URIs (`file:`, `unix:`, `tcp:`, `exec:`, `fd:`).
pub trait Transports {
    /// Parses `uri` and does at once what QEMU does at once (creating a `file:`, spawning an
    /// `exec:` command, taking an `fd:` over); a socket connects later, on the migration
    /// thread, as QEMU's connects in the background.
    /// `options` carry the machine's migration parameters that change how a channel writes
    /// (`direct-io`).
    fn outgoing(&self, uri: &str, options: &ChannelOptions) -> Result<PendingOutgoing>;
    /// Starts listening (or opens the file) at once; the peer is waited for on a thread.
    fn incoming(&self, uri: &str) -> Result<PendingIncoming>;
}

/// The sending end of a migration channel, connected.
pub struct OutgoingChannel {
    pub writer: Box<dyn StreamWrite + Send>,
    /// Runs after the last byte: closes the channel and reports what the peer's end made of
    /// it (an exec child's exit status).
    pub finish: Box<dyn FnOnce() -> Result<()> + Send>,
}

/// An outgoing channel being set up.
pub struct PendingOutgoing {
    /// Connects (blocking); run on the migration thread.
    pub connect: Box<dyn FnOnce() -> Result<OutgoingChannel> + Send>,
    /// Wakes a connect or a write blocked on the peer (shuts the socket down, kills the exec
    /// child), from any thread.
    pub interrupt: Box<dyn Fn() + Send>,
    /// What QEMU would warn about while opening the channel.
    pub warnings: Vec<String>,
}

impl PendingOutgoing {
    /// A channel that is connected already.
    pub fn connected(channel: OutgoingChannel, interrupt: Box<dyn Fn() + Send>) -> Self {
        PendingOutgoing {
            connect: Box::new(move || Ok(channel)),
            interrupt,
            warnings: Vec::new(),
        }
    }
}

/// The receiving end of a migration channel.
pub enum IncomingChannel {
    /// A pipe, socket or exec child: read front to back.
    Stream(Box<dyn Read + Send>),
    /// A file: seekable, so mapped-ram files load too.
    Seekable(Box<dyn SeekableRead>),
}

/// What a seekable incoming channel is.
pub trait SeekableRead: Read + Seek + Send {
    /// A second reader of the stream from its start, with a position of its own: what the
    /// loader's prefaulter reads ahead with ([`crate::migration::prefault`]). `None`: none.
    fn read_ahead(&self) -> Option<std::fs::File> {
        None
    }
}

impl SeekableRead for crate::migration::transport::IncomingChannel {
    fn read_ahead(&self) -> Option<std::fs::File> {
        crate::migration::transport::IncomingChannel::read_ahead(self)
    }
}

/// An incoming channel being set up: listening already.
pub struct PendingIncoming {
    /// Blocks until a peer has connected; run on a thread of its own.
    pub accept: Box<dyn FnOnce() -> Result<IncomingChannel> + Send>,
    /// Wakes the accept, or a read blocked on the peer, from any thread.
    pub interrupt: Box<dyn Fn() + Send>,
    /// Where it listens, as `info migrate` lists them (`tcp:0.0.0.0:4444`).
    pub addresses: Vec<String>,
}

/// The machine side of an outgoing migration.
struct MachineHost {
    id: MachineId,
    control: Arc<dyn GuestControl>,
    sections: Vec<SharedSection>,
    /// The channel's own end ([`OutgoingChannel::finish`]), run once the stream is whole.
    finish: Option<Box<dyn FnOnce() -> Result<()> + Send>>,
    /// QEMU's `globalstate`: the run state the switchover found, for the destination.
    globalstate: GlobalState,
    /// `x-skip-unpopulated`: the bulk pass sends only what may hold data.
    skip_unpopulated: bool,
}

/// hostmem's capability that leaves never-populated pages out of the stream.
const SKIP_UNPOPULATED: &str = "x-skip-unpopulated";

fn machine_name(m: &Machine) -> String {
    m.config()
        .map(|c| c.board.name.clone())
        .unwrap_or_else(|| "none".to_string())
}

/// How machine `m` writes its streams: its machine type and its migration globals.
pub fn save_options(m: &Machine) -> SaveOptions {
    let mut opts = SaveOptions::new(&machine_name(m));
    opts.send_switchover_start = m.migration().send_switchover_start;
    opts.send_configuration = !m.migration().no_configuration;
    opts
}

/// How machine `m` reads streams: its machine type and its migration globals.
pub fn load_options(m: &Machine) -> LoadOptions {
    let mut opts = LoadOptions::new(&machine_name(m));
    opts.expect_configuration = !m.migration().no_configuration;
    opts
}

/// Would a migration from machine `src` to machine `dst` load, and if not, every reason
/// ([`crate::migration::compat`]): what `src` writes before its first page (its save options
/// and migratable blocks, and the refusal of memory no migratable alias carries, as the
/// migration's start has) against what `dst` loads with.
pub fn check_compat(src: MachineId, dst: MachineId) -> Result<compat::CompatReport> {
    let mut report = compat::CompatReport::default();
    let out = with(src, |m| {
        if let Err(e) = m.memory().ramblocks.check_displaced_memory_migrates() {
            report.source_break(e.message());
        }
        let blocks = RamSnapshot::migratable(&m.memory().ramblocks).blocks_info();
        Ok(compat::Outgoing::new(&save_options(m), blocks))
    })?;
    with(dst, |m| {
        let mut target = RamSnapshot::all(&m.memory().ramblocks);
        let local = RamSnapshot::migratable(&m.memory().ramblocks).blocks_info();
        compat::check(&mut report, &out, &load_options(m), &mut target, &local);
        Ok(())
    })?;
    Ok(report)
}

impl PrecopyHost for MachineHost {
    fn begin(&mut self) -> Result<RamSnapshot> {
        with(self.id, |m| {
            let mem = m.memory_mut();
            // Memory that left the stream for migratable aliases must be in one of them.
            mem.ramblocks.check_displaced_memory_migrates()?;
            mem.set_global_dirty_log(true)?;
            mem.log_sync()?;
            let snap = RamSnapshot::migratable(&mem.ramblocks);
            // Everything goes in the bulk pass: what was logged before it is moot.
            for b in snap.blocks() {
                mem.ramblocks.take_dirty(b.id);
            }
            Ok(snap)
        })
    }

    fn dirty_pages(&mut self, snap: &RamSnapshot) -> Result<Vec<PageRef>> {
        with(self.id, |m| {
            let mem = m.memory_mut();
            mem.log_sync()?;
            let mut pages = Vec::new();
            for (i, b) in snap.blocks().iter().enumerate() {
                let bitmap = mem.ramblocks.take_dirty(b.id);
                pages.extend(snap.dirty_pages(i, &bitmap));
            }
            Ok(pages)
        })
    }

    fn stop_guest(&mut self) -> Result<bool> {
        let state = with(self.id, |m| Ok(m.run().state))?;
        *self
            .globalstate
            .runstate
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = state.name().to_string();
        let running = state.is_running();
        if running {
            self.control.stop()?;
        }
        with(self.id, |m| {
            m.run_mut().state = RunState::FinishMigrate;
            Ok(running)
        })
    }

    fn resume_guest(&mut self) -> Result<()> {
        self.control.resume()?;
        with(self.id, |m| {
            m.run_mut().state = RunState::Running;
            Ok(())
        })
    }

    fn end(&mut self) {
        // A channel the migration did not finish closes here, not when the thread ends.
        self.finish = None;
        let _ = with(self.id, |m| m.memory_mut().set_global_dirty_log(false));
    }

    fn complete(&mut self) -> Result<()> {
        if let Some(finish) = self.finish.take() {
            finish()?;
        }
        with(self.id, |m| {
            m.run_mut().state = RunState::PostMigrate;
            Ok(())
        })
    }

    fn with_sections(&mut self, f: &mut SectionsFn<'_>) -> Result<()> {
        with_locked_sections(&mut [&mut self.globalstate], &self.sections, f)
    }

    fn populated(&mut self, snap: &RamSnapshot) -> Result<Option<Vec<PopulatedMap>>> {
        if !self.skip_unpopulated {
            return Ok(None);
        }
        snap.populated(&Detector::new()).map(Some)
    }
}

/// Runs `f` on QEMU's machine-wide sections (`builtin`) and the VMM's, each locked for the
/// call.
fn with_locked_sections<'a, R>(
    builtin: &mut [&'a mut (dyn SectionHandler + 'a)],
    sections: &[SharedSection],
    f: &mut dyn FnMut(&mut [&mut dyn SectionHandler]) -> R,
) -> R {
    let mut guards: Vec<_> = sections
        .iter()
        .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()))
        .collect();
    let mut handlers: Vec<&mut dyn SectionHandler> = Vec::new();
    for h in builtin.iter_mut() {
        let h: &mut dyn SectionHandler = &mut **h;
        handlers.push(h);
    }
    for g in guards.iter_mut() {
        let h: &mut dyn SectionHandler = &mut ***g;
        handlers.push(h);
    }
    f(&mut handlers)
}

fn in_progress() -> Error {
    Error::new(
        HmErrorClass::InUse,
        "There's a migration process in progress",
    )
}

/// Refuses an outgoing migration machine `id` cannot start now, before any channel is
/// opened (QEMU checks before it creates a `file:` or connects).
pub fn check_outgoing(id: MachineId) -> Result<()> {
    with(id, |m| outgoing_allowed(m))
}

fn outgoing_allowed(m: &Machine) -> Result<()> {
    match m.run().state {
        RunState::PostMigrate => {
            return Err(Error::invalid(
                "Can't migrate the vm that was paused due to previous migration",
            ))
        }
        RunState::InMigrate => {
            return Err(Error::invalid("Guest is waiting for an incoming migration"))
        }
        _ => {}
    }
    if m.migration()
        .outgoing
        .as_ref()
        .is_some_and(|p| !p.status().is_finished())
    {
        return Err(in_progress());
    }
    Ok(())
}

/// Starts migrating machine `id` over `channel` on a thread, which connects it first; the
/// returned progress tells how it goes (`setup` while connecting). `max_rounds` (0: no
/// limit) ends the dirty passes after that many.
pub fn start_outgoing(
    id: MachineId,
    channel: PendingOutgoing,
    max_rounds: u64,
) -> Result<Arc<Progress>> {
    let (progress, host, opts, params, limits) = with(id, |m| {
        outgoing_allowed(m)?;
        let progress = Arc::new(Progress::new(false));
        progress.observe();
        m.migration_mut().outgoing = Some(progress.clone());
        let opts = save_options(m);
        let host = MachineHost {
            id,
            control: m.run().control.clone(),
            sections: m.sections(),
            finish: None,
            globalstate: GlobalState::new(Arc::new(std::sync::Mutex::new(
                m.run().state.name().to_string(),
            ))),
            skip_unpopulated: m.migration().capabilities.is_on(SKIP_UNPOPULATED),
        };
        Ok((
            progress,
            host,
            opts,
            m.migration().parameters().clone(),
            m.migration().limits.clone(),
        ))
    })?;
    let PendingOutgoing {
        connect, interrupt, ..
    } = channel;
    progress.set_interrupt(Some(interrupt));
    let p = progress.clone();
    spawn("hm-migration", move || {
        match connect() {
            Ok(OutgoingChannel { writer, finish }) => {
                let mut host = host;
                host.finish = Some(finish);
                // Failures and cancellation are in the progress; the guest runs on then.
                let _ = run_outgoing(&mut host, writer, opts, &params, &limits, max_rounds, &p);
            }
            Err(_) if p.cancel_requested() => p.set_status(MigrationStatus::Cancelled),
            Err(e) => p.fail(&e),
        }
    })?;
    Ok(progress)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|e| {
            Error::host(
                "cannot start the migration thread",
                e.raw_os_error().unwrap_or(0),
            )
        })
}

/// Cancels machine `id`'s outgoing migration, if one is running (QEMU's `migrate_cancel`,
/// which is quiet when there is none).
pub fn cancel(id: MachineId) -> Result<()> {
    let progress = with(id, |m| Ok(m.migration().outgoing.clone()))?;
    if let Some(p) = progress {
        if !p.status().is_finished() {
            p.cancel();
        }
    }
    Ok(())
}

/// Loads an incoming migration into machine `id` on a thread: its RAM and the device
/// sections registered on it. When it completes the guest starts, unless the machine was
/// built with `-S`; when it fails the guest never starts and the progress says why.
pub fn start_incoming(id: MachineId, channel: IncomingChannel) -> Result<Arc<Progress>> {
    let progress = prepare_incoming(id)?;
    let p = progress.clone();
    if let Err(e) = spawn("hm-incoming", move || run_incoming(id, channel, &p)) {
        forget_incoming(id);
        return Err(e);
    }
    Ok(progress)
}

/// Waits on a thread for the peer of `channel`, which listens already, then loads what it
/// sends as [`start_incoming`] does (QEMU's `-incoming URI` and `migrate_incoming URI`).
pub fn listen_incoming(id: MachineId, channel: PendingIncoming) -> Result<Arc<Progress>> {
    let progress = prepare_incoming(id)?;
    let PendingIncoming {
        accept,
        interrupt,
        addresses,
    } = channel;
    progress.set_interrupt(Some(interrupt));
    progress.set_socket_addresses(addresses);
    let p = progress.clone();
    let started = spawn("hm-incoming", move || match accept() {
        Ok(channel) => run_incoming(id, channel, &p),
        Err(e) => end_incoming(&p, Err(e)),
    });
    if let Err(e) = started {
        forget_incoming(id);
        return Err(e);
    }
    Ok(progress)
}

/// Refuses an incoming migration machine `id` does not wait for, before anything listens.
pub fn check_incoming(id: MachineId) -> Result<()> {
    with(id, |m| incoming_allowed(m))
}

fn incoming_allowed(m: &Machine) -> Result<()> {
    if m.run().state != RunState::InMigrate {
        return Err(Error::invalid(
            "'-incoming' was not specified on the command line",
        ));
    }
    if m.migration().incoming.is_some() {
        return Err(Error::new(
            HmErrorClass::InUse,
            "The incoming migration has already been started",
        ));
    }
    Ok(())
}

/// Checks that machine `id` waits for an incoming migration and records one as started (in
/// status `setup`, while the channel waits for its peer).
fn prepare_incoming(id: MachineId) -> Result<Arc<Progress>> {
    with(id, |m| {
        incoming_allowed(m)?;
        let progress = Arc::new(Progress::new(true));
        progress.observe();
        m.migration_mut().incoming = Some(progress.clone());
        Ok(progress)
    })
}

/// Forgets an incoming migration that never got going: the machine may try again.
fn forget_incoming(id: MachineId) {
    let _ = with(id, |m| {
        m.migration_mut().incoming = None;
        Ok(())
    });
}

/// QEMU's incoming state goes when the load ends: the listener's addresses with it.
fn end_incoming(progress: &Progress, result: Result<()>) {
    progress.set_socket_addresses(Vec::new());
    match result {
        Ok(()) => progress.set_status(MigrationStatus::Completed),
        Err(e) => progress.fail(&e),
    }
}

/// Loads `channel` into machine `id`, then starts the guest or leaves it as the source's
/// state says.
fn run_incoming(id: MachineId, channel: IncomingChannel, progress: &Progress) {
    let prepared = with(id, |m| {
        Ok((load_options(m), m.sections(), m.run().control.clone()))
    });
    let result = prepared.and_then(|(opts, sections, control)| {
        let source_state = incoming(id, channel, &opts, &sections, progress)?;
        // QEMU's rule: a source that was not running leaves the destination in its state;
        // one that was (or sent none) starts it unless -S.
        let source_ran = source_state.as_deref().is_none_or(|s| s == "running");
        let autostart = source_ran && with(id, |m| Ok(m.run().autostart)).unwrap_or(false);
        let started = if autostart { control.resume() } else { Ok(()) };
        let _ = with(id, |m| {
            m.run_mut().state = if autostart && started.is_ok() {
                RunState::Running
            } else if source_state.as_deref() == Some("prelaunch") {
                RunState::Prelaunch
            } else {
                RunState::Paused
            };
            Ok(())
        });
        started
    });
    end_incoming(progress, result);
}

fn incoming(
    id: MachineId,
    channel: IncomingChannel,
    opts: &LoadOptions,
    sections: &[SharedSection],
    progress: &Progress,
) -> Result<Option<String>> {
    let (mut target, skip_unpopulated) = with(id, |m| {
        Ok((
            RamSnapshot::all(&m.memory().ramblocks),
            m.migration().capabilities.is_on(SKIP_UNPOPULATED),
        ))
    })?;
    let detector = Detector::new();
    if skip_unpopulated {
        // The stream leaves out what the source never populated: those pages must read as
        // zeros here, whatever this machine's memory held before.
        target.clear_populated(&detector)?;
    }
    // Nothing but the load writes this machine's memory until it ends: the guest waits.
    let zero_tester = target.know_zero_pages(&detector, true);
    // A fresh destination: its pages faulted in ahead of the loader.
    let prefault = match &channel {
        IncomingChannel::Seekable(file) if target.starts_mostly_unpopulated() => file
            .read_ahead()
            .and_then(|f| Prefault::spawn(&target, f, opts)),
        _ => None,
    };
    progress.set_status(MigrationStatus::Active);
    progress.update(|s| s.total = target.total_bytes());
    let mut globalstate = GlobalState::new(Default::default());
    let mut timer = Timer::default();
    let builtin: &mut [&mut dyn SectionHandler] = &mut [&mut globalstate, &mut timer];
    let summary = match channel {
        IncomingChannel::Stream(mut reader) => with_locked_sections(builtin, sections, &mut |h| {
            load(&mut reader, opts, Some(&mut target), h).map_err(Error::from)
        }),
        IncomingChannel::Seekable(mut file) => with_locked_sections(builtin, sections, &mut |h| {
            load_file(&mut file, opts, Some(&mut target), h).map_err(Error::from)
        }),
    };
    if let Some(t) = zero_tester {
        t.stop();
    }
    if let Some(p) = prefault {
        p.stop();
    }
    let summary = summary?;
    progress.update(|s| {
        s.transferred = summary.bytes;
        s.normal = summary.ram.normal_pages;
        s.duplicate = summary.ram.zero_pages;
        s.normal_bytes = summary.ram.normal_pages * 4096;
    });
    Ok(globalstate.received)
}
