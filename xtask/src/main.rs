//! The project's Makefile: `cargo xtask <command>`.
//!
//! It depends on no vessel crate and on nothing that needs a system library,
//! because `setup` is what installs those; everything else runs through
//! `cargo` subprocesses after setup.

mod containerd;
mod image;
mod python;
mod quotafs;
mod registry;
mod rootless;
mod s3;
mod upkeep;
mod util;

use anyhow::{Context, Result, bail};

use util::{cargo, project_root, run};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup   install the system packages the tests need (apt-get, as root)
  image   build the test image local/busybox:latest (docker-save and OCI archives + a storage dir)
  test    setup, image, fmt --check, clippy -D warnings, doc, upkeep checks
          (cargo deny, cargo machete, rust-version) and every test
          (against a private containerd it starts and stops)
  bench   run the criterion benches (extra args go to cargo bench)
  demo    setup, image, then the main job: a short agent-like session on a real workspace";

/// Debian packages the tests need: the runtimes, the test image's busybox,
/// the C library libcontainer links and protoc for containerd-client.
const PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "busybox-static",
    "libseccomp-dev",
    "protobuf-compiler",
    "pkg-config",
    "fuse-overlayfs",
    "zstd",
    // The escape suite's probe is a static C program.
    "gcc",
    "libc6-dev",
    // Vessels' disk quotas are btrfs qgroups: the tests make a btrfs.
    "btrfs-progs",
    // Layers made by another OCI tool, for the tar parity tests.
    "umoci",
    // Registry pulls: TLS through the system's OpenSSL; the tests' registry
    // (plain and with basic auth) and the tools that push to it and race it.
    "libssl-dev",
    "docker-registry",
    "apache2-utils",
    "skopeo",
    // libcontainer's cgroup v2 device rules (eBPF) build libbpf.
    "libelf-dev",
    "zlib1g-dev",
    "make",
    // Rootless mode: newuidmap/newgidmap map a user's subordinate ids.
    "uidmap",
];

/// Feature sets that clippy checks: every backend, and none (a disabled
/// backend must still compile). Tests run with every backend.
const FEATURE_SETS: &[&[&str]] = &[&["--all-features"], &["--no-default-features"]];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        println!("{USAGE}");
        return Ok(());
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "setup" => setup(),
        "image" => image::build().map(|_| ()),
        "test" => test(),
        "bench" => bench(rest),
        "demo" => demo(),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !util::deb_installed(p)).collect();
    if missing.is_empty() {
        println!("setup: all {} packages present", PACKAGES.len());
        return Ok(());
    }
    if !util::is_root() {
        bail!("setup: missing packages {missing:?}; run `cargo xtask setup` as root, or install them with apt-get");
    }
    println!("setup: installing {missing:?}");
    let apt = |args: &[&str]| {
        let mut c = std::process::Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        c
    };
    run(&mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install)?;
    // Debian starts containerd as a service on install; the tests run their
    // own private instance and need no system daemon.
    let still: Vec<&str> = missing.into_iter().filter(|p| !util::deb_installed(p)).collect();
    if !still.is_empty() {
        bail!("setup: apt-get did not install {still:?}");
    }
    Ok(())
}

fn test() -> Result<()> {
    setup()?;
    let image = image::build()?;
    let root = project_root();
    run(cargo(&root).args(["fmt", "--all", "--", "--check"]))?;
    for features in FEATURE_SETS {
        run(cargo(&root)
            .args(["clippy", "--workspace", "--all-targets", "--locked"])
            .args(*features)
            .args(["--", "-D", "warnings"]))?;
    }
    run(cargo(&root)
        .args(["doc", "--workspace", "--no-deps", "--locked", "--all-features"])
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    upkeep::check(&root)?;
    // A backend compiled out must be a typed refusal, not a build error:
    // the runtime's stubs are tested without default features.
    run(cargo(&root).args(["test", "-p", "vessel-runtime", "--lib", "--locked", "--no-default-features"]))?;
    // Build the tests before starting the daemon, so it is up only while they run.
    run(cargo(&root).args(["test", "--workspace", "--locked", "--all-features", "--no-run"]))?;
    let containerd = containerd::Containerd::start()?;
    let quota = quotafs::QuotaFs::start()?;
    let registries = registry::Registries::start()?;
    let python = python::venv(&root)?;
    let s3 = s3::S3Server::start(&python)?;
    let user = rootless::TestUser::ensure()?;
    run(cargo(&root)
        .args(["test", "--workspace", "--locked", "--all-features"])
        .env("VESSEL_MCP_PYTHON", &python)
        .envs(s3.env())
        .envs(user.env())
        .env("VESSEL_TEST_IMAGE_DIR", &image.dir)
        .env("VESSEL_CONTAINERD_ADDRESS", &containerd.address)
        .env("TMPDIR", &quota.tmp)
        .envs(registries.env()))?;
    // Rootless: the facade's core cases, the CLI session and the escape
    // probes again, as an ordinary user.
    let executables = rootless::test_executables(&root, &["--workspace", "--locked", "--all-features"])?;
    let mut env = s3.env();
    env.extend(registries.env());
    user.run_suites(&executables, &image.dir, &env)?;
    drop(user);
    drop(s3);
    drop(registries);
    drop(quota);
    drop(containerd);
    println!("xtask test: all checks passed");
    Ok(())
}

fn bench(rest: &[String]) -> Result<()> {
    setup()?;
    let image = image::build()?;
    let root = project_root();
    // The exec bench compares the containerd backend with `ctr run --rm` on
    // a private daemon, as the tests do.
    let containerd = containerd::Containerd::start()?;
    let quota = quotafs::QuotaFs::start()?;
    let registries = registry::Registries::start()?;
    let s3 = s3::S3Server::start(&python::venv(&root)?)?;
    // The rootless bench's agent runs as the test user.
    let user = rootless::TestUser::ensure()?;
    run(cargo(&root)
        .args(["bench", "-p", "vessel-benches"])
        .args(rest)
        .envs(s3.env())
        .envs(user.env())
        .env("VESSEL_TEST_IMAGE_DIR", &image.dir)
        .env("VESSEL_CONTAINERD_ADDRESS", &containerd.address)
        .env("TMPDIR", &quota.tmp)
        .envs(registries.env()))?;
    drop(user);
    drop(s3);
    drop(registries);
    drop(quota);
    drop(containerd);
    Ok(())
}

fn demo() -> Result<()> {
    // The first command on a fresh machine: it needs busybox-static for the
    // image and libseccomp to build the youki backend.
    setup()?;
    let image = image::build()?;
    let root = project_root();
    // The demo's vessels have disk quotas: its mount root is on a btrfs.
    let quota = quotafs::QuotaFs::start()?;
    run(cargo(&root)
        .args(["run", "--release", "--quiet", "-p", "vessel", "--example", "demo", "--"])
        .arg(&image.storage)
        .arg(image::IMAGE_REF)
        .env("TMPDIR", &quota.tmp))
    .context("the demo failed")
}
