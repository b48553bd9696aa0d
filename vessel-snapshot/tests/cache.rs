//! The layer cache: one population per key under concurrency, verification,
//! reference-counted GC, adoption of sealed uppers, crash-leftover sweeping.

mod common;

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use vessel_snapshot::{DiffOptions, LayerCache, LayerKey, SnapshotErrorKind, write_diff_with};

/// A layer tar of a small generated tree, and its digest.
fn layer(seed: u64) -> (Vec<u8>, String) {
    let (bytes, digest, _) = layer_and_tree(seed);
    (bytes, digest)
}

/// The same, with the tree it was made from.
fn layer_and_tree(seed: u64) -> (Vec<u8>, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    populate(dir.path(), &mut Rng::new(seed), 40);
    let (bytes, stats) = write_diff_with(dir.path(), Vec::new(), DiffOptions { allow_devices: true }).unwrap();
    (bytes, stats.digest, dir)
}

fn scratch_dirs(cache: &LayerCache) -> Vec<String> {
    fs::read_dir(cache.root().join("layers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn concurrent_users_unpack_once() {
    if !have_root("concurrent_users_unpack_once") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (bytes, digest, src) = layer_and_tree(1);
    let key = LayerKey::diff_id(&digest).unwrap();
    let unpacks = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (root, bytes, digest, key, unpacks) =
                (dir.path().to_path_buf(), bytes.clone(), digest.clone(), key.clone(), unpacks.clone());
            std::thread::spawn(move || {
                // Each thread opens its own cache handle, as separate processes would.
                let cache = LayerCache::open(root).unwrap();
                cache
                    .get_or_unpack(&key, &format!("vessel{i}"), Some(&digest), || {
                        unpacks.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        Ok(&bytes[..])
                    })
                    .unwrap()
            })
        })
        .collect();
    let paths: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(unpacks.load(Ordering::SeqCst), 1, "exactly one thread unpacks");
    assert!(paths.iter().all(|p| p == &paths[0]));
    let cache = LayerCache::open(dir.path()).unwrap();
    assert_eq!(cache.holders(&key).unwrap().len(), 8);
    // The cached layer is the tree the tar describes.
    assert_same(&scan(src.path()), &scan(&paths[0]), "cached layer");
}

#[test]
fn a_bad_layer_is_not_cached() {
    if !have_root("a_bad_layer_is_not_cached") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = LayerCache::open(dir.path()).unwrap();
    let (bytes, digest) = layer(2);
    let (_, other) = layer(3);
    let key = LayerKey::diff_id(&other).unwrap();
    let e = cache.get_or_unpack(&key, "v", Some(&other), || Ok(&bytes[..])).unwrap_err();
    assert_eq!(e.kind(), SnapshotErrorKind::InvalidData, "{e}");
    assert!(!cache.contains(&key));
    assert!(cache.holders(&key).unwrap().is_empty());
    assert!(scratch_dirs(&cache).is_empty(), "{:?}", scratch_dirs(&cache));
    // A failing source is reported and leaves nothing either.
    let key = LayerKey::diff_id(&digest).unwrap();
    let e = cache
        .get_or_unpack(&key, "v", Some(&digest), || -> Result<&[u8], _> {
            Err(vessel_snapshot::SnapshotError::Stream("layer", std::io::Error::other("storage says no")))
        })
        .unwrap_err();
    assert!(std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("storage says no")), "{e:?}");
    assert!(!cache.contains(&key));
    assert!(LayerKey::diff_id("sha256:../../etc").is_err());
    assert!(LayerKey::diff_id("md5:0000").is_err());
}

