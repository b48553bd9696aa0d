//! What the caller and its runner say to each other, in one typed place
//! (as youki's own `process/message.rs` does for its processes): the run's
//! configuration, handed to the runner as one JSON environment variable
//! (the runner is a re-execution of the caller and reads it before any
//! thread starts), its fds at fixed numbers, and the runner's one report
//! on the status pipe.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::RuntimeError;

/// The variable that makes a re-executed caller a runner, holding its
/// [`RunnerConfig`] as JSON.
pub(crate) const RUNNER_ENV: &str = "VESSEL_YOUKI_RUNNER";

/// The read end of the caller's lifeline: end of file when the caller dies.
pub(crate) const LIFELINE_FD: i32 = 3;
/// Where the runner writes its [`Report`].
pub(crate) const STATUS_FD: i32 = 4;
/// The run's lock, shared with the caller (see `lock_file`).
pub(crate) const LOCK_FD: i32 = 5;
/// Rootless: the user namespace (of the run's id mapping) the runner joins.
pub(crate) const JOIN_USERNS_FD: i32 = 6;
/// A gated run ([`Run::gated`]): one byte when the container may start,
/// end of file when it must not.
pub(crate) const GO_FD: i32 = 7;

/// What a runner does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub(crate) enum Task {
    /// Create, start, wait for and delete one container.
    Run(Run),
    /// Remove the container of a runner that died (kill, delete, cgroups).
    Cleanup {
        /// The container's id.
        id: String,
    },
}

/// One container to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Run {
    /// The bundle (its `config.json`).
    pub(crate) bundle: PathBuf,
    /// The container's id.
    pub(crate) id: String,
    /// Give the container a private network namespace with loopback up
    /// (else it shares the runner's, the host's).
    pub(crate) private_network: bool,
    /// Join this network namespace (a vessel's network) before making the
    /// container, which then shares it: the runner is host root, which may;
    /// a process already in the container's user namespace may not.
    #[serde(default)]
    pub(crate) join_network: Option<PathBuf>,
    /// The spec has a user namespace.
    pub(crate) userns: bool,
    /// Start the created container only on the caller's go ([`GO_FD`]).
    #[serde(default)]
    pub(crate) gated: bool,
    /// Run on a pseudo-terminal of this size (rows, columns).
    pub(crate) tty: Option<(u16, u16)>,
    /// Rootless with a delegated subtree: the run's cgroups, which the
    /// runner makes and limits itself.
    pub(crate) cgroups: Option<DelegatedRun>,
}

/// The run's cgroups in a user's delegated subtree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DelegatedRun {
    /// The subtree's name in each controller (`vessel-<uid>`).
    pub(crate) parent: String,
    /// Memory in bytes, CPU quota in µs per 100 ms, processes.
    pub(crate) memory: Option<i64>,
    pub(crate) cpu_quota_us: Option<i64>,
    pub(crate) pids: Option<i64>,
}

/// Everything a runner is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunnerConfig {
    /// libcontainer's state root.
    pub(crate) state: PathBuf,
    pub(crate) task: Task,
}

impl RunnerConfig {
    /// This process's configuration, if it is a runner; `Err` if it is one
    /// but the variable does not parse (a caller of another version).
    pub(crate) fn from_env() -> Option<Result<Self, String>> {
        let text = std::env::var(RUNNER_ENV).ok()?;
        Some(serde_json::from_str(&text).map_err(|e| format!("{RUNNER_ENV} does not parse: {e}")))
    }

    pub(crate) fn to_env(&self) -> String {
        serde_json::to_string(self).expect("a runner config serialises")
    }
}

/// Why a run failed before its command ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FailureKind {
    /// The command could not be executed (not found, not executable).
    Exec,
    /// The container could not be made or run.
    Container,
}

/// The runner's one report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "snake_case")]
pub(crate) enum Report {
    /// The command ran and ended with `code`; `oom`: the OOM killer ended
    /// a process of the run.
    Exited { code: i32, oom: bool },
    /// The run failed.
    Failed { kind: FailureKind, message: String },
}

impl Report {
    /// Parses a report line; `None` for anything else (a runner killed
    /// before it reported writes nothing).
    pub(crate) fn parse(line: &str) -> Option<Self> {
        serde_json::from_str(line.trim()).ok()
    }

    /// The run's result; `command` is argv[0].
    pub(crate) fn into_result(self, command: &str) -> Result<crate::RunOutcome, RuntimeError> {
        match self {
            Self::Exited { code, oom } => Ok(crate::RunOutcome::new(code, oom)),
            Self::Failed { kind: FailureKind::Exec, message } => Err(crate::error::start_failure(command, &message)),
            Self::Failed { kind: FailureKind::Container, message } => Err(RuntimeError::Runner(message)),
        }
    }

    pub(crate) fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a report serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_and_reports_round_trip() {
        let c = RunnerConfig {
            state: "/s".into(),
            task: Task::Run(Run {
                bundle: "/b".into(),
                id: "vessel-1".into(),
                private_network: true,
                join_network: Some("/run/vessel/net/ns-1".into()),
                userns: true,
                gated: true,
                tty: Some((24, 80)),
                cgroups: Some(DelegatedRun {
                    parent: "vessel-1000".into(),
                    memory: Some(1 << 20),
                    cpu_quota_us: None,
                    pids: Some(8),
                }),
            }),
        };
        assert_eq!(serde_json::from_str::<RunnerConfig>(&c.to_env()).unwrap(), c);
        for r in [
            Report::Exited { code: 3, oom: true },
            Report::Failed { kind: FailureKind::Exec, message: "no such file".into() },
        ] {
            assert_eq!(Report::parse(&r.to_line()), Some(r));
        }
        assert_eq!(Report::parse(""), None);
        assert_eq!(Report::parse("{\"exit\": 1}"), None, "an older runner's line is not a report");
        assert!(matches!(
            Report::Failed { kind: FailureKind::Container, message: "m".into() }.into_result("sh"),
            Err(RuntimeError::Runner(m)) if m == "m"
        ));
    }
}
