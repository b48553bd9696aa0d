//! Images into the layer cache: from storage (its index, else its
//! archive), containerd's image store or a registry. Whatever the source,
//! what is unpacked is an archive that the snapshot crate's reader verifies
//! digest by digest; the containerd store and a registry are first written
//! as one OCI layout (`vessel_snapshot::image::layout`), this platform's
//! manifest chosen the one way every source shares ([`platform_manifest`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_spec::image::{Descriptor, ImageManifest};
use sha2::Digest;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use vessel_core::{ImageRef, VesselId};
use vessel_snapshot::LayerKey;
use vessel_snapshot::image::layout::{self, Target};
use vessel_snapshot::image::{Image, unpack_image};
use vessel_storage::{BlobReader, StorageErrorKind};

use super::Layers;
use super::index::ImageIndex;
use super::registry::{PullProgress, PulledImage};
use crate::error::{Result, VesselError};

/// A layout archive being written beside its reader.
type ExportJob = tokio::task::JoinHandle<Result<()>>;

/// How deep indexes may nest before the manifest.
const MAX_NESTING: usize = 4;

/// A temporary file or directory removed when dropped.
pub(crate) struct Spool(pub(crate) PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0).or_else(|_| fs::remove_file(&self.0));
    }
}

/// `sha256:<hex>` of `data`.
pub(crate) fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(data))
}

/// Follows `desc` (whose document is `bytes`) through indexes to this
/// platform's manifest, fetching each nested document with `fetch` and
/// checking it against its descriptor; returns the manifest's descriptor,
/// bytes and parsed form.
pub(crate) async fn platform_manifest<F>(
    mut desc: Descriptor,
    mut bytes: Vec<u8>,
    mut fetch: impl FnMut(Descriptor) -> F,
) -> Result<(Descriptor, Vec<u8>, ImageManifest)>
where
    F: Future<Output = Result<Vec<u8>>>,
{
    use vessel_snapshot::SnapshotError as E;
    for _ in 0..MAX_NESTING {
        let index = match layout::parse_target(desc.media_type(), &bytes)? {
            Target::Manifest(m) => return Ok((desc, bytes, *m)),
            Target::Index(i) => i,
        };
        desc = layout::for_this_platform(index.manifests()).ok_or_else(|| E::NoImage(layout::this_platform()))?.clone();
        if desc.size() > layout::MAX_JSON_BLOB {
            return Err(E::SizeMismatch {
                digest: desc.digest().to_string(),
                actual: desc.size(),
                declared: layout::MAX_JSON_BLOB,
            }
            .into());
        }
        bytes = fetch(desc.clone()).await?;
        let actual = sha256(&bytes);
        if actual != desc.digest().to_string() {
            return Err(E::DigestMismatch { expected: desc.digest().to_string(), actual }.into());
        }
    }
    Err(E::NoImage(format!("{} (indexes nested deeper than {MAX_NESTING})", layout::this_platform())).into())
}

/// Writes one image as an OCI layout tar to an async stream: the head and
/// manifest, then each blob between [`Self::begin`] and [`Self::end`] (the
/// caller streams exactly its size into `out`).
pub(crate) struct LayoutWriter<W> {
    pub(crate) out: W,
}

impl<W: AsyncWrite + Unpin> LayoutWriter<W> {
    /// Starts the layout of `reference`, whose manifest is `manifest`
    /// (`bytes`), and writes the manifest.
    pub(crate) async fn start(mut out: W, manifest: &Descriptor, bytes: &[u8], reference: &str) -> Result<Self> {
        let io = VesselError::io("write image archive", reference);
        out.write_all(&layout::head(manifest, reference)?).await.map_err(io)?;
        let mut w = Self { out };
        w.begin(manifest).await?;
        w.out.write_all(bytes).await.map_err(VesselError::io("write image archive", reference))?;
        w.end(manifest).await?;
        Ok(w)
    }

