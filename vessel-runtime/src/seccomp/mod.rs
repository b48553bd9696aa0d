//! The default seccomp profile: docker's semantics, kept as data in
//! `profile.json` (an allowlist in OCI's syscall-rule shape, plus
//! capability and architecture conditions as in moby's `default.json`),
//! turned into the spec's `linux.seccomp` for the capabilities a process
//! gets. Anything not allowed fails with `EPERM`; `clone` with namespace
//! flags is refused and `clone3` answers `ENOSYS` (so libc falls back to
//! `clone`); io_uring, `bpf`, `perf_event_open`, the keyring, `mount`,
//! `personality` beyond docker's values and the rest are not on the list.
//!
//! Only the native architecture is in the filter: 32-bit syscalls on a
//! 64-bit host kill the caller (stricter than docker, which allows the
//! compat ABIs; agents' toolchains are 64-bit and the compat layer is a
//! kernel attack surface of its own). Syscall names this machine's
//! libseccomp does not know are skipped by the runtimes, so the profile can
//! name newer syscalls than libseccomp has.

use std::collections::HashSet;
use std::sync::LazyLock;

use oci_spec::runtime::{Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompBuilder, LinuxSyscall};
use serde::Deserialize;

use crate::RuntimeError;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    default_errno_ret: u32,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    #[serde(flatten)]
    syscall: LinuxSyscall,
    /// Applies only when the process has every one of these.
    #[serde(default)]
    if_caps: Vec<String>,
    /// Applies only when the process has none of these.
    #[serde(default)]
    unless_caps: Vec<String>,
    /// Applies only on these architectures (`std::env::consts::ARCH` names).
    #[serde(default)]
    arches: Vec<String>,
    /// Never applies on these.
    #[serde(default)]
    not_arches: Vec<String>,
}

static PROFILE: LazyLock<Profile> =
    LazyLock::new(|| serde_json::from_str(include_str!("profile.json")).expect("the built-in seccomp profile parses"));

fn native_arch() -> Option<Arch> {
    match std::env::consts::ARCH {
        "x86_64" => Some(Arch::ScmpArchX86_64),
        "aarch64" => Some(Arch::ScmpArchAarch64),
        "riscv64" => Some(Arch::ScmpArchRiscv64),
        "s390x" => Some(Arch::ScmpArchS390x),
        "powerpc64" => Some(Arch::ScmpArchPpc64le),
        _ => None,
    }
}

/// `CAP_SYS_ADMIN` for `Capability::SysAdmin`, as the profile names them.
fn cap_name(c: &Capability) -> String {
    format!("CAP_{}", c.to_string().trim_start_matches("CAP_").to_uppercase())
}

/// The filter for a process whose bounding set is `caps`.
pub(crate) fn filter(caps: &HashSet<Capability>) -> Result<LinuxSeccomp, RuntimeError> {
    let held: HashSet<String> = caps.iter().map(cap_name).collect();
    let arch = std::env::consts::ARCH;
    let rules: Vec<LinuxSyscall> = PROFILE
        .rules
        .iter()
        .filter(|r| r.if_caps.iter().all(|c| held.contains(c)))
        .filter(|r| !r.unless_caps.iter().any(|c| held.contains(c)))
        .filter(|r| r.arches.is_empty() || r.arches.iter().any(|a| a == arch))
        .filter(|r| !r.not_arches.iter().any(|a| a == arch))
        .map(|r| r.syscall.clone())
        .collect();
    let mut b = LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(PROFILE.default_errno_ret)
        .syscalls(rules);
    if let Some(a) = native_arch() {
        b = b.architectures(vec![a]);
    }
    b.build().map_err(|e| RuntimeError::InvalidRequest(format!("seccomp profile: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::DEFAULT_CAPABILITIES;
    use oci_spec::runtime::LinuxSeccompOperator;

    fn rules_for<'a>(f: &'a LinuxSeccomp, name: &str) -> Vec<&'a LinuxSyscall> {
        f.syscalls().iter().flatten().filter(|s| s.names().iter().any(|n| n == name)).collect()
    }

    #[test]
    fn docker_semantics_for_the_default_capabilities() {
        let caps: HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
        let f = filter(&caps).unwrap();
        assert_eq!(f.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(f.default_errno_ret(), Some(1));
        for allowed in ["read", "execve", "fork", "io_setup", "chroot", "ptrace", "mknod"] {
            assert!(!rules_for(&f, allowed).is_empty(), "{allowed} is allowed");
        }
        for denied in [
            "io_uring_setup",
            "io_uring_enter",
            "bpf",
            "perf_event_open",
            "keyctl",
            "add_key",
            "request_key",
            "userfaultfd",
            "kexec_load",
            "init_module",
            "mount",
            "umount2",
            "pivot_root",
            "swapon",
            "reboot",
            "open_by_handle_at",
            "unshare",
            "setns",
        ] {
            assert!(rules_for(&f, denied).is_empty(), "{denied} must not be allowed");
        }
        let clone = rules_for(&f, "clone");
        assert_eq!(clone.len(), 1);
        let arg = clone[0].args().as_ref().unwrap()[0];
        assert_eq!(arg.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_eq!(arg.value(), 0x7E02_0000, "the namespace flags are the mask");
        let clone3 = rules_for(&f, "clone3");
        assert_eq!(clone3[0].action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(clone3[0].errno_ret(), Some(38));
        let personality: Vec<u64> =
            rules_for(&f, "personality").iter().map(|r| r.args().as_ref().unwrap()[0].value()).collect();
        assert!(!personality.contains(&0x0040_0000), "READ_IMPLIES_EXEC is refused");
        assert!(personality.contains(&0));
    }

    #[test]
    fn capability_conditions() {
        let mut caps: HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
        caps.insert(Capability::SysAdmin);
        let f = filter(&caps).unwrap();
        assert!(!rules_for(&f, "mount").is_empty());
        assert!(rules_for(&f, "clone3").iter().all(|r| r.action() == LinuxSeccompAction::ScmpActAllow));
        caps.remove(&Capability::SysChroot);
        assert!(rules_for(&filter(&caps).unwrap(), "chroot").is_empty());
    }
}
