//! ObjectStorage against the real S3 server `cargo xtask test` starts:
//! bad URLs, missing buckets and wrong credentials are typed errors before
//! anything is written; failed and cancelled uploads leave no object and
//! no pending multipart upload.
#![cfg(feature = "s3")]

mod common;

use std::time::Duration;

use common::{FailingReader, StallingReader, TestResult, pattern, sid, vid};
use vessel_storage::{ObjectStorage, Storage, StorageErrorKind, open_url};

fn base() -> Option<String> {
    vessel_test_support::required_env("s3", "VESSEL_S3_URL").map(|b| b.to_string_lossy().into_owned())
}

/// The multipart uploads pending in the test bucket under `prefix`, as S3
/// itself lists them (boto3, beside moto in the tests' venv).
fn pending_uploads(prefix: &str) -> anyhow::Result<Vec<String>> {
    let Some(python) = vessel_test_support::required_env("s3", "VESSEL_MCP_PYTHON") else { return Ok(vec![]) };
    let script = format!(
        "import boto3,os\ns3=boto3.client('s3',endpoint_url=os.environ['AWS_ENDPOINT_URL'])\n\
         r=s3.list_multipart_uploads(Bucket='vessel-test',Prefix='{prefix}')\n\
         [print(u['Key']) for u in r.get('Uploads',[])]"
    );
    let out = std::process::Command::new(python).args(["-c", &script]).output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.lines().map(str::to_owned).collect())
}

#[tokio::test]
async fn bad_urls_are_typed_errors() -> TestResult {
    for url in ["s3://", "s3:///prefix", "s3://b/../x", "ftp://host/x", "relative/path", "file://relative"] {
        let e = open_url(url).await.err().unwrap_or_else(|| panic!("{url} opened"));
        assert_eq!(e.kind(), StorageErrorKind::InvalidInput, "{url}: {e}");
        assert!(e.to_string().contains(url), "{url}: {e}");
    }
    Ok(())
}

#[tokio::test]
async fn missing_bucket_and_wrong_credentials_are_refused_before_any_write() -> TestResult {
    let Some(base) = base() else { return Ok(()) };
    let e = open_url("s3://no-such-bucket-vessel/p").await.err().unwrap();
    assert!(matches!(e, vessel_storage::StorageError::NoSuchBucket { .. }), "{e:?}");
    assert!(e.to_string().contains("no-such-bucket-vessel"), "{e}");

    let prefix = format!("creds-{:016x}", rand::random::<u64>());
    let url = format!("{base}/{prefix}");
    let e = ObjectStorage::connect_with(&url, &[("aws_secret_access_key", "wrong")]).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Denied, "{e:?}");
    let e = ObjectStorage::connect_with(&url, &[("aws_access_key_id", "AKIANOBODY0000000000")]).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Denied, "{e:?}");
    // Nothing was written under the prefix.
    let s = ObjectStorage::connect(&url).await?;
    assert!(s.list_vessels().await?.is_empty());
    assert!(s.list_hosts().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_cancelled_uploads_leave_nothing() -> TestResult {
    let Some(base) = base() else { return Ok(()) };
    let prefix = format!("uploads-{:016x}", rand::random::<u64>());
    let s = ObjectStorage::connect(&format!("{base}/{prefix}")).await?;
    let (v, a) = (vid(1), sid(1));
    // Big enough for a multipart upload of several parts.
    let e = s.save_snapshot(&v, &a, FailingReader::boxed(pattern(1, 20 << 20))).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Source, "{e}");
    assert!(s.load_snapshot(&v, &a).await.err().unwrap().is_not_found());
    let save = s.save_snapshot(&v, &a, StallingReader::boxed(pattern(2, 20 << 20)));
    assert!(tokio::time::timeout(Duration::from_secs(2), save).await.is_err());
    assert!(s.load_snapshot(&v, &a).await.err().unwrap().is_not_found());
    // The aborts run just after the drops.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !pending_uploads(&prefix)?.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pending_uploads(&prefix)?, Vec::<String>::new(), "no multipart upload is left pending");
    // And a whole one lands whole.
    let data = pattern(3, 20 << 20);
    s.save_snapshot(&v, &a, common::blob(data.clone())).await?;
    assert!(common::read_all(s.load_snapshot(&v, &a).await?).await? == data);
    assert_eq!(pending_uploads(&prefix)?, Vec::<String>::new());
    Ok(())
}
