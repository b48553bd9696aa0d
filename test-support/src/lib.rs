//! What vessel's integration suites share, so each states only what it
//! tests: whether the machine can run a suite (root, the test image; a
//! skip is loud and fails under `CI`), the shape of a suite of async cases
//! over worlds ([`suite`]), and the leak checks they end with (mounts,
//! cgroups, containers, processes).
//!
//! It depends on no vessel crate: any crate's tests may use it.

pub mod suite;

use std::path::{Path, PathBuf};

/// Whether this run is CI's (`CI` set), where nothing may be skipped.
pub fn ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Skips (prints why, and a zero-count summary line) outside CI; panics in
/// CI, where a skipped test would pass for nothing.
pub fn skip(suite: &str, why: &str) {
    assert!(!ci(), "{suite}: {why} under CI");
    eprintln!("SKIPPED {suite}: {why}");
    println!("{suite}: 0 passed, 0 failed, 1 skipped");
}

/// The test image dir (`VESSEL_TEST_IMAGE_DIR`, made by `cargo xtask`) when
/// the process is root, as suites that mount and run containers need;
/// `None` after [`skip`] otherwise.
pub fn root_with_test_image(suite: &str) -> Option<PathBuf> {
    let dir = env_path(suite, "VESSEL_TEST_IMAGE_DIR")?;
    have_root(suite, "it mounts overlays and runs containers").then_some(dir)
}

/// Whether the process is root or in vessel's rootless mode, as `why`
/// needs; otherwise [`skip`]s.
pub fn have_root(suite: &str, why: &str) -> bool {
    let root = nix::unistd::geteuid().is_root() || in_rootless_namespace();
    if !root {
        skip(suite, &format!("{why}; run as root, or rootless as a user with subordinate ids"));
    }
    root
}

/// Whether the process is in a user namespace that maps container ids
/// `0..65536` from 0, as vessel's rootless mode makes (read the same way).
pub fn in_rootless_namespace() -> bool {
    let Ok(map) = std::fs::read_to_string("/proc/self/uid_map") else { return false };
    let lines: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    lines != [["0", "0", "4294967295"]]
        && lines.iter().any(|l| l.first() == Some(&"0") && l.get(2).and_then(|n| n.parse::<u32>().ok()) >= Some(65536))
}

/// A path the whole suite needs from `var` (set by `cargo xtask test`);
/// `None` after [`skip`] otherwise.
pub fn env_path(suite: &str, var: &str) -> Option<PathBuf> {
    let v = std::env::var_os(var).map(PathBuf::from);
    if v.is_none() {
        skip(suite, &format!("{var} is unset; run `cargo xtask test`"));
    }
    v
}

/// Whether `tool --version` runs; otherwise [`skip`]s.
pub fn have_tool(suite: &str, tool: &str) -> bool {
    let ok = std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        skip(suite, &format!("{tool} is missing"));
    }
    ok
}

/// An environment variable a part of a suite needs: `None` (after a note)
/// outside CI, a panic in CI.
pub fn required_env(suite: &str, var: &str) -> Option<std::ffi::OsString> {
    let v = std::env::var_os(var);
    if v.is_none() {
        assert!(!ci(), "{suite}: {var} is unset under CI");
        eprintln!("SKIPPED part of {suite}: {var} is unset; run `cargo xtask test`");
    }
    v
}

/// This process's mount points at or under `dir` (procfs decodes the
/// kernel's octal escapes).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = procfs::process::Process::myself().and_then(|p| p.mountinfo()) else {
        return vec![PathBuf::from("<mountinfo unreadable>")];
    };
    info.into_iter().map(|m| m.mount_point).filter(|m| m.starts_with(dir)).collect()
}

/// Whether `path` is a mount point of this process.
pub fn is_mount_point(path: &Path) -> bool {
    procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .is_ok_and(|info| info.into_iter().any(|m| m.mount_point == path))
}

