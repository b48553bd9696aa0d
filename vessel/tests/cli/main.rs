//! The `vessel` command line, run as a user would: a whole session through
//! the built binary (youki backend; containerd too when
//! `VESSEL_CONTAINERD_ADDRESS` names a daemon), checking output, JSON, exit
//! codes and errors. Each command is its own process, so this also proves
//! that the state that matters lives in storage.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, ensure};
use libtest_mimic::{Arguments, Failed, Trial};
use vessel_test_support as support;

mod live;

#[derive(Clone)]
struct Session {
    data: PathBuf,
    mounts: PathBuf,
    backend: &'static str,
    address: Option<PathBuf>,
}

impl Session {
    fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
        let mut cmd = Command::new(vessel_bin());
        cmd.arg("--data").arg(&self.data).arg("--mount-root").arg(&self.mounts).args([
            "--backend",
            self.backend,
            "--namespace",
            &format!("vessel-cli-{}", std::process::id()),
        ]);
        if let Some(a) = &self.address {
            cmd.arg("--containerd-address").arg(a);
        }
        cmd.args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let Some(input) = stdin {
            child.stdin.take().context("stdin")?.write_all(input)?;
        }
        Ok(child.wait_with_output()?)
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String> {
        let out = self.run(args, stdin)?;
        ensure!(out.status.success(), "vessel {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    }
}

/// The `vessel` binary: cargo's, or a copy an ordinary user can reach
/// (`VESSEL_CLI_BIN`, for the rootless run).
fn vessel_bin() -> std::ffi::OsString {
    std::env::var_os("VESSEL_CLI_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_vessel").into())
}

fn main() {
    vessel::init();
    let args = Arguments::from_args();
    let Some(image_dir) = support::root_with_test_image("cli") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut backends: Vec<(&'static str, Option<PathBuf>)> = vec![("youki", None)];
    let namespace = format!("vessel-cli-{}", std::process::id());
    // containerd rootless is a typed refusal (the facade suite).
    if cfg!(feature = "containerd")
        && !vessel::runtime::rootless::mode().is_rootless()
        && let Some(a) = support::required_env("cli", "VESSEL_CONTAINERD_ADDRESS")
    {
        backends.push(("containerd", Some(PathBuf::from(a))));
    }
    let containerd: Vec<(PathBuf, String)> =
        backends.iter().filter_map(|(_, a)| a.clone()).map(|a| (a, namespace.clone())).collect();
    let mut trials = backends
        .into_iter()
        .flat_map(|(backend, address)| {
            let s = Session {
                data: tmp.path().join(backend).join("data"),
                mounts: tmp.path().join(backend).join("mounts"),
                backend,
                address,
            };
            let image = image_dir.join("busybox-oci.tar");
            let live = Session {
                data: s.data.with_file_name("live-data"),
                mounts: s.mounts.with_file_name("live-mounts"),
                ..s.clone()
            };
            let forks = Session {
                data: s.data.with_file_name("forks-data"),
                mounts: s.mounts.with_file_name("forks-mounts"),
                ..s.clone()
            };
            let stranger = Session {
                data: s.data.with_file_name("stranger-data"),
                mounts: s.mounts.with_file_name("stranger-mounts"),
                ..s.clone()
            };
            let (image2, image3, image4) = (image.clone(), image.clone(), image.clone());
            let mut t = vec![
                Trial::test(format!("{backend}::a_whole_session"), move || {
                    a_whole_session(&s, &image).map_err(|e| Failed::from(format!("{e:#}")))
                }),
                Trial::test(format!("{backend}::background_processes"), move || {
                    live::background_processes(&live, &image2).map_err(|e| Failed::from(format!("{e:#}")))
                }),
                Trial::test(format!("{backend}::forks_and_diff"), move || {
                    live::forks_and_diff(&forks, &image4).map_err(|e| Failed::from(format!("{e:#}")))
                }),
            ];
            // Another user is needed: root's run only.
            if !vessel::runtime::rootless::mode().is_rootless() {
                t.push(Trial::test(format!("{backend}::a_stranger_cannot_call_a_keeper"), move || {
                    live::a_stranger_cannot_call_a_keeper(&stranger, &image3)
                        .map_err(|e| Failed::from(format!("{e:#}")))
                }));
            }
            t
        })
        .collect::<Vec<_>>();
    // Backend-independent: once.
    if !vessel::runtime::rootless::mode().is_rootless() {
        // On the project's own disk (ext4 here, as on most machines), not
        // on the btrfs `cargo xtask test` gives TMPDIR.
        let ext4 = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{}", std::process::id()));
        let (first, image) = (ext4.join("first"), image_dir.join("busybox-oci.tar"));
        trials.push(Trial::test("first_contact_on_a_disk_without_quotas", move || {
            let r = first_contact_on_a_disk_without_quotas(&first, &image);
            let _ = std::fs::remove_dir_all(&first);
            r.map_err(|e| Failed::from(format!("{e:#}")))
        }));
        let (sq, image) = (ext4.join("setup-quota"), image_dir.join("busybox-oci.tar"));
        trials.push(Trial::test("setup_quota_gives_a_mount_root_quotas", move || {
            let r = setup_quota_gives_a_mount_root_quotas(&sq, &image);
            let _ = std::fs::remove_dir_all(&sq);
            r.map_err(|e| Failed::from(format!("{e:#}")))
        }));
    }
    let big = Session {
        data: tmp.path().join("big/data"),
        mounts: tmp.path().join("big/mounts"),
        backend: "youki",
        address: None,
    };
    let scratch = tmp.path().join("big");
    trials.push(Trial::test("a_2_gib_image_imports_in_bounded_memory", move || {
        a_2_gib_image_imports_in_bounded_memory(&big, &scratch).map_err(|e| Failed::from(format!("{e:#}")))
    }));
    if let Some(url) = support::required_env("cli", "VESSEL_S3_URL") {
        let (dir, image) = (tmp.path().join("s3"), image_dir.join("busybox-oci.tar"));
        let url = format!("{}/cli-{:016x}", url.to_string_lossy(), std::process::id());
        trials.push(Trial::test("storage_by_url", move || {
            storage_by_url(&url, &dir, &image).map_err(|e| Failed::from(format!("{e:#}")))
        }));
    }
    let conclusion = libtest_mimic::run(&args, trials);
    let mut leaks = support::suite::leaks(tmp.path(), &containerd);
    leaks.push(("keepers", support::processes_with_arg("keep").iter().map(i32::to_string).collect()));
    support::finish(&tmp.keep(), &leaks, conclusion)
}

fn a_whole_session(s: &Session, image: &Path) -> Result<()> {
    let image = image.to_str().context("utf-8 path")?;
    ensure!(s.ok(&["image", "import", image, "local/busybox:latest"], None)?.trim() == "local/busybox:latest");
    let images: Vec<String> = serde_json::from_str(&s.ok(&["image", "ls", "--json"], None)?)?;
    ensure!(images == ["local/busybox:latest"], "{images:?}");

    let id = s.ok(&["create", "local/busybox:latest"], None)?.trim().to_owned();
    ensure!(id.len() == 16, "create printed {id:?}");
    let ls = s.ok(&["ls"], None)?;
    ensure!(ls.lines().count() == 2 && ls.contains(&id), "{ls}");

    // write (stdin in) and read (file out), across processes.
    s.ok(&["exec", "--persist", &id, "--", "mkdir", "-p", "notes"], None)?;
    s.ok(&["write", &id, "notes/hello.txt"], Some(b"hello from stdin\n"))?;
    ensure!(s.ok(&["read", &id, "notes/hello.txt"], None)? == "hello from stdin\n");

    // exec streams stdio and returns the exit code; --persist keeps changes.
    let out = s.run(&["exec", &id, "--", "sh", "-c", "cat notes/hello.txt; echo oops >&2; exit 7"], None)?;
    ensure!(out.status.code() == Some(7), "{}", out.status);
    ensure!(out.stdout == b"hello from stdin\n" && out.stderr == b"oops\n", "{out:?}");
    let out = s.run(&["exec", "-i", &id, "--", "sh", "-c", "tr a-z A-Z > up.txt; cat up.txt"], Some(b"shout\n"))?;
    ensure!(out.status.success() && out.stdout == b"SHOUT\n", "{out:?}");
    ensure!(s.run(&["read", &id, "up.txt"], None)?.status.code() == Some(125), "a throwaway exec left a file");
    // --timeout kills the command: 137, and --json says it timed out.
    let out = s.run(&["--json", "exec", "--timeout", "0.5", &id, "--", "sleep", "100"], None)?;
    ensure!(out.status.code() == Some(137), "a timed-out exec: {out:?}");
    let said: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(said["timed_out"] == true && said["exit_code"] == 137, "{said}");
    let out = s.run(&["exec", "--timeout", "0", &id, "--", "true"], None)?;
    ensure!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("more than 0"), "{out:?}");
    if vessel::runtime::rootless::mode().is_rootless() {
        // Rootless: no disk quota; cgroup limits only in a subtree
        // delegated to the user. A disk quota asked for is refused; limits
        // that cannot hold are said not to apply.
        let out = s.run(&["create", "--disk", "32m", "local/busybox:latest"], None)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(125) && err.contains("runs without"), "{out:?}");
        let out = s.run(&["create", "--memory", "48m", "local/busybox:latest"], None)?;
        let err = String::from_utf8_lossy(&out.stderr);
        let small = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if vessel::runtime::rootless::delegated_cgroups().is_ok() {
            ensure!(out.status.success() && !err.contains("Memory limit"), "{out:?}");
            let out = s.run(&["--json", "exec", &small, "--", "tail", "/dev/zero"], None)?;
            let said: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            ensure!(out.status.code() == Some(137) && said["oom_killed"] == true, "{said}");
        } else {
            ensure!(out.status.success() && err.contains("Memory limit is not applied here: rootless"), "{out:?}");
        }
        s.ok(&["rm", &small], None)?;
    } else {
        // Limits at create: the memory hog is OOM-killed, --json says so; the
        // disk filler hits the quota; a bad limit is vessel's own error (125).
        let small = s
            .ok(
                &[
                    "create",
                    "--memory",
                    "48m",
                    "--cpus",
                    "0.5",
                    "--pids",
                    "64",
                    "--disk",
                    "32m",
                    "local/busybox:latest",
                ],
                None,
            )?
            .trim()
            .to_owned();
        let out = s.run(&["--json", "exec", &small, "--", "tail", "/dev/zero"], None)?;
        let said: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        ensure!(out.status.code() == Some(137) && said["oom_killed"] == true && said["timed_out"] == false, "{said}");
        let out = s.run(&["exec", &small, "--", "dd", "if=/dev/zero", "of=/work/big", "bs=1M", "count=100"], None)?;
        ensure!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Disk quota exceeded"),
            "{out:?}"
        );
        s.ok(&["rm", &small], None)?;
    }
    for bad in [&["--memory", "0"][..], &["--cpus", "0"], &["--pids=-1"], &["--disk", "1k"]] {
        let mut args = vec!["create"];
        args.extend_from_slice(bad);
        args.push("local/busybox:latest");
        let out = s.run(&args, None)?;
        ensure!(
            out.status.code() == Some(125) && String::from_utf8_lossy(&out.stderr).contains("invalid"),
            "{bad:?}: {out:?}"
        );
    }
    // image pull from the test registry (when `cargo xtask test` runs one).
    if let Ok(registry) = std::env::var("VESSEL_REGISTRY") {
        let src = format!("oci-archive:{}", image.trim_start_matches("oci-archive:"));
        let dest = format!("{registry}/cli-{}/busybox:latest", s.backend);
        let pushed = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false", &src, &format!("docker://{dest}")])
            .output()?;
        ensure!(pushed.status.success(), "skopeo: {}", String::from_utf8_lossy(&pushed.stderr));
        let said: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "image", "pull", &dest], None)?)?;
        ensure!(said["layers"] == 1 && said["reference"] == dest.as_str(), "{said}");
        let pulled = s.ok(&["create", &dest], None)?.trim().to_owned();
        ensure!(s.ok(&["exec", &pulled, "--", "echo", "pulled"], None)? == "pulled\n");
        let out = s.run(&["image", "pull", &format!("{registry}/cli-{}/none:latest", s.backend)], None)?;
        ensure!(
            out.status.code() == Some(125) && String::from_utf8_lossy(&out.stderr).contains("not found"),
            "{out:?}"
        );
        s.ok(&["rm", &pulled], None)?;
    } else {
        ensure!(std::env::var_os("CI").is_none(), "VESSEL_REGISTRY is unset under CI");
    }
    // docker's exit codes: 127 no such command, 126 not executable.
    let out = s.run(&["exec", &id, "--", "/no/such/command"], None)?;
    ensure!(out.status.code() == Some(127), "a missing command: {out:?}");
    let out = s.run(&["exec", &id, "--", "/etc/passwd"], None)?;
    ensure!(out.status.code() == Some(126), "a file that is not executable: {out:?}");
    s.ok(&["exec", "--persist", &id, "--", "sh", "-c", "echo kept > kept.txt"], None)?;
    ensure!(s.ok(&["read", &id, "kept.txt"], None)? == "kept\n");

    // snapshot, tree, restore, fork, rm of a snapshot.
    let snap = s.ok(&["snapshot", &id, "-m", "checkpoint"], None)?.trim().to_owned();
    s.ok(&["exec", "--persist", &id, "--", "rm", "kept.txt"], None)?;
    s.ok(&["restore", &id, &snap], None)?;
    ensure!(s.ok(&["read", &id, "kept.txt"], None)? == "kept\n");
    s.ok(&["write", &id, "branch.txt"], Some(b"b\n"))?;
    let tree = s.ok(&["snapshots", &id], None)?;
    ensure!(tree.contains("\"checkpoint\"") && tree.contains("<- current"), "{tree}");
    ensure!(
        tree.lines().any(|l| l.starts_with("  ") && l.contains("write branch.txt")),
        "a branch is indented: {tree}"
    );
    let snaps: Vec<serde_json::Value> = serde_json::from_str(&s.ok(&["snapshots", &id, "--json"], None)?)?;
    let removed = snaps.iter().find(|v| v["message"] == "exec rm kept.txt").context("the rm snapshot")?;
    s.ok(&["rm", &id, "--snapshot", removed["snapshot_id"].as_str().unwrap()], None)?;
    let out = s.run(&["rm", &id, "--snapshot", &snap], None)?;
    ensure!(out.status.code() == Some(125), "deleting a parent: {out:?}");
    ensure!(String::from_utf8_lossy(&out.stderr).contains("parent"), "{out:?}");

    // Useful errors.
    let out = s.run(&["read", "00000000deadbeef", "x"], None)?;
    ensure!(out.status.code() == Some(125) && String::from_utf8_lossy(&out.stderr).contains("not found"), "{out:?}");
    let out = s.run(&["create", "local/none:latest"], None)?;
    ensure!(out.status.code() == Some(125) && String::from_utf8_lossy(&out.stderr).contains("not found"), "{out:?}");

    let vessels: Vec<serde_json::Value> = serde_json::from_str(&s.ok(&["ls", "--json"], None)?)?;
    ensure!(vessels.len() == 1 && vessels[0]["vessel_id"] == id.as_str());
    // One view of a vessel: the MCP server's field names.
    for field in ["name", "image", "work_dir", "current_snapshot_id", "snapshots", "created", "updated", "holder"] {
        ensure!(vessels[0].get(field).is_some(), "ls --json lacks {field}: {}", vessels[0]);
    }
    s.ok(&["rm", &id], None)?;
    ensure!(s.ok(&["ls", "--json"], None)?.trim() == "[]");
    Ok(())
}

