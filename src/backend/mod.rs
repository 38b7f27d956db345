//! Host memory backends: `memory-backend-ram`, `-file` and `-memfd`, their QOM properties and
//! their completion, in QEMU's order: allocate → advise → bind → prealloc.
//!
//! A backend is created uncompleted, takes properties one by one (QEMU's guards differ before
//! and after completion), and is completed once. Completion is split in two phases so that a
//! caller holding a lock can drop it while pages are faulted in (progress callbacks may call
//! back into hostmem): [`Backend::begin_complete`] allocates, advises and binds and returns the
//! preallocation still to do; [`Backend::finish_complete`] takes its result. [`Backend::complete`]
//! runs both. A failure at any step leaves the backend uncompleted with nothing mapped or open.

pub mod error;
pub mod file;
pub mod host_limits;
pub mod memfd;
pub mod numa;
pub mod prealloc;
pub mod props;
pub mod ram;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::hostmap::HostMapping;
use crate::progress::{self, Activity};

/// What backend operations return.
pub type Result<T> = std::result::Result<T, BackendError>;
use crate::options::values::{
    bool_to_str, format_ranges, parse_bool_param, parse_size_param, parse_u16_list, parse_u32_param,
};

pub use self::error::BackendError;
pub use self::file::FileProps;
pub use self::memfd::MemfdProps;
pub use self::numa::NodeSet;
pub use self::prealloc::ProgressFn;
pub use self::props::{HostMemPolicy, OnOffAuto};

/// Machine-level defaults a backend takes at creation, before user properties: QEMU's
/// instance_init copies of mem-merge / dump-guest-core / smp.cpus, and the -mem-prealloc sugar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendDefaults {
    pub merge: bool,
    pub dump: bool,
    pub prealloc: bool,
    pub prealloc_threads: u32,
}

impl Default for BackendDefaults {
    fn default() -> Self {
        BackendDefaults {
            merge: true,
            dump: true,
            prealloc: false,
            prealloc_threads: 1,
        }
    }
}

/// What `info memdev` shows of a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemdevInfo {
    pub id: String,
    pub size: u64,
    pub merge: bool,
    pub dump: bool,
    pub prealloc: bool,
    pub share: bool,
    pub reserve: Option<bool>,
    /// "0-1,3" style, empty when no nodes.
    pub host_nodes: String,
    pub policy: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendType {
    Ram,
    File,
    Memfd,
}

impl BackendType {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "memory-backend-ram" => Some(Self::Ram),
            "memory-backend-file" => Some(Self::File),
            "memory-backend-memfd" => Some(Self::Memfd),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ram => "memory-backend-ram",
            Self::File => "memory-backend-file",
            Self::Memfd => "memory-backend-memfd",
        }
    }
}

/// One step of completion (or of a later property change), in the order it ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The mapping was created; MAP_NORESERVE when `reserve=off`.
    Allocate { noreserve: bool, shared: bool },
    /// MADV_HUGEPAGE (transparent huge pages where the host allows them).
    HugePage,
    /// MADV_DONTFORK: a forked child must not share or copy guest RAM.
    DontFork,
    /// MADV_MERGEABLE (KSM), for `merge=on`.
    Mergeable,
    /// MADV_UNMERGEABLE, for `merge=off` set after completion.
    Unmergeable,
    /// MADV_DONTDUMP, for `dump=off`.
    DontDump,
    /// MADV_DODUMP, for `dump=on` set after completion.
    DoDump,
    /// mbind with the policy and nodes; only when host-nodes is set.
    Bind {
        policy: HostMemPolicy,
        nodes: Vec<u16>,
    },
    /// Every page faulted in.
    Prealloc {
        threads: usize,
        populate_write: bool,
    },
}

impl Step {
    /// Short name, for the C trace accessor.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Allocate { .. } => "allocate",
            Step::HugePage => "hugepage",
            Step::DontFork => "dontfork",
            Step::Mergeable => "mergeable",
            Step::Unmergeable => "unmergeable",
            Step::DontDump => "dontdump",
            Step::DoDump => "dodump",
            Step::Bind { .. } => "bind",
            Step::Prealloc { .. } => "prealloc",
        }
    }
}

/// Preallocation left to do after [`Backend::begin_complete`]; owns what it needs so that it
/// can run without the backend (and without any lock on it).
pub struct PreallocJob {
    /// The backend's id, what the process's progress observer is told.
    id: String,
    mapping: Arc<HostMapping>,
    max_threads: u32,
    progress: Option<ProgressFn>,
}

impl PreallocJob {
    /// Preallocates, telling the backend's callback and the process's progress observer (the
    /// observer also gets a final report, whatever the outcome).
    pub fn run(&self) -> Result<prealloc::Outcome> {
        let total = self.mapping.len() as u64;
        let meter = progress::meter(Activity::Prealloc, &self.id).map(Arc::new);
        let reached = Arc::new(AtomicU64::new(0));
        let observed: Option<ProgressFn> = meter.clone().map(|m| {
            let reached = reached.clone();
            let own = self.progress.clone();
            let f: ProgressFn = Arc::new(move |done, total| {
                if let Some(own) = &own {
                    own(done, total);
                }
                reached.store(done, Ordering::Relaxed);
                m.tick(done, total);
            });
            f
        });
        if let Some(m) = &meter {
            m.tick(0, total);
        }
        let r = prealloc::prealloc(&prealloc::Request {
            span: crate::guarded::Span::of(&self.mapping),
            max_threads: self.max_threads,
            progress: observed.as_ref().or(self.progress.as_ref()),
            readonly: self.mapping.is_readonly(),
            method: None,
        });
        if let Some(m) = &meter {
            let done = if r.is_ok() {
                total
            } else {
                reached.load(Ordering::Relaxed)
            };
            m.finish(done, total);
        }
        r
    }

