//! The stored index of an image: what a host needs to create a vessel from
//! it without reading its archive (digests, runtime config, diff ids),
//! written beside the archive once the archive verified.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vessel_snapshot::image::{Image, ImageConfig, ImageLayer};

/// The format this build writes; another is ignored (the archive is read).
const VERSION: u32 = 1;

/// The index as stored (JSON, camelCase).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ImageIndex {
    version: u32,
    config_digest: String,
    manifest_digest: Option<String>,
    config: StoredConfig,
    diff_ids: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredConfig {
    env: Vec<String>,
    working_dir: Option<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    user: Option<String>,
}

impl ImageIndex {
    /// The index of a verified image.
    pub(crate) fn of(image: &Image) -> Self {
        let c = image.config.clone();
        Self {
            version: VERSION,
            config_digest: image.config_digest.clone(),
            manifest_digest: image.manifest_digest.clone(),
            config: StoredConfig {
                env: c.env,
                working_dir: c.working_dir,
                entrypoint: c.entrypoint,
                cmd: c.cmd,
                user: c.user,
            },
            diff_ids: image.layers.iter().map(|l| l.diff_id.clone()).collect(),
        }
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A stored index; `None` for one that does not parse or is of another version.
    pub(crate) fn parse(data: &[u8]) -> Option<Self> {
        serde_json::from_slice::<Self>(data).ok().filter(|i| i.version == VERSION)
    }

    /// The layers' diff ids, bottom first.
    pub(crate) fn diff_ids(&self) -> &[String] {
        &self.diff_ids
    }

    /// The image, each layer at the path `layer` gives for its diff id
    /// (`None` for one not at hand, which makes the whole `None`).
    pub(crate) fn image(self, mut layer: impl FnMut(&str) -> Option<PathBuf>) -> Option<Image> {
        let layers = self
            .diff_ids
            .into_iter()
            .map(|d| layer(&d).map(|path| ImageLayer { diff_id: d, path }))
            .collect::<Option<Vec<_>>>()?;
        let c = self.config;
        Some(Image {
            config_digest: self.config_digest,
            manifest_digest: self.manifest_digest,
            config: ImageConfig {
                env: c.env,
                working_dir: c.working_dir,
                entrypoint: c.entrypoint,
                cmd: c.cmd,
                user: c.user,
            },
            layers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Image {
        Image {
            config_digest: "sha256:c".into(),
            manifest_digest: Some("sha256:m".into()),
            config: ImageConfig {
                env: vec!["PATH=/bin".into()],
                working_dir: Some("/srv".into()),
                entrypoint: vec!["/bin/sh".into()],
                cmd: vec!["-c".into(), "true".into()],
                user: Some("1000:1000".into()),
            },
            layers: vec![ImageLayer { diff_id: "sha256:a".into(), path: "/x".into() }],
        }
    }

    #[test]
    fn an_index_reads_back_as_the_image_it_was_written_from() {
        let bytes = ImageIndex::of(&image()).to_bytes();
        let back = ImageIndex::parse(&bytes).unwrap().image(|d| Some(format!("/cache/{d}").into())).unwrap();
        assert_eq!(back.config, image().config);
        assert_eq!(back.config_digest, "sha256:c");
        assert_eq!(back.manifest_digest.as_deref(), Some("sha256:m"));
        assert_eq!(back.layers[0].path, PathBuf::from("/cache/sha256:a"));
        // The stored field names are the format: other versions of vessel read them.
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["diffIds"][0], "sha256:a");
        assert_eq!(v["config"]["workingDir"], "/srv");
    }

    #[test]
    fn another_version_a_missing_layer_or_garbage_is_no_index() {
        let mut v: serde_json::Value = serde_json::from_slice(&ImageIndex::of(&image()).to_bytes()).unwrap();
        v["version"] = 2.into();
        assert!(ImageIndex::parse(&serde_json::to_vec(&v).unwrap()).is_none());
        assert!(ImageIndex::parse(b"not json").is_none());
        let index = ImageIndex::parse(&ImageIndex::of(&image()).to_bytes()).unwrap();
        assert!(index.image(|_| None).is_none());
    }
}