#[test]
fn gc_removes_only_unreferenced_layers() {
    if !have_root("gc_removes_only_unreferenced_layers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = LayerCache::open(dir.path()).unwrap();
    let (a, da) = layer(4);
    let (b, db) = layer(5);
    let (ka, kb) = (LayerKey::diff_id(&da).unwrap(), LayerKey::diff_id(&db).unwrap());
    cache.get_or_unpack(&ka, "v1", Some(&da), || Ok(&a[..])).unwrap();
    cache.get_or_unpack(&kb, "v1", Some(&db), || Ok(&b[..])).unwrap();
    cache.get_or_unpack(&kb, "v2", Some(&db), || -> Result<&[u8], _> { panic!("already cached") }).unwrap();
    assert_eq!(cache.holders(&kb).unwrap(), ["v1", "v2"]);
    assert_eq!(cache.gc().unwrap(), 0, "everything is referenced");
    cache.release(&kb, "v1").unwrap();
    assert_eq!(cache.gc().unwrap(), 0, "v2 still holds b");
    cache.release(&kb, "v2").unwrap();
    cache.release(&kb, "v2").unwrap(); // idempotent
    assert_eq!(cache.gc().unwrap(), 1);
    assert!(!cache.contains(&kb) && cache.contains(&ka));
    assert!(!cache.retain(&kb, "v3").unwrap(), "retain needs a cached layer");
    assert!(cache.retain(&ka, "v3").unwrap());
    assert!(scratch_dirs(&cache).is_empty());
    assert!(cache.get_or_unpack(&ka, "../x", None, || Ok(&a[..])).is_err(), "holder names are validated");
    // release_all drops one holder's references across layers, and only its.
    cache.get_or_unpack(&kb, "v3", Some(&db), || Ok(&b[..])).unwrap();
    cache.retain(&ka, "v4").unwrap();
    assert_eq!(cache.release_all("v3").unwrap(), 2);
    assert_eq!(cache.release_all("v3").unwrap(), 0);
    assert!(cache.holders(&kb).unwrap().is_empty() && cache.holders(&ka).unwrap() == ["v1", "v4"]);
    assert_eq!(cache.gc().unwrap(), 1);
    assert!(cache.contains(&ka) && !cache.contains(&kb));
    assert!(cache.release_all("../x").is_err(), "holder names are validated");
}

#[test]
fn adopt_moves_a_sealed_upper_in() {
    if !have_root("adopt_moves_a_sealed_upper_in") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = LayerCache::open(dir.path().join("cache")).unwrap();
    let ovl = dir.path().join("ovl");
    let upper = ovl.join("upper");
    fs::create_dir_all(ovl.join("work/work")).unwrap();
    fs::create_dir(&upper).unwrap();
    populate(&upper, &mut Rng::new(6), 30);
    let expected = scan(&upper);
    let key = LayerKey::snapshot(
        vessel_core::VesselId::from_u64(1),
        vessel_core::SnapshotId::from_u64(7),
        &format!("sha256:{}", "a".repeat(64)),
    )
    .unwrap();
    let path = cache.adopt(&key, "v1", &ovl).unwrap();
    assert!(!ovl.exists());
    assert!(!path.parent().unwrap().join("synced").exists(), "synced later, as a fetched layer");
    assert_same(&expected, &scan(&path), "adopted layer");
    // Undone (a commit that failed): back as it was, no reference left.
    cache.unadopt(&key, "v1", &ovl).unwrap();
    assert!(!cache.contains(&key) && cache.holders(&key).unwrap().is_empty());
    assert_same(&expected, &scan(&upper), "unadopted upper");
    fs::create_dir(ovl.join("work")).unwrap();
    assert_eq!(cache.adopt(&key, "v1", &ovl).unwrap(), path);
    // Adopting a key that is already cached keeps the cached copy.
    fs::create_dir_all(&upper).unwrap();
    assert_eq!(cache.adopt(&key, "v2", &ovl).unwrap(), path);
    assert!(!ovl.exists());
    assert_eq!(cache.holders(&key).unwrap(), ["v1", "v2"]);
}

#[test]
fn open_sweeps_leftovers_of_dead_processes_only() {
    if !have_root("open_sweeps_leftovers_of_dead_processes_only") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = LayerCache::open(dir.path()).unwrap();
    let layers = dir.path().join("layers");
    let dead = layers.join(format!(".sha256-{}.apply-1234", "a".repeat(64)));
    let live_key = format!("sha256-{}", "b".repeat(64));
    let live = layers.join(format!(".{live_key}.apply-5678"));
    fs::create_dir_all(dead.join("x")).unwrap();
    fs::create_dir_all(&live).unwrap();
    // Another "process" is populating live_key: it holds the key's lock.
    let held = fs::File::create(dir.path().join("locks").join(&live_key)).unwrap();
    held.lock().unwrap();
    drop(cache);
    let cache = LayerCache::open(dir.path()).unwrap();
    assert!(!dead.exists(), "a dead population's scratch dir is swept");
    assert!(live.exists(), "a live population's scratch dir is left alone");
    drop(held);
    LayerCache::open(dir.path()).unwrap();
    assert!(!live.exists());
    drop(cache);
}

/// A fetched layer is published without a sync: a later open on the same
/// boot syncs and marks it; an open after a reboot drops it unless marked
/// (it may be torn), keeping synced layers and sealed uppers.
#[test]
fn unsynced_layers_are_dropped_after_a_reboot_only() {
    if !have_root("unsynced_layers_are_dropped_after_a_reboot_only") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = LayerCache::open(dir.path()).unwrap();
    let (a, da) = layer(11);
    let (b, db) = layer(12);
    let (ka, kb) = (LayerKey::diff_id(&da).unwrap(), LayerKey::diff_id(&db).unwrap());
    cache.get_or_unpack(&ka, "v", Some(&da), || Ok(&a[..])).unwrap();
    let entry = |k: &LayerKey| cache.path(k).parent().unwrap().to_path_buf();
    assert!(!entry(&ka).join("synced").exists(), "published before any sync");
    // Reopened on the same boot: synced and marked.
    let cache = LayerCache::open(dir.path()).unwrap();
    assert!(entry(&ka).join("synced").exists());
    cache.get_or_unpack(&kb, "v", Some(&db), || Ok(&b[..])).unwrap();
    assert!(!entry(&kb).join("synced").exists());
    // As if the machine rebooted before b reached the disk.
    fs::write(dir.path().join("boot"), "another-boot").unwrap();
    let cache = LayerCache::open(dir.path()).unwrap();
    assert!(cache.contains(&ka), "a synced layer survives a reboot");
    assert!(!cache.contains(&kb), "an unsynced one is dropped");
    // Fetched again when needed, and the reference still counts.
    cache.get_or_unpack(&kb, "v", Some(&db), || Ok(&b[..])).unwrap();
    assert!(cache.contains(&kb));
    assert_eq!(cache.holders(&kb).unwrap(), ["v"]);
    // A cache from before deferred durability (no boot record): all its
    // layers were synced when made, so they are kept and marked.
    fs::remove_dir_all(entry(&kb).join("synced")).ok();
    fs::remove_file(dir.path().join("boot")).unwrap();
    let cache = LayerCache::open(dir.path()).unwrap();
    assert!(cache.contains(&kb) && entry(&kb).join("synced").exists());
    // Writers of the boot record killed before their rename (this
    // version's temp name and an older version's) leave nothing for good:
    // the next open removes their files, whether or not it rewrites it.
    for name in [".boot.new", ".boot-0123456789abcdef"] {
        fs::write(dir.path().join(name), "torn").unwrap();
    }
    let recorded = fs::read_to_string(dir.path().join("boot")).unwrap();
    LayerCache::open(dir.path()).unwrap();
    let mut left: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["boot", "layers", "locks", "refs"]);
    assert_eq!(fs::read_to_string(dir.path().join("boot")).unwrap(), recorded);
}
