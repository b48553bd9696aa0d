//! Several processes ask the layer cache for the same layer at once: exactly
//! one unpacks it (the file lock works across processes), all get it.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::*;
use vessel_snapshot::{DiffOptions, LayerCache, LayerKey, write_diff_with};

const CHILD: &str = "VESSEL_CACHE_CHILD";

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        let mut it = spec.splitn(4, '|');
        let (root, tar, digest, holder) =
            (it.next().unwrap(), it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        let cache = LayerCache::open(root).unwrap();
        let key = LayerKey::diff_id(digest).unwrap();
        cache
            .get_or_unpack(&key, holder, Some(digest), || {
                let mut log = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(Path::new(root).join("unpacks.log"))
                    .unwrap();
                writeln!(log, "{holder}").unwrap();
                std::thread::sleep(std::time::Duration::from_millis(300));
                Ok(std::fs::File::open(tar).unwrap())
            })
            .unwrap();
        return;
    }
    if !have_root("cache_processes") {
        println!("cache_processes: 0 passed, 0 failed, 1 skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    populate(&src, &mut Rng::new(9), 50);
    let tar = dir.path().join("layer.tar");
    let (_, stats) =
        write_diff_with(&src, std::fs::File::create(&tar).unwrap(), DiffOptions { allow_devices: true }).unwrap();
    let root = dir.path().join("cache");
    LayerCache::open(&root).unwrap();
    let children: Vec<_> = (0..4)
        .map(|i| {
            Command::new(std::env::current_exe().unwrap())
                .env(CHILD, format!("{}|{}|{}|proc{i}", root.display(), tar.display(), stats.digest))
                .spawn()
                .unwrap()
        })
        .collect();
    let mut failed = 0;
    for mut c in children {
        if !c.wait().unwrap().success() {
            failed += 1;
        }
    }
    let log = std::fs::read_to_string(root.join("unpacks.log")).unwrap_or_default();
    let cache = LayerCache::open(&root).unwrap();
    let key = LayerKey::diff_id(&stats.digest).unwrap();
    let ok = failed == 0 && log.lines().count() == 1 && cache.holders(&key).unwrap().len() == 4;
    if ok {
        assert_same(&scan(&src), &scan(&cache.path(&key)), "layer unpacked by another process");
        println!("cache_processes: 1 passed, 0 failed");
    } else {
        println!("cache_processes: 0 passed, 1 failed");
        eprintln!("children failed: {failed}; unpack log: {log:?}; holders: {:?}", cache.holders(&key));
        std::process::exit(1);
    }
}