/// The cgroups vessel's containers left (`vessel-*` under any hierarchy's
/// `vessel` dir, v1 or v2, and in the subtree delegated to this user).
pub fn leftover_cgroups() -> Vec<PathBuf> {
    let hierarchies: Vec<PathBuf> =
        std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten().map(|e| e.path()).collect();
    let mut roots: Vec<PathBuf> = hierarchies.iter().map(|h| h.join("vessel")).collect();
    roots.push(PathBuf::from("/sys/fs/cgroup/vessel"));
    // Rootless runs' cgroups, in the subtree delegated to this user
    // (`vessel-<uid>`, the user's own; other users' runs are not this run's).
    let me = nix::unistd::geteuid().as_raw();
    for h in &hierarchies {
        for e in std::fs::read_dir(h).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let mine = e.metadata().is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == me);
            if mine && n.strip_prefix("vessel-").is_some_and(|u| u.parse::<u32>().is_ok()) {
                roots.push(e.path().join("runs"));
            }
        }
    }
    roots
        .iter()
        .flat_map(|r| std::fs::read_dir(r).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with("vessel-"))
        .map(|e| e.path())
        .collect()
}

/// The processes with `arg` as one of their arguments (a marker a test's
/// command carries, to prove it is gone).
pub fn processes_with_arg(arg: &str) -> Vec<i32> {
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    all.flatten().filter(|p| p.cmdline().is_ok_and(|c| c.iter().any(|a| a == arg))).map(|p| p.pid()).collect()
}

/// The processes with `path` open, as `pid command line` (who holds a
/// lock file a test expected free).
pub fn processes_with_open(path: &Path) -> Vec<String> {
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    all.flatten()
        .filter(|p| {
            p.fd().is_ok_and(|mut fds| {
                fds.any(|fd| fd.is_ok_and(|fd| matches!(&fd.target, procfs::process::FDTarget::Path(t) if t == path)))
            })
        })
        .map(|p| format!("{} {}", p.pid(), p.cmdline().unwrap_or_default().join(" ")))
        .collect()
}

/// Ends a suite: fails the run (exit 101) when anything named in `leaks`
/// is left or `tmp` cannot be removed, else exits as the tests did.
/// `process::exit` runs no destructors, so the temp dir is removed here.
pub fn finish(tmp: &Path, leaks: &[(&str, Vec<String>)], conclusion: libtest_mimic::Conclusion) -> ! {
    let found: Vec<String> =
        leaks.iter().filter(|(_, v)| !v.is_empty()).map(|(what, v)| format!("{what} {v:?}")).collect();
    if !found.is_empty() {
        eprintln!("leaks: {}", found.join(", "));
        std::process::exit(101);
    }
    let names: Vec<&str> = leaks.iter().map(|(w, _)| *w).collect();
    println!("leak check: none of {} left", names.join(", "));
    if let Err(e) = std::fs::remove_dir_all(tmp) {
        eprintln!("leaks: the test dir {} could not be removed: {e}", tmp.display());
        std::process::exit(101);
    }
    conclusion.exit()
}

/// Shows paths for a leak report.
pub fn shown(paths: impl IntoIterator<Item = impl AsRef<Path>>) -> Vec<String> {
    paths.into_iter().map(|p| p.as_ref().display().to_string()).collect()
}

/// How many lower layers the overlay mounted at `path` has. Read from
/// mountinfo by hand: procfs folds the super options into a map, which
/// keeps one of the `lowerdir+=` options that fsconfig writes per layer.
pub fn overlay_lower_count(path: &Path) -> Option<usize> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let line = info.lines().find(|l| l.split(' ').nth(4) == path.to_str())?;
    let opts = line.rsplit(' ').next().unwrap_or_default();
    let appended = opts.split(',').filter(|o| o.starts_with("lowerdir+=")).count();
    if appended > 0 {
        return Some(appended);
    }
    Some(opts.split(',').find_map(|o| o.strip_prefix("lowerdir="))?.split(':').count())
}

/// A zstd-compressed tar holding one file, `name`, of `size` zero bytes:
/// a few KiB that expand to `size` (a "layer bomb" for the expansion bounds).
pub fn zstd_bomb(name: &str, size: u64) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    let mut enc = zstd::stream::write::Encoder::new(&mut out, 3).expect("a zstd encoder");
    {
        let mut b = tar::Builder::new(&mut enc);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(size);
        h.set_cksum();
        b.append_data(&mut h, name, std::io::repeat(0).take(size)).expect("a tar entry");
        b.finish().expect("a tar end");
    }
    enc.finish().expect("a zstd end");
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_process_holding_a_file_is_named() {
        let p = std::env::temp_dir().join(format!("vessel-test-support-open-{}", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        let me = std::process::id().to_string();
        let held = super::processes_with_open(&p);
        assert!(held.iter().any(|h| h.split(' ').next() == Some(me.as_str())), "{held:?}");
        drop(f);
        assert!(super::processes_with_open(&p).is_empty());
        std::fs::remove_file(&p).unwrap();
    }
}
