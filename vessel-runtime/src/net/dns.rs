//! The resolver vessel gives a networked vessel, on the host end of its
//! veth (UDP port 53; the only host port its filter lets it reach).
//!
//! Under `Allow`, it answers only names a domain rule allows, from the
//! upstream resolvers, and admits exactly the addresses it returns (not
//! those of a forbidden class a CIDR rule does not re-allow) into the
//! vessel's resolved sets for their TTL, before the answer leaves: the
//! vessel can connect to what it was told and nothing else. Other names
//! get REFUSED and are counted. Under `Open` it forwards every name.
//! Without IPv6, AAAA records are dropped (the vessel has no IPv6 route).
//! Whatever the vessel sends is parsed as untrusted; a malformed query
//! gets no answer.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, RecordType};
use tokio::net::UdpSocket;
use vessel_core::sync::Locked;
use vessel_core::{AllowRule, NetworkPolicy};

use super::{Slot, nft};
use crate::RuntimeError;

/// How long an upstream has to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Admitted addresses live at least this long (a TTL of 0 would admit an
/// address the vessel could never use) and at most a day.
const MIN_TTL: u32 = 10;
const MAX_TTL: u32 = 86_400;
/// Distinct refused names remembered (the vessel chooses them: bounded).
const MAX_REFUSED: usize = 1024;

/// A name the resolver refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefusedName {
    /// The name, lowercase, without the trailing dot.
    pub name: String,
    /// How many times it was asked.
    pub count: u64,
}

#[derive(Debug, Default)]
struct Stats {
    refused: BTreeMap<String, u64>,
    answered: u64,
}

/// A running resolver; stopped on [`Resolver::stop`] or drop.
#[derive(Debug, Default)]
pub(super) struct Resolver {
    task: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<Mutex<Stats>>,
}

struct Ctx {
    slot: Slot,
    /// A rootless vessel's namespace, where its filter is.
    inside: Option<std::path::PathBuf>,
    upstreams: Vec<SocketAddr>,
    policy: Arc<Mutex<NetworkPolicy>>,
    forbidden: nft::Forbidden,
    stats: Arc<Mutex<Stats>>,
}

impl Resolver {
    /// Listens on `addr`: the slot's host address (already configured), or
    /// with `inside`, an address in that namespace (a socket keeps the
    /// namespace it was made in; upstream queries leave from the host's).
    pub(super) fn start(
        slot: Slot,
        addr: SocketAddr,
        inside: Option<std::path::PathBuf>,
        upstreams: Vec<SocketAddr>,
        policy: Arc<Mutex<NetworkPolicy>>,
        forbidden: nft::Forbidden,
    ) -> Result<Self, RuntimeError> {
        let std_sock = super::in_ns(inside.as_deref(), || std::net::UdpSocket::bind(addr))?
            .map_err(RuntimeError::io("bind the resolver on", addr.to_string()))?;
        std_sock.set_nonblocking(true).map_err(RuntimeError::io("configure", addr.to_string()))?;
        let sock = Arc::new(UdpSocket::from_std(std_sock).map_err(RuntimeError::io("register", addr.to_string()))?);
        let stats = Arc::new(Mutex::new(Stats::default()));
        let ctx = Arc::new(Ctx { slot, inside, upstreams, policy, forbidden, stats: stats.clone() });
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((len, from)) = sock.recv_from(&mut buf).await else {
                    // A transient error (an ICMP error queued on the socket):
                    // never a busy loop if it persists.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let (query, sock, ctx) = (buf[..len].to_vec(), sock.clone(), ctx.clone());
                tokio::spawn(async move {
                    if let Some(reply) = ctx.answer(&query).await {
                        let _ = sock.send_to(&reply, from).await;
                    }
                });
            }
        });
        Ok(Self { task: Some(task), stats })
    }

    pub(super) fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Refused names and answered queries so far.
    pub(super) fn stats(&self) -> (Vec<RefusedName>, u64) {
        let s = self.stats.locked();
        (s.refused.iter().map(|(n, c)| RefusedName { name: n.clone(), count: *c }).collect(), s.answered)
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn reply_code(query: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_queries(query.queries.clone());
    m.to_vec().ok()
}

impl Ctx {
    async fn answer(&self, raw: &[u8]) -> Option<Vec<u8>> {
        let query = Message::from_vec(raw).ok()?;
        if query.metadata.message_type != MessageType::Query {
            return None;
        }
        let [q] = query.queries.as_slice() else { return reply_code(&query, ResponseCode::FormErr) };
        let name = q.name.to_string().trim_end_matches('.').to_ascii_lowercase();
        let policy = self.policy.locked().clone();
        let allowed = match &policy {
            NetworkPolicy::Open(_) => true,
            NetworkPolicy::Allow(rules) => {
                q.query_class == DNSClass::IN
                    && rules.iter().any(|r| matches!(r, AllowRule::Domain(d) if d.matches(&name)))
            }
            _ => false,
        };
        if !allowed {
            let mut s = self.stats.locked();
            if s.refused.len() < MAX_REFUSED || s.refused.contains_key(&name) {
                *s.refused.entry(name).or_default() += 1;
            }
            return reply_code(&query, ResponseCode::Refused);
        }
        let Some(mut response) = self.upstream(raw, query.metadata.id).await else {
            return reply_code(&query, ResponseCode::ServFail);
        };
        let mut admitted = Vec::new();
        let restrict = matches!(policy, NetworkPolicy::Allow(_));
        let rules = policy.rules().to_vec();
        let ipv6 = self.slot.v6.is_some();
        response.answers.retain(|r| {
            let ip = match &r.data {
                RData::AAAA(_) if !ipv6 => return false,
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => return true,
            };
            if !restrict {
                return true;
            }
            let ok = !self.forbidden.contains(ip) || rules.iter().any(|rule| rule.allows_ip(ip, None));
            if ok {
                admitted.push((ip, r.ttl.clamp(MIN_TTL, MAX_TTL)));
            }
            ok
        });
        response.additionals.retain(|r| !matches!(r.record_type(), RecordType::A | RecordType::AAAA));
        if restrict {
            let (n, inside) = (self.slot.n, self.inside.clone());
            let admit = tokio::task::spawn_blocking(move || nft::admit(n, &admitted, inside.as_deref())).await;
            if !matches!(admit, Ok(Ok(()))) {
                tracing::warn!(slot = n, "could not admit resolved addresses");
                return reply_code(&query, ResponseCode::ServFail);
            }
        }
        self.stats.locked().answered += 1;
        response.to_vec().ok()
    }

    /// The first upstream's answer to `raw` (matching its id).
    async fn upstream(&self, raw: &[u8], id: u16) -> Option<Message> {
        for up in &self.upstreams {
            let bind: SocketAddr = if up.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().ok()?;
            let Ok(sock) = UdpSocket::bind(bind).await else { continue };
            if sock.connect(up).await.is_err() || sock.send(raw).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; 4096];
            let Ok(Ok(len)) = tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv(&mut buf)).await else { continue };
            match Message::from_vec(&buf[..len]) {
                Ok(m) if m.metadata.id == id && m.metadata.message_type == MessageType::Response => return Some(m),
                _ => continue,
            }
        }
        None
    }
}
