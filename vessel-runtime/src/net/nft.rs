//! The vessels' packet filter: table `inet vessel` in the host's namespace.
//!
//! Base chains (made once per host, under a lock) dispatch on the incoming
//! interface through two verdict maps to each vessel's own chains:
//! `e<n>` for what it sends through the host (forward), `i<n>` for what it
//! sends to the host itself (input); a `vsl*` interface with no chain (one
//! being made or removed) is dropped. Inbound connections to any vessel are
//! dropped in the base forward chain; replies pass by conntrack. Every
//! change is one nftables script (run by libnftables in process), which
//! the kernel applies as a single transaction: a policy change is never
//! seen half-made.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nix::fcntl::{Flock, FlockArg};
use vessel_core::{AllowRule, NetworkPolicy};

use super::{NetConfig, Slot, in_ns, libnft, run_dir};
use crate::RuntimeError;

const TABLE: &str = "inet vessel";

/// Address classes a vessel never reaches unless a CIDR rule re-allows
/// them: "this" network, RFC 1918, CGNAT, loopback, link-local (cloud
/// metadata included), IETF protocol assignments, multicast, reserved and
/// broadcast.
const FORBIDDEN: [&str; 10] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The IPv6 classes a vessel never reaches unless a CIDR rule re-allows
/// them: unspecified and loopback, IPv4-mapped, discard-only, local-use
/// NAT64, unique local (ULA), link-local, site-local and multicast.
const FORBIDDEN6: [&str; 8] =
    ["::/127", "::ffff:0:0/96", "64:ff9b:1::/48", "100::/64", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8"];

/// Prefixes that carry an IPv4 address in their next 32 bits (NAT64's
/// well-known prefix, 6to4): the forbidden IPv4 classes are forbidden
/// inside them too, so a translator or relay cannot be used to reach them.
const EMBEDDING: [(&str, u8); 2] = [("64:ff9b::", 96), ("2002::", 16)];

/// Whether nftables can be driven here (its library, which the `nft` tool
/// is built on, loads).
pub(super) fn available() -> bool {
    libnft::available()
}

fn nft_error(what: &'static str, detail: String) -> RuntimeError {
    RuntimeError::Call { backend: "nftables", op: what, source: detail.into() }
}

/// Runs `script` as one transaction in `netns` (a rootless vessel's own
/// namespace, whose filter is there) or the host's.
fn run_in(netns: Option<&Path>, what: &'static str, script: &str) -> Result<(), RuntimeError> {
    if let Some(p) = netns
        && !p.exists()
    {
        return Err(nft_error(what, format!("{} is gone", p.display())));
    }
    in_ns(netns, || run(what, script))?
}

/// Runs `script` as one transaction.
fn run(what: &'static str, script: &str) -> Result<(), RuntimeError> {
    libnft::run(script, false).map(drop).map_err(|e| nft_error(what, e))
}

/// [`json`] in `netns` or here.
fn json_in(netns: Option<&Path>, command: &str) -> Option<serde_json::Value> {
    in_ns(netns, || json(command)).ok().flatten()
}

/// `command`'s output as JSON (`nft -j`), if it succeeds.
fn json(command: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&libnft::run(command, true).ok()?).ok()
}

/// Makes the table and its base chains unless they exist (once per host;
/// a lock keeps two first vessels from both making them).
fn ensure_base() -> Result<(), RuntimeError> {
    // Once per process: nothing removes the table.
    static MADE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if MADE.load(std::sync::atomic::Ordering::Acquire) {
        return Ok(());
    }
    let lock_path = run_dir().join("nft.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(RuntimeError::io("open", &lock_path))?;
    let _lock =
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| RuntimeError::io("lock", &lock_path)(e.into()))?;
    if json("list table inet vessel").is_none() {
        create_base()?;
    }
    MADE.store(true, std::sync::atomic::Ordering::Release);
    Ok(())
}

fn create_base() -> Result<(), RuntimeError> {
    run(
        "create the vessel table",
        r#"table inet vessel {
    map egress { type ifname : verdict; }
    map ingress { type ifname : verdict; }
    chain forward {
        type filter hook forward priority -10; policy accept;
        iifname vmap @egress
        iifname "vsl*" drop
        oifname "vsl*" ct state established,related accept
        oifname "vsl*" drop
    }
    chain input {
        type filter hook input priority -10; policy accept;
        iifname vmap @ingress
        iifname "vsl*" drop
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        iifname "vsl*" oifname != "vsl*" masquerade
    }
}
"#,
    )
}

