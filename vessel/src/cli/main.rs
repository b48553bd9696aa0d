//! `vessel`: the command-line tool over [`vessel::Manager`].
//!
//! Each invocation opens what it needs and closes it again. Only snapshots
//! are durable (see the crate docs), so the commands that change a vessel
//! (`write`, `exec --persist`) commit a snapshot of their change; `exec`
//! without `--persist` changes nothing.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncRead;
mod mcp;

use vessel::{
    Backend, CompressedStorage, ExecOptions, LocalStorage, Manager, ManagerConfig, SnapshotId, SnapshotManifest,
    Vessel, VesselManifest, VesselOptions,
};

#[derive(Debug, Parser)]
#[command(name = "vessel", version, about = "Containerized, snapshotting workspaces for AI agents")]
struct Cli {
    /// Storage directory (manifests, snapshots, images; default ~/.local/share/vessel/data).
    #[arg(long, global = true, env = "VESSEL_DATA")]
    data: Option<PathBuf>,
    /// This host's mount root (mounts, layer cache).
    #[arg(long, global = true, env = "VESSEL_MOUNT_ROOT")]
    mount_root: Option<PathBuf>,
    /// Container runtime.
    #[arg(long, global = true, value_enum, default_value_t = BackendArg::Youki, env = "VESSEL_BACKEND")]
    backend: BackendArg,
    /// containerd's socket (containerd backend).
    #[arg(long, global = true, env = "VESSEL_CONTAINERD_ADDRESS")]
    containerd_address: Option<PathBuf>,
    /// containerd namespace.
    #[arg(long, global = true, default_value = "vessel")]
    namespace: String,
    /// Machine-readable output (JSON on stdout).
    #[arg(long, global = true)]
    json: bool,
    /// Run without disk quotas (needed where the mount root is not btrfs
    /// with quotas enabled).
    #[arg(long, global = true, env = "VESSEL_NO_DISK_QUOTA")]
    no_disk_quota: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendArg {
    Youki,
    Containerd,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Images in storage.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Create a vessel from an image; prints its id.
    Create {
        /// Image reference, e.g. local/busybox:latest.
        image: String,
        /// Default directory for relative paths and commands.
        #[arg(long, default_value = "/work")]
        work_dir: String,
        /// Memory of each command (bytes, or with k/m/g/t), e.g. 512m.
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        /// CPUs of each command, e.g. 0.5.
        #[arg(long)]
        cpus: Option<f64>,
        /// Processes and threads of each command.
        #[arg(long)]
        pids: Option<i64>,
        /// What the vessel may write to disk (bytes, or with k/m/g/t), e.g. 2g.
        #[arg(long, value_parser = parse_size)]
        disk: Option<u64>,
    },
    /// List vessels.
    Ls,
    /// Run a command in a vessel; exits with its exit code.
    Exec {
        /// Run on a terminal (stdin attached).
        #[arg(short = 't', long)]
        tty: bool,
        /// Attach stdin.
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Keep the command's changes (committed as a snapshot).
        #[arg(long)]
        persist: bool,
        /// Working directory inside the vessel.
        #[arg(short = 'w', long)]
        work_dir: Option<String>,
        /// `KEY=VALUE` environment (repeatable).
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        /// Kill the command after this many seconds (exit 137, `timed_out` in --json).
        #[arg(long, value_parser = parse_timeout)]
        timeout: Option<Duration>,
        /// Vessel id.
        id: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a file of a vessel to stdout.
    Read {
        /// Vessel id.
        id: String,
        /// Path inside the vessel (relative to its work dir).
        path: String,
    },
    /// Write stdin to a file of a vessel (committed as a snapshot).
    Write {
        /// Vessel id.
        id: String,
        /// Path inside the vessel (relative to its work dir).
        path: String,
        /// Permission bits of a new file (octal).
        #[arg(long, default_value = "644")]
        mode: String,
    },
    /// Snapshot a vessel's current state.
    Snapshot {
        /// Vessel id.
        id: String,
        /// What the snapshot is.
        #[arg(short, long, default_value = "")]
        message: String,
    },
    /// A vessel's snapshots as a tree.
    Snapshots {
        /// Vessel id.
        id: String,
    },
    /// Make a snapshot the vessel's current state.
    Restore {
        /// Vessel id.
        id: String,
        /// Snapshot id.
        snapshot: String,
    },
    /// Serve vessel's tools to agents over the Model Context Protocol
    /// (stdio, or streamable HTTP with --http).
    Mcp(McpArgs),
    /// Delete a vessel, or one of its snapshots.
    Rm {
        /// Vessel id.
        id: String,
        /// Delete this snapshot instead of the vessel.
        #[arg(long)]
        snapshot: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import an image archive (docker save or OCI layout; plain, gzip or zstd).
    Import {
        /// The archive file.
        archive: PathBuf,
        /// The reference to store it as.
        reference: String,
    },
    /// Pull an image from a registry into storage (loopback registries over
    /// plain HTTP; credentials from docker's config.json or the options).
    Pull {
        /// The reference, e.g. localhost:5000/team/app:v1.
        reference: String,
        /// User name for the registry (with --password-stdin).
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the password from stdin.
        #[arg(long)]
        password_stdin: bool,
        /// Reach this registry over plain HTTP.
        #[arg(long)]
        insecure: bool,
    },
    /// List the images in storage.
    Ls,
}

/// `vessel mcp`'s options.
#[derive(Debug, clap::Args)]
struct McpArgs {
    /// Serve streamable HTTP on this loopback address (e.g. 127.0.0.1:8931)
    /// instead of stdio; clients send `Authorization: Bearer <token>`.
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// The bearer token's file (mode 600). Without it and VESSEL_MCP_TOKEN,
    /// a random token is made and printed to stderr.
    #[arg(long, requires = "http")]
    token_file: Option<PathBuf>,
    /// Bytes of stdout, and of stderr, an exec returns (its start and end).
    #[arg(long, value_parser = parse_size, default_value = "64k")]
    max_output: u64,
    /// Bytes a read_file returns at most.
    #[arg(long, value_parser = parse_size, default_value = "1m")]
    max_read: u64,
    /// Seconds an exec may run when the call names no timeout.
    #[arg(long, value_parser = parse_timeout, default_value = "300")]
    exec_timeout: Duration,
}

fn main() -> ExitCode {
    // Containers run in re-executed copies of this program: before any thread.
    vessel::runtime::init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vessel: cannot start the async runtime: {e}");
            return ExitCode::from(125);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vessel: {e:#}");
            // As docker: 127 when the command is not found, 126 when it
            // cannot be executed, 125 for an error of the tool itself.
            let start = e.chain().find_map(|c| match c.downcast_ref::<vessel::VesselError>() {
                Some(vessel::VesselError::Runtime(vessel::runtime::RuntimeError::Exec { failure, .. })) => {
                    Some(failure.exit_code())
                }
                _ => None,
            });
            ExitCode::from(start.and_then(|c| u8::try_from(c).ok()).unwrap_or(125))
        }
    }
}

/// Bytes, with an optional binary suffix (k, m, g, t; a trailing `b` or
/// `ib` is fine), as docker's `--memory`.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("ib").or_else(|| t.strip_suffix('b')).unwrap_or(&t);
    let (digits, shift) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 10),
        Some('m') => (&t[..t.len() - 1], 20),
        Some('g') => (&t[..t.len() - 1], 30),
        Some('t') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size (e.g. 512m, 2g)"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

/// A vessel's limits as `create` (and `vessel mcp`'s `create_vessel`) take
/// them: bytes, CPUs, processes, bytes. Bad values are refused by
/// `create_vessel_with` with the other limits (0 or NaN CPUs there too).
fn vessel_options(memory: Option<u64>, cpus: Option<f64>, pids: Option<i64>, disk: Option<u64>) -> VesselOptions {
    let mut opts = VesselOptions::new();
    if let Some(m) = memory {
        opts = opts.memory_bytes(i64::try_from(m).unwrap_or(i64::MAX));
    }
    if let Some(c) = cpus {
        let us = if c.is_finite() { (c * 100_000.0).round() as i64 } else { 0 };
        opts = opts.cpu_quota_us(us);
    }
    if let Some(p) = pids {
        opts = opts.pids(p);
    }
    if let Some(d) = disk {
        opts = opts.disk_bytes(d);
    }
    opts
}

/// Seconds (fractions allowed), more than zero.
fn parse_timeout(s: &str) -> std::result::Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("the timeout must be more than 0 seconds, not {s}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

fn spinner(msg: String) -> ProgressBar {
    let pb = ProgressBar::new_spinner().with_message(msg);
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("a valid template"));
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn manager(cli: &Cli) -> Result<Manager> {
    let mut config = ManagerConfig::default().namespace(cli.namespace.clone());
    if let Some(data) = &cli.data {
        let local = LocalStorage::new(data).with_context(|| format!("opening the storage at {}", data.display()))?;
        config = config.storage(CompressedStorage::new(local));
    }
    config = config.backend(match cli.backend {
        BackendArg::Youki => Backend::Youki,
        BackendArg::Containerd => Backend::Containerd,
    });
    if let Some(root) = &cli.mount_root {
        config = config.mount_root(root);
    }
    if let Some(a) = &cli.containerd_address {
        config = config.containerd_address(a);
    }
    if cli.no_disk_quota {
        config = config.disk_quota(None);
    }
    if let Command::Image(ImageCommand::Pull { reference, username, password_stdin, insecure }) = &cli.command {
        let registry = vessel::registry::registry_of(reference)?;
        if let (Some(user), true) = (username, password_stdin) {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password).context("reading the password from stdin")?;
            let password = password.trim_end_matches(['\n', '\r']).to_owned();
            config = config.registry_auth(registry.clone(), vessel::RegistryAuth::Basic(user.clone(), password));
        }
        if *insecure {
            config = config.insecure_registry(registry);
        }
    }
    Ok(Manager::new(config).await?)
}

/// A reader of `file` that moves a progress bar.
struct Progress<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: AsyncRead + Unpin> AsyncRead for Progress<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.bar.inc(n as u64);
        r
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let mgr = Arc::new(manager(&cli).await?);
    let result = command(&cli, &mgr).await;
    mgr.close().await?;
    result
}

