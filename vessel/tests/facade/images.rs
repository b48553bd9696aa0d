//! Images: archives of several images, containerd's store, registries (pulls,
//! platforms, credentials, failures), the stored index.

use super::*;

/// With the containerd backend, an image only in containerd's store (as
/// `ctr`/`nerdctl` pulled it) serves `create_vessel`; youki has no store.
pub(super) async fn image_from_the_containerd_store(w: Arc<World>) -> Result<()> {
    let reference = "local/from-containerd:latest";
    let mgr = w.manager("ctd-image").await?;
    let Some(address) = &w.address else {
        match mgr.create_vessel(reference, "/work").await {
            Err(e) if e.kind() == VesselErrorKind::NotFound => return Ok(()),
            other => return Err(anyhow!("youki and an image in no storage: {other:?}")),
        }
    };
    let image_dir = PathBuf::from(std::env::var_os("VESSEL_TEST_IMAGE_DIR").context("image dir")?);
    let ctr = |args: &[&str]| {
        std::process::Command::new("ctr")
            .arg("--address")
            .arg(address)
            .args(["--namespace", &format!("vessel-facade-{}", std::process::id())])
            .args(args)
            .output()
    };
    let archive = image_dir.join("busybox-docker.tar");
    let out = ctr(&["images", "import", "--index-name", reference, archive.to_str().unwrap()])?;
    ensure!(out.status.success(), "ctr import: {}", String::from_utf8_lossy(&out.stderr));
    let result = async {
        ensure!(mgr.storage().list_images().await?.iter().all(|i| i.as_str() != reference));
        let v = mgr.create_vessel(reference, "/work").await?;
        let (code, out, _e) = run(&v, "echo from the containerd store", false).await?;
        ensure!(code == 0 && out == "from the containerd store\n", "{code} {out:?} {_e:?}");
        ensure!(v.manifest().labels.contains_key("vessel.image.config-digest"));
        Ok(())
    }
    .await;
    let _ = ctr(&["images", "rm", "--sync", reference]);
    mgr.close().await?;
    result
}

/// The test image's OCI archive with its manifest listed twice, the second
/// time as `local/other:v2`.
pub(super) fn two_image_archive(oci: &[u8]) -> Result<Vec<u8>> {
    let mut out = tar::Builder::new(Vec::new());
    for e in tar::Archive::new(oci).entries()? {
        let mut e = e?;
        let mut h = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        if e.path()?.to_string_lossy() == "index.json" {
            let mut index: serde_json::Value = serde_json::from_slice(&data)?;
            let mut other = index["manifests"][0].clone();
            other["annotations"]["io.containerd.image.name"] = "local/other:v2".into();
            index["manifests"].as_array_mut().context("manifests")?.push(other);
            data = serde_json::to_vec(&index)?;
            h.set_size(data.len() as u64);
            h.set_cksum();
        }
        out.append(&h, &data[..])?;
    }
    Ok(out.into_inner()?)
}

/// The test registries `cargo xtask test` starts (`None` when run bare).
pub(super) struct Registry {
    plain: String,
    data: PathBuf,
    auth: String,
    token: String,
    user: String,
    password: String,
}

/// The registry cases share the registry's blobs (one tampers with the
/// busybox layer): one at a time.
pub(super) static REGISTRY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(super) fn registry() -> Result<Option<Registry>> {
    let var = |k: &str| std::env::var(k).ok();
    let Some(plain) = var("VESSEL_REGISTRY") else {
        ensure!(std::env::var_os("CI").is_none(), "VESSEL_REGISTRY is unset under CI");
        eprintln!("SKIPPED registry cases: VESSEL_REGISTRY is unset; run `cargo xtask test`");
        return Ok(None);
    };
    Ok(Some(Registry {
        plain,
        data: PathBuf::from(var("VESSEL_REGISTRY_DATA").context("VESSEL_REGISTRY_DATA")?),
        auth: var("VESSEL_REGISTRY_AUTH").context("VESSEL_REGISTRY_AUTH")?,
        token: var("VESSEL_REGISTRY_TOKEN").context("VESSEL_REGISTRY_TOKEN")?,
        user: var("VESSEL_REGISTRY_USER").context("VESSEL_REGISTRY_USER")?,
        password: var("VESSEL_REGISTRY_PASSWORD").context("VESSEL_REGISTRY_PASSWORD")?,
    }))
}

