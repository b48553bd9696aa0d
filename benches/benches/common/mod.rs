//! What the vessel benches share: a manager on a temp dir, youki backend,
//! compressed local storage, with the test image imported.

use std::path::Path;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use vessel::{Backend, CompressedStorage, ImageRef, LocalStorage, Manager, ManagerConfig, Storage};

/// The image every bench runs.
pub(crate) const IMAGE: &str = "local/busybox:latest";

/// A manager with storage in `dir/data` and its mount root in `dir/host`,
/// [`IMAGE`] imported from `source` (the test image's storage). The benches
/// compare runtimes, not disks: `VESSEL_BENCH_NO_QUOTA=1` turns quotas off
/// where TMPDIR has none.
pub(crate) fn youki_manager(rt: &tokio::runtime::Runtime, dir: &Path, source: &Path) -> Manager {
    let storage: Arc<dyn Storage> = Arc::new(CompressedStorage::new(LocalStorage::new(dir.join("data")).unwrap()));
    let config = ManagerConfig::default().shared_storage(storage).mount_root(dir.join("host")).backend(Backend::Youki);
    let config = if std::env::var_os("VESSEL_BENCH_NO_QUOTA").is_some() { config.disk_quota(None) } else { config };
    rt.block_on(async {
        let mut data = Vec::new();
        let r = ImageRef::new(IMAGE).unwrap();
        LocalStorage::new(source).unwrap().load_image(&r).await.unwrap().read_to_end(&mut data).await.unwrap();
        let mgr = Manager::new(config).await.unwrap();
        mgr.import_image(IMAGE, Box::new(std::io::Cursor::new(data))).await.unwrap();
        mgr
    })
}
