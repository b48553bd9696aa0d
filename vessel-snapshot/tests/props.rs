//! Property tests of the parsers (proptest, shrinking to a smallest
//! counterexample):
//! - generated archives, from the `tar` crate (gnu and ustar headers, long
//!   names and link targets, PAX records, base-256 ids and times) and from
//!   GNU tar itself (gnu, oldgnu and posix formats of sparse files), whole
//!   or truncated, bit-flipped or with a block zeroed, are read by vessel
//!   exactly as GNU tar and Python's tarfile both read them, or refused
//!   with a typed error and nothing left; undamaged ones are always read;
//!   under bounds at half their size, what was read is refused as too
//!   large, leaving nothing, or read the same (never a partial tree);
//! - generated change scripts, made through a real overlay mount, diff
//!   and apply (both modes) back to the exact tree.
//!
//! Failing inputs proptest finds are kept in `proptest-regressions/` and
//! replayed first on every run.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use common::parity::{self, loose};
use common::*;
use proptest::prelude::{Just, Strategy, TestCaseError, any, prop, prop_assert, prop_assert_eq, prop_oneof};
use proptest::sample::Index;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use vessel_snapshot::{
    ApplyMode, ApplyOptions, DiffOptions, LayerBounds, SnapshotErrorKind, apply_layer, write_diff_with,
};

#[derive(Debug, Clone)]
enum What {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    /// A hardlink to the n-th file before it (none: a file after all).
    Hardlink(Index),
}

#[derive(Debug, Clone)]
struct Member {
    path: String,
    what: What,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    gnu: bool,
    pax: Vec<(&'static str, Vec<u8>)>,
}

fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-z0-9]{1,12}",
        1 => "[a-z]{90,130}",
        1 => "[a-z\u{e9}\u{65e5}]{1,8}",
    ]
}

/// Ids that fit the octal field, and ids that need base-256 or PAX.
fn id() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 0u64..70_000, 1 => 2_097_152u64..5_000_000]
}

fn pax_record() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    prop_oneof![
        (0u64..2_000_000_000, 0u32..1000).prop_map(|(s, ms)| ("mtime", format!("{s}.{ms:03}").into_bytes())),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(|v| ("SCHILY.xattr.user.p", v)),
        "[a-z ]{0,20}".prop_map(|c| ("comment", c.into_bytes())),
        (0u64..5_000_000).prop_map(|u| ("uid", u.to_string().into_bytes())),
        (0u64..5_000_000).prop_map(|g| ("gid", g.to_string().into_bytes())),
    ]
}

fn member() -> impl Strategy<Value = Member> {
    let what = prop_oneof![
        5 => prop::collection::vec(any::<u8>(), 0..3000).prop_map(What::File),
        2 => Just(What::Dir),
        1 => "[a-z./]{1,150}".prop_map(What::Symlink),
        1 => any::<Index>().prop_map(What::Hardlink),
    ];
    (
        prop::collection::vec(component(), 1..4),
        what,
        0u32..0o10000,
        id(),
        id(),
        prop_oneof![3 => 0u64..8_589_934_591, 1 => 8_589_934_592u64..(1 << 40)],
        any::<bool>(),
        prop::collection::vec(pax_record(), 0..3),
    )
        .prop_map(|(parts, what, mode, uid, gid, mtime, gnu, pax)| Member {
            path: parts.join("/"),
            what,
            mode,
            uid,
            gid,
            mtime,
            gnu,
            pax,
        })
}

/// A well-formed archive of `members` by the `tar` crate: paths are made
/// unique, nothing is put under a non-directory, and a hardlink carries its
/// file's owner, mode and times, as every writer makes it.
fn build(members: &[Member]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let (mut taken, mut leaves, mut files) = (BTreeSet::new(), BTreeSet::new(), Vec::<&Member>::new());
    for m in members {
        let parents: Vec<String> = m.path.match_indices('/').map(|(i, _)| m.path[..i].to_owned()).collect();
        if taken.contains(&m.path) || parents.iter().any(|p| leaves.contains(p)) {
            continue;
        }
        taken.insert(m.path.clone());
        taken.extend(parents);
        let what = match &m.what {
            What::Hardlink(_) if files.is_empty() => What::File(Vec::new()),
            w => w.clone(),
        };
        // Metadata from the member itself, or for a hardlink its file's.
        let meta = match &what {
            What::Hardlink(i) => files[i.index(files.len())],
            _ => m,
        };
        let pax: Vec<_> = match &what {
            What::Hardlink(_) => meta.pax.iter().filter(|(k, _)| ["mtime", "uid", "gid"].contains(k)).collect(),
            _ => m.pax.iter().collect(),
        };
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (*k, v.as_slice()))).unwrap();
        }
        let mut h = if m.gnu { tar::Header::new_gnu() } else { tar::Header::new_ustar() };
        h.set_mode(meta.mode);
        h.set_uid(meta.uid);
        h.set_gid(meta.gid);
        h.set_mtime(meta.mtime);
        match what {
            What::File(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, &m.path, &data[..]).unwrap();
                files.push(m);
                leaves.insert(m.path.clone());
            }
            What::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, &m.path, std::io::empty()).unwrap();
            }
            What::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, &m.path, &target).unwrap();
                leaves.insert(m.path.clone());
            }
            What::Hardlink(i) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, &m.path, &files[i.index(files.len())].path).unwrap();
                leaves.insert(m.path.clone());
            }
        }
    }
    b.into_inner().unwrap()
}