/// The bytes of a one-file layer tar (`big`, `size` bytes of a repeated
/// random MiB), hashed as they are read.
struct BigLayer {
    header: Vec<u8>,
    chunk: Vec<u8>,
    size: u64,
    pos: u64,
    total: u64,
    hasher: std::rc::Rc<std::cell::RefCell<sha2::Sha256>>,
}

impl std::io::Read for BigLayer {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        if self.pos >= self.total {
            return Ok(0);
        }
        let hdr = self.header.len() as u64;
        let n = if self.pos < hdr {
            let n = buf.len().min((hdr - self.pos) as usize);
            buf[..n].copy_from_slice(&self.header[self.pos as usize..self.pos as usize + n]);
            n
        } else if self.pos < hdr + self.size {
            let off = ((self.pos - hdr) % self.chunk.len() as u64) as usize;
            let n = buf.len().min(self.chunk.len() - off).min((hdr + self.size - self.pos) as usize);
            buf[..n].copy_from_slice(&self.chunk[off..off + n]);
            n
        } else {
            let n = buf.len().min((self.total - self.pos) as usize);
            buf[..n].fill(0);
            n
        };
        self.hasher.borrow_mut().update(&buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

/// A docker-save archive with one layer of `size` bytes, written in one pass
/// (the layer first, then the config naming its digest, then the manifest).
fn big_archive(path: &Path, size: u64) -> Result<()> {
    use sha2::Digest;
    let mut h = tar::Header::new_ustar();
    h.set_path("big")?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    let hasher = std::rc::Rc::new(std::cell::RefCell::new(sha2::Sha256::new()));
    let total = 512 + size.div_ceil(512) * 512 + 1024;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let layer = BigLayer { header: h.as_bytes().to_vec(), chunk, size, pos: 0, total, hasher: hasher.clone() };
    let mut out = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(path)?));
    let add = |out: &mut tar::Builder<_>, name: &str, len: u64, data: &mut dyn std::io::Read| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(len);
        h.set_mode(0o644);
        out.append_data(&mut h, name, data)?;
        Ok(())
    };
    add(&mut out, "layer/layer.tar", total, &mut { layer })?;
    let diff_id = format!("sha256:{:x}", hasher.borrow().clone().finalize());
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch, "os": "linux", "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))?;
    add(&mut out, "config.json", config.len() as u64, &mut &config[..])?;
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": "config.json", "RepoTags": ["local/big:latest"], "Layers": ["layer/layer.tar"]}
    ]))?;
    add(&mut out, "manifest.json", manifest.len() as u64, &mut &manifest[..])?;
    out.into_inner()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// Imports an archive of over 2 GiB through the CLI and measures the
