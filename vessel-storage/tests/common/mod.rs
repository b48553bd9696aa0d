//! The storage conformance suite: every `Storage` implementation must pass
//! these bodies unchanged (see `conformance!` in conformance.rs).
#![allow(dead_code, unreachable_pub)]

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::Utc;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use vessel_storage::{
    BlobReader, ImageRef, RecordKey, SnapshotId, Storage, StorageErrorKind, VesselId, VesselManifest, WriteIf,
};

pub type TestResult = anyhow::Result<()>;

/// Reaches under a storage's API to its bytes, as a crash, an old
/// version or an attacker would.
#[async_trait::async_trait]
pub trait Raw: Send + Sync {
    /// Writes `data` at `rel` (a `/`-separated path in the layout).
    async fn put(&self, rel: &str, data: Vec<u8>) -> anyhow::Result<()>;
    /// Whether something is stored at `rel`.
    async fn exists(&self, rel: &str) -> anyhow::Result<bool>;
    /// What a failed or cancelled write left outside the committed layout.
    async fn strays(&self) -> anyhow::Result<Vec<String>>;
}

/// A [`Raw`] over a `LocalStorage` directory.
pub struct LocalRaw(pub PathBuf);

#[async_trait::async_trait]
impl Raw for LocalRaw {
    async fn put(&self, rel: &str, data: Vec<u8>) -> anyhow::Result<()> {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap())?;
        Ok(std::fs::write(p, data)?)
    }
    async fn exists(&self, rel: &str) -> anyhow::Result<bool> {
        Ok(self.0.join(rel).exists())
    }
    async fn strays(&self) -> anyhow::Result<Vec<String>> {
        Ok(stray_files(&self.0).into_iter().map(|p| p.display().to_string()).collect())
    }
}

pub fn vid(n: u64) -> VesselId {
    VesselId::from_u64(n)
}

pub fn sid(n: u64) -> SnapshotId {
    SnapshotId::from_u64(n)
}

pub fn manifest(id: &VesselId, work_dir: &str) -> VesselManifest {
    VesselManifest {
        id: id.clone(),
        base_image_ref: ImageRef::new("local/busybox:latest").unwrap(),
        current_snapshot_id: None,
        work_dir: work_dir.into(),
        create_time: Utc::now(),
        update_time: Utc::now(),
        labels: [("k".to_string(), "v".to_string())].into(),
        snapshots: Vec::new(),
    }
}

/// Deterministic, mildly compressible bytes (so compression actually works on them).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let word = if x.is_multiple_of(4) { x.to_le_bytes() } else { (x % 64).to_le_bytes() };
        out.extend_from_slice(&word);
    }
    out.truncate(len);
    out
}

pub fn blob(data: Vec<u8>) -> BlobReader {
    Box::new(io::Cursor::new(data))
}

pub async fn read_all(mut r: BlobReader) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).await?;
    Ok(v)
}

/// What a [`ShortReader`] does once its data runs out.
#[derive(Clone, Copy)]
enum Then {
    /// Fail: a producer that died half-way.
    Fail,
    /// Never return: a producer that hangs, whose save gets cancelled.
    Stall,
}

/// Yields its data, then fails or stalls instead of ending.
pub struct ShortReader {
    data: io::Cursor<Vec<u8>>,
    then: Then,
}

impl AsyncRead for ShortReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.data).poll_read(cx, buf);
        if buf.filled().len() > before {
            return res;
        }
        match self.then {
            Then::Fail => Poll::Ready(Err(io::Error::other("producer crashed"))),
            Then::Stall => Poll::Pending,
        }
    }
}

/// Yields `data`, then fails.
pub struct FailingReader;

impl FailingReader {
    pub fn boxed(data: Vec<u8>) -> BlobReader {
        Box::new(ShortReader { data: io::Cursor::new(data), then: Then::Fail })
    }
}

/// Yields `data`, then never returns.
pub struct StallingReader;

