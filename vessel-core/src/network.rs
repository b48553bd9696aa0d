//! A vessel's network policy: what its commands may reach.
//!
//! The policy is data (pinned in the manifest like limits, so it holds on
//! any host); the runtime enforces it. Its text form is what the CLI takes
//! and what the manifest label stores: `none`, `open`, `open,10.0.0.0/8`,
//! `allow,github.com,*.pypi.org,10.1.2.0/24:443`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;

use crate::CoreError;

/// The most rules one policy may hold: an allow-list is for a handful of
/// services, and every rule is a line of the vessel's packet filter.
pub const MAX_RULES: usize = 256;

/// What a vessel's commands may reach over the network. Inbound, nothing
/// reaches a vessel but its published ports, whatever the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NetworkPolicy {
    /// Loopback only (the default).
    #[default]
    None,
    /// Egress only to what the rules list. Domain rules work through the
    /// resolver vessel gives the vessel: it answers only allowed names and
    /// admits exactly the addresses it returned, for their TTL.
    Allow(Vec<AllowRule>),
    /// Public egress. Never the host itself, link-local (cloud metadata),
    /// private (RFC 1918, CGNAT, ULA), multicast or other vessels, unless a
    /// CIDR rule here re-allows a range.
    Open(Vec<AllowRule>),
}

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AllowRule {
    /// Addresses in `net`, on `port` (TCP and UDP) or on any port.
    Cidr {
        /// The addresses (a bare address is a /32 or /128).
        net: IpNet,
        /// The one port allowed, or every port.
        port: Option<u16>,
    },
    /// A host name, exact or `*.suffix`, on any port.
    Domain(DomainPattern),
}

/// A host name an [`AllowRule::Domain`] matches: `example.com` matches that
/// name alone; `*.example.com` matches every name under it, not itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainPattern {
    wildcard: bool,
    /// Lowercase, without the trailing dot.
    name: String,
}

fn invalid(value: &str, reason: &'static str) -> CoreError {
    CoreError::InvalidNetwork { value: value.to_owned(), reason }
}

impl DomainPattern {
    /// Whether `name` (as a DNS query asks it; case and a trailing dot do
    /// not matter) is one this pattern allows.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if self.wildcard {
            name.strip_suffix(self.name.as_str()).is_some_and(|head| head.len() > 1 && head.ends_with('.'))
        } else {
            name == self.name
        }
    }
}

impl FromStr for DomainPattern {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, CoreError> {
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let name = rest.strip_suffix('.').unwrap_or(rest).to_ascii_lowercase();
        if name.is_empty() || name.len() > 253 {
            return Err(invalid(s, "a domain name has 1 to 253 characters"));
        }
        for label in name.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(invalid(
                    s,
                    "a domain is dot-separated labels of letters, digits, '-' and '_', 1 to 63 each, optionally after '*.'",
                ));
            }
        }
        if !name.contains('.') && wildcard {
            return Err(invalid(s, "a wildcard needs a suffix of two labels or more (*.example.com)"));
        }
        Ok(Self { wildcard, name })
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

impl AllowRule {
    /// Whether the rule allows `ip` on `port` (`None`: on some port).
    pub fn allows_ip(&self, ip: IpAddr, port: Option<u16>) -> bool {
        match self {
            Self::Cidr { net, port: p } => net.contains(&ip) && (p.is_none() || port.is_none() || *p == port),
            Self::Domain(_) => false,
        }
    }
}

impl FromStr for AllowRule {
    type Err = CoreError;

    /// `CIDR`, `CIDR:PORT`, `IP`, `IP:PORT`, `[IPv6]:PORT`, or a domain
    /// pattern (`example.com`, `*.example.com`).
    fn from_str(s: &str) -> Result<Self, CoreError> {
        let cidr = |text: &str| -> Option<IpNet> {
            text.parse::<IpNet>().ok().or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from)).map(|n| n.trunc())
        };
        if let Some(net) = cidr(s) {
            return Ok(Self::Cidr { net, port: None });
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return port(s, sa.port()).map(|p| Self::Cidr { net: IpNet::from(sa.ip()), port: Some(p) });
        }
        if let Some((head, tail)) = s.rsplit_once(':') {
            let head = head.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(head);
            if let Some(net) = cidr(head) {
                let p = tail.parse::<u16>().map_err(|_| invalid(s, "a port is a number from 1 to 65535"))?;
                return port(s, p).map(|p| Self::Cidr { net, port: Some(p) });
            }
            if head.parse::<DomainPattern>().is_ok() {
                return Err(invalid(s, "a domain rule allows every port; only address rules take one"));
            }
        }
        s.parse().map(Self::Domain)
    }
}

fn port(s: &str, p: u16) -> Result<u16, CoreError> {
    if p == 0 { Err(invalid(s, "a port is a number from 1 to 65535")) } else { Ok(p) }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cidr { net, port: None } => write!(f, "{net}"),
            Self::Cidr { net: IpNet::V6(n), port: Some(p) } => write!(f, "[{n}]:{p}"),
            Self::Cidr { net, port: Some(p) } => write!(f, "{net}:{p}"),
            Self::Domain(d) => d.fmt(f),
        }
    }
}

