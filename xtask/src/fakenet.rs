//! A fake internet for the network suite: network namespaces only, no
//! uplink, so a policy bug shows up as a failed test and never as a packet
//! leaving the machine.
//!
//! `vfn-host` is the tests' host (the network suite re-runs itself in it):
//! its only route leads to `vfn-net`, the "internet", which holds every
//! test server's address on its loopback: TEST-NET hosts (192.0.2.0/24,
//! 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) and the forbidden
//! classes (an RFC 1918 server, a CGNAT one, 169.254.169.254, a ULA one).
//! One Python HTTP server answers on all of them with the address it was
//! reached at; dnsmasq serves names on 192.0.2.53 (`pypi.test`,
//! `evil.test`, `*.allowed.test`, IPv6-only `v6.test`, `evil6.test` and
//! `ula.test`, and a hosts file the tests rewrite to change a record).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::run;

const HOST: &str = "vfn-host";
const NET: &str = "vfn-net";
/// The resolver of the fake internet.
const DNS: &str = "192.0.2.53";
/// Every server address on the internet side.
const ADDRESSES: &[&str] = &[
    "192.0.2.10",      // pypi.test
    "192.0.2.20",      // rebind.test (the hosts file)
    "192.0.2.53",      // dnsmasq
    "192.0.2.66",      // evil.test
    "198.51.100.7",    // *.allowed.test
    "203.0.113.5",     // by IP only
    "10.99.0.5",       // RFC 1918
    "100.64.0.5",      // CGNAT
    "169.254.169.254", // cloud metadata
    "2001:db8::10",    // v6.test
    "2001:db8::66",    // evil6.test
    "fd00:99::5",      // ULA (ula.test)
];

const HTTP_SERVER: &str = r#"
import http.server, socket, socketserver
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        addr = self.connection.getsockname()[0].removeprefix("::ffff:")
        body = (addr + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    address_family = socket.AF_INET6
S(("::", 80), H).serve_forever()
"#;

pub(crate) struct FakeNet {
    children: Vec<Child>,
    dir: PathBuf,
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

fn remove() {
    for ns in [HOST, NET] {
        let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
    }
}

impl FakeNet {
    pub(crate) fn start(target: &std::path::Path) -> Result<Self> {
        remove();
        // Rootless vessels' pasta opens the tun device as the user: give it
        // Debian's default mode (udev's 0666), which some machines lack.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(0o666))
                .context("chmod 0666 /dev/net/tun")?;
        }
        let dir = target.join("fakenet");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut me = Self { children: Vec::new(), dir: dir.clone() };
        ip(&["netns", "add", HOST])?;
        ip(&["netns", "add", NET])?;
        ip(&["link", "add", "vfn-up", "netns", HOST, "type", "veth", "peer", "name", "vfn-down", "netns", NET])?;
        in_ns(HOST, &["ip", "link", "set", "lo", "up"])?;
        in_ns(HOST, &["ip", "addr", "add", "198.18.0.2/24", "dev", "vfn-up"])?;
        in_ns(HOST, &["ip", "link", "set", "vfn-up", "up"])?;
        in_ns(HOST, &["ip", "route", "add", "default", "via", "198.18.0.1"])?;
        in_ns(HOST, &["ip", "addr", "add", "2001:db8:ff::2/64", "dev", "vfn-up", "nodad"])?;
        in_ns(HOST, &["ip", "-6", "route", "add", "default", "via", "2001:db8:ff::1"])?;
        in_ns(NET, &["ip", "link", "set", "lo", "up"])?;
        in_ns(NET, &["ip", "addr", "add", "198.18.0.1/24", "dev", "vfn-down"])?;
        in_ns(NET, &["ip", "addr", "add", "2001:db8:ff::1/64", "dev", "vfn-down", "nodad"])?;
        in_ns(NET, &["ip", "link", "set", "vfn-down", "up"])?;
        // On its loopback (a dummy link needs a module the kernel may lack):
        // local addresses of `vfn-net` all the same, reached through `vfn-down`.
        for a in ADDRESSES {
            let len = if a.contains(':') { "128" } else { "32" };
            in_ns(NET, &["ip", "addr", "add", &format!("{a}/{len}"), "dev", "lo"])?;
        }
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "192.0.2.20 rebind.test\n10.99.0.5 private.test\n169.254.169.254 metadata.test\n")?;
        let pid = dir.join("dnsmasq.pid");
        let spawn = |args: &[&str]| -> Result<Child> {
            Command::new("ip")
                .args(["netns", "exec", NET])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting {}", args[0]))
        };
        me.children.push(spawn(&["python3", "-c", HTTP_SERVER])?);
        me.children.push(spawn(&[
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={DNS}"),
            "--address=/pypi.test/192.0.2.10",
            "--address=/evil.test/192.0.2.66",
            "--address=/allowed.test/198.51.100.7",
            "--host-record=v6.test,2001:db8::10",
            "--host-record=evil6.test,2001:db8::66",
            "--host-record=ula.test,fd00:99::5",
            &format!("--addn-hosts={}", hosts.display()),
            "--local-ttl=1",
            &format!("--pid-file={}", pid.display()),
            "--user=root",
        ])?);
        let deadline = Instant::now() + Duration::from_secs(20);
        let probe = [
            "python3",
            "-c",
            "import urllib.request as u; [u.urlopen(a, timeout=1).read() \
             for a in ('http://203.0.113.5/', 'http://[2001:db8::10]/')]",
        ];
        loop {
            // Quiet while the servers start: a refusal then is expected.
            let http = Command::new("ip")
                .args(["netns", "exec", HOST])
                .args(probe)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if http && pid.exists() {
                break;
            }
            if Instant::now() > deadline {
                // Once more aloud, for the reason.
                in_ns(HOST, &probe)?;
                bail!("the fake internet's servers did not start within 20 s (dnsmasq wrote no pid file)");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        println!("fakenet: {HOST} -> {NET} (DNS {DNS})");
        Ok(me)
    }

    /// What the network suite needs to find it.
    pub(crate) fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("VESSEL_FAKENET", HOST.into()),
            ("VESSEL_FAKENET_DNS", format!("{DNS}:53")),
            ("VESSEL_FAKENET_HOSTS", self.dir.join("hosts").display().to_string()),
            ("VESSEL_FAKENET_DNSMASQ_PID", self.dir.join("dnsmasq.pid").display().to_string()),
        ]
    }
}

impl Drop for FakeNet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // dnsmasq runs under `ip netns exec`, which execs it: killed above.
        remove();
    }
}