impl StallingReader {
    pub fn boxed(data: Vec<u8>) -> BlobReader {
        Box::new(ShortReader { data: io::Cursor::new(data), then: Then::Stall })
    }
}

/// Files under `root` other than the committed layout: temp files left by a
/// failed or cancelled write would show up here.
pub fn stray_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.join(".tmp")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

pub async fn manifest_round_trip(s: &dyn Storage, _raw: &dyn Raw) -> TestResult {
    let id = vid(1);
    let mut m = manifest(&id, "/work");
    s.save_vessel_manifest(&m).await?;
    assert_eq!(s.load_vessel_manifest(&id).await?, m);
    m.work_dir = "/elsewhere".into();
    m.current_snapshot_id = Some(sid(7));
    s.save_vessel_manifest(&m).await?;
    assert_eq!(s.load_vessel_manifest(&id).await?, m, "a save replaces the manifest");
    s.save_vessel_manifest(&manifest(&vid(2), "/")).await?;
    assert_eq!(s.list_vessels().await?, [vid(1), vid(2)]);
    Ok(())
}

pub async fn not_found_names_what_is_missing(s: &dyn Storage, _raw: &dyn Raw) -> TestResult {
    let e = s.load_vessel_manifest(&vid(0xabc)).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::NotFound);
    assert!(e.to_string().contains("0000000000000abc"), "{e}");

    let e = s.load_snapshot(&vid(0xabc), &sid(0xdef)).await.err().unwrap();
    assert_eq!(e.kind(), StorageErrorKind::NotFound);
    assert!(e.to_string().contains("0000000000000def"), "{e}");

    s.save_vessel_manifest(&manifest(&vid(0xabc), "/")).await?;
    let e = s.load_snapshot(&vid(0xabc), &sid(0xdef)).await.err().unwrap();
    assert_eq!(e.kind(), StorageErrorKind::NotFound);

    let img = ImageRef::new("no/such:image")?;
    let e = s.load_image(&img).await.err().unwrap();
    assert_eq!(e.kind(), StorageErrorKind::NotFound);
    assert!(e.to_string().contains("no/such:image"), "{e}");
    assert!(s.list_vessels().await?.len() == 1);
    Ok(())
}

pub async fn snapshot_round_trip(s: &dyn Storage, _raw: &dyn Raw) -> TestResult {
    let (v, a, b) = (vid(1), sid(10), sid(11));
    let data_a = pattern(1, 3 << 20);
    let data_b = pattern(2, 100);
    s.save_snapshot(&v, &a, blob(data_a.clone())).await?;
    s.save_snapshot(&v, &b, blob(data_b.clone())).await?;
    s.save_snapshot(&v, &sid(12), blob(Vec::new())).await?;
    assert_eq!(read_all(s.load_snapshot(&v, &a).await?).await?, data_a);
    assert_eq!(read_all(s.load_snapshot(&v, &b).await?).await?, data_b);
    assert_eq!(read_all(s.load_snapshot(&v, &sid(12)).await?).await?, b"", "empty blobs round-trip");
    let data_a2 = pattern(3, 5000);
    s.save_snapshot(&v, &a, blob(data_a2.clone())).await?;
    assert_eq!(read_all(s.load_snapshot(&v, &a).await?).await?, data_a2, "a save replaces the snapshot");
    Ok(())
}

