//! The runtime conformance suite on the youki backend. Its own `main`, so
//! that `vessel_runtime::init()` runs first: this binary is also the runner
//! that the backend re-executes for every container.

mod conformance;

use std::path::PathBuf;
use std::sync::Arc;

use conformance::{CaseResult, Suite, leftover_cgroups};
use libtest_mimic::{Arguments, Failed};
use vessel_runtime::{Runtime, UserNamespace, YoukiRuntime};

fn main() {
    vessel_runtime::init();
    let args = Arguments::from_args();
    let Some((image, dir)) = setup() else {
        println!("youki conformance: 0 passed, 0 failed, 1 skipped");
        return;
    };
    // Every case twice: in a user namespace over idmapped layers (vessel's
    // default) and with host ids.
    let ns = UserNamespace::new(conformance::test_mapping()).expect("user namespace");
    let mut suites = Vec::new();
    for userns in [Some(&ns), None] {
        let sub = dir.path().join(if userns.is_some() { "userns" } else { "host" });
        let (rootfs, mount) = conformance::rootfs(&sub, &image, userns);
        let runtime = YoukiRuntime::new(sub.join("youki"));
        suites.push(Arc::new(Suite { runtime, rootfs, userns: userns.map(|n| n.mapping()), _mount: mount }));
    }
    let mut trials = Vec::new();
    for s in &suites {
        trials.extend(conformance::trials!(s.clone(), block_on));
    }
    let conclusion = libtest_mimic::run(&args, trials);
    // Leak check once every case is done: no cgroups, no container state.
    let cgroups = leftover_cgroups();
    let mut left = Vec::new();
    for s in &suites {
        for sub in ["state", "bundles", "runners"] {
            left.extend(std::fs::read_dir(s.state_root().join(sub)).into_iter().flatten().flatten().map(|e| e.path()));
        }
    }
    drop(suites);
    if !cgroups.is_empty() || !left.is_empty() {
        eprintln!("leaks after the suite: cgroups {cgroups:?}, state {left:?}");
        std::process::exit(101);
    }
    conclusion.exit();
}

fn block_on(f: impl Future<Output = CaseResult>) -> Result<(), Failed> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(f).map_err(Failed::from)
}

trait StateRoot {
    fn state_root(&self) -> PathBuf;
}

impl StateRoot for Suite<YoukiRuntime> {
    fn state_root(&self) -> PathBuf {
        self.rootfs.parent().unwrap().join("youki")
    }
}

/// The test image dir and a scratch dir; `None` (with the reason printed)
/// when this machine cannot run the suite outside CI.
fn setup() -> Option<(PathBuf, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let ci = std::env::var_os("CI").is_some();
    if let Err(e) = YoukiRuntime::new(dir.path()).is_available() {
        assert!(!ci, "youki must be available in CI: {e}");
        eprintln!("SKIPPED youki conformance: {e}");
        return None;
    }
    let Some(image) = std::env::var_os("VESSEL_TEST_IMAGE_DIR").map(PathBuf::from) else {
        assert!(!ci, "VESSEL_TEST_IMAGE_DIR is unset under CI");
        eprintln!("SKIPPED youki conformance: VESSEL_TEST_IMAGE_DIR is unset; run `cargo xtask test`");
        return None;
    };
    Some((image, dir))
}
