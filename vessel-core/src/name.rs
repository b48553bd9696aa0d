//! Vessel names: what people type instead of an id (`vessel create --name`).
//!
//! A name is stored in an object key (`names/<name>.json`) and in the
//! manifest's labels, so it is validated once into [`VesselName`], as ids
//! are: docker's container-name grammar, at most 64 characters, never a
//! string that is also a valid id (so "name or id" is never ambiguous).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{CoreError, VesselId};

/// The longest name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// A validated vessel name: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, 1 to
/// [`MAX_NAME_LEN`] characters, not shaped like a vessel id.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VesselName(String);

impl VesselName {
    /// Validates `s` as a name.
    pub fn new(s: &str) -> Result<Self, CoreError> {
        let invalid = |reason| Err(CoreError::InvalidName { value: s.to_owned(), reason });
        let mut bytes = s.bytes();
        match bytes.next() {
            None => return invalid("it is empty"),
            Some(b) if !b.is_ascii_alphanumeric() => return invalid("it must start with a letter or digit"),
            Some(_) => {}
        }
        if s.len() > MAX_NAME_LEN {
            return invalid("it is longer than 64 characters");
        }
        if !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
            return invalid("only letters, digits, '_', '.' and '-' are allowed");
        }
        if VesselId::new(s).is_ok() {
            return invalid("it has the shape of a vessel id (16 hex digits)");
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VesselName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VesselName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VesselName({})", self.0)
    }
}

impl TryFrom<String> for VesselName {
    type Error = CoreError;
    fn try_from(s: String) -> Result<Self, CoreError> {
        Self::new(&s)
    }
}

impl From<VesselName> for String {
    fn from(n: VesselName) -> String {
        n.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_grammar_and_never_an_id() {
        for ok in ["web", "a", "my-app_2.test", "0abc", "X", &"n".repeat(64), "deadbeefdeadbee", "DEADBEEFDEADBEEF"] {
            assert_eq!(VesselName::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "-x",
            ".x",
            "_x",
            "a/b",
            "../x",
            "a b",
            "é",
            "a\0",
            &"n".repeat(65),
            "deadbeefdeadbeef",
            "0123456789abcdef",
        ] {
            let e = VesselName::new(bad).unwrap_err();
            assert_eq!(e.kind(), crate::CoreErrorKind::InvalidName, "{bad:?}");
        }
    }

    #[test]
    fn json_is_a_plain_string_and_validates() {
        let n = VesselName::new("web").unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"web\"");
        assert!(serde_json::from_str::<VesselName>("\"a/b\"").is_err());
    }
}
