//! The value parsers of QEMU's option syntax: sizes, booleans, numbers, lists, key=value
//! strings. None may panic; a power-of-two size that parses prints back (as `info memdev`
//! does) to text that parses to the same bytes.
#![no_main]

use hostmem::options::values::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(bytes) = strtosz(s) {
        let printed = size_to_str(bytes);
        // size_to_str rounds to three significant digits; a whole unit prints exactly.
        if let Ok(back) = strtosz(&printed) {
            if bytes.is_power_of_two() {
                assert_eq!(back, bytes, "{s:?} -> {printed:?}");
            }
        }
    }
    let _ = parse_size(s);
    let _ = parse_size_param("size", s);
    let _ = parse_bool(s);
    let _ = parse_bool_param("share", s);
    let _ = parse_u32_param("prealloc-threads", s);
    let _ = parse_opts_number("slots", s);
    if let Ok(list) = parse_u16_list("host-nodes", s) {
        let _ = format_ranges(list.iter().map(|&v| u32::from(v)));
    }
    for implied in [None, Some("type")] {
        let _ = parse_keyval(s, implied);
    }
});
