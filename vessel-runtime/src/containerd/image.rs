//! Images from containerd's store: one image of the namespace, read through
//! the content service and streamed out as an OCI image layout archive, so
//! the snapshot crate's image reader (which verifies every digest) turns it
//! into cached layers exactly as it does an archive from storage.

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{GetImageRequest, ReadContentRequest};
use containerd_client::tonic::Code;
use oci_spec::image::{
    Arch, Descriptor, DescriptorBuilder, Digest, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType, Os,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{ContainerdRuntime, grpc};
use crate::{ImageStore, RuntimeError};

/// Manifests and indexes are small; a bigger one is refused rather than buffered.
const MAX_JSON_BLOB: u64 = 8 << 20;
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A blob's member name in the layout (`blobs/sha256/<hex>`); oci-spec
/// checked the digest's hex when it parsed it, so it never names another path.
fn member(desc: &Descriptor) -> Result<String, RuntimeError> {
    desc.as_digest_sha256()
        .map(|hex| format!("blobs/sha256/{hex}"))
        .ok_or_else(|| RuntimeError::Container(format!("unsupported digest {}", desc.digest())))
}

/// A manifest or an index, as the descriptor's media type (or, for an
/// untyped one, the blob itself) says.
enum Target {
    Manifest(Box<ImageManifest>),
    Index(Box<ImageIndex>),
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

#[async_trait::async_trait]
impl ImageStore for ContainerdRuntime {
    async fn has_image(&self, reference: &str) -> Result<bool, RuntimeError> {
        let get =
            ImagesClient::new(self.channel.clone()).get(self.request(GetImageRequest { name: reference.into() })).await;
        match get {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(grpc("get image")(s)),
        }
    }

    async fn export_image(
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
        let digest: Digest = image
            .digest
            .parse()
            .map_err(|e| RuntimeError::Container(format!("image {reference} target digest: {e}")))?;
        let size = u64::try_from(image.size).map_err(|_| RuntimeError::Container("negative size".into()))?;
        let mut desc = Descriptor::new(MediaType::from(image.media_type.as_str()), size, digest);
        // A multi-platform index leads to this platform's manifest (an
        // imported index may lack `platform`: then its first manifest).
        let mut manifest = None;
        for _ in 0..4 {
            match self.read_target(&desc).await? {
                Target::Manifest(m) => {
                    manifest = Some(m);
                    break;
                }
                Target::Index(index) => {
                    let list = index.manifests();
                    let here = |d: &&Descriptor| {
                        d.platform()
                            .as_ref()
                            .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::default())
                    };
                    desc = list
                        .iter()
                        .find(here)
                        .or_else(|| list.iter().find(|d| d.platform().is_none()))
                        .ok_or_else(|| {
                            RuntimeError::Container(format!(
                                "image {reference} has no manifest for linux/{}",
                                Arch::default()
                            ))
                        })?
                        .clone();
                }
            }
        }
        let manifest =
            manifest.ok_or_else(|| RuntimeError::Container(format!("image {reference}: indexes nested too deep")))?;
        let tagged = DescriptorBuilder::default()
            .media_type(desc.media_type().clone())
            .digest(desc.digest().clone())
            .size(desc.size())
            .annotations([("org.opencontainers.image.ref.name".to_owned(), reference.to_owned())])
            .build()
            .map_err(RuntimeError::Spec)?;
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(vec![tagged])
            .build()
            .map_err(RuntimeError::Spec)?;
        let io = |e: std::io::Error| RuntimeError::io("write image archive", "")(e);
        let mut written = 0u64;
        for (name, body) in [
            ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
            ("index.json", serde_json::to_vec(&index).map_err(RuntimeError::Json)?),
        ] {
            out.write_all(&header(name, body.len() as u64)?).await.map_err(io)?;
            out.write_all(&body).await.map_err(io)?;
            out.write_all(&[0; 512][..padding(body.len() as u64)]).await.map_err(io)?;
            written += 512 + body.len() as u64 + padding(body.len() as u64) as u64;
        }
        for blob in std::iter::once(&desc).chain(std::iter::once(manifest.config())).chain(manifest.layers()) {
            let size = blob.size();
            out.write_all(&header(&member(blob)?, size)?).await.map_err(io)?;
            self.copy_blob(blob, out).await?;
            out.write_all(&[0; 512][..padding(size)]).await.map_err(io)?;
            written += 512 + size + padding(size) as u64;
        }
        out.write_all(&[0; 1024]).await.map_err(io)?;
        out.flush().await.map_err(io)?;
        Ok(written + 1024)
    }
}

impl ContainerdRuntime {
    /// The manifest or index `desc` names, parsed by oci-spec.
    async fn read_target(&self, desc: &Descriptor) -> Result<Target, RuntimeError> {
        if desc.size() > MAX_JSON_BLOB {
            return Err(RuntimeError::Container(format!(
                "{} is {} bytes, too big for a manifest",
                desc.digest(),
                desc.size()
            )));
        }
        let mut buf = Vec::new();
        self.copy_blob(desc, &mut buf).await?;
        let index = || ImageIndex::from_reader(&buf[..]).map(|i| Target::Index(Box::new(i)));
        let parsed = match desc.media_type() {
            MediaType::ImageIndex => index(),
            MediaType::Other(t) if t == DOCKER_LIST => index(),
            _ => ImageManifest::from_reader(&buf[..])
                .map(|m| Target::Manifest(Box::new(m)))
                .or_else(|e| index().map_err(|_| e)),
        };
        parsed.map_err(|source| RuntimeError::Blob { digest: desc.digest().to_string(), source })
    }

    /// Streams one blob out of the content store; exactly `desc.size` bytes
    /// or an error (digests are verified by the reader of the archive).
    async fn copy_blob(
        &self,
        desc: &Descriptor,
        out: &mut (impl AsyncWrite + Unpin + ?Sized),
    ) -> Result<(), RuntimeError> {
        let read = ReadContentRequest { digest: desc.digest().to_string(), offset: 0, size: 0 };
        let mut stream = ContentClient::new(self.channel.clone())
            .read(self.request(read))
            .await
            .map_err(grpc("read content"))?
            .into_inner();
        let mut n = 0u64;
        while let Some(chunk) = stream.message().await.map_err(grpc("read content"))? {
            n += chunk.data.len() as u64;
            if n > desc.size() {
                break;
            }
            out.write_all(&chunk.data).await.map_err(RuntimeError::io("write image archive", ""))?;
        }
        if n != desc.size() {
            return Err(RuntimeError::Container(format!(
                "blob {} has {n}+ bytes in containerd, its descriptor says {}",
                desc.digest(),
                desc.size()
            )));
        }
        Ok(())
    }
}
