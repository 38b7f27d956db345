//! KVM: memslots from the flat view, split at the slot limit, and dirty logging. INTERFACE STUB.

/// The KVM VM of one context (VM fd, vCPUs, slot table). INTERFACE STUB.
pub struct KvmHandle {}
