//! The official MCP Python SDK, in a venv under `target/`, for the `vessel
//! mcp` tests: an MCP client vessel did not write.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::util::run;

/// The SDK's version; pinned so a release on PyPI cannot change the tests.
const MCP_SDK_VERSION: &str = "2.3.0";

/// The venv's python, with the SDK installed (once).
pub(crate) fn mcp_sdk(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/vessel-py");
    let python = venv.join("bin/python");
    let have = Command::new(&python)
        .args(["-c", &format!("import importlib.metadata as m; assert m.version('mcp') == '{MCP_SDK_VERSION}'")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv)).context("python3 -m venv")?;
        run(Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("mcp=={MCP_SDK_VERSION}")))
        .context("installing the MCP Python SDK from PyPI")?;
    }
    Ok(python)
}
