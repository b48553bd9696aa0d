//! Image archives: docker-save and OCI image-layout tars (plain, gzip or
//! zstd), read from any stream into the layer cache.
//!
//! An archive's members come in any order (index.json may follow the blobs),
//! so it is spooled to a scratch directory first: memory stays bounded
//! whatever the image's size. Every blob is checked against its digest (OCI
//! descriptors; docker-save's config file name) and every layer against its
//! diff id while it unpacks, so a tampered archive is refused.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use sha2::{Digest, Sha256};

pub mod layout;

use crate::apply::components;
use crate::codec::decompressed;
use crate::{LayerCache, LayerKey, SnapshotError};

/// The parts of an image's configuration a workspace needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// Default working directory.
    pub working_dir: Option<String>,
    /// Entrypoint argv.
    pub entrypoint: Vec<String>,
    /// Default command argv.
    pub cmd: Vec<String>,
    /// Default user (`uid[:gid]` or a name).
    pub user: Option<String>,
}

/// One layer of an imported image, unpacked in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayer {
    /// `sha256:` digest of the uncompressed layer tar.
    pub diff_id: String,
    /// The unpacked layer (overlay form).
    pub path: PathBuf,
}

/// An imported image.
#[derive(Debug, Clone)]
pub struct Image {
    /// Digest of the config blob: identifies the image's content, so a
    /// workspace can pin it even if a tag moves.
    pub config_digest: String,
    /// Digest of the OCI manifest, when the archive is an OCI layout.
    pub manifest_digest: Option<String>,
    /// Runtime defaults from the config.
    pub config: ImageConfig,
    /// Layers, bottom first.
    pub layers: Vec<ImageLayer>,
}

/// Reads an image archive from `archive`, unpacks its layers into `cache`
/// (skipping cached ones) referenced by `holder`, and returns the image.
/// With several images in the archive, `reference` picks one (by
/// `io.containerd.image.name`, `org.opencontainers.image.ref.name` or docker
/// `RepoTags`) and none of them matching is
/// [`SnapshotError::ImageNotInArchive`]; an archive of one image is that
/// image, whatever it calls itself (the caller names it). Without a
/// reference: the first for this platform.
pub fn unpack_image(
    archive: impl Read,
    cache: &LayerCache,
    holder: &str,
    reference: Option<&str>,
) -> Result<Image, SnapshotError> {
    let scratch = cache.scratch("import")?;
    let files = spool(archive, &scratch.dir)?;
    if files.contains_key("index.json") {
        import_oci(&files, cache, holder, reference)
    } else if files.contains_key("manifest.json") {
        import_docker(&files, cache, holder, reference)
    } else {
        Err(SnapshotError::NotAnImageArchive)
    }
}

/// Copies the archive's regular members into `dir`; returns member path -> file.
fn spool(archive: impl Read, dir: &Path) -> Result<HashMap<String, PathBuf>, SnapshotError> {
    let mut files = HashMap::new();
    let mut tar = tar::Archive::new(decompressed(archive)?);
    let bad = |source| SnapshotError::Archive { op: "read a member", source };
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let name = components(&raw)?
            .iter()
            .map(|c| {
                c.to_str().ok_or_else(|| SnapshotError::UnsafeEntry {
                    entry: String::from_utf8_lossy(&raw).into_owned(),
                    reason: "a member name that is not UTF-8",
                })
            })
            .collect::<Result<Vec<_>, _>>()?
            .join("/");
        let spooled = dir.join(format!("{}", files.len()));
        spool_member(&mut entry, &spooled)?;
        files.insert(name, spooled);
    }
    Ok(files)
}

/// Copies an archive member to `to`: a failing read is the archive's, a
/// failing write the disk's (say, full).
fn spool_member(from: &mut impl io::Read, to: &Path) -> Result<(), SnapshotError> {
    use io::Write;
    let mut out = File::create(to).map_err(SnapshotError::io("create", to))?;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = from.read(&mut buf).map_err(|e| SnapshotError::Stream("image archive", e))?;
        if n == 0 {
            return Ok(());
        }
        out.write_all(&buf[..n]).map_err(SnapshotError::io("write", to))?;
    }
}

fn sha256_file(path: &Path) -> Result<(String, u64), SnapshotError> {
    let mut f = File::open(path).map_err(SnapshotError::io("open", path))?;
    let mut h = Sha256::new();
    let n = io::copy(&mut f, &mut h).map_err(SnapshotError::io("read", path))?;
    Ok((format!("sha256:{:x}", h.finalize()), n))
}

fn member<'a>(files: &'a HashMap<String, PathBuf>, name: &str) -> Result<&'a Path, SnapshotError> {
    files.get(name).map(PathBuf::as_path).ok_or_else(|| SnapshotError::MissingMember(name.to_owned()))
}

/// The blob a descriptor names, after checking its digest and size.
fn blob<'a>(files: &'a HashMap<String, PathBuf>, d: &Descriptor) -> Result<&'a Path, SnapshotError> {
    let digest = d.digest().to_string();
    let path = member(files, &layout::member(d)?)?;
    let (actual, size) = sha256_file(path)?;
    if actual != digest {
        return Err(SnapshotError::DigestMismatch { expected: digest, actual });
    }
    if size != d.size() {
        return Err(SnapshotError::SizeMismatch { digest, actual: size, declared: d.size() });
    }
    Ok(path)
}

fn json_err(what: &'static str) -> impl FnOnce(oci_spec::OciSpecError) -> SnapshotError {
    move |source| SnapshotError::ImageDocument { what, source }
}

