//! Runs the storage conformance suite (tests/common) against every backend.

mod common;

use std::path::Path;

use common::TestResult;
use vessel_storage::{CompressedStorage, LocalStorage, Storage};

/// One suite case, run on a fresh storage from the enclosing module's `make`.
macro_rules! case {
    ($name:ident $(, $arg:expr)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> TestResult {
            let dir = tempfile::tempdir()?;
            let s = make(dir.path());
            common::$name(&*s, dir.path() $(, $arg)?).await
        }
    };
}

macro_rules! conformance {
    ($backend:ident, $make:expr, decodes = $decodes:expr) => {
        mod $backend {
            use super::*;

            fn make(root: &Path) -> Box<dyn Storage> {
                Box::new(($make)(root))
            }

            case!(manifest_round_trip);
            case!(not_found_names_what_is_missing);
            case!(snapshot_round_trip);
            case!(delete_semantics);
            case!(images_round_trip);
            case!(failed_write_leaves_old_data);
            case!(cancelled_write_leaves_old_data);
            case!(concurrent_writers);
            case!(corrupt_manifest_is_a_typed_error);
            case!(reads_the_go_layout, $decodes);
        }
    };
}

conformance!(local, |root: &Path| LocalStorage::new(root).unwrap(), decodes = false);
conformance!(
    compressed_local,
    |root: &Path| CompressedStorage::new(LocalStorage::new(root).unwrap()).with_level(1),
    decodes = true
);