    pub fn mapping(&self) -> &Arc<HostMapping> {
        &self.mapping
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    New,
    /// Allocated, advised and bound; preallocation (if any) runs outside.
    Completing,
    Complete,
}

pub struct Backend {
    ty: BackendType,
    id: String,
    size: u64,
    merge: bool,
    dump: bool,
    prealloc: bool,
    prealloc_threads: u32,
    share: bool,
    reserve: bool,
    policy: HostMemPolicy,
    host_nodes: NodeSet,
    use_canonical_path: bool,
    file: FileProps,
    memfd: MemfdProps,
    mapped: bool,
    /// References a VMM holds on the memory itself (its own KVM slots, DMA): deletion is
    /// refused while any is held.
    pins: u32,
    state: State,
    mapping: Option<Arc<HostMapping>>,
    /// The backing file this completion created, removed again if the completion fails (a
    /// refused bind, a failed prealloc); kept once it succeeds.
    created_file: Option<std::ffi::CString>,
    trace: Vec<Step>,
    progress: Option<ProgressFn>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("type", &self.ty)
            .field("id", &self.id)
            .field("size", &self.size)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// An uncompleted backend of QOM type `type_name` ("memory-backend-ram", ...).
    pub fn new(type_name: &str, id: &str, defaults: &BackendDefaults) -> Result<Backend> {
        let ty = BackendType::from_name(type_name)
            .ok_or_else(|| props::bad_enum("qom-type", type_name))?;
        Ok(Self::of_type(ty, id, defaults))
    }

    /// An uncompleted backend of type `ty` named `id`.
    pub fn of_type(ty: BackendType, id: &str, defaults: &BackendDefaults) -> Backend {
        Backend {
            ty,
            id: id.to_string(),
            size: 0,
            merge: defaults.merge,
            dump: defaults.dump,
            prealloc: defaults.prealloc,
            prealloc_threads: defaults.prealloc_threads.max(1),
            // memfd guest RAM is meant to be shared with other processes (vhost-user).
            share: ty == BackendType::Memfd,
            reserve: true,
            policy: HostMemPolicy::Default,
            host_nodes: NodeSet::default(),
            use_canonical_path: false,
            file: FileProps::default(),
            memfd: MemfdProps::default(),
            mapped: false,
            pins: 0,
            state: State::New,
            mapping: None,
            created_file: None,
            trace: Vec::new(),
            progress: None,
        }
    }

    pub fn backend_type(&self) -> BackendType {
        self.ty
    }

    pub fn type_name(&self) -> &'static str {
        self.ty.name()
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn refuse_once_completed(&self, prop: &str) -> Result<()> {
        if self.state == State::New {
            Ok(())
        } else {
            Err(props::completed(self.ty, prop))
        }
    }

    /// Sets a property from its QEMU string form, with QEMU's checks and wording.
    pub fn set(&mut self, prop: &str, value: &str) -> Result<()> {
        if !props::exists(self.ty, prop) {
            return Err(props::not_found(self.ty, prop));
        }
        match prop {
            "size" => self.set_size(parse_size_param(prop, value)?)?,
            "merge" => {
                let v = parse_bool_param(prop, value)?;
                if v != self.merge && self.state != State::New {
                    let (advice, step) = if v {
                        (libc::MADV_MERGEABLE, Step::Mergeable)
                    } else {
                        (libc::MADV_UNMERGEABLE, Step::Unmergeable)
                    };
                    self.advise(advice, step);
                }
                self.merge = v;
            }
            "dump" => {
                let v = parse_bool_param(prop, value)?;
                if v != self.dump && self.state != State::New {
                    let (advice, step) = if v {
                        (libc::MADV_DODUMP, Step::DoDump)
                    } else {
                        (libc::MADV_DONTDUMP, Step::DontDump)
                    };
                    self.advise(advice, step);
                }
                self.dump = v;
            }
            "prealloc" => {
                let v = parse_bool_param(prop, value)?;
                if v && !self.reserve {
                    return Err(incompatible_prealloc());
                }
                if self.state == State::New {
                    self.prealloc = v;
                } else if v && !self.prealloc {
                    // Switching it on later preallocates right away; switching it off after
                    // the pages are in changes nothing, as in QEMU.
                    let job = self.prealloc_job().expect("a completed backend has memory");
                    self.finish_prealloc(job.run())?;
                }
            }
            "prealloc-threads" => {
                let v = parse_u32_param(prop, value)?;
                if v == 0 {
                    return Err(props::zero_refused(self.ty, prop));
                }
                self.prealloc_threads = v;
            }
            "share" => {
                self.refuse_once_completed(prop)?;
                self.share = parse_bool_param(prop, value)?;
            }
            "reserve" => {
                self.refuse_once_completed(prop)?;
                let v = parse_bool_param(prop, value)?;
                if !v && self.prealloc {
                    return Err(incompatible_prealloc());
                }
                self.reserve = v;
            }
            "policy" => self.policy = HostMemPolicy::parse(value)?,
            "host-nodes" => {
                let nodes = parse_u16_list(prop, value)?;
                self.host_nodes.add(&nodes)?;
            }
            "x-use-canonical-path-for-ramblock-id" => {
                self.set_use_canonical_path(parse_bool_param(prop, value)?)
            }
            "mem-path" => self.set_mem_path(value)?,
            "align" => {
                self.refuse_once_completed(prop)?;
                self.file.align = parse_size_param(prop, value)?;
            }
            "offset" => {
                self.refuse_once_completed(prop)?;
                self.file.offset = parse_size_param(prop, value)?;
            }
            "discard-data" => self.file.discard_data = parse_bool_param(prop, value)?,
            "readonly" => {
                self.refuse_once_completed(prop)?;
                self.file.readonly = parse_bool_param(prop, value)?;
            }
            "rom" => {
                self.refuse_once_completed(prop)?;
                self.file.rom = OnOffAuto::parse(prop, value)?;
            }
            "pmem" => {
                self.refuse_once_completed(prop)?;
                self.file.pmem = parse_bool_param(prop, value)?;
            }
            "hugetlb" => self.memfd.hugetlb = parse_bool_param(prop, value)?,
            "hugetlbsize" => {
                self.refuse_once_completed(prop)?;
                let v = parse_size_param(prop, value)?;
                if v == 0 {
                    return Err(BackendError::HugetlbsizeZero { ty: self.ty.name() });
                }
                self.memfd.hugetlbsize = v;
            }
            "seal" => self.memfd.seal = parse_bool_param(prop, value)?,
            _ => return Err(props::not_found(self.ty, prop)),
        }
        Ok(())
    }

