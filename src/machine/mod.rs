//! The machine: one VM's configuration, its `/objects`, its memory system and its accelerator,
//! owned together and handed down by reference. Nothing below this module knows a machine
//! exists: backends, regions, RAMBlocks and KVM each get the part they work on.
//!
//! A machine's life, as QEMU's `qemu_init` runs it: [`Machine::from_cmdline`] (the generic
//! code: `-object` backends, `machine->ram`), then the board's own init (C code, run by the
//! caller), then [`Machine::finish_init`] (the accelerator takes the finished layout).
//!
//! - [`boards`]: board types and the registry `-M` looks names up in;
//! - `ram`: the RAM rules (`-m`, memory-backend, the implicit backend, NUMA memdevs);
//! - `legacy`: `memory_region_allocate_system_memory()` for unconverted boards.

pub mod boards;
mod legacy;
mod ram;

pub use boards::{BoardInfo, BoardRegistry};
pub use ram::resolve_ram_size;

use crate::backend::prealloc::Outcome;
use crate::backend::{Backend, BackendDefaults, PreallocJob};
use crate::error::Result;
use crate::kvm::{KvmAccel, KvmError};
use crate::memory::MemorySystem;
use crate::objects::ObjectRegistry;
use crate::options::cmdline::{Accel, Cmdline};
use crate::region::RegionId;

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
}

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
        }
    }

    /// The generic half of building a machine from its command line: one "cpu-memory-N" space
    /// per CPU, then [`Machine::configure`]. The board's init runs next, then
    /// [`Machine::finish_init`].
    pub fn from_cmdline(cmd: &Cmdline, board: &BoardInfo) -> Result<Machine> {
        let mut m = Machine::new();
        m.cpu_address_spaces = cmd
            .smp_cpus
            .unwrap_or(if board.no_cpus_by_default { 0 } else { 1 });
        m.configure(cmd, board)?;
        Ok(m)
    }

    /// What runs after the board's init: the accelerator the command line asked for takes the
    /// finished layout (its listener replays the flat view).
    pub fn finish_init(&mut self) -> Result<()> {
        let kvm = self
            .config
            .as_ref()
            .filter(|c| c.cmdline.accel == Some(Accel::Kvm))
            .map(|c| c.cmdline.kvm_max_slot_size);
        match kvm {
            Some(max_slot_size) => self.attach_kvm(max_slot_size),
            None => Ok(()),
        }
    }

    pub fn config(&self) -> Option<&MachineConfig> {
        self.config.as_ref()
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
    /// view replayed as slots. A slot size of 0 means the kernel's limit.
    pub fn attach_kvm(&mut self, max_slot_size: u64) -> Result<()> {
        if self.accel.is_some() {
            return Err(KvmError::AlreadyAttached.into());
        }
        let accel = KvmAccel::open(max_slot_size)?;
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

    /// The backend named `id`, for reading and changing its properties.
    pub fn backend_mut(&mut self, id: &str) -> Option<&mut Backend> {
        self.objects.get_mut(id).map(|e| &mut e.backend)
    }
}
