//! The runtime layer: a `Runtime` trait that runs one process in a new
//! container on a prepared rootfs, overlay mounting, OCI runtime spec
//! generation, and the youki (in-process `libcontainer`) and containerd
//! backends behind cargo features.
//!
//! Not built yet: this crate is reserved so the workspace's dependency graph
//! is fixed from the start (core <- runtime <- facade).
#![forbid(unsafe_code)]

pub use vessel_core as core;
