//! Stand-ins for the backends whose cargo feature is off: the same names
//! and constructors, every call a typed `Unavailable` error naming the
//! feature (see [`crate::backend`]).

#[cfg(not(feature = "containerd"))]
pub(crate) mod containerd;
#[cfg(not(feature = "youki"))]
pub(crate) mod youki;
