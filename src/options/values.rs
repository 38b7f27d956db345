//! Values in QEMU's syntax: sizes, booleans, node lists, and `key=value,...` option strings.
//! INTERFACE STUB: bodies to be written.

use crate::error::Result;

/// "1G", "512M", "4096" (bytes when bare), as QEMU's size visitor reads them.
pub fn parse_size(_s: &str) -> Result<u64> {
    todo!()
}

/// on/off/yes/no/true/false.
pub fn parse_bool(_s: &str) -> Result<bool> {
    todo!()
}

/// QEMU's size_to_str: "4 KiB", "32 MiB", "1.50 GiB".
pub fn size_to_str(_bytes: u64) -> String {
    todo!()
}

/// An option string "first,key=value,key2=value2" split in QEMU's way (",," escapes a comma).
/// `implied_key` names the key of a leading bare value ("type" for -object, "size" for -m).
pub fn parse_keyval(_s: &str, _implied_key: Option<&str>) -> Result<Vec<(String, String)>> {
    todo!()
}