pub(super) fn image_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("VESSEL_TEST_IMAGE_DIR").unwrap())
}

/// `skopeo copy` of `src` to `docker://dest` (plain HTTP), with creds if given.
pub(super) fn push(src: &str, dest: &str, creds: Option<&str>, all: bool) -> Result<()> {
    let mut cmd = std::process::Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    if all {
        cmd.arg("--all");
    }
    if let Some(c) = creds {
        cmd.args(["--dest-creds", c]);
    }
    let out = cmd.arg(src).arg(format!("docker://{dest}")).output()?;
    ensure!(out.status.success(), "skopeo copy to {dest}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

pub(super) fn busybox_archive() -> String {
    format!("oci-archive:{}", image_dir().join("busybox-oci.tar").display())
}

/// The test image's blobs (by hex digest) and its manifest's digest.
pub(super) fn busybox_blobs() -> Result<(BTreeMap<String, Vec<u8>>, String)> {
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut index = Vec::new();
    let mut ar = tar::Archive::new(std::fs::File::open(image_dir().join("busybox-oci.tar"))?);
    for e in ar.entries()? {
        let mut e = e?;
        let name = e.path()?.display().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        if name == "index.json" {
            index = data;
        } else if let Some(hex) = name.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
            blobs.insert(hex.to_owned(), data);
        }
    }
    let index: serde_json::Value = serde_json::from_slice(&index)?;
    let manifest = index["manifests"][0]["digest"].as_str().context("a manifest")?.to_owned();
    Ok((blobs, manifest))
}

/// Stores `data` as a blob; its digest and size.
pub(super) fn add_blob(blobs: &mut BTreeMap<String, Vec<u8>>, data: Vec<u8>) -> (String, usize) {
    use sha2::Digest;
    let hex = format!("{:x}", sha2::Sha256::digest(&data));
    let size = data.len();
    blobs.insert(hex.clone(), data);
    (format!("sha256:{hex}"), size)
}

pub(super) fn blob<'a>(blobs: &'a BTreeMap<String, Vec<u8>>, digest: &str) -> &'a [u8] {
    &blobs[digest.trim_start_matches("sha256:")]
}

/// A manifest like `manifest` with its config changed by `edit`.
pub(super) fn with_config(
    blobs: &mut BTreeMap<String, Vec<u8>>,
    manifest: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<(String, usize)> {
    let mut m: serde_json::Value = serde_json::from_slice(blob(blobs, manifest))?;
    let mut config: serde_json::Value =
        serde_json::from_slice(blob(blobs, m["config"]["digest"].as_str().context("a config")?))?;
    edit(&mut config);
    let (cd, cs) = add_blob(blobs, serde_json::to_vec(&config)?);
    m["config"]["digest"] = cd.into();
    m["config"]["size"] = cs.into();
    Ok(add_blob(blobs, serde_json::to_vec(&m)?))
}

/// Writes an OCI layout dir whose `latest` is `top` (a manifest or an index).
pub(super) fn write_layout(
    dir: &Path,
    blobs: &BTreeMap<String, Vec<u8>>,
    media: &str,
    top: (String, usize),
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    for (hex, data) in blobs {
        std::fs::write(dir.join("blobs/sha256").join(hex), data)?;
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": media, "digest": top.0, "size": top.1,
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(dir.to_path_buf())
}

pub(super) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An OCI layout dir whose `latest` is an index of two images: another
/// architecture's first (same layers, its own config), then this host's.
/// Returns the dir and the digest of this host's manifest.
pub(super) fn two_platform_layout(dir: &Path) -> Result<(PathBuf, String)> {
    let (mut blobs, host_manifest) = busybox_blobs()?;
    let m: serde_json::Value = serde_json::from_slice(blob(&blobs, &host_manifest))?;
    let config: serde_json::Value =
        serde_json::from_slice(blob(&blobs, m["config"]["digest"].as_str().context("a config")?))?;
    let host_arch = config["architecture"].as_str().context("an architecture")?.to_owned();
    let other_arch = if host_arch == "arm64" { "amd64" } else { "arm64" };
    let (md, ms) = with_config(&mut blobs, &host_manifest, |c| c["architecture"] = other_arch.into())?;
    let host_size = blob(&blobs, &host_manifest).len();
    let nested = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": md, "size": ms, "platform": {"os": "linux", "architecture": other_arch}},
        {"mediaType": OCI_MANIFEST, "digest": host_manifest, "size": host_size, "platform": {"os": "linux", "architecture": host_arch}},
    ]});
    let top = add_blob(&mut blobs, serde_json::to_vec(&nested)?);
    Ok((write_layout(&dir.join("multi"), &blobs, "application/vnd.oci.image.index.v1+json", top)?, host_manifest))
}

