//! A venv under `target/` with what the tests need from PyPI: the official
//! MCP Python SDK (an MCP client vessel did not write, for the `vessel mcp`
//! tests) and moto's S3 server (see `s3.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::util::run;

/// The SDK's version; pinned so a release on PyPI cannot change the tests.
const MCP_SDK_VERSION: &str = "2.3.0";
/// moto 5.2 honours `If-None-Match` and `If-Match` on PutObject.
const MOTO_VERSION: &str = "5.2.5";

/// The venv's python, with the SDK and moto installed (once).
pub(crate) fn venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/vessel-py");
    let python = venv.join("bin/python");
    let have = Command::new(&python)
        .args([
            "-c",
            &format!(
                "import importlib.metadata as m; assert m.version('mcp') == '{MCP_SDK_VERSION}'; assert m.version('moto') == '{MOTO_VERSION}'"
            ),
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv)).context("python3 -m venv")?;
        run(Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("mcp=={MCP_SDK_VERSION}"))
            .arg(format!("moto[server]=={MOTO_VERSION}")))
        .context("installing the MCP Python SDK and moto from PyPI")?;
    }
    Ok(python)
}