/// What a vessel never reaches by default, merged (an nftables interval
/// set refuses overlaps): the classes above, the vessels' pools, and every
/// address of the host.
#[derive(Debug, Clone, Default)]
pub(super) struct Forbidden {
    pub(super) v4: Vec<Ipv4Net>,
    pub(super) v6: Vec<Ipv6Net>,
}

impl Forbidden {
    pub(super) fn of(config: &NetConfig) -> Self {
        let mut v4: Vec<Ipv4Net> = FORBIDDEN.iter().filter_map(|n| n.parse().ok()).collect();
        v4.push(config.pool);
        let mut v6: Vec<Ipv6Net> = FORBIDDEN6.iter().filter_map(|n| n.parse().ok()).collect();
        v6.extend(config.ipv6_pool);
        if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
            for a in addrs {
                let Some(s) = a.address.as_ref() else { continue };
                if let Some(s) = s.as_sockaddr_in() {
                    v4.push(Ipv4Net::from(s.ip()));
                } else if let Some(s) = s.as_sockaddr_in6() {
                    v6.push(Ipv6Net::from(s.ip()));
                }
            }
        }
        let v4 = Ipv4Net::aggregate(&v4);
        for (prefix, at) in EMBEDDING {
            let base = u128::from(prefix.parse::<Ipv6Addr>().expect("a valid prefix"));
            for net in &v4 {
                let shift = 128 - u32::from(at) - 32;
                let addr = Ipv6Addr::from(base | u128::from(u32::from(net.network())) << shift);
                v6.extend(Ipv6Net::new(addr, at + net.prefix_len()));
            }
        }
        Self { v4, v6: Ipv6Net::aggregate(&v6) }
    }

    pub(super) fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => self.v4.iter().any(|n| n.contains(&ip)),
            IpAddr::V6(ip) => self.v6.iter().any(|n| n.contains(&ip)),
        }
    }
}

