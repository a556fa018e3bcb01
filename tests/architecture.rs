//! The ring's architecture rules, checked on the source so a later change cannot undo them
//! silently (issue 14): the wire format has one owner that every role depends on and that
//! depends on none of them, no ring role imports another, no ring file grows past ~700 lines,
//! and `unsafe` is allowed in exactly the files the README names.

use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, recursively, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The files of one ring module: `src/ring/<name>.rs` or everything under `src/ring/<name>/`.
fn module_files(name: &str) -> Vec<PathBuf> {
    let ring = src().join("ring");
    let file = ring.join(format!("{name}.rs"));
    if file.is_file() {
        vec![file]
    } else {
        rust_files(&ring.join(name))
    }
}

/// Lines of `text` that are code: not blank and not only a comment.
fn code_lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .collect()
}

/// Whether a code line names ring module `module` as a path (`super::module`,
/// `ring::module`), the way an import or a qualified call would.
fn names_module(line: &str, module: &str) -> bool {
    [format!("super::{module}"), format!("ring::{module}")]
        .iter()
        .any(|p| {
            line.match_indices(p.as_str()).any(|(at, _)| {
                let after = line[at + p.len()..].chars().next();
                !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
            })
        })
}

#[test]
fn no_ring_role_imports_another_and_the_format_imports_no_role() {
    let roles = ["producer", "consumer", "observer"];
    let mut rules: Vec<(&str, Vec<&str>)> = roles
        .iter()
        .map(|&r| (r, roles.iter().copied().filter(|&o| o != r).collect()))
        .collect();
    rules.push((
        "layout",
        vec!["producer", "consumer", "observer", "protocol"],
    ));
    let mut found = Vec::new();
    for (module, forbidden) in &rules {
        let files = module_files(module);
        assert!(!files.is_empty(), "no files for ring module {module}");
        for file in files {
            let text = std::fs::read_to_string(&file).expect("readable source");
            for line in code_lines(&text) {
                for other in forbidden {
                    if names_module(line, other) {
                        found.push(format!("{}: `{line}` names {other}", file.display()));
                    }
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "ring roles importing each other:\n{}",
        found.join("\n")
    );
}

#[test]
fn no_ring_file_is_over_700_lines_of_code() {
    let long: Vec<String> = rust_files(&src().join("ring"))
        .into_iter()
        .filter_map(|f| {
            let n = code_lines(&std::fs::read_to_string(&f).expect("readable source")).len();
            (n > 700).then(|| format!("{}: {n} lines of code", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these files:\n{}", long.join("\n"));
}

#[test]
fn unsafe_is_allowed_only_in_the_files_the_readme_names() {
    let expected = [
        "decode/turbo.rs",
        "ring/consumer/batch.rs",
        "ring/memory.rs",
        "ring/producer/writer.rs",
        "ring/protocol.rs",
        "ring/sigbus.rs",
    ];
    let root = src();
    let allowing: Vec<String> = rust_files(&root)
        .into_iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .expect("readable source")
                .lines()
                .any(|l| l.trim() == "#![allow(unsafe_code)]")
        })
        .map(|f| {
            f.strip_prefix(&root)
                .expect("under src")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(allowing, expected);
    let lib = std::fs::read_to_string(root.join("lib.rs")).expect("lib.rs");
    assert!(lib.lines().any(|l| l.trim() == "#![deny(unsafe_code)]"));
    let readme = std::fs::read_to_string(root.join("../README.md")).expect("README.md");
    for file in expected {
        let shown = file.trim_start_matches("ring/");
        assert!(
            readme.contains(shown),
            "README does not name {file} among the files with unsafe"
        );
    }
    for module in [
        "source/mod.rs",
        "augment/mod.rs",
        "batch/mod.rs",
        "feedback/mod.rs",
        "pipeline.rs",
        "config.rs",
        "cli/mod.rs",
        "main.rs",
    ] {
        let text = std::fs::read_to_string(root.join(module)).expect("module source");
        assert!(
            text.lines().any(|l| l.trim() == "#![forbid(unsafe_code)]"),
            "{module} does not forbid unsafe_code"
        );
    }
}

#[test]
fn the_rules_see_what_they_look_for() {
    assert!(names_module(
        "use super::producer::ProducerState;",
        "producer"
    ));
    assert!(names_module(
        "let s = crate::ring::observer::read_stats(c, l);",
        "observer"
    ));
    assert!(!names_module("use super::producers_list;", "producer"));
    assert!(!names_module(
        "use crate::ring::layout::ProducerState;",
        "producer"
    ));
    assert_eq!(
        code_lines("// c\n\nfn f() {}\n  /// d\n"),
        vec!["fn f() {}"]
    );
}