    /// `size`, in bytes: refused when 0 or once completed.
    pub fn set_size(&mut self, size: u64) -> Result<()> {
        self.refuse_once_completed("size")?;
        if size == 0 {
            return Err(props::zero_refused(self.ty, "size"));
        }
        self.size = size;
        Ok(())
    }

    /// `mem-path` of a file backend: refused once completed.
    pub fn set_mem_path(&mut self, path: &str) -> Result<()> {
        if self.ty != BackendType::File {
            return Err(props::not_found(self.ty, "mem-path"));
        }
        self.refuse_once_completed("mem-path")?;
        self.file.mem_path = Some(path.to_string());
        Ok(())
    }

    /// `x-use-canonical-path-for-ramblock-id`: the RAMBlock is named "/objects/<id>" when on,
    /// "<id>" when off.
    pub fn set_use_canonical_path(&mut self, on: bool) {
        self.use_canonical_path = on;
    }

    /// A property's value in the syntax `set` takes: sizes in bytes, booleans on/off, node lists
    /// as ranges, enums by name.
    pub fn get(&self, prop: &str) -> Result<String> {
        if !props::exists(self.ty, prop) {
            return Err(props::not_found(self.ty, prop));
        }
        let b = |v: bool| bool_to_str(v).to_string();
        Ok(match prop {
            "size" => self.size.to_string(),
            "merge" => b(self.merge),
            "dump" => b(self.dump),
            "prealloc" => b(self.prealloc),
            "prealloc-threads" => self.prealloc_threads.to_string(),
            "share" => b(self.share),
            "reserve" => b(self.reserve),
            "policy" => self.policy.name().to_string(),
            "host-nodes" => self.host_nodes_str(),
            "x-use-canonical-path-for-ramblock-id" => b(self.use_canonical_path),
            "mem-path" => self.file.mem_path.clone().unwrap_or_default(),
            "align" => self.file.align.to_string(),
            "offset" => self.file.offset.to_string(),
            "discard-data" => b(self.file.discard_data),
            "readonly" => b(self.file.readonly),
            "rom" => self.file.rom.name().to_string(),
            "pmem" => b(self.file.pmem),
            "hugetlb" => b(self.memfd.hugetlb),
            "hugetlbsize" => self.memfd.hugetlbsize.to_string(),
            "seal" => b(self.memfd.seal),
            _ => return Err(props::not_found(self.ty, prop)),
        })
    }

    fn host_nodes_str(&self) -> String {
        format_ranges(self.host_nodes.nodes().into_iter().map(u32::from))
    }

    /// Progress reports for preallocation (bytes done, bytes total).
    pub fn set_prealloc_progress(&mut self, progress: Option<ProgressFn>) {
        self.progress = progress;
    }