fn set_of<T: ToString>(nets: &[T]) -> String {
    let items: Vec<String> = nets.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

/// The rules of `e<n>` under `policy`; `inside` a rootless vessel's
/// namespace (its output hook) rather than on the host's forward hook.
fn egress_rules(slot: Slot, forbidden: &Forbidden, policy: &NetworkPolicy, inside: bool) -> String {
    let n = slot.n;
    let ipv6 = slot.v6.is_some();
    let deny = format!("add @x{n} {{ ip daddr }} counter name \"d{n}\" drop");
    let deny6 = format!("add @y{n} {{ ip6 daddr }} counter name \"d{n}\" drop");
    let mut s = String::new();
    let chain = format!("add rule {TABLE} e{n}");
    let mut line = |rule: &str| writeln!(s, "{chain} {rule}").expect("writing to a String");
    match slot.v6 {
        None => line(&format!("meta nfproto ipv6 counter name \"d{n}\" drop")),
        // Inside, its own neighbour discovery with pasta's end of the link.
        Some(_) if inside => line(ND_ACCEPT),
        // On the host, a packet from the veth must carry the vessel's address.
        Some((_, vessel6)) => line(&format!("ip6 saddr != {vessel6} counter name \"d{n}\" drop")),
    }
    if !inside {
        line(&format!("ip saddr != {} counter name \"d{n}\" drop", slot.vessel));
    }
    line("ct state established,related accept");
    for rule in policy.rules() {
        let AllowRule::Cidr { net, port } = rule else { continue };
        let daddr = match net {
            IpNet::V4(net) => format!("ip daddr {net}"),
            IpNet::V6(net) if ipv6 => format!("ip6 daddr {net}"),
            // IPv6 rules are kept in the policy but IPv6 is off.
            IpNet::V6(_) => continue,
        };
        match port {
            Some(p) => line(&format!("{daddr} meta l4proto {{ tcp, udp }} th dport {p} accept")),
            None => line(&format!("{daddr} accept")),
        }
    }
    if !policy.is_none() {
        line(&format!("ip daddr {} {deny}", set_of(&forbidden.v4)));
        if ipv6 {
            line(&format!("ip6 daddr {} {deny6}", set_of(&forbidden.v6)));
        }
    }
    match policy {
        NetworkPolicy::Open(_) => line("accept"),
        NetworkPolicy::Allow(_) => {
            line(&format!("ip daddr @n{n} accept"));
            if ipv6 {
                line(&format!("ip6 daddr @m{n} accept"));
            }
        }
        _ => {}
    }
    line(&deny);
    if ipv6 {
        line(&deny6);
    }
    line(&format!("counter name \"d{n}\" drop"));
    s
}

/// Neighbour discovery on the vessel's own link (hop limit 255: never
/// forwarded), which IPv6 needs to reach its gateway.
const ND_ACCEPT: &str = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept";

/// The rules of `i<n>`: only the vessel's resolver on the host (and, with
/// IPv6, neighbour discovery).
fn ingress_rules(slot: Slot) -> String {
    let n = slot.n;
    let chain = format!("add rule {TABLE} i{n}");
    let nd = if slot.v6.is_some() { format!("{chain} {ND_ACCEPT}\n") } else { String::new() };
    format!(
        "{nd}{chain} meta nfproto ipv6 counter name \"d{n}\" drop\n\
         {chain} ip saddr != {v} counter name \"d{n}\" drop\n\
         {chain} ct state established,related accept\n\
         {chain} ip daddr {h} udp dport 53 accept\n\
         {chain} add @x{n} {{ ip daddr }} counter name \"d{n}\" drop\n",
        v = slot.vessel,
        h = slot.host,
    )
}

/// The per-vessel counter and sets: `n`/`m` the addresses the resolver
/// admitted (IPv4/IPv6), `x`/`y` the destinations denied lately.
fn declarations(n: u32) -> String {
    format!(
        "counter d{n} {{ }}\n\
         set n{n} {{ type ipv4_addr; flags timeout; }}\n\
         set m{n} {{ type ipv6_addr; flags timeout; }}\n\
         set x{n} {{ type ipv4_addr; size 64; flags dynamic,timeout; timeout 1h; }}\n\
         set y{n} {{ type ipv6_addr; size 64; flags dynamic,timeout; timeout 1h; }}\n"
    )
}

/// Adds slot `n`'s chains, sets and counter with `policy`, and hooks them
/// to its veth, in one transaction.
pub(super) fn create(slot: Slot, forbidden: &Forbidden, policy: &NetworkPolicy) -> Result<(), RuntimeError> {
    ensure_base()?;
    let n = slot.n;
    let mut s = format!("table {TABLE} {{\n{}chain e{n} {{ }}\nchain i{n} {{ }}\n}}\n", declarations(n));
    s.push_str(&egress_rules(slot, forbidden, policy, false));
    s.push_str(&ingress_rules(slot));
    let veth = Slot::veth(n);
    let _ = writeln!(s, "add element {TABLE} egress {{ \"{veth}\" : jump e{n} }}");
    let _ = writeln!(s, "add element {TABLE} ingress {{ \"{veth}\" : jump i{n} }}");
    run("add a vessel's rules", &s)
}

/// A rootless vessel's filter, in its own namespace (`netns`), where its
/// container root holds no capability: the same per-vessel chain and sets,
/// hooked on output (what its processes send) and input (nothing new comes
/// in but on loopback).
pub(super) fn create_inside(
    netns: &Path,
    slot: Slot,
    forbidden: &Forbidden,
    policy: &NetworkPolicy,
) -> Result<(), RuntimeError> {
    let n = slot.n;
    let nd = if slot.v6.is_some() { format!("{ND_ACCEPT}; ") } else { String::new() };
    let mut s = format!(
        "table {TABLE} {{\n{}\
         chain e{n} {{ }}\n\
         chain output {{ type filter hook output priority -10; policy accept; oifname \"lo\" accept; jump e{n}; }}\n\
         chain input {{ type filter hook input priority -10; policy accept; iifname \"lo\" accept; \
         ct state established,related accept; {nd}counter name \"d{n}\" drop; }}\n\
         }}\n",
        declarations(n)
    );
    s.push_str(&egress_rules(slot, forbidden, policy, true));
    run_in(Some(netns), "add a vessel's rules", &s)
}

/// Replaces slot `n`'s egress rules with `policy`'s (and forgets the
/// addresses the resolver admitted under the old one), atomically; in
/// `inside` (a rootless vessel's namespace) or on the host.
pub(super) fn apply(
    slot: Slot,
    forbidden: &Forbidden,
    policy: &NetworkPolicy,
    inside: Option<&Path>,
) -> Result<(), RuntimeError> {
    let n = slot.n;
    let mut s = format!("flush chain {TABLE} e{n}\nflush set {TABLE} n{n}\nflush set {TABLE} m{n}\n");
    s.push_str(&egress_rules(slot, forbidden, policy, inside.is_some()));
    run_in(inside, "change a vessel's rules", &s)
}

/// Admits `addrs` into slot `n`'s resolved set for `ttl` seconds each,
/// renewing the timeout of those already there.
pub(super) fn admit(n: u32, addrs: &[(IpAddr, u32)], inside: Option<&Path>) -> Result<(), RuntimeError> {
    let mut s = String::new();
    for (set, v6) in [(format!("n{n}"), false), (format!("m{n}"), true)] {
        let family: Vec<_> = addrs.iter().filter(|(a, _)| a.is_ipv6() == v6).collect();
        if family.is_empty() {
            continue;
        }
        let elems: Vec<String> = family.iter().map(|(a, t)| format!("{a} timeout {t}s")).collect();
        let plain: Vec<String> = family.iter().map(|(a, _)| a.to_string()).collect();
        let (elems, plain) = (elems.join(", "), plain.join(", "));
        // add (so the delete finds it), delete, add with the new timeout.
        let _ = write!(
            s,
            "add element {TABLE} {set} {{ {elems} }}\n\
             delete element {TABLE} {set} {{ {plain} }}\n\
             add element {TABLE} {set} {{ {elems} }}\n"
        );
    }
    if s.is_empty() {
        return Ok(());
    }
    // One transaction for both families.
    run_in(inside, "admit resolved addresses", &s)
}

/// Slot `n`'s denied packets and recently denied destinations.
pub(super) fn denied(slot: Slot, inside: Option<&Path>) -> (u64, Vec<IpAddr>) {
    let n = slot.n;
    let packets = json_in(inside, &format!("list counter inet vessel d{n}"))
        .and_then(|v| {
            v["nftables"].as_array()?.iter().find_map(|o| o.get("counter").and_then(|c| c["packets"].as_u64()))
        })
        .unwrap_or(0);
    let mut dests = Vec::new();
    for set in [format!("x{n}"), format!("y{n}")] {
        let Some(v) = json_in(inside, &format!("list set inet vessel {set}")) else { continue };
        for o in v["nftables"].as_array().into_iter().flatten() {
            for e in o.get("set").and_then(|s| s["elem"].as_array()).into_iter().flatten() {
                let text = e.as_str().or_else(|| e["elem"]["val"].as_str());
                if let Some(ip) = text.and_then(|t| t.parse().ok()) {
                    dests.push(ip);
                }
            }
        }
    }
    (packets, dests)
}

/// Removes slot `n`'s rules, sets and counter; absent parts are fine.
pub(super) fn remove(n: u32) {
    // Rootless, the filter is in the vessel's namespace, gone with it.
    if !available() || crate::rootless::mode().is_rootless() {
        return;
    }
    let veth = Slot::veth(n);
    let steps = [
        format!("delete element {TABLE} egress {{ \"{veth}\" }}"),
        format!("delete element {TABLE} ingress {{ \"{veth}\" }}"),
        format!("flush chain {TABLE} e{n}"),
        format!("flush chain {TABLE} i{n}"),
        format!("delete chain {TABLE} e{n}"),
        format!("delete chain {TABLE} i{n}"),
        format!("delete set {TABLE} n{n}"),
        format!("delete set {TABLE} m{n}"),
        format!("delete set {TABLE} x{n}"),
        format!("delete set {TABLE} y{n}"),
        format!("delete counter {TABLE} d{n}"),
    ];
    // All at once when everything is there; else (a leftover half made, or
    // no table at all) step by step, skipping what is gone.
    if run("remove a vessel's rules", &steps.join("\n")).is_err() && json("list table inet vessel").is_some() {
        for step in &steps {
            let _ = run("remove a vessel's rules", step);
        }
    }
}

/// Whether any of slot `n`'s chains exist.
pub(super) fn exists(n: u32) -> bool {
    json(&format!("list chain inet vessel e{n}")).is_some() || json(&format!("list chain inet vessel i{n}")).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ipv6: bool) -> NetConfig {
        let c = NetConfig::default();
        if ipv6 { c.with_ipv6() } else { c }
    }

    #[test]
    fn forbidden_ranges_merge_without_overlap() {
        let f = Forbidden::of(&config(true));
        for (i, a) in f.v4.iter().enumerate() {
            for b in &f.v4[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} and {b} overlap");
            }
        }
        for (i, a) in f.v6.iter().enumerate() {
            for b in &f.v6[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} and {b} overlap");
            }
        }
        for bad in ["169.254.169.254", "10.213.0.9", "127.0.0.1"] {
            assert!(f.contains(bad.parse().unwrap()), "{bad}");
        }
        for bad in [
            "::1",
            "fe80::1",
            "fd00:99::5",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:8.8.8.8",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::10.1.2.3",
            "2002:c0a8:0101::1",
            "2002:7f00:1::1",
            "fd76:6573:7365:6c00::7",
        ] {
            assert!(f.contains(bad.parse().unwrap()), "{bad} must be forbidden");
        }
        for good in ["192.0.2.10", "2001:db8::10", "2606:4700::1111", "64:ff9b::8.8.8.8", "2002:0808:0808::1"] {
            assert!(!f.contains(good.parse().unwrap()), "{good} is public");
        }
    }

    #[test]
    fn allow_rules_become_accepts_before_the_forbidden_drop() {
        let cfg = config(false);
        let slot = Slot::new(cfg.pool, None, 3);
        let f = Forbidden::of(&cfg);
        let p: NetworkPolicy = "allow,10.1.2.0/24:443,pypi.test,[2001:db8::/32]:53".parse().unwrap();
        let rules = egress_rules(slot, &f, &p, false);
        let accept = rules.find("ip daddr 10.1.2.0/24 meta l4proto { tcp, udp } th dport 443 accept").unwrap();
        let forbid = rules.find("ip daddr { 0.0.0.0/8").unwrap();
        let resolved = rules.find("ip daddr @n3 accept").unwrap();
        assert!(accept < forbid && forbid < resolved, "{rules}");
        assert!(rules.contains("ip saddr != 10.213.0.7"), "{rules}");
        assert!(rules.starts_with("add rule inet vessel e3 meta nfproto ipv6 counter"), "IPv6 off: {rules}");
        assert!(!rules.contains("2001:db8"), "IPv6 rules have no effect: {rules}");
        assert!(rules.trim_end().ends_with("counter name \"d3\" drop"), "{rules}");
        let none = egress_rules(slot, &f, &NetworkPolicy::None, false);
        assert_eq!(none.matches("accept").count(), 1, "only established: {none}");
    }

    #[test]
    fn ipv6_gets_the_same_policy() {
        let cfg = config(true);
        let slot = Slot::new(cfg.pool, cfg.ipv6_pool, 3);
        assert_eq!(slot.v6.unwrap().1.to_string(), "fd76:6573:7365:6c00::7");
        let f = Forbidden::of(&cfg);
        let p: NetworkPolicy = "allow,pypi.test,[2001:db8::/32]:53".parse().unwrap();
        let rules = egress_rules(slot, &f, &p, false);
        assert!(rules.contains("ip6 saddr != fd76:6573:7365:6c00::7 counter"), "{rules}");
        let accept = rules.find("ip6 daddr 2001:db8::/32 meta l4proto { tcp, udp } th dport 53 accept").unwrap();
        let forbid = rules.find("ip6 daddr { ::/127").unwrap();
        let resolved = rules.find("ip6 daddr @m3 accept").unwrap();
        assert!(accept < forbid && forbid < resolved, "{rules}");
        assert!(rules.contains("add @y3 { ip6 daddr }"), "{rules}");
        assert!(!rules.contains("nd-neighbor"), "no neighbour discovery is forwarded: {rules}");
        assert!(rules.trim_end().ends_with("counter name \"d3\" drop"), "{rules}");
        let inside = egress_rules(slot, &f, &p, true);
        assert!(inside.contains(ND_ACCEPT) && !inside.contains("saddr"), "{inside}");
        assert!(ingress_rules(slot).starts_with(&format!("add rule {TABLE} i3 {ND_ACCEPT}")));
    }

    #[test]
    fn pools_bound_the_slots() {
        let mut c = config(true);
        assert_eq!(c.slots().unwrap(), 32_767, "the IPv4 /16 bounds it");
        c.ipv6_pool = Some("fd00::/120".parse().unwrap());
        assert_eq!(c.slots().unwrap(), 128);
        c.ipv6_pool = Some("fd00::/127".parse().unwrap());
        assert!(c.slots().is_err());
        c.ipv6_pool = None;
        c.pool = "10.0.0.0/31".parse().unwrap();
        assert!(c.slots().is_err());
    }
}
