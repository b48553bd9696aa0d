//! Deterministic inputs for the criterion benches: the same seed always
//! yields the same bytes, so runs on different days compare. And the
//! servers some benches measure against.

pub mod download;

/// The test image's directory (`cargo xtask image` makes it): where
/// `VESSEL_TEST_IMAGE_DIR` says, else `target/vessel-test`.
pub fn image_dir() -> std::path::PathBuf {
    std::env::var_os("VESSEL_TEST_IMAGE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/vessel-test"))
}

/// A writer that counts bytes and drops them: compressed output's size
/// without its I/O.
#[derive(Debug, Default)]
pub struct Sink(pub u64);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A tiny xorshift generator: fast, seedable, and good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A skewed pick in `0..n`: small indices are much more likely (roughly Zipf).
    pub fn skewed(&mut self, n: u64) -> u64 {
        let a = self.below(n) + 1;
        self.below(a)
    }
}

const WORDS: &[&str] = &[
    "fn", "let", "mut", "return", "if", "else", "for", "in", "match", "self", "pub", "struct", "impl", "use", "crate",
    "Result", "Option", "Some", "None", "Ok", "Err", "String", "Vec", "u64", "usize", "path", "data", "len", "buf",
    "error", "value", "index", "config", "manager", "snapshot", "vessel", "layer", "read", "write", "open", "close",
    "new", "into", "from", "iter", "map", "collect", "unwrap", "await", "async", "const", "static", "where", "type",
];
const PUNCT: &[&str] = &["(", ")", "{", "}", ";", ",", ".", "::", " = ", " => ", "&", "?", "<", ">", "\"", "// "];

/// Source-code-like text: keywords and identifiers in a skewed mix, with
/// punctuation, indentation and line structure.
pub fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    while out.len() < len {
        let indent = rng.below(5) as usize * 4;
        out.extend(std::iter::repeat_n(b' ', indent));
        for _ in 0..3 + rng.below(9) {
            match rng.below(10) {
                0..=5 => out.extend_from_slice(WORDS[rng.skewed(WORDS.len() as u64) as usize].as_bytes()),
                6..=7 => out.extend_from_slice(PUNCT[rng.below(PUNCT.len() as u64) as usize].as_bytes()),
                8 => out.extend_from_slice(rng.below(100_000).to_string().as_bytes()),
                _ => out.push(b' '),
            }
            out.push(b' ');
        }
        out.push(b'\n');
    }
    out.truncate(len);
    out
}

/// Binary-like data: fixed-layout records of counters, small integers,
/// offsets and padding, with some noise, as in object files and databases.
pub fn binary(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut counter = rng.next_u64() as u32;
    while out.len() < len {
        counter = counter.wrapping_add(1 + rng.below(3) as u32);
        out.extend_from_slice(&counter.to_le_bytes());
        out.extend_from_slice(&(rng.skewed(256) as u16).to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(0x40_0000 + rng.below(1 << 16) * 16).to_le_bytes());
        if rng.below(4) == 0 {
            out.extend_from_slice(&rng.next_u64().to_le_bytes());
        } else {
            out.extend_from_slice(&[0; 8]);
        }
    }
    out.truncate(len);
    out
}

/// Incompressible bytes, standing in for archives, images and media.
pub fn compressed(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A mixed corpus of about `len` bytes: "files" of 4 KiB to 1 MiB, about half
/// text, 30% binary and 20% already compressed, interleaved as in a tree.
pub fn mixed_corpus(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let size = (4096 + rng.skewed(1 << 20) as usize).min(len - out.len());
        let file = match rng.below(10) {
            0..=4 => text(&mut rng, size),
            5..=7 => binary(&mut rng, size),
            _ => compressed(&mut rng, size),
        };
        out.extend_from_slice(&file);
    }
    out
}

