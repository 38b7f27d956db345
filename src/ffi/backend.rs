//! INTERFACE STUB: exports to be written.