/// importing process's peak RSS (Python's `getrusage` of its only child).
fn a_2_gib_image_imports_in_bounded_memory(s: &Session, scratch: &Path) -> Result<()> {
    std::fs::create_dir_all(scratch)?;
    let archive = scratch.join("big.tar");
    let size = (2u64 << 30) + 12345;
    big_archive(&archive, size)?;
    ensure!(std::fs::metadata(&archive)?.len() > 2 << 30);
    let (data, mounts, archive_arg) =
        (s.data.display().to_string(), s.mounts.display().to_string(), archive.display().to_string());
    let bin = vessel_bin().to_string_lossy().into_owned();
    let cmd =
        [bin.as_str(), "--data", &data, "--mount-root", &mounts, "image", "import", &archive_arg, "local/big:latest"];
    let script = "import resource, subprocess, sys\n\
                  r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n\
                  print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n";
    let out = Command::new("python3").arg("-c").arg(script).args(cmd).output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let mut fields = text.split_whitespace();
    let (code, kib): (i32, u64) = (fields.next().context("code")?.parse()?, fields.next().context("rss")?.parse()?);
    ensure!(code == 0, "vessel image import exited {code}");
    println!("importing a {} MiB archive: peak RSS {} MiB", std::fs::metadata(&archive)?.len() >> 20, kib >> 10);
    ensure!(kib < 200 << 10, "peak RSS {kib} KiB for a 2 GiB archive: the import is not streaming");
    let images: Vec<String> = serde_json::from_str(&s.ok(&["image", "ls", "--json"], None)?)?;
    ensure!(images == ["local/big:latest"], "{images:?}");
    std::fs::remove_dir_all(scratch)?;
    Ok(())
}

