//! The command-line parser over `-m`, `-object`, `-numa`, `-machine`, `-accel`, `-incoming`
//! and friends: the input is NUL-separated words. Parsing, and reading each -object's
//! options, may refuse but never panic. Nothing is created (no memory is mapped).
#![no_main]

use hostmem::objects::ObjectRegistry;
use hostmem::options::cmdline::Cmdline;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let words: Vec<&str> = s.split('\0').collect();
    let Ok(cmd) = Cmdline::parse(&words) else {
        return;
    };
    let objects = ObjectRegistry::default();
    for object in &cmd.objects {
        let _ = objects.parse_opts(&object.text);
    }
});
