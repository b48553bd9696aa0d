//! Interop with containerd's own differ and applier, through `ctr` against
//! the private containerd that `cargo xtask test` starts:
//! - a diff made by `ctr snapshots diff` applies with ours to the same tree;
//! - a layer made by ours, imported into containerd inside an OCI image,
//!   unpacks (containerd's applier) to the same tree.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use sha2::{Digest, Sha256};
use vessel_core::sync::Locked;
use vessel_snapshot::{ApplyMode, ApplyOptions, DiffOptions, apply_layer, write_diff_with};

struct Ctr {
    address: PathBuf,
    namespace: String,
    /// Held for the whole test: one test's deletions trigger containerd's
    /// GC, which would collect the other's unreferenced snapshots.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Ctr {
    fn from_env(test: &str) -> Option<Self> {
        if !have_root(test) {
            return None;
        }
        let address = vessel_test_support::env_path(test, "VESSEL_CONTAINERD_ADDRESS")?;
        let serial = SERIAL.locked();
        Some(Self { address, namespace: format!("vessel-interop-{}-{test}", std::process::id()), _serial: serial })
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.try_run(args);
        assert!(out.status.success(), "ctr {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    fn try_run(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args)
            .output()
            .unwrap()
    }

    /// Creates a snapshot (`prepare` or `view`) and marks it a GC root. `ctr`
    /// cannot do both at once, and a GC in between (triggered by the import's
    /// own lease going away) collects the unreferenced snapshot: then retry.
    fn snapshot(&self, how: &str, key: &str, parent: &str) {
        for _ in 0..10 {
            self.run(&["snapshots", how, key, parent]);
            if self.try_run(&["snapshots", "label", key, "containerd.io/gc.root=vessel-test"]).status.success() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("containerd kept collecting snapshot {key}");
    }

    /// Mounts the active or view snapshot `key` at `target`, as `ctr` says to.
    fn mount(&self, key: &str, target: &Path) {
        fs::create_dir_all(target).unwrap();
        let out = self.run(&["snapshots", "mounts", target.to_str().unwrap(), key]);
        let cmd = String::from_utf8(out.stdout).unwrap();
        let st = Command::new("sh").arg("-c").arg(cmd.trim()).status().unwrap();
        assert!(st.success(), "{cmd}");
    }

    /// Removes everything this test made in containerd, then the namespace.
    fn cleanup(&self, snapshots: &[&str], images: &[&str]) {
        for s in snapshots {
            self.run(&["snapshots", "rm", s]);
        }
        for i in images {
            self.run(&["images", "rm", "--sync", i]);
        }
        let left = self.run(&["snapshots", "ls"]);
        // Image unpacking leaves committed layer snapshots; remove them top-down.
        let mut names: Vec<String> = String::from_utf8_lossy(&left.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        while !names.is_empty() {
            let before = names.len();
            names.retain(|n| !self.try_run(&["snapshots", "rm", n]).status.success());
            assert!(names.len() < before, "could not remove snapshots {names:?}");
        }
        let content = self.run(&["content", "ls", "-q"]);
        for digest in String::from_utf8_lossy(&content.stdout).lines() {
            self.run(&["content", "rm", digest]);
        }
        self.run(&["--namespace", "default", "namespaces", "rm", &self.namespace]);
    }
}

fn image_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("VESSEL_TEST_IMAGE_DIR").expect("VESSEL_TEST_IMAGE_DIR (set by cargo xtask test)"))
}

fn umount(p: &Path) {
    nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH).unwrap();
}

/// containerd's differ keeps only `security.capability` xattrs, so the trees
/// compared with it carry none.
fn strip_xattrs(root: &Path) {
    for p in paths(root) {
        if p.is_symlink() {
            continue;
        }
        for n in xattr::list(&p).unwrap() {
            xattr::remove(&p, n).unwrap();
        }
    }
}

fn busybox_rootfs(at: &Path) {
    fs::create_dir_all(at).unwrap();
    let st = Command::new("tar").arg("-xpf").arg(image_dir().join("layer.tar")).arg("-C").arg(at).status().unwrap();
    assert!(st.success());
}

