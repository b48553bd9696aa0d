//! Image references (`[registry[:port]/]path[:tag][@algo:hex]`).
//!
//! Validated against the OCI distribution reference grammar, which also makes
//! them safe to turn into storage paths: no component can be empty, `.` or
//! `..`, and no character outside `[A-Za-z0-9._:@/+-]` can appear.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::CoreError;

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A validated image reference such as `local/busybox:latest`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageRef {
    full: String,
    name_end: usize,
    tag: Option<(usize, usize)>,
    digest_start: Option<usize>,
}

impl ImageRef {
    /// Parses and validates `s`.
    pub fn new(s: &str) -> Result<Self, CoreError> {
        let bad = |reason| CoreError::InvalidImageRef { value: s.to_owned(), reason };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        let (rest, digest_start) = match s.find('@') {
            Some(at) => {
                check_digest(&s[at + 1..]).map_err(bad)?;
                (&s[..at], Some(at + 1))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].find(':') {
            Some(colon) => {
                let colon = last_slash + colon;
                check_tag(&rest[colon + 1..]).map_err(bad)?;
                (&rest[..colon], Some((colon + 1, rest.len())))
            }
            None => (rest, None),
        };
        check_name(name).map_err(bad)?;
        Ok(Self { full: s.to_owned(), name_end: name.len(), tag, digest_start })
    }

    /// The whole reference as given.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The repository name (`local/busybox`).
    pub fn name(&self) -> &str {
        &self.full[..self.name_end]
    }

    /// The tag, if any (`latest`).
    pub fn tag(&self) -> Option<&str> {
        self.tag.map(|(a, b)| &self.full[a..b])
    }

    /// The digest, if any (`sha256:…`).
    pub fn digest(&self) -> Option<&str> {
        self.digest_start.map(|a| &self.full[a..])
    }
}

fn is_alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty repository name");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("repository name longer than 255 characters");
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    let first = parts[0];
    let has_domain = parts.len() > 1
        && (first.contains(['.', ':']) || first == "localhost" || first.bytes().any(|b| b.is_ascii_uppercase()));
    if has_domain {
        check_domain(first)?;
        parts.remove(0);
    }
    parts.into_iter().try_for_each(check_path_component)
}

fn check_domain(domain: &str) -> Result<(), &'static str> {
    let (host, port) = match domain.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (domain, None),
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("registry port must be digits");
    }
    for label in host.split('.') {
        let b = label.as_bytes();
        let ok = !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-');
        if !ok {
            return Err("invalid registry host");
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn check_path_component(c: &str) -> Result<(), &'static str> {
    const ERR: &str = "path components must be lowercase alphanumerics joined by '.', '_', '__' or '-'";
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum_lower(b[0]) || !is_alnum_lower(b[b.len() - 1]) {
        return Err(ERR);
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum_lower(b[i]) {
            i += 1;
            continue;
        }
        let sep_start = i;
        while i < b.len() && !is_alnum_lower(b[i]) {
            i += 1;
        }
        let sep = &c[sep_start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|x| x == b'-');
        if !ok {
            return Err(ERR);
        }
    }
    Ok(())
}

/// `[\w][\w.-]{0,127}`
fn check_tag(tag: &str) -> Result<(), &'static str> {
    const ERR: &str = "tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}";
    let b = tag.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    if b.is_empty() || b.len() > MAX_TAG_LEN || !word(b[0]) {
        return Err(ERR);
    }
    if !b.iter().all(|&c| word(c) || c == b'.' || c == b'-') {
        return Err(ERR);
    }
    Ok(())
}

/// `algorithm ":" [a-fA-F0-9]{32,}` with `algorithm = [a-z0-9]+([+._-][a-z0-9]+)*`.
fn check_digest(d: &str) -> Result<(), &'static str> {
    let Some((algo, hex)) = d.split_once(':') else {
        return Err("digest must be algorithm:hex");
    };
    let algo_ok =
        !algo.is_empty() && algo.split(['+', '.', '_', '-']).all(|p| !p.is_empty() && p.bytes().all(is_alnum_lower));
    if !algo_ok {
        return Err("invalid digest algorithm");
    }
    if hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("digest must have at least 32 hex digits");
    }
    Ok(())
}

impl FromStr for ImageRef {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        Self::new(s)
    }
}

impl TryFrom<&str> for ImageRef {
    type Error = CoreError;
    fn try_from(s: &str) -> Result<Self, CoreError> {
        Self::new(s)
    }
}

impl AsRef<str> for ImageRef {
    fn as_ref(&self) -> &str {
        &self.full
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageRef({})", self.full)
    }
}

impl Serialize for ImageRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> Deserialize<'de> for ImageRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_common_references() {
        let r = ImageRef::new("local/busybox:latest").unwrap();
        assert_eq!((r.name(), r.tag(), r.digest()), ("local/busybox", Some("latest"), None));
        let r = ImageRef::new("localhost:5000/a/b_c__d.e-f:v1.2-rc").unwrap();
        assert_eq!(r.name(), "localhost:5000/a/b_c__d.e-f");
        assert_eq!(r.tag(), Some("v1.2-rc"));
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = ImageRef::new(&format!("docker.io/library/ubuntu:20.04@{d}")).unwrap();
        assert_eq!((r.name(), r.tag(), r.digest()), ("docker.io/library/ubuntu", Some("20.04"), Some(&*d)));
        let r = ImageRef::new("busybox").unwrap();
        assert_eq!((r.name(), r.tag()), ("busybox", None));
        ImageRef::new("Registry.Example.com/x").unwrap();
    }

    #[test]
    fn rejects_traversal_and_junk() {
        for bad in [
            "",
            "..",
            "../etc/passwd",
            "a/../b",
            "a/./b",
            "/abs",
            "a//b",
            "a/",
            "a:",
            "a:.hidden",
            "a:../../x",
            "a@sha256:short",
            "a@:abcdef0123456789abcdef0123456789",
            "a b",
            "a\0b",
            "a\\b",
            "bad_host_/x",
            "a/b:tag/c",
        ] {
            let err = ImageRef::new(bad).unwrap_err();
            assert_eq!(err.kind(), crate::CoreErrorKind::InvalidImageRef, "{bad:?}");
        }
        let long = format!("a/{}", "b".repeat(300));
        assert!(ImageRef::new(&long).is_err());
    }
}
