//! Builds the test image `local/busybox:latest` from Debian's busybox-static,
//! with no registry and no Docker: a one-layer rootfs (busybox, its applet
//! links, /etc/passwd, /etc/group, /tmp, …) packed both as a docker-save
//! archive and as an OCI image-layout archive, byte-for-byte reproducible.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use flate2::{Compression, GzBuilder};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::util::{output, target_dir};

pub(crate) const IMAGE_REF: &str = "local/busybox:latest";
/// The docker-save form is stored under its own name so tests can pick either.
pub(crate) const DOCKER_IMAGE_REF: &str = "local/busybox-docker:latest";
const BUSYBOX: &str = "/bin/busybox";
/// Every timestamp in the image (2023-11-14T22:13:20Z), for reproducibility.
const MTIME: u64 = 1_700_000_000;
const CREATED: &str = "2023-11-14T22:13:20Z";

#[derive(Debug)]
pub(crate) struct Image {
    /// `target/vessel-test`: tests find everything through this (`VESSEL_TEST_IMAGE_DIR`).
    pub(crate) dir: PathBuf,
    /// A `LocalStorage` directory holding both archives under `images/`.
    pub(crate) storage: PathBuf,
}

pub(crate) fn build() -> Result<Image> {
    if !Path::new(BUSYBOX).is_file() {
        bail!("{BUSYBOX} is missing: run `cargo xtask setup` (package busybox-static)");
    }
    let dir = target_dir().join("vessel-test");
    let storage = dir.join("storage");
    let busybox = std::fs::read(BUSYBOX).with_context(|| format!("read {BUSYBOX}"))?;
    let applets = output(std::process::Command::new(BUSYBOX).arg("--list-full"))?;
    let layer = rootfs_layer(&busybox, applets.lines())?;
    let diff_id = sha256(&layer);
    let config = image_config(&diff_id, None)?;
    let docker = docker_archive(&layer, &diff_id, &config)?;
    let oci = oci_archive(&layer, &config, IMAGE_REF)?;
    let images = storage.join("images").join("local");
    std::fs::create_dir_all(&images)?;
    write_if_changed(&dir.join("busybox-docker.tar"), &docker)?;
    write_if_changed(&dir.join("busybox-oci.tar"), &oci)?;
    write_if_changed(&storage.join("images").join(format!("{DOCKER_IMAGE_REF}.tar")), &docker)?;
    write_if_changed(&storage.join("images").join(format!("{IMAGE_REF}.tar")), &oci)?;
    write_if_changed(&dir.join("layer.tar"), &layer)?;
    // The same layer with a `USER` in the config, one image per case.
    for (name, user) in USER_IMAGES {
        let reference = format!("local/busybox-user-{name}:latest");
        let oci = oci_archive(&layer, &image_config(&diff_id, Some(user))?, &reference)?;
        write_if_changed(&storage.join("images").join(format!("{reference}.tar")), &oci)?;
    }
    escape_probe(&dir)?;
    println!("image: {IMAGE_REF} (layer sha256:{diff_id}, {} applets) in {}", applets.lines().count(), dir.display());
    Ok(Image { dir, storage })
}

/// `local/busybox-user-NAME:latest` images and their `USER`.
const USER_IMAGES: &[(&str, &str)] = &[
    ("nobody", "nobody"),
    ("app", "app"),
    ("app-staff", "app:staff"),
    ("numeric", "1000:50"),
    ("ghost", "ghost"),
    ("badgroup", "app:nosuchgroup"),
];

fn image_config(diff_id: &str, user: Option<&str>) -> Result<Vec<u8>> {
    let mut config = json!({
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["sh"],
        "WorkingDir": "/",
    });
    if let Some(u) = user {
        config["User"] = json!(u);
    }
    Ok(serde_json::to_vec(&json!({
        "architecture": oci_arch(),
        "os": "linux",
        "created": CREATED,
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        "history": [{ "created": CREATED, "created_by": "cargo xtask image (busybox-static)" }],
    }))?)
}

