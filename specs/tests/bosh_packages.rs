//! The BOSH release's packages: that each spec names files `bosh create-release` will find and
//! packaging scripts that can run, and that the tailor package compiles as it would on a
//! compilation VM: from the packaged sources and the vendored crates alone, with no network and
//! no cargo cache.
//!
//! Package files are selected the way the bosh CLI selects them, because that is where a
//! release breaks: globs are matched under the release's `src/` (and `blobs/`), and a match
//! counts only if it is a regular file reached without going through a symlinked directory
//! (the CLI skips those; a symlinked *file* it archives as a link, dangling on the VM).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn release_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bosh-release")
        .canonicalize()
        .expect("bosh-release/ exists")
}

/// A package's spec: its name, the packages it compiles against and its file globs.
struct PackageSpec {
    dir: PathBuf,
    name: String,
    dependencies: Vec<String>,
    files: Vec<String>,
}

fn string_list(spec: &serde_yaml::Value, key: &str, path: &Path) -> Vec<String> {
    match spec.get(key) {
        None | Some(serde_yaml::Value::Null) => Vec::new(),
        Some(serde_yaml::Value::Sequence(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .unwrap_or_else(|| panic!("{}: `{key}` holds a non-string", path.display()))
                    .to_owned()
            })
            .collect(),
        Some(other) => panic!("{}: `{key}` is not a list: {other:?}", path.display()),
    }
}