pub async fn delete_semantics(s: &dyn Storage, _raw: &dyn Raw) -> TestResult {
    let (v, w) = (vid(1), vid(2));
    for id in [&v, &w] {
        s.save_vessel_manifest(&manifest(id, "/")).await?;
        s.save_snapshot(id, &sid(1), blob(pattern(1, 1000))).await?;
        s.save_snapshot(id, &sid(2), blob(pattern(2, 1000))).await?;
    }
    s.delete_snapshot(&v, &sid(1)).await?;
    assert!(s.load_snapshot(&v, &sid(1)).await.err().unwrap().is_not_found());
    assert_eq!(read_all(s.load_snapshot(&v, &sid(2)).await?).await?, pattern(2, 1000));
    s.delete_snapshot(&v, &sid(1)).await?; // idempotent
    s.delete_snapshot(&vid(99), &sid(1)).await?; // even for unknown vessels

    s.delete_vessel(&v).await?;
    assert!(s.load_vessel_manifest(&v).await.unwrap_err().is_not_found());
    assert!(s.load_snapshot(&v, &sid(2)).await.err().unwrap().is_not_found());
    assert_eq!(s.list_vessels().await?, std::slice::from_ref(&w), "other vessels are untouched");
    assert_eq!(read_all(s.load_snapshot(&w, &sid(1)).await?).await?, pattern(1, 1000));
    s.delete_vessel(&v).await?; // idempotent
    Ok(())
}

pub async fn images_round_trip(s: &dyn Storage, _raw: &dyn Raw) -> TestResult {
    let refs = ["local/busybox:latest", "localhost:5000/a/b_c:v1.2", "plain"];
    for (i, r) in refs.iter().enumerate() {
        s.save_image(&ImageRef::new(r)?, blob(pattern(i as u64, 70_000))).await?;
    }
    for (i, r) in refs.iter().enumerate() {
        assert_eq!(read_all(s.load_image(&ImageRef::new(r)?).await?).await?, pattern(i as u64, 70_000));
    }
    // A summary beside an archive: round trip, replaced, removed; never an image of its own.
    let r = ImageRef::new(refs[0])?;
    assert!(s.load_image_index(&r).await.err().unwrap().is_not_found());
    s.save_image_index(&r, b"{\"v\":1}".to_vec()).await?;
    s.save_image_index(&r, b"{\"v\":2}".to_vec()).await?;
    assert_eq!(s.load_image_index(&r).await?, b"{\"v\":2}");
    let mut want: Vec<_> = refs.iter().map(|r| ImageRef::new(r).unwrap()).collect();
    want.sort();
    assert_eq!(s.list_images().await?, want);
    s.delete_image_index(&r).await?;
    s.delete_image_index(&r).await?;
    assert!(s.load_image_index(&r).await.err().unwrap().is_not_found());
    assert_eq!(read_all(s.load_image(&r).await?).await?, pattern(0, 70_000), "the archive stays");
    Ok(())
}

pub async fn failed_write_leaves_old_data(s: &dyn Storage, raw: &dyn Raw) -> TestResult {
    let (v, a) = (vid(1), sid(1));
    let old = pattern(1, 2 << 20);
    s.save_snapshot(&v, &a, blob(old.clone())).await?;
    let e = s.save_snapshot(&v, &a, FailingReader::boxed(pattern(2, 3 << 20))).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Source, "{e:?}");
    assert_eq!(read_all(s.load_snapshot(&v, &a).await?).await?, old);
    // A first write that fails leaves nothing at all.
    let e = s.save_snapshot(&v, &sid(2), FailingReader::boxed(pattern(2, 1000))).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Source);
    assert!(s.load_snapshot(&v, &sid(2)).await.err().unwrap().is_not_found());
    let img = ImageRef::new("x/y:z")?;
    assert!(s.save_image(&img, FailingReader::boxed(vec![1; 10])).await.is_err());
    assert!(s.load_image(&img).await.err().unwrap().is_not_found());
    assert_eq!(raw.strays().await?, Vec::<String>::new());
    Ok(())
}

pub async fn cancelled_write_leaves_old_data(s: &dyn Storage, raw: &dyn Raw) -> TestResult {
    let (v, a) = (vid(1), sid(1));
    let old = pattern(1, 1 << 20);
    s.save_snapshot(&v, &a, blob(old.clone())).await?;
    let save = s.save_snapshot(&v, &a, StallingReader::boxed(pattern(2, 3 << 20)));
    assert!(tokio::time::timeout(Duration::from_millis(300), save).await.is_err(), "the save must still be waiting");
    assert_eq!(read_all(s.load_snapshot(&v, &a).await?).await?, old);
    // Cleanup of a dropped save may finish on the blocking pool just after the drop.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !raw.strays().await?.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(raw.strays().await?, Vec::<String>::new());
    Ok(())
}

