//! The committed C header must be exactly what cbindgen generates from the current sources.

#[test]
fn committed_header_matches_generated() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/hostmem.h"));
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/hostmem.h"))
            .expect("include/hostmem.h exists");
    assert!(
        generated == committed,
        "include/hostmem.h is stale: run scripts/regen-header and commit the result"
    );
}
