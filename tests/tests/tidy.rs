//! Tidy: checks that keep the tree clean, run as tests.

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() && name != "target" && !name.to_string_lossy().starts_with('.') {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn workspace_members() -> Vec<String> {
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    let line = manifest.lines().find(|l| l.trim_start().starts_with("members")).expect("members line");
    line.split('"').skip(1).step_by(2).map(str::to_owned).collect()
}

#[test]
fn every_rust_file_starts_with_a_module_doc_and_has_no_debug_leftovers() {
    let root = workspace_root();
    let mut files = Vec::new();
    for member in workspace_members() {
        rust_files(&root.join(member), &mut files);
    }
    assert!(files.len() > 20, "found the sources: {files:?}");
    let leftovers = [concat!("dbg", "!("), concat!("todo", "!("), concat!("unimplemented", "!(")];
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("//!"), "{} must start with a //! module doc", file.display());
        for leftover in leftovers {
            assert!(!text.contains(leftover), "{} contains {leftover}", file.display());
        }
    }
}

#[test]
fn architecture_map_names_every_workspace_member() {
    let map = std::fs::read_to_string(workspace_root().join("docs/ARCHITECTURE.md")).unwrap();
    for member in workspace_members() {
        assert!(map.contains(&format!("`{member}/`")), "docs/ARCHITECTURE.md does not map {member}/");
    }
}

#[test]
fn readme_names_the_run_and_test_commands_and_ci_calls_the_test_command() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("cargo run --release -p node --bin vrs-node -- demo"));
    assert!(readme.contains("./scripts/test.sh"));
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(ci.contains("./scripts/test.sh"), ".ci/run must call the README's test command");
}

#[test]
fn routes_are_added_only_in_the_loop_over_the_route_table() {
    // The isolation tests enumerate the route tables (the municipal node's `ROUTES`, the
    // national node's `NATIONAL_ROUTES`); a route added to a router any other way would
    // escape them.
    let root = workspace_root();
    let mut files = Vec::new();
    rust_files(&root.join("node/src"), &mut files);
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, line) in text.lines().enumerate() {
            if line.contains(concat!(".route", "(")) || line.contains(concat!(".nest", "(")) {
                found.push(format!("{}:{}", file.strip_prefix(&root).unwrap().display(), i + 1));
            }
        }
    }
    found.sort();
    let files: Vec<&str> = found.iter().filter_map(|f| f.split(':').next()).collect();
    assert_eq!(
        files,
        ["node/src/api.rs", "node/src/national_api.rs"],
        "routes must be added only in api::router_from and national_api::national_router: {found:?}"
    );
}