/// Pull and create, reopen on a new host from storage, a two-platform
/// index resolved to this host, credentials (explicit and docker's
/// config.json), and pulling on demand.
pub(super) async fn images_pull_from_a_registry(w: Arc<World>) -> Result<()> {
    let Some(reg) = registry()? else { return Ok(()) };
    let _one = REGISTRY.lock().await;
    let backend = format!("{:?}", w.backend).to_lowercase();
    let repo = format!("{}/{backend}/busybox:latest", reg.plain);
    push(&busybox_archive(), &repo, None, false)?;
    let mgr = w.manager("pull").await?;
    let pulled = mgr.pull_image(&repo).await.context("the first pull")?;
    ensure!(pulled.layers == 1 && pulled.bytes > 100_000, "{pulled:?}");
    let v = mgr.create_vessel(&repo, "/work").await?;
    ensure!(run(&v, "echo from the registry", true).await?.1 == "from the registry\n");
    v.create_snapshot("pulled").await?;
    let id = v.id().to_string();
    v.close().await?;
    let host_b = w.manager("pull-b").await?;
    let vb = host_b.open_vessel(&id).await?;
    ensure!(run(&vb, "cat /bin/busybox > /dev/null && echo ok", false).await?.1 == "ok\n");
    host_b.close().await?;

    // An index of two platforms: this host's image is the one pulled.
    let tmp = tempfile::tempdir()?;
    let (layout, host_manifest) = two_platform_layout(tmp.path()).context("the two-platform layout")?;
    let multi = format!("{}/{backend}/multi:latest", reg.plain);
    push(&format!("oci:{}:latest", layout.display()), &multi, None, true)?;
    let got = mgr.pull_image(&multi).await.context("the two-platform pull")?;
    ensure!(got.manifest_digest == host_manifest, "pulled {} for this host, want {host_manifest}", got.manifest_digest);

    // The image's config: WorkingDir (for an empty work dir), Env, and
    // Entrypoint/Cmd offered to the caller.
    let (mut blobs, manifest) = busybox_blobs()?;
    let top = with_config(&mut blobs, &manifest, |c| {
        c["config"]["WorkingDir"] = "/srv/app".into();
        c["config"]["Env"] = serde_json::json!(["PATH=/bin:/usr/bin", "GREETING=from the image"]);
        c["config"]["Entrypoint"] = serde_json::json!(["/bin/sh", "-c"]);
        c["config"]["Cmd"] = serde_json::json!(["echo $GREETING"]);
    })?;
    let configured = format!("{}/{backend}/configured:latest", reg.plain);
    let layout = write_layout(&tmp.path().join("configured"), &blobs, OCI_MANIFEST, top)?;
    push(&format!("oci:{}:latest", layout.display()), &configured, None, false)?;
    mgr.pull_image(&configured).await?;
    let v = mgr.create_vessel(&configured, "").await?;
    ensure!(v.manifest().work_dir == "/srv/app", "work dir {:?}", v.manifest().work_dir);
    let c = v.image_config().clone();
    ensure!(c.entrypoint == ["/bin/sh", "-c"] && c.cmd == ["echo $GREETING"], "{c:?}");
    let mut command = c.entrypoint.clone();
    command.extend(c.cmd.clone());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let res = v
        .exec(ExecOptions {
            command,
            stdout: Some(Box::new(&mut out)),
            stderr: Some(Box::new(&mut err)),
            ..Default::default()
        })
        .await?;
    ensure!(res.exit_code == 0 && out == b"from the image\n", "{res:?} {}", String::from_utf8_lossy(&err));
    ensure!(run(&v, "pwd", false).await?.1 == "/srv/app\n");
    let explicit = mgr.create_vessel(&configured, "/elsewhere").await?;
    ensure!(explicit.manifest().work_dir == "/elsewhere", "an explicit work dir wins");

    // Basic auth: refused without or with wrong credentials, taken with
    // the right ones, given explicitly or through docker's config.json.
    let secret = format!("{}/{backend}/private:latest", reg.auth);
    push(&busybox_archive(), &secret, Some(&format!("{}:{}", reg.user, reg.password)), false)?;
    let nobody = tmp.path().join("no-docker-config.json");
    for (what, cfg) in [
        ("no credentials", w.config("auth-none").docker_config(&nobody)),
        (
            "wrong credentials",
            w.config("auth-wrong")
                .docker_config(&nobody)
                .registry_auth(reg.auth.clone(), vessel::RegistryAuth::Basic(reg.user.clone(), "wrong".into())),
        ),
    ] {
        let m = Manager::new(cfg).await?;
        match m.pull_image(&secret).await {
            Err(e) if e.kind() == VesselErrorKind::Unauthorized => {}
            other => return Err(anyhow!("{what}: {other:?}")),
        }
        m.close().await?;
    }
    let explicit = w
        .config("auth-explicit")
        .registry_auth(reg.auth.clone(), vessel::RegistryAuth::Basic(reg.user.clone(), reg.password.clone()));
    let m = Manager::new(explicit).await?;
    m.pull_image(&secret).await?;
    m.close().await?;
    // Bearer tokens: the registry sends the client to its token server,
    // which takes the basic credentials; without them, Unauthorized.
    let tokened = format!("{}/{backend}/tokened:latest", reg.token);
    push(&busybox_archive(), &tokened, Some(&format!("{}:{}", reg.user, reg.password)), false)?;
    let m = Manager::new(w.config("token-none").docker_config(&nobody)).await?;
    match m.pull_image(&tokened).await {
        Err(e) if e.kind() == VesselErrorKind::Unauthorized => {}
        other => return Err(anyhow!("a token registry without credentials: {other:?}")),
    }
    m.close().await?;
    let m = Manager::new(
        w.config("token-basic")
            .docker_config(&nobody)
            .registry_auth(reg.token.clone(), vessel::RegistryAuth::Basic(reg.user.clone(), reg.password.clone())),
    )
    .await?;
    let got = m.pull_image(&tokened).await.context("a pull with a bearer token")?;
    ensure!(got.layers == 1);
    m.close().await?;
    let docker_config = tmp.path().join("config.json");
    let token = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", reg.user, reg.password))
    };
    std::fs::write(
        &docker_config,
        serde_json::to_vec(&serde_json::json!({"auths": {reg.auth.clone(): {"auth": token}}}))?,
    )?;
    let m = Manager::new(w.config("auth-docker").docker_config(&docker_config).pull_on_demand(true)).await?;
    // Not in storage: pulled on demand, with docker's credentials.
    let on_demand = format!("{}/{backend}/private:latest", reg.auth);
    ensure!(m.storage().load_image(&vessel::ImageRef::new(&on_demand)?).await.is_ok(), "shared storage has it already");
    let fresh = format!("{}/{backend}/busybox:v2", reg.plain);
    push(&busybox_archive(), &fresh, None, false)?;
    let v = m.create_vessel(&fresh, "/work").await?;
    ensure!(run(&v, "echo on demand", false).await?.1 == "on demand\n");
    m.close().await?;
    match mgr.create_vessel(&format!("{}/{backend}/busybox:never-pulled", reg.plain), "/work").await {
        Err(e) if e.kind() == VesselErrorKind::NotFound => {}
        other => return Err(anyhow!("create from an image not pulled: {other:?}")),
    }
    mgr.close().await?;
    Ok(())
}

