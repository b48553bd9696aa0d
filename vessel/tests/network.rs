//! Vessel networks end to end, in the fake internet `cargo xtask test`
//! builds (see xtask's `fakenet`): this binary re-runs itself in that
//! network namespace, whose only routes lead to test servers on TEST-NET
//! and forbidden-class addresses, so nothing it does can reach a real
//! network. Every policy is checked from inside a vessel with busybox's
//! `nc` and `nslookup`, against the host reaching the same servers (so a
//! refusal is the policy's, not a dead server's). After all cases, no
//! veth, namespace, filter chain, mount, cgroup or container is left.

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{IMAGE, World, run};
use libtest_mimic::Arguments;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vessel::{NetConfig, NetworkPolicy, VesselErrorKind, VesselOptions};
use vessel_test_support as support;

static TOKIO: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap());

const INSIDE: &str = "VESSEL_FAKENET_INSIDE";
const CRASH_CHILD: &str = "VESSEL_TEST_NET_CRASH";

/// The fake internet's resolver.
fn dns() -> SocketAddr {
    std::env::var("VESSEL_FAKENET_DNS")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| "192.0.2.53:53".parse().unwrap())
}

/// IPv6 on: every case checks the policy holds with it (the CLI and MCP
/// cases, with the default configuration, run with it off).
fn net_config() -> NetConfig {
    NetConfig { upstream_dns: vec![dns()], ..Default::default() }.with_ipv6()
}

fn config(w: &World, host: &str) -> vessel::ManagerConfig {
    w.config(host).network(net_config())
}

async fn manager(w: &World, host: &str) -> Result<vessel::Manager> {
    Ok(vessel::Manager::new(config(w, host)).await?)
}

fn policy(text: &str) -> NetworkPolicy {
    text.parse().unwrap()
}

fn main() {
    vessel::init();
    let Some(ns) = support::required_env("network", "VESSEL_FAKENET") else { return };
    if std::env::var_os(INSIDE).is_none() {
        // Into the fake internet (only the network namespace: mounts,
        // /sys and cgroups stay the host's), the same binary and arguments.
        let err = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.to_string_lossy()))
            .arg("--")
            .arg(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .env(INSIDE, "1")
            .exec();
        panic!("nsenter: {err}");
    }
    if std::env::var_os(CRASH_CHILD).is_some() {
        crash_child();
    }
    let args = Arguments::from_args();
    let Some(image_dir) = support::root_with_test_image("network") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let worlds = common::worlds("network", tmp.path(), true);
    common::seed_images(&TOKIO, &worlds, &image_dir, false);
    let cases = support::cases![
        open_reaches_the_public_and_nothing_else,
        allow_admits_only_what_it_lists,
        set_network_applies_at_once,
        none_is_loopback_only,
        container_root_cannot_touch_the_network,
        published_ports_reach_only_from_the_host,
        nothing_is_left_after_close_or_a_crash,
        bad_policies_are_refused,
        ipv6_follows_the_same_policy,
        ipv6_is_off_by_default,
        the_cli_drives_the_network,
        an_mcp_client_drives_the_network,
    ];
    // Rootless (pasta), all but the cases that drive the CLI and MCP binaries.
    let rule = support::suite::Rootless {
        rootful_only: &["the_cli_drives_the_network", "an_mcp_client_drives_the_network"],
        cgroup_limits: &[],
    };
    let (rootless, delegated) = (common::rootless(), common::delegated());
    let trials =
        support::suite::trials(&TOKIO, &common::labelled(&worlds), &cases, |n| rule.runs(n, rootless, delegated));
    let conclusion = libtest_mimic::run(&args, trials);
    let mut leaks = common::leaks(tmp.path(), &worlds);
    leaks.push(("vessel veths", leftover_interfaces()));
    leaks.push(("vessel filter chains", leftover_chains()));
    leaks.push(("pasta processes", pastas()));
    let run_dir = vessel::runtime::net::run_dir();
    leaks.push(("network mounts (namespaces, sysfs)", support::shown(support::mounts_under(&run_dir))));
    support::finish(&tmp.keep(), &leaks, conclusion)
}

