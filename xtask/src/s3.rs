//! A real S3-compatible server for the tests: moto's server mode (from
//! PyPI, in the tests' venv) on a free loopback port, with IAM auth on, so
//! wrong credentials are refused as by S3. `s3_setup.py` makes a user, its
//! key and the bucket `vessel-test`. Stopped on drop (moto keeps nothing on disk).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::output;

#[derive(Debug)]
pub(crate) struct S3Server {
    child: Child,
    endpoint: String,
    key_id: String,
    secret: String,
}

impl S3Server {
    /// Starts moto from the venv whose python is `python`.
    pub(crate) fn start(python: &Path) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let moto = python.with_file_name("moto_server");
        let child = Command::new(&moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            // The setup script's four requests go unauthenticated; every later one is checked.
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "4")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", moto.display()))?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("moto did not listen on port {port} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut me = Self { child, endpoint, key_id: String::new(), secret: String::new() };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/s3_setup.py");
        let keys = output(Command::new(python).arg(script).arg(&me.endpoint)).context("preparing the S3 server")?;
        let (id, secret) = keys.trim().split_once(' ').context("s3_setup.py printed no key")?;
        (me.key_id, me.secret) = (id.to_owned(), secret.to_owned());
        println!("s3: moto on {}", me.endpoint);
        Ok(me)
    }

    /// What the tests read: the usual AWS variables and the bucket's URL.
    pub(crate) fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("VESSEL_S3_URL", "s3://vessel-test".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
