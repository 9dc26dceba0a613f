//! The codebase's own rules, which docs/ARCHITECTURE.md states: every Rust file opens with a
//! `//!` header saying what it is, and the modules depend on each other only as the
//! "Dependency rules" section allows. A rule broken here is a design decision to take
//! explicitly (change the rule, and the document, in the same commit), not by accident.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("specs/ is in the workspace")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
    found.sort();
    found
}

/// The workspace's own sources: each crate's `src`, `tests` and `benches`.
fn workspace_sources() -> Vec<PathBuf> {
    let root = root();
    let mut files = Vec::new();
    for krate in ["tailor", "stager-api", "testkit", "specs"] {
        for dir in ["src", "tests", "benches"] {
            files.extend(rust_files(&root.join(krate).join(dir)));
        }
    }
    assert!(
        files.len() > 50,
        "found only {} Rust files under {}: is the walk looking in the right place?",
        files.len(),
        root.display()
    );
    files
}

#[test]
fn every_rust_file_opens_with_a_module_header() {
    let missing: Vec<String> = workspace_sources()
        .iter()
        .filter(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            let first = text.lines().find(|line| !line.trim().is_empty());
            !first.is_some_and(|line| line.starts_with("//!"))
        })
        .map(|path| path.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "these files do not open with a `//!` header saying what they are: {missing:#?}"
    );
}

/// The `tailor` modules a file's code names (`crate::name`), comments left out.
fn modules_used(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut used = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                used.insert(name);
            }
        }
    }
    used
}

/// The files of the `tailor` library module `module` (`registry` is `registry.rs` or
/// `registry/`, with `registry/mod.rs`).
fn module_files(module: &str) -> Vec<PathBuf> {
    let src = root().join("tailor/src");
    let mut files = rust_files(&src.join(module));
    let single = src.join(format!("{module}.rs"));
    if single.exists() {
        files.push(single);
    }
    assert!(!files.is_empty(), "tailor has no module `{module}`");
    files
}

/// (modules, the modules they must not use, why).
const FORBIDDEN: &[(&[&str], &[&str], &str)] = &[
    (
        &["registry"],
        &["staging", "copy", "prune", "db", "secrets"],
        "the distribution API knows nothing of stagings, copies, pruning or storage",
    ),
    (
        &["egress"],
        &["registry", "staging", "copy", "prune", "db", "config"],
        "the egress policy is a leaf: the registry client and the callbacks use it, not the reverse",
    ),
    (
        &["copy"],
        &["staging", "prune", "db", "secrets", "config"],
        "the copy engine moves images between registries; what a staging is, it does not know",
    ),
    (
        &["layout"],
        &[
            "registry", "staging", "copy", "prune", "db", "config", "egress",
        ],
        "an OCI layout is storage (a directory or a bucket): it knows no registry, staging or configuration",
    ),
    (
        &["portable"],
        &["prune", "config", "egress", "db"],
        "export and import are the staging store and the copy engine put together; their caller \
         brings the settings and the pool",
    ),
    (
        &["staging"],
        &["portable"],
        "a staging does not know it can be exported",
    ),
    (
        &["prune"],
        &["copy"],
        "the pruner deletes what nothing references; it never copies",
    ),
    (
        &[
            "reference",
            "manifest",
            "platform",
            "image_config",
            "digest",
            "text",
        ],
        &["registry", "staging", "copy", "prune", "db", "config"],
        "parsing and computing are pure: no registry, staging, storage or configuration",
    ),
];

