//! Vessel networks (youki backend, rootful): making and removing a vessel's
//! network (namespace, routed veth, nftables chains, resolver) against the
//! same work done by `ip` and `nft` commands, as a script or an exec'd
//! plugin does it; a policy change against the same `nft -f` transaction
//! run directly; and an HTTP request (connect, request, whole reply) to a
//! server in a vessel through its published port against the same request
//! to the vessel's address (the relay's cost) and to the same server on the
//! host. (A bare connect-and-close is no measure: busybox httpd forks per
//! connection and waits for a request, so the backlog fills.) Then what a
//! vessel pays for having a network: create + first exec (each alternated
//! with one under the other policy), and close, under `Open` against the
//! same under `None`; and a network made and removed while 100
//! others exist against alone, with the filter's rule count at 0, 1 and 100
//! vessels (each vessel's rules are a constant few; resolved addresses go
//! into sets). Throughput (1 GiB into a vessel, rootful and rootless,
//! against the host) is in the rootless bench, which has both kinds of
//! agent. Needs root and the test image (`cargo xtask bench`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::IMAGE;
use criterion::Criterion;
use vessel::runtime::net::{NetConfig, VesselNet};
use vessel::{ExecOptions, NetworkPolicy, VesselOptions};
use vessel_benches::image_dir;

fn sh(cmd: &str) {
    let ok = Command::new("sh").args(["-c", cmd]).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
    assert!(ok.success(), "{cmd}");
}

fn nft(script: &str) {
    let mut c = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().unwrap();
    c.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success(), "nft -f: {script}");
}

/// The baseline's network: what `VesselNet::create` does, by commands.
const BASE_RULES: &str = "table inet vbench {
  set n { type ipv4_addr; flags timeout; }
  counter d { }
  chain e { ip saddr != 10.214.0.1 counter name \"d\" drop; ct state established,related accept;
    ip daddr { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/3 } counter name \"d\" drop;
    accept; }
  chain forward { type filter hook forward priority -10; policy accept; iifname \"vbench0\" jump e; }
}";

