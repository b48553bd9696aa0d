//! Domain types shared by every vessel crate.
//!
//! This crate sits at the bottom of the dependency graph
//! (core <- storage, snapshot, runtime <- facade), so it holds only what every
//! layer must agree on: validated identifiers, the persisted manifests (whose
//! JSON is wire-compatible with the Go original), and the exec request/result
//! shapes. It performs no I/O.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod error;
mod exec;
mod id;
mod image_ref;
mod limits;
mod manifest;
mod name;
mod network;
pub mod sync;

pub use error::{CoreError, CoreErrorKind};
pub use exec::{ExecOptions, ExecResult};
pub use id::{IdGenerator, SnapshotId, UniqueIdGenerator, VesselId};
pub use image_ref::ImageRef;
pub use limits::Limits;
pub use manifest::{SnapshotManifest, VesselManifest};
pub use name::{MAX_NAME_LEN, VesselName};
pub use network::{AllowRule, DomainPattern, MAX_RULES, NetworkPolicy};
