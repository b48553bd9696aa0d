//! The request and result of running a command in a vessel.

use std::fmt;

use tokio::io::{AsyncRead, AsyncWrite};

/// How to run one command inside a vessel.
///
/// Streams are borrowed for `'a`, so a caller can capture output into a local
/// buffer (`Some(Box::new(&mut out))`) without `'static` gymnastics.
#[derive(Default)]
pub struct ExecOptions<'a> {
    /// Program and arguments; `command[0]` is looked up in the image's `PATH`.
    pub command: Vec<String>,
    /// Working directory inside the vessel; the vessel's `work_dir` when `None`.
    pub work_dir: Option<String>,
    /// Extra `KEY=VALUE` pairs, applied over the image's environment.
    pub env: Vec<String>,
    /// Standard input; the process sees end-of-file when `None`.
    pub stdin: Option<Box<dyn AsyncRead + Send + Unpin + 'a>>,
    /// Standard output (also the terminal's output with `tty`); discarded when `None`.
    pub stdout: Option<Box<dyn AsyncWrite + Send + Unpin + 'a>>,
    /// Standard error; discarded when `None`. Unused with `tty`.
    pub stderr: Option<Box<dyn AsyncWrite + Send + Unpin + 'a>>,
    /// Run on a pseudo-terminal instead of pipes.
    pub tty: bool,
    /// Keep the command's filesystem changes (`true`), or run it on a
    /// throwaway layer that is discarded when it ends (`false`, the default,
    /// as in the Go original).
    pub persist_result: bool,
    /// Kill the command's whole process tree when it runs this long; the
    /// result then says `timed_out` (exit code 137, as docker reports a
    /// kill). `None`: no limit. Zero is refused.
    pub timeout: Option<std::time::Duration>,
    /// Limits for this command only: each value set here must be within the
    /// vessel's (narrower applies, wider is refused with a typed error);
    /// unset values are the vessel's.
    pub limits: crate::Limits,
}

impl fmt::Debug for ExecOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecOptions")
            .field("command", &self.command)
            .field("work_dir", &self.work_dir)
            .field("env", &self.env)
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .field("tty", &self.tty)
            .field("persist_result", &self.persist_result)
            .field("timeout", &self.timeout)
            .field("limits", &self.limits)
            .finish()
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExecResult {
    /// The exit status; `128 + N` when the process was killed by signal `N`
    /// (137 for SIGKILL, also when the timeout ended it).
    pub exit_code: i32,
    /// Whether `ExecOptions::timeout` passed and the command was killed.
    pub timed_out: bool,
    /// Whether the OOM killer ended a process of the command (its exit
    /// code is then usually 137).
    pub oom_killed: bool,
}

impl ExecResult {
    /// A result with the given exit code.
    pub fn new(exit_code: i32) -> Self {
        Self { exit_code, timed_out: false, oom_killed: false }
    }

    /// A result whose command was (`true`) or was not ended by the OOM killer.
    pub fn with_oom_killed(mut self, oom_killed: bool) -> Self {
        self.oom_killed = oom_killed;
        self
    }

    /// The result of a command killed when its timeout passed.
    pub fn timed_out() -> Self {
        Self { exit_code: 137, timed_out: true, oom_killed: false }
    }

    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
}
