//! KVM: memslots from the flat view, split at the slot limit, and dirty logging. INTERFACE STUB.
