//! Private OCI registries for the tests (Debian's `docker-registry`): one
//! plain, one with basic auth (htpasswd, bcrypt), one with bearer tokens
//! from a small token server (`token_server.py`: Python's standard library
//! and the openssl CLI sign RS256 JWTs for a throwaway key), each on a free
//! loopback port with its own storage under a temp dir. Stopped and removed
//! on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::output;

#[derive(Debug)]
pub(crate) struct Registries {
    children: Vec<Child>,
    dir: PathBuf,
    /// `127.0.0.1:PORT` of the plain registry.
    pub(crate) plain: String,
    /// `127.0.0.1:PORT` of the one with basic auth.
    pub(crate) auth: String,
    /// `127.0.0.1:PORT` of the one with bearer tokens (same user and password).
    pub(crate) token: String,
    /// Its storage root, for tests that tamper with blobs.
    pub(crate) plain_data: PathBuf,
}

pub(crate) const USER: &str = "vessel";
pub(crate) const PASSWORD: &str = "vessel-test-password";

fn wait_for(addr: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Registries {
    pub(crate) fn start() -> Result<Self> {
        let dir = PathBuf::from(format!("/tmp/vessel-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let htpasswd = dir.join("htpasswd");
        let line = output(Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]))
            .context("htpasswd (run `cargo xtask setup`)")?;
        std::fs::write(&htpasswd, line)?;
        let mut me = Self {
            children: Vec::new(),
            plain: format!("127.0.0.1:{}", free_port()?),
            auth: format!("127.0.0.1:{}", free_port()?),
            token: format!("127.0.0.1:{}", free_port()?),
            plain_data: dir.join("plain"),
            dir,
        };
        // The token server: a throwaway key and certificate, then the server.
        let (key, cert) = (me.dir.join("token.key"), me.dir.join("token.crt"));
        output(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=vessel-test-token",
                    "-keyout",
                ])
                .arg(&key)
                .arg("-out")
                .arg(&cert),
        )
        .context("openssl")?;
        let script = me.dir.join("token_server.py");
        std::fs::write(&script, include_str!("token_server.py"))?;
        let token_port = free_port()?;
        let log = std::fs::File::create(me.dir.join("token.log"))?;
        me.children.push(
            Command::new("python3")
                .arg(&script)
                .arg(token_port.to_string())
                .arg(&key)
                .arg(&cert)
                .args([USER, PASSWORD, "vessel-test-issuer"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("could not start the token server (python3)")?,
        );
        wait_for(&format!("127.0.0.1:{token_port}"), "token server")?;
        let token_auth = format!(
            "auth:\n  token:\n    realm: http://127.0.0.1:{token_port}/token\n    service: vessel-test-registry\n    issuer: vessel-test-issuer\n    rootcertbundle: {}\n",
            cert.display()
        );
        let htpasswd_auth = format!("auth:\n  htpasswd:\n    realm: vessel-test\n    path: {}\n", htpasswd.display());
        for (name, addr, auth) in [
            ("plain", me.plain.clone(), String::new()),
            ("auth", me.auth.clone(), htpasswd_auth),
            ("token", me.token.clone(), token_auth),
        ] {
            let mut config = format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                me.dir.join(name).display()
            );
            config.push_str(&auth);
            let file = me.dir.join(format!("{name}.yml"));
            std::fs::write(&file, config)?;
            let log = std::fs::File::create(me.dir.join(format!("{name}.log")))?;
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("could not start docker-registry (run `cargo xtask setup`)")?;
            me.children.push(child);
            wait_for(&addr, &format!("the {name} registry"))?;
        }
        println!("registries: plain at {}, basic auth at {}, bearer tokens at {}", me.plain, me.auth, me.token);
        Ok(me)
    }

    /// The environment the tests read.
    pub(crate) fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("VESSEL_REGISTRY", self.plain.clone()),
            ("VESSEL_REGISTRY_DATA", self.plain_data.display().to_string()),
            ("VESSEL_REGISTRY_AUTH", self.auth.clone()),
            ("VESSEL_REGISTRY_TOKEN", self.token.clone()),
            ("VESSEL_REGISTRY_USER", USER.into()),
            ("VESSEL_REGISTRY_PASSWORD", PASSWORD.into()),
        ]
    }
}

impl Drop for Registries {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
