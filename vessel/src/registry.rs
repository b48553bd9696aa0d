//! Images from OCI registries, over the distribution API (`oci-client`).
//!
//! A pull resolves the reference (an index or manifest list to the host's
//! platform), streams the config and every layer to spool files under the
//! mount root (each verified against its digest as it arrives), writes
//! them as an OCI image layout archive and imports that like any archive
//! (layers unpacked and verified into the cache, the archive into storage),
//! so every host opens vessels from it. Nothing reaches storage before
//! everything verified; the spool goes whatever happens.
//!
//! Credentials, first match wins: those given in [`crate::ManagerConfig`]
//! for the registry, then docker's `config.json` (`$DOCKER_CONFIG` or
//! `~/.docker`, `auths.<registry>.auth` or `username`/`password`), then
//! none. Bearer tokens are fetched by `oci-client` when a registry asks.
//! As docker does, registries on loopback addresses are reached over plain
//! HTTP, any other only when named insecure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
pub use oci_client::secrets::RegistryAuth;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;

use crate::{Result, VesselError};

impl std::fmt::Display for PullFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotFound => "not found",
            Self::Unauthorized => "unauthorized",
            Self::Unreachable => "the registry is unreachable",
            Self::Corrupt => "what arrived does not match its digest",
            Self::Protocol => "the registry failed",
        })
    }
}

/// Why a pull failed, for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PullFailure {
    /// No such repository, tag, digest or platform.
    NotFound,
    /// The registry refused the credentials (or their absence).
    Unauthorized,
    /// The registry could not be reached.
    Unreachable,
    /// What arrived does not match its digest.
    Corrupt,
    /// Anything else the registry or the transfer did wrong.
    Protocol,
}

/// What a pull brought in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The reference, as stored.
    pub reference: String,
    /// Digest of the platform's image manifest.
    pub manifest_digest: String,
    /// Bytes of config and layers transferred.
    pub bytes: u64,
    /// Layers.
    pub layers: usize,
}

/// Progress of a pull: bytes so far of `total` (config and layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullProgress {
    /// Bytes received.
    pub done: u64,
    /// Bytes expected.
    pub total: u64,
}

/// How to reach registries.
#[derive(Clone, Default)]
pub(crate) struct Registries {
    pub(crate) auths: HashMap<String, RegistryAuth>,
    pub(crate) insecure: Vec<String>,
    pub(crate) docker_config: Option<PathBuf>,
    pub(crate) pull_on_demand: bool,
}

impl std::fmt::Debug for Registries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registries")
            .field("auths", &self.auths.keys().collect::<Vec<_>>())
            .field("insecure", &self.insecure)
            .field("docker_config", &self.docker_config)
            .field("pull_on_demand", &self.pull_on_demand)
            .finish()
    }
}

/// The registry `reference` is pulled from (`host[:port]`; `docker.io`
/// for a bare name such as `busybox`).
pub fn registry_of(reference: &str) -> Result<String> {
    let r: oci_client::Reference =
        reference.parse().map_err(|e| VesselError::InvalidInput(format!("image reference {reference:?}: {e}")))?;
    Ok(r.resolve_registry().to_owned())
}

/// Whether `registry` (host, maybe `:port`) is a loopback address.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry
            .rsplit_once(':')
            .map_or(registry, |(h, p)| if p.bytes().all(|b| b.is_ascii_digit()) { h } else { registry }),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Registries {
    fn docker_config_path(&self) -> Option<PathBuf> {
        self.docker_config.clone().or_else(|| {
            std::env::var_os("DOCKER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
                .map(|d| d.join("config.json"))
        })
    }

    /// The credentials for `registry`.
    fn auth(&self, registry: &str) -> Result<RegistryAuth> {
        if let Some(a) = self.auths.get(registry) {
            return Ok(a.clone());
        }
        let Some(path) = self.docker_config_path() else { return Ok(RegistryAuth::Anonymous) };
        let Ok(text) = std::fs::read(&path) else { return Ok(RegistryAuth::Anonymous) };
        let bad = |why: &str| VesselError::InvalidInput(format!("{}: {why}", path.display()));
        let doc: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(&e.to_string()))?;
        let names = [registry.to_owned(), format!("https://{registry}"), format!("http://{registry}")];
        let entry = names.iter().find_map(|n| doc["auths"].get(n));
        let Some(entry) = entry else { return Ok(RegistryAuth::Anonymous) };
        if let Some(b64) = entry["auth"].as_str() {
            use base64::Engine;
            let raw =
                base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| bad("an auth that is not base64"))?;
            let raw = String::from_utf8(raw).map_err(|_| bad("an auth that is not text"))?;
            let (user, pass) = raw.split_once(':').ok_or_else(|| bad("an auth without ':'"))?;
            return Ok(RegistryAuth::Basic(user.to_owned(), pass.to_owned()));
        }
        match (entry["username"].as_str(), entry["password"].as_str()) {
            (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u.to_owned(), p.to_owned())),
            _ => Ok(entry["registrytoken"]
                .as_str()
                .map_or(RegistryAuth::Anonymous, |t| RegistryAuth::Bearer(t.to_owned()))),
        }
    }

    fn client(&self, registry: &str) -> oci_client::Client {
        let mut plain: Vec<String> = self.insecure.clone();
        if is_loopback(registry) {
            plain.push(registry.to_owned());
        }
        oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain),
            // vessel picks the platform itself, keeping the index's bytes.
            platform_resolver: None,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        })
    }
}

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