/// Unknown names, a registry that is down, a tampered layer and a
/// connection cut half way: typed errors, and nothing half-imported.
pub(super) async fn registry_failures_are_typed_and_store_nothing(w: Arc<World>) -> Result<()> {
    let Some(reg) = registry()? else { return Ok(()) };
    let _one = REGISTRY.lock().await;
    let backend = format!("{:?}", w.backend).to_lowercase();
    let mgr = w.manager("pull-fail").await?;
    let root = w.base.join("pull-fail");
    let nothing_left = |what: &str| -> Result<()> {
        let spools: Vec<_> = std::fs::read_dir(&root)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".pull-"))
            .collect();
        ensure!(spools.is_empty(), "{what}: a pull spool was left");
        Ok(())
    };
    let stored = |r: String| {
        let storage = mgr.storage().clone();
        async move { storage.load_image(&vessel::ImageRef::new(&r).unwrap()).await.is_ok() }
    };
    for (what, r) in [
        ("an unknown tag", format!("{}/{backend}/busybox:no-such-tag", reg.plain)),
        ("an unknown repository", format!("{}/{backend}/no-such-repo:latest", reg.plain)),
    ] {
        match mgr.pull_image(&r).await {
            Err(e) if e.kind() == VesselErrorKind::NotFound => {}
            other => return Err(anyhow!("{what}: {other:?}")),
        }
        ensure!(!stored(r).await, "{what} stored something");
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    match mgr.pull_image(&format!("127.0.0.1:{closed}/x/busybox:latest")).await {
        Err(e) if e.kind() == VesselErrorKind::Unavailable => {}
        other => return Err(anyhow!("a registry that is down: {other:?}")),
    }

    // A layer tampered with in the registry's own storage.
    let tampered = format!("{}/{backend}/tampered:latest", reg.plain);
    push(&busybox_archive(), &tampered, None, false)?;
    let blobs = reg.data.join("docker/registry/v2/blobs/sha256");
    let layer = std::fs::read_dir(&blobs)?
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|d| d.path().join("data"))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 100_000))
        .context("the layer blob in the registry")?;
    let original = std::fs::read(&layer)?;
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&layer, &bad)?;
    let result = mgr.pull_image(&tampered).await;
    std::fs::write(&layer, &original)?;
    match result {
        Err(e) if e.kind() == VesselErrorKind::Corrupt => {}
        other => return Err(anyhow!("a tampered layer: {other:?}")),
    }
    ensure!(!stored(tampered.clone()).await, "a tampered image was stored");
    nothing_left("a tampered layer")?;

    // A connection cut after 64 KiB of the answer: through a proxy.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxied = proxy.local_addr()?.to_string();
    let upstream = reg.plain.clone();
    let cutter = tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = proxy.accept().await else { return };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = tokio::io::copy(&mut cr, &mut sw);
                let down = async {
                    let mut left = 64usize << 10;
                    let mut buf = vec![0u8; 8192];
                    while left > 0 {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n.min(left),
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        left -= n;
                    }
                };
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    let cut = format!("{proxied}/{backend}/tampered:latest");
    let result = mgr.pull_image(&cut).await;
    cutter.abort();
    ensure!(result.is_err(), "a pull through a cut connection succeeded");
    ensure!(!stored(cut).await, "a cut pull stored something");
    nothing_left("a cut connection")?;
    mgr.close().await?;
    Ok(())
}

