//! The machine: one VM's configuration, its `/objects`, its memory system and its accelerator,
//! owned together and handed down by reference. Nothing below this module knows a machine
//! exists: backends, regions, RAMBlocks and KVM each get the part they work on.
//!
//! A machine's life, as QEMU's `qemu_init` runs it: [`Machine::from_cmdline`] (the generic
//! code: `-object` backends, `machine->ram`), then the board's own init (C code, run by the
//! caller), then [`Machine::finish_init`] (the accelerator takes the finished layout).
//!
//! - [`boards`]: board types and the registry `-M` looks names up in;
//! - [`options`]: applying `-machine`, `-m` and `-smp` (before QEMU's deprecation warning);
//! - `ram`: the RAM rules (memory-backend, the implicit backend, NUMA memdevs);
//! - [`numa`]: NUMA nodes, CPUs and distances, QEMU's checks;
//! - [`cpu`]: the x86 CPU's vendor and physical address width (`-cpu`);
//! - `legacy`: `memory_region_allocate_system_memory()` for unconverted boards.

pub mod boards;
pub mod cpu;
mod cpu_model;
mod legacy;
pub mod numa;
pub mod options;
mod ram;
pub mod run;
#[rustfmt::skip]
mod x86_cpu_data;

pub use boards::{BoardInfo, BoardRegistry};
pub use options::{resolve_ram_size, BoardHooks, MachineOptions, NoHooks};
pub use ram::BuildEnv;
pub use run::{GuestControl, Run, RunState};

use crate::backend::prealloc::Outcome;
use crate::backend::{Backend, BackendDefaults, PreallocJob};
use crate::error::{Error, HmErrorClass, Result};
use crate::kvm::{KvmAccel, KvmError};
use crate::memory::MemorySystem;
use crate::migration::section::SectionHandler;
use crate::migration::state::MigrationState;
use crate::migration::transport::IncomingUri;
use crate::objects::ObjectRegistry;
use crate::options::cmdline::{Accel, Cmdline};
use crate::region::RegionId;

/// Whether QEMU sends COMMAND SWITCHOVER_START for machine type `name`: machine types from 10.0
/// on, and the unversioned ones (`none`); `hw_compat_9_2` turns it off for older ones.
pub fn sends_switchover_start(name: &str) -> bool {
    let Some((_, version)) = name.rsplit_once('-') else {
        return true;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(_))) => major >= 10,
        _ => true,
    }
}

