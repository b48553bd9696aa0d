//! The OCI image layout as vessel writes it, and the one platform picker.
//!
//! Three sources hand vessel an image: an archive (import), a registry
//! (pull) and containerd's content store (export). The two that are not
//! archives already become one, an OCI layout tar of a single image (this
//! platform's manifest, tagged with the reference), which [`super::unpack_image`]
//! then reads like any archive. This module is that tar's encoder, free of
//! I/O (each caller streams blobs its own way, sync or async), and the
//! choice of a manifest in an index, shared by all three.

use oci_spec::image::{
    Arch, Descriptor, DescriptorBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType, Os,
};

use crate::SnapshotError;

/// Annotation naming an image by its whole reference (containerd, vessel).
pub const NAME_ANNOTATION: &str = "io.containerd.image.name";
/// Annotation naming an image by its tag (the OCI layout's own).
pub const REF_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// The zero blocks that end a tar stream.
pub const END: [u8; 1024] = [0; 1024];

/// Manifests and indexes are small; a bigger one is refused rather than buffered.
pub const MAX_JSON_BLOB: u64 = 8 << 20;

/// Media type of docker's manifest list (an index by another name).
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The descriptor for linux on this host's architecture, else the first
/// without a platform (some tools write indexes without one).
pub fn for_this_platform(descs: &[Descriptor]) -> Option<&Descriptor> {
    let here = |d: &&Descriptor| {
        d.platform().as_ref().is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::default())
    };
    descs.iter().find(here).or_else(|| descs.iter().find(|d| d.platform().is_none()))
}

/// This host's platform, as an error names it (`linux/amd64`).
pub fn this_platform() -> String {
    format!("{}/{}", Os::Linux, Arch::default())
}

/// A document an image descriptor points at.
#[derive(Debug)]
pub enum Target {
    /// An image manifest.
    Manifest(Box<ImageManifest>),
    /// An index (or docker manifest list) of manifests.
    Index(Box<ImageIndex>),
}

/// Parses the manifest or index `bytes`, as `media_type` says (an
/// untyped or unknown one: whichever of the two parses).
pub fn parse_target(media_type: &MediaType, bytes: &[u8]) -> Result<Target, SnapshotError> {
    let index = || ImageIndex::from_reader(bytes).map(|i| Target::Index(Box::new(i)));
    let parsed = match media_type {
        MediaType::ImageIndex => index(),
        MediaType::Other(t) if t == DOCKER_LIST => index(),
        _ => {
            ImageManifest::from_reader(bytes).map(|m| Target::Manifest(Box::new(m))).or_else(|e| index().map_err(|_| e))
        }
    };
    parsed.map_err(|source| SnapshotError::ImageDocument { what: "manifest", source })
}

/// A blob's member name in the layout (`blobs/sha256/<hex>`); oci-spec
/// checked the digest's hex when it parsed it, so it names no other path.
pub fn member(desc: &Descriptor) -> Result<String, SnapshotError> {
    desc.as_digest_sha256()
        .map(|hex| format!("blobs/sha256/{hex}"))
        .ok_or_else(|| SnapshotError::UnsupportedDigest(desc.digest().to_string()))
}

/// The tar header of a regular member `name` of `size` bytes.
pub fn header(name: &str, size: u64) -> Result<[u8; 512], SnapshotError> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).map_err(|source| SnapshotError::Archive { op: "name a member", source })?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = [0u8; 512];
    out.copy_from_slice(h.as_bytes());
    Ok(out)
}

/// The zeros that pad a member of `size` bytes to a whole block.
pub fn padding(size: u64) -> &'static [u8] {
    &[0u8; 512][..((512 - size % 512) % 512) as usize]
}

/// The bytes a member of `size` bytes takes in the tar stream.
pub fn member_len(size: u64) -> u64 {
    512 + size + padding(size).len() as u64
}