    /// Allocates, advises and binds; returns the preallocation still to run, if any. On error
    /// nothing stays allocated.
    pub fn begin_complete(&mut self) -> Result<Option<PreallocJob>> {
        if self.state != State::New {
            return Err(BackendError::AlreadyComplete(self.id.clone()));
        }
        self.trace.clear();
        if self.size == 0 {
            return Err(BackendError::SizeZero);
        }
        // QEMU checks these only after allocating; checking first refuses the same
        // configurations without touching the host.
        self.check_numa()?;
        if self.ty == BackendType::File {
            self.file.check(self.share)?;
        }
        let name = self.region_name();
        let noreserve = !self.reserve;
        let mapping = match self.ty {
            BackendType::Ram => ram::alloc(&name, self.size, self.share, noreserve)?,
            BackendType::File => {
                let (mapping, created) = file::alloc(
                    &self.file,
                    self.ty.name(),
                    &name,
                    self.size,
                    self.share,
                    noreserve,
                )?;
                self.created_file = created;
                mapping
            }
            BackendType::Memfd => memfd::alloc(
                &self.memfd,
                self.ty.name(),
                &name,
                self.size,
                self.share,
                noreserve,
            )?,
        };
        self.trace.push(Step::Allocate {
            noreserve,
            shared: self.share,
        });
        self.mapping = Some(Arc::new(mapping));
        // What QEMU's RAM core does to every new block: THP where possible, keep it out of
        // forked children. Failures are ignored (hugetlbfs refuses MADV_HUGEPAGE).
        self.advise(libc::MADV_HUGEPAGE, Step::HugePage);
        self.advise(libc::MADV_DONTFORK, Step::DontFork);
        if self.merge {
            self.advise(libc::MADV_MERGEABLE, Step::Mergeable);
        }
        if !self.dump {
            self.advise(libc::MADV_DONTDUMP, Step::DontDump);
        }
        if !self.host_nodes.is_empty() {
            let m = self.mapping.as_ref().expect("just set");
            if let Err(e) = numa::bind(m.as_ptr(), m.len(), self.policy, &self.host_nodes) {
                self.abort_complete();
                return Err(e);
            }
            self.trace.push(Step::Bind {
                policy: self.policy,
                nodes: self.host_nodes.nodes(),
            });
        }
        self.state = State::Completing;
        Ok(if self.prealloc {
            self.prealloc_job()
        } else {
            None
        })
    }

    /// Ends completion with the preallocation's result (`None` when there was none to run).
    /// On error the memory is released and the backend is uncompleted again.
    pub fn finish_complete(&mut self, prealloc: Option<Result<prealloc::Outcome>>) -> Result<()> {
        if self.state != State::Completing {
            return Err(BackendError::NotCompleting(self.id.clone()));
        }
        if let Some(r) = prealloc {
            if let Err(e) = self.finish_prealloc(r) {
                self.abort_complete();
                return Err(e);
            }
        }
        self.state = State::Complete;
        self.created_file = None;
        Ok(())
    }

    /// Undoes a completion that failed after `begin_complete` (for callers whose own step, such
    /// as creating the RAM region, failed): memory released, backend uncompleted.
    pub fn abort_complete(&mut self) {
        self.mapping = None;
        self.state = State::New;
        if let Some(path) = self.created_file.take() {
            // SAFETY: removing the file this completion created; the path is NUL-terminated.
            unsafe { libc::unlink(path.as_ptr()) };
        }
    }

    /// `user_creatable_complete`: allocate → advise → bind → prealloc.
    pub fn complete(&mut self) -> Result<()> {
        let job = self.begin_complete()?;
        let result = job.map(|j| j.run());
        self.finish_complete(result)
    }

    fn prealloc_job(&self) -> Option<PreallocJob> {
        let mapping = self.mapping.clone()?;
        Some(PreallocJob {
            id: self.id.clone(),
            mapping,
            max_threads: self.prealloc_threads,
            progress: self.progress.clone(),
        })
    }

    /// Records a preallocation run that happened outside (see [`Backend::prealloc_job`]).
    fn finish_prealloc(&mut self, r: Result<prealloc::Outcome>) -> Result<()> {
        let out = r?;
        self.trace.push(Step::Prealloc {
            threads: out.threads,
            populate_write: out.method == prealloc::Method::PopulateWrite,
        });
        self.prealloc = true;
        Ok(())
    }

    /// For callers that run a late `prealloc=on` without holding a lock: the job to run, or
    /// None when nothing is to be done. Refusals are the same as `set("prealloc", "on")`.
    pub fn begin_late_prealloc(&self) -> Result<Option<PreallocJob>> {
        if !self.reserve {
            return Err(incompatible_prealloc());
        }
        if self.state == State::New || self.prealloc {
            return Ok(None);
        }
        Ok(self.prealloc_job())
    }

    /// Records the result of a job from [`Backend::begin_late_prealloc`].
    pub fn finish_late_prealloc(&mut self, r: Result<prealloc::Outcome>) -> Result<()> {
        self.finish_prealloc(r)
    }

    fn check_numa(&self) -> Result<()> {
        let empty = self.host_nodes.is_empty();
        if !empty && self.policy == HostMemPolicy::Default {
            return Err(BackendError::NodesWithDefaultPolicy);
        }
        if empty && self.policy != HostMemPolicy::Default {
            return Err(BackendError::PolicyWithoutNodes(self.policy.name()));
        }
        Ok(())
    }

    /// madvise over the whole memory; the result is ignored, as QEMU ignores it.
    fn advise(&mut self, advice: libc::c_int, step: Step) {
        if let Some(m) = &self.mapping {
            // SAFETY: advising our own mapping; no advice used here frees or moves memory.
            unsafe { libc::madvise(m.as_ptr() as *mut libc::c_void, m.len(), advice) };
            self.trace.push(step);
        }
    }