async fn open(mgr: &Manager, id: &str) -> Result<Vessel> {
    let pb = spinner(format!("opening vessel {id}"));
    let v = mgr.open_vessel(id).await.with_context(|| format!("cannot open vessel {id}"));
    pb.finish_and_clear();
    v
}

async fn commit(v: &Vessel, message: String, json: bool) -> Result<SnapshotManifest> {
    let pb = spinner(format!("snapshot {message:?}"));
    let snap = v.create_snapshot(&message).await?;
    pb.finish_and_clear();
    if !json {
        eprintln!("snapshot {} ({} B)", snap.id, snap.size);
    }
    Ok(snap)
}

async fn command(cli: &Cli, mgr: &Arc<Manager>) -> Result<ExitCode> {
    match &cli.command {
        Command::Mcp(a) => {
            let transport = match a.http {
                None => mcp::Transport::Stdio,
                Some(addr) => mcp::Transport::Http { addr, token: mcp::token(a.token_file.as_deref())? },
            };
            let options = mcp::Options {
                max_output: usize::try_from(a.max_output).unwrap_or(usize::MAX),
                max_read: a.max_read,
                exec_timeout: a.exec_timeout,
            };
            mcp::serve(mgr.clone(), options, transport).await?;
        }
        Command::Image(ImageCommand::Pull { reference, .. }) => {
            let bar = ProgressBar::new(0).with_message(format!("pulling {reference}"));
            bar.set_style(
                ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} ({bytes_per_sec})")
                    .expect("a valid template"),
            );
            let b = bar.clone();
            let pulled = mgr
                .pull_image_with(reference, move |p| {
                    b.set_length(p.total);
                    b.set_position(p.done);
                })
                .await?;
            bar.finish_and_clear();
            if cli.json {
                print_json(&serde_json::json!({
                    "reference": pulled.reference, "manifest_digest": pulled.manifest_digest,
                    "bytes": pulled.bytes, "layers": pulled.layers,
                }))?;
            } else {
                println!("{reference}");
            }
        }
        Command::Image(ImageCommand::Import { archive, reference }) => {
            let file =
                tokio::fs::File::open(archive).await.with_context(|| format!("opening {}", archive.display()))?;
            let size = file.metadata().await?.len();
            let bar = ProgressBar::new(size).with_message(format!("importing {reference}"));
            bar.set_style(
                ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} ({bytes_per_sec})")
                    .expect("a valid template"),
            );
            mgr.import_image(reference, Box::new(Progress { inner: file, bar: bar.clone() })).await?;
            bar.finish_and_clear();
            if cli.json {
                print_json(&serde_json::json!({ "reference": reference, "bytes": size }))?;
            } else {
                println!("{reference}");
            }
        }
        Command::Image(ImageCommand::Ls) => {
            let images: Vec<String> = mgr.storage().list_images().await?.iter().map(|i| i.to_string()).collect();
            if cli.json {
                print_json(&images)?;
            } else {
                images.iter().for_each(|i| println!("{i}"));
            }
        }
        Command::Create { image, work_dir, memory, cpus, pids, disk } => {
            let opts = vessel_options(*memory, *cpus, *pids, *disk);
            let pb = spinner(format!("creating a vessel from {image}"));
            let v = mgr.create_vessel_with(image, work_dir, &opts).await?;
            // The initial state (image + work dir) is the vessel's first snapshot.
            v.create_snapshot("create").await?;
            pb.finish_and_clear();
            if cli.json {
                print_json(&v.manifest())?;
            } else {
                println!("{}", v.id());
            }
            v.close().await?;
        }
        Command::Ls => {
            let vessels = mgr.list_vessels().await?;
            if cli.json {
                print_json(&vessels)?;
            } else {
                println!("{:<18} {:<30} {:<18} {:>9}  UPDATED", "ID", "IMAGE", "CURRENT", "SNAPSHOTS");
                for m in vessels {
                    println!(
                        "{:<18} {:<30} {:<18} {:>9}  {}",
                        m.id.as_str(),
                        m.base_image_ref.as_str(),
                        m.current_snapshot_id.as_ref().map_or("-", |s| s.as_str()),
                        m.snapshots.len(),
                        m.update_time.format("%Y-%m-%d %H:%M:%S")
                    );
                }
            }
        }
        Command::Exec { tty, interactive, persist, work_dir, env, timeout, id, command } => {
            let v = open(mgr, id).await?;
            let stdin: Option<Box<dyn AsyncRead + Send + Unpin>> =
                (*tty || *interactive).then(|| Box::new(tokio::io::stdin()) as _);
            let res = v
                .exec(ExecOptions {
                    command: command.clone(),
                    work_dir: work_dir.clone(),
                    env: env.clone(),
                    stdin,
                    stdout: Some(Box::new(tokio::io::stdout())),
                    stderr: Some(Box::new(tokio::io::stderr())),
                    tty: *tty,
                    persist_result: *persist,
                    timeout: *timeout,
                    ..Default::default()
                })
                .await?;
            if *persist {
                commit(&v, format!("exec {}", command.join(" ")), cli.json).await?;
            }
            v.close().await?;
            if cli.json {
                print_json(
                    &serde_json::json!({ "exit_code": res.exit_code, "timed_out": res.timed_out, "oom_killed": res.oom_killed }),
                )?;
            }
            return Ok(ExitCode::from(u8::try_from(res.exit_code).unwrap_or(255)));
        }
        Command::Read { id, path } => {
            let v = open(mgr, id).await?;
            let data = v.read_file(path);
            v.close().await?;
            std::io::stdout().write_all(&data?)?;
        }
        Command::Write { id, path, mode } => {
            let mode = u32::from_str_radix(mode, 8).with_context(|| format!("--mode {mode:?} is not octal"))?;
            let mut data = Vec::new();
            if std::io::stdin().is_terminal() {
                bail!("write reads the file's content from stdin: pipe or redirect it");
            }
            std::io::stdin().read_to_end(&mut data)?;
            let v = open(mgr, id).await?;
            v.write_file(path, &data, mode)?;
            let snap = commit(&v, format!("write {path}"), cli.json).await?;
            v.close().await?;
            if cli.json {
                print_json(&snap)?;
            }
        }
        Command::Snapshot { id, message } => {
            let v = open(mgr, id).await?;
            let snap = commit(&v, message.clone(), true).await?;
            v.close().await?;
            if cli.json {
                print_json(&snap)?;
            } else {
                println!("{}", snap.id);
            }
        }
        Command::Snapshots { id } => {
            let v = open(mgr, id).await?;
            let m = v.manifest();
            v.close().await?;
            if cli.json {
                print_json(&m.snapshots)?;
            } else {
                print_tree(&m);
            }
        }
        Command::Restore { id, snapshot } => {
            let snapshot = SnapshotId::new(snapshot)?;
            let v = open(mgr, id).await?;
            let pb = spinner(format!("restoring {snapshot}"));
            let restored = v.restore_snapshot(&snapshot).await;
            pb.finish_and_clear();
            v.close().await?;
            restored?;
            if cli.json {
                print_json(&serde_json::json!({ "id": id, "currentSnapshotId": snapshot }))?;
            }
        }
        Command::Rm { id, snapshot: Some(snapshot) } => {
            let snapshot = SnapshotId::new(snapshot)?;
            let v = open(mgr, id).await?;
            let deleted = v.delete_snapshot(&snapshot).await;
            v.close().await?;
            deleted?;
        }
        Command::Rm { id, snapshot: None } => {
            mgr.delete_vessel(id).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_tree(m: &VesselManifest) {
    for (depth, s) in m.tree() {
        let current = if m.current_snapshot_id.as_ref() == Some(&s.id) { "  <- current" } else { "" };
        println!(
            "{}{} {} {:?} ({} B){current}",
            "  ".repeat(depth),
            s.id,
            s.create_time.format("%Y-%m-%d %H:%M:%S"),
            s.message,
            s.size
        );
    }
}
