//! The machines of this process, for callers that address them by id and by "the current one"
//! (the C ABI's QEMU-style globals: `get_system_memory()`, backends by id, the RAM list).
//! Rust code that owns its [`Machine`] needs none of this.
//!
//! Locking rule: a machine's mutex is held only inside hostmem, never across a call into C
//! (board init, progress callbacks) and never across slow work: [`run_unlocked`] is the one
//! place where work that takes long (a preallocation, a guest run, a precopy round) runs with
//! the machine unlocked, so C code called from it may call hostmem, and the guest keeps running
//! while the machine changes.

pub mod hmp;
pub mod migrate;
pub mod transports;

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::error::{Error, HmErrorClass, Result};
use crate::machine::{BoardInfo, BuildEnv, Machine, MachineOptions};
use crate::options::cmdline::Cmdline;

/// A machine's number in this process; never reused, so a handle kept past the machine's end
/// names nothing rather than a later machine.
pub type MachineId = u32;

struct Table {
    machines: Vec<Option<Arc<Mutex<Machine>>>>,
    current: Option<MachineId>,
}

fn table() -> MutexGuard<'static, Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            Mutex::new(Table {
                machines: Vec::new(),
                current: None,
            })
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn no_machine(id: MachineId) -> Error {
    Error::new(HmErrorClass::NotFound, format!("no hostmem machine {id}"))
}

/// Adds a machine and returns its id. It does not become current.
pub fn insert(machine: Machine) -> MachineId {
    let mut t = table();
    let id = t.machines.len() as MachineId;
    t.machines.push(Some(Arc::new(Mutex::new(machine))));
    id
}

fn get(id: MachineId) -> Result<Arc<Mutex<Machine>>> {
    table()
        .machines
        .get(id as usize)
        .cloned()
        .flatten()
        .ok_or_else(|| no_machine(id))
}

/// Whether machine `id` still exists.
pub fn exists(id: MachineId) -> bool {
    get(id).is_ok()
}

/// The current machine's id. A process that never built a machine gets an empty one on first
/// use, so a VMM written for QEMU's globals works unchanged.
pub fn current_id() -> MachineId {
    if let Some(id) = current_if_any() {
        return id;
    }
    let id = insert(Machine::new());
    let mut t = table();
    // Another thread may have made one meanwhile: the first stays current.
    match t
        .current
        .filter(|&c| matches!(t.machines.get(c as usize), Some(Some(_))))
    {
        Some(c) => c,
        None => {
            t.current = Some(id);
            id
        }
    }
}

/// The current machine's id, without creating one when there is none.
pub fn current_if_any() -> Option<MachineId> {
    let t = table();
    t.current
        .filter(|&c| matches!(t.machines.get(c as usize), Some(Some(_))))
}

pub fn set_current(id: MachineId) -> Result<()> {
    let mut t = table();
    if !matches!(t.machines.get(id as usize), Some(Some(_))) {
        return Err(no_machine(id));
    }
    t.current = Some(id);
    Ok(())
}

/// Removes machine `id`. It is dropped (its slots, regions, RAMBlocks and backends) once
/// nothing else holds it; memory is unmapped once nothing maps it.
pub fn remove(id: MachineId) -> Result<()> {
    let machine = {
        let mut t = table();
        let slot = t
            .machines
            .get_mut(id as usize)
            .ok_or_else(|| no_machine(id))?;
        let m = slot.take().ok_or_else(|| no_machine(id))?;
        if t.current == Some(id) {
            t.current = None;
        }
        m
    };
    // A migration's thread calls the VMM's hooks, which must not outlive the machine: it is
    // cancelled (it finds the machine gone at its next step anyway) and waited for.
    let migrations = {
        let m = lock(&machine);
        [
            m.migration().outgoing.clone(),
            m.migration().incoming.clone(),
        ]
    };
    for p in migrations.into_iter().flatten() {
        if !p.status().is_finished() {
            p.cancel();
            p.wait();
        }
    }
    // Dropped here, outside the table lock: a machine's drop may take a while (munmap).
    drop(machine);
    Ok(())
}

/// Locks a machine; a panic while it was held (already reported at the ABI) does not make it
/// unusable.
fn lock(m: &Arc<Mutex<Machine>>) -> MutexGuard<'_, Machine> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on machine `id`.
pub fn with<R>(id: MachineId, f: impl FnOnce(&mut Machine) -> Result<R>) -> Result<R> {
    let m = get(id)?;
    let mut guard = lock(&m);
    f(&mut guard)
}

/// Runs `f` on the current machine (made on first use, see [`current_id`]).
pub fn with_current<R>(f: impl FnOnce(MachineId, &mut Machine) -> Result<R>) -> Result<R> {
    let id = current_id();
    with(id, |m| f(id, m))
}

