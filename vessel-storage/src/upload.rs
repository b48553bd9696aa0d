//! Multipart uploads that a dead process cannot leave behind.
//!
//! A multipart upload's parts are stored, and billed, until the upload is
//! completed or aborted. A process killed mid-upload does neither, and the
//! object store API `object_store` speaks cannot list pending uploads. So
//! each upload is journaled: `uploads/<random>.json` names its key and
//! upload id, is written before the first part and removed once the upload
//! is completed or aborted. The storage's `abort_stale_uploads` (run by the
//! facade's gc) aborts the uploads whose journal is older than a grace
//! period, as the `AbortIncompleteMultipartUpload` lifecycle rule of S3
//! would, on any store.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::object::{IN_FLIGHT, PART, read_up_to};
use crate::object_errors::{remote, service_code};
use crate::{BlobReader, StorageError};

/// The journal's folder in the layout.
pub(crate) const UPLOADS: &str = "uploads";

/// One journaled upload.
#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    key: String,
    upload: String,
    started: DateTime<Utc>,
}

/// The stores an upload needs: the object store for single PUTs and the
/// journal, the same store's multipart API for parts.
#[derive(Clone)]
pub(crate) struct Uploads {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) parts: Arc<dyn MultipartStore>,
}

impl std::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploads").field("store", &self.store).finish_non_exhaustive()
    }
}

/// Aborts an upload that was neither completed nor aborted (an error, or
/// the save's future dropped) and removes its journal, so no parts linger.
struct AbortOnDrop {
    uploads: Uploads,
    key: Path,
    id: String,
    journal: Path,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (u, key, id, journal) = (self.uploads.clone(), self.key.clone(), self.id.clone(), self.journal.clone());
            rt.spawn(async move {
                if u.parts.abort_multipart(&key, &id).await.is_ok() {
                    let _ = u.store.delete(&journal).await;
                }
            });
        }
    }
}

impl Uploads {
    /// Streams `data` to `key`: one PUT for less than a part, else a
    /// journaled multipart upload with at most [`IN_FLIGHT`] parts in flight.
    /// The journal goes in folder `journals`.
    pub(crate) async fn upload(&self, journals: &Path, key: &Path, mut data: BlobReader) -> Result<(), StorageError> {
        let first = read_up_to(&mut data, PART).await?;
        if first.len() < PART {
            self.store
                .put_opts(key, PutPayload::from(first), PutOptions::default())
                .await
                .map_err(remote("put", key))?;
            return Ok(());
        }
        let journal = journals.clone().join(format!("{:016x}.json", rand::random::<u64>()));
        let id = self.parts.create_multipart(key).await.map_err(remote("start upload", key))?;
        let mut guard = AbortOnDrop {
            uploads: self.clone(),
            key: key.clone(),
            id: id.clone(),
            journal: journal.clone(),
            armed: true,
        };
        let entry = Journal { key: key.to_string(), upload: id.clone(), started: Utc::now() };
        let entry = serde_json::to_vec(&entry).map_err(|e| StorageError::Source(std::io::Error::other(e)))?;
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        self.store.put_opts(&journal, PutPayload::from(entry), create).await.map_err(remote("put", &journal))?;
        let mut done = Vec::new();
        let mut running = FuturesOrdered::new();
        let mut chunk = first;
        for index in 0usize.. {
            running.push_back(self.parts.put_part(key, &id, index, PutPayload::from(chunk)));
            if running.len() >= IN_FLIGHT
                && let Some(part) = running.next().await
            {
                done.push(part.map_err(remote("upload part of", key))?);
            }
            chunk = read_up_to(&mut data, PART).await?;
            if chunk.is_empty() {
                break;
            }
        }
        while let Some(part) = running.next().await {
            done.push(part.map_err(remote("upload part of", key))?);
        }
        self.parts.complete_multipart(key, &id, done).await.map_err(remote("complete upload of", key))?;
        guard.armed = false;
        // A journal left by a failure here names a completed upload, which
        // the next sweep finds gone and removes.
        let _ = self.store.delete(&journal).await;
        Ok(())
    }

    /// Aborts the upload `journal` names if it started at least
    /// `older_than` ago (or the journal is unreadable); `true` when it is
    /// no longer pending and its journal should go.
    pub(crate) async fn abort_if_stale(
        &self,
        journal: &[u8],
        older_than: std::time::Duration,
    ) -> Result<bool, StorageError> {
        let Ok(entry) = serde_json::from_slice::<Journal>(journal) else {
            tracing::warn!("an unreadable upload journal, removed");
            return Ok(true);
        };
        if (Utc::now() - entry.started).to_std().is_ok_and(|age| age < older_than) {
            return Ok(false);
        }
        let key = Path::from(entry.key.as_str());
        match self.parts.abort_multipart(&key, &entry.upload).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            // Completed or aborted already: nothing is pending.
            Err(e) if service_code(&e).is_some_and(|c| c == "NoSuchUpload") => Ok(true),
            Err(e) => Err(remote("abort upload of", &key)(e)),
        }
    }
}