#[test]
fn a_containerd_diff_applies_with_ours() {
    let Some(ctr) = Ctr::from_env("a_containerd_diff_applies_with_ours") else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = image_dir().join("busybox-oci.tar");
    ctr.run(&["images", "import", image.to_str().unwrap()]);
    let layer_digest = format!("sha256:{:x}", Sha256::digest(fs::read(image_dir().join("layer.tar")).unwrap()));
    ctr.snapshot("prepare", "work", &layer_digest);
    let mnt = dir.path().join("mnt");
    ctr.mount("work", &mnt);
    let mut rng = Rng::new(77);
    for _ in 0..30 {
        mutate(&mnt, &mut rng);
    }
    strip_xattrs(&mnt);
    let mut expected = scan(&mnt);
    // containerd's differ also writes whole-second mtimes: what its tar says
    // is all an applier can reproduce.
    for node in expected.values_mut() {
        node.mtime.1 = 0;
    }
    umount(&mnt);
    let diff = ctr.run(&["snapshots", "diff", "--media-type", "application/vnd.oci.image.layer.v1.tar", "work"]).stdout;
    assert!(diff.len() > 1024, "containerd returned a layer");

    let ours = dir.path().join("ours");
    busybox_rootfs(&ours);
    apply_layer(&diff[..], &ours, &ApplyOptions::new(ApplyMode::Merged).allow_devices(true)).unwrap();
    assert_same(&expected, &scan(&ours), "containerd's diff applied by ours");
    ctr.cleanup(&["work"], &["local/busybox:latest"]);
}

#[test]
fn our_layer_unpacks_in_containerd() {
    let Some(ctr) = Ctr::from_env("our_layer_unpacks_in_containerd") else { return };
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    busybox_rootfs(&lower);
    let (layer, stats, expected) = {
        let ov = Overlay::new(&dir.path().join("ov"), &[&lower]);
        let mut rng = Rng::new(78);
        for _ in 0..30 {
            mutate(&ov.merged, &mut rng);
        }
        // A sparse file: written in GNU's PAX 1.0 form, which Go reads.
        let sparse = fs::File::create(ov.merged.join("sparse")).unwrap();
        sparse.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&sparse, b"middle", 32 << 20).unwrap();
        drop(sparse);
        let (layer, stats) = write_diff_with(&ov.upper, Vec::new(), DiffOptions { allow_devices: true }).unwrap();
        assert!(layer.len() < 16 << 20, "the sparse file was archived whole");
        (layer, stats, scan(&ov.merged))
    };

    // An OCI image: the busybox layer, then ours (uncompressed).
    let base = fs::read(image_dir().join("layer.tar")).unwrap();
    let base_id = format!("sha256:{:x}", Sha256::digest(&base));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch(), "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [base_id, stats.digest]},
        "config": {"Cmd": ["sh"]},
    }))
    .unwrap();
    let desc = |media: &str, data: &[u8]| serde_json::json!({"mediaType": media, "digest": format!("sha256:{:x}", Sha256::digest(data)), "size": data.len()});
    let layer_media = "application/vnd.oci.image.layer.v1.tar";
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", &config),
        "layers": [desc(layer_media, &base), desc(layer_media, &layer)],
    }))
    .unwrap();
    let mut mdesc = desc("application/vnd.oci.image.manifest.v1+json", &manifest);
    mdesc["annotations"] = serde_json::json!({"io.containerd.image.name": "local/interop:latest", "org.opencontainers.image.ref.name": "latest"});
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [mdesc]})).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    for blob in [&config[..], &manifest, &base, &layer] {
        add(&format!("blobs/sha256/{:x}", Sha256::digest(blob)), blob);
    }
    let archive = dir.path().join("interop.tar");
    fs::write(&archive, b.into_inner().unwrap()).unwrap();
    ctr.run(&["images", "import", archive.to_str().unwrap()]);

    let chain = format!("sha256:{:x}", Sha256::digest(format!("{base_id} {}", stats.digest)));
    ctr.snapshot("view", "check", &chain);
    let mnt = dir.path().join("mnt");
    ctr.mount("check", &mnt);
    let got = scan(&mnt);
    umount(&mnt);
    ctr.cleanup(&["check"], &["local/interop:latest"]);
    assert_same(&expected, &got, "our layer unpacked by containerd");
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    }
}