fn fail(reference: &str, source: OciDistributionError) -> VesselError {
    let failure = match &source {
        OciDistributionError::ImageManifestNotFoundError(_) => PullFailure::NotFound,
        OciDistributionError::AuthenticationFailure(_) | OciDistributionError::UnauthorizedError { .. } => {
            PullFailure::Unauthorized
        }
        OciDistributionError::RegistryError { envelope, .. } => match envelope.errors.first().map(|e| &e.code) {
            Some(OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::BlobUnknown) => {
                PullFailure::NotFound
            }
            Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => PullFailure::Unauthorized,
            _ => PullFailure::Protocol,
        },
        OciDistributionError::ServerError { code, .. } => match code {
            401 | 403 => PullFailure::Unauthorized,
            404 => PullFailure::NotFound,
            _ => PullFailure::Protocol,
        },
        OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => PullFailure::Unreachable,
        OciDistributionError::DigestError(_) => PullFailure::Corrupt,
        _ => PullFailure::Protocol,
    };
    VesselError::Pull { reference: reference.to_owned(), failure, source: Box::new(source) }
}

fn pull_error(reference: &str, failure: PullFailure, why: String) -> VesselError {
    VesselError::Pull { reference: reference.to_owned(), failure, source: why.into() }
}

/// The host's platform as OCI names it.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        a => a,
    }
}

