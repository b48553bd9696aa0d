//! The snapshot engine: turns an overlayfs upper dir into an OCI layer tar
//! diff (whiteouts, opaque dirs, xattrs, hardlinks) with its checksum, applies
//! layer tars safely, caches unpacked layers, and reads OCI image archives.
//!
//! Not built yet: this crate is reserved so the workspace's dependency graph
//! is fixed from the start (core <- snapshot <- facade).
#![forbid(unsafe_code)]

pub use vessel_core as core;