/// `vsl*` interfaces in this namespace.
fn leftover_interfaces() -> Vec<String> {
    nix::net::if_::if_nameindex()
        .map(|l| l.iter().map(|i| i.name().to_string_lossy().into_owned()).filter(|n| n.starts_with("vsl")).collect())
        .unwrap_or_default()
}

/// pasta processes still running (rootless networks' uplinks).
fn pastas() -> Vec<String> {
    procfs::process::all_processes()
        .map(|ps| {
            ps.flatten()
                .filter(|p| p.stat().is_ok_and(|s| s.comm == "pasta" || s.comm == "passt"))
                .map(|p| p.pid.to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Per-vessel chains left in table `inet vessel`.
fn leftover_chains() -> Vec<String> {
    let Ok(out) = std::process::Command::new("nft").args(["list", "chains", "inet"]).output() else { return vec![] };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain "))
        .map(|c| c.trim_end_matches(" {").to_owned())
        .filter(|c| (c.starts_with('e') || c.starts_with('i')) && c[1..].chars().all(|ch| ch.is_ascii_digit()))
        .collect()
}

/// An HTTP GET from inside `v` (busybox nc): the body's last line, or `None`
/// if the connection failed.
async fn get(v: &vessel::Vessel, host: &str, port: u16) -> Result<Option<String>> {
    // The client keeps its side open a second (no half-close: Debian 12's
    // pasta mishandles a client's early FIN and replays the reply).
    let script = format!("(printf 'GET / HTTP/1.0\\r\\n\\r\\n'; sleep 1) | nc -w 2 {host} {port} | tail -n 1");
    let (_, out, _) = run(v, &script, false).await?;
    let line = out.trim().to_owned();
    Ok(if line.is_empty() { None } else { Some(line) })
}

/// The same GET from the test's host.
async fn host_get(addr: &str) -> Option<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut body)).await.ok()?.ok()?;
    body.lines().last().map(str::to_owned)
}

/// A server on the test's host answering `reply` on every connection.
async fn host_server(bind: &str, reply: &'static str) -> Result<(tokio::task::JoinHandle<()>, SocketAddr)> {
    let l = tokio::net::TcpListener::bind(bind).await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut req = [0u8; 256];
            let _ = s.read(&mut req).await;
            let _ = s.write_all(format!("HTTP/1.0 200 OK\r\n\r\n{reply}\n").as_bytes()).await;
        }
    });
    Ok((task, addr))
}

/// Starts busybox httpd in `v` serving `body` on `port`, and gives it a moment.
async fn serve(v: &vessel::Vessel, port: u16, body: &str) -> Result<vessel::ProcessHandle> {
    let script = format!("mkdir -p /www && echo {body} > /www/index.html && httpd -f -p {port} -h /www");
    let p = v
        .spawn(vessel::ExecOptions { command: common::sh(&script), persist_result: true, ..Default::default() })
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(p)
}

