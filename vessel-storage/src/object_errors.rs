//! How an object store's errors map to [`StorageError`]: not-found as the
//! caller means it, conflicts of conditional writes, refused credentials
//! (by status or by the service's own error code), the rest as remote.

use object_store::path::Path;

use crate::StorageError;

/// Maps an object store's error on `key` to ours; `absent` is what a
/// not-found means here.
pub(crate) fn map_err(
    op: &'static str,
    key: &Path,
    absent: impl FnOnce() -> StorageError,
) -> impl FnOnce(object_store::Error) -> StorageError {
    let key = key.to_string();
    move |e| match e {
        e if service_code(&e).is_some_and(|c| DENIED.contains(&c.as_str())) => {
            StorageError::Denied { op, key, source: Box::new(e) }
        }
        object_store::Error::NotFound { .. } => absent(),
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            StorageError::Conflict { what: key }
        }
        e @ (object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }) => {
            StorageError::Denied { op, key, source: Box::new(e) }
        }
        e => StorageError::Remote { op, key, source: Box::new(e) },
    }
}

/// The service's error codes that mean "these credentials are refused"
/// (S3's, and Azure's), whatever HTTP status the store sent them with.
const DENIED: [&str; 6] = [
    "AccessDenied",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "AuthenticationFailed",
    "AuthorizationFailure",
];

/// The error code in the service's XML error body (`<Code>…</Code>`), which
/// `object_store` keeps only inside its message (its status type is private).
pub(crate) fn service_code(e: &object_store::Error) -> Option<String> {
    let text = format!("{e:?}");
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    Some(text[start..start + len].to_owned())
}

pub(crate) fn remote(op: &'static str, key: &Path) -> impl FnOnce(object_store::Error) -> StorageError {
    let k = key.clone();
    map_err(op, key, move || StorageError::Remote { op, key: k.to_string(), source: "not found".into() })
}
