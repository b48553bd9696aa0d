//! The core's error: a domain value (id, image reference, limit) that does
//! not validate. It carries the rejected input, for the caller's message.

use std::fmt;

/// Errors raised while validating domain values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// An id was not 16 lowercase hex digits.
    #[error("invalid {what} id {value:?}: expected 16 lowercase hex digits")]
    InvalidId {
        /// Which kind of id (`vessel`, `snapshot`).
        what: &'static str,
        /// The rejected input, for the caller's message.
        value: String,
    },
    /// A vessel name broke the name grammar ([`crate::VesselName`]).
    #[error("invalid vessel name {value:?}: {reason}")]
    InvalidName {
        /// The rejected input.
        value: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// An image reference did not follow the OCI distribution grammar.
    #[error("invalid image reference {value:?}: {reason}")]
    InvalidImageRef {
        /// The rejected input.
        value: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// A resource limit was zero, negative or absurd.
    #[error("invalid {what} limit {value}: expected {min} to {max}")]
    InvalidLimit {
        /// Which limit (`memory`, `cpu quota`, `pids`).
        what: &'static str,
        /// The rejected value.
        value: i64,
        /// The smallest value allowed.
        min: i64,
        /// The largest value allowed.
        max: i64,
    },
    /// An exec asked for more than its vessel's limit.
    #[error("{what} limit {value} is above the vessel's {vessel}: an exec can only narrow it")]
    LimitAboveVessel {
        /// Which limit.
        what: &'static str,
        /// What the exec asked for.
        value: i64,
        /// The vessel's limit.
        vessel: i64,
    },
    /// A network policy or one of its rules did not parse or validate.
    #[error("invalid network policy {value:?}: {reason}")]
    InvalidNetwork {
        /// The rejected input.
        value: String,
        /// Which rule it broke.
        reason: &'static str,
    },
}

/// Coarse classification of [`CoreError`], for matching without caring about context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoreErrorKind {
    /// A vessel or snapshot id was malformed.
    InvalidId,
    /// A vessel name was malformed.
    InvalidName,
    /// An image reference was malformed.
    InvalidImageRef,
    /// A resource limit was out of range or above the vessel's.
    InvalidLimit,
    /// A network policy was malformed.
    InvalidNetwork,
}

impl CoreError {
    /// The error's kind.
    pub fn kind(&self) -> CoreErrorKind {
        match self {
            Self::InvalidId { .. } => CoreErrorKind::InvalidId,
            Self::InvalidName { .. } => CoreErrorKind::InvalidName,
            Self::InvalidImageRef { .. } => CoreErrorKind::InvalidImageRef,
            Self::InvalidLimit { .. } | Self::LimitAboveVessel { .. } => CoreErrorKind::InvalidLimit,
            Self::InvalidNetwork { .. } => CoreErrorKind::InvalidNetwork,
        }
    }
}

impl fmt::Display for CoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidId => "invalid id",
            Self::InvalidName => "invalid name",
            Self::InvalidImageRef => "invalid image reference",
            Self::InvalidLimit => "invalid limit",
            Self::InvalidNetwork => "invalid network policy",
        })
    }
}
