//! Upkeep checks, as well-kept Rust projects run them: licenses, bans and
//! sources of every dependency (`cargo deny`; advisories need the network,
//! so they are left out), unused dependencies (`cargo machete`), and the
//! build at the declared `rust-version`.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{cargo, output, run};

/// The tools, pinned: installed from crates.io when missing.
const TOOLS: &[(&str, &str)] = &[("cargo-deny", "0.20.2"), ("cargo-machete", "0.9.2")];

/// An installed tool: run as its own binary, not as `cargo <sub>` (the
/// toolchain's cargo, which xtask runs under, passes the subcommand's name
/// on as an argument that cargo-machete takes for a directory).
fn tool(krate: &str) -> Command {
    let home = std::env::var_os("CARGO_HOME").map(std::path::PathBuf::from);
    let home = home.or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    match home.map(|h| h.join("bin").join(krate)).filter(|p| p.exists()) {
        Some(path) => Command::new(path),
        None => Command::new(krate),
    }
}

/// Installs the pinned tools that are missing (or at another version).
fn install_tools(root: &Path) -> Result<()> {
    for (krate, version) in TOOLS {
        let have = tool(krate).arg("--version").output().ok().filter(|o| o.status.success());
        let have = have.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        if have.split_whitespace().any(|w| w == *version) {
            continue;
        }
        run(cargo(root).args(["install", "--locked", "--quiet", krate, "--version", version]))?;
    }
    Ok(())
}

/// The workspace's declared `rust-version`.
fn declared_rust_version(root: &Path) -> Result<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let line = manifest.lines().find(|l| l.trim_start().starts_with("rust-version"));
    match line.and_then(|l| l.split('"').nth(1)) {
        Some(v) => Ok(v.to_owned()),
        None => bail!("the workspace Cargo.toml declares no rust-version"),
    }
}

/// The build at the declared `rust-version`: the toolchain every other
/// check builds with must be that version (this machine has one Rust
/// toolchain and can fetch no other), so the workspace's clippy, doc and
/// test builds are the MSRV build; a toolchain of another version fails
/// here instead of passing unchecked.
fn rust_version(root: &Path) -> Result<()> {
    let declared = declared_rust_version(root)?;
    let rustc = output(Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into())).arg("--version"))?;
    let actual = rustc.split_whitespace().nth(1).unwrap_or_default();
    let same = actual == declared || actual.strip_suffix(".0") == Some(declared.as_str());
    if !same {
        bail!(
            "the workspace declares rust-version {declared}, but the toolchain is {actual}: \
             build with {declared} (rustup toolchain install {declared}) or change the declaration"
        );
    }
    println!("upkeep: rustc {actual} is the declared rust-version {declared}");
    Ok(())
}

pub(crate) fn check(root: &Path) -> Result<()> {
    rust_version(root)?;
    install_tools(root)?;
    run(tool("cargo-deny").current_dir(root).args([
        "--all-features",
        "--locked",
        "check",
        "licenses",
        "bans",
        "sources",
    ]))?;
    run(tool("cargo-machete").arg(root))?;
    Ok(())
}