    /// Starts blob `desc`: its header.
    pub(crate) async fn begin(&mut self, desc: &Descriptor) -> Result<()> {
        let io = VesselError::io("write image archive", desc.digest().to_string());
        self.out.write_all(&layout::header(&layout::member(desc)?, desc.size())?).await.map_err(io)
    }

    /// Ends blob `desc`: its padding.
    pub(crate) async fn end(&mut self, desc: &Descriptor) -> Result<()> {
        let io = VesselError::io("write image archive", desc.digest().to_string());
        self.out.write_all(layout::padding(desc.size())).await.map_err(io)
    }

    /// Ends the archive and flushes it; gives the stream back.
    pub(crate) async fn finish(mut self) -> Result<W> {
        let io = VesselError::io("write image archive", "");
        self.out.write_all(&layout::END).await.map_err(io)?;
        self.out.flush().await.map_err(VesselError::io("write image archive", ""))?;
        Ok(self.out)
    }
}

/// The layer-cache holder for what an imported image keeps cached:
/// `image-` and a hash of the reference (holders are plain names).
fn image_holder(reference: &ImageRef) -> String {
    sha256(reference.as_str().as_bytes()).replacen("sha256:", "image-", 1)[..38].to_owned()
}

impl Layers {
    /// Imports `reference` into the layer cache for `holder`: from storage,
    /// or (containerd backend) from containerd's image store, or its
    /// registry when pulling on demand.
    pub(crate) async fn image(&self, reference: &ImageRef, holder: &VesselId) -> Result<Image> {
        if let Some(image) = self.cached_image(reference, holder).await {
            return Ok(image);
        }
        let mut export = None;
        let reader: BlobReader = match self.storage.load_image(reference).await {
            Ok(r) => r,
            Err(e) if e.kind() == StorageErrorKind::NotFound => match self.store_export(reference).await? {
                Some((r, job)) => {
                    export = Some(job);
                    r
                }
                None if self.registries.pull_on_demand => {
                    self.pull(reference, Arc::new(|_| {})).await?;
                    self.storage.load_image(reference).await?
                }
                None => return Err(VesselError::ImageNotFound(reference.to_string())),
            },
            Err(e) => return Err(e.into()),
        };
        let (cache, holder, name) = (self.cache.clone(), holder.to_string(), reference.as_str().to_owned());
        let imported = crate::task::blocking(move || {
            let reader = tokio_util::io::SyncIoBridge::new(reader);
            unpack_image(reader, &cache, &holder, Some(&name))
        })
        .await?;
        if let Some(export) = export {
            // The exporter's own error explains a truncated archive best.
            crate::task::joined(export).await??;
        }
        Ok(imported?)
    }

    /// `reference` streamed out of the backend's image store (containerd)
    /// as an OCI layout, with the job writing it; `None` where it is not there.
    async fn store_export(&self, reference: &ImageRef) -> Result<Option<(BlobReader, ExportJob)>> {
        let Some(store) = self.images.clone() else { return Ok(None) };
        let Some(target) = store.image_target(reference.as_str()).await? else { return Ok(None) };
        let read = |d: Descriptor| {
            let store = store.clone();
            async move {
                let mut buf = Vec::new();
                store.read_blob(&d, &mut buf).await?;
                Ok(buf)
            }
        };
        if target.size() > layout::MAX_JSON_BLOB {
            return Err(vessel_snapshot::SnapshotError::SizeMismatch {
                digest: target.digest().to_string(),
                actual: target.size(),
                declared: layout::MAX_JSON_BLOB,
            }
            .into());
        }
        let first = read(target.clone()).await?;
        let (desc, bytes, manifest) = platform_manifest(target, first, read).await?;
        let (w, r) = tokio::io::duplex(1 << 20);
        let name = reference.as_str().to_owned();
        let job = tokio::spawn(async move {
            let mut out = LayoutWriter::start(w, &desc, &bytes, &name).await?;
            for blob in std::iter::once(manifest.config()).chain(manifest.layers()) {
                out.begin(blob).await?;
                store.read_blob(blob, &mut out.out).await?;
                out.end(blob).await?;
            }
            out.finish().await.map(drop)
        });
        Ok(Some((Box::new(r), job)))
    }

