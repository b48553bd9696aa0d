//! Tidy: a budget on the size of source files, because a file that does
//! several jobs is hard to find one's way in (rust-analyzer's `tidy` test
//! keeps similar checks). A non-test `.rs` file over [`BUDGET`] lines fails
//! the check, unless it is listed in [`OVER_BUDGET`]: files known to be
//! due for a split, each with the issue that splits it. A listed file that
//! is back within the budget fails too, so the list only shrinks.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Lines a non-test source file may have.
pub(crate) const BUDGET: usize = 600;

/// Over the budget today, and why it is allowed for now.
const OVER_BUDGET: &[(&str, &str)] = &[];

/// Non-test Rust sources under `root`: not in `tests/` or `benches/`
/// directories, not in `target/`.
fn sources(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let path = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            if e.file_type()?.is_dir() {
                if !(name.starts_with('.') || ["target", "tests", "benches"].contains(&name.as_ref())) {
                    dirs.push(path);
                }
            } else if name.ends_with(".rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn check(root: &Path) -> Result<()> {
    let mut over = Vec::new();
    let mut stale = Vec::new();
    for path in sources(root)? {
        let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
        let lines = std::fs::read_to_string(&path)?.lines().count();
        let listed = OVER_BUDGET.iter().any(|(p, _)| *p == rel);
        if lines > BUDGET && !listed {
            over.push(format!("{rel}: {lines} lines"));
        } else if lines <= BUDGET && listed {
            stale.push(format!("{rel}: {lines} lines (take it off OVER_BUDGET)"));
        }
    }
    for (p, why) in OVER_BUDGET {
        if !root.join(p).exists() {
            stale.push(format!("{p}: gone (take it off OVER_BUDGET)"));
        } else {
            println!("tidy: {p} is over the {BUDGET}-line budget for now: {why}");
        }
    }
    if !over.is_empty() || !stale.is_empty() {
        bail!(
            "tidy: source files over the {BUDGET}-line budget (split them by concern):\n  {}",
            over.iter().chain(&stale).cloned().collect::<Vec<_>>().join("\n  ")
        );
    }
    println!("tidy: every other source file is within {BUDGET} lines");
    Ok(())
}
