//! `vessel`: the command-line tool over [`vessel::Manager`].
//!
//! Each invocation opens what it needs and closes it again. Only snapshots
//! are durable (see the crate docs), so the commands that change a vessel
//! (`write`, `exec --persist`) commit a snapshot of their change; `exec`
//! without `--persist` changes nothing.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
mod commands;
mod mcp;

use vessel::{Backend, CompressedStorage, LocalStorage, Manager, ManagerConfig, VesselOptions};

#[derive(Debug, Parser)]
#[command(name = "vessel", version, about = "Containerized, snapshotting workspaces for AI agents")]
struct Cli {
    /// Storage directory (manifests, snapshots, images; default ~/.local/share/vessel/data).
    #[arg(long, global = true, env = "VESSEL_DATA", conflicts_with = "storage")]
    data: Option<PathBuf>,
    /// Storage URL: `s3://bucket/prefix` (AWS_* variables; AWS_ENDPOINT_URL
    /// for an S3-compatible server), `gs://…`, `az://…`, `file:///dir`.
    /// Hosts sharing it share vessels, one host at a time per vessel.
    #[arg(long, global = true, env = "VESSEL_STORAGE")]
    storage: Option<String>,
    /// The name other hosts see on the vessels this one holds (default: the host name).
    #[arg(long, global = true, env = "VESSEL_HOST_NAME")]
    host_name: Option<String>,
    /// Seconds this host's lease outlives its last renewal (default 30).
    #[arg(long, global = true, env = "VESSEL_LEASE_TTL", value_parser = parse_timeout)]
    lease_ttl: Option<Duration>,
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
    Create(CreateArgs),
    /// List vessels.
    Ls,
    /// Run a command in a vessel; exits with its exit code.
    Exec(ExecArgs),
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

/// `vessel create`'s arguments.
#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Image reference, e.g. local/busybox:latest.
    pub(crate) image: String,
    /// Default directory for relative paths and commands.
    #[arg(long, default_value = "/work")]
    pub(crate) work_dir: String,
    /// Memory of each command (bytes, or with k/m/g/t), e.g. 512m.
    #[arg(long, value_parser = parse_size)]
    pub(crate) memory: Option<u64>,
    /// CPUs of each command, e.g. 0.5.
    #[arg(long)]
    pub(crate) cpus: Option<f64>,
    /// Processes and threads of each command.
    #[arg(long)]
    pub(crate) pids: Option<i64>,
    /// What the vessel may write to disk (bytes, or with k/m/g/t), e.g. 2g.
    #[arg(long, value_parser = parse_size)]
    pub(crate) disk: Option<u64>,
}

/// `vessel exec`'s arguments.
#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// Run on a terminal (stdin attached).
    #[arg(short = 't', long)]
    pub(crate) tty: bool,
    /// Attach stdin.
    #[arg(short = 'i', long)]
    pub(crate) interactive: bool,
    /// Keep the command's changes (committed as a snapshot).
    #[arg(long)]
    pub(crate) persist: bool,
    /// Working directory inside the vessel.
    #[arg(short = 'w', long)]
    pub(crate) work_dir: Option<String>,
    /// `KEY=VALUE` environment (repeatable).
    #[arg(short = 'e', long = "env")]
    pub(crate) env: Vec<String>,
    /// Kill the command after this many seconds (exit 137, `timed_out` in --json).
    #[arg(long, value_parser = parse_timeout)]
    pub(crate) timeout: Option<Duration>,
    /// Vessel id.
    pub(crate) id: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub(crate) command: Vec<String>,
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

async fn manager(cli: &Cli) -> Result<Manager> {
    let mut config = ManagerConfig::default().namespace(cli.namespace.clone());
    if let Some(data) = &cli.data {
        let local = LocalStorage::new(data).with_context(|| format!("opening the storage at {}", data.display()))?;
        config = config.storage(CompressedStorage::new(local));
    }
    if let Some(url) = &cli.storage {
        config = config.shared_storage(vessel::open_url(url).await?);
    }
    if let Some(name) = &cli.host_name {
        config = config.host_name(name.clone());
    }
    if let Some(ttl) = cli.lease_ttl {
        config = config.lease_ttl(ttl);
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

async fn run(cli: Cli) -> Result<ExitCode> {
    let mgr = Arc::new(manager(&cli).await?);
    let result = command(&cli, &mgr).await;
    mgr.close().await?;
    result
}

async fn command(cli: &Cli, mgr: &Arc<Manager>) -> Result<ExitCode> {
    let json = cli.json;
    match &cli.command {
        Command::Mcp(a) => serve_mcp(mgr, a).await?,
        Command::Image(ImageCommand::Pull { reference, .. }) => commands::image_pull(mgr, reference, json).await?,
        Command::Image(ImageCommand::Import { archive, reference }) => {
            commands::image_import(mgr, archive, reference, json).await?
        }
        Command::Image(ImageCommand::Ls) => commands::image_ls(mgr, json).await?,
        Command::Create(a) => commands::create(mgr, a, json).await?,
        Command::Ls => commands::ls(mgr, json).await?,
        Command::Exec(a) => return commands::exec(mgr, a, json).await,
        Command::Read { id, path } => commands::read(mgr, id, path).await?,
        Command::Write { id, path, mode } => commands::write(mgr, id, path, mode, json).await?,
        Command::Snapshot { id, message } => commands::snapshot(mgr, id, message, json).await?,
        Command::Snapshots { id } => commands::snapshots(mgr, id, json).await?,
        Command::Restore { id, snapshot } => commands::restore(mgr, id, snapshot, json).await?,
        Command::Rm { id, snapshot } => commands::rm(mgr, id, snapshot.as_deref()).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve_mcp(mgr: &Arc<Manager>, a: &McpArgs) -> Result<()> {
    let transport = match a.http {
        None => mcp::Transport::Stdio,
        Some(addr) => mcp::Transport::Http { addr, token: mcp::token(a.token_file.as_deref())? },
    };
    let options = mcp::Options {
        max_output: usize::try_from(a.max_output).unwrap_or(usize::MAX),
        max_read: a.max_read,
        exec_timeout: a.exec_timeout,
    };
    mcp::serve(mgr.clone(), options, transport).await
}