#[test]
fn modules_depend_on_each_other_only_as_the_rules_allow() {
    let mut broken = Vec::new();
    for (modules, forbidden, why) in FORBIDDEN {
        for file in modules.iter().flat_map(|module| module_files(module)) {
            for used in modules_used(&file) {
                if forbidden.contains(&used.as_str()) {
                    broken.push(format!(
                        "{} uses crate::{used}: {why}",
                        file.strip_prefix(root()).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(broken.is_empty(), "dependency rules broken: {broken:#?}");
}

#[test]
fn only_the_embedded_feature_manages_processes() {
    // `tailor::embedded` (child processes tied to their parent with Linux's prctl) is behind
    // the `embedded` feature, so the rest of the library and the `tailor` binary build on any
    // Unix; nothing else may reach for it or for prctl.
    let mut broken = Vec::new();
    let src = root().join("tailor/src");
    for file in rust_files(&src) {
        if file.starts_with(src.join("embedded")) {
            continue;
        }
        let uses_embedded = modules_used(&file).contains("embedded");
        let text = std::fs::read_to_string(&file).unwrap();
        let code_mentions_prctl = text.lines().any(|line| {
            line.split("//")
                .next()
                .unwrap_or_default()
                .contains("prctl")
        });
        if uses_embedded || code_mentions_prctl {
            broken.push(file.strip_prefix(root()).unwrap().display().to_string());
        }
    }
    assert!(broken.is_empty(), "outside tailor::embedded: {broken:#?}");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    assert!(
        lib.contains("#[cfg(feature = \"embedded\")]\npub mod embedded;"),
        "tailor::embedded is behind the `embedded` feature"
    );
}

#[test]
fn http_routes_reach_the_database_only_through_the_library() {
    // Routes parse requests and shape answers; what they store or read is `tailor::staging`'s
    // business. The health probe's `SELECT 1` is the one query a route makes itself.
    let mut broken = Vec::new();
    for file in rust_files(&root().join("stager-api/src/routes")) {
        if file.ends_with("health.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            if code.contains("sqlx::query") {
                broken.push(format!(
                    "{}:{}: {}",
                    file.strip_prefix(root()).unwrap().display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(broken.is_empty(), "queries in routes: {broken:#?}");
}

#[test]
fn routes_and_startup_do_not_depend_on_each_other_for_the_shared_state() {
    // `startup` builds the server and mounts the routes; routes read `state::AppState`. A route
    // reaching into `startup` would make the two a cycle again.
    let mut broken = Vec::new();
    for file in rust_files(&root().join("stager-api/src/routes")) {
        if modules_used(&file).contains("startup") {
            broken.push(file.strip_prefix(root()).unwrap().display().to_string());
        }
    }
    assert!(
        broken.is_empty(),
        "routes using crate::startup: {broken:#?}"
    );
}

#[test]
fn the_library_never_depends_on_the_service_or_the_test_kit() {
    let manifest = std::fs::read_to_string(root().join("tailor/Cargo.toml")).unwrap();
    let dependencies = manifest
        .split("\n[dependencies]\n")
        .nth(1)
        .expect("tailor/Cargo.toml has [dependencies]");
    let dependencies = dependencies.split("\n[").next().unwrap();
    for crate_name in ["stager-api", "stager_api", "testkit", "specs"] {
        assert!(
            !dependencies
                .lines()
                .any(|line| line.trim_start().starts_with(crate_name)),
            "tailor depends on {crate_name} outside [dev-dependencies]: the library is what \
             the service and the tests build on, never the reverse"
        );
    }
}

/// The checker sees what it must: a use in code counts, a mention in a comment does not.
#[test]
fn the_dependency_check_reads_code_not_comments() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.rs");
    std::fs::write(
        &file,
        "//! A module.\n\
         // crate::commented is only talked about\n\
         use crate::registry::Registry; // and crate::also_commented\n\
         fn f() { crate::staging::queue::claim(); }\n",
    )
    .unwrap();
    let used: Vec<String> = modules_used(&file).into_iter().collect();
    assert_eq!(used, ["registry", "staging"]);
}

/// Lines of the services' production code (`tailor/src`, `stager-api/src`, before the file's
/// `#[cfg(test)] mod tests`, outside `skip`, comments cut off) for which `offends` holds, as
/// `file:line: text`.
fn production_lines(skip: &[&str], offends: impl Fn(&str) -> bool) -> Vec<String> {
    let root = root();
    let mut found = Vec::new();
    for dir in ["tailor/src", "stager-api/src"] {
        for file in rust_files(&root.join(dir)) {
            let relative = file.strip_prefix(&root).unwrap().display().to_string();
            if skip.contains(&relative.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            let production = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or_default();
            for (n, line) in production.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                if offends(code) {
                    found.push(format!("{relative}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    found
}

#[test]
fn production_sql_is_checked_when_it_compiles() {
    // Every statement the services run is a `sqlx::query!`-family macro, checked against the
    // schema in `.sqlx/`; a string handed to sqlx at run time is checked by nobody.
    let unchecked = [
        "sqlx::query(",
        "sqlx::query_as(",
        "sqlx::query_scalar(",
        "query_as::<",
        "query_scalar::<",
        "AssertSqlSafe",
        "raw_sql(",
    ];
    let broken = production_lines(&[], |code| unchecked.iter().any(|call| code.contains(call)));
    assert!(
        broken.is_empty(),
        "SQL not checked at compile time: {broken:#?}"
    );
}

#[test]
fn error_codes_are_named_only_by_the_code_enum() {
    // One vocabulary: a code is a `tailor::code::Code` variant wherever production code
    // produces one, so a misspelt or invented code fails the build instead of reaching a client.
    // Tests may compare with the wire form; production code outside `code.rs` may not spell it.
    let spelt = production_lines(&["tailor/src/code.rs"], |code| {
        tailor::code::Code::ALL
            .iter()
            .any(|known| code.contains(&format!("\"{known}\"")))
    });
    assert!(
        spelt.is_empty(),
        "error codes spelt as strings instead of tailor::code::Code: {spelt:#?}"
    );
}
