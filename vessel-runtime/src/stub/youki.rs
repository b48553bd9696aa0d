//! `YoukiRuntime` without the `youki` feature.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::backend::{Backend, not_compiled};
use crate::{RunOutcome, RunRequest, Runtime, RuntimeError};

/// The youki backend, compiled out: never available.
#[derive(Debug, Clone)]
pub struct YoukiRuntime {
    _root: PathBuf,
}

impl YoukiRuntime {
    /// A runtime that says it is compiled out.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { _root: root.into() }
    }
}

#[async_trait]
impl Runtime for YoukiRuntime {
    fn name(&self) -> &'static str {
        Backend::Youki.name()
    }

    fn is_available(&self) -> Result<(), RuntimeError> {
        Err(not_compiled(Backend::Youki))
    }

    async fn run_outcome(&self, _req: RunRequest<'_>) -> Result<RunOutcome, RuntimeError> {
        Err(not_compiled(Backend::Youki))
    }
}
