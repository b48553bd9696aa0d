//! Vessel and snapshot identifiers.
//!
//! Ids end up in file names and object keys, so they are validated once, at
//! the edge, into types that can only hold 16 lowercase hex digits: no id can
//! ever carry `/`, `..` or anything else that would move a path.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::CoreError;

const ID_LEN: usize = 16;

fn is_valid_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates `s` as an id.
            pub fn new(s: &str) -> Result<Self, CoreError> {
                if is_valid_id(s) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(CoreError::InvalidId { what: $what, value: s.to_owned() })
                }
            }

            /// The id whose 16 hex digits spell `n`; every `u64` is valid.
            pub fn from_u64(n: u64) -> Self {
                Self(format!("{n:016x}"))
            }

            /// The id as its 16 hex digits.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = CoreError;
            fn from_str(s: &str) -> Result<Self, CoreError> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = CoreError;
            fn try_from(s: &str) -> Result<Self, CoreError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// Identifies a vessel (workspace).
    VesselId,
    "vessel"
);
id_type!(
    /// Identifies a snapshot within a vessel's history.
    SnapshotId,
    "snapshot"
);

/// Produces fresh ids for vessels and snapshots.
///
/// Returning a `u64` rather than a string makes an invalid id unrepresentable:
/// every generator, including a caller's own, yields valid ids.
pub trait IdGenerator: Send + Sync + fmt::Debug {
    /// A new id, unique among those this generator hands out.
    fn generate(&self) -> u64;

    /// A new vessel id.
    fn vessel_id(&self) -> VesselId {
        VesselId::from_u64(self.generate())
    }

    /// A new snapshot id.
    fn snapshot_id(&self) -> SnapshotId {
        SnapshotId::from_u64(self.generate())
    }
}

/// Milliseconds of 2020-01-01T00:00:00Z since the Unix epoch (the Go original's epoch).
const ID_EPOCH_MILLIS: u64 = 1_577_836_800_000;
const TIMESTAMP_BITS: u32 = 42;
const TIMESTAMP_MASK: u64 = (1 << TIMESTAMP_BITS) - 1;
const RANDOM_MAX: u64 = (1 << (64 - TIMESTAMP_BITS)) - 1;

/// The Go original's id scheme: milliseconds since 2020-01-01 in the low 42
/// bits, randomness in the high 22, printed as 16 hex digits.
///
/// Pure randomness gives only 22 bits per millisecond, so a burst of ids in one
/// millisecond would collide (about one in eight ids at 1,000/ms). Within a
/// process the generator therefore draws a random start for each new
/// millisecond and counts up from it, moving to the next millisecond if the
/// 22 bits run out: ids of one process are strictly increasing in
/// (time, sequence) and never repeat. Across processes uniqueness stays
/// probabilistic, as in the original.
#[derive(Debug, Clone, Copy, Default)]
pub struct UniqueIdGenerator;

/// The last id handed out in this process; shared by every generator instance
/// so two `UniqueIdGenerator`s cannot hand out the same id either.
static LAST_ID: AtomicU64 = AtomicU64::new(0);

impl UniqueIdGenerator {
    /// A new generator (all instances share one sequence).
    pub fn new() -> Self {
        Self
    }

    /// The millisecond timestamp embedded in an id generated by this scheme.
    pub fn timestamp_of(id: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ID_EPOCH_MILLIS + (id & TIMESTAMP_MASK))
    }

    fn now_millis() -> u64 {
        let since_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        let since_epoch = u64::try_from(since_unix).unwrap_or(u64::MAX).saturating_sub(ID_EPOCH_MILLIS);
        since_epoch & TIMESTAMP_MASK
    }
}

impl IdGenerator for UniqueIdGenerator {
    fn generate(&self) -> u64 {
        let mut last = LAST_ID.load(Ordering::Acquire);
        loop {
            let now = Self::now_millis();
            let (last_ts, last_seq) = (last & TIMESTAMP_MASK, last >> TIMESTAMP_BITS);
            let next = if last == 0 || now > last_ts {
                (rand::random_range(0..=RANDOM_MAX) << TIMESTAMP_BITS) | now
            } else if last_seq < RANDOM_MAX {
                // Same millisecond (or the clock stepped back): keep counting.
                ((last_seq + 1) << TIMESTAMP_BITS) | last_ts
            } else {
                let ts = (last_ts + 1) & TIMESTAMP_MASK;
                (rand::random_range(0..=RANDOM_MAX / 2) << TIMESTAMP_BITS) | ts
            };
            match LAST_ID.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn validates_ids() {
        for ok in ["0123456789abcdef", "0000000000000000", "ffffffffffffffff"] {
            assert_eq!(VesselId::new(ok).unwrap().as_str(), ok);
            assert_eq!(SnapshotId::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "0123456789ABCDEF",
            "0123456789abcde",
            "0123456789abcdef0",
            "../../etc/passwd",
            "0123456789abcde/",
            "0123456789abcdeg",
            "0123456789abcd\u{e9}",
            " 123456789abcdef",
        ] {
            let err = VesselId::new(bad).unwrap_err();
            assert_eq!(err.kind(), crate::CoreErrorKind::InvalidId, "{bad:?}");
            assert!(SnapshotId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_serialize_as_plain_strings_and_validate_on_parse() {
        let id = VesselId::from_u64(0xdead_beef);
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"00000000deadbeef\"");
        let back: VesselId = serde_json::from_str("\"00000000deadbeef\"").unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<VesselId>("\"../x\"").is_err());
    }

    #[test]
    fn generated_ids_embed_the_time() {
        let before = UniqueIdGenerator::now_millis();
        let id = UniqueIdGenerator.generate();
        let after = UniqueIdGenerator::now_millis();
        let ts = id & TIMESTAMP_MASK;
        // A burst in the same millisecond may borrow the next one.
        assert!(ts >= before && ts <= after + 1, "{before} <= {ts} <= {after}");
        let s = UniqueIdGenerator.vessel_id();
        assert!(is_valid_id(s.as_str()));
        let t = UniqueIdGenerator::timestamp_of(id);
        let age = SystemTime::now().duration_since(t).unwrap();
        assert!(age < Duration::from_secs(5), "{age:?}");
    }

    #[test]
    fn no_duplicates_among_a_million_ids_from_eight_threads() {
        let per_thread = 125_000;
        let handles: Vec<_> = (0..8)
            .map(|_| {
                std::thread::spawn(move || {
                    let g = UniqueIdGenerator::new();
                    (0..per_thread).map(|_| g.generate()).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = HashSet::with_capacity(1_000_000);
        for h in handles {
            for id in h.join().unwrap() {
                assert!(seen.insert(id), "duplicate id {id:016x}");
            }
        }
        assert_eq!(seen.len(), 1_000_000);
    }

    #[test]
    fn ids_of_one_thread_increase_in_time_then_sequence() {
        let g = UniqueIdGenerator::new();
        let mut prev = g.generate();
        for _ in 0..10_000 {
            let next = g.generate();
            let key = |v: u64| (v & TIMESTAMP_MASK, v >> TIMESTAMP_BITS);
            assert!(key(next) > key(prev), "{prev:016x} then {next:016x}");
            prev = next;
        }
    }
}