/// Picks the descriptor for `reference`, else the first for this platform
/// (descriptors without a platform, as some tools write, count as matching).
fn pick<'a>(descs: &'a [Descriptor], reference: Option<&str>) -> Result<&'a Descriptor, SnapshotError> {
    if let Some(r) = reference {
        let tag = r.rsplit_once(':').map(|(_, t)| t).filter(|t| !t.contains('/'));
        let named = descs.iter().find(|d| {
            d.annotations().as_ref().is_some_and(|a| {
                match a.get(layout::NAME_ANNOTATION) {
                    Some(full) => full == r,
                    // Layouts that name images by tag alone.
                    None => tag.is_some() && a.get(layout::REF_ANNOTATION).map(String::as_str) == tag,
                }
            })
        });
        if let Some(d) = named {
            return Ok(d);
        }
        if descs.len() > 1 {
            return Err(SnapshotError::ImageNotInArchive { reference: r.to_owned() });
        }
    }
    layout::for_this_platform(descs).ok_or_else(|| SnapshotError::NoImage(layout::this_platform()))
}

fn import_oci(
    files: &HashMap<String, PathBuf>,
    cache: &LayerCache,
    holder: &str,
    reference: Option<&str>,
) -> Result<Image, SnapshotError> {
    let index = ImageIndex::from_file(member(files, "index.json")?).map_err(json_err("index.json"))?;
    let mut desc = pick(index.manifests(), reference)?.clone();
    // Nested indexes (multi-platform images) lead to the manifest.
    for _ in 0..4 {
        if *desc.media_type() != MediaType::ImageIndex {
            break;
        }
        let nested = ImageIndex::from_file(blob(files, &desc)?).map_err(json_err("nested index"))?;
        desc = pick(nested.manifests(), None)?.clone();
    }
    let manifest = ImageManifest::from_file(blob(files, &desc)?).map_err(json_err("manifest"))?;
    let config_path = blob(files, manifest.config())?;
    let config = ImageConfiguration::from_file(config_path).map_err(json_err("config"))?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(SnapshotError::LayerCount {
            what: "manifest",
            layers: manifest.layers().len(),
            diff_ids: diff_ids.len(),
        });
    }
    let mut layers = Vec::new();
    for (d, diff_id) in manifest.layers().iter().zip(diff_ids) {
        let path = blob(files, d)?;
        layers.push(unpack(cache, holder, diff_id, path)?);
    }
    Ok(Image {
        config_digest: manifest.config().digest().to_string(),
        manifest_digest: Some(desc.digest().to_string()),
        config: runtime_config(&config),
        layers,
    })
}

fn import_docker(
    files: &HashMap<String, PathBuf>,
    cache: &LayerCache,
    holder: &str,
    reference: Option<&str>,
) -> Result<Image, SnapshotError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        #[serde(default)]
        repo_tags: Option<Vec<String>>,
        layers: Vec<String>,
    }
    let path = member(files, "manifest.json")?;
    let text = fs::read(path).map_err(SnapshotError::io("read", path))?;
    let entries: Vec<Entry> = serde_json::from_slice(&text).map_err(SnapshotError::DockerManifest)?;
    let named =
        reference.and_then(|r| entries.iter().find(|e| e.repo_tags.as_ref().is_some_and(|t| t.iter().any(|t| t == r))));
    if let (None, Some(r)) = (named, reference)
        && entries.len() > 1
    {
        return Err(SnapshotError::ImageNotInArchive { reference: r.to_owned() });
    }
    let entry = named.or(entries.first()).ok_or_else(|| SnapshotError::NoImage("manifest.json".into()))?;
    let config_path = member(files, &entry.config)?;
    let (config_digest, _) = sha256_file(config_path)?;
    // Classic docker-save names the config after its digest: hold it to that.
    let stem = entry.config.trim_start_matches("blobs/sha256/").trim_end_matches(".json");
    if stem.len() == 64 && format!("sha256:{stem}") != config_digest {
        return Err(SnapshotError::DigestMismatch { expected: format!("sha256:{stem}"), actual: config_digest });
    }
    let config = ImageConfiguration::from_file(config_path).map_err(json_err("config"))?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != entry.layers.len() {
        return Err(SnapshotError::LayerCount {
            what: "manifest.json",
            layers: entry.layers.len(),
            diff_ids: diff_ids.len(),
        });
    }
    let mut layers = Vec::new();
    for (name, diff_id) in entry.layers.iter().zip(diff_ids) {
        layers.push(unpack(cache, holder, diff_id, member(files, name)?)?);
    }
    Ok(Image { config_digest, manifest_digest: None, config: runtime_config(&config), layers })
}

fn unpack(cache: &LayerCache, holder: &str, diff_id: &str, blob: &Path) -> Result<ImageLayer, SnapshotError> {
    let key = LayerKey::diff_id(diff_id)?;
    let path = cache
        .get_or_unpack(&key, holder, Some(diff_id), || File::open(blob).map_err(SnapshotError::io("open", blob)))?;
    Ok(ImageLayer { diff_id: diff_id.to_owned(), path })
}

fn runtime_config(c: &ImageConfiguration) -> ImageConfig {
    let Some(cfg) = c.config() else { return ImageConfig::default() };
    ImageConfig {
        env: cfg.env().clone().unwrap_or_default(),
        working_dir: cfg.working_dir().clone().filter(|w| !w.is_empty()),
        entrypoint: cfg.entrypoint().clone().unwrap_or_default(),
        cmd: cfg.cmd().clone().unwrap_or_default(),
        user: cfg.user().clone().filter(|u| !u.is_empty()),
    }
}
