//! Images from OCI registries, over the distribution API (`oci-client`).
//!
//! A pull resolves the reference (an index or manifest list to the host's
//! platform), streams the config and every layer into an OCI image layout
//! archive spooled under the mount root (each verified against its digest
//! as it arrives), and imports that like any archive
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
use oci_spec::image::{Descriptor, MediaType};
use tokio::io::AsyncWrite;

use super::images::{LayoutWriter, platform_manifest, sha256};
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

/// Pulls `reference` into `spool` as an OCI layout archive (`image.tar`):
/// this platform's manifest, its config and layers, each blob verified
/// against its digest as it arrives (by `oci-client`), the manifests here.
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
    let (bytes, _) = client.pull_manifest_raw(&r, &auth, &accepted).await.map_err(|e| fail(reference, e))?;
    let first_digest = sha256(&bytes);
    if let Some(d) = r.digest()
        && first_digest != d
    {
        return Err(pull_error(reference, PullFailure::Corrupt, format!("manifest {d} does not match its digest")));
    }
    let untyped = MediaType::Other(String::new());
    let first = Descriptor::new(
        untyped,
        bytes.len() as u64,
        first_digest.parse::<oci_spec::image::Digest>().map_err(|e| protocol(reference, e))?,
    );
    let fetch = |d: Descriptor| {
        let by_digest = r.clone_with_digest(d.digest().to_string());
        let (client, auth) = (&client, &auth);
        async move {
            let (bytes, _) =
                client.pull_manifest_raw(&by_digest, auth, &accepted).await.map_err(|e| fail(reference, e))?;
            Ok(bytes.to_vec())
        }
    };
    let (desc, bytes, manifest) =
        platform_manifest(first, bytes.to_vec(), fetch).await.map_err(|e| manifest_error(reference, e))?;
    // The archive names the manifest by the hash of the bytes it holds.
    let manifest_digest = desc.digest().to_string();
    let total: u64 = manifest.config().size() + manifest.layers().iter().map(Descriptor::size).sum::<u64>();
    let archive = spool.join("image.tar");
    let file = tokio::fs::File::create(&archive).await.map_err(VesselError::io("create", &archive))?;
    let mut out = LayoutWriter::start(tokio::io::BufWriter::new(file), &desc, &bytes, reference).await?;
    let mut done = 0u64;
    for blob in std::iter::once(manifest.config()).chain(manifest.layers()) {
        let desc = OciDescriptor {
            media_type: blob.media_type().to_string(),
            digest: blob.digest().to_string(),
            size: i64::try_from(blob.size()).unwrap_or(i64::MAX),
            urls: None,
            annotations: None,
            artifact_type: None,
        };
        out.begin(blob).await?;
        let mut counted = Counting { inner: &mut out.out, done: 0, base: done, total, progress: progress.clone() };
        client.pull_blob(&r, &desc, &mut counted).await.map_err(|e| fail(reference, e))?;
        if counted.done != blob.size() {
            let why = format!("blob {} has {} bytes, its descriptor says {}", blob.digest(), counted.done, blob.size());
            return Err(pull_error(reference, PullFailure::Corrupt, why));
        }
        done += counted.done;
        out.end(blob).await?;
    }
    let file = out.finish().await?.into_inner();
    file.sync_all().await.map_err(VesselError::io("sync", &archive))?;
    let layers = manifest.layers().len();
    Ok((archive, PulledImage { reference: reference.to_owned(), manifest_digest, bytes: done, layers }))
}

fn protocol(reference: &str, e: impl std::fmt::Display) -> VesselError {
    pull_error(reference, PullFailure::Protocol, e.to_string())
}

/// A registry's manifest or index that leads to no manifest for this
/// platform, as a pull failure.
fn manifest_error(reference: &str, e: VesselError) -> VesselError {
    use vessel_snapshot::SnapshotError as S;
    let failure = match &e {
        VesselError::Pull { .. } => return e,
        VesselError::Snapshot(S::NoImage(_)) => PullFailure::NotFound,
        VesselError::Snapshot(S::DigestMismatch { .. }) => PullFailure::Corrupt,
        _ => PullFailure::Protocol,
    };
    VesselError::Pull { reference: reference.to_owned(), failure, source: Box::new(e) }
}