    /// Pulls `reference` from its registry into storage (see [`super::registry`]).
    pub(crate) async fn pull(
        &self,
        reference: &ImageRef,
        progress: Arc<dyn Fn(PullProgress) + Send + Sync>,
    ) -> Result<PulledImage> {
        let spool = Spool(self.spool.join(format!(".pull-{:016x}", rand::random::<u64>())));
        fs::create_dir(&spool.0).map_err(VesselError::io("create", &spool.0))?;
        let (archive, pulled) =
            super::registry::pull_to_archive(&self.registries, reference.as_str(), &spool.0, progress).await?;
        self.store_image_file(reference, &archive).await?;
        Ok(pulled)
    }

    /// Spools `archive` to a file on the mount root's disk (memory stays
    /// bounded), then stores it as [`Self::store_image_file`] does.
    pub(crate) async fn import(&self, reference: &ImageRef, mut archive: BlobReader) -> Result<()> {
        let spool = Spool(self.spool.join(format!(".import-{:016x}.tmp", rand::random::<u64>())));
        {
            let mut f = tokio::fs::File::create(&spool.0).await.map_err(VesselError::io("create", &spool.0))?;
            tokio::io::copy(&mut archive, &mut f)
                .await
                .map_err(VesselError::io("read image archive", reference.as_str()))?;
            f.sync_all().await.map_err(VesselError::io("sync", &spool.0))?;
        }
        self.store_image_file(reference, &spool.0).await
    }

    /// Checks the image archive at `path` (every digest verified, its layers
    /// unpacked into the cache) and stores it as `reference`.
    pub(crate) async fn store_image_file(&self, reference: &ImageRef, path: &Path) -> Result<()> {
        let (cache, name, p) = (self.cache.clone(), reference.as_str().to_owned(), path.to_path_buf());
        // The image holds its layers in this host's cache (as docker keeps
        // an image's layers until it is removed), so creating vessels from
        // it unpacks nothing even after its last vessel is gone. What an
        // earlier import of this reference held is let go first.
        let holder = image_holder(reference);
        let image = crate::task::blocking(move || {
            cache.release_all(&holder)?;
            let file = fs::File::open(&p).map_err(VesselError::io("open", &p))?;
            unpack_image(std::io::BufReader::new(file), &cache, &holder, Some(&name)).map_err(VesselError::from)
        })
        .await??;
        // The index goes first and comes last: never one of another archive.
        self.storage.delete_image_index(reference).await?;
        let file = tokio::fs::File::open(path).await.map_err(VesselError::io("open", path))?;
        self.storage.save_image(reference, Box::new(tokio::io::BufReader::new(file))).await?;
        self.storage.save_image_index(reference, ImageIndex::of(&image).to_bytes()).await?;
        Ok(())
    }

    /// `reference` from its stored index when this host's cache holds
    /// every layer (retained for `holder`): no archive read.
    async fn cached_image(&self, reference: &ImageRef, holder: &VesselId) -> Option<Image> {
        let index = ImageIndex::parse(&self.storage.load_image_index(reference).await.ok()?)?;
        let mut retained = Vec::with_capacity(index.diff_ids().len());
        let image = index.image(|diff_id| {
            let key = LayerKey::diff_id(diff_id).ok()?;
            let held = self.cache.retain(&key, holder.as_str()).ok()?;
            let path = self.cache.path(&key);
            retained.push(key);
            held.then_some(path)
        });
        if image.is_none() {
            // Some layer is missing here: what this attempt retained goes back.
            for key in retained {
                let _ = self.cache.release(&key, holder.as_str());
            }
        }
        image
    }
}
