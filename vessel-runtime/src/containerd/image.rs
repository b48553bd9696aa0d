//! Images from containerd's store: one image of the namespace, read through
//! the content service and streamed out as an OCI image layout archive, so
//! the snapshot crate's image reader (which verifies every digest) turns it
//! into cached layers exactly as it does an archive from storage.

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{GetImageRequest, ReadContentRequest};
use containerd_client::tonic::Code;
use serde_json::{Value, json};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{ContainerdRuntime, grpc};
use crate::RuntimeError;

/// Manifests and indexes are small; a bigger one is refused rather than buffered.
const MAX_JSON_BLOB: i64 = 8 << 20;
const INDEX_TYPES: [&str; 2] =
    ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];

/// A content descriptor, as containerd and the OCI spec write it.
#[derive(Debug, Clone)]
struct Desc {
    media_type: String,
    digest: String,
    size: i64,
}

impl Desc {
    fn from_json(v: &Value) -> Result<Self, RuntimeError> {
        let bad = || RuntimeError::Container(format!("malformed descriptor {v}"));
        Ok(Self {
            media_type: v["mediaType"].as_str().unwrap_or_default().to_owned(),
            digest: v["digest"].as_str().ok_or_else(bad)?.to_owned(),
            size: v["size"].as_i64().ok_or_else(bad)?,
        })
    }

    /// The blob's member name in the layout (`blobs/sha256/<hex>`); the
    /// digest is checked so it can never name another path.
    fn member(&self) -> Result<String, RuntimeError> {
        match self.digest.strip_prefix("sha256:") {
            Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Ok(format!("blobs/sha256/{hex}"))
            }
            _ => Err(RuntimeError::Container(format!("unsupported digest {:?}", self.digest))),
        }
    }
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A tar header for a regular file `name` of `size` bytes.
fn header(name: &str, size: u64) -> Result<[u8; 512], RuntimeError> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).map_err(|e| RuntimeError::Container(format!("tar name {name}: {e}")))?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = [0u8; 512];
    out.copy_from_slice(h.as_bytes());
    Ok(out)
}

fn padding(size: u64) -> usize {
    ((512 - size % 512) % 512) as usize
}

impl ContainerdRuntime {
    /// Whether `reference` names an image in the namespace's image store.
    pub async fn has_image(&self, reference: &str) -> Result<bool, RuntimeError> {
        let get =
            ImagesClient::new(self.channel.clone()).get(self.request(GetImageRequest { name: reference.into() })).await;
        match get {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(grpc("get image")(s)),
        }
    }

    /// Writes the image `reference` of the namespace's store to `out` as an
    /// OCI image layout archive (this platform's manifest only, tagged
    /// `reference`); returns the archive's size.
    pub async fn export_image(
        &self,
        reference: &str,
        out: &mut (dyn AsyncWrite + Send + Unpin),
    ) -> Result<u64, RuntimeError> {
        let image = ImagesClient::new(self.channel.clone())
            .get(self.request(GetImageRequest { name: reference.into() }))
            .await
            .map_err(|s| {
                if s.code() == Code::NotFound {
                    RuntimeError::ImageNotFound(reference.into())
                } else {
                    grpc("get image")(s)
                }
            })?
            .into_inner()
            .image
            .and_then(|i| i.target)
            .ok_or_else(|| RuntimeError::Container(format!("image {reference} has no target")))?;
        let mut desc = Desc { media_type: image.media_type, digest: image.digest, size: image.size };
        let mut manifest = self.read_json(&desc).await?;
        // A multi-platform index leads to this platform's manifest (an
        // imported index may lack `platform`: then its first manifest).
        for _ in 0..4 {
            if !INDEX_TYPES.contains(&desc.media_type.as_str()) && manifest.get("manifests").is_none() {
                break;
            }
            let list = manifest["manifests"].as_array().cloned().unwrap_or_default();
            let chosen = list
                .iter()
                .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == go_arch())
                .or_else(|| list.iter().find(|m| m.get("platform").is_none()))
                .ok_or_else(|| {
                    RuntimeError::Container(format!("image {reference} has no manifest for linux/{}", go_arch()))
                })?;
            desc = Desc::from_json(chosen)?;
            manifest = self.read_json(&desc).await?;
        }
        let config = Desc::from_json(&manifest["config"])?;
        let layers = manifest["layers"]
            .as_array()
            .ok_or_else(|| RuntimeError::Container(format!("manifest {} has no layers", desc.digest)))?
            .iter()
            .map(Desc::from_json)
            .collect::<Result<Vec<_>, _>>()?;

        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": desc.media_type,
                "digest": desc.digest,
                "size": desc.size,
                "annotations": { "org.opencontainers.image.ref.name": reference },
            }],
        });
        let io = |e: std::io::Error| RuntimeError::io("write image archive", "")(e);
        let mut written = 0u64;
        for (name, body) in [
            ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
            ("index.json", serde_json::to_vec(&index).map_err(|e| RuntimeError::Container(e.to_string()))?),
        ] {
            out.write_all(&header(name, body.len() as u64)?).await.map_err(io)?;
            out.write_all(&body).await.map_err(io)?;
            out.write_all(&[0; 512][..padding(body.len() as u64)]).await.map_err(io)?;
            written += 512 + body.len() as u64 + padding(body.len() as u64) as u64;
        }
        for blob in std::iter::once(&desc).chain(std::iter::once(&config)).chain(&layers) {
            let size = u64::try_from(blob.size).map_err(|_| RuntimeError::Container("negative size".into()))?;
            out.write_all(&header(&blob.member()?, size)?).await.map_err(io)?;
            self.copy_blob(blob, out).await?;
            out.write_all(&[0; 512][..padding(size)]).await.map_err(io)?;
            written += 512 + size + padding(size) as u64;
        }
        out.write_all(&[0; 1024]).await.map_err(io)?;
        out.flush().await.map_err(io)?;
        Ok(written + 1024)
    }

    async fn read_json(&self, desc: &Desc) -> Result<Value, RuntimeError> {
        if desc.size > MAX_JSON_BLOB {
            return Err(RuntimeError::Container(format!(
                "{} is {} bytes, too big for a manifest",
                desc.digest, desc.size
            )));
        }
        let mut buf = Vec::new();
        self.copy_blob(desc, &mut buf).await?;
        serde_json::from_slice(&buf).map_err(|e| RuntimeError::Container(format!("blob {}: {e}", desc.digest)))
    }

    /// Streams one blob out of the content store; exactly `desc.size` bytes
    /// or an error (digests are verified by the reader of the archive).
    async fn copy_blob(&self, desc: &Desc, out: &mut (impl AsyncWrite + Unpin + ?Sized)) -> Result<(), RuntimeError> {
        let read = ReadContentRequest { digest: desc.digest.clone(), offset: 0, size: 0 };
        let mut stream = ContentClient::new(self.channel.clone())
            .read(self.request(read))
            .await
            .map_err(grpc("read content"))?
            .into_inner();
        let mut n = 0i64;
        while let Some(chunk) = stream.message().await.map_err(grpc("read content"))? {
            n += chunk.data.len() as i64;
            if n > desc.size {
                break;
            }
            out.write_all(&chunk.data).await.map_err(RuntimeError::io("write image archive", ""))?;
        }
        if n != desc.size {
            return Err(RuntimeError::Container(format!(
                "blob {} has {n}+ bytes in containerd, its descriptor says {}",
                desc.digest, desc.size
            )));
        }
        Ok(())
    }
}