pub async fn concurrent_writers(s: &dyn Storage, _raw: &dyn Raw) -> TestResult {
    let tasks = (0..16u64).map(|i| async move {
        let id = vid(100 + i);
        let mut m = manifest(&id, &format!("/w{i}"));
        s.save_vessel_manifest(&m).await?;
        for n in 0..3 {
            s.save_snapshot(&id, &sid(n), blob(pattern(i * 10 + n, 300_000))).await?;
            m.current_snapshot_id = Some(sid(n));
            s.save_vessel_manifest(&m).await?;
        }
        anyhow::Ok(())
    });
    for r in futures::future::join_all(tasks).await {
        r?;
    }
    assert_eq!(s.list_vessels().await?.len(), 16);
    for i in 0..16u64 {
        let id = vid(100 + i);
        let m = s.load_vessel_manifest(&id).await?;
        assert_eq!(m.work_dir, format!("/w{i}"));
        assert_eq!(m.current_snapshot_id, Some(sid(2)));
        for n in 0..3 {
            assert_eq!(read_all(s.load_snapshot(&id, &sid(n)).await?).await?, pattern(i * 10 + n, 300_000));
        }
    }
    Ok(())
}

pub async fn corrupt_manifest_is_a_typed_error(s: &dyn Storage, raw: &dyn Raw) -> TestResult {
    let id = vid(5);
    s.save_vessel_manifest(&manifest(&id, "/")).await?;
    let path = format!("vessels/{id}/vessel.dat");
    raw.put(&path, b"{\"id\": \"00000000000".to_vec()).await?;
    let e = s.load_vessel_manifest(&id).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Corrupt, "{e}");
    // A manifest copied under another vessel's name is corrupt too.
    let other = serde_json::to_vec(&manifest(&vid(6), "/"))?;
    raw.put(&path, other).await?;
    let e = s.load_vessel_manifest(&id).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Corrupt);
    assert!(e.to_string().contains("0000000000000006"), "{e}");
    Ok(())
}

/// A data directory exactly as the Go original writes it with compression on:
/// gzip `.tar.gz` blobs and a manifest with Go's JSON quirks.
pub async fn reads_the_go_layout(s: &dyn Storage, raw: &dyn Raw, decodes: bool) -> TestResult {
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;
    let id = "0a1b2c3d4e5f6071";
    let snap = "00000a1b2c3d4e5f";
    let vdir = format!("vessels/{id}");
    raw.put(
        &format!("{vdir}/vessel.dat"),
        format!(
            r#"{{"id":"{id}","baseImageRef":"local/busybox:latest","currentSnapshotId":"{snap}","workDir":"/workspace","createTime":"2025-03-01T10:11:12.123456789+08:00","updateTime":"2025-03-01T10:20:00.5+08:00","labels":null,"snapshots":[{{"id":"{snap}","vesselId":"{id}","parentId":"","message":"m","checksum":"sha256:00","size":3,"createTime":"2025-03-01T10:15:00Z","labels":null}}]}}"#
        )
        .into_bytes(),
    )
    .await?;
    let tar = pattern(9, 200_000);
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&tar)?;
    let gz = gz.finish()?;
    raw.put(&format!("{vdir}/snapshots/{snap}.tar.gz"), gz.clone()).await?;
    raw.put("images/local/busybox:latest.tar.gz", gz.clone()).await?;

    let vid = VesselId::new(id)?;
    assert!(s.list_vessels().await?.contains(&vid));
    let m = s.load_vessel_manifest(&vid).await?;
    assert_eq!(m.snapshots[0].parent_id, None);
    let want = if decodes { tar } else { gz };
    let got = read_all(s.load_snapshot(&vid, &SnapshotId::new(snap)?).await?).await?;
    assert!(got == want, "snapshot bytes differ");
    let got = read_all(s.load_image(&ImageRef::new("local/busybox:latest")?).await?).await?;
    assert!(got == want, "image bytes differ");
    s.delete_snapshot(&vid, &SnapshotId::new(snap)?).await?;
    assert!(!raw.exists(&format!("{vdir}/snapshots/{snap}.tar.gz")).await?, "deletes Go-named blobs too");
    Ok(())
}