/// A tree of sparse and plain files archived by GNU tar in `format`.
#[derive(Debug, Clone)]
struct GnuMade {
    format: &'static str,
    /// Per file: its size in 4 KiB blocks and the blocks holding data.
    files: Vec<(u64, Vec<Index>)>,
}

fn gnu_made() -> impl Strategy<Value = GnuMade> {
    (
        prop::sample::select(vec!["gnu", "oldgnu", "posix", "posix-1.0"]),
        prop::collection::vec((1u64..64, prop::collection::vec(any::<Index>(), 0..6)), 1..4),
    )
        .prop_map(|(format, files)| GnuMade { format, files })
}

fn gnu_archive(g: &GnuMade) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    for (n, (blocks, data)) in g.files.iter().enumerate() {
        let f = fs::File::create(src.join(format!("f{n}"))).unwrap();
        f.set_len(blocks * 4096).unwrap();
        use std::os::unix::fs::FileExt;
        for i in data {
            let at = i.index(*blocks as usize) as u64 * 4096;
            f.write_all_at(&[n as u8 + 1; 4096], at).unwrap();
        }
    }
    let mut cmd = Command::new("tar");
    match g.format {
        "posix-1.0" => cmd.args(["--format=posix", "--sparse-version=1.0"]),
        f => cmd.arg(format!("--format={f}")),
    };
    let out = cmd
        .args(["--sparse", "--numeric-owner", "--mtime=@1700000000", "-C"])
        .arg(&src)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(out.status.success(), "GNU tar: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// What happens to an archive before it is read.
#[derive(Debug, Clone)]
enum Damage {
    None,
    Cut(Index),
    Flip(Index, u8),
    ZeroBlock(Index),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        2 => Just(Damage::None),
        1 => any::<Index>().prop_map(Damage::Cut),
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Damage::Flip(i, b)),
        1 => any::<Index>().prop_map(Damage::ZeroBlock),
    ]
}

fn damaged(mut a: Vec<u8>, d: &Damage) -> Vec<u8> {
    match d {
        Damage::None => {}
        Damage::Cut(i) => a.truncate(i.index(a.len())),
        Damage::Flip(i, bit) => {
            let at = i.index(a.len());
            a[at] ^= 1 << bit;
        }
        Damage::ZeroBlock(i) => {
            let at = i.index(a.len() / 512) * 512;
            a[at..at + 512].fill(0);
        }
    }
    a
}

#[derive(Default)]
struct Tally {
    cases: AtomicU64,
    read: AtomicU64,
    refused: AtomicU64,
    /// Archives read whole, then refused under bounds at half their size.
    bounded: AtomicU64,
}

/// Under bounds of about half what `archive` holds (bytes, entries, and
/// two directory levels), it is refused as too large, leaving nothing, or
/// read exactly as without bounds: a bound never yields part of a tree.
fn bounded_read_is_all_or_nothing(archive: &[u8], full: &parity::Tree, tally: &Tally) -> Result<(), TestCaseError> {
    let bounds =
        LayerBounds { max_bytes: archive.len() as u64 / 2, max_entries: (full.len() as u64 / 2).max(1), max_depth: 2 };
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t");
    fs::create_dir(&target).unwrap();
    match apply_layer(archive, &target, &ApplyOptions::new(ApplyMode::Merged).bounds(bounds)) {
        Ok(_) => prop_assert_eq!(loose(&scan(&target)), loose(full), "a bounded read differs"),
        Err(e) => {
            prop_assert_eq!(e.kind(), SnapshotErrorKind::TooLarge, "{}", e);
            prop_assert!(scan(&target).is_empty(), "a bounded refusal left something: {}", e);
            tally.bounded.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The property: vessel reads what GNU tar and Python both read, the same
/// way, or refuses (typed, nothing left); an undamaged archive is always
/// read.
fn same_or_refused(archive: &[u8], whole: bool, tally: &Tally) -> Result<(), TestCaseError> {
    tally.cases.fetch_add(1, Ordering::Relaxed);
    let ours = parity::checked_vessel(archive, ApplyMode::Merged).map_err(TestCaseError::fail)?;
    let Ok(tree) = &ours else {
        tally.refused.fetch_add(1, Ordering::Relaxed);
        prop_assert!(!whole, "a well-formed archive was refused: {:?}", ours.err());
        return Ok(());
    };
    tally.read.fetch_add(1, Ordering::Relaxed);
    bounded_read_is_all_or_nothing(archive, tree, tally)?;
    let (gnu, python) = (parity::gnu_tar(archive), parity::python_tarfile(archive));
    for (tool, theirs) in [("GNU tar", &gnu), ("Python", &python)] {
        prop_assert!(
            theirs.as_ref().is_ok_and(|t| loose(t) == loose(tree)),
            "vessel read it, {tool} differs:\n{}",
            parity::differences(&ours, theirs)
        );
    }
    Ok(())
}

/// A runner of `cases` cases (`VESSEL_PROPTEST_SCALE` multiplies them for
/// longer hunts).
fn runner(cases: u32) -> TestRunner {
    let scale: u32 = std::env::var("VESSEL_PROPTEST_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    TestRunner::new(Config {
        cases: cases * scale,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel("proptest-regressions"))),
        ..Config::default()
    })
}

