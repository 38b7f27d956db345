//! Generates the C header from the Rust exports into `$OUT_DIR/hostmem.h`.
//!
//! The committed `include/hostmem.h` must equal this output; `tests/header.rs` fails when it
//! does not, and `scripts/regen-header` refreshes the committed copy.

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("hostmem.h");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=src");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is readable");
    match cbindgen::generate_with_config(&crate_dir, config) {
        Ok(bindings) => {
            bindings.write_to_file(&out);
        }
        // A syntax error is reported by rustc itself with better context; leave the header
        // stale rather than failing the build here.
        Err(e) => println!("cargo:warning=cbindgen: {e}"),
    }
}