/// The layout's first members, `oci-layout` and `index.json` (naming
/// `manifest`, the image's manifest, as `reference`), as tar bytes; the
/// caller sends each blob next (`header(&member(d)?, size)`, the bytes,
/// `padding(size)`), the manifest's first, then [`END`].
pub fn head(manifest: &Descriptor, reference: &str) -> Result<Vec<u8>, SnapshotError> {
    let tag = reference.rsplit_once(':').map(|(_, t)| t).filter(|t| !t.contains('/')).unwrap_or("latest");
    let tagged = DescriptorBuilder::default()
        .media_type(MediaType::ImageManifest)
        .digest(manifest.digest().clone())
        .size(manifest.size())
        .annotations([(NAME_ANNOTATION.to_owned(), reference.to_owned()), (REF_ANNOTATION.to_owned(), tag.to_owned())])
        .build()
        .map_err(|source| SnapshotError::ImageDocument { what: "index", source })?;
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![tagged])
        .build()
        .map_err(|source| SnapshotError::ImageDocument { what: "index", source })?;
    let index =
        serde_json::to_vec(&index).map_err(|e| SnapshotError::Archive { op: "encode index.json", source: e.into() })?;
    let mut out = Vec::with_capacity(4096);
    for (name, body) in [("oci-layout", &br#"{"imageLayoutVersion":"1.0.0"}"#[..]), ("index.json", &index[..])] {
        out.extend_from_slice(&header(name, body.len() as u64)?);
        out.extend_from_slice(body);
        out.extend_from_slice(padding(body.len() as u64));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{Digest, PlatformBuilder};

    fn desc(platform: Option<(Os, Arch)>, n: u8) -> Descriptor {
        let digest: Digest = format!("sha256:{}", format!("{n:02x}").repeat(32)).parse().unwrap();
        let mut d = Descriptor::new(MediaType::ImageManifest, 10, digest);
        if let Some((os, arch)) = platform {
            d.set_platform(Some(PlatformBuilder::default().os(os).architecture(arch).build().unwrap()));
        }
        d
    }

    #[test]
    fn the_platform_picker_prefers_this_platform_then_an_untyped_entry() {
        let other = if Arch::default() == Arch::ARM64 { Arch::Amd64 } else { Arch::ARM64 };
        let descs =
            [desc(None, 1), desc(Some((Os::Linux, other.clone())), 2), desc(Some((Os::Linux, Arch::default())), 3)];
        assert_eq!(for_this_platform(&descs).map(|d| d.size()), Some(10));
        assert_eq!(for_this_platform(&descs).unwrap().digest(), descs[2].digest());
        assert_eq!(for_this_platform(&descs[..2]).unwrap().digest(), descs[0].digest());
        assert!(for_this_platform(&descs[1..2]).is_none());
        assert!(for_this_platform(&[desc(Some((Os::Windows, Arch::default())), 4)]).is_none());
    }

    #[test]
    fn a_layout_reads_back_as_one_tagged_image() {
        let manifest = desc(None, 7);
        let mut tar = head(&manifest, "localhost:5000/team/app:v1").unwrap();
        let body = b"blob";
        tar.extend_from_slice(&header(&member(&manifest).unwrap(), body.len() as u64).unwrap());
        tar.extend_from_slice(body);
        tar.extend_from_slice(padding(body.len() as u64));
        tar.extend_from_slice(&END);
        assert_eq!(tar.len() % 512, 0);
        assert_eq!(member_len(4), 1024);
        let mut names = Vec::new();
        let mut index = Vec::new();
        for e in tar::Archive::new(&tar[..]).entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            if name == "index.json" {
                std::io::Read::read_to_end(&mut e, &mut index).unwrap();
            }
            names.push(name);
        }
        assert_eq!(names, ["oci-layout", "index.json", &format!("blobs/sha256/{}", "07".repeat(32))]);
        let index = ImageIndex::from_reader(&index[..]).unwrap();
        let a = index.manifests()[0].annotations().clone().unwrap();
        assert_eq!(a[NAME_ANNOTATION], "localhost:5000/team/app:v1");
        assert_eq!(a[REF_ANNOTATION], "v1");
    }

    #[test]
    fn a_document_parses_as_its_media_type_says() {
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(parse_target(&MediaType::ImageIndex, index), Ok(Target::Index(_))));
        assert!(matches!(parse_target(&MediaType::Other(String::new()), index), Ok(Target::Index(_))));
        let err = parse_target(&MediaType::ImageManifest, b"{}").unwrap_err();
        assert!(matches!(err, SnapshotError::ImageDocument { .. }), "{err:?}");
    }
}
