//! The shape vessel's integration suites share: async cases run in every
//! world (one per backend), the rule for which of them run rootless, and
//! one leak check (mounts, cgroups, containers) every suite ends with.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use libtest_mimic::{Failed, Trial};

/// An async case of a suite, run in world `W`.
pub type Case<W> = fn(Arc<W>) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// `cases![a, b]`: the named async cases `a` and `b` (each
/// `async fn(Arc<W>) -> anyhow::Result<()>`), for [`trials`].
#[macro_export]
macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), (|w| Box::pin($name(w))) as $crate::suite::Case<_>)),*]
    };
}

/// Which cases run rootless. What needs host privilege or another
/// process's help (disk quotas, containerd, the unsafe mode) does not
/// apply: rootless reports those unavailable, which other cases check;
/// cgroup limits hold rootless only in a subtree delegated to the user.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rootless {
    /// Cases that never run rootless.
    pub rootful_only: &'static [&'static str],
    /// Cases that run rootless only with a delegated cgroup subtree.
    pub cgroup_limits: &'static [&'static str],
}

impl Rootless {
    /// Whether `case` runs, the process being `rootless` or not and the
    /// user having a `delegated` cgroup subtree or not.
    pub fn runs(&self, case: &str, rootless: bool, delegated: bool) -> bool {
        !rootless || !(self.rootful_only.contains(&case) || (!delegated && self.cgroup_limits.contains(&case)))
    }
}

/// One trial per case and world, named `<world>::<case>`, blocking on `rt`;
/// `runs` says which cases apply.
pub fn trials<W: Send + Sync + 'static>(
    rt: &'static tokio::runtime::Runtime,
    worlds: &[(String, Arc<W>)],
    cases: &[(&'static str, Case<W>)],
    runs: impl Fn(&str) -> bool,
) -> Vec<Trial> {
    let mut out = Vec::new();
    for (prefix, w) in worlds {
        for (name, case) in cases.iter().filter(|(n, _)| runs(n)) {
            let (w, case) = (w.clone(), *case);
            out.push(Trial::test(format!("{prefix}::{name}"), move || {
                rt.block_on(case(w)).map_err(|e| Failed::from(format!("{e:#}")))
            }));
        }
    }
    out
}

/// The containers in `namespace` of the containerd at `address` (`ctr`).
pub fn containerd_containers(address: &Path, namespace: &str) -> Vec<String> {
    let out = std::process::Command::new("ctr")
        .arg("--address")
        .arg(address)
        .args(["--namespace", namespace, "containers", "ls", "-q"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect(),
        Ok(o) => vec![format!("<ctr failed: {}>", String::from_utf8_lossy(&o.stderr).trim())],
        Err(e) => vec![format!("<ctr did not run: {e}>")],
    }
}

/// What a suite's containers may leave, for [`crate::finish`]: mounts under
/// `tmp`, vessel cgroups (root's and this user's delegated subtree: rootless
/// runs too) and containers in each `(address, namespace)` of containerd.
pub fn leaks(tmp: &Path, containerd: &[(PathBuf, String)]) -> Vec<(&'static str, Vec<String>)> {
    // Teardown is asynchronous in places (a runner's last unmount, a task's delete).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let containers = containerd.iter().flat_map(|(a, ns)| containerd_containers(a, ns)).collect();
    vec![
        ("mounts", crate::shown(crate::mounts_under(tmp))),
        ("cgroups", crate::shown(crate::leftover_cgroups())),
        ("containers", containers),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rootless_rule() {
        let r = Rootless { rootful_only: &["quota"], cgroup_limits: &["cpu"] };
        assert!(r.runs("quota", false, false) && r.runs("cpu", false, false));
        assert!(!r.runs("quota", true, true));
        assert!(!r.runs("cpu", true, false) && r.runs("cpu", true, true));
        assert!(r.runs("files", true, false));
    }
}
