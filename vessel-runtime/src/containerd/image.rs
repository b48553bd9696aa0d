//! containerd's image store as vessel reads it: an image's target
//! descriptor and its blobs, through the images and content services.
//! Choosing this platform's manifest and writing the archive the snapshot
//! crate's reader verifies are the facade's (one way for every source).

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{GetImageRequest, ReadContentRequest};
use containerd_client::tonic::Code;
use oci_spec::image::{Descriptor, Digest, MediaType};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{ContainerdRuntime, grpc};
use crate::{ImageStore, RuntimeError};

#[async_trait::async_trait]
impl ImageStore for ContainerdRuntime {
    async fn image_target(&self, reference: &str) -> Result<Option<Descriptor>, RuntimeError> {
        let get =
            ImagesClient::new(self.channel.clone()).get(self.request(GetImageRequest { name: reference.into() })).await;
        let image = match get {
            Ok(r) => r.into_inner().image,
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(grpc("get image")(s)),
        };
        let bad = |reason: String| RuntimeError::ImageRecord { reference: reference.into(), reason };
        let target = image.and_then(|i| i.target).ok_or_else(|| bad("no target".into()))?;
        let digest: Digest = target.digest.parse().map_err(|e| bad(format!("target digest: {e}")))?;
        let size = u64::try_from(target.size).map_err(|_| bad(format!("target size {}", target.size)))?;
        Ok(Some(Descriptor::new(MediaType::from(target.media_type.as_str()), size, digest)))
    }

    async fn read_blob(
        &self,
        desc: &Descriptor,
        out: &mut (dyn AsyncWrite + Send + Unpin),
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
            out.write_all(&chunk.data)
                .await
                .map_err(RuntimeError::io("write image blob", desc.digest().to_string()))?;
        }
        if n != desc.size() {
            return Err(RuntimeError::BlobSize { digest: desc.digest().to_string(), read: n, declared: desc.size() });
        }
        Ok(())
    }
}
