//! The three tar readers side by side: vessel's `apply_layer`, GNU tar and
//! Python's tarfile, each extracting into a fresh directory as root, and
//! the views of a tree they can all carry.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use vessel_snapshot::{ApplyMode, ApplyOptions, SnapshotErrorKind, apply_layer};

use super::{Node, scan};

pub type Tree = BTreeMap<PathBuf, Node>;

/// What the tools can carry: GNU tar and Python do not restore nanoseconds
/// the same way, and Python restores no xattrs.
pub fn view(tree: &Tree, xattrs: bool) -> Tree {
    tree.iter()
        .map(|(p, n)| {
            let mut n = n.clone();
            n.mtime.1 = 0;
            if !xattrs {
                n.xattrs.clear();
            }
            (p.clone(), n)
        })
        .collect()
}

/// For edge cases: directories made implicitly get the time of extraction.
pub fn loose(tree: &Tree) -> Tree {
    let mut t = view(tree, false);
    // Python sets no symlink times.
    for n in t.values_mut().filter(|n| n.kind == "dir" || n.kind == "symlink") {
        n.mtime = (0, 0);
    }
    t
}

/// vessel's reading: the tree, or its refusal; `Err` if the refusal was
/// not typed `InvalidData` or left something behind (a property broken).
pub fn checked_vessel(archive: &[u8], mode: ApplyMode) -> Result<Result<Tree, String>, String> {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t");
    if mode == ApplyMode::Merged {
        fs::create_dir(&target).unwrap();
    }
    match apply_layer(archive, &target, &ApplyOptions::new(mode)) {
        Ok(_) => Ok(Ok(scan(&target))),
        Err(e) if e.kind() != SnapshotErrorKind::InvalidData => Err(format!("a refusal of kind {:?}: {e}", e.kind())),
        Err(e) if target.exists() && !scan(&target).is_empty() => Err(format!("a refused layer left something: {e}")),
        Err(e) => Ok(Err(e.to_string())),
    }
}

/// [`checked_vessel`], panicking on a broken property.
pub fn vessel(archive: &[u8], mode: ApplyMode) -> Result<Tree, String> {
    checked_vessel(archive, mode).unwrap_or_else(|bad| panic!("{bad}"))
}

pub fn gnu_tar(archive: &[u8]) -> Result<Tree, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.tar");
    fs::write(&file, archive).unwrap();
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let o = Command::new("tar")
        .args(["--extract", "--numeric-owner", "--same-permissions", "--xattrs", "--xattrs-include=*", "-f"])
        .arg(&file)
        .arg("-C")
        .arg(&out)
        .output()
        .unwrap();
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).trim().to_owned());
    }
    Ok(scan(&out))
}

pub fn python_tarfile(archive: &[u8]) -> Result<Tree, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.tar");
    fs::write(&file, archive).unwrap();
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let script = "import sys, tarfile\n\
                  with tarfile.open(sys.argv[1]) as t:\n    t.extractall(sys.argv[2], numeric_owner=True)\n";
    let o = Command::new("python3").arg("-c").arg(script).arg(&file).arg(&out).output().unwrap();
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        return Err(err.lines().last().unwrap_or("").to_owned());
    }
    Ok(scan(&out))
}

/// Whether the parity tests may run: root, GNU tar and Python.
pub fn need_tools(test: &str) -> bool {
    if !super::have_root(test) {
        return false;
    }
    ["tar", "python3"].iter().all(|tool| vessel_test_support::have_tool(test, tool))
}

/// The first differences between two trees, for failure messages.
pub fn differences(a: &Result<Tree, String>, b: &Result<Tree, String>) -> String {
    let (Ok(a), Ok(b)) = (a, b) else { return format!("{:?} vs {:?}", a.as_ref().err(), b.as_ref().err()) };
    let (a, b) = (loose(a), loose(b));
    let mut out = Vec::new();
    for (p, n) in &a {
        match b.get(p) {
            Some(m) if m == n => {}
            Some(m) => out.push(format!("{}: {n:?} vs {m:?}", p.display())),
            None => out.push(format!("{}: only in the first", p.display())),
        }
    }
    out.extend(b.keys().filter(|p| !a.contains_key(*p)).map(|p| format!("{}: only in the second", p.display())));
    out.join("\n")
}
