//! `ContainerdRuntime` without the `containerd` feature.

use std::convert::Infallible;

use crate::backend::{Backend, not_compiled};
use crate::{ContainerdConfig, RuntimeError};

/// The containerd backend, compiled out: connecting always fails, so no
/// value of it exists.
#[derive(Debug, Clone)]
pub struct ContainerdRuntime(Infallible);

impl ContainerdRuntime {
    /// Fails: the build lacks the backend.
    pub async fn connect(_config: ContainerdConfig) -> Result<Self, RuntimeError> {
        Err(not_compiled(Backend::Containerd))
    }
}

#[async_trait::async_trait]
impl crate::Runtime for ContainerdRuntime {
    fn name(&self) -> &'static str {
        Backend::Containerd.name()
    }

    fn is_available(&self) -> Result<(), RuntimeError> {
        match self.0 {}
    }

    async fn run_outcome(&self, _req: crate::RunRequest<'_>) -> Result<crate::RunOutcome, RuntimeError> {
        match self.0 {}
    }
}
