//! Generates the C header from the Rust exports into `$OUT_DIR/hostmem.h`, and assembles the
//! x86-64 test guest's programs (`src/testing/guest/*.S`).
//!
//! The committed `include/hostmem.h` must equal this output; `tests/header.rs` fails when it
//! does not, and `scripts/regen-header` refreshes the committed copy.

use std::path::PathBuf;

/// The constants the assembly shares with `src/testing/guest.rs`, from the one file both read.
#[path = "src/testing/guest/abi.rs"]
mod guest_abi;

fn main() {
    assemble_guest();
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("hostmem.h");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=src");
    let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is readable");
    config.after_includes = Some(version_macros());
    match cbindgen::generate_with_config(&crate_dir, config) {
        Ok(bindings) => {
            bindings.write_to_file(&out);
        }
        // A syntax error is reported by rustc itself with better context; leave the header
        // stale rather than failing the build here.
        Err(e) => println!("cargo:warning=cbindgen: {e}"),
    }
}

/// The crate's version as C macros, from Cargo.toml (one place for the number); `hm_version()`
/// says the same at run time.
fn version_macros() -> String {
    let part = |name: &str| std::env::var(name).expect("cargo sets the version");
    format!(
        "\n#define HOSTMEM_VERSION_MAJOR {}\n#define HOSTMEM_VERSION_MINOR {}\n\
         #define HOSTMEM_VERSION_MICRO {}\n#define HOSTMEM_VERSION_STRING \"{}\"\n",
        part("CARGO_PKG_VERSION_MAJOR"),
        part("CARGO_PKG_VERSION_MINOR"),
        part("CARGO_PKG_VERSION_PATCH"),
        part("CARGO_PKG_VERSION"),
    )
}

/// Assembles the guest programs into a static library that rustc bundles into the rlib and
/// into `libhostmem.a`, when the `test-guest` feature is on. Only x86-64 builds load the
/// programs (their vCPU setup is x86 KVM); other targets skip the step rather than hand x86
/// assembly to their assembler.
fn assemble_guest() {
    // The programs are test support (feature test-guest), and x86-64 code.
    if std::env::var_os("CARGO_FEATURE_TEST_GUEST").is_none()
        || std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64")
    {
        return;
    }
    use guest_abi::*;
    let defines = [
        ("HM_GUEST_DONE_PORT", u64::from(DONE_PORT)),
        ("HM_GUEST_DONE_VALUE", u64::from(DONE_VALUE)),
        ("HM_GUEST_WAIT_SPIN_LIMIT", u64::from(WAIT_SPIN_LIMIT)),
        ("HM_GUEST_DIRTIER_PASSES_GPA", DIRTIER_PASSES_GPA),
        ("HM_GUEST_DIRTIER_STOP_GPA", DIRTIER_STOP_GPA),
    ];
    let mut build = cc::Build::new();
    build
        .file("src/testing/guest/ops.S")
        .file("src/testing/guest/dirtier.S");
    for (name, value) in defines {
        build.define(name, format!("{value:#x}").as_str());
    }
    // main's `rerun-if-changed=src` already covers the sources and abi.rs.
    build.compile("hostmem_guest");
}