async fn open_reaches_the_public_and_nothing_else(w: Arc<World>) -> Result<()> {
    let mgr = manager(&w, "open").await?;
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().network(policy("open"))).await?;
    ensure!(get(&v, "203.0.113.5", 80).await?.as_deref() == Some("203.0.113.5"), "by IP");
    ensure!(get(&v, "pypi.test", 80).await?.as_deref() == Some("192.0.2.10"), "by name");
    let info = v.network_info().await;
    let gateway = {
        let (_, out, _) = run(&v, "ip route | awk '/default/ {print $3}'", false).await?;
        out.trim().to_owned()
    };
    // Host services: on loopback, on every address (the uplink's and the veth's).
    let (t1, lo) = host_server("127.0.0.1:0", "host loopback").await?;
    let (t2, any) = host_server("0.0.0.0:0", "host any").await?;
    ensure!(host_get(&any.to_string()).await.is_some(), "the host's own server answers the host");
    for (host, port) in [
        ("10.99.0.5", 80),
        ("100.64.0.5", 80),
        ("169.254.169.254", 80),
        ("127.0.0.1", lo.port()),
        ("198.18.0.2", any.port()),
        (gateway.as_str(), any.port()),
    ] {
        if port == 80 {
            ensure!(host_get(&format!("{host}:80")).await.is_some(), "the host reaches {host}");
        }
        ensure!(get(&v, host, port).await?.is_none(), "{host}:{port} must be refused");
    }
    // Another vessel, by its address.
    let other = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().network(policy("open"))).await?;
    let server = serve(&other, 8000, "other").await?;
    let published = other.publish(8000).await?;
    ensure!(host_get(&published.to_string()).await.as_deref() == Some("other"), "published to the host");
    // Rootful, each vessel has an address of its own (rootless, pasta gives
    // each the host's, and its published port is the only way in).
    if let Some(addr) = other.network_info().await.address {
        ensure!(get(&v, &addr.to_string(), 8000).await?.is_none(), "another vessel's address is refused");
    }
    ensure!(get(&v, "127.0.0.1", published.port()).await?.is_none(), "another vessel's published port is refused");
    let stats = v.network_stats().await;
    ensure!(stats.denied_packets > 0, "denials are counted: {stats:?}");
    ensure!(stats.denied_destinations.iter().any(|d| d.to_string() == "10.99.0.5"), "{stats:?}");
    ensure!(info.slot.is_some(), "{info:?}");
    server.signal(9).await?;
    other.close().await?;
    v.close().await?;
    t1.abort();
    t2.abort();
    Ok(())
}

async fn allow_admits_only_what_it_lists(w: Arc<World>) -> Result<()> {
    let mgr = manager(&w, "allow").await?;
    let p = policy("allow,pypi.test,*.allowed.test,rebind.test,203.0.113.5:80");
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().network(p)).await?;
    ensure!(get(&v, "pypi.test", 80).await?.as_deref() == Some("192.0.2.10"), "an allowed name");
    ensure!(get(&v, "a.allowed.test", 80).await?.as_deref() == Some("198.51.100.7"), "a wildcard's name");
    ensure!(get(&v, "203.0.113.5", 80).await?.as_deref() == Some("203.0.113.5"), "an allowed address");
    let (code, out, _) = run(&v, "nslookup evil.test", false).await?;
    ensure!(code != 0 && !out.contains("192.0.2.66"), "evil.test gets no address: {out}");
    ensure!(get(&v, "192.0.2.66", 80).await?.is_none(), "evil.test's address, literally, is refused");
    ensure!(get(&v, "allowed.test.evil.test", 80).await?.is_none(), "a suffix trick is refused");
    ensure!(get(&v, "allowed.test", 80).await?.is_none(), "a wildcard does not match its own suffix");
    // Another resolver, over UDP and TCP: unreachable.
    let (code, out, _) = run(&v, "nslookup evil.test 192.0.2.53", false).await?;
    ensure!(code != 0 && !out.contains("192.0.2.66"), "another resolver is unreachable: {out}");
    ensure!(get(&v, "192.0.2.53", 53).await?.is_none(), "DNS over TCP elsewhere is refused");
    // A record that changes to a forbidden address stays refused for it
    // (rewriting the fake internet's records takes root: the rootful run).
    ensure!(get(&v, "rebind.test", 80).await?.as_deref() == Some("192.0.2.20"), "rebind.test at first");
    if !common::rootless() {
        let rebound = rebind("10.99.0.5").await;
        let after = get(&v, "rebind.test", 80).await;
        rebind("192.0.2.20").await?;
        rebound?;
        ensure!(after?.is_none(), "rebind.test moved to a private address, which stays refused");
    }
    let stats = v.network_stats().await;
    ensure!(stats.refused_names.iter().any(|r| r.name == "evil.test"), "refused names are counted: {stats:?}");
    v.close().await?;
    Ok(())
}

