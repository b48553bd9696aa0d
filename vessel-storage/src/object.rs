//! [`ObjectStorage`]: the [`Storage`] of many hosts, over any object store
//! the `object_store` crate speaks (S3 and S3-compatible servers, GCS,
//! Azure, memory), in [`crate::LocalStorage`]'s layout under a prefix.
//!
//! Blobs stream: one PUT for a blob under [`PART`], a multipart upload
//! otherwise, with at most [`IN_FLIGHT`] parts buffered, so memory stays
//! constant for any size. Nothing is visible under a blob's key until its
//! upload completed; a failed or cancelled upload is aborted, and one a
//! killed process left is aborted by a later sweep (see `upload`). Requests are
//! retried with exponential backoff (the crate's retry layer) on transient
//! failures; what is left is a typed error. Conditional writes use the
//! store's create-if-absent and update-if-version (for S3, `If-None-Match:
//! *` and `If-Match`).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::MultipartStore;
use object_store::path::{Path, PathPart};
#[cfg(feature = "cloud")]
use object_store::{ClientOptions, RetryConfig};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use tokio::io::AsyncReadExt;
use vessel_core::{ImageRef, SnapshotId, VesselId, VesselManifest};

use crate::local::{manifest_json, manifest_name, parse_manifest};
use crate::object_errors::{remote, service_code};
use crate::record::{FORKS, HOSTS};
use crate::upload::{UPLOADS, Uploads};
use crate::{
    BlobEncoding, BlobReader, HostId, Record, RecordKey, Storage, StorageError, StoredSnapshot, Version, WriteIf,
};

/// The size of an upload part (S3 wants at least 5 MiB but the last).
pub(crate) const PART: usize = 8 << 20;
/// Parts uploading at once, each buffered: memory is about `PART * (IN_FLIGHT + 1)`.
pub(crate) const IN_FLIGHT: usize = 4;
const MANIFEST: &str = "vessel.dat";
const INDEX_SUFFIX: &str = ".vessel-index.json";

/// Storage in an object store (see the module docs).
#[derive(Debug, Clone)]
pub struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    /// The same store, with its multipart API, for uploads.
    uploads: Uploads,
    prefix: Vec<String>,
    url: String,
    encoding: BlobEncoding,
}

/// The retry policy of every request: transient failures (5xx, timeouts,
/// refused connections) are retried for up to 15 s, then reported.
#[cfg(feature = "cloud")]
fn retry() -> RetryConfig {
    use std::time::Duration;
    RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(15),
    }
}

/// Timeouts that fail fast on a dead server (the retries cover blips).
/// These options replace what the builder read from the environment, so
/// `<env>_ALLOW_HTTP` (e.g. `AWS_ALLOW_HTTP=true`) is read again here.
#[cfg(feature = "cloud")]
fn client(env: &str) -> ClientOptions {
    use std::time::Duration;
    let allow_http =
        std::env::var(format!("{env}_ALLOW_HTTP")).is_ok_and(|v| matches!(v.to_lowercase().as_str(), "1" | "true"));
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(120))
        .with_allow_http(allow_http)
}

