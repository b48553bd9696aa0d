//! Runs the storage conformance suite (tests/common) against every backend:
//! a directory, and (feature `s3`) a real S3-compatible server, the one
//! `cargo xtask test` starts (`VESSEL_S3_URL`, a bucket URL; credentials
//! and endpoint in the usual `AWS_*` variables), each plain and zstd-compressed.

mod common;

use common::{LocalRaw, Raw, TestResult};
use vessel_storage::{CompressedStorage, LocalStorage, Storage};

/// What a case runs on; `_dir` keeps a local root alive.
struct Fixture {
    storage: Box<dyn Storage>,
    raw: Box<dyn Raw>,
    _dir: Option<tempfile::TempDir>,
}

/// One suite case, run on a fresh storage from the enclosing module's `make`.
macro_rules! case {
    ($name:ident $(, $arg:expr)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> TestResult {
            let Some(f) = make().await? else { return Ok(()) };
            common::$name(&*f.storage, &*f.raw $(, $arg)?).await
        }
    };
}

macro_rules! conformance {
    ($backend:ident, $make:expr, decodes = $decodes:expr) => {
        mod $backend {
            use super::*;

            async fn make() -> anyhow::Result<Option<Fixture>> {
                ($make)().await
            }

            case!(manifest_round_trip);
            case!(not_found_names_what_is_missing);
            case!(snapshot_round_trip);
            case!(delete_semantics);
            case!(images_round_trip);
            case!(failed_write_leaves_old_data);
            case!(cancelled_write_leaves_old_data);
            case!(concurrent_writers);
            case!(corrupt_manifest_is_a_typed_error);
            case!(reads_the_go_layout, $decodes);
            case!(conditional_writes);
            case!(one_conditional_writer_wins);
        }
    };
}

async fn local(compressed: bool) -> anyhow::Result<Option<Fixture>> {
    let dir = tempfile::tempdir()?;
    let s = LocalStorage::new(dir.path())?;
    let storage: Box<dyn Storage> =
        if compressed { Box::new(CompressedStorage::new(s).with_level(1)) } else { Box::new(s) };
    Ok(Some(Fixture { storage, raw: Box::new(LocalRaw(dir.path().to_owned())), _dir: Some(dir) }))
}

conformance!(local, || local(false), decodes = false);
conformance!(compressed_local, || local(true), decodes = true);

#[cfg(feature = "s3")]
mod s3 {
    use super::*;
    use object_store::{ObjectStoreExt, PutPayload};
    use vessel_storage::ObjectStorage;

    /// A [`Raw`] over the objects of an `ObjectStorage`.
    pub(super) struct ObjectRaw(pub(super) ObjectStorage);

    #[async_trait::async_trait]
    impl Raw for ObjectRaw {
        async fn put(&self, rel: &str, data: Vec<u8>) -> anyhow::Result<()> {
            self.0.store().put(&self.0.key(rel), PutPayload::from(data)).await?;
            Ok(())
        }
        async fn exists(&self, rel: &str) -> anyhow::Result<bool> {
            match self.0.store().head(&self.0.key(rel)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
        async fn strays(&self) -> anyhow::Result<Vec<String>> {
            // Uploads are invisible until complete: nothing can stray under
            // a key. (Aborted multipart uploads are checked in s3.rs.)
            Ok(Vec::new())
        }
    }

    /// A fresh prefix in the test bucket, or `None` (after a note) when
    /// no server is configured.
    pub(super) async fn fixture(compressed: bool) -> anyhow::Result<Option<Fixture>> {
        let Some(base) = vessel_test_support::required_env("storage conformance (s3)", "VESSEL_S3_URL") else {
            return Ok(None);
        };
        let url = format!("{}/conformance-{:016x}", base.to_string_lossy(), rand::random::<u64>());
        let s = ObjectStorage::connect(&url).await?;
        let raw = Box::new(ObjectRaw(s.clone()));
        let storage: Box<dyn Storage> =
            if compressed { Box::new(CompressedStorage::new(s).with_level(1)) } else { Box::new(s) };
        Ok(Some(Fixture { storage, raw, _dir: None }))
    }
}

#[cfg(feature = "s3")]
conformance!(object_s3, || s3::fixture(false), decodes = false);
#[cfg(feature = "s3")]
conformance!(compressed_object_s3, || s3::fixture(true), decodes = true);
