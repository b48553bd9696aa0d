//! Upkeep checks over the checkout, as rust-analyzer's tidy test: every
//! module says what it is for, no debugging leftovers, and the README
//! names only commands that exist and links only inside the repository.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("test-support lives in the workspace").to_path_buf()
}

/// Every `.rs` file under the crates' `src`, `tests`, `benches` and `examples`.
fn rust_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    for krate in std::fs::read_dir(root()).unwrap().flatten() {
        if !krate.path().join("Cargo.toml").exists() {
            continue;
        }
        for sub in ["src", "tests", "benches", "examples"] {
            walk(&krate.path().join(sub), &mut out);
        }
    }
    assert!(out.len() > 50, "found only {} Rust files under {}", out.len(), root().display());
    out
}

#[test]
fn every_module_has_a_doc_comment() {
    let missing: Vec<_> = rust_files()
        .into_iter()
        .filter(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            // Test-only helper modules (`tests/common/`) are documented at their use.
            !first.starts_with("//!") && !p.components().any(|c| c.as_os_str() == "common")
        })
        .collect();
    assert!(missing.is_empty(), "modules without a `//!` doc: {missing:#?}");
}

#[test]
fn no_debugging_leftovers() {
    let needle = concat!("dbg", "!(");
    let found: Vec<_> =
        rust_files().into_iter().filter(|p| std::fs::read_to_string(p).unwrap().contains(needle)).collect();
    assert!(found.is_empty(), "{needle} in {found:#?}");
}

#[test]
fn the_readme_names_commands_that_exist() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let xtask = std::fs::read_to_string(root().join("xtask/src/main.rs")).unwrap();
    let mut named = 0;
    for (i, _) in readme.match_indices("cargo xtask ") {
        let cmd: String = readme[i + 12..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        assert!(xtask.contains(&format!("\"{cmd}\" =>")), "the README names `cargo xtask {cmd}`, which xtask lacks");
        named += 1;
    }
    assert!(named >= 2, "the README's quick start names `cargo xtask demo` and `cargo xtask test`");
    // The CLI's subcommands, as clap names them (kebab-case variants).
    let cli = std::fs::read_to_string(root().join("vessel/src/cli/args.rs")).unwrap();
    let sub = |word: &str| {
        let variant: String = word.split('-').map(|w| w[..1].to_uppercase() + &w[1..]).collect();
        cli.contains(&format!("    {variant} {{"))
            || cli.contains(&format!("    {variant}("))
            || cli.contains(&format!("    {variant},"))
    };
    for (i, _) in readme.match_indices("`vessel ") {
        let word: String = readme[i + 8..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '-').collect();
        if !word.is_empty() {
            assert!(sub(&word), "the README names `vessel {word}`, which the CLI lacks");
        }
    }
}

#[test]
fn docs_link_only_inside_the_repository() {
    for doc in ["README.md", "ARCHITECTURE.md", "CHANGELOG.md"] {
        let text = std::fs::read_to_string(root().join(doc)).unwrap_or_else(|e| panic!("{doc}: {e}"));
        for (i, _) in text.match_indices("](") {
            let target: String = text[i + 2..].chars().take_while(|c| *c != ')').collect();
            if target.starts_with('#') {
                continue;
            }
            let path = target.split('#').next().unwrap();
            assert!(
                !target.contains("://") && !path.starts_with("..") && root().join(path).exists(),
                "{doc} links to {target:?}, which is not a file of the repository"
            );
        }
    }
    assert!(root().join("LICENSE").exists(), "the manifests say Apache-2.0: LICENSE must hold it");
}