async fn ipv6_follows_the_same_policy(w: Arc<World>) -> Result<()> {
    let mgr = manager(&w, "v6").await?;
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().network(policy("open"))).await?;
    ensure!(get(&v, "2001:db8::10", 80).await?.as_deref() == Some("2001:db8::10"), "by IPv6 address");
    ensure!(get(&v, "v6.test", 80).await?.as_deref() == Some("2001:db8::10"), "by an IPv6-only name");
    ensure!(get(&v, "203.0.113.5", 80).await?.as_deref() == Some("203.0.113.5"), "IPv4 still");
    let info = v.network_info().await;
    let gateway6 = {
        let (_, out, _) = run(&v, "ip -6 route | awk '/default/ {print $3}'", false).await?;
        out.trim().to_owned()
    };
    ensure!(!gateway6.is_empty(), "an IPv6 default route");
    // Router advertisements (a raw socket container root cannot open anyway)
    // would configure nothing.
    let script = "d=$(ip -6 route show default | awk '{print $5}'); cat /proc/sys/net/ipv6/conf/$d/accept_ra /proc/sys/net/ipv6/conf/$d/autoconf";
    let (_, out, _) = run(&v, script, false).await?;
    ensure!(out.split_whitespace().collect::<Vec<_>>() == ["0", "0"], "RAs are ignored: {out:?}");
    let (t1, any) = host_server("[::]:0", "host any v6").await?;
    ensure!(host_get(&format!("[2001:db8:ff::2]:{}", any.port())).await.is_some(), "the host's server answers");
    ensure!(host_get("[fd00:99::5]:80").await.is_some(), "the host reaches the ULA server");
    let mut refused = vec![
        ("fd00:99::5".to_owned(), 80),
        ("2001:db8:ff::2".to_owned(), any.port()),
        (gateway6.clone(), any.port()),
        // 10.99.0.5 through NAT64's prefix and as IPv4-mapped.
        ("64:ff9b::a63:5".to_owned(), 80),
        ("::ffff:10.99.0.5".to_owned(), 80),
    ];
    if !common::rootless() {
        // The host end's link-local address (on the vessel's link: the one
        // host address it could reach without a route).
        let iface = info.interface.clone().context("a host interface")?;
        let ll = nix::ifaddrs::getifaddrs()?
            .filter(|a| a.interface_name == iface)
            .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in6().map(|s| s.ip())))
            .find(|ip| ip.is_unicast_link_local())
            .context("the host end's link-local address")?;
        refused.push((format!("{ll}%eth0"), any.port()));
        ensure!(info.address6.is_some(), "a vessel address: {info:?}");
    }
    for (host, port) in &refused {
        ensure!(get(&v, host, *port).await?.is_none(), "[{host}]:{port} must be refused");
    }
    let other = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().network(policy("open"))).await?;
    if let Some(addr) = other.network_info().await.address6 {
        let srv = serve(&other, 8000, "other").await?;
        ensure!(get(&v, &addr.to_string(), 8000).await?.is_none(), "another vessel's IPv6 address is refused");
        srv.signal(9).await?;
    }
    let stats = v.network_stats().await;
    ensure!(stats.denied_destinations.iter().any(|d| d.to_string() == "fd00:99::5"), "{stats:?}");
    other.close().await?;
    // Allow: names admit their AAAA records, nothing else.
    v.set_network(policy("allow,v6.test,ula.test")).await?;
    ensure!(get(&v, "v6.test", 80).await?.as_deref() == Some("2001:db8::10"), "an allowed IPv6-only name");
    let (_, out, _) = run(&v, "nslookup -type=AAAA evil6.test", false).await?;
    ensure!(!out.contains("2001:db8::66"), "evil6.test gets no address: {out}");
    ensure!(get(&v, "2001:db8::66", 80).await?.is_none(), "evil6.test's address, literally, is refused");
    let (_, out, _) = run(&v, "nslookup -type=AAAA ula.test", false).await?;
    ensure!(!out.contains("fd00:99::5"), "an allowed name's ULA record is dropped: {out}");
    ensure!(get(&v, "ula.test", 80).await?.is_none(), "and the ULA server stays refused");
    // A CIDR rule re-allows a forbidden IPv6 range.
    v.set_network(policy("allow,[fd00:99::/64]:80")).await?;
    ensure!(get(&v, "fd00:99::5", 80).await?.as_deref() == Some("fd00:99::5"), "re-allowed by a CIDR rule");
    ensure!(get(&v, "2001:db8::10", 80).await?.is_none(), "and nothing else");
    v.close().await?;
    t1.abort();
    Ok(())
}

