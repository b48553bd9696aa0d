//! The command line's grammar: global options, subcommands and their
//! arguments (clap derive), parsed by `main`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use vessel::QuotaMode;

use crate::{live, parse_quota_mode, parse_size, parse_timeout};

#[derive(Debug, Parser)]
#[command(name = "vessel", version, about = "Containerized, snapshotting workspaces for AI agents")]
pub(crate) struct Cli {
    /// Storage directory (manifests, snapshots, images; default ~/.local/share/vessel/data).
    #[arg(long, global = true, env = "VESSEL_DATA", conflicts_with = "storage")]
    pub(crate) data: Option<PathBuf>,
    /// Storage URL: `s3://bucket/prefix` (AWS_* variables; AWS_ENDPOINT_URL
    /// for an S3-compatible server), `gs://…`, `az://…`, `file:///dir`.
    /// Hosts sharing it share vessels, one host at a time per vessel.
    #[arg(long, global = true, env = "VESSEL_STORAGE")]
    pub(crate) storage: Option<String>,
    /// The name other hosts see on the vessels this one holds (default: the host name).
    #[arg(long, global = true, env = "VESSEL_HOST_NAME")]
    pub(crate) host_name: Option<String>,
    /// Seconds this host's lease outlives its last renewal (default 30).
    #[arg(long, global = true, env = "VESSEL_LEASE_TTL", value_parser = parse_timeout)]
    pub(crate) lease_ttl: Option<Duration>,
    /// Pause a vessel's processes after this many seconds with no command
    /// and no output from them (resumed by the next call); off by default.
    #[arg(long, global = true, env = "VESSEL_IDLE_PAUSE", value_parser = parse_timeout)]
    pub(crate) idle_pause: Option<Duration>,
    /// Resolvers the vessels' resolver asks for the names it allows
    /// (default: this host's /etc/resolv.conf), e.g. 192.0.2.53:53.
    #[arg(long, global = true, env = "VESSEL_DNS", value_delimiter = ',')]
    pub(crate) dns: Vec<std::net::SocketAddr>,
    /// IPv6 for networked vessels (a /127 each of a ULA pool, NAT66); off by
    /// default, as it forwards IPv6 host-wide (see `NetConfig::ipv6_pool`).
    #[arg(
        long,
        global = true,
        env = "VESSEL_IPV6",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    pub(crate) ipv6: bool,
    /// The host address published ports listen on (default 127.0.0.1).
    #[arg(long, global = true, env = "VESSEL_PUBLISH_HOST")]
    pub(crate) publish_host: Option<std::net::IpAddr>,
    /// This host's mount root (mounts, layer cache).
    #[arg(long, global = true, env = "VESSEL_MOUNT_ROOT")]
    pub(crate) mount_root: Option<PathBuf>,
    /// Container runtime.
    #[arg(long, global = true, value_enum, default_value_t = BackendArg::Youki, env = "VESSEL_BACKEND")]
    pub(crate) backend: BackendArg,
    /// containerd's socket (containerd backend).
    #[arg(long, global = true, env = "VESSEL_CONTAINERD_ADDRESS")]
    pub(crate) containerd_address: Option<PathBuf>,
    /// containerd namespace.
    #[arg(long, global = true, default_value = "vessel", env = "VESSEL_NAMESPACE")]
    pub(crate) namespace: String,
    /// Machine-readable output (JSON on stdout).
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Disk quotas of vessels: `auto` enforces them where the mount root can
    /// (btrfs with quotas; see `vessel setup-quota`) and warns where it
    /// cannot, `require` refuses to run without, `off` never checks. As a
    /// boolean (1/0, yes/no, on/off, true/false): on is `require`.
    #[arg(long, global = true, env = "VESSEL_DISK_QUOTA", value_parser = parse_quota_mode, default_value = "auto")]
    pub(crate) disk_quota: QuotaMode,
    /// Same as `--disk-quota off`.
    #[arg(
        long,
        global = true,
        env = "VESSEL_NO_DISK_QUOTA",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    pub(crate) no_disk_quota: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum BackendArg {
    Youki,
    Containerd,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Images in storage.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Create a vessel from an image; prints its id.
    Create(CreateArgs),
    /// List vessels.
    Ls,
    /// Run a command in a vessel; exits with its exit code. With -d, in
    /// the background: prints its process id (see ps, logs, kill, wait).
    Exec(ExecArgs),
    /// Fork a vessel: new vessels that start from one of its snapshots and
    /// share its layers; prints their ids. Without --snapshot, its current
    /// state (snapshotted first; running processes go on, and are not copied).
    Fork(ForkArgs),
    /// What changed in a vessel, as `docker diff`: A added, C changed, D deleted.
    Diff {
        /// Vessel id or name.
        id: String,
        /// Since this snapshot (default: the current one).
        #[arg(long)]
        since: Option<String>,
        /// Up to this snapshot instead of the present state.
        #[arg(long, requires = "since")]
        to: Option<String>,
    },
    /// Delete stored snapshot blobs that no vessel refers to any more (those
    /// a deleted vessel's forks kept, and what a crash left).
    Gc,
    /// A vessel's background processes (started with `exec -d`).
    Ps {
        /// Vessel id or name.
        id: String,
    },
    /// Print a background process's output (stdout and stderr; the last
    /// 1 MiB of each is kept).
    Logs {
        /// Follow the output until the process ends.
        #[arg(short, long)]
        follow: bool,
        /// Vessel id or name.
        id: String,
        /// Process id (from `exec -d` or `ps`).
        process: u64,
    },
    /// Send a signal to a background process and its process group.
    Kill {
        /// Vessel id or name.
        id: String,
        /// Process id.
        process: u64,
        /// Signal name or number.
        #[arg(default_value = "TERM", value_parser = live::parse_signal)]
        signal: i32,
    },
    /// Wait for a background process to end; prints its exit code.
    Wait {
        /// Vessel id or name.
        id: String,
        /// Process id.
        process: u64,
    },
    /// Freeze every process of a vessel (they keep their memory, use no CPU).
    Pause {
        /// Vessel id or name.
        id: String,
    },
    /// Let a paused vessel's processes run again.
    Resume {
        /// Vessel id or name.
        id: String,
    },
    /// Stop a vessel's background processes and close it.
    Stop {
        /// Vessel id or name.
        id: String,
    },
    /// A vessel's network: its policy, address, published ports and what it
    /// refused; with --network/--allow, set a new policy (at once for new
    /// connections of a running vessel).
    Network {
        /// Vessel id or name.
        id: String,
        #[command(flatten)]
        set: NetArgs,
    },
    /// Publish a vessel's TCP port on the host (loopback) and print its
    /// address; the vessel stays open (see `exec -d`) while published.
    Port {
        /// Vessel id or name.
        id: String,
        /// The port inside the vessel.
        #[arg(value_parser = clap::value_parser!(u16).range(1..))]
        port: u16,
        /// Stop publishing it instead.
        #[arg(long)]
        remove: bool,
        /// Seconds the vessel stays open once nothing is published, no
        /// process runs and no command calls.
        #[arg(long, value_parser = parse_timeout, default_value = "300", env = "VESSEL_KEEPER_LINGER")]
        linger: Duration,
    },
    /// Hold a vessel open for background processes (started by `exec -d`).
    #[command(hide = true)]
    Keep {
        /// Vessel id.
        id: String,
        /// Seconds without a running process or a call before it closes the vessel.
        #[arg(long, value_parser = parse_timeout)]
        linger: Duration,
    },
    /// Print a file of a vessel to stdout.
    Read {
        /// Vessel id or name.
        id: String,
        /// Path inside the vessel (relative to its work dir).
        path: String,
    },
    /// Write stdin to a file of a vessel (committed as a snapshot).
    Write {
        /// Vessel id or name.
        id: String,
        /// Path inside the vessel (relative to its work dir).
        path: String,
        /// Permission bits of a new file (octal).
        #[arg(long, default_value = "644")]
        mode: String,
    },
    /// Snapshot a vessel's current state.
    Snapshot {
        /// Vessel id or name.
        id: String,
        /// What the snapshot is.
        #[arg(short, long, default_value = "")]
        message: String,
    },
    /// A vessel's snapshots as a tree.
    Snapshots {
        /// Vessel id or name.
        id: String,
    },
    /// Make a snapshot the vessel's current state.
    Restore {
        /// Vessel id or name.
        id: String,
        /// Snapshot id.
        snapshot: String,
    },
    /// Serve vessel's tools to agents over the Model Context Protocol
    /// (stdio, or streamable HTTP with --http).
    Mcp(McpArgs),
    /// Delete a vessel, or one of its snapshots.
    Rm {
        /// Vessel id or name.
        id: String,
        /// Delete this snapshot instead of the vessel.
        #[arg(long)]
        snapshot: Option<String>,
        /// Stop what runs in the vessel first (a `vessel` command of this
        /// host that has it open is terminated).
        #[arg(short, long, conflicts_with = "snapshot")]
        force: bool,
    },
    /// Give the mount root disk quotas (root): a sparse, loop-mounted btrfs
    /// image with quotas on. Idempotent; prints the /etc/fstab line that
    /// keeps it across reboots.
    SetupQuota(SetupQuotaArgs),
    /// Print a shell completion script (e.g. `vessel completion bash >
    /// /etc/bash_completion.d/vessel`).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `vessel setup-quota`'s options.
#[derive(Debug, clap::Args)]
pub(crate) struct SetupQuotaArgs {
    /// Size of the filesystem (sparse: it takes only what vessels write).
    #[arg(long, value_parser = parse_size, default_value = "64g")]
    pub(crate) size: u64,
    /// The image file (default: beside the mount root, `<mount root>.btrfs`).
    #[arg(long)]
    pub(crate) image: Option<PathBuf>,
    /// Unmount it instead (the image file stays unless --delete-image).
    #[arg(long)]
    pub(crate) remove: bool,
    /// With --remove: delete the image file too (every cached layer in it goes).
    #[arg(long, requires = "remove")]
    pub(crate) delete_image: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ImageCommand {
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
pub(crate) struct CreateArgs {
    /// Image reference, e.g. local/busybox:latest.
    pub(crate) image: String,
    /// A name for the vessel, usable wherever its id is (unique per storage).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Default directory for relative paths and commands.
    #[arg(long, default_value = "/work")]
    pub(crate) work_dir: String,
    #[command(flatten)]
    pub(crate) limits: LimitArgs,
    #[command(flatten)]
    pub(crate) network: NetArgs,
}

/// A network policy, as `create` and `network` take it.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct NetArgs {
    /// What the vessel's commands may reach: none (loopback only), allow
    /// (only what --allow lists) or open (public egress; never the host,
    /// private, link-local or other vessels' addresses unless --allow
    /// re-allows a range). --allow alone means allow.
    #[arg(long, value_parser = ["none", "allow", "open"])]
    pub(crate) network: Option<String>,
    /// A destination: a domain (github.com, *.pypi.org), an address or
    /// CIDR, optionally with a port (10.1.2.0/24:443). Repeatable.
    #[arg(long = "allow", value_name = "RULE")]
    pub(crate) allow: Vec<String>,
}

impl NetArgs {
    /// The policy asked for, if any (typed refusal of a bad rule).
    pub(crate) fn policy(&self) -> vessel::Result<Option<vessel::NetworkPolicy>> {
        let mode = match (&self.network, self.allow.is_empty()) {
            (Some(m), _) => m.as_str(),
            (None, false) => "allow",
            (None, true) => return Ok(None),
        };
        let rules = self.allow.iter().map(|r| r.parse()).collect::<Result<Vec<vessel::AllowRule>, _>>()?;
        Ok(Some(vessel::NetworkPolicy::from_parts(mode, rules)?))
    }
}

/// A vessel's limits, as `create` takes them (and `fork`, which may only
/// narrow its source's).
#[derive(Debug, clap::Args)]
pub(crate) struct LimitArgs {
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

/// `vessel fork`'s arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct ForkArgs {
    /// Vessel id or name.
    pub(crate) id: String,
    /// The snapshot to fork (default: the vessel's current state).
    #[arg(long)]
    pub(crate) snapshot: Option<String>,
    /// How many vessels to make.
    #[arg(short = 'n', long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub(crate) count: u16,
    /// A name for the new vessel (with -n 1 only).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Limits, each at most the source's.
    #[command(flatten)]
    pub(crate) limits: LimitArgs,
}

/// `vessel exec`'s arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct ExecArgs {
    /// Run in the background (its changes are the vessel's, as with
    /// --persist, and committed by the next snapshot); prints its process id.
    #[arg(short = 'd', long, conflicts_with_all = ["tty", "interactive", "persist"])]
    pub(crate) detach: bool,
    /// With -d: seconds the vessel stays open once no process runs and no
    /// command calls (ended processes' statuses are kept until then).
    #[arg(long, value_parser = parse_timeout, default_value = "300", env = "VESSEL_KEEPER_LINGER", requires = "detach")]
    pub(crate) linger: Duration,
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
    /// Vessel id or name.
    pub(crate) id: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub(crate) command: Vec<String>,
}

/// `vessel mcp`'s options.
#[derive(Debug, clap::Args)]
pub(crate) struct McpArgs {
    /// Serve streamable HTTP on this loopback address (e.g. 127.0.0.1:8931)
    /// instead of stdio; clients send `Authorization: Bearer <token>`.
    #[arg(long)]
    pub(crate) http: Option<std::net::SocketAddr>,
    /// The bearer token's file (mode 600). Without it and VESSEL_MCP_TOKEN,
    /// a random token is made and printed to stderr.
    #[arg(long, requires = "http")]
    pub(crate) token_file: Option<PathBuf>,
    /// Bytes of stdout, and of stderr, an exec returns (its start and end).
    #[arg(long, value_parser = parse_size, default_value = "64k")]
    pub(crate) max_output: u64,
    /// Bytes a read_file returns at most.
    #[arg(long, value_parser = parse_size, default_value = "1m")]
    pub(crate) max_read: u64,
    /// Seconds an exec may run when the call names no timeout.
    #[arg(long, value_parser = parse_timeout, default_value = "300")]
    pub(crate) exec_timeout: Duration,
}