/// The lower of two slot size limits, 0 meaning "none".
fn lower_limit(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

fn no_configuration() -> Error {
    Error::generic("the machine has no configuration")
}

/// The machine as the generic code configured it from the command line.
pub struct MachineConfig {
    pub board: BoardInfo,
    pub ram_size: u64,
    pub maxram_size: u64,
    pub ram_slots: u64,
    /// `machine->ram`: the consumed backend's region, or the NUMA container.
    pub ram: Option<RegionId>,
    /// Id of the backend behind `machine->ram` (explicit or implicit).
    pub memdev: Option<String>,
    pub cmdline: Cmdline,
    /// The board's first CPU, for boards with an x86 CPU type.
    pub cpu: Option<cpu::X86Cpu>,
    /// The board's own machine properties that were given.
    pub board_properties: Vec<(String, u64)>,
    /// The `-numa node,memdev=` backends in node-id order (the legacy allocation needs them).
    pub numa_memdevs: Vec<String>,
    /// The KVM slot size limit the board set (QEMU's `kvm_set_max_memslot_size`); 0: none.
    pub board_max_slot_size: u64,
    /// Set once a board called the legacy allocation; a second call is refused.
    legacy_allocation: Option<String>,
    /// Memory the legacy call allocated outside `/objects` (kept alive with the machine).
    legacy_backends: Vec<Backend>,
}

/// One machine. Fields drop in declaration order: the accelerator first (its slots keep their
/// memory mapped by themselves, so this is tidiness, not safety), then the configuration and
/// the backends, then the region arena.
pub struct Machine {
    accel: Option<KvmAccel>,
    config: Option<MachineConfig>,
    objects: ObjectRegistry,
    memory: MemorySystem,
    /// What every new backend starts from (-mem-prealloc sugar, machine mem-merge, ...).
    backend_defaults: BackendDefaults,
    /// How many "cpu-memory-N" address spaces the dumps list beside "memory" (QEMU has one per
    /// vCPU, all sharing its root).
    cpu_address_spaces: u32,
    /// Whether the guest runs, and the VMM's hooks that pause and resume it.
    run: Run,
    /// Parameters, capabilities and the progress of migrations each way.
    migration: MigrationState,
    /// The VMM's own device state, migrated in the same stream as the RAM.
    sections: Vec<SharedSection>,
}

/// A device section as the machine keeps it: migrations run with the machine unlocked, so each
/// section has a lock of its own.
pub type SharedSection = std::sync::Arc<std::sync::Mutex<Box<dyn SectionHandler + Send>>>;

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl Machine {
    /// An empty machine: the "system" and "io" roots, no RAM, no board. What QEMU-style
    /// globals resolve to in a VMM that never built a machine from a command line.
    pub fn new() -> Machine {
        Machine {
            accel: None,
            config: None,
            objects: ObjectRegistry::default(),
            memory: MemorySystem::new(),
            backend_defaults: BackendDefaults::default(),
            cpu_address_spaces: 1,
            run: Run::default(),
            migration: MigrationState::default(),
            sections: Vec::new(),
        }
    }

    /// The generic half of building a machine from its command line, for callers without a
    /// board's hooks: the options applied ([`options::apply`]), then
    /// [`Machine::from_options`] on this host, QEMU's warnings dropped.
    pub fn from_cmdline(cmd: &Cmdline, board: &BoardInfo) -> Result<Machine> {
        let options = options::apply(cmd, board, &mut NoHooks)?;
        let mut env = BuildEnv {
            host: &cpu::ThisHost,
            warn: &mut |_| {},
        };
        Machine::from_options(cmd, board, &options, &mut env)
    }

    /// The generic half of building a machine once its options are applied: one
    /// "cpu-memory-N" space per CPU, then [`Machine::configure`]. The board's init runs next,
    /// then [`Machine::finish_init`].
    pub fn from_options(
        cmd: &Cmdline,
        board: &BoardInfo,
        options: &MachineOptions,
        env: &mut BuildEnv,
    ) -> Result<Machine> {
        if let Some(uri) = &cmd.incoming {
            // QEMU parses the URI while reading its options; it listens once the machine is up.
            IncomingUri::parse(uri)
                .map_err(|e| Error::from(e).prepend(&format!("-incoming {uri}: ")))?;
        }
        let mut m = Machine::new();
        m.cpu_address_spaces = match &cmd.smp {
            Some(_) => cmd.topology().cpus,
            None if board.no_cpus_by_default => 0,
            None => 1,
        };
        m.configure(cmd, board, options, env)?;
        m.run.state = if cmd.incoming.is_some() {
            RunState::InMigrate
        } else if cmd.start_paused {
            RunState::Prelaunch
        } else {
            RunState::Running
        };
        m.run.autostart = !cmd.start_paused;
        m.migration.send_switchover_start = cmd
            .send_switchover_start
            .unwrap_or_else(|| sends_switchover_start(&board.name));
        m.migration.no_configuration = cmd.send_configuration == Some(false);
        Ok(m)
    }

    /// What runs after the board's init: the accelerator the command line asked for takes the
    /// finished layout (its listener replays the flat view).
    pub fn finish_init(&mut self) -> Result<()> {
        let kvm = self
            .config
            .as_ref()
            .filter(|c| c.cmdline.accel == Some(Accel::Kvm))
            .map(|c| {
                (
                    lower_limit(c.cmdline.kvm_max_slot_size, c.board_max_slot_size),
                    !c.cmdline.kvm_skip_memslot_preflight,
                )
            });
        match kvm {
            Some((max_slot_size, preflight)) => self.attach_kvm_with(max_slot_size, preflight),
            None => Ok(()),
        }
    }

    pub fn config(&self) -> Option<&MachineConfig> {
        self.config.as_ref()
    }

    /// The value the command line gave the board's own property `name` (see
    /// [`boards::BoardProperty`]), as a number (a boolean is 0 or 1); `None` when it was not
    /// given (the board applies its default) or the machine is not configured.
    pub fn board_property(&self, name: &str) -> Option<u64> {
        self.config
            .as_ref()?
            .board_properties
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, v)| v)
    }

    /// QEMU's `kvm_set_max_memslot_size`, called by a board's init: KVM slots are cut at
    /// `size` at most (a `-accel kvm,max-slot-size` below it still wins). Only before the
    /// accelerator takes the layout, and a whole number of host pages.
    pub fn set_kvm_max_slot_size(&mut self, size: u64) -> Result<()> {
        let host_page = crate::hostmap::host_page_size() as u64;
        if self.accel.is_some() {
            return Err(Error::new(
                HmErrorClass::InUse,
                "kvm_set_max_memslot_size: the KVM slots exist already; call it from the board's init",
            ));
        }
        crate::kvm::slots::check_max_slot_size(size, host_page)?;
        let config = self.config.as_mut().ok_or_else(no_configuration)?;
        config.board_max_slot_size = size;
        Ok(())
    }

    pub fn memory(&self) -> &MemorySystem {
        &self.memory
    }

    pub fn memory_mut(&mut self) -> &mut MemorySystem {
        &mut self.memory
    }

    pub fn objects(&self) -> &ObjectRegistry {
        &self.objects
    }

    pub fn backend_defaults(&self) -> &BackendDefaults {
        &self.backend_defaults
    }

    pub fn cpu_address_spaces(&self) -> u32 {
        self.cpu_address_spaces
    }

    pub fn set_cpu_address_spaces(&mut self, n: u32) {
        self.cpu_address_spaces = n;
    }

    /// The KVM VM, when the machine has one.
    pub fn kvm(&self) -> Option<&KvmAccel> {
        self.accel.as_ref()
    }

    /// Attaches a new KVM VM: its listener joins the memory system and gets the current flat
    /// view replayed as slots. A slot size of 0 means the kernel's limit. The memslot
    /// preflight is on.
    pub fn attach_kvm(&mut self, max_slot_size: u64) -> Result<()> {
        self.attach_kvm_with(max_slot_size, true)
    }

    /// [`Self::attach_kvm`]; with `preflight`, a layout whose slots would cost the host more
    /// kernel memory than it can spare is refused before any slot is registered.
    pub fn attach_kvm_with(&mut self, max_slot_size: u64, preflight: bool) -> Result<()> {
        if self.accel.is_some() {
            return Err(KvmError::AlreadyAttached.into());
        }
        let accel = KvmAccel::open_with(
            max_slot_size,
            preflight.then(crate::kvm::cost::Preflight::of_host),
        )?;
        accel.preflight(&self.memory.current_sections())?;
        self.memory.add_listener(Box::new(accel.listener()))?;
        self.accel = Some(accel);
        Ok(())
    }

    /// Attaches the VM the VMM made itself (see [`KvmAccel::adopt`]); hostmem's slots avoid
    /// `vmm_slots`.
    pub fn adopt_kvm(&mut self, vm_fd: i32, max_slot_size: u64, vmm_slots: &[u32]) -> Result<()> {
        if self.accel.is_some() {
            return Err(KvmError::AlreadyAttached.into());
        }
        let accel = KvmAccel::adopt(vm_fd, max_slot_size, vmm_slots)?;
        self.memory.add_listener(Box::new(accel.listener()))?;
        self.accel = Some(accel);
        Ok(())
    }

    /// Detaches the VM: its listener leaves (every slot is removed on the way) and the VM is
    /// closed once no clone of it runs a vCPU any more.
    pub fn detach_kvm(&mut self) -> Result<()> {
        if self.accel.take().is_none() {
            return Err(KvmError::NotAttached.into());
        }
        self.memory.remove_listener(crate::kvm::LISTENER_NAME);
        Ok(())
    }

    /// `-object` / `object-add` without completing: parses `opts`, checks them and registers
    /// the backend. Returns its id.
    pub fn add_backend_uncompleted(&mut self, opts: &str) -> Result<String> {
        let (id, backend) = self.objects.build_from_opts(opts, &self.backend_defaults)?;
        self.objects.insert(backend)?;
        Ok(id)
    }

    /// A new uncompleted backend of QOM type `type_name`, with the machine's defaults.
    pub fn create_backend(&mut self, type_name: &str, id: &str) -> Result<()> {
        self.objects.create(type_name, id, &self.backend_defaults)
    }

    /// First half of completing backend `id`: allocate, advise, bind. The preallocation it
    /// returns runs without the machine (see [`crate::registry::run_unlocked`]).
    pub fn begin_backend_completion(&mut self, id: &str) -> Result<Option<PreallocJob>> {
        self.objects.begin_complete(id)
    }

    /// Second half: the preallocation's result, then the backend's RAM region.
    pub fn finish_backend_completion(
        &mut self,
        id: &str,
        prealloc: Option<crate::backend::Result<Outcome>>,
    ) -> Result<()> {
        self.objects.finish_complete(id, &mut self.memory, prealloc)
    }

    /// `object-del`: refused while the backend is mapped.
    pub fn delete_backend(&mut self, id: &str) -> Result<()> {
        self.objects.delete(id, &mut self.memory)
    }

    pub fn run(&self) -> &Run {
        &self.run
    }

    pub fn run_mut(&mut self) -> &mut Run {
        &mut self.run
    }

    pub fn migration(&self) -> &MigrationState {
        &self.migration
    }

    pub fn migration_mut(&mut self) -> &mut MigrationState {
        &mut self.migration
    }

    /// Adds a device section of the VMM's; an (idstr, instance) already taken is refused, as a
    /// stream could not tell the two apart.
    pub fn register_section(&mut self, section: Box<dyn SectionHandler + Send>) -> Result<()> {
        let (idstr, instance) = (section.idstr().to_string(), section.instance_id());
        let taken = self.sections.iter().any(|s| {
            let s = s.lock().unwrap_or_else(|p| p.into_inner());
            s.idstr() == idstr && s.instance_id() == instance
        });
        if taken {
            return Err(crate::error::Error::new(
                crate::error::HmErrorClass::Duplicate,
                format!("migration section '{idstr}' instance {instance} is already registered"),
            ));
        }
        if idstr.is_empty() || idstr.len() > 255 {
            return Err(crate::error::Error::invalid(format!(
                "migration section name \"{idstr}\" must be 1 to 255 bytes long"
            )));
        }
        self.sections
            .push(std::sync::Arc::new(std::sync::Mutex::new(section)));
        Ok(())
    }

    /// The VMM's device sections, in registration order (the order they go in the stream).
    pub fn sections(&self) -> Vec<SharedSection> {
        self.sections.clone()
    }

    /// The backend named `id`, for reading and changing its properties.
    pub fn backend_mut(&mut self, id: &str) -> Option<&mut Backend> {
        self.objects.get_mut(id).map(|e| &mut e.backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switchover_start_follows_qemus_machine_compat() {
        assert!(sends_switchover_start("pc-i440fx-10.0"));
        assert!(sends_switchover_start("none"));
        assert!(sends_switchover_start("s390-ccw-virtio-10.1"));
        assert!(!sends_switchover_start("pc-q35-9.2"));
        assert!(!sends_switchover_start("pc-i440fx-8.0"));
    }
}
