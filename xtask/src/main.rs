//! The project's Makefile: `cargo xtask <command>`.
//!
//! It depends on no vessel crate and on nothing that needs a system library,
//! because `setup` is what installs those; everything else runs through
//! `cargo` subprocesses after setup.

mod containerd;
mod fakenet;
mod image;
mod python;
mod quotafs;
mod registry;
mod rootless;
mod s3;
mod tidy;
mod upkeep;
mod util;

use anyhow::{Context, Result, bail};

use util::{cargo, project_root, run};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup   install the system packages the tests need (apt-get, as root)
  image   build the test image local/busybox:latest (docker-save and OCI archives + a storage dir)
  test    setup, image, fmt --check, tidy, clippy -D warnings, doc, upkeep checks
          (cargo deny, cargo machete, rust-version) and every test
          (against a private containerd it starts and stops)
  bench   run the criterion benches (extra args go to cargo bench)
  demo    setup, image, then the main job: a short agent-like session on a real workspace
  fakenet start the network suite's fake internet and keep it up (prints its env)
  soak    [--cycles N] [--seed S] [--case NAME]: the fault campaign (kill -9, S3 cuts,
          full disks, paused hosts) against a real S3 server, N cycles (default 200);
          `--case soak_local_quota` on local storage and btrfs quotas; `test` runs short ones";

/// Debian packages the demo needs: the test image's busybox, the C
/// libraries the youki backend builds against (libseccomp; libbpf, built
/// from source, for cgroup v2 device rules; OpenSSL), btrfs-progs for its quota
/// filesystem, and mold, the linker `.cargo/cc` uses when it is there.
const DEMO_PACKAGES: &[&str] = &[
    "busybox-static",
    "libseccomp-dev",
    "pkg-config",
    // Registry pulls use the system's TLS (oci-client's native-tls).
    "libssl-dev",
    "libelf-dev",
    "zlib1g-dev",
    "make",
    "gcc",
    "libc6-dev",
    "btrfs-progs",
    "mold",
];

/// Debian packages the tests need besides: the runtimes, protoc for
/// containerd-client, and the tools and servers the suites drive.
const PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    // The live bench's `crun exec` baseline.
    "crun",
    "protobuf-compiler",
    "fuse-overlayfs",
    "zstd",
    // Layers made by another OCI tool, for the tar parity tests.
    "umoci",
    // The tests' registry (plain and with basic auth) and the tools that
    // push to it and race it.
    "docker-registry",
    "apache2-utils",
    "skopeo",
    // Rootless mode: newuidmap/newgidmap map a user's subordinate ids.
    "uidmap",
    // Vessel networks: nft for their filters, pasta for rootless ones; the
    // fake internet's namespaces (ip) and its resolver (dnsmasq).
    "nftables",
    "passt",
    "iproute2",
    "dnsmasq-base",
];

