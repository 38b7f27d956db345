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

/// The header's items, each with the comment lines just above it (conditionals skipped).
fn documented_items(header: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = header.lines().collect();
    let mut items = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        // A typedef or a prototype starts at column 0; members, bodies and macros do not.
        let is_item = line.starts_with("typedef ")
            || (line.contains('(') && line.starts_with(|c: char| c.is_ascii_alphabetic()));
        if !is_item {
            continue;
        }
        let mut doc = Vec::new();
        let mut j = i;
        while j > 0 {
            j -= 1;
            let l = lines[j];
            if l.starts_with("#if") {
                continue;
            }
            if !l.starts_with("//") {
                break;
            }
            doc.push(l.trim_start_matches("//").trim().to_string());
        }
        doc.reverse();
        items.push((line.to_string(), doc.join(" ")));
    }
    items
}

#[test]
fn every_function_and_type_in_the_header_is_documented() {
    let header = include_str!("../include/hostmem.h");
    let items = documented_items(header);
    assert!(items.len() > 100, "found only {} items", items.len());
    let undocumented: Vec<_> = items
        .iter()
        .filter(|(_, doc)| doc.is_empty())
        .map(|(l, _)| l.as_str())
        .collect();
    assert!(undocumented.is_empty(), "undocumented: {undocumented:#?}");
    // Whoever gets a string to free is told how.
    let unexplained: Vec<_> = items
        .iter()
        .filter(|(l, doc)| l.starts_with("char *") && !doc.contains("hm_free"))
        .map(|(l, _)| l.as_str())
        .collect();
    assert!(
        unexplained.is_empty(),
        "returns a string without saying hm_free: {unexplained:#?}"
    );
}

#[test]
fn the_header_states_its_rules_on_ownership_errors_threads_and_pausing() {
    let header = include_str!("../include/hostmem.h");
    let preamble = &header[..header.find("#ifndef HOSTMEM_H").unwrap()];
    for topic in [
        "Ownership.",
        "Errors.",
        "Threads.",
        "Pausing.",
        "hm_free()",
        "Error **errp",
    ] {
        assert!(
            preamble.contains(topic),
            "the preamble does not cover {topic:?}"
        );
    }
}