/// Rules in table `inet vessel`.
fn rule_count() -> usize {
    let out = Command::new("nft").args(["-j", "list", "table", "inet", "vessel"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["nftables"].as_array().map_or(0, |a| a.iter().filter(|o| o.get("rule").is_some()).count())
}

/// Runs `sh -c script` in `v` (its changes discarded); exit code and stdout.
async fn run(v: &vessel::Vessel, script: &str) -> (i32, String) {
    let mut out = Vec::new();
    let r = v
        .exec(ExecOptions {
            command: vec!["sh".into(), "-c".into(), script.into()],
            stdout: Some(Box::new(&mut out)),
            ..Default::default()
        })
        .await
        .unwrap();
    (r.exit_code, String::from_utf8_lossy(&out).into_owned())
}

/// `iters` vessels made with `opts`, run `true` once and closed: the time
/// of the create and first exec, or of the close when `close` is set. With
/// `other`, each is preceded by one made with `other`, untimed: alternating
/// puts both sides of a comparison under the same load (on a 2-core VM one
/// side measured alone drifted by 10 ms from one run to the next).
async fn start_and_close(
    mgr: &vessel::Manager,
    opts: &VesselOptions,
    other: Option<&VesselOptions>,
    iters: u64,
    close: bool,
) -> Duration {
    let mut took = Duration::ZERO;
    for _ in 0..iters {
        if let Some(other) = other {
            let v = mgr.create_vessel_with(IMAGE, "/work", other).await.unwrap();
            assert_eq!(run(&v, "true").await.0, 0);
            let id = v.id().to_string();
            v.close().await.unwrap();
            mgr.delete_vessel(&id).await.unwrap();
        }
        let t = std::time::Instant::now();
        let v = mgr.create_vessel_with(IMAGE, "/work", opts).await.unwrap();
        assert_eq!(run(&v, "true").await.0, 0);
        let started = t.elapsed();
        let id = v.id().to_string();
        let t = std::time::Instant::now();
        v.close().await.unwrap();
        took += if close { t.elapsed() } else { started };
        mgr.delete_vessel(&id).await.unwrap();
    }
    took
}

fn get(addr: SocketAddr) -> usize {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).unwrap();
    assert!(body.starts_with(b"HTTP/1.") && body.windows(3).any(|w| w == b"200"), "{}", String::from_utf8_lossy(&body));
    body.len()
}

fn main() {
    vessel::init();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED network bench: needs root");
        return;
    }
    if let Some(why) = vessel::runtime::net::unavailable() {
        eprintln!("SKIPPED network bench: {why}");
        return;
    }
    let source = image_dir().join("storage");
    if !source.is_dir() {
        eprintln!("SKIPPED network bench: no test image at {} (run `cargo xtask image`)", source.display());
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mgr = common::youki_manager(&rt, dir.path(), &source);
    let mut c = Criterion::default().configure_from_args().sample_size(20).measurement_time(Duration::from_secs(8));
    let mut g = c.benchmark_group("network");

    let open = NetworkPolicy::Open(vec![]);
    let config = NetConfig::default();
    g.bench_function("create-and-remove/vessel", |b| {
        b.iter(|| {
            rt.block_on(async {
                let net = VesselNet::create(&config, &open).await.unwrap();
                net.close().await;
            })
        })
    });
    g.bench_function("create-and-remove/ip-and-nft-commands", |b| {
        b.iter(|| {
            sh("ip netns add vbench && ip link add vbench0 type veth peer name vbench1 netns vbench \
                && ip addr add 10.214.0.0/31 dev vbench0 && ip link set vbench0 up \
                && ip -n vbench link set lo up && ip -n vbench addr add 10.214.0.1/31 dev vbench1 \
                && ip -n vbench link set vbench1 up && ip -n vbench route add default via 10.214.0.0");
            nft(BASE_RULES);
            sh("nft delete table inet vbench && ip link del vbench0 && ip netns del vbench");
        })
    });

    // A policy change on a live network, against the same transaction by hand.
    let net = rt.block_on(VesselNet::create(&config, &open)).unwrap();
    let allow: NetworkPolicy = "allow,pypi.org,*.pythonhosted.org,10.1.2.0/24:443".parse().unwrap();
    let mut flip = false;
    g.bench_function("set-policy/vessel", |b| {
        b.iter(|| {
            flip = !flip;
            rt.block_on(net.set_policy(if flip { &allow } else { &open })).unwrap();
        })
    });
    nft(BASE_RULES);
    g.bench_function("set-policy/nft-f", |b| {
        b.iter(|| {
            nft("flush chain inet vbench e\nflush set inet vbench n\n\
                 add rule inet vbench e ct state established,related accept\n\
                 add rule inet vbench e ip daddr 10.1.2.0/24 meta l4proto { tcp, udp } th dport 443 accept\n\
                 add rule inet vbench e ip daddr @n accept\n\
                 add rule inet vbench e counter name \"d\" drop\n")
        })
    });
    sh("nft delete table inet vbench");
    rt.block_on(net.close());

    // HTTP through a published port vs straight to the vessel's address.
    let opts = VesselOptions::new().network(NetworkPolicy::Open(vec![]));
    let v = rt.block_on(mgr.create_vessel_with(IMAGE, "/work", &opts)).unwrap();
    let published = rt.block_on(v.publish(8000)).unwrap();
    let server = rt
        .block_on(v.spawn(ExecOptions {
            command: vec![
                "sh".into(),
                "-c".into(),
                "mkdir -p /www && echo hi > /www/index.html && exec httpd -f -p 8000 -h /www".into(),
            ],
            persist_result: true,
            ..Default::default()
        }))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let direct = SocketAddr::new(rt.block_on(v.network_info()).address.unwrap(), 8000);
    // The same server (busybox httpd, same page) on the host's loopback.
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hi\n").unwrap();
    let mut host_httpd =
        Command::new("busybox").args(["httpd", "-f", "-p", "127.0.0.1:18000", "-h"]).arg(&www).spawn().unwrap();
    let on_host: SocketAddr = "127.0.0.1:18000".parse().unwrap();
    while TcpStream::connect(on_host).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    g.bench_function("http-get/published-port", |b| b.iter(|| get(published)));
    g.bench_function("http-get/vessel-address", |b| b.iter(|| get(direct)));
    g.bench_function("http-get/host-server", |b| b.iter(|| get(on_host)));
    let _ = host_httpd.kill();
    let _ = host_httpd.wait();
    rt.block_on(server.signal(9)).unwrap();
    rt.block_on(v.close()).unwrap();

    // Create and first exec, then close (timed apart): what a network adds
    // to a vessel's start and to its end.
    let none = VesselOptions::new().network(NetworkPolicy::None);
    let with_open = VesselOptions::new().network(open.clone());
    for (name, opts, other) in [("network-none", &none, &with_open), ("network-open", &with_open, &none)] {
        g.bench_function(format!("create-and-first-exec/{name}"), |b| {
            b.iter_custom(|n| rt.block_on(start_and_close(&mgr, opts, Some(other), n, false)))
        });
    }
    for (name, opts) in [("network-none", &none), ("network-open", &with_open)] {
        g.bench_function(format!("close/{name}"), |b| {
            b.iter_custom(|n| rt.block_on(start_and_close(&mgr, opts, None, n, true)))
        });
    }
    g.finish();

    // Many vessels: one more network costs the same, and adds a constant
    // number of rules.
    let mut g = c.benchmark_group("network-many");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    let before = rule_count();
    let one = rt.block_on(VesselNet::create(&config, &open)).unwrap();
    let with_one = rule_count();
    let mut others = vec![one];
    for _ in 1..100 {
        others.push(rt.block_on(VesselNet::create(&config, &open)).unwrap());
    }
    let with_100 = rule_count();
    eprintln!(
        "network rules in table inet vessel: {before} with no vessel, {with_one} with 1, {with_100} with 100 \
         ({} per vessel)",
        (with_100 - before) / 100
    );
    assert_eq!(with_100 - before, 100 * (with_one - before), "rules grow by a constant per vessel");
    g.bench_function("create-and-remove/with-100-others", |b| {
        b.iter(|| {
            rt.block_on(async {
                let net = VesselNet::create(&config, &open).await.unwrap();
                net.close().await;
            })
        })
    });
    g.finish();
    for n in others {
        rt.block_on(n.close());
    }
    c.final_summary();
}
