//! The vessels' packet filter: table `inet vessel` in the host's namespace.
//!
//! Base chains (made once per host, under a lock) dispatch on the incoming
//! interface through two verdict maps to each vessel's own chains:
//! `e<n>` for what it sends through the host (forward), `i<n>` for what it
//! sends to the host itself (input); a `vsl*` interface with no chain (one
//! being made or removed) is dropped. Inbound connections to any vessel are
//! dropped in the base forward chain; replies pass by conntrack. Every
//! change is one `nft -f` script, which the kernel applies as a single
//! transaction: a policy change is never seen half-made.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::{IpNet, Ipv4Net};
use nix::fcntl::{Flock, FlockArg};
use vessel_core::{AllowRule, NetworkPolicy};

use super::{Slot, in_ns, run_dir};
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

/// The `nft` executable, if installed.
pub(super) fn binary() -> Option<PathBuf> {
    crate::rootless::find_tool("nft")
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
    let bin = binary().ok_or_else(|| nft_error(what, "nft is not installed".into()))?;
    let mut child = Command::new(&bin)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RuntimeError::io("run", &bin))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(RuntimeError::io("write to", &bin))?;
    }
    let out = child.wait_with_output().map_err(RuntimeError::io("wait for", &bin))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(nft_error(what, String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

/// [`json`] in `netns` or here.
fn json_in(netns: Option<&Path>, args: &[&str]) -> Option<serde_json::Value> {
    in_ns(netns, || json(args)).ok().flatten()
}

/// `nft -j <args>`'s JSON, if it succeeds.
fn json(args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new(binary()?).arg("-j").args(args).stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Makes the table and its base chains unless they exist (once per host;
/// a lock keeps two first vessels from both making them).
fn ensure_base() -> Result<(), RuntimeError> {
    // Once per process: nothing removes the table (each nft run costs ~15 ms).
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
    if json(&["list", "table", "inet", "vessel"]).is_none() {
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

/// The addresses a vessel in `pool` never reaches by default, merged (an
/// nftables interval set refuses overlaps): the classes above, the vessels'
/// pool, and every address of the host.
pub(super) fn forbidden(pool: Ipv4Net) -> Vec<Ipv4Net> {
    let mut nets: Vec<Ipv4Net> = FORBIDDEN.iter().filter_map(|n| n.parse().ok()).collect();
    nets.push(pool);
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            if let Some(ip) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()) {
                nets.push(Ipv4Net::from(ip));
            }
        }
    }
    Ipv4Net::aggregate(&nets)
}

fn set_of(nets: &[Ipv4Net]) -> String {
    let items: Vec<String> = nets.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

/// The rules of `e<n>` under `policy`.
fn egress_rules(slot: Slot, pool: Ipv4Net, policy: &NetworkPolicy, inside: bool) -> String {
    let n = slot.n;
    let deny = format!("add @x{n} {{ ip daddr }} counter name \"d{n}\" drop");
    let mut s = String::new();
    let chain = format!("add rule {TABLE} e{n}");
    let _ = writeln!(s, "{chain} meta nfproto ipv6 counter name \"d{n}\" drop");
    if !inside {
        // On the host, a packet from the veth must carry the vessel's address.
        let _ = writeln!(s, "{chain} ip saddr != {} counter name \"d{n}\" drop", slot.vessel);
    }
    let _ = writeln!(s, "{chain} ct state established,related accept");
    for rule in policy.rules() {
        // IPv6 rules are kept in the policy but a vessel has no IPv6 route.
        if let AllowRule::Cidr { net: IpNet::V4(net), port } = rule {
            match port {
                Some(p) => writeln!(s, "{chain} ip daddr {net} meta l4proto {{ tcp, udp }} th dport {p} accept"),
                None => writeln!(s, "{chain} ip daddr {net} accept"),
            }
            .expect("writing to a String");
        }
    }
    match policy {
        NetworkPolicy::Open(_) => {
            let _ = writeln!(s, "{chain} ip daddr {} {deny}", set_of(&forbidden(pool)));
            let _ = writeln!(s, "{chain} accept");
        }
        NetworkPolicy::Allow(_) => {
            let _ = writeln!(s, "{chain} ip daddr {} {deny}", set_of(&forbidden(pool)));
            let _ = writeln!(s, "{chain} ip daddr @n{n} accept");
        }
        _ => {}
    }
    let _ = writeln!(s, "{chain} {deny}");
    s
}

/// The rules of `i<n>`: only the vessel's resolver on the host.
fn ingress_rules(slot: Slot) -> String {
    let n = slot.n;
    let chain = format!("add rule {TABLE} i{n}");
    format!(
        "{chain} meta nfproto ipv6 counter name \"d{n}\" drop\n\
         {chain} ip saddr != {v} counter name \"d{n}\" drop\n\
         {chain} ct state established,related accept\n\
         {chain} ip daddr {h} udp dport 53 accept\n\
         {chain} add @x{n} {{ ip daddr }} counter name \"d{n}\" drop\n",
        v = slot.vessel,
        h = slot.host,
    )
}

/// Adds slot `n`'s chains, sets and counter with `policy`, and hooks them
/// to its veth, in one transaction.
pub(super) fn create(slot: Slot, pool: Ipv4Net, policy: &NetworkPolicy) -> Result<(), RuntimeError> {
    ensure_base()?;
    let n = slot.n;
    let mut s = format!(
        "add counter {TABLE} d{n}\n\
         add set {TABLE} n{n} {{ type ipv4_addr; flags timeout; }}\n\
         add set {TABLE} x{n} {{ type ipv4_addr; size 64; flags dynamic,timeout; timeout 1h; }}\n\
         add chain {TABLE} e{n}\n\
         add chain {TABLE} i{n}\n"
    );
    s.push_str(&egress_rules(slot, pool, policy, false));
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
    pool: Ipv4Net,
    policy: &NetworkPolicy,
) -> Result<(), RuntimeError> {
    let n = slot.n;
    let mut s = format!(
        "table {TABLE} {{\n\
         counter d{n} {{ }}\n\
         set n{n} {{ type ipv4_addr; flags timeout; }}\n\
         set x{n} {{ type ipv4_addr; size 64; flags dynamic,timeout; timeout 1h; }}\n\
         chain e{n} {{ }}\n\
         chain output {{ type filter hook output priority -10; policy accept; oifname \"lo\" accept; jump e{n}; }}\n\
         chain input {{ type filter hook input priority -10; policy accept; iifname \"lo\" accept; \
         ct state established,related accept; counter name \"d{n}\" drop; }}\n\
         }}\n"
    );
    s.push_str(&egress_rules(slot, pool, policy, true));
    run_in(Some(netns), "add a vessel's rules", &s)
}

/// Replaces slot `n`'s egress rules with `policy`'s (and forgets the
/// addresses the resolver admitted under the old one), atomically; in
/// `inside` (a rootless vessel's namespace) or on the host.
pub(super) fn apply(
    slot: Slot,
    pool: Ipv4Net,
    policy: &NetworkPolicy,
    inside: Option<&Path>,
) -> Result<(), RuntimeError> {
    let n = slot.n;
    let mut s = format!("flush chain {TABLE} e{n}\nflush set {TABLE} n{n}\n");
    s.push_str(&egress_rules(slot, pool, policy, inside.is_some()));
    run_in(inside, "change a vessel's rules", &s)
}

/// Admits `addrs` into slot `n`'s resolved set for `ttl` seconds each,
/// renewing the timeout of those already there.
pub(super) fn admit(n: u32, addrs: &[(Ipv4Addr, u32)], inside: Option<&Path>) -> Result<(), RuntimeError> {
    if addrs.is_empty() {
        return Ok(());
    }
    let elems: Vec<String> = addrs.iter().map(|(a, t)| format!("{a} timeout {t}s")).collect();
    let plain: Vec<String> = addrs.iter().map(|(a, _)| a.to_string()).collect();
    let (elems, plain) = (elems.join(", "), plain.join(", "));
    // add (so the delete finds it), delete, add with the new timeout: one transaction.
    let s = format!(
        "add element {TABLE} n{n} {{ {elems} }}\n\
         delete element {TABLE} n{n} {{ {plain} }}\n\
         add element {TABLE} n{n} {{ {elems} }}\n"
    );
    run_in(inside, "admit resolved addresses", &s)
}

/// Slot `n`'s denied packets and recently denied destinations.
pub(super) fn denied(slot: Slot, inside: Option<&Path>) -> (u64, Vec<IpAddr>) {
    let n = slot.n;
    let packets = json_in(inside, &["list", "counter", "inet", "vessel", &format!("d{n}")])
        .and_then(|v| {
            v["nftables"].as_array()?.iter().find_map(|o| o.get("counter").and_then(|c| c["packets"].as_u64()))
        })
        .unwrap_or(0);
    let mut dests = Vec::new();
    if let Some(v) = json_in(inside, &["list", "set", "inet", "vessel", &format!("x{n}")]) {
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
    if binary().is_none() || crate::rootless::mode().is_rootless() {
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
        format!("delete set {TABLE} x{n}"),
        format!("delete counter {TABLE} d{n}"),
    ];
    // All at once when everything is there; else (a leftover half made, or
    // no table at all) step by step, skipping what is gone.
    if run("remove a vessel's rules", &steps.join("\n")).is_err()
        && json(&["list", "table", "inet", "vessel"]).is_some()
    {
        for step in &steps {
            let _ = run("remove a vessel's rules", step);
        }
    }
}

/// Whether any of slot `n`'s chains exist.
pub(super) fn exists(n: u32) -> bool {
    json(&["list", "chain", "inet", "vessel", &format!("e{n}")]).is_some()
        || json(&["list", "chain", "inet", "vessel", &format!("i{n}")]).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_ranges_merge_without_overlap() {
        let pool: Ipv4Net = "10.213.0.0/16".parse().unwrap();
        let f = forbidden(pool);
        for (i, a) in f.iter().enumerate() {
            for b in &f[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} and {b} overlap");
            }
        }
        assert!(f.iter().any(|n| n.contains(&"169.254.169.254".parse::<Ipv4Addr>().unwrap())));
        assert!(!f.iter().any(|n| n.contains(&"192.0.2.10".parse::<Ipv4Addr>().unwrap())), "TEST-NET is public here");
    }

    #[test]
    fn allow_rules_become_accepts_before_the_forbidden_drop() {
        let slot = Slot::new("10.213.0.0/16".parse().unwrap(), 3);
        let p: NetworkPolicy = "allow,10.1.2.0/24:443,pypi.test,[2001:db8::/32]:53".parse().unwrap();
        let rules = egress_rules(slot, "10.213.0.0/16".parse().unwrap(), &p, false);
        let accept = rules.find("ip daddr 10.1.2.0/24 meta l4proto { tcp, udp } th dport 443 accept").unwrap();
        let forbid = rules.find("ip daddr { 0.0.0.0/8").unwrap();
        let resolved = rules.find("ip daddr @n3 accept").unwrap();
        assert!(accept < forbid && forbid < resolved, "{rules}");
        assert!(rules.contains("ip saddr != 10.213.0.7"), "{rules}");
        assert!(!rules.contains("2001:db8"), "IPv6 rules have no effect: {rules}");
        assert!(rules.trim_end().ends_with("counter name \"d3\" drop"), "{rules}");
        let none = egress_rules(slot, "10.213.0.0/16".parse().unwrap(), &NetworkPolicy::None, false);
        assert!(!none.contains("accept\n") || none.matches("accept").count() == 1, "{none}");
    }
}
