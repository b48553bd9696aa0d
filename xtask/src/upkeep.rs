//! Upkeep checks, as well-kept Rust projects run them: licenses, bans and
//! sources of every dependency (`cargo deny`; advisories need the network,
//! so they are left out), unused dependencies (`cargo machete`), and the
//! build at the declared `rust-version`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{cargo, output, run};

/// The tools, pinned: installed from crates.io when missing.
const TOOLS: &[(&str, &str)] = &[("cargo-deny", "0.20.2"), ("cargo-machete", "0.9.2")];

/// Where a pinned tool is kept: a cache dir keyed by name and version
/// (`$XDG_CACHE_HOME` or `~/.cache`, `vessel-xtask/tools/<crate>-<version>`),
/// outside the checkout, so a fresh clone on the same machine, or a
/// `cargo clean`, does not build it again, and a new pin never runs an old
/// binary.
fn tool_path(krate: &str, version: &str) -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")));
    cache
        .unwrap_or_else(|| crate::util::target_dir().join("cache"))
        .join("vessel-xtask/tools")
        .join(format!("{krate}-{version}"))
}

/// A pinned tool, installed into its cache dir unless it is there. Run as
/// its own binary, not as `cargo <sub>` (the toolchain's cargo, which xtask
/// runs under, passes the subcommand's name on as an argument that
/// cargo-machete takes for a directory). Built without optimisation: it
/// reads a few hundred manifests, which takes a debug build a second, and
/// it builds in half the time.
fn tool(root: &Path, krate: &str) -> Result<Command> {
    let (_, version) = TOOLS.iter().find(|(k, _)| *k == krate).context("an unpinned tool")?;
    let dir = tool_path(krate, version);
    let bin = dir.join("bin").join(krate);
    if !bin.exists() {
        run(cargo(root)
            .args(["install", "--locked", "--quiet", "--debug", krate, "--version", version, "--root"])
            .arg(&dir))?;
    }
    Ok(Command::new(bin))
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

pub(crate) fn check(root: &Path, p: &mut crate::Phases) -> Result<()> {
    p.time("upkeep: rust-version", || rust_version(root))?;
    let (deny, machete) = p.time("upkeep: install cargo-deny, cargo-machete (cached)", || {
        Ok((tool(root, "cargo-deny")?, tool(root, "cargo-machete")?))
    })?;
    let mut deny = deny;
    p.time("upkeep: cargo deny", || {
        run(deny.current_dir(root).args(["--all-features", "--locked", "check", "licenses", "bans", "sources"]))
    })?;
    let mut machete = machete;
    p.time("upkeep: cargo machete", || run(machete.arg(root)))?;
    Ok(())
}