impl NetworkPolicy {
    /// Whether the vessel has any network beyond loopback.
    pub fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }

    /// The policy's rules (empty for `None`).
    pub fn rules(&self) -> &[AllowRule] {
        match self {
            Self::None => &[],
            Self::Allow(r) | Self::Open(r) => r,
        }
    }

    /// The policy's mode: `none`, `allow` or `open`.
    pub fn mode(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Allow(_) => "allow",
            Self::Open(_) => "open",
        }
    }

    /// A policy from a mode (`none`, `allow`, `open`) and rules, validated.
    pub fn from_parts(mode: &str, rules: Vec<AllowRule>) -> Result<Self, CoreError> {
        let policy = match mode {
            "none" if !rules.is_empty() => return Err(invalid(mode, "'none' takes no rules")),
            "none" => Self::None,
            "allow" => Self::Allow(rules),
            "open" => Self::Open(rules),
            _ => return Err(invalid(mode, "the network mode is none, allow or open")),
        };
        policy.validate()?;
        Ok(policy)
    }

    /// Refuses rules on `None`, domain rules on `Open` (it resolves every
    /// name; a rule there re-allows an address range), and more than
    /// [`MAX_RULES`].
    pub fn validate(&self) -> Result<(), CoreError> {
        let text = || self.to_string();
        match self {
            Self::None if !self.rules().is_empty() => {
                return Err(invalid(&text(), "'none' takes no rules"));
            }
            Self::Open(rules) if rules.iter().any(|r| matches!(r, AllowRule::Domain(_))) => {
                return Err(invalid(&text(), "'open' resolves every name: its rules re-allow address ranges only"));
            }
            _ => {}
        }
        if self.rules().len() > MAX_RULES {
            return Err(invalid(&text(), "more than 256 rules"));
        }
        Ok(())
    }
}

impl fmt::Display for NetworkPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mode())?;
        for r in self.rules() {
            write!(f, ",{r}")?;
        }
        Ok(())
    }
}

impl FromStr for NetworkPolicy {
    type Err = CoreError;

    /// The text form: the mode, then comma-separated rules.
    fn from_str(s: &str) -> Result<Self, CoreError> {
        let mut parts = s.split(',').map(str::trim);
        let mode = parts.next().unwrap_or_default();
        let rules = parts.filter(|p| !p.is_empty()).map(str::parse).collect::<Result<Vec<AllowRule>, _>>()?;
        Self::from_parts(mode, rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_print_back() {
        for (text, shown) in [
            ("10.1.2.0/24:443", "10.1.2.0/24:443"),
            ("10.1.2.7/24", "10.1.2.0/24"),
            ("192.0.2.1", "192.0.2.1/32"),
            ("192.0.2.1:8080", "192.0.2.1/32:8080"),
            ("[2001:db8::1]:443", "[2001:db8::1/128]:443"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("[2001:db8::/32]:53", "[2001:db8::/32]:53"),
            ("GitHub.com.", "github.com"),
            ("*.pypi.org", "*.pypi.org"),
        ] {
            let rule: AllowRule = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(rule.to_string(), shown, "{text}");
            assert_eq!(shown.parse::<AllowRule>().unwrap(), rule, "{shown} round trip");
        }
    }

    #[test]
    fn bad_rules_are_refused_with_their_reason() {
        for text in [
            "",
            "*.com",
            "-bad.example",
            "a..b",
            "exa mple.com",
            "example.com:443",
            "10.0.0.0/24:0",
            "10.0.0.0/24:70000",
            "10.0.0.0/33",
            "*",
            "*.*.example.com",
            &"a".repeat(64),
            &format!("{}.com", "a.".repeat(130)),
        ] {
            let err = text.parse::<AllowRule>().unwrap_err();
            assert_eq!(err.kind(), crate::CoreErrorKind::InvalidNetwork, "{text:?}: {err}");
        }
    }

    #[test]
    fn wildcards_match_names_under_their_suffix_only() {
        let p: DomainPattern = "*.allowed.test".parse().unwrap();
        assert!(p.matches("a.allowed.test"));
        assert!(p.matches("A.b.Allowed.Test."));
        assert!(!p.matches("allowed.test"));
        assert!(!p.matches("allowed.test.evil.test"));
        assert!(!p.matches("notallowed.test"));
        assert!(!p.matches(".allowed.test"));
        let exact: DomainPattern = "pypi.test".parse().unwrap();
        assert!(exact.matches("PYPI.test."));
        assert!(!exact.matches("x.pypi.test"));
    }

    #[test]
    fn policies_round_trip_through_their_text() {
        for text in ["none", "open", "open,10.0.0.0/8", "allow", "allow,github.com,*.pypi.org,10.1.2.0/24:443"] {
            let p: NetworkPolicy = text.parse().unwrap();
            assert_eq!(p.to_string(), text);
        }
        assert_eq!("allow, a.test ,".parse::<NetworkPolicy>().unwrap().to_string(), "allow,a.test");
        for bad in ["", "closed", "none,10.0.0.0/8", "open,github.com", "allow,bad name"] {
            assert_eq!(bad.parse::<NetworkPolicy>().unwrap_err().kind(), crate::CoreErrorKind::InvalidNetwork, "{bad}");
        }
        let many = format!("allow{}", ",10.0.0.1".repeat(MAX_RULES + 1));
        assert!(many.parse::<NetworkPolicy>().is_err());
    }

    #[test]
    fn cidr_rules_match_addresses_and_ports() {
        let r: AllowRule = "10.1.2.0/24:443".parse().unwrap();
        assert!(r.allows_ip("10.1.2.9".parse().unwrap(), Some(443)));
        assert!(!r.allows_ip("10.1.2.9".parse().unwrap(), Some(80)));
        assert!(r.allows_ip("10.1.2.9".parse().unwrap(), None));
        assert!(!r.allows_ip("10.1.3.9".parse().unwrap(), Some(443)));
    }
}