/// Slow work on machine `id` without holding its lock: `begin` takes what the work needs from
/// the locked machine, `work` runs unlocked, `finish` records the outcome on the locked
/// machine again. Meanwhile other threads may use the machine (change its layout, read its
/// dirty log) and the work may call back into hostmem. A machine removed meanwhile stays alive
/// until `finish` has run on it.
pub fn run_unlocked<J, O, R>(
    id: MachineId,
    begin: impl FnOnce(&mut Machine) -> Result<J>,
    work: impl FnOnce(J) -> O,
    finish: impl FnOnce(&mut Machine, O) -> Result<R>,
) -> Result<R> {
    let m = get(id)?;
    let job = begin(&mut lock(&m))?;
    let outcome = work(job);
    let r = finish(&mut lock(&m), outcome);
    r
}

/// Completes backend `id` of machine `mid`: allocate, advise and bind locked, preallocate
/// unlocked (its progress callback may call hostmem), finish locked. On failure the backend is
/// uncompleted again with nothing allocated; `remove_on_error` also deletes it (a backend
/// made and completed in one call leaves nothing behind).
pub fn complete_backend(mid: MachineId, id: &str, remove_on_error: bool) -> Result<()> {
    let forget = |m: &mut Machine, e: Error| {
        if remove_on_error {
            let _ = m.delete_backend(id);
        }
        e
    };
    run_unlocked(
        mid,
        |m| m.begin_backend_completion(id).map_err(|e| forget(m, e)),
        |job| job.as_ref().map(|j| j.run()),
        |m, outcome| {
            m.finish_backend_completion(id, outcome)
                .map_err(|e| forget(m, e))
        },
    )
}

/// Sets a backend property. `prealloc=on` on a complete backend preallocates right away, with
/// the machine unlocked (the progress callback may call hostmem).
pub fn set_backend_property(mid: MachineId, id: &str, prop: &str, value: &str) -> Result<()> {
    let gone = || Error::new(HmErrorClass::NotFound, "memory backend no longer exists");
    if prop == "prealloc" && crate::options::values::parse_bool(value) == Ok(true) {
        let ran = run_unlocked(
            mid,
            |m| Ok(m.backend_mut(id).ok_or_else(gone)?.begin_late_prealloc()?),
            |job| job.map(|j| j.run()),
            |m, outcome| match outcome {
                Some(r) => {
                    m.backend_mut(id)
                        .ok_or_else(gone)?
                        .finish_late_prealloc(r)?;
                    Ok(true)
                }
                None => Ok(false),
            },
        )?;
        if ran {
            return Ok(());
        }
    }
    with(mid, |m| {
        Ok(m.backend_mut(id).ok_or_else(gone)?.set(prop, value)?)
    })
}

/// A machine being built: configured by the generic code, registered and current, waiting for
/// the board's init. Dropped without [`PendingMachine::commit`], it is removed again and the
/// machine that was current before is current again, as if it had never been tried.
pub struct PendingMachine {
    id: MachineId,
    previous: Option<MachineId>,
    committed: bool,
}

impl PendingMachine {
    /// Configures a machine for `board` from `cmd` ([`Machine::from_cmdline`]: no board hooks,
    /// QEMU's warnings dropped), registers it and makes it current, so the board's init may
    /// use QEMU-style globals.
    pub fn start(cmd: &Cmdline, board: &BoardInfo) -> Result<PendingMachine> {
        PendingMachine::register(Machine::from_cmdline(cmd, board)?)
    }

    /// [`PendingMachine::start`] for a C board: `cmd` with its `options` applied through the
    /// board's hooks, warnings printed through `env` ([`Machine::from_options`]).
    pub fn start_with(
        cmd: &Cmdline,
        board: &BoardInfo,
        options: &MachineOptions,
        env: &mut BuildEnv,
    ) -> Result<PendingMachine> {
        PendingMachine::register(Machine::from_options(cmd, board, options, env)?)
    }

    fn register(machine: Machine) -> Result<PendingMachine> {
        let previous = current_if_any();
        let id = insert(machine);
        let pending = PendingMachine {
            id,
            previous,
            committed: false,
        };
        // Dropping `pending` on failure removes the machine again.
        set_current(id)?;
        Ok(pending)
    }

    pub fn id(&self) -> MachineId {
        self.id
    }

    /// After the board's init: [`Machine::finish_init`] (the accelerator). On error the
    /// machine is still pending; dropping it removes it.
    pub fn finish_init(&mut self) -> Result<()> {
        with(self.id, Machine::finish_init)
    }

    /// The machine is built and stays.
    pub fn commit(mut self) -> MachineId {
        self.committed = true;
        self.id
    }
}

impl Drop for PendingMachine {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let _ = remove(self.id);
        if let Some(prev) = self.previous {
            let _ = set_current(prev);
        }
    }
}