/// Builds the escape suite's probe (`vessel/tests/escape/escape.c`) as a
/// static binary, `escape` in the test image dir.
fn escape_probe(dir: &Path) -> Result<()> {
    let src = crate::util::project_root().join("vessel/tests/escape/escape.c");
    let tmp = dir.join("escape.tmp");
    crate::util::run(std::process::Command::new("gcc").args(["-static", "-O2", "-Wall", "-o"]).arg(&tmp).arg(&src))
        .context("building the escape probe needs gcc and a static libc (libc6-dev)")?;
    let bin = std::fs::read(&tmp)?;
    std::fs::remove_file(&tmp)?;
    write_if_changed(&dir.join("escape"), &bin)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("escape"), std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn sha256(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn write_if_changed(path: &Path, data: &[u8]) -> Result<()> {
    if std::fs::read(path).ok().as_deref() == Some(data) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
}

enum Node<'a> {
    Dir(u32),
    File(u32, &'a [u8]),
    Symlink(&'a str),
}

/// A deterministic tar builder: fixed owners and times, entries in order.
struct TarOut {
    b: tar::Builder<Vec<u8>>,
}

impl TarOut {
    fn new() -> Self {
        let mut b = tar::Builder::new(Vec::new());
        b.mode(tar::HeaderMode::Deterministic);
        Self { b }
    }

    fn add(&mut self, path: &str, node: &Node<'_>) -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        match *node {
            Node::Dir(mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(mode);
                h.set_size(0);
                self.b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Node::File(mode, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(mode);
                h.set_size(data.len() as u64);
                self.b.append_data(&mut h, path, data)?;
            }
            Node::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                self.b.append_link(&mut h, path, target)?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Vec<u8>> {
        Ok(self.b.into_inner()?)
    }
}

fn rootfs_layer<'a>(busybox: &'a [u8], applets: impl Iterator<Item = &'a str>) -> Result<Vec<u8>> {
    use std::collections::BTreeMap;
    let mut tree: BTreeMap<String, Node<'a>> = BTreeMap::new();
    for d in ["bin", "dev", "etc", "home", "proc", "root", "sbin", "sys", "usr", "usr/bin", "usr/sbin", "var"] {
        tree.insert(d.into(), Node::Dir(0o755));
    }
    tree.insert("root".into(), Node::Dir(0o700));
    tree.insert("tmp".into(), Node::Dir(0o1777));
    tree.insert("bin/busybox".into(), Node::File(0o755, busybox));
    tree.insert(
        "etc/passwd".into(),
        Node::File(
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
    );
    tree.insert(
        "etc/group".into(),
        Node::File(0o644, b"root:x:0:\nstaff:x:50:app\nwheel:x:10:root,app\napp:x:1000:\nnogroup:x:65534:\n"),
    );
    for applet in applets.map(str::trim).filter(|a| !a.is_empty()) {
        let applet = applet.trim_start_matches('/');
        if applet == "bin/busybox" || applet.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            continue;
        }
        let mut parent = Path::new(applet).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            tree.entry(p.to_string_lossy().into_owned()).or_insert(Node::Dir(0o755));
            parent = p.parent();
        }
        tree.insert(applet.into(), Node::Symlink("/bin/busybox"));
    }
    let mut t = TarOut::new();
    for (path, node) in &tree {
        t.add(path, node)?;
    }
    t.finish()
}

fn docker_archive(layer: &[u8], diff_id: &str, config: &[u8]) -> Result<Vec<u8>> {
    let config_hex = sha256(config);
    let (name, tag) = IMAGE_REF.rsplit_once(':').expect("tagged");
    let manifest = serde_json::to_vec(&json!([{
        "Config": format!("{config_hex}.json"),
        "RepoTags": [IMAGE_REF],
        "Layers": [format!("{diff_id}/layer.tar")],
    }]))?;
    let repositories = serde_json::to_vec(&json!({ name: { tag: diff_id } }))?;
    let mut t = TarOut::new();
    t.add(&format!("{config_hex}.json"), &Node::File(0o644, config))?;
    t.add(diff_id, &Node::Dir(0o755))?;
    t.add(&format!("{diff_id}/VERSION"), &Node::File(0o644, b"1.0"))?;
    t.add(&format!("{diff_id}/layer.tar"), &Node::File(0o644, layer))?;
    t.add("manifest.json", &Node::File(0o644, &manifest))?;
    t.add("repositories", &Node::File(0o644, &repositories))?;
    t.finish()
}

fn oci_archive(layer: &[u8], config: &[u8], reference: &str) -> Result<Vec<u8>> {
    let mut gz = GzBuilder::new().mtime(0).write(Vec::new(), Compression::default());
    gz.write_all(layer)?;
    let layer_gz = gz.finish()?;
    let descriptor = |media: &str, data: &[u8]| json!({ "mediaType": media, "digest": format!("sha256:{}", sha256(data)), "size": data.len() });
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer_gz)],
    }))?;
    let mut manifest_desc = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    manifest_desc["annotations"] = json!({
        "io.containerd.image.name": reference,
        "org.opencontainers.image.ref.name": reference.rsplit_once(':').expect("tagged").1,
    });
    manifest_desc["platform"] = json!({ "architecture": oci_arch(), "os": "linux" });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_desc],
    }))?;
    let mut blobs: Vec<(String, &[u8])> = [config, &manifest, &layer_gz].into_iter().map(|b| (sha256(b), b)).collect();
    blobs.sort();
    let mut t = TarOut::new();
    t.add("blobs", &Node::Dir(0o755))?;
    t.add("blobs/sha256", &Node::Dir(0o755))?;
    for (hex, data) in &blobs {
        t.add(&format!("blobs/sha256/{hex}"), &Node::File(0o644, data))?;
    }
    t.add("index.json", &Node::File(0o644, &index))?;
    t.add("oci-layout", &Node::File(0o644, br#"{"imageLayoutVersion":"1.0.0"}"#))?;
    t.finish()
}