#[test]
fn generated_archives_read_as_gnu_tar_and_python_do() {
    if !parity::need_tools("generated_archives_read_as_gnu_tar_and_python_do") {
        return;
    }
    check_archives("tar crate archives", 200, (prop::collection::vec(member(), 1..12), damage()), |(members, d)| {
        (damaged(build(&members), &d), matches!(d, Damage::None))
    });
}

#[test]
fn gnu_tar_sparse_archives_read_as_gnu_tar_and_python_do() {
    if !parity::need_tools("gnu_tar_sparse_archives_read_as_gnu_tar_and_python_do") {
        return;
    }
    check_archives("GNU tar sparse archives", 120, (gnu_made(), damage()), |(g, d)| {
        (damaged(gnu_archive(&g), &d), matches!(d, Damage::None))
    });
}

/// The archive property over `cases` inputs of `strategy`, each made into
/// (an archive, whether it is undamaged) by `make`; prints the tally.
fn check_archives<S: Strategy>(what: &str, cases: u32, strategy: S, make: impl Fn(S::Value) -> (Vec<u8>, bool)) {
    let tally = Tally::default();
    let started = std::time::Instant::now();
    runner(cases)
        .run(&strategy, |input| {
            let (archive, whole) = make(input);
            same_or_refused(&archive, whole, &tally)
        })
        .unwrap();
    println!(
        "{what}: {} cases ({} read, {} of them refused under bounds at half their size; {} refused) in {:.1?}",
        tally.cases.load(Ordering::Relaxed),
        tally.read.load(Ordering::Relaxed),
        tally.bounded.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        started.elapsed()
    );
}

/// One generated change script through a real overlay, diffed and applied
/// both ways: the exact merged tree back.
fn round_trip(base: u64, ops: &[(u64, u64)]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    fs::create_dir(&lower).unwrap();
    populate(&lower, &mut Rng::new(base), 30);
    let (layer, stats, expected) = {
        let ov = Overlay::new(&dir.path().join("ov"), &[&lower]);
        for (op, seed) in ops {
            mutate_op(&ov.merged, Some(*op), &mut Rng::new(*seed));
        }
        let (layer, stats) = write_diff_with(&ov.upper, Vec::new(), DiffOptions { allow_devices: true }).unwrap();
        (layer, stats, scan(&ov.merged))
    };
    let opts = |mode| ApplyOptions::new(mode).expect_digest(stats.digest.clone()).allow_devices(true);
    let merged = dir.path().join("applied");
    copy_tree(&lower, &merged);
    apply_layer(&layer[..], &merged, &opts(ApplyMode::Merged)).unwrap();
    prop_assert_eq!(&expected, &scan(&merged), "merged apply");
    let native = dir.path().join("layer");
    apply_layer(&layer[..], &native, &opts(ApplyMode::Overlay)).unwrap();
    let got = {
        let ro = Overlay::read_only(dir.path(), &[&native, &lower]);
        scan(&ro.merged)
    };
    prop_assert_eq!(&expected, &got, "overlay-form layer");
    prop_assert!(mounts_under(dir.path()).is_empty(), "leaked mounts");
    Ok(())
}

#[test]
fn generated_changes_diff_and_apply_to_the_same_tree() {
    if !have_root("generated_changes_diff_and_apply_to_the_same_tree") {
        return;
    }
    let started = std::time::Instant::now();
    let strategy = (0u64..10_000, prop::collection::vec((0u64..MUTATIONS, any::<u64>()), 1..30));
    let mut runner = runner(64);
    let cases = runner.config().cases;
    runner.run(&strategy, |(base, ops)| round_trip(base, &ops)).unwrap();
    println!("diff -> apply: {cases} generated change scripts in {:.1?}", started.elapsed());
}
