//! The `/objects` container of one context: user-creatable backends by id, each with the RAM
//! region that exposes its memory once complete.

use std::collections::BTreeMap;

use crate::backend::prealloc::Outcome;
use crate::backend::{props, Backend, BackendDefaults, BackendType, PreallocJob};
use crate::error::{Error, HmErrorClass, Result};
use crate::memory::MemorySystem;
use crate::options::values::parse_keyval;
use crate::options::OptionError;

/// An `-object` option string as read: the type, the id and the properties in the order
/// given, every value of the right syntax.
pub struct ObjectOpts {
    ty: BackendType,
    id: String,
    props: Vec<(String, String)>,
}

impl ObjectOpts {
    pub fn id(&self) -> &str {
        &self.id
    }
}
use crate::region::RegionId;

pub struct BackendEntry {
    pub backend: Backend,
    /// The RAM region over the backend's memory, once complete.
    pub region: Option<RegionId>,
    /// Unique within the process for this entry's lifetime: C handles name an entry by it, so
    /// a deleted and re-created id is a different object.
    pub serial: u64,
}

#[derive(Default)]
pub struct ObjectRegistry {
    entries: BTreeMap<String, BackendEntry>,
}

fn next_serial() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'.
fn id_wellformed(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|ch| ch.is_ascii_alphanumeric() || "-._".contains(ch))
}

impl ObjectRegistry {
    /// `-object` / `object-add`: parse a QEMU option string ("memory-backend-ram,id=m,size=1G";
    /// the leading bare word, or `qom-type=`, names the type), create, set, complete. Nothing
    /// is registered unless every step succeeds. Returns the id.
    pub fn add_from_opts(
        &mut self,
        opts: &str,
        defaults: &BackendDefaults,
        mem: &mut MemorySystem,
    ) -> Result<String> {
        let parsed = self.parse_opts(opts)?;
        self.add_parsed(parsed, defaults, mem)
    }