fn package_specs() -> Vec<PackageSpec> {
    let mut specs = Vec::new();
    for entry in fs::read_dir(release_dir().join("packages")).expect("bosh-release/packages/") {
        let dir = entry.unwrap().path();
        let path = dir.join("spec");
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let spec: serde_yaml::Value =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = spec
            .get("name")
            .and_then(|name| name.as_str())
            .unwrap_or_else(|| panic!("{}: no `name`", path.display()))
            .to_owned();
        specs.push(PackageSpec {
            dependencies: string_list(&spec, "dependencies", &path),
            files: string_list(&spec, "files", &path),
            dir,
            name,
        });
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}

/// `*` and `?` within one path component, as in the bosh CLI's globs.
fn component_matches(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            component_matches(&pattern[1..], name)
                || (!name.is_empty() && component_matches(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => component_matches(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => component_matches(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// Every path under `dir` matching `parts` (`**` is any number of directories), following
/// symlinks as the CLI's glob does; `rel` is `dir` relative to the glob's root.
fn expand(dir: &Path, rel: &Path, parts: &[&str], depth: usize, out: &mut Vec<PathBuf>) {
    let Some((first, rest)) = parts.split_first() else {
        return;
    };
    assert!(depth < 40, "{}: glob recursion too deep", dir.display());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<_> = entries.map(|entry| entry.unwrap().file_name()).collect();
    names.sort();
    if *first == "**" {
        expand(dir, rel, rest, depth + 1, out);
    }
    for name in names {
        let path = dir.join(&name);
        let rel = rel.join(&name);
        let is_dir = path.is_dir();
        if *first == "**" {
            if rest.is_empty() {
                out.push(rel.clone());
            }
            if is_dir {
                expand(&path, &rel, parts, depth + 1, out);
            }
        } else if component_matches(first.as_bytes(), name.as_encoded_bytes()) {
            if rest.is_empty() {
                out.push(rel);
            } else if is_dir {
                expand(&path, &rel, rest, depth + 1, out);
            }
        }
    }
}

/// The files `glob` brings into the package from `root` (src/ or blobs/), as paths relative
/// to it: regular files whose real location is where the glob says. Panics on a symlinked
/// file, which the CLI would package as a link.
fn packaged_files(root: &Path, glob: &str) -> Vec<PathBuf> {
    assert!(
        !glob.contains(['[', '{']),
        "`{glob}`: only `*`, `?` and `**` are understood here"
    );
    let parts: Vec<&str> = glob.split('/').filter(|part| !part.is_empty()).collect();
    let mut matches = Vec::new();
    expand(root, Path::new(""), &parts, 0, &mut matches);
    let Ok(real_root) = root.canonicalize() else {
        return Vec::new();
    };
    matches
        .into_iter()
        .filter(|rel| {
            let path = root.join(rel);
            let meta = fs::symlink_metadata(&path).unwrap();
            assert!(
                !meta.file_type().is_symlink(),
                "`{glob}` matches the symlink {}: bosh create-release packages symlinks as \
                 links, which dangle on a compilation VM",
                path.display()
            );
            meta.is_file()
                && path
                    .canonicalize()
                    .is_ok_and(|real| real.strip_prefix(&real_root) == Ok(rel.as_path()))
        })
        .collect()
}

/// Where the blobs a package needs are documented: the vendoring script, and the release's
/// README once it exists.
fn blob_documentation() -> String {
    let release = release_dir();
    let mut text = fs::read_to_string(release.join("scripts/vendor-crates"))
        .expect("bosh-release/scripts/vendor-crates");
    text.push_str(&fs::read_to_string(release.join("README.md")).unwrap_or_default());
    text
}

#[test]
fn every_package_spec_lists_files_that_exist() {
    let release = release_dir();
    let src = release.join("src");
    let specs = package_specs();
    let names: Vec<&str> = specs.iter().map(|spec| spec.name.as_str()).collect();
    for expected in ["docker-registry", "rust", "tailor"] {
        assert!(
            names.contains(&expected),
            "no `{expected}` package: {names:?}"
        );
    }
    let documentation = blob_documentation();
    let mut problems = Vec::new();

    for spec in &specs {
        let dir_name = spec.dir.file_name().unwrap().to_string_lossy();
        if spec.name != dir_name {
            problems.push(format!("packages/{dir_name}/spec is named `{}`", spec.name));
        }
        for dependency in &spec.dependencies {
            if !release
                .join("packages")
                .join(dependency)
                .join("spec")
                .is_file()
            {
                problems.push(format!(
                    "{}: depends on `{dependency}`, which is not a package",
                    spec.name
                ));
            }
        }
        let packaging = spec.dir.join("packaging");
        match fs::metadata(&packaging) {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {}
            Ok(_) => problems.push(format!("{}: packaging is not executable", spec.name)),
            Err(e) => problems.push(format!("{}: packaging: {e}", spec.name)),
        }
        if spec.files.is_empty() {
            problems.push(format!("{}: no files", spec.name));
        }
        for glob in &spec.files {
            if !packaged_files(&src, glob).is_empty() {
                continue;
            }
            // Not in src/: it must be a blob, named exactly, that someone says how to add.
            let is_documented_blob = !glob.contains(['*', '?'])
                && documentation.contains(&format!(" {glob}"))
                && documentation.contains("bosh add-blob");
            if !is_documented_blob {
                problems.push(format!(
                    "{}: `{glob}` matches no packageable file under src/ and is not a blob \
                     documented in scripts/vendor-crates or README.md",
                    spec.name
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The directory holding the `cargo` and `rustc` this test was built with, and the rustup
/// home when those are rustup's proxies rather than the toolchain itself.
fn toolchain() -> (PathBuf, Option<String>) {
    let output = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .expect("rustc on PATH");
    assert!(output.status.success());
    let sysroot = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
    let bin = sysroot.join("bin");
    if bin.join("cargo").is_file() && bin.join("rustc").is_file() {
        // The toolchain's own binaries, as the rust package provides them: no proxy, no
        // rustup home needed.
        return (bin, None);
    }
    let cargo = Command::new("which").arg("cargo").output().unwrap();
    let cargo = PathBuf::from(String::from_utf8(cargo.stdout).unwrap().trim());
    let rustup_home = Command::new("rustup")
        .args(["show", "home"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8(output.stdout).unwrap().trim().to_owned());
    (
        cargo.parent().expect("cargo's directory").to_owned(),
        rustup_home,
    )
}

fn describe(output: &Output) -> String {
    let tail = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    };
    format!(
        "{}\n--- stdout (tail)\n{}\n--- stderr (tail)\n{}",
        output.status,
        tail(&output.stdout),
        tail(&output.stderr)
    )
}

#[test]
fn the_tailor_package_builds_offline_from_vendored_crates_in_a_clean_directory() {
    let release = release_dir();
    let scratch = tempfile::tempdir().unwrap();
    let compile = scratch.path().join("compile/tailor");
    let install = scratch.path().join("packages/tailor");
    let home = scratch.path().join("home");
    for dir in [&compile, &install, &home] {
        fs::create_dir_all(dir).unwrap();
    }

    // The blob, as a release author makes it: from the cargo cache, fetching from crates.io
    // what a Linux build never downloaded (other platforms' crates). Only the build below
    // must be offline.
    let started = Instant::now();
    let vendor = scratch.path().join("blobs/tailor/vendor.tar.gz");
    let output = Command::new(release.join("scripts/vendor-crates"))
        .arg(&vendor)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "vendor-crates failed: {}",
        describe(&output)
    );
    eprintln!("vendored in {:.1?}", started.elapsed());

    // The package as the director hands it to a compilation VM: its files, copied.
    let tailor = package_specs()
        .into_iter()
        .find(|spec| spec.name == "tailor")
        .expect("a tailor package");
    let blobs = BTreeMap::from([("tailor/vendor.tar.gz", vendor.as_path())]);
    let src = release.join("src");
    for glob in &tailor.files {
        let files = packaged_files(&src, glob);
        let files: Vec<(PathBuf, PathBuf)> = if files.is_empty() {
            let blob = blobs.get(glob.as_str()).unwrap_or_else(|| {
                panic!("`{glob}` is neither in src/ nor a blob this test makes")
            });
            vec![(blob.to_path_buf(), PathBuf::from(glob))]
        } else {
            files.into_iter().map(|rel| (src.join(&rel), rel)).collect()
        };
        for (from, rel) in files {
            let to = compile.join(&rel);
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            fs::copy(&from, &to).unwrap();
            // The CLI keeps only the executable bit.
            let executable = fs::metadata(&from).unwrap().permissions().mode() & 0o100 != 0;
            let mode = if executable { 0o755 } else { 0o644 };
            fs::set_permissions(&to, fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    assert!(
        !compile.join("target").exists(),
        "target/ must not be packaged"
    );

    // A clean environment: cargo and rustc on PATH, and a HOME with no ~/.cargo in it.
    let (toolchain_bin, rustup_home) = toolchain();
    let mut packaging = Command::new("bash");
    packaging
        .arg(tailor.dir.join("packaging"))
        .current_dir(&compile)
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", toolchain_bin.display()))
        .env("HOME", &home)
        .env("BOSH_COMPILE_TARGET", &compile)
        .env("BOSH_INSTALL_TARGET", &install)
        .env("BOSH_PACKAGE_NAME", "tailor")
        .env("TAILOR_PACKAGING_PROFILE", "dev")
        .env("CARGO_NET_OFFLINE", "true")
        // Only what keeps a test build short; optimisation and --locked are as configured.
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .env("CARGO_INCREMENTAL", "0");
    if let Some(rustup_home) = &rustup_home {
        packaging.env("RUSTUP_HOME", rustup_home);
    }
    let started = Instant::now();
    let output = packaging.output().unwrap();
    eprintln!("packaging ran for {:.1?}", started.elapsed());
    assert!(
        output.status.success(),
        "packaging failed: {}",
        describe(&output)
    );

    let home_entries: Vec<_> = fs::read_dir(&home).unwrap().collect();
    assert!(
        home_entries.is_empty(),
        "the build used HOME: {home_entries:?}"
    );
    assert!(
        !compile.join(".cargo-home/registry").exists(),
        "cargo fetched crates into its home instead of using vendor/"
    );

    let bin = install.join("bin");
    let version = Command::new(bin.join("tailor"))
        .arg("--version")
        .env_clear()
        .output()
        .unwrap();
    assert!(version.status.success(), "{}", describe(&version));
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with("tailor "),
        "{}",
        describe(&version)
    );
    let help = Command::new(bin.join("stager-api"))
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(help.status.success(), "{}", describe(&help));
    let registry_gc = fs::metadata(bin.join("registry-gc")).expect("bin/registry-gc installed");
    assert!(registry_gc.is_file() && registry_gc.permissions().mode() & 0o111 != 0);
}