    pub fn is_complete(&self) -> bool {
        self.state == State::Complete
    }

    /// Between the two halves of completion: its preallocation runs on another thread.
    pub fn is_completing(&self) -> bool {
        self.state == State::Completing
    }

    pub fn mapping(&self) -> Option<Arc<HostMapping>> {
        self.mapping.clone()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The page size backing the memory once allocated (hugetlbfs or host page size).
    pub fn page_size(&self) -> Option<usize> {
        self.mapping.as_ref().map(|m| m.page_size())
    }

    pub fn is_readonly(&self) -> bool {
        self.ty == BackendType::File && self.file.rom_effective()
    }

    /// The RAMBlock / region name: the id, or "/objects/<id>" with
    /// x-use-canonical-path-for-ramblock-id=on.
    pub fn region_name(&self) -> String {
        if self.use_canonical_path {
            format!("/objects/{}", self.id)
        } else {
            self.id.clone()
        }
    }

    pub fn is_mapped(&self) -> bool {
        self.mapped
    }

    pub fn set_mapped(&mut self, mapped: bool) {
        self.mapped = mapped;
    }

    /// Takes a reference on the memory (see `pins`); the mapping it keeps alive is returned so
    /// the holder's pointers stay valid even if the machine goes first.
    pub fn pin(&mut self) -> Result<Arc<HostMapping>> {
        let mapping = self
            .mapping
            .clone()
            .ok_or_else(|| BackendError::NotAllocated(self.id.clone()))?;
        self.pins += 1;
        Ok(mapping)
    }

    pub fn unpin(&mut self) {
        self.pins = self.pins.saturating_sub(1);
    }

    pub fn pins(&self) -> u32 {
        self.pins
    }

    /// The steps the last completion (and later property changes) ran, in order.
    pub fn trace(&self) -> &[Step] {
        &self.trace
    }

    pub fn memdev_info(&self) -> MemdevInfo {
        MemdevInfo {
            id: self.id.clone(),
            size: self.size,
            merge: self.merge,
            dump: self.dump,
            prealloc: self.prealloc,
            share: self.share,
            reserve: Some(self.reserve),
            host_nodes: self.host_nodes_str(),
            policy: self.policy.name(),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // discard-data: the file's content is not wanted after the backend goes away.
        if self.ty == BackendType::File && self.file.discard_data {
            if let Some(m) = &self.mapping {
                // SAFETY: dropping the pages of our own file mapping; nothing reads them after.
                unsafe {
                    libc::madvise(m.as_ptr() as *mut libc::c_void, m.len(), libc::MADV_REMOVE)
                };
            }
        }
    }
}

fn incompatible_prealloc() -> BackendError {
    BackendError::PreallocWithoutReserve
}

#[cfg(test)]
mod tests {
    use super::prealloc::resident_pages;
    use super::*;

    fn new(ty: &str) -> Backend {
        Backend::new(ty, "m", &BackendDefaults::default()).unwrap()
    }

    fn msg(r: Result<()>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn defaults_read_back_in_option_syntax() {
        let b = new("memory-backend-ram");
        for (p, v) in [
            ("size", "0"),
            ("merge", "on"),
            ("dump", "on"),
            ("prealloc", "off"),
            ("prealloc-threads", "1"),
            ("share", "off"),
            ("reserve", "on"),
            ("policy", "default"),
            ("host-nodes", ""),
            ("x-use-canonical-path-for-ramblock-id", "off"),
        ] {
            assert_eq!(b.get(p).unwrap(), v, "{p}");
        }
        let f = new("memory-backend-file");
        for (p, v) in [
            ("mem-path", ""),
            ("align", "0"),
            ("offset", "0"),
            ("discard-data", "off"),
            ("readonly", "off"),
            ("rom", "auto"),
        ] {
            assert_eq!(f.get(p).unwrap(), v, "{p}");
        }
        let m = new("memory-backend-memfd");
        for (p, v) in [
            ("share", "on"),
            ("hugetlb", "off"),
            ("hugetlbsize", "0"),
            ("seal", "on"),
        ] {
            assert_eq!(m.get(p).unwrap(), v, "{p}");
        }
        let d = BackendDefaults {
            merge: false,
            dump: false,
            prealloc: true,
            prealloc_threads: 4,
        };
        let b = Backend::new("memory-backend-ram", "x", &d).unwrap();
        assert_eq!(b.get("merge").unwrap(), "off");
        assert_eq!(b.get("prealloc").unwrap(), "on");
        assert_eq!(b.get("prealloc-threads").unwrap(), "4");
    }

    #[test]
    fn set_then_get_round_trips() {
        let mut f = new("memory-backend-file");
        for (p, v, back) in [
            ("size", "1G", "1073741824"),
            ("merge", "no", "off"),
            ("dump", "false", "off"),
            ("prealloc", "yes", "on"),
            ("prealloc-threads", "8", "8"),
            ("share", "true", "on"),
            ("policy", "interleave", "interleave"),
            ("host-nodes", "0-1", "0-1"),
            ("host-nodes", "3", "0-1,3"),
            ("x-use-canonical-path-for-ramblock-id", "on", "on"),
            ("mem-path", "/tmp/x,y", "/tmp/x,y"),
            ("align", "2M", "2097152"),
            ("offset", "4k", "4096"),
            ("discard-data", "on", "on"),
            ("readonly", "on", "on"),
            ("rom", "off", "off"),
            ("pmem", "on", "on"),
        ] {
            f.set(p, v).unwrap();
            assert_eq!(f.get(p).unwrap(), back, "{p}");
        }
        let mut m = new("memory-backend-memfd");
        m.set("hugetlb", "on").unwrap();
        m.set("hugetlbsize", "2M").unwrap();
        m.set("seal", "off").unwrap();
        assert_eq!(m.get("hugetlbsize").unwrap(), "2097152");
        assert_eq!(m.get("seal").unwrap(), "off");
        assert_eq!(m.get("hugetlb").unwrap(), "on");
    }

    #[test]
    fn value_refusals() {
        let mut b = new("memory-backend-ram");
        assert_eq!(
            msg(b.set("size", "0")),
            "property 'size' of memory-backend-ram doesn't take value '0'"
        );
        assert_eq!(
            msg(b.set("size", "abc")),
            "Parameter 'size' expects a size value"
        );
        assert_eq!(
            msg(b.set("prealloc-threads", "0")),
            "property 'prealloc-threads' of memory-backend-ram doesn't take value '0'"
        );
        assert_eq!(
            msg(b.set("merge", "maybe")),
            "Parameter 'merge' expects 'on' or 'off'"
        );
        assert_eq!(
            msg(b.set("policy", "foo")),
            "Parameter 'policy' does not accept value 'foo'"
        );
        assert_eq!(
            msg(b.set("host-nodes", "128")),
            "Invalid host-nodes value: 128"
        );
        assert_eq!(
            msg(b.set("host-nodes", "a")),
            "Parameter 'host-nodes' expects a uint64 value or range"
        );
        assert_eq!(
            msg(b.set("foo", "1")),
            "Property 'memory-backend-ram.foo' not found"
        );
        assert_eq!(
            msg(b.set("mem-path", "/tmp")),
            "Property 'memory-backend-ram.mem-path' not found"
        );
        assert!(b.get("seal").is_err());
        let mut m = new("memory-backend-memfd");
        assert_eq!(
            msg(m.set("hugetlbsize", "0")),
            "Property 'memory-backend-memfd.hugetlbsize' doesn't take value '0'"
        );
        let mut f = new("memory-backend-file");
        assert_eq!(
            msg(f.set("rom", "maybe")),
            "Parameter 'rom' does not accept value 'maybe'"
        );
        assert_eq!(
            Backend::new("memory-backend-foo", "x", &BackendDefaults::default())
                .unwrap_err()
                .to_string(),
            "Parameter 'qom-type' does not accept value 'memory-backend-foo'"
        );
    }

    #[test]
    fn prealloc_and_reserve_off_are_incompatible_either_way() {
        let want = "'prealloc=on' and 'reserve=off' are incompatible";
        let mut b = new("memory-backend-ram");
        b.set("prealloc", "on").unwrap();
        assert_eq!(msg(b.set("reserve", "off")), want);
        let mut b = new("memory-backend-ram");
        b.set("reserve", "off").unwrap();
        assert_eq!(msg(b.set("prealloc", "on")), want);
    }

    #[test]
    fn completion_refusals() {
        let mut b = new("memory-backend-ram");
        assert_eq!(msg(b.complete()), "can't create backend with size 0");
        b.set("size", "1M").unwrap();
        b.set("policy", "bind").unwrap();
        assert_eq!(msg(b.complete()), "host-nodes must be set for policy bind");
        let mut b = new("memory-backend-ram");
        b.set("size", "1M").unwrap();
        b.set("host-nodes", "0").unwrap();
        assert_eq!(
            msg(b.complete()),
            "host-nodes must be empty for policy default, or you should explicitly specify a policy other than default"
        );
        assert!(b.mapping().is_none());
        let mut f = new("memory-backend-file");
        f.set("size", "1M").unwrap();
        assert_eq!(msg(f.complete()), "mem-path property not set");
        f.set("mem-path", "/nonexistent/dir/x").unwrap();
        assert_eq!(
            msg(f.complete()),
            "can't open backing store /nonexistent/dir/x for guest RAM: No such file or directory"
        );
        assert!(!f.is_complete() && f.mapping().is_none());
    }

    #[test]
    fn changes_after_completion_follow_qemus_guards() {
        let mut f = new("memory-backend-file");
        f.set("size", "1M").unwrap();
        f.set("mem-path", std::env::temp_dir().to_str().unwrap())
            .unwrap();
        f.complete().unwrap();
        for (p, v, want) in [
            (
                "size",
                "2M",
                "cannot change property size of memory-backend-file ",
            ),
            ("share", "on", "cannot change property value"),
            ("reserve", "off", "cannot change property value"),
            (
                "mem-path",
                "/x",
                "cannot change property 'mem-path' of memory-backend-file",
            ),
            (
                "align",
                "8k",
                "cannot change property 'align' of memory-backend-file",
            ),
            (
                "offset",
                "8k",
                "cannot change property 'offset' of memory-backend-file",
            ),
            (
                "readonly",
                "on",
                "cannot change property 'readonly' of memory-backend-file.",
            ),
            (
                "rom",
                "on",
                "cannot change property 'rom' of memory-backend-file.",
            ),
        ] {
            let e = crate::Error::from(f.set(p, v).unwrap_err());
            assert_eq!(e.message(), want, "{p}");
            assert_eq!(e.class(), crate::HmErrorClass::Completed);
        }
        // No guard: these are accepted (late NUMA settings have no effect, as in QEMU).
        for (p, v) in [
            ("policy", "bind"),
            ("host-nodes", "0"),
            ("discard-data", "on"),
            ("prealloc-threads", "2"),
            ("x-use-canonical-path-for-ramblock-id", "on"),
        ] {
            f.set(p, v).unwrap();
        }
        let mut m = new("memory-backend-memfd");
        m.set("size", "1M").unwrap();
        m.complete().unwrap();
        assert_eq!(
            msg(m.set("hugetlbsize", "2M")),
            "cannot change property value"
        );
        m.set("seal", "off").unwrap();
        m.set("hugetlb", "on").unwrap();
        assert!(msg(m.complete()).contains("already complete"));
    }

    #[test]
    fn merge_and_dump_apply_at_once_after_completion() {
        let mut b = new("memory-backend-ram");
        b.set("size", "1M").unwrap();
        b.complete().unwrap();
        let n = b.trace().len();
        b.set("merge", "off").unwrap();
        b.set("dump", "off").unwrap();
        b.set("dump", "on").unwrap();
        b.set("merge", "on").unwrap();
        assert_eq!(
            &b.trace()[n..],
            [
                Step::Unmergeable,
                Step::DontDump,
                Step::DoDump,
                Step::Mergeable
            ]
        );
    }

    #[test]
    fn completion_runs_in_qemus_order() {
        let mut b = new("memory-backend-ram");
        for (p, v) in [
            ("size", "8M"),
            ("prealloc", "on"),
            ("dump", "off"),
            ("host-nodes", "0"),
            ("policy", "bind"),
        ] {
            b.set(p, v).unwrap();
        }
        b.complete().unwrap();
        let names: Vec<_> = b.trace().iter().map(Step::name).collect();
        assert_eq!(
            names,
            [
                "allocate",
                "hugepage",
                "dontfork",
                "mergeable",
                "dontdump",
                "bind",
                "prealloc"
            ]
        );
        assert_eq!(
            b.trace()[5],
            Step::Bind {
                policy: HostMemPolicy::Bind,
                nodes: vec![0]
            }
        );
        let m = b.mapping().unwrap();
        assert_eq!(resident_pages(m.as_ptr(), m.len()), m.len() / 4096);
    }

    #[test]
    fn no_page_is_resident_before_the_policy_is_installed() {
        let mut b = new("memory-backend-ram");
        for (p, v) in [
            ("size", "64M"),
            ("prealloc", "on"),
            ("host-nodes", "0"),
            ("policy", "bind"),
        ] {
            b.set(p, v).unwrap();
        }
        let job = b
            .begin_complete()
            .unwrap()
            .expect("prealloc=on leaves a job");
        let m = job.mapping().clone();
        // Policy installed, nothing faulted in yet.
        assert_eq!(
            numa::policy_at(m.as_ptr()).unwrap(),
            (HostMemPolicy::Bind as i32, 1)
        );
        assert_eq!(resident_pages(m.as_ptr(), m.len()), 0);
        assert_eq!(b.trace().last().map(Step::name), Some("bind"));
        b.finish_complete(Some(job.run())).unwrap();
        assert_eq!(resident_pages(m.as_ptr(), m.len()), m.len() / 4096);
        assert_eq!(b.trace().last().map(Step::name), Some("prealloc"));
        assert!(b.is_complete());
    }

    #[test]
    fn without_nodes_mbind_is_skipped() {
        let mut b = new("memory-backend-ram");
        b.set("size", "1M").unwrap();
        b.set("merge", "off").unwrap();
        b.complete().unwrap();
        let names: Vec<_> = b.trace().iter().map(Step::name).collect();
        assert_eq!(names, ["allocate", "hugepage", "dontfork"]);
    }

    #[test]
    fn failed_bind_leaves_nothing_and_can_be_retried() {
        let mut b = new("memory-backend-ram");
        for (p, v) in [("size", "1M"), ("host-nodes", "127"), ("policy", "bind")] {
            b.set(p, v).unwrap();
        }
        assert_eq!(
            msg(b.complete()),
            "cannot bind memory to host NUMA nodes: Invalid argument"
        );
        assert!(b.mapping().is_none() && !b.is_complete());
        b.set("policy", "preferred").unwrap();
        // Still node 127 (nodes accumulate, never shrink): still refused.
        assert!(b.complete().is_err());
    }

    #[test]
    fn late_prealloc_runs_immediately() {
        let mut b = new("memory-backend-memfd");
        b.set("size", "4M").unwrap();
        b.complete().unwrap();
        let m = b.mapping().unwrap();
        assert_eq!(resident_pages(m.as_ptr(), m.len()), 0);
        b.set("prealloc", "on").unwrap();
        assert_eq!(resident_pages(m.as_ptr(), m.len()), 1024);
        // Switching it off afterwards changes nothing.
        b.set("prealloc", "off").unwrap();
        assert_eq!(b.get("prealloc").unwrap(), "on");
    }

    #[test]
    fn reserve_off_maps_sparse_noreserve_memory() {
        let mut b = new("memory-backend-ram");
        b.set("size", "1T").unwrap();
        b.set("reserve", "off").unwrap();
        b.complete().unwrap();
        assert_eq!(
            b.trace()[0],
            Step::Allocate {
                noreserve: true,
                shared: false
            }
        );
        assert_eq!(b.mapping().unwrap().len(), 1 << 40);
    }

    #[test]
    fn progress_is_reported_through_the_backend() {
        use std::sync::Mutex;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let mut b = new("memory-backend-ram");
        b.set("size", "16M").unwrap();
        b.set("prealloc", "on").unwrap();
        b.set_prealloc_progress(Some(Arc::new(move |d, t| s2.lock().unwrap().push((d, t)))));
        b.complete().unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.first(), Some(&(0, 16 << 20)));
        assert_eq!(seen.last(), Some(&(16 << 20, 16 << 20)));
    }

    #[test]
    fn memdev_info_and_region_name() {
        let mut b = new("memory-backend-ram");
        b.set("size", "1M").unwrap();
        b.set("host-nodes", "0-1,3").unwrap();
        b.set("policy", "preferred").unwrap();
        let i = b.memdev_info();
        assert_eq!(i.host_nodes, "0-1,3");
        assert_eq!(i.policy, "preferred");
        assert_eq!(i.reserve, Some(true));
        assert_eq!(b.region_name(), "m");
        b.set("x-use-canonical-path-for-ramblock-id", "on").unwrap();
        assert_eq!(b.region_name(), "/objects/m");
    }

    #[test]
    fn discard_data_drops_the_file_content_on_deletion() {
        let path = format!("/dev/shm/hostmem-discard-{}", std::process::id());
        let _ = std::fs::remove_file(&path);
        for (discard, want) in [("off", 0x5a), ("on", 0)] {
            let mut f = new("memory-backend-file");
            for (p, v) in [("size", "1M"), ("mem-path", path.as_str()), ("share", "on")] {
                f.set(p, v).unwrap();
            }
            f.set("discard-data", discard).unwrap();
            f.complete().unwrap();
            // SAFETY: writing inside the backend's shared mapping.
            unsafe { f.mapping().unwrap().as_ptr().add(4096).write(0x5a) };
            drop(f);
            let data = std::fs::read(&path).unwrap();
            assert_eq!(data[4096], want, "discard-data={discard}");
        }
        std::fs::remove_file(&path).unwrap();
    }

    /// Reserves huge pages and mounts hugetlbfs through the project script; under CI a failure
    /// is a test failure, elsewhere the test is skipped with the reason printed.
    pub(crate) fn hugetlbfs() -> Option<String> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/hugepages-setup");
        let out = std::process::Command::new(script).output();
        match out {
            Ok(o) if o.status.success() => {
                Some(String::from_utf8_lossy(&o.stdout).trim().to_string())
            }
            other => {
                let why = format!("hugepages-setup failed: {other:?}");
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("{why}");
                }
                eprintln!("skipped: {why}");
                None
            }
        }
    }

