//! How vessels' networks are set up on a host: [`NetConfig`].

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::RuntimeError;

/// How many slots a pool may have at most (interface names stay short).
pub(super) const MAX_SLOTS: u32 = 1 << 15;

/// How vessels' networks are set up on this host.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Vessels' addresses: each takes a /31 of it (host end, vessel end).
    /// Never reachable from another vessel.
    pub pool: Ipv4Net,
    /// Where the vessels' resolver sends the names it allows (default: the
    /// host's `/etc/resolv.conf` nameservers).
    pub upstream_dns: Vec<SocketAddr>,
    /// The host address published ports listen on (default loopback).
    pub publish_host: IpAddr,
    /// IPv6 for vessels, off (`None`) by default as docker's is: turning it
    /// on forwards IPv6 host-wide, and a forwarding host ignores router
    /// advertisements on interfaces with `accept_ra=1` (set it to 2 where
    /// the host is configured by them). Rootful vessels take a /127 of the
    /// pool (host end, vessel end) behind NAT66; rootless ones get pasta's
    /// copy of the host's address, as for IPv4. Open and Allow policies
    /// then hold for IPv6 too (forbidden: ULA, link-local, multicast, the
    /// host's addresses, other vessels, and IPv4-embedding prefixes of the
    /// forbidden IPv4 classes); [`NetConfig::DEFAULT_IPV6_POOL`] is a ULA
    /// /64 for it.
    pub ipv6_pool: Option<Ipv6Net>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            pool: Ipv4Net::new(Ipv4Addr::new(10, 213, 0, 0), 16).expect("a valid prefix"),
            upstream_dns: Vec::new(),
            publish_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            ipv6_pool: None,
        }
    }
}

impl NetConfig {
    /// A ULA /64 for [`NetConfig::ipv6_pool`] (`fd76:6573:7365:6c00::/64`).
    pub const DEFAULT_IPV6_POOL: Ipv6Net =
        match Ipv6Net::new(Ipv6Addr::new(0xfd76, 0x6573, 0x7365, 0x6c00, 0, 0, 0, 0), 64) {
            Ok(n) => n,
            Err(_) => panic!("a valid prefix"),
        };

    /// This configuration with IPv6 on, from [`NetConfig::DEFAULT_IPV6_POOL`].
    pub fn with_ipv6(mut self) -> Self {
        self.ipv6_pool = Some(Self::DEFAULT_IPV6_POOL);
        self
    }

    /// How many vessels its pools can address (each takes two addresses of
    /// each), or why none.
    pub(super) fn slots(&self) -> Result<u32, RuntimeError> {
        let v4 = (self.pool.hosts().count() as u64 / 2).min(u64::from(MAX_SLOTS)) as u32;
        if self.pool.prefix_len() > 30 || v4 == 0 {
            return Err(RuntimeError::InvalidRequest(format!("network pool {} is too small", self.pool)));
        }
        let Some(pool6) = self.ipv6_pool else { return Ok(v4) };
        if pool6.prefix_len() > 126 {
            return Err(RuntimeError::InvalidRequest(format!("IPv6 pool {pool6} is too small")));
        }
        let v6 = 1u128.checked_shl(u32::from(127 - pool6.prefix_len())).unwrap_or(u128::MAX);
        Ok(v4.min(u32::try_from(v6).unwrap_or(u32::MAX)))
    }

    /// The resolvers names go to: the configured ones, else the host's.
    pub(super) fn upstreams(&self) -> Vec<SocketAddr> {
        if !self.upstream_dns.is_empty() {
            return self.upstream_dns.clone();
        }
        fs::read_to_string("/etc/resolv.conf")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .collect()
    }
}