    /// [`Self::add_from_opts`] for an option string [`Self::parse_opts`] has read.
    pub fn add_parsed(
        &mut self,
        parsed: ObjectOpts,
        defaults: &BackendDefaults,
        mem: &mut MemorySystem,
    ) -> Result<String> {
        let id = parsed.id.clone();
        let backend = build(parsed, defaults)?;
        self.insert(backend)?;
        if let Err(e) = self.complete(&id, mem) {
            self.entries.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// Parses and checks `opts` into an uncompleted backend with every property set, without
    /// registering it.
    pub fn build_from_opts(
        &self,
        opts: &str,
        defaults: &BackendDefaults,
    ) -> Result<(String, Backend)> {
        let parsed = self.parse_opts(opts)?;
        let id = parsed.id.clone();
        Ok((id, build(parsed, defaults)?))
    }

    /// Reads an `-object` option string with every check QEMU makes while reading it (the
    /// errors QEMU reports at the option's location): the type, the id (well-formed and not
    /// taken), each value's syntax, the mandatory properties, unknown ones.
    pub fn parse_opts(&self, opts: &str) -> std::result::Result<ObjectOpts, OptionError> {
        let pairs = parse_keyval(opts, Some("qom-type"))?;
        let value = |k: &str| pairs.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v);
        let type_name = value("qom-type").ok_or_else(|| OptionError::Missing("qom-type".into()))?;
        let ty = BackendType::from_name(type_name).ok_or_else(|| OptionError::BadValue {
            name: "qom-type".into(),
            value: type_name.clone(),
        })?;
        let id = value("id").ok_or_else(|| OptionError::Missing("id".into()))?;
        if !id_wellformed(id) {
            return Err(OptionError::BadId);
        }
        if self.entries.contains_key(id.as_str()) {
            return Err(OptionError::DuplicateId(id.clone()));
        }
        // QEMU's parser first checks every value's syntax and the mandatory members in schema
        // order, then refuses leftovers; only then do the property setters run (in the order
        // given), with their own checks (size 0, prealloc with reserve=off, node range).
        for prop in props::schema_order(ty) {
            match value(prop) {
                Some(v) => props::check_syntax(prop, v)?,
                None if props::required(ty, prop) => {
                    return Err(OptionError::Missing(prop.to_string()))
                }
                None => {}
            }
        }
        if let Some((key, _)) = pairs
            .iter()
            .find(|(k, _)| k != "qom-type" && k != "id" && !props::exists(ty, k))
        {
            return Err(OptionError::InvalidParameter(key.clone()));
        }
        let id = id.clone();
        let props = pairs
            .into_iter()
            .filter(|(k, _)| k != "qom-type" && k != "id")
            .collect();
        Ok(ObjectOpts { ty, id, props })
    }

    /// Registers an uncompleted backend built elsewhere.
    pub fn insert(&mut self, backend: Backend) -> Result<()> {
        let id = backend.id().to_string();
        if self.entries.contains_key(&id) {
            return Err(duplicate(&id));
        }
        self.entries.insert(
            id,
            BackendEntry {
                backend,
                region: None,
                serial: next_serial(),
            },
        );
        Ok(())
    }

    /// Creates an uncompleted backend.
    pub fn create(&mut self, type_name: &str, id: &str, defaults: &BackendDefaults) -> Result<()> {
        if BackendType::from_name(type_name).is_none() {
            return Err(Error::invalid(format!(
                "Parameter 'qom-type' does not accept value '{type_name}'"
            )));
        }
        if !id_wellformed(id) {
            return Err(OptionError::BadId.into());
        }
        if self.entries.contains_key(id) {
            return Err(duplicate(id));
        }
        self.insert(Backend::new(type_name, id, defaults)?)
    }

    /// Completes a backend and creates its RAM region.
    pub fn complete(&mut self, id: &str, mem: &mut MemorySystem) -> Result<()> {
        let job = self.begin_complete(id)?;
        let result = job.map(|j| j.run());
        self.finish_complete(id, mem, result)
    }

    /// First half of [`ObjectRegistry::complete`]: allocate, advise, bind. The returned job (if
    /// any) may run without any lock held.
    pub fn begin_complete(&mut self, id: &str) -> Result<Option<PreallocJob>> {
        Ok(self.entry_mut(id)?.backend.begin_complete()?)
    }

    /// Second half: records the preallocation result and creates the backend's RAM region
    /// (an unnamed RAMBlock, not migratable until a consumer registers it). On error the
    /// backend is left uncompleted with nothing allocated.
    pub fn finish_complete(
        &mut self,
        id: &str,
        mem: &mut MemorySystem,
        prealloc: Option<crate::backend::Result<Outcome>>,
    ) -> Result<()> {
        let entry = self.entry_mut(id)?;
        entry.backend.finish_complete(prealloc)?;
        let b = &entry.backend;
        let mapping = b.mapping().expect("a complete backend has memory");
        match mem.new_ram_region(&b.region_name(), mapping, 0, b.size(), b.is_readonly()) {
            Ok(r) => {
                entry.region = Some(r);
                Ok(())
            }
            Err(e) => {
                entry.backend.abort_complete();
                Err(e)
            }
        }
    }

    /// `object-del`: refused while mapped.
    pub fn delete(&mut self, id: &str, mem: &mut MemorySystem) -> Result<()> {
        let entry = self.entry_mut(id)?;
        if entry.backend.is_mapped() {
            return Err(Error::new(
                HmErrorClass::InUse,
                format!("object '{id}' is in use, can not be deleted"),
            ));
        }
        if entry.backend.is_completing() {
            // Its preallocation runs with the machine unlocked; deleting it now would let the
            // completion's second half find another object of the same id, or none.
            return Err(Error::new(
                HmErrorClass::InUse,
                format!("object '{id}' is in use, can not be deleted: it is being preallocated"),
            ));
        }
        if entry.backend.pins() > 0 {
            // QEMU has no such reference: a VMM's own use of the memory (its KVM slots, DMA)
            // is invisible to it, and object-del unmaps memory still in use.
            return Err(Error::new(
                HmErrorClass::InUse,
                format!(
                    "object '{id}' is in use, can not be deleted: the VMM holds {} pin(s) on its memory",
                    entry.backend.pins()
                ),
            )
            .with_hint("Release them with hm_memory_pin_release first.\n"));
        }
        if let Some(r) = entry.region {
            mem.destroy_region(r)?;
        }
        self.entries.remove(id);
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&BackendEntry> {
        self.entries.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut BackendEntry> {
        self.entries.get_mut(id)
    }

    /// The entry whose serial is `serial` (C handles).
    pub fn by_serial(&self, serial: u64) -> Option<&BackendEntry> {
        self.entries.values().find(|e| e.serial == serial)
    }

    pub fn by_serial_mut(&mut self, serial: u64) -> Option<&mut BackendEntry> {
        self.entries.values_mut().find(|e| e.serial == serial)
    }

    fn entry_mut(&mut self, id: &str) -> Result<&mut BackendEntry> {
        self.entries
            .get_mut(id)
            .ok_or_else(|| Error::new(HmErrorClass::NotFound, format!("object '{id}' not found")))
    }

    /// Every backend, in id order.
    pub fn entries(&self) -> impl Iterator<Item = &BackendEntry> {
        self.entries.values()
    }

    /// Ids in `info memdev` order (sorted).
    pub fn ids(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }
}

/// An uncompleted backend with every property of `parsed` set, in the order given: the
/// setters' refusals (a size of 0, prealloc with reserve=off) come from here.
fn build(parsed: ObjectOpts, defaults: &BackendDefaults) -> Result<Backend> {
    let mut backend = Backend::of_type(parsed.ty, &parsed.id, defaults);
    for (key, v) in &parsed.props {
        backend.set(key, v)?;
    }
    Ok(backend)
}

fn duplicate(id: &str) -> Error {
    OptionError::DuplicateId(id.to_string()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (ObjectRegistry, MemorySystem, BackendDefaults) {
        (
            ObjectRegistry::default(),
            MemorySystem::new(),
            BackendDefaults::default(),
        )
    }

    #[test]
    fn add_creates_completes_and_makes_an_unnamed_region() {
        let (mut o, mut mem, d) = setup();
        let id = o
            .add_from_opts("memory-backend-ram,id=mem0,size=4M", &d, &mut mem)
            .unwrap();
        assert_eq!(id, "mem0");
        let e = o.get("mem0").unwrap();
        assert!(e.backend.is_complete());
        let r = e.region.unwrap();
        assert_eq!(mem.region_size(r).unwrap(), 4 << 20);
        let block = mem.ram_block_of(r).unwrap();
        let rb = mem.ramblocks.get(block).unwrap();
        assert_eq!(rb.idstr, "");
        assert!(!rb.migratable);
        assert_eq!(o.ids(), ["mem0"]);
        // qom-type= works as the leading bare word does.
        o.add_from_opts("qom-type=memory-backend-memfd,id=f,size=1M", &d, &mut mem)
            .unwrap();
        assert_eq!(o.ids(), ["f", "mem0"]);
    }

    #[test]
    fn option_parser_refusals_use_qemu_10_words() {
        let (mut o, mut mem, d) = setup();
        o.add_from_opts("memory-backend-ram,id=m,size=1M", &d, &mut mem)
            .unwrap();
        let cases = [
            ("memory-backend-foo,id=x,size=1M", "Parameter 'qom-type' does not accept value 'memory-backend-foo'"),
            ("id=x,size=1M", "Parameter 'qom-type' is missing"),
            ("memory-backend-ram,size=1M", "Parameter 'id' is missing"),
            ("memory-backend-ram,id=x", "Parameter 'size' is missing"),
            ("memory-backend-file,id=x,size=1M", "Parameter 'mem-path' is missing"),
            ("memory-backend-ram,id=x,size=1M,foo=1", "Invalid parameter 'foo'"),
            ("memory-backend-ram,id=x,size=1M,mem-path=/tmp", "Invalid parameter 'mem-path'"),
            ("memory-backend-ram,id=x,size=abc", "Parameter 'size' expects a size value"),
            ("memory-backend-ram,id=x,size=0", "property 'size' of memory-backend-ram doesn't take value '0'"),
            ("memory-backend-ram,id=x,size=1M,merge=maybe", "Parameter 'merge' expects 'on' or 'off'"),
            ("memory-backend-ram,id=m,size=1M", "Duplicate ID 'm' for object"),
            ("memory-backend-ram,id=1x,size=1M", "Parameter 'id' expects an identifier"),
            ("memory-backend-ram,id=x,size=1M,host-nodes=0", "host-nodes must be empty for policy default, or you should explicitly specify a policy other than default"),
            // QEMU 10's order: duplicate id, then syntax in schema order, then leftovers, then
            // the setters' own checks.
            ("memory-backend-ram,id=m,size=abc", "Duplicate ID 'm' for object"),
            ("memory-backend-ram,id=x,foo=1,size=abc", "Parameter 'size' expects a size value"),
            ("memory-backend-ram,id=x,foo=1", "Parameter 'size' is missing"),
            ("memory-backend-ram,id=x,size=0,foo=1", "Invalid parameter 'foo'"),
            ("memory-backend-ram,id=x,merge=maybe,size=abc", "Parameter 'merge' expects 'on' or 'off'"),
            ("memory-backend-ram,id=x,host-nodes=200,size=abc", "Parameter 'size' expects a size value"),
            ("memory-backend-ram,id=x,prealloc=on,reserve=off,size=0", "'prealloc=on' and 'reserve=off' are incompatible"),
            ("memory-backend-file,id=x,size=1M,rom=x,readonly=x,pmem=x", "Parameter 'mem-path' is missing"),
            ("memory-backend-file,id=x,size=1M,discard-data=x,mem-path=/tmp", "Parameter 'discard-data' expects 'on' or 'off'"),
            ("memory-backend-memfd,id=x,size=1M,seal=x,hugetlbsize=x", "Parameter 'hugetlbsize' expects a size value"),
        ];
        for (opts, msg) in cases {
            let e = o.add_from_opts(opts, &d, &mut mem).unwrap_err();
            assert_eq!(e.message(), msg, "{opts}");
        }
        assert_eq!(o.ids(), ["m"], "failed adds leave nothing behind");
        let e = o
            .add_from_opts("memory-backend-ram,id=a/b,size=1M", &d, &mut mem)
            .unwrap_err();
        assert_eq!(
            e.hint(),
            Some(
                "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n"
            )
        );
    }

    #[test]
    fn delete_refused_while_pinned_and_the_pin_keeps_the_memory() {
        let (mut o, mut mem, d) = setup();
        o.add_from_opts("memory-backend-ram,id=m,size=1M", &d, &mut mem)
            .unwrap();
        let b = &mut o.get_mut("m").unwrap().backend;
        let first = b.pin().unwrap();
        let second = b.pin().unwrap();
        assert_eq!(b.pins(), 2);
        let e = o.delete("m", &mut mem).unwrap_err();
        assert_eq!(
            e.message(),
            "object 'm' is in use, can not be deleted: the VMM holds 2 pin(s) on its memory"
        );
        assert_eq!(e.class(), HmErrorClass::InUse);
        let b = &mut o.get_mut("m").unwrap().backend;
        b.unpin();
        b.unpin();
        b.unpin();
        assert_eq!(b.pins(), 0);
        o.delete("m", &mut mem).unwrap();
        // The memory outlives the backend while a pin's mapping is held.
        // SAFETY: the mapping is 1 MiB of writable anonymous memory kept alive by `first`.
        unsafe { *first.as_ptr() = 7 };
        drop(first);
        // SAFETY: still mapped through `second`, which shares the mapping.
        assert_eq!(unsafe { *second.as_ptr() }, 7);
    }

    #[test]
    fn pinning_an_uncompleted_backend_is_refused() {
        let (mut o, mut mem, d) = setup();
        o.create("memory-backend-ram", "n", &d).unwrap();
        let _ = &mut mem;
        let e = Error::from(o.get_mut("n").unwrap().backend.pin().unwrap_err());
        assert_eq!(
            e.message(),
            "memory backend 'n' has no memory yet: complete it first"
        );
    }

    #[test]
    fn delete_refused_while_mapped() {
        let (mut o, mut mem, d) = setup();
        o.add_from_opts("memory-backend-ram,id=m,size=1M", &d, &mut mem)
            .unwrap();
        o.get_mut("m").unwrap().backend.set_mapped(true);
        let e = o.delete("m", &mut mem).unwrap_err();
        assert_eq!(e.message(), "object 'm' is in use, can not be deleted");
        assert_eq!(e.class(), HmErrorClass::InUse);
        o.get_mut("m").unwrap().backend.set_mapped(false);
        o.delete("m", &mut mem).unwrap();
        assert!(o.get("m").is_none());
        assert_eq!(
            o.delete("m", &mut mem).unwrap_err().message(),
            "object 'm' not found"
        );
    }

    #[test]
    fn delete_refused_while_its_preallocation_runs_unlocked() {
        let (mut o, mut mem, d) = setup();
        let (id, backend) = o
            .build_from_opts("memory-backend-ram,id=p,size=4M,prealloc=on", &d)
            .unwrap();
        o.insert(backend).unwrap();
        let job = o
            .begin_complete(&id)
            .unwrap()
            .expect("prealloc=on gives a job");
        let e = o.delete("p", &mut mem).unwrap_err();
        assert_eq!(
            e.message(),
            "object 'p' is in use, can not be deleted: it is being preallocated"
        );
        assert_eq!(e.class(), HmErrorClass::InUse);
        let outcome = job.run();
        o.finish_complete("p", &mut mem, Some(outcome)).unwrap();
        assert!(o.get("p").unwrap().backend.is_complete());
        o.delete("p", &mut mem).unwrap();
    }

    #[test]
    fn create_set_complete_step_by_step() {
        let (mut o, mut mem, d) = setup();
        o.create("memory-backend-file", "f", &d).unwrap();
        assert_eq!(
            o.create("memory-backend-ram", "f", &d)
                .unwrap_err()
                .message(),
            "Duplicate ID 'f' for object"
        );
        let e = o.get_mut("f").unwrap();
        e.backend.set("size", "2M").unwrap();
        assert_eq!(
            o.complete("f", &mut mem).unwrap_err().message(),
            "mem-path property not set"
        );
        let dir = std::env::temp_dir();
        let e = o.get_mut("f").unwrap();
        e.backend.set("mem-path", dir.to_str().unwrap()).unwrap();
        e.backend
            .set("x-use-canonical-path-for-ramblock-id", "on")
            .unwrap();
        o.complete("f", &mut mem).unwrap();
        let e = o.get("f").unwrap();
        assert_eq!(e.backend.region_name(), "/objects/f");
        assert!(e.region.is_some());
        let serial = e.serial;
        assert_eq!(o.by_serial(serial).unwrap().backend.id(), "f");
    }
}
