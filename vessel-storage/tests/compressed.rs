//! What only `CompressedStorage` promises: zstd on disk, detection by magic
//! bytes, and corrupt compressed data failing loudly.

mod common;

use common::*;
use vessel_storage::{CompressedStorage, LocalStorage, Storage, StorageErrorKind};

fn snapshot_file(root: &std::path::Path, ext: &str) -> std::path::PathBuf {
    root.join("vessels").join(vid(1).as_str()).join("snapshots").join(format!("{}{ext}", sid(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_zstd_under_a_truthful_name() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = CompressedStorage::new(LocalStorage::new(dir.path())?);
    let data = pattern(1, 4 << 20);
    s.save_snapshot(&vid(1), &sid(1), blob(data.clone())).await?;
    let on_disk = std::fs::read(snapshot_file(dir.path(), ".tar.zst"))?;
    assert_eq!(&on_disk[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
    assert!(on_disk.len() < data.len() / 2, "compressed {} of {}", on_disk.len(), data.len());
    assert!(!snapshot_file(dir.path(), ".tar").exists());
    assert_eq!(zstd::decode_all(&on_disk[..])?, data, "a standard zstd stream");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_plain_blob_removes_the_old_name() -> TestResult {
    let dir = tempfile::tempdir()?;
    let plain = LocalStorage::new(dir.path())?;
    plain.save_snapshot(&vid(1), &sid(1), blob(b"old plain".to_vec())).await?;
    assert!(snapshot_file(dir.path(), ".tar").exists());
    let s = CompressedStorage::new(LocalStorage::new(dir.path())?);
    assert_eq!(read_all(s.load_snapshot(&vid(1), &sid(1)).await?).await?, b"old plain", "plain blobs load as-is");
    s.save_snapshot(&vid(1), &sid(1), blob(b"new".to_vec())).await?;
    assert!(!snapshot_file(dir.path(), ".tar").exists());
    assert_eq!(read_all(s.load_snapshot(&vid(1), &sid(1)).await?).await?, b"new");
    let raw = read_all(plain.load_snapshot(&vid(1), &sid(1)).await?).await?;
    assert_eq!(&raw[..4], &[0x28, 0xb5, 0x2f, 0xfd], "the plain view finds the zstd blob");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_or_garbled_blobs_fail_on_read() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = CompressedStorage::new(LocalStorage::new(dir.path())?);
    let data = pattern(1, 2 << 20);
    s.save_snapshot(&vid(1), &sid(1), blob(data)).await?;
    let path = snapshot_file(dir.path(), ".tar.zst");
    let full = std::fs::read(&path)?;

    std::fs::write(&path, &full[..full.len() / 2])?;
    let e = read_all(s.load_snapshot(&vid(1), &sid(1)).await?).await.unwrap_err();
    assert!(matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof), "{e}");

    let mut garbled = full.clone();
    let mid = garbled.len() / 2;
    garbled[mid..mid + 64].fill(0xee);
    std::fs::write(&path, &garbled)?;
    let e = read_all(s.load_snapshot(&vid(1), &sid(1)).await?).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");

    // gzip magic followed by junk
    std::fs::remove_file(&path)?;
    std::fs::write(snapshot_file(dir.path(), ".tar.gz"), [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3])?;
    assert!(read_all(s.load_snapshot(&vid(1), &sid(1)).await?).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_inner_storage_is_reported() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = CompressedStorage::new(LocalStorage::new(dir.path())?);
    // Make the snapshots dir a file: the inner save cannot create its directory.
    std::fs::create_dir_all(dir.path().join("vessels").join(vid(1).as_str()))?;
    std::fs::write(dir.path().join("vessels").join(vid(1).as_str()).join("snapshots"), b"")?;
    let e = s.save_snapshot(&vid(1), &sid(1), blob(pattern(1, 8 << 20))).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Io, "{e:?}");
    assert!(format!("{e}").contains("snapshots"), "names the path: {e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levels_and_threads_all_round_trip() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = pattern(5, 3 << 20);
    for (level, threads) in [(1, 0), (1, 2), (3, 1), (9, 2), (-5, 0)] {
        let s = CompressedStorage::new(LocalStorage::new(dir.path())?).with_level(level).with_threads(threads);
        s.save_snapshot(&vid(1), &sid(1), blob(data.clone())).await?;
        assert!(read_all(s.load_snapshot(&vid(1), &sid(1)).await?).await? == data, "level {level} threads {threads}");
    }
    Ok(())
}