async fn ipv6_is_off_by_default(w: Arc<World>) -> Result<()> {
    let config = w.config("v6-off").network(NetConfig { upstream_dns: vec![dns()], ..Default::default() });
    let mgr = vessel::Manager::new(config).await?;
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().network(policy("open"))).await?;
    ensure!(get(&v, "203.0.113.5", 80).await?.is_some(), "IPv4 works");
    let (_, out, _) = run(&v, "ip -6 addr show scope global; ip -6 route show default", false).await?;
    ensure!(out.trim().is_empty(), "no IPv6 address or route: {out}");
    ensure!(get(&v, "2001:db8::10", 80).await?.is_none(), "no IPv6 egress");
    ensure!(v.network_info().await.address6.is_none());
    v.set_network(policy("allow,v6.test")).await?;
    let (_, out, _) = run(&v, "nslookup -type=AAAA v6.test", false).await?;
    ensure!(!out.contains("2001:db8::10"), "AAAA records are dropped: {out}");
    v.close().await?;
    Ok(())
}

/// Points `rebind.test` at `ip` in the fake internet's resolver.
async fn rebind(ip: &str) -> Result<()> {
    let hosts = support::required_env("network", "VESSEL_FAKENET_HOSTS").context("VESSEL_FAKENET_HOSTS")?;
    let pid_file = support::required_env("network", "VESSEL_FAKENET_DNSMASQ_PID").context("pid")?;
    let text = std::fs::read_to_string(&hosts)?;
    let changed: String = text
        .lines()
        .map(|l| if l.ends_with(" rebind.test") { format!("{ip} rebind.test\n") } else { format!("{l}\n") })
        .collect();
    std::fs::write(&hosts, changed)?;
    let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

async fn set_network_applies_at_once(w: Arc<World>) -> Result<()> {
    let mgr = manager(&w, "set").await?;
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().network(policy("open"))).await?;
    let id = v.id().clone();
    let bg = v
        .spawn(vessel::ExecOptions {
            command: common::sh("exec sleep 1000"),
            persist_result: true,
            ..Default::default()
        })
        .await?;
    ensure!(get(&v, "203.0.113.5", 80).await?.is_some(), "open at first");
    let t = Instant::now();
    v.set_network(policy("allow,pypi.test")).await?;
    let took = t.elapsed();
    ensure!(took < Duration::from_millis(50), "set_network took {took:?}");
    ensure!(get(&v, "203.0.113.5", 80).await?.is_none(), "the next connection follows the new policy");
    ensure!(get(&v, "pypi.test", 80).await?.is_some(), "and what it allows");
    ensure!(bg.info().status == vessel::ProcessStatus::Running, "a background process is untouched");
    v.set_network(NetworkPolicy::None).await?;
    ensure!(get(&v, "pypi.test", 80).await?.is_none(), "none cuts everything");
    v.set_network(policy("open")).await?;
    ensure!(get(&v, "203.0.113.5", 80).await?.is_some(), "open again");
    v.set_network(policy("allow,10.99.0.0/24:80")).await?;
    bg.signal(9).await?;
    v.close().await?;
    // Pinned in the manifest: another host opens it with the policy.
    let other = manager(&w, "set-2").await?;
    let v = other.open_vessel(id.as_str()).await?;
    ensure!(v.network_info().await.policy == policy("allow,10.99.0.0/24:80"), "the policy is pinned");
    ensure!(get(&v, "10.99.0.5", 80).await?.as_deref() == Some("10.99.0.5"), "a CIDR rule re-allows a private range");
    v.close().await?;
    Ok(())
}