/// What clippy checks: the workspace with every feature; the workspace
/// without default features (the members then ask for what they need:
/// the demo the youki backend alone, the benches both backends); and the
/// library crates alone without default features, so with no backend at
/// all (a disabled backend must still compile, to typed refusals). Tests
/// run with every feature.
const CLIPPY_SETS: &[&[&str]] = &[
    &["--workspace", "--all-features"],
    &["--workspace", "--no-default-features"],
    &["-p", "vessel-runtime", "-p", "vessel", "--no-default-features"],
];

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
        "soak" => soak(rest),
        "fakenet" => {
            setup()?;
            let net = fakenet::FakeNet::start(&project_root().join("target"))?;
            for (k, v) in net.env() {
                println!("export {k}={v}");
            }
            println!("fakenet: up until this command is interrupted");
            loop {
                std::thread::park();
            }
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

fn setup() -> Result<()> {
    let all: Vec<&str> = DEMO_PACKAGES.iter().chain(PACKAGES).copied().collect();
    install(&all)
}

/// Installs the Debian packages of `packages` that are missing.
fn install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !util::deb_installed(p)).collect();
    if missing.is_empty() {
        println!("setup: all {} packages present", packages.len());
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

/// The wall-clock time of each step of `cargo xtask test`, printed as a
/// table at the end (and after a failure, up to it), so that a speed-up
/// that drops a check shows, and so does the next slowdown.
#[derive(Default)]
struct Phases(Vec<(String, std::time::Duration)>);

impl Phases {
    fn time<T>(&mut self, name: impl Into<String>, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = std::time::Instant::now();
        let out = f();
        let name = name.into();
        self.0.push((if out.is_ok() { name } else { format!("{name} (failed)") }, started.elapsed()));
        out
    }

    fn print(&self) {
        let total: std::time::Duration = self.0.iter().map(|(_, d)| *d).sum();
        println!("\nxtask test: time per phase");
        for (name, d) in &self.0 {
            println!("  {name:<58} {:>7.1} s", d.as_secs_f64());
        }
        println!("  {:<58} {:>7.1} s", "total", total.as_secs_f64());
    }
}

fn test() -> Result<()> {
    let mut phases = Phases::default();
    let result = test_phases(&mut phases);
    phases.print();
    result
}

fn test_phases(p: &mut Phases) -> Result<()> {
    p.time("setup (apt-get)", setup)?;
    let image = p.time("test image", image::build)?;
    let root = project_root();
    p.time("fmt --check", || run(cargo(&root).args(["fmt", "--all", "--", "--check"])))?;
    p.time("tidy (file-size budget)", || tidy::check(&root))?;
    for set in CLIPPY_SETS {
        p.time(format!("clippy {}", set.join(" ")), || {
            run(cargo(&root).args(["clippy", "--all-targets", "--locked"]).args(*set).args(["--", "-D", "warnings"]))
        })?;
    }
    p.time("doc --all-features", || {
        run(cargo(&root)
            .args(["doc", "--workspace", "--no-deps", "--locked", "--all-features"])
            .env("RUSTDOCFLAGS", "-D warnings"))
    })?;
    upkeep::check(&root, p)?;
    // Build the tests before starting the daemon, so it is up only while
    // they run. One test build: the runtime's stubs for compiled-out
    // backends are unit-tested in it too (clippy --no-default-features
    // checks they are what a build without the features picks).
    p.time("build tests (--all-features)", || {
        run(cargo(&root).args(["test", "--workspace", "--locked", "--all-features", "--no-run"]))
    })?;
    let (containerd, quota, registries, python, s3, user, fakenet) = p.time("start servers", || {
        let containerd = containerd::Containerd::start()?;
        let quota = quotafs::QuotaFs::start()?;
        let registries = registry::Registries::start()?;
        let python = python::venv(&root)?;
        let s3 = s3::S3Server::start(&python)?;
        let user = rootless::TestUser::ensure()?;
        let fakenet = fakenet::FakeNet::start(&root.join("target"))?;
        Ok((containerd, quota, registries, python, s3, user, fakenet))
    })?;
    p.time("tests (root)", || {
        run(cargo(&root)
            .args(["test", "--workspace", "--locked", "--all-features"])
            .env("VESSEL_MCP_PYTHON", &python)
            .envs(s3.env())
            .envs(user.env())
            .env("VESSEL_TEST_IMAGE_DIR", &image.dir)
            .env("VESSEL_CONTAINERD_ADDRESS", &containerd.address)
            .envs(fakenet.env())
            .env("TMPDIR", &quota.tmp)
            .envs(registries.env()))
    })?;
    // Rootless: the facade's core cases, the CLI session and the escape
    // probes again, as an ordinary user.
    p.time("tests (rootless, as a user)", || {
        let executables = rootless::test_executables(&root, &["--workspace", "--locked", "--all-features"])?;
        let mut env = s3.env();
        env.extend(registries.env());
        env.extend(fakenet.env());
        user.run_suites(&executables, &image.dir, &env)
    })?;
    p.time("stop servers", || {
        drop(fakenet);
        drop(user);
        drop(s3);
        drop(registries);
        drop(quota);
        drop(containerd);
        Ok(())
    })?;
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

/// `cargo xtask soak [--cycles N] [--seed S] [--case NAME]`: the hosts
/// suite's `soak` case (or `NAME`) alone, long, against moto.
fn soak(rest: &[String]) -> Result<()> {
    let mut env = vec![("VESSEL_SOAK_CYCLES", "200".to_owned())];
    let mut case = "soak".to_owned();
    let mut args = rest.iter();
    while let Some(a) = args.next() {
        let key = match a.as_str() {
            "--cycles" => "VESSEL_SOAK_CYCLES",
            "--seed" => "VESSEL_SOAK_SEED",
            // Another case of the hosts suite, with the same servers.
            "--case" => {
                case = args.next().context("soak: --case needs a name")?.clone();
                continue;
            }
            other => bail!("soak: unknown argument {other:?} (--cycles N, --seed S, --case NAME)"),
        };
        let value = args.next().with_context(|| format!("soak: {a} needs a value"))?;
        env.retain(|(k, _)| *k != key);
        env.push((key, value.clone()));
    }
    setup()?;
    let image = image::build()?;
    let root = project_root();
    let python = python::venv(&root)?;
    let s3 = s3::S3Server::start(&python)?;
    run(cargo(&root)
        .args(["test", "--locked", "-p", "vessel", "--all-features", "--test", "hosts", "--", &case, "--exact"])
        .env("VESSEL_MCP_PYTHON", &python)
        .arg("--nocapture")
        .envs(s3.env())
        .envs(env)
        .env("VESSEL_TEST_IMAGE_DIR", &image.dir))?;
    drop(s3);
    Ok(())
}

fn demo() -> Result<()> {
    // The first command on a fresh machine: only what the demo needs.
    install(DEMO_PACKAGES)?;
    let image = image::build()?;
    let root = project_root();
    // Only the demo crate: the facade with the youki backend, nothing else.
    // Its vessels have disk quotas on any disk (it sets up its mount root).
    run(cargo(&root)
        .args(["run", "--release", "--quiet", "-p", "vessel-demo", "--"])
        .arg(&image.storage)
        .arg(image::IMAGE_REF))
    .context("the demo failed")
}
