//! A download server behind the host, for throughput benches: a network
//! namespace routed through the host (veth `vbs0`, 198.18.99.0/30, a
//! benchmarking range, so nothing leaves the machine) answering every HTTP
//! request with 1 GiB of zeros. Made and removed with `ip`; needs root.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The server's namespace, address and port.
const NS: &str = "vbsrv";
pub const SERVER: &str = "198.18.99.2";
pub const PORT: u16 = 9000;
/// What it sends per connection.
pub const GIB: u64 = 1 << 30;

fn sh(cmd: &str) -> bool {
    Command::new("sh").args(["-c", cmd]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// The download as a shell command: busybox `wget`, counted by busybox `wc
/// -c` (`prefix` is `"busybox "` on the host, empty in a vessel, whose
/// image is busybox: the same tools both sides; with coreutils' `wc` the
/// host's pipeline ran twice as fast here). Over HTTP rather than raw
/// `nc </dev/null`: a client that half-closes stalls behind Debian 12's
/// pasta (2023-03), which stops relaying once the vessel's side sent FIN.
pub fn script(prefix: &str) -> String {
    format!("{prefix}wget -q -O - http://{SERVER}:{PORT}/ | {prefix}wc -c")
}

/// The running server; dropping it stops it and removes its namespace.
#[derive(Debug)]
pub struct Server(Child);

impl Server {
    /// Makes the namespace and starts the server (a Python loop) in it.
    pub fn start() -> Self {
        let made = sh(&format!(
            "ip netns del {NS} 2>/dev/null; ip link del vbs0 2>/dev/null; ip netns add {NS} \
             && ip link add vbs0 type veth peer name vbs1 netns {NS} \
             && ip addr add 198.18.99.1/30 dev vbs0 && ip link set vbs0 up \
             && ip -n {NS} link set lo up && ip -n {NS} addr add {SERVER}/30 dev vbs1 \
             && ip -n {NS} link set vbs1 up && ip -n {NS} route add default via 198.18.99.1"
        ));
        assert!(made, "could not make the download server's namespace");
        let code = format!(
            "import socket
s = socket.create_server(('{SERVER}', {PORT}))
buf = bytes(1 << 20)
while True:
    c, _ = s.accept()
    try:
        req = b''
        while b'\\r\\n\\r\\n' not in req:
            got = c.recv(4096)
            if not got:
                break
            req += got
        c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Length: {GIB}\\r\\n\\r\\n')
        for _ in range({GIB} >> 20):
            c.sendall(buf)
    except OSError:
        pass
    c.close()
"
        );
        let child = Command::new("ip").args(["netns", "exec", NS, "python3", "-c", &code]).spawn().unwrap();
        let server = Self(child);
        for _ in 0..100 {
            if TcpStream::connect((SERVER, PORT)).is_ok() {
                // The server waits for that probe's request until it sees
                // it closed.
                std::thread::sleep(Duration::from_millis(200));
                return server;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the download server did not start");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        // Deleting the namespace removes vbs0 with its peer; the second
        // command covers a half-made setup.
        sh(&format!("ip netns del {NS}; ip link del vbs0 2>/dev/null; true"));
    }
}