/// Counts what is written through it.
struct Counting<W> {
    inner: W,
    done: u64,
    base: u64,
    total: u64,
    progress: std::sync::Arc<dyn Fn(PullProgress) + Send + Sync>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counting<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.done += n as u64;
            (self.progress)(PullProgress { done: self.base + self.done, total: self.total });
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A directory removed on drop.
pub(crate) struct Spool(pub(crate) PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A blob to fetch: its descriptor and where it goes.
struct Blob {
    media_type: String,
    digest: String,
    size: u64,
}

fn descriptor_of(v: &serde_json::Value) -> Option<Blob> {
    Some(Blob {
        media_type: v["mediaType"].as_str().unwrap_or_default().to_owned(),
        digest: v["digest"].as_str()?.to_owned(),
        size: v["size"].as_u64().unwrap_or(0),
    })
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Pulls `reference` into `spool` as an OCI layout archive (`image.tar`).
pub(crate) async fn pull_to_archive(
    registries: &Registries,
    reference: &str,
    spool: &Path,
    progress: std::sync::Arc<dyn Fn(PullProgress) + Send + Sync>,
) -> Result<(PathBuf, PulledImage)> {
    let r: oci_client::Reference =
        reference.parse().map_err(|e| VesselError::InvalidInput(format!("image reference {reference:?}: {e}")))?;
    let registry = r.resolve_registry().to_owned();
    let auth = registries.auth(&registry)?;
    let client = registries.client(&registry);
    let accepted = [MANIFEST, INDEX, DOCKER_MANIFEST, DOCKER_LIST];
    let (mut bytes, _) = client.pull_manifest_raw(&r, &auth, &accepted).await.map_err(|e| fail(reference, e))?;
    let mut doc: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| pull_error(reference, PullFailure::Protocol, format!("a manifest that is not JSON: {e}")))?;
    if doc.get("manifests").is_some() {
        // An index: the entry for linux on this architecture.
        let entry = doc["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == host_arch())
            .and_then(descriptor_of)
            .ok_or_else(|| {
                pull_error(reference, PullFailure::NotFound, format!("no image for linux/{}", host_arch()))
            })?;
        let by_digest = r.clone_with_digest(entry.digest.clone());
        (bytes, _) = client.pull_manifest_raw(&by_digest, &auth, &accepted).await.map_err(|e| fail(reference, e))?;
        if sha256(&bytes) != entry.digest {
            return Err(pull_error(
                reference,
                PullFailure::Corrupt,
                format!("manifest {} does not match its digest", entry.digest),
            ));
        }
        doc = serde_json::from_slice(&bytes)
            .map_err(|e| pull_error(reference, PullFailure::Protocol, format!("a manifest that is not JSON: {e}")))?;
    } else if let Some(d) = r.digest()
        && sha256(&bytes) != d
    {
        return Err(pull_error(reference, PullFailure::Corrupt, format!("manifest {d} does not match its digest")));
    }
    // The archive names the manifest by the hash of the bytes it holds.
    let manifest_digest = sha256(&bytes);
    let config = doc
        .get("config")
        .and_then(descriptor_of)
        .ok_or_else(|| pull_error(reference, PullFailure::Protocol, "a manifest without a config".into()))?;
    let layers: Vec<Blob> = doc["layers"].as_array().into_iter().flatten().filter_map(descriptor_of).collect();
    let total: u64 = config.size + layers.iter().map(|l| l.size).sum::<u64>();
    let blobs_dir = spool.join("blobs");
    tokio::fs::create_dir_all(&blobs_dir).await.map_err(VesselError::io("create", &blobs_dir))?;
    let mut done = 0u64;
    let mut files = Vec::new();
    for blob in std::iter::once(&config).chain(&layers) {
        let hex = blob
            .digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                pull_error(reference, PullFailure::Protocol, format!("unsupported digest {:?}", blob.digest))
            })?;
        let path = blobs_dir.join(hex);
        let file = tokio::fs::File::create(&path).await.map_err(VesselError::io("create", &path))?;
        let out = Counting { inner: file, done: 0, base: done, total, progress: progress.clone() };
        let desc = OciDescriptor {
            media_type: blob.media_type.clone(),
            digest: blob.digest.clone(),
            size: i64::try_from(blob.size).unwrap_or(i64::MAX),
            urls: None,
            annotations: None,
            artifact_type: None,
        };
        let mut out = out;
        client.pull_blob(&r, &desc, &mut out).await.map_err(|e| fail(reference, e))?;
        out.inner.sync_all().await.map_err(VesselError::io("sync", &path))?;
        done += out.done;
        files.push((hex.to_owned(), path));
    }
    let archive = spool.join("image.tar");
    let (arch_path, manifest, reference_owned) = (archive.clone(), bytes.to_vec(), reference.to_owned());
    let mdigest = manifest_digest.clone();
    let tag = r.tag().unwrap_or("latest").to_owned();
    crate::task::blocking(move || write_layout(&arch_path, &manifest, &mdigest, &reference_owned, &tag, &files))
        .await??;
    Ok((archive, PulledImage { reference: reference.to_owned(), manifest_digest, bytes: done, layers: layers.len() }))
}

/// An OCI image layout archive of one image: its manifest and blobs.
fn write_layout(
    path: &Path,
    manifest: &[u8],
    manifest_digest: &str,
    reference: &str,
    tag: &str,
    blobs: &[(String, PathBuf)],
) -> Result<()> {
    let file = std::fs::File::create(path).map_err(VesselError::io("create", path))?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(file));
    let add = |b: &mut tar::Builder<_>, name: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data)
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": reference, "org.opencontainers.image.ref.name": tag},
        }],
    });
    let io = VesselError::io("write", path);
    let written = (|| -> std::io::Result<()> {
        add(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        add(&mut b, "index.json", index.to_string().as_bytes())?;
        let hex = manifest_digest.trim_start_matches("sha256:");
        add(&mut b, &format!("blobs/sha256/{hex}"), manifest)?;
        for (hex, p) in blobs {
            b.append_path_with_name(p, format!("blobs/sha256/{hex}"))?;
        }
        let f = b.into_inner()?.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    })();
    written.map_err(io)
}