/// Writes a deterministic tree of about `total_bytes` in `files` files under
/// `root` (which must exist): nested directories, mostly small source-like
/// files, some larger binary and incompressible ones, as in a workspace.
/// Returns the number of bytes written.
pub fn generate_tree(root: &std::path::Path, seed: u64, total_bytes: usize, files: usize) -> std::io::Result<u64> {
    let mut rng = Rng::new(seed);
    let mut dirs = vec![root.to_path_buf()];
    for i in 0..files / 30 {
        let parent = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let d = parent.join(format!("dir{i}"));
        std::fs::create_dir(&d)?;
        dirs.push(d);
    }
    let mean = total_bytes / files;
    let mut written = 0u64;
    for i in 0..files {
        let dir = &dirs[rng.below(dirs.len() as u64) as usize];
        // Skewed sizes around the mean: many small files, a few big ones.
        let size = (rng.skewed(4 * mean as u64) as usize).max(16);
        let data = match rng.below(10) {
            0..=5 => text(&mut rng, size),
            6..=8 => binary(&mut rng, size),
            _ => compressed(&mut rng, size),
        };
        std::fs::write(dir.join(format!("file{i}.dat")), &data)?;
        written += data.len() as u64;
    }
    Ok(written)
}

/// An OCI image layout archive: the one image of `base` (an OCI layout tar)
/// with `extra` more layers on top, each holding one file of `bytes`
/// deterministic, poorly compressible bytes.
pub fn multi_layer_image(base: &std::path::Path, extra: usize, bytes: usize) -> std::io::Result<Vec<u8>> {
    use sha2::Digest;
    use std::collections::BTreeMap;
    use std::io::Read;
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut index = Vec::new();
    for e in tar::Archive::new(std::fs::File::open(base)?).entries()? {
        let mut e = e?;
        let name = e.path()?.display().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        if name == "index.json" {
            index = data;
        } else if let Some(hex) = name.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
            blobs.insert(hex.to_owned(), data);
        }
    }
    let add = |blobs: &mut BTreeMap<String, Vec<u8>>, data: Vec<u8>| {
        let hex = format!("{:x}", sha2::Sha256::digest(&data));
        let size = data.len();
        blobs.insert(hex.clone(), data);
        (format!("sha256:{hex}"), size)
    };
    let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).map_err(|e| invalid(&e.to_string()));
    let index = json(&index)?;
    let m = index["manifests"][0]["digest"].as_str().ok_or_else(|| invalid("no manifest"))?;
    let mut manifest = json(&blobs[m.trim_start_matches("sha256:")])?;
    let c = manifest["config"]["digest"].as_str().ok_or_else(|| invalid("no config"))?.to_owned();
    let mut config = json(&blobs[c.trim_start_matches("sha256:")])?;
    for i in 0..extra {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes as u64);
        h.set_mode(0o644);
        let mut rng = Rng::new(i as u64 + 1);
        let data: Vec<u8> = (0..bytes.div_ceil(8)).flat_map(|_| rng.next_u64().to_le_bytes()).take(bytes).collect();
        b.append_data(&mut h, format!("layer-{i}/data"), &data[..])?;
        let (d, size) = add(&mut blobs, b.into_inner()?);
        manifest["layers"].as_array_mut().ok_or_else(|| invalid("no layers"))?.push(
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": size}),
        );
        config["rootfs"]["diff_ids"].as_array_mut().ok_or_else(|| invalid("no diff ids"))?.push(d.into());
    }
    let (cd, cs) = add(&mut blobs, serde_json::to_vec(&config)?);
    manifest["config"]["digest"] = cd.into();
    manifest["config"]["size"] = cs.into();
    let (md, ms) = add(&mut blobs, serde_json::to_vec(&manifest)?);
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms}]});
    let mut out = tar::Builder::new(Vec::new());
    let mut put = |name: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        out.append_data(&mut h, name, data)
    };
    put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    put("index.json", &serde_json::to_vec(&index)?)?;
    for (hex, data) in &blobs {
        put(&format!("blobs/sha256/{hex}"), data)?;
    }
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_deterministic_and_sized() {
        let a = mixed_corpus(7, 3 << 20);
        assert_eq!(a.len(), 3 << 20);
        assert!(a == mixed_corpus(7, 3 << 20));
        assert!(a != mixed_corpus(8, 3 << 20));
    }
}