/// `scheme://bucket/prefix` split into its bucket URL and prefix segments.
fn split_url(url: &str) -> Result<(&str, &str, Vec<String>), StorageError> {
    let invalid = |reason: &str| StorageError::InvalidUrl { url: url.to_owned(), reason: reason.to_owned() };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| invalid("expected scheme://bucket/prefix"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() && scheme != "memory" {
        return Err(invalid("no bucket"));
    }
    let mut parts = Vec::new();
    for seg in prefix.split('/').filter(|s| !s.is_empty()) {
        if seg == "." || seg == ".." || seg.contains(['?', '#']) || seg.chars().any(char::is_control) {
            return Err(invalid("the prefix must be plain path segments"));
        }
        parts.push(seg.to_owned());
    }
    Ok((scheme, &url[..scheme.len() + 3 + bucket.len()], parts))
}

fn version_of(e_tag: Option<String>, version: Option<String>) -> Version {
    Version { e_tag, version }
}

impl ObjectStorage {
    /// Connects to the store `url` names (`s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`, `memory://`), with
    /// each store's usual environment: for S3 `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` (an
    /// S3-compatible server) and `AWS_ALLOW_HTTP`; for GCS
    /// `GOOGLE_SERVICE_ACCOUNT` etc.; for Azure `AZURE_STORAGE_ACCOUNT_NAME`
    /// etc. Checks with one LIST that the bucket exists and the credentials
    /// are accepted, before anything is written.
    pub async fn connect(url: &str) -> Result<Self, StorageError> {
        Self::connect_with(url, &[]).await
    }

    /// [`ObjectStorage::connect`] with configuration that overrides the
    /// environment, as `object_store` keys (`aws_access_key_id`,
    /// `aws_secret_access_key`, `aws_endpoint`, `google_service_account`, …).
    pub async fn connect_with(url: &str, options: &[(&str, &str)]) -> Result<Self, StorageError> {
        let (scheme, bucket_url, prefix) = split_url(url)?;
        #[cfg(feature = "cloud")]
        let invalid = |e: object_store::Error| StorageError::InvalidUrl { url: url.to_owned(), reason: e.to_string() };
        #[cfg(not(feature = "cloud"))]
        let _ = (bucket_url, options);
        // Each store's builder: its environment, then `options` over it,
        // the bucket, our retries and timeouts (`env`: its variables' prefix).
        #[cfg(feature = "cloud")]
        macro_rules! cloud {
            ($builder:ty, $env:literal) => {
                both(Arc::new(
                    options
                        .iter()
                        .try_fold(<$builder>::from_env(), |b, (k, v)| {
                            Ok::<_, object_store::Error>(b.with_config(k.parse()?, *v))
                        })
                        .map_err(invalid)?
                        .with_url(bucket_url)
                        .with_retry(retry())
                        .with_client_options(client($env))
                        .build()
                        .map_err(invalid)?,
                ))
            };
        }
        let (store, parts) = match scheme {
            #[cfg(feature = "s3")]
            "s3" | "s3a" => cloud!(object_store::aws::AmazonS3Builder, "AWS"),
            #[cfg(feature = "gcs")]
            "gs" => cloud!(object_store::gcp::GoogleCloudStorageBuilder, "GOOGLE"),
            #[cfg(feature = "azure")]
            "az" | "azure" | "abfs" | "abfss" | "adl" => cloud!(object_store::azure::MicrosoftAzureBuilder, "AZURE"),
            "memory" => both(Arc::new(object_store::memory::InMemory::new())),
            #[cfg(not(feature = "s3"))]
            "s3" | "s3a" => return Err(StorageError::NotCompiled { scheme: scheme.into(), feature: "s3" }),
            #[cfg(not(feature = "gcs"))]
            "gs" => return Err(StorageError::NotCompiled { scheme: scheme.into(), feature: "gcs" }),
            #[cfg(not(feature = "azure"))]
            "az" | "azure" | "abfs" | "abfss" | "adl" => {
                return Err(StorageError::NotCompiled { scheme: scheme.into(), feature: "azure" });
            }
            _ => {
                return Err(StorageError::InvalidUrl {
                    url: url.into(),
                    reason: format!("unknown scheme {scheme}:// (s3, gs, az, memory, file)"),
                });
            }
        };
        let storage = Self {
            uploads: Uploads { store: store.clone(), parts },
            store,
            prefix,
            url: url.to_owned(),
            encoding: BlobEncoding::Plain,
        };
        storage.probe().await?;
        Ok(storage)
    }

    /// Storage over an object store built by the caller, under `prefix`.
    pub fn from_store<S: ObjectStore + MultipartStore>(store: Arc<S>, prefix: &str) -> Self {
        let prefix = prefix.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect();
        let (store, parts) = both(store);
        Self {
            uploads: Uploads { store: store.clone(), parts },
            store,
            prefix,
            url: "(object store)".into(),
            encoding: BlobEncoding::Plain,
        }
    }

    /// The URL it was connected with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object store itself (for inspection; writes belong to the `Storage` API).
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The object key of `rel` (a `/`-separated path in the layout).
    pub fn key(&self, rel: &str) -> Path {
        Path::from_iter(
            self.prefix.iter().map(|s| PathPart::from(s.as_str())).chain(rel.split('/').map(PathPart::from)),
        )
    }

    async fn probe(&self) -> Result<(), StorageError> {
        let root = self.key("vessels");
        let url = self.url.clone();
        match self.store.list_with_delimiter(Some(&root)).await {
            Ok(_) => Ok(()),
            Err(e @ object_store::Error::NotFound { .. }) => {
                Err(StorageError::NoSuchBucket { url, source: Box::new(e) })
            }
            // S3 reports a missing bucket as a generic error on LIST.
            Err(e) if service_code(&e).is_some_and(|c| c == "NoSuchBucket" || c == "ContainerNotFound") => {
                Err(StorageError::NoSuchBucket { url, source: Box::new(e) })
            }
            Err(e) => Err(remote("list", &root)(e)),
        }
    }

    fn manifest_key(&self, id: &VesselId) -> Path {
        self.key(&format!("vessels/{id}/{MANIFEST}"))
    }

    fn snapshot_key(&self, vessel: &VesselId, snapshot: &SnapshotId, enc: BlobEncoding) -> Path {
        self.key(&format!("vessels/{vessel}/snapshots/{snapshot}{}", enc.extension()))
    }

    fn image_key(&self, image: &ImageRef, enc: BlobEncoding) -> Path {
        self.key(&format!("images/{image}{}", enc.extension()))
    }

    fn index_key(&self, image: &ImageRef) -> Path {
        self.key(&format!("images/{image}{INDEX_SUFFIX}"))
    }

    fn load_order(&self) -> impl Iterator<Item = BlobEncoding> + use<> {
        let own = self.encoding;
        std::iter::once(own).chain(BlobEncoding::ALL.into_iter().filter(move |e| *e != own))
    }

    /// Streams `data` to `key`: one PUT, or a journaled multipart upload
    /// for more than a part.
    async fn upload(&self, key: &Path, data: BlobReader) -> Result<(), StorageError> {
        self.uploads.upload(&self.key(UPLOADS), key, data).await
    }

    /// Streams `key` out, or `None` when absent.
    async fn download(&self, key: &Path) -> Result<Option<BlobReader>, StorageError> {
        match self.store.get(key).await {
            Ok(r) => {
                let stream = r.into_stream().map_err(std::io::Error::other);
                Ok(Some(Box::new(tokio_util::io::StreamReader::new(stream))))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote("get", key)(e)),
        }
    }

    async fn get_small(&self, key: &Path) -> Result<Option<(Bytes, Version)>, StorageError> {
        match self.store.get(key).await {
            Ok(r) => {
                let v = version_of(r.meta.e_tag.clone(), r.meta.version.clone());
                Ok(Some((r.bytes().await.map_err(remote("get", key))?, v)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(remote("get", key)(e)),
        }
    }

    async fn put_if(&self, key: &Path, data: Vec<u8>, cond: &WriteIf, what: String) -> Result<Version, StorageError> {
        let mode = match cond {
            WriteIf::Absent => PutMode::Create,
            WriteIf::Matches(v) => {
                PutMode::Update(UpdateVersion { e_tag: v.e_tag.clone(), version: v.version.clone() })
            }
        };
        let r =
            self.store.put_opts(key, PutPayload::from(data), PutOptions { mode, ..Default::default() }).await.map_err(
                |e| match e {
                    object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
                        StorageError::Conflict { what }
                    }
                    e => remote("put", key)(e),
                },
            )?;
        Ok(version_of(r.e_tag, r.version))
    }

    async fn delete_all(&self, keys: Vec<Path>) -> Result<(), StorageError> {
        let first = keys.first().cloned().unwrap_or_else(|| self.key(""));
        let stream = futures::stream::iter(keys.into_iter().map(Ok)).boxed();
        let results: Vec<_> = self.store.delete_stream(stream).collect().await;
        for r in results {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(remote("delete", &first)(e)),
            }
        }
        Ok(())
    }

    async fn list_keys(&self, prefix: &Path) -> Result<Vec<Path>, StorageError> {
        self.store.list(Some(prefix)).map_ok(|m| m.location).try_collect().await.map_err(remote("list", prefix))
    }

    /// `key` relative to `dir` (both from [`ObjectStorage::key`]), as text.
    fn relative(dir: &Path, key: &Path) -> Option<String> {
        key.prefix_match(dir).map(|parts| parts.map(|p| p.as_ref().to_owned()).collect::<Vec<_>>().join("/"))
    }
}

/// One store as both the object API and its multipart API.
fn both<S: ObjectStore + MultipartStore>(s: Arc<S>) -> (Arc<dyn ObjectStore>, Arc<dyn MultipartStore>) {
    (s.clone(), s)
}

pub(crate) async fn read_up_to(data: &mut BlobReader, limit: usize) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::with_capacity(limit.min(1 << 20));
    let mut taken = (&mut *data).take(limit as u64);
    taken.read_to_end(&mut out).await.map_err(StorageError::Source)?;
    Ok(out)
}

#[async_trait]
impl Storage for ObjectStorage {
    async fn save_vessel_manifest(&self, manifest: &VesselManifest) -> Result<(), StorageError> {
        let key = self.manifest_key(&manifest.id);
        self.store.put(&key, PutPayload::from(manifest_json(manifest)?)).await.map_err(remote("put", &key))?;
        Ok(())
    }

    async fn load_vessel_manifest_versioned(&self, id: &VesselId) -> Result<(VesselManifest, Version), StorageError> {
        match self.get_small(&self.manifest_key(id)).await? {
            Some((bytes, v)) => Ok((parse_manifest(id, &bytes)?, v)),
            None => Err(StorageError::VesselNotFound(id.clone())),
        }
    }

    async fn save_vessel_manifest_if(
        &self,
        manifest: &VesselManifest,
        cond: &WriteIf,
    ) -> Result<Version, StorageError> {
        let what = manifest_name(&manifest.id);
        self.put_if(&self.manifest_key(&manifest.id), manifest_json(manifest)?, cond, what).await
    }

    async fn load_record(&self, key: &RecordKey) -> Result<Option<Record>, StorageError> {
        Ok(self.get_small(&self.key(&key.path())).await?.map(|(b, version)| Record { data: b.to_vec(), version }))
    }

    async fn save_record(&self, key: &RecordKey, data: Vec<u8>, cond: &WriteIf) -> Result<Version, StorageError> {
        self.put_if(&self.key(&key.path()), data, cond, key.to_string()).await
    }

    async fn delete_record(&self, key: &RecordKey) -> Result<(), StorageError> {
        self.delete_all(vec![self.key(&key.path())]).await
    }

    async fn list_hosts(&self) -> Result<Vec<HostId>, StorageError> {
        let dir = self.key(HOSTS);
        let mut out: Vec<HostId> = self
            .list_keys(&dir)
            .await?
            .iter()
            .filter_map(|k| Self::relative(&dir, k))
            .filter_map(|n| n.strip_suffix(".json").and_then(|n| HostId::new(n).ok()))
            .collect();
        out.sort();
        Ok(out)
    }

    async fn list_vessels(&self) -> Result<Vec<VesselId>, StorageError> {
        let dir = self.key("vessels");
        let listing = self.store.list_with_delimiter(Some(&dir)).await.map_err(remote("list", &dir))?;
        let ids: Vec<VesselId> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| Self::relative(&dir, p))
            .filter_map(|n| VesselId::new(&n).ok())
            .collect();
        // Only those with a manifest (a HEAD each, 16 at a time).
        let mut found: Vec<VesselId> = futures::stream::iter(ids)
            .map(|id| async move {
                let key = self.manifest_key(&id);
                match self.store.head(&key).await {
                    Ok(_) => Ok(Some(id)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(remote("head", &key)(e)),
                }
            })
            .buffer_unordered(16)
            .try_filter_map(|x| async move { Ok(x) })
            .try_collect()
            .await?;
        found.sort();
        Ok(found)
    }

    async fn delete_vessel(&self, id: &VesselId) -> Result<(), StorageError> {
        // Snapshots first, the manifest last: an interrupted delete leaves
        // a listed vessel whose delete can be retried, never a hidden rest.
        let manifest = self.manifest_key(id);
        let mut keys = self.list_keys(&self.key(&format!("vessels/{id}"))).await?;
        keys.retain(|k| *k != manifest);
        self.delete_all(keys).await?;
        self.delete_all(vec![manifest]).await
    }

    async fn save_snapshot(
        &self,
        vessel: &VesselId,
        snapshot: &SnapshotId,
        data: BlobReader,
    ) -> Result<(), StorageError> {
        // Snapshot ids are never reused, so no blob of another encoding can
        // be beside it (a request per snapshot saved; images do check).
        self.upload(&self.snapshot_key(vessel, snapshot, self.encoding), data).await
    }

    async fn load_snapshot(&self, vessel: &VesselId, snapshot: &SnapshotId) -> Result<BlobReader, StorageError> {
        for enc in self.load_order() {
            if let Some(r) = self.download(&self.snapshot_key(vessel, snapshot, enc)).await? {
                return Ok(r);
            }
        }
        Err(StorageError::SnapshotNotFound { vessel: vessel.clone(), snapshot: snapshot.clone() })
    }

    async fn delete_snapshot(&self, vessel: &VesselId, snapshot: &SnapshotId) -> Result<(), StorageError> {
        self.delete_all(BlobEncoding::ALL.into_iter().map(|e| self.snapshot_key(vessel, snapshot, e)).collect()).await
    }

    async fn delete_vessel_manifest(&self, id: &VesselId) -> Result<(), StorageError> {
        self.delete_all(vec![self.manifest_key(id)]).await
    }

    async fn list_snapshots(&self, vessel: &VesselId) -> Result<Vec<StoredSnapshot>, StorageError> {
        let dir = self.key(&format!("vessels/{vessel}/snapshots"));
        let metas: Vec<object_store::ObjectMeta> =
            self.store.list(Some(&dir)).try_collect().await.map_err(remote("list", &dir))?;
        let mut out: Vec<StoredSnapshot> = metas
            .iter()
            .filter_map(|m| {
                let rel = Self::relative(&dir, &m.location)?;
                let id = SnapshotId::new(rel.split('.').next()?).ok()?;
                Some(StoredSnapshot { id, modified: m.last_modified })
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out.dedup_by(|a, b| a.id == b.id);
        Ok(out)
    }

    async fn list_snapshot_owners(&self) -> Result<Vec<VesselId>, StorageError> {
        let dir = self.key("vessels");
        let listing = self.store.list_with_delimiter(Some(&dir)).await.map_err(remote("list", &dir))?;
        let mut ids: Vec<VesselId> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| Self::relative(&dir, p))
            .filter_map(|n| VesselId::new(&n).ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    async fn list_forks(&self, owner: &VesselId) -> Result<Vec<VesselId>, StorageError> {
        let dir = self.key(&format!("{FORKS}/{owner}"));
        let mut out: Vec<VesselId> = self
            .list_keys(&dir)
            .await?
            .iter()
            .filter_map(|k| Self::relative(&dir, k))
            .filter_map(|n| n.strip_suffix(".json").and_then(|n| VesselId::new(n).ok()))
            .collect();
        out.sort();
        Ok(out)
    }

    async fn save_image(&self, image: &ImageRef, data: BlobReader) -> Result<(), StorageError> {
        self.upload(&self.image_key(image, self.encoding), data).await?;
        let siblings = self.load_order().skip(1).map(|e| self.image_key(image, e)).collect();
        self.delete_all(siblings).await
    }

    async fn load_image(&self, image: &ImageRef) -> Result<BlobReader, StorageError> {
        for enc in self.load_order() {
            if let Some(r) = self.download(&self.image_key(image, enc)).await? {
                return Ok(r);
            }
        }
        Err(StorageError::ImageNotFound(image.clone()))
    }

    async fn list_images(&self) -> Result<Vec<ImageRef>, StorageError> {
        let dir = self.key("images");
        let mut out: Vec<ImageRef> = self
            .list_keys(&dir)
            .await?
            .iter()
            .filter_map(|k| Self::relative(&dir, k))
            .filter(|rel| !rel.ends_with(INDEX_SUFFIX))
            .filter_map(|rel| {
                let stem = BlobEncoding::ALL.iter().find_map(|e| rel.strip_suffix(e.extension()))?;
                ImageRef::new(stem).ok()
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn save_image_index(&self, image: &ImageRef, data: Vec<u8>) -> Result<(), StorageError> {
        let key = self.index_key(image);
        self.store.put(&key, PutPayload::from(data)).await.map_err(remote("put", &key))?;
        Ok(())
    }

    async fn load_image_index(&self, image: &ImageRef) -> Result<Vec<u8>, StorageError> {
        match self.get_small(&self.index_key(image)).await? {
            Some((b, _)) => Ok(b.to_vec()),
            None => Err(StorageError::ImageNotFound(image.clone())),
        }
    }

    async fn delete_image_index(&self, image: &ImageRef) -> Result<(), StorageError> {
        self.delete_all(vec![self.index_key(image)]).await
    }

    async fn abort_stale_uploads(&self, older_than: std::time::Duration) -> Result<u64, StorageError> {
        let mut aborted = 0;
        for journal in self.list_keys(&self.key(UPLOADS)).await? {
            let Some((entry, _)) = self.get_small(&journal).await? else { continue };
            if self.uploads.abort_if_stale(&entry, older_than).await? {
                self.delete_all(vec![journal]).await?;
                aborted += 1;
            }
        }
        Ok(aborted)
    }

    fn set_blob_encoding(&mut self, encoding: BlobEncoding) {
        self.encoding = encoding;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_bucket_and_prefix() {
        let (s, b, p) = split_url("s3://bkt/a/b/").unwrap();
        assert_eq!((s, b, p), ("s3", "s3://bkt", vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(split_url("gs://bkt").unwrap().2, Vec::<String>::new());
        for bad in ["s3:/x", "s3://", "s3:///p", "s3://b/../x", "s3://b/./x", "nothing"] {
            let e = split_url(bad).unwrap_err();
            assert_eq!(e.kind(), crate::StorageErrorKind::InvalidInput, "{bad}: {e}");
        }
    }
}