/// Conditional writes: create-if-absent and update-if-version, for
/// manifests and records; the loser of a race gets `Conflict` and changes nothing.
pub async fn conditional_writes(s: &dyn Storage, _raw: &dyn Raw) -> TestResult {
    let id = vid(3);
    let m = manifest(&id, "/a");
    let v1 = s.save_vessel_manifest_if(&m, &WriteIf::Absent).await?;
    let e = s.save_vessel_manifest_if(&manifest(&id, "/b"), &WriteIf::Absent).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Conflict, "{e}");
    let (read, rv) = s.load_vessel_manifest_versioned(&id).await?;
    assert_eq!((read, &rv), (m.clone(), &v1));
    let mut m2 = m.clone();
    m2.work_dir = "/c".into();
    let v2 = s.save_vessel_manifest_if(&m2, &WriteIf::Matches(v1.clone())).await?;
    assert_ne!(v1, v2);
    // A writer holding the old version loses, and nothing changes.
    let e = s.save_vessel_manifest_if(&manifest(&id, "/stale"), &WriteIf::Matches(v1.clone())).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Conflict);
    assert_eq!(s.load_vessel_manifest(&id).await?.work_dir, "/c");
    // Update of something absent is a conflict too.
    let e = s.save_vessel_manifest_if(&manifest(&vid(4), "/"), &WriteIf::Matches(v2.clone())).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Conflict);
    assert!(s.load_vessel_manifest(&vid(4)).await.unwrap_err().is_not_found());

    let key = RecordKey::Claim(id.clone());
    assert_eq!(s.load_record(&key).await?, None);
    let r1 = s.save_record(&key, b"one".to_vec(), &WriteIf::Absent).await?;
    assert_eq!(
        s.save_record(&key, b"x".to_vec(), &WriteIf::Absent).await.unwrap_err().kind(),
        StorageErrorKind::Conflict
    );
    let got = s.load_record(&key).await?.unwrap();
    assert_eq!((got.data.as_slice(), &got.version), (&b"one"[..], &r1));
    let r2 = s.save_record(&key, b"two".to_vec(), &WriteIf::Matches(r1.clone())).await?;
    let e = s.save_record(&key, b"three".to_vec(), &WriteIf::Matches(r1)).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Conflict);
    assert_eq!(s.load_record(&key).await?.unwrap().version, r2);
    s.delete_record(&key).await?;
    s.delete_record(&key).await?;
    assert_eq!(s.load_record(&key).await?, None);
    let host = vessel_storage::HostId::new("00000000000000aa")?;
    s.save_record(&RecordKey::Host(host.clone()), b"{}".to_vec(), &WriteIf::Absent).await?;
    assert_eq!(s.list_hosts().await?, [host]);
    Ok(())
}

/// Of many writers racing from one version, exactly one wins.
pub async fn one_conditional_writer_wins(s: &dyn Storage, _raw: &dyn Raw) -> TestResult {
    let key = RecordKey::Claim(vid(9));
    let v = s.save_record(&key, b"0".to_vec(), &WriteIf::Absent).await?;
    let tries = (0..8u8).map(|i| {
        let v = v.clone();
        let key = key.clone();
        async move { s.save_record(&key, vec![b'a' + i], &WriteIf::Matches(v)).await }
    });
    let results = futures::future::join_all(tries).await;
    let won: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    assert!(results.iter().filter_map(|r| r.as_ref().err()).all(|e| e.kind() == StorageErrorKind::Conflict));
    Ok(())
}