async fn none_is_loopback_only(w: Arc<World>) -> Result<()> {
    let mgr = manager(&w, "none").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let (_, out, _) = run(&v, "ls /sys/class/net 2>/dev/null; ip -o link | cut -d: -f2", false).await?;
    ensure!(!out.contains("eth0"), "no interface but lo: {out}");
    ensure!(get(&v, "203.0.113.5", 80).await?.is_none(), "nothing reachable");
    ensure!(v.network_info().await.policy == NetworkPolicy::None && v.network_info().await.address.is_none());
    v.close().await?;
    Ok(())
}

async fn container_root_cannot_touch_the_network(w: Arc<World>) -> Result<()> {
    let mgr = manager(&w, "attack").await?;
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().network(policy("allow,pypi.test"))).await?;
    for attack in [
        "ip route add 10.99.0.0/24 dev eth0",
        "ip route del default",
        "ip addr add 10.99.0.77/32 dev eth0",
        "ip link set eth0 address 02:00:00:00:00:01",
        "ip link set eth0 down",
        "ip link add dummy0 type dummy",
        "ping -c 1 -W 1 192.0.2.10",
        "arping -c 1 -w 1 -I eth0 192.0.2.10",
        "ip -6 addr add fd76:6573:7365:6c00::99/127 dev eth0",
        "ip -6 route del default",
        "echo 1 > /proc/sys/net/ipv4/ip_forward",
        "echo 0 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
    ] {
        let (code, out, err) = run(&v, attack, false).await?;
        ensure!(code != 0, "{attack:?} succeeded: {out}{err}");
    }
    // Its /sys is its namespace's: the interfaces it has, none of the host's.
    let (_, out, _) = run(&v, "ls /sys/class/net | sort | tr '\\n' ' '; echo; ip -o link | cut -d: -f2 | cut -d@ -f1 | tr -d ' ' | sort | tr '\\n' ' '", false).await?;
    let mut lines = out.lines();
    let (sys, links) = (lines.next().unwrap_or_default(), lines.next().unwrap_or_default());
    // (Rootless, containers get the host's /sys, read-only.)
    ensure!(
        common::rootless() || (sys == links && sys.contains("lo") && !sys.contains("vsl") && !sys.contains("vfn-up")),
        "/sys shows {sys:?}, the namespace {links:?}"
    );
    ensure!(get(&v, "10.99.0.5", 80).await?.is_none(), "still refused after the attempts");
    ensure!(get(&v, "pypi.test", 80).await?.is_some(), "and the vessel's own network still works");
    v.close().await?;
    Ok(())
}

async fn published_ports_reach_only_from_the_host(w: Arc<World>) -> Result<()> {
    let mgr = manager(&w, "publish").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    // Published before its server starts: a vessel under policy `none` gets
    // its namespace then (a running process cannot change namespace).
    let addr = v.publish(8000).await?;
    let srv = serve(&v, 8000, "dev-server").await?;
    ensure!(addr.ip().is_loopback(), "published on loopback: {addr}");
    ensure!(v.publish(8000).await? == addr, "publishing twice gives the same address");
    ensure!(host_get(&addr.to_string()).await.as_deref() == Some("dev-server"), "reachable from the host");
    ensure!(v.network_info().await.published.get(&8000) == Some(&addr));
    ensure!(get(&v, "203.0.113.5", 80).await?.is_none(), "policy none still has no egress");
    let other = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().network(policy("open"))).await?;
    ensure!(get(&other, "127.0.0.1", addr.port()).await?.is_none(), "not from another vessel");
    ensure!(v.unpublish(8000).await && !v.unpublish(8000).await);
    ensure!(host_get(&addr.to_string()).await.is_none(), "unpublished");
    let again = v.publish(8000).await?;
    srv.signal(9).await?;
    v.close().await?;
    ensure!(tokio::net::TcpStream::connect(again).await.is_err(), "closed with the vessel");
    other.close().await?;
    Ok(())
}

