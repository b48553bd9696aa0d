//! Storage chosen by URL, for the CLI's `--storage` and `VESSEL_STORAGE`.

use std::sync::Arc;

use crate::{CompressedStorage, LocalStorage, Storage, StorageError};

/// Opens the storage `url` names, zstd-compressed: `file:///path` or an
/// absolute path is a [`LocalStorage`] (one machine; leases between its
/// processes); `s3://bucket/prefix`, `gs://…`, `az://…` and `memory://` an
/// `ObjectStorage` (feature `object-store` and the store's own feature).
/// Every error, a bad URL, a missing bucket, refused credentials, comes
/// before anything is written.
pub async fn open_url(url: &str) -> Result<Arc<dyn Storage>, StorageError> {
    let invalid = |reason: &str| StorageError::InvalidUrl { url: url.to_owned(), reason: reason.to_owned() };
    let path = match url.split_once("://") {
        None if url.starts_with('/') => Some(url),
        None => return Err(invalid("expected an absolute path or scheme://…")),
        Some(("file", rest)) if rest.starts_with('/') => Some(rest),
        Some(("file", _)) => return Err(invalid("a file:// URL needs an absolute path (file:///…)")),
        Some(_) => None,
    };
    if let Some(path) = path {
        let local = LocalStorage::new(path)?;
        return Ok(Arc::new(CompressedStorage::new(local)));
    }
    object(url).await
}

#[cfg(feature = "object-store")]
async fn object(url: &str) -> Result<Arc<dyn Storage>, StorageError> {
    Ok(Arc::new(CompressedStorage::new(crate::ObjectStorage::connect(url).await?)))
}

#[cfg(not(feature = "object-store"))]
async fn object(url: &str) -> Result<Arc<dyn Storage>, StorageError> {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    Err(StorageError::NotCompiled { scheme: scheme.into(), feature: "object-store" })
}
