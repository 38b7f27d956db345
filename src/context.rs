//! One context per machine: everything a VMM's QEMU-style globals (`get_system_memory()`,
//! `/objects`, the RAM list) resolve to. Two machines in one process are two contexts; the C
//! globals resolve to the *current* one.
//!
//! Locking rule: a context's mutex is held only inside hostmem, never across a call into C
//! (board init callbacks, progress callbacks), so C code called from hostmem may call hostmem.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::backend::BackendDefaults;
use crate::error::{Error, HmErrorClass, Result};
use crate::memory::MemorySystem;
use crate::objects::ObjectRegistry;

pub type ContextId = u32;

/// Fields drop in declaration order: the KVM VM goes first, so no memslot ever points at memory
/// that was already unmapped; the machine and backends go before the region arena.
pub struct Context {
    pub id: ContextId,
    /// The KVM VM attached to this context, if any (owned by `kvm`).
    pub kvm: Option<crate::kvm::KvmHandle>,
    /// The machine built in this context, once configured (owned by `machine`).
    pub machine: Option<crate::machine::MachineRuntime>,
    pub objects: ObjectRegistry,
    pub memory: MemorySystem,
    /// Defaults every new backend takes (-mem-prealloc sugar, machine mem-merge, ...).
    pub backend_defaults: BackendDefaults,
}

impl Context {
    fn new(id: ContextId) -> Self {
        Context {
            id,
            memory: MemorySystem::new(),
            objects: ObjectRegistry::default(),
            backend_defaults: BackendDefaults::default(),
            machine: None,
            kvm: None,
        }
    }
}

struct Table {
    slots: Vec<Option<Arc<Mutex<Context>>>>,
    current: Option<ContextId>,
}

fn table() -> MutexGuard<'static, Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            Mutex::new(Table {
                slots: Vec::new(),
                current: None,
            })
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Creates a new, empty context and returns its id (never one used before). It does not
/// become current.
pub fn create() -> ContextId {
    // Ids are never reused: a MemoryRegion handle kept past hm_machine_free must name nothing,
    // not a region of the next machine that happened to get the same id.
    let mut t = table();
    let id = t.slots.len();
    t.slots
        .push(Some(Arc::new(Mutex::new(Context::new(id as ContextId)))));
    id as ContextId
}

/// The current context, created on first use so that a VMM that never heard of contexts (one
/// machine per process, as in QEMU) works unchanged.
pub fn current() -> Arc<Mutex<Context>> {
    let id = {
        let t = table();
        t.current
            .and_then(|c| t.slots.get(c as usize).cloned().flatten().map(|_| c))
    };
    let id = match id {
        Some(id) => id,
        None => {
            let id = create();
            table().current = Some(id);
            id
        }
    };
    get(id).expect("a context just made current exists")
}

/// The current context's id, without creating one when there is none.
pub fn current_if_any() -> Option<ContextId> {
    let t = table();
    t.current
        .filter(|&c| matches!(t.slots.get(c as usize), Some(Some(_))))
}

pub fn current_id() -> ContextId {
    let ctx = current();
    let id = lock(&ctx).id;
    id
}

pub fn set_current(id: ContextId) -> Result<()> {
    let mut t = table();
    if t.slots.get(id as usize).map(Option::is_some) != Some(true) {
        return Err(Error::new(
            HmErrorClass::NotFound,
            format!("no hostmem context {id}"),
        ));
    }
    t.current = Some(id);
    Ok(())
}

pub fn get(id: ContextId) -> Option<Arc<Mutex<Context>>> {
    table().slots.get(id as usize).cloned().flatten()
}

/// Drops a context (its regions, RAMBlocks and backends); memory is unmapped once nothing else
/// holds it.
pub fn destroy(id: ContextId) -> Result<()> {
    let ctx = {
        let mut t = table();
        let slot = t.slots.get_mut(id as usize).ok_or_else(|| {
            Error::new(HmErrorClass::NotFound, format!("no hostmem context {id}"))
        })?;
        let ctx = slot.take();
        if t.current == Some(id) {
            t.current = None;
        }
        ctx
    };
    drop(ctx);
    Ok(())
}

/// Locks a context; a panic while it was held (already reported at the ABI) does not make the
/// context unusable.
pub fn lock(ctx: &Arc<Mutex<Context>>) -> MutexGuard<'_, Context> {
    ctx.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on the current context.
pub fn with_current<R>(f: impl FnOnce(&mut Context) -> R) -> R {
    let ctx = current();
    let mut guard = lock(&ctx);
    f(&mut guard)
}

/// Runs `f` on context `id`.
pub fn with<R>(id: ContextId, f: impl FnOnce(&mut Context) -> Result<R>) -> Result<R> {
    let ctx = get(id)
        .ok_or_else(|| Error::new(HmErrorClass::NotFound, format!("no hostmem context {id}")))?;
    let mut guard = lock(&ctx);
    f(&mut guard)
}