async fn nothing_is_left_after_close_or_a_crash(w: Arc<World>) -> Result<()> {
    let mgr = manager(&w, "leaks").await?;
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().network(policy("open"))).await?;
    ensure!(get(&v, "203.0.113.5", 80).await?.is_some());
    let slot = v.network_info().await.slot.context("slot")?;
    v.close().await?;
    ensure!(!vessel::runtime::net::slot_exists(slot), "slot {slot} is gone after close");
    // A holder killed with -9 in the middle.
    let id = v.id().to_string();
    let mut child = w.child_command(CRASH_CHILD, &id)?.spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut line = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), out.read(&mut line)).await??;
    let said = String::from_utf8_lossy(&line[..n]).trim().to_owned();
    let slot: u32 = said.parse().with_context(|| format!("child said {said:?}"))?;
    ensure!(vessel::runtime::net::slot_exists(slot), "the child's network is up");
    child.start_kill()?;
    child.wait().await?;
    let _next = manager(&w, "leaks-child").await?;
    // Every manager sweeps at start: one made by a concurrent case may be
    // removing the slot right now (holding its lock, so ours skipped it).
    // Once nobody holds the lock, nothing of the slot may be left.
    let lock = vessel::runtime::net::run_dir().join(format!("slot-{slot}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = vessel::runtime::net::slot_leftovers(slot);
        if left.is_empty() {
            break;
        }
        // Free, and still the file at the path (not one a sweep just unlinked).
        let free = std::fs::File::open(&lock)
            .is_ok_and(|f| f.try_lock().is_ok() && vessel_core::sync::still_linked(&lock, &f));
        ensure!(
            !free && Instant::now() < deadline,
            "the next manager left slot {slot}'s {left:?}; its lock is {}",
            if free { "free".to_string() } else { format!("held by {:?}", support::processes_with_open(&lock)) }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The crash child: opens the vessel, makes its network, says its interface, waits to be killed.
fn crash_child() -> ! {
    let (w, id) = World::from_child_env();
    TOKIO.block_on(async {
        let mgr = manager(&w, "leaks-child").await.unwrap();
        let v = mgr.open_vessel(&id).await.unwrap();
        run(&v, "true", false).await.unwrap();
        println!("{}", v.network_info().await.slot.unwrap());
        tokio::time::sleep(Duration::from_secs(600)).await;
    });
    std::process::exit(1)
}

async fn bad_policies_are_refused(w: Arc<World>) -> Result<()> {
    let mgr = manager(&w, "bad").await?;
    for bad in ["allow,bad name", "open,github.com", "none,10.0.0.0/8"] {
        ensure!(bad.parse::<NetworkPolicy>().is_err(), "{bad} parses");
    }
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let before = v.manifest();
    let e = v.publish(0).await.unwrap_err();
    ensure!(e.kind() == VesselErrorKind::InvalidInput, "{e}");
    let many = NetworkPolicy::Allow(vec!["10.0.0.1".parse()?; vessel::MAX_NETWORK_RULES + 1]);
    let e = v.set_network(many).await.unwrap_err();
    ensure!(e.kind() == VesselErrorKind::InvalidInput, "{e}");
    ensure!(v.manifest().labels == before.labels, "nothing changed");
    v.close().await?;
    Ok(())
}

/// The CLI with this world's storage, a mount root of its own and the fake
/// internet's resolver.
fn cli(w: &World) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_vessel"));
    c.args(cli_args(w));
    c
}

fn cli_args(w: &World) -> Vec<String> {
    let mut a = vec![
        "--data".into(),
        w.base.join("data").display().to_string(),
        "--mount-root".into(),
        w.base.join("cli-host").display().to_string(),
        "--backend".into(),
        format!("{:?}", w.backend).to_lowercase(),
        "--namespace".into(),
        w.namespace.clone(),
        "--dns".into(),
        dns().to_string(),
    ];
    if let Some(addr) = &w.address {
        a.extend(["--containerd-address".into(), addr.display().to_string()]);
    }
    a
}

/// Runs the CLI; its stdout if it succeeded.
fn vessel_cli(w: &World, args: &[&str]) -> Result<String> {
    let out = cli(w).args(args).stdin(std::process::Stdio::null()).output()?;
    ensure!(out.status.success(), "vessel {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn the_cli_drives_the_network(w: Arc<World>) -> Result<()> {
    let w2 = w.clone();
    tokio::task::spawn_blocking(move || cli_session(&w2)).await?
}

fn cli_session(w: &World) -> Result<()> {
    let get = |id: &str, host: &str| -> Result<String> {
        let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {host} 80 | tail -n 1");
        let out = cli(w).args(["exec", id, "--", "sh", "-c", &script]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let bad = cli(w).args(["create", IMAGE, "--allow", "bad name"]).output()?;
    ensure!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("invalid network"),
        "a bad rule is refused"
    );
    let id = vessel_cli(w, &["create", IMAGE, "--network", "allow", "--allow", "pypi.test"])?;
    let id = id.lines().last().context("an id")?.trim().to_owned();
    ensure!(get(&id, "pypi.test")? == "192.0.2.10", "allowed by name");
    ensure!(get(&id, "192.0.2.66")?.is_empty(), "not what the list leaves out");
    let ls: serde_json::Value = serde_json::from_str(&vessel_cli(w, &["ls", "--json"])?)?;
    let row = ls.as_array().and_then(|a| a.iter().find(|r| r["vessel_id"] == id.as_str())).context("listed")?;
    ensure!(row["network"] == "allow,pypi.test", "ls --json shows the policy: {row}");
    let shown = vessel_cli(w, &["network", &id, "--network", "open"])?;
    ensure!(shown.contains("network: open"), "{shown}");
    ensure!(get(&id, "203.0.113.5")? == "203.0.113.5", "open after `vessel network --network open`");
    vessel_cli(
        w,
        &[
            "exec",
            "-d",
            &id,
            "--",
            "sh",
            "-c",
            "mkdir -p /www && echo from-cli > /www/index.html && exec httpd -f -p 8000 -h /www",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let url = vessel_cli(w, &["port", &id, "8000"])?;
    let addr = url.trim().strip_prefix("http://").context("a URL")?.to_owned();
    let body = TOKIO.block_on(host_get(&addr));
    ensure!(body.as_deref() == Some("from-cli"), "the published port serves the host: {body:?}");
    let net: serde_json::Value = serde_json::from_str(&vessel_cli(w, &["network", &id, "--json"])?)?;
    ensure!(net["published"]["8000"] == url.trim(), "{net}");
    ensure!(net["address6"].is_null(), "IPv6 is off by default: {net}");
    // On with --ipv6 / VESSEL_IPV6, for the keeper a command starts too.
    let v6 = |args: &[&str]| -> Result<String> {
        let out = cli(w).env("VESSEL_IPV6", "on").args(args).output()?;
        ensure!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let id6 = v6(&["create", IMAGE, "--network", "open"])?.lines().last().context("an id")?.trim().to_owned();
    v6(&["exec", "-d", &id6, "--", "sleep", "1000"])?;
    let net6: serde_json::Value = serde_json::from_str(&v6(&["network", &id6, "--json"])?)?;
    ensure!(net6["address6"].as_str().is_some_and(|a| a.starts_with("fd76:")), "{net6}");
    let script = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 2001:db8::10 80 | tail -n 1";
    let out = v6(&["exec", &id6, "--", "sh", "-c", script])?;
    ensure!(out.trim() == "2001:db8::10", "IPv6 egress through the keeper: {out:?}");
    v6(&["rm", "-f", &id6])?;
    vessel_cli(w, &["stop", &id])?;
    ensure!(TOKIO.block_on(host_get(&addr)).is_none(), "stop closes the port");
    vessel_cli(w, &["rm", &id])?;
    Ok(())
}

async fn an_mcp_client_drives_the_network(w: Arc<World>) -> Result<()> {
    let Some(python) = support::required_env("network", "VESSEL_MCP_PYTHON") else { return Ok(()) };
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_network.py");
    let out = tokio::process::Command::new(python)
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_vessel"))
        .args(cli_args(&w))
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    let transcript = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && transcript.trim_end().ends_with("session ok"),
        "the MCP session failed ({}):\n{transcript}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
