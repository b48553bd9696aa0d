//! Work off the async worker threads (tar, walks, fsyncs, exports). A
//! panic in it is re-raised in the caller, as if the work had run inline:
//! a bug must not come back dressed as a user's bad input.

use crate::{Result, VesselError};

/// Runs `f` on tokio's blocking pool; a panic in `f` resumes in the caller.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    joined(tokio::task::spawn_blocking(f)).await
}

/// Waits for a spawned task; a panic in it resumes in the caller.
pub(crate) async fn joined<T>(task: tokio::task::JoinHandle<T>) -> Result<T> {
    match task.await {
        Ok(v) => Ok(v),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only a runtime shutting down cancels a task it was not asked to.
            Err(e) => Err(VesselError::Io {
                op: "run background work",
                path: Default::default(),
                source: std::io::Error::other(e),
            }),
        },
    }
}