/// An imported image's verified summary is kept in storage: a host whose
/// cache holds its layers creates vessels without reading the archive (shown
/// by spoiling the archive: this host still creates, a new host refuses).
pub(super) async fn create_from_a_cached_image_reads_no_archive(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("indexed").await?;
    let reference = "local/indexed:latest";
    let archive = std::fs::read(image_dir().join("busybox-oci.tar"))?;
    mgr.import_image(reference, Box::new(std::io::Cursor::new(archive))).await?;
    let first = mgr.create_vessel(reference, "/work").await?;
    let images = w.base.join("data/images/local");
    let stored: Vec<PathBuf> = std::fs::read_dir(&images)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("indexed:latest.tar")))
        .collect();
    ensure!(stored.len() == 1, "{stored:?}");
    let original = std::fs::read(&stored[0])?;
    std::fs::write(&stored[0], b"not an archive any more")?;
    let result = async {
        let second = mgr.create_vessel(reference, "/work").await.context("a create from the cache")?;
        ensure!(run(&second, "echo cached", false).await?.1 == "cached\n");
        let pin = |v: &vessel::Vessel| v.manifest().labels.get("vessel.image.config-digest").cloned();
        ensure!(pin(&second).is_some() && pin(&second) == pin(&first), "the same image is pinned");
        let other = w.manager("indexed-new-host").await?;
        let refused = other.create_vessel(reference, "/work").await;
        other.close().await?;
        ensure!(refused.is_err(), "a new host created from a spoiled archive");
        Ok(())
    }
    .await;
    std::fs::write(&stored[0], &original)?;
    result?;
    mgr.close().await?;
    Ok(())
}