    #[test]
    fn hugetlbfs_file_uses_huge_pages_and_preallocates() {
        let Some(dir) = hugetlbfs() else { return };
        let mut f = new("memory-backend-file");
        f.set("size", "1M").unwrap();
        f.set("mem-path", &dir).unwrap();
        assert_eq!(
            msg(f.complete()),
            "memory size 0x100000 must be equal to or larger than page size 0x200000"
        );
        f.set("size", "3M").unwrap();
        assert_eq!(
            msg(f.complete()),
            "backend 'memory-backend-file' memory size must be multiple of 2 MiB"
        );
        f.set("size", "4M").unwrap();
        f.set("align", "1M").unwrap();
        assert_eq!(
            msg(f.complete()),
            "alignment 0x100000 must be multiples of page size 0x200000"
        );
        let mut f = new("memory-backend-file");
        for (p, v) in [
            ("size", "4M"),
            ("mem-path", &dir),
            ("prealloc", "on"),
            ("prealloc-threads", "2"),
        ] {
            f.set(p, v).unwrap();
        }
        f.complete().unwrap();
        assert_eq!(f.page_size(), Some(2 << 20));
        let m = f.mapping().unwrap();
        assert_eq!(m.as_ptr() as usize % (2 << 20), 0);
        assert_eq!(resident_pages(m.as_ptr(), m.len()), 1024);
    }

    #[test]
    fn hugetlb_memfd_preallocates() {
        if hugetlbfs().is_none() {
            return;
        }
        let mut m = new("memory-backend-memfd");
        for (p, v) in [("size", "1M"), ("hugetlb", "on"), ("hugetlbsize", "2M")] {
            m.set(p, v).unwrap();
        }
        assert_eq!(
            msg(m.complete()),
            "backend 'memory-backend-memfd' memory size must be multiple of 2 MiB"
        );
        m.set("size", "4M").unwrap();
        m.set("prealloc", "on").unwrap();
        m.complete().unwrap();
        assert_eq!(m.page_size(), Some(2 << 20));
        let map = m.mapping().unwrap();
        assert_eq!(resident_pages(map.as_ptr(), map.len()), 1024);
    }
}
