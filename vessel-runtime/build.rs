//! Builds the sandbox agent (`sandbox/agent.c`): a static program, since
//! it runs inside images that need not have a libc (see `src/sandbox`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "sandbox/agent.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("vessel-agent");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-static", "-O2", "-s", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&out)
        .arg(src)
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => panic!(
            "building the sandbox agent ({cc} -static {src}) failed: {other:?}; \
             vessel-runtime needs a C compiler and a static libc (Debian: gcc and libc6-dev)"
        ),
    }
}