/// An OCI layout of the test image with its one layer replaced by a zstd
/// bomb: a tar of 1 GiB of zeros in a few KiB (the config's diff id is
/// made up: the bound is passed long before the digest could be checked).
fn bomb_layout(dir: &Path) -> Result<PathBuf> {
    let (mut blobs, manifest) = busybox_blobs()?;
    let bomb = support::zstd_bomb("zeros", 1 << 30);
    let (ld, ls) = add_blob(&mut blobs, bomb);
    let mut m: serde_json::Value = serde_json::from_slice(blob(&blobs, &manifest))?;
    m["layers"] =
        serde_json::json!([{"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": ld, "size": ls}]);
    let edited = add_blob(&mut blobs, serde_json::to_vec(&m)?);
    let top = with_config(&mut blobs, &edited.0, |c| {
        c["rootfs"]["diff_ids"] = serde_json::json!([format!("sha256:{}", "0".repeat(64))]);
    })?;
    write_layout(&dir.join("bomb"), &blobs, OCI_MANIFEST, top)
}

/// The cache's entries (published layers, and any scratch a failed unpack left).
fn cache_entries(mgr: &Manager) -> Result<usize> {
    Ok(std::fs::read_dir(mgr.mount_root().join("layers/layers"))?.count())
}

/// A layer that expands past `ManagerConfig::max_layer_bytes` is refused
/// (QuotaExceeded, naming the bound) on import and on pull, and leaves
/// nothing: no layer or scratch in the cache, no image in storage.
pub(super) async fn layer_bombs_are_refused(w: Arc<World>) -> Result<()> {
    let mgr = Manager::new(w.config("bombs").max_layer_bytes(64 << 20)).await?;
    let tmp = tempfile::tempdir()?;
    let layout = bomb_layout(tmp.path())?;
    let mut archive = tar::Builder::new(Vec::new());
    archive.append_dir_all(".", &layout)?;
    let archive = archive.into_inner()?;
    ensure!(archive.len() < 4 << 20, "the whole archive is {} bytes", archive.len());
    let before = cache_entries(&mgr)?;
    let refused = mgr.import_image("local/bomb:latest", Box::new(std::io::Cursor::new(archive))).await;
    let e = refused.err().context("the bomb was imported")?;
    ensure!(e.kind() == VesselErrorKind::QuotaExceeded && e.to_string().contains("bound"), "{e:#}");
    ensure!(cache_entries(&mgr)? == before, "the cache kept something of the bomb");
    let images = mgr.storage().list_images().await?;
    ensure!(!images.iter().any(|i| i.as_str().contains("bomb")), "the bomb is in storage: {images:?}");
    if let Some(reg) = registry()? {
        let _one = REGISTRY.lock().await;
        let backend = format!("{:?}", w.backend).to_lowercase();
        let repo = format!("{}/{backend}/bomb:latest", reg.plain);
        push(&format!("oci:{}:latest", layout.display()), &repo, None, false)?;
        let e = mgr.pull_image(&repo).await.err().context("the bomb was pulled")?;
        ensure!(e.kind() == VesselErrorKind::QuotaExceeded, "{e:#}");
        ensure!(cache_entries(&mgr)? == before, "the cache kept something of the pulled bomb");
    }
    mgr.close().await?;
    Ok(())
}