/// `--storage URL` (here the tests' S3 server): a session on it, `ls`
/// naming the host that holds a vessel, and bad URLs, a missing bucket and
/// refused credentials failing before anything is created.
fn storage_by_url(url: &str, dir: &Path, image: &Path) -> Result<()> {
    let run = |storage: &str, mounts: &Path, args: &[&str], env: &[(&str, &str)]| -> Result<Output> {
        Ok(Command::new(vessel_bin())
            .args(["--storage", storage, "--mount-root"])
            .arg(mounts)
            .args(["--no-disk-quota", "--host-name", "cli-host"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()?)
    };
    let ok = |args: &[&str]| -> Result<String> {
        let out = run(url, &dir.join("mounts"), args, &[])?;
        ensure!(out.status.success(), "vessel {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    };
    ok(&["image", "import", image.to_str().context("utf-8")?, "local/busybox:latest"])?;
    let id = ok(&["create", "local/busybox:latest"])?.trim().to_owned();
    ok(&["exec", "--persist", &id, "--", "sh", "-c", "echo kept > /kept"])?;
    ok(&["snapshot", &id, "-m", "one"])?;
    ensure!(ok(&["read", &id, "/kept"])? == "kept\n");
    // While a command runs, the vessel is held, by this host name.
    let mut held = Command::new(vessel_bin())
        .args(["--storage", url, "--mount-root"])
        .arg(dir.join("mounts"))
        .args(["--no-disk-quota", "--host-name", "cli-host", "exec", &id, "--", "sleep", "30"])
        .stdin(Stdio::null())
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let ls = loop {
        let ls = ok(&["ls"])?;
        if ls.contains("cli-host") || std::time::Instant::now() > deadline {
            break ls;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    ensure!(ls.lines().nth(1).is_some_and(|l| l.contains(&id) && l.contains("cli-host")), "{ls}");
    let busy = run(url, &dir.join("mounts-b"), &["exec", &id, "--", "true"], &[])?;
    ensure!(!busy.status.success() && String::from_utf8_lossy(&busy.stderr).contains("cli-host"), "{busy:?}");
    held.kill()?;
    held.wait()?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&ok(&["ls", "--json"])?)?;
    ensure!(rows.len() == 1 && rows[0]["vessel_id"] == id.as_str(), "{rows:?}");

    let never = dir.join("never-created");
    // (storage URL, environment, what the error says)
    type Bad<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let bad: [Bad<'_>; 4] = [
        ("ftp://host/x", &[], "unknown scheme"),
        ("s3://no-such-bucket-vessel-cli/p", &[], "does not exist"),
        (url, &[("AWS_SECRET_ACCESS_KEY", "wrong")], "access denied"),
        ("relative/dir", &[], "invalid storage URL"),
    ];
    for (storage, env, says) in bad {
        let out = run(storage, &never, &["ls"], env)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success() && err.contains(says), "{storage}: {err}");
        ensure!(!never.exists(), "{storage}: the mount root was created");
    }
    Ok(())
}

fn stderr(out: &Output) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(&out.stderr)
}

/// A new user's first session, on a mount root on a filesystem without
/// quotas (ext4), with the default settings: it works, the quota warning
/// comes once (at create, naming what to do), `--disk-quota require`
/// refuses naming CLI flags and changes nothing, and commands that create
/// no vessel never check quotas. Then what a docker user expects: names,
/// `-e`/`-w`, docker's words for a missing command, every boolean
/// spelling of the quota variables, `--version`, completions, `rm -f`.
fn first_contact_on_a_disk_without_quotas(dir: &Path, image: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let fs_type = String::from_utf8(Command::new("stat").args(["-f", "-c", "%T"]).arg(dir).output()?.stdout)?;
    ensure!(fs_type.trim() != "btrfs", "the session without quotas runs on {fs_type}");
    let s = Session { data: dir.join("data"), mounts: dir.join("mounts"), backend: "youki", address: None };
    let image = image.to_str().context("utf-8 path")?;
    let with_env = |env: &[(&str, &str)], args: &[&str]| -> Result<Output> {
        let mut cmd = Command::new(vessel_bin());
        cmd.arg("--data").arg(&s.data).arg("--mount-root").arg(&s.mounts).args(args).envs(env.iter().copied());
        Ok(cmd.stdin(Stdio::null()).output()?)
    };

    let version = s.ok(&["--version"], None)?;
    ensure!(version.trim() == format!("vessel {}", env!("CARGO_PKG_VERSION")), "{version}");
    for (shell, says) in [("bash", "_vessel()"), ("zsh", "#compdef vessel"), ("fish", "complete -c vessel")] {
        let script = s.ok(&["completion", shell], None)?;
        ensure!(script.contains(says) && script.contains("setup-quota"), "{shell} completion: {}", &script[..200]);
    }

    // Commands that create no vessel never check quotas, even when required.
    for args in
        [&["--disk-quota", "require", "image", "import", image, "local/busybox:latest"][..], &["image", "ls"], &["ls"]]
    {
        let out = s.run(args, None)?;
        ensure!(out.status.success() && !stderr(&out).to_lowercase().contains("quota"), "{args:?}: {out:?}");
    }
    // Required, creating is refused in the CLI's words, and nothing is made.
    let out = s.run(&["--disk-quota", "require", "create", "local/busybox:latest"], None)?;
    let err = stderr(&out);
    ensure!(out.status.code() == Some(125), "{out:?}");
    ensure!(
        err.contains("not on btrfs") && err.contains("vessel setup-quota") && err.contains("--disk-quota"),
        "{err}"
    );
    ensure!(!err.contains("ManagerConfig") && !err.contains("disk_quota("), "a Rust API named to a CLI user: {err}");
    ensure!(s.ok(&["ls", "--json"], None)?.trim() == "[]", "a refused create left a vessel");

    // The default: it works, and says once what it cannot enforce and how to.
    let out = s.run(&["create", "--name", "web", "local/busybox:latest"], None)?;
    let err = stderr(&out);
    ensure!(out.status.success(), "{out:?}");
    ensure!(err.matches("Disk limit is not applied here").count() == 1 && err.contains("vessel setup-quota"), "{err}");
    let id = String::from_utf8(out.stdout)?.trim().to_owned();
    let ls = s.ok(&["ls"], None)?;
    ensure!(ls.lines().nth(1).is_some_and(|l| l.contains(&id) && l.contains(" web ")), "{ls}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&s.ok(&["ls", "--json"], None)?)?;
    ensure!(rows.len() == 1 && rows[0]["name"] == "web", "{rows:?}");
    // Names wherever an id goes; -e and -w as docker exec's.
    let out =
        s.run(&["exec", "-e", "GREETING=hi", "-w", "/tmp", "web", "--", "sh", "-c", "echo $GREETING from $PWD"], None)?;
    ensure!(out.status.success() && out.stdout == b"hi from /tmp\n", "{out:?}");
    ensure!(!stderr(&out).contains("quota"), "exec repeats the quota warning: {out:?}");
    s.ok(&["write", "web", "note.txt"], Some(b"by name\n"))?;
    ensure!(s.ok(&["read", &id, "note.txt"], None)? == "by name\n");
    // docker's words and exit codes for a command that cannot start.
    let out = s.run(&["exec", "web", "--", "nosuchcmd"], None)?;
    ensure!(out.status.code() == Some(127), "{out:?}");
    ensure!(stderr(&out).trim() == r#"vessel: exec: "nosuchcmd": executable file not found in $PATH"#, "{out:?}");
    let out = s.run(&["exec", "web", "--", "/etc/passwd"], None)?;
    ensure!(
        out.status.code() == Some(126) && stderr(&out).contains(r#"exec: "/etc/passwd": permission denied"#),
        "{out:?}"
    );
    // Bad names: taken, shaped like an id, malformed; nothing created.
    for (name, says) in [("web", "already in use"), ("0123456789abcdef", "shape of a vessel id"), ("-x", "must start")]
    {
        let out = s.run(&["create", &format!("--name={name}"), "local/busybox:latest"], None)?;
        ensure!(out.status.code() == Some(125) && stderr(&out).contains(says), "{name}: {out:?}");
    }
    let out = s.run(&["exec", "nobody-has-this", "--", "true"], None)?;
    ensure!(out.status.code() == Some(125) && stderr(&out).contains("no vessel is named"), "{out:?}");
    ensure!(serde_json::from_str::<Vec<serde_json::Value>>(&s.ok(&["ls", "--json"], None)?)?.len() == 1);

    // Every spelling of a boolean, and the modes, in the environment.
    let warns = |env: &[(&str, &str)]| -> Result<Option<bool>> {
        let out = with_env(env, &["create", "local/busybox:latest"])?;
        if !out.status.success() {
            ensure!(out.status.code() == Some(125) && stderr(&out).contains("not on btrfs"), "{env:?}: {out:?}");
            return Ok(None);
        }
        let made = String::from_utf8(out.stdout.clone())?;
        ensure!(with_env(&[], &["rm", made.trim()])?.status.success());
        Ok(Some(stderr(&out).contains("Disk limit is not applied")))
    };
    for on in ["1", "yes", "on", "true", "TRUE", "Yes"] {
        ensure!(warns(&[("VESSEL_NO_DISK_QUOTA", on)])? == Some(false), "VESSEL_NO_DISK_QUOTA={on}");
        ensure!(warns(&[("VESSEL_DISK_QUOTA", on)])?.is_none(), "VESSEL_DISK_QUOTA={on} (require)");
    }
    for off in ["0", "no", "off", "false", "FALSE"] {
        ensure!(warns(&[("VESSEL_NO_DISK_QUOTA", off)])? == Some(true), "VESSEL_NO_DISK_QUOTA={off}");
        ensure!(warns(&[("VESSEL_DISK_QUOTA", off)])? == Some(false), "VESSEL_DISK_QUOTA={off}");
    }
    ensure!(warns(&[("VESSEL_DISK_QUOTA", "auto")])? == Some(true));
    ensure!(warns(&[("VESSEL_DISK_QUOTA", "require")])?.is_none());
    for (var, bad) in [("VESSEL_NO_DISK_QUOTA", "maybe"), ("VESSEL_DISK_QUOTA", "sometimes")] {
        let out = with_env(&[(var, bad)], &["ls"])?;
        ensure!(out.status.code() == Some(2) && stderr(&out).contains(bad), "{var}={bad}: {out:?}");
    }

    // rm -f stops the command that has the vessel open, then deletes it.
    let mut held = Command::new(vessel_bin())
        .arg("--data")
        .arg(&s.data)
        .arg("--mount-root")
        .arg(&s.mounts)
        .args(["exec", "web", "--", "sleep", "60"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let rows: Vec<serde_json::Value> = serde_json::from_str(&s.ok(&["ls", "--json"], None)?)?;
        if !rows[0]["holder"].is_null() {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "the exec never opened the vessel");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = s.run(&["rm", "web"], None)?;
    ensure!(out.status.code() == Some(125) && stderr(&out).contains("rm -f"), "rm of a held vessel: {out:?}");
    let started = std::time::Instant::now();
    let out = s.run(&["rm", "-f", "web"], None)?;
    ensure!(out.status.success(), "rm -f: {out:?}");
    ensure!(started.elapsed() < std::time::Duration::from_secs(15), "rm -f took {:?}", started.elapsed());
    let status = held.wait()?;
    ensure!(status.code() == Some(143), "the stopped exec: {status}");
    ensure!(s.ok(&["ls", "--json"], None)?.trim() == "[]");
    ensure!(support::mounts_under(dir).is_empty(), "mounts left: {:?}", support::mounts_under(dir));
    Ok(())
}

/// Loop devices backed by `image` (`losetup -j`).
fn loops_of(image: &Path) -> Result<String> {
    let out = Command::new("losetup").arg("-j").arg(image).output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// `vessel setup-quota` on a fresh mount root on ext4: afterwards quotas
/// are enforced (`--disk-quota require` starts, a disk filler stops at its
/// quota); a second run changes nothing; `--remove` and a new run mount the
/// same image again (as after a reboot); removed with its image, no mount
/// and no loop device is left.
fn setup_quota_gives_a_mount_root_quotas(dir: &Path, image: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let s = Session { data: dir.join("data"), mounts: dir.join("mounts"), backend: "youki", address: None };
    let img = dir.join("mounts.btrfs");
    let cleanup = || {
        let _ = Command::new("umount").arg(&s.mounts).stderr(Stdio::null()).status();
        let _ = std::fs::remove_file(&img);
    };
    let r = (|| -> Result<()> {
        let said = s.ok(&["setup-quota", "--size", "4g"], None)?;
        ensure!(
            said.contains("now enforces disk quotas")
                && said.contains("/etc/fstab")
                && said.contains(" btrfs loop,discard 0 0"),
            "{said}"
        );
        ensure!(img.exists() && std::fs::metadata(&img)?.len() == 4 << 30, "the image");
        use std::os::unix::fs::MetadataExt;
        ensure!(std::fs::metadata(&img)?.blocks() * 512 < 512 << 20, "the image is not sparse");
        let mounts = support::mounts_under(&s.mounts);
        ensure!(mounts.len() == 1, "{mounts:?}");
        let again = s.ok(&["setup-quota", "--size", "4g"], None)?;
        ensure!(again.contains("nothing changed"), "{again}");
        ensure!(support::mounts_under(&s.mounts) == mounts, "a second run changed the mounts");

        s.ok(&["image", "import", image.to_str().context("utf-8")?, "local/busybox:latest"], None)?;
        let out = s.run(
            &["--disk-quota", "require", "create", "--disk", "32m", "--name", "filler", "local/busybox:latest"],
            None,
        )?;
        ensure!(out.status.success() && !stderr(&out).contains("not applied"), "{out:?}");
        let out = s.run(&["exec", "filler", "--", "dd", "if=/dev/zero", "of=/work/big", "bs=1M", "count=100"], None)?;
        ensure!(!out.status.success() && stderr(&out).contains("Disk quota exceeded"), "{out:?}");
        s.ok(&["rm", "filler"], None)?;

        // As after a reboot: unmounted, the image kept; set up again, remounted.
        s.ok(&["setup-quota", "--remove"], None)?;
        ensure!(support::mounts_under(&s.mounts).is_empty() && img.exists() && loops_of(&img)?.is_empty());
        let said = s.ok(&["setup-quota"], None)?;
        ensure!(said.contains("again"), "{said}");
        ensure!(s.ok(&["--disk-quota", "require", "ls"], None)?.contains("ID"));
        s.ok(&["setup-quota", "--remove", "--delete-image"], None)?;
        ensure!(support::mounts_under(&s.mounts).is_empty(), "still mounted");
        ensure!(!img.exists(), "the image was kept");
        ensure!(loops_of(&img)?.is_empty(), "a loop device is left: {}", loops_of(&img)?);
        // Bad input: too small; an image inside the mount root; a mount root that holds other files.
        let out = s.run(&["setup-quota", "--size", "100m"], None)?;
        ensure!(out.status.code() == Some(125) && stderr(&out).contains("too small"), "{out:?}");
        let inside = s.mounts.join("x.img");
        let out = s.run(&["setup-quota", "--image", inside.to_str().unwrap()], None)?;
        ensure!(out.status.code() == Some(125) && stderr(&out).contains("inside the mount root"), "{out:?}");
        std::fs::create_dir_all(&s.mounts)?;
        std::fs::write(s.mounts.join("precious.txt"), b"mine")?;
        let out = s.run(&["setup-quota"], None)?;
        ensure!(out.status.code() == Some(125) && stderr(&out).contains("precious.txt"), "{out:?}");
        ensure!(
            std::fs::read(s.mounts.join("precious.txt"))? == b"mine" && !img.exists(),
            "a refused setup changed things"
        );
        Ok(())
    })();
    cleanup();
    r
}
