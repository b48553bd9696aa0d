//! The runtime conformance suite on the youki backend. Its own `main`, so
//! that `vessel_runtime::init()` runs first: this binary is also the runner
//! that the backend re-executes for every container.

mod conformance;

use std::path::PathBuf;
use std::sync::Arc;

use conformance::{CaseResult, Suite, leftover_cgroups};
use libtest_mimic::{Arguments, Failed};
use vessel_runtime::{Runtime, YoukiRuntime};

fn main() {
    vessel_runtime::init();
    let args = Arguments::from_args();
    let Some((suite, _dirs)) = setup() else {
        println!("youki conformance: 0 passed, 0 failed, 1 skipped");
        return;
    };
    let suite = Arc::new(suite);
    let trials = conformance::trials!(suite.clone(), block_on);
    let conclusion = libtest_mimic::run(&args, trials);
    // Leak check once every case is done: no cgroups, no container state.
    let cgroups = leftover_cgroups();
    let state: Vec<_> =
        std::fs::read_dir(suite.state_root().join("state")).into_iter().flatten().flatten().map(|e| e.path()).collect();
    let bundles: Vec<_> = std::fs::read_dir(suite.state_root().join("bundles"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    if !cgroups.is_empty() || !state.is_empty() || !bundles.is_empty() {
        eprintln!("leaks after the suite: cgroups {cgroups:?}, state {state:?}, bundles {bundles:?}");
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

/// A busybox rootfs from the test image, and the runtime; `None` (with the
/// reason printed) when this machine cannot run it outside CI.
fn setup() -> Option<(Suite<YoukiRuntime>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let runtime = YoukiRuntime::new(dir.path().join("youki"));
    let ci = std::env::var_os("CI").is_some();
    if let Err(e) = runtime.is_available() {
        assert!(!ci, "youki must be available in CI: {e}");
        eprintln!("SKIPPED youki conformance: {e}");
        return None;
    }
    let Some(image) = std::env::var_os("VESSEL_TEST_IMAGE_DIR").map(PathBuf::from) else {
        assert!(!ci, "VESSEL_TEST_IMAGE_DIR is unset under CI");
        eprintln!("SKIPPED youki conformance: VESSEL_TEST_IMAGE_DIR is unset; run `cargo xtask test`");
        return None;
    };
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let st = std::process::Command::new("tar")
        .arg("-xpf")
        .arg(image.join("layer.tar"))
        .arg("-C")
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(st.success());
    Some((Suite { runtime, rootfs }, dir))
}
