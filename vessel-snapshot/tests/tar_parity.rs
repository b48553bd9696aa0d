//! Tar parsing parity: layers made by real tools (GNU tar in its gnu and pax
//! formats, sparse included, and Python's tarfile) apply to the tree they
//! came from, and every edge-case archive is read by vessel as GNU tar and
//! Python's tarfile read it, or refused where they (or Go's archive/tar,
//! which containerd uses) would disagree. The table printed is the parity
//! table of the issue note.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::parity::{Tree, differences, gnu_tar, loose, need_tools, python_tarfile, vessel, view};
use common::*;
use vessel_snapshot::{ApplyMode, ApplyOptions, apply_layer};

/// A tree with what layer formats must carry: long and non-ASCII names,
/// long symlink targets, hardlinks, large ids, xattrs, fifos, empty dirs and
/// a sparse file.
fn source_tree(root: &Path) {
    let deep = root.join("d".repeat(90)).join("e".repeat(90));
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join(format!("{}.txt", "f".repeat(120))), b"long name").unwrap();
    fs::write(root.join("caf\u{e9} \u{65e5}\u{672c}"), b"non-ascii").unwrap();
    std::os::unix::fs::symlink("t".repeat(200), root.join("longlink")).unwrap();
    fs::write(root.join("a"), b"linked").unwrap();
    fs::hard_link(root.join("a"), root.join("b")).unwrap();
    fs::write(root.join("owned"), b"ids").unwrap();
    nix::unistd::chown(&root.join("owned"), Some(3_000_000.into()), Some(3_000_001.into())).unwrap();
    fs::set_permissions(root.join("owned"), fs::Permissions::from_mode(0o4750)).unwrap();
    xattr::set(root.join("a"), "user.note", b"bin\0ary\nvalue").unwrap();
    nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    fs::create_dir(root.join("empty")).unwrap();
    let sparse = fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    for at in [0u64, 1 << 20, 40 << 20, (64 << 20) - 4096] {
        sparse.write_all_at(&[0xab; 4096], at).unwrap();
    }
    // Whole seconds: the gnu format has no sub-second times.
    let t = nix::sys::time::TimeSpec::new(1_700_000_000, 0);
    for p in paths(root).iter().rev() {
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &root.join(p),
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }
}

#[test]
fn layers_made_by_real_tools_apply_to_their_tree() {
    if !need_tools("layers_made_by_real_tools_apply_to_their_tree") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    source_tree(&src);
    let expected = scan(&src);
    let gnu = |args: &[&str]| {
        let out = dir.path().join("layer.tar");
        let o = Command::new("tar")
            .args(args)
            .args(["--numeric-owner", "--xattrs", "--sort=name", "-cf"])
            .arg(&out)
            .arg("-C")
            .arg(&src)
            .arg(".")
            .output()
            .unwrap();
        assert!(o.status.success(), "tar {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        fs::read(out).unwrap()
    };
    let python = |format: &str| {
        let out = dir.path().join("py.tar");
        let script = format!(
            "import sys, tarfile\nwith tarfile.open(sys.argv[1], 'w', format=tarfile.{format}) as t:\n    \
             t.add(sys.argv[2], arcname='.')\n"
        );
        let o = Command::new("python3").arg("-c").arg(script).arg(&out).arg(&src).output().unwrap();
        assert!(o.status.success(), "python {format}: {}", String::from_utf8_lossy(&o.stderr));
        fs::read(out).unwrap()
    };
    // umoci: the tree copied into an unpacked bundle, repacked; its new
    // layer (gzip) is the manifest's last.
    let umoci = || {
        let u = dir.path().join("umoci");
        let sh = format!(
            "set -e; cd {u}; umoci init --layout img; umoci new --image img:t; umoci unpack --image img:t bundle >/dev/null; \
             cp -a {src}/. bundle/rootfs/; umoci repack --image img:t bundle",
            u = u.display(),
            src = src.display()
        );
        fs::create_dir_all(&u).unwrap();
        let o = Command::new("sh").arg("-c").arg(&sh).output().unwrap();
        assert!(o.status.success(), "umoci: {}", String::from_utf8_lossy(&o.stderr));
        let blob = |d: &str| fs::read(u.join("img/blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap();
        let index: serde_json::Value = serde_json::from_slice(&fs::read(u.join("img/index.json")).unwrap()).unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
        let layers = manifest["layers"].as_array().unwrap();
        blob(layers.last().unwrap()["digest"].as_str().unwrap())
    };
    let have_umoci = Command::new("umoci").arg("--version").output().is_ok();
    assert!(have_umoci || !vessel_test_support::ci(), "umoci is missing under CI");
    let mut layers: Vec<(&str, Vec<u8>, bool, bool)> = vec![
        // (maker, layer, carries xattrs, keeps holes)
        ("GNU tar --format=gnu", gnu(&["--format=gnu"]), false, false),
        ("GNU tar --format=gnu --sparse", gnu(&["--format=gnu", "--sparse"]), false, true),
        ("GNU tar --format=pax", gnu(&["--format=pax"]), true, false),
        ("GNU tar --format=pax --sparse (1.0)", gnu(&["--format=pax", "--sparse"]), true, true),
        (
            "GNU tar --format=pax --sparse-version=0.0",
            gnu(&["--format=pax", "--sparse", "--sparse-version=0.0"]),
            true,
            true,
        ),
        (
            "GNU tar --format=pax --sparse-version=0.1",
            gnu(&["--format=pax", "--sparse", "--sparse-version=0.1"]),
            true,
            true,
        ),
        ("Python tarfile GNU_FORMAT", python("GNU_FORMAT"), false, false),
        ("Python tarfile PAX_FORMAT", python("PAX_FORMAT"), false, false),
    ];
    if have_umoci {
        layers.push(("umoci repack", umoci(), true, false));
    }
    for (maker, layer, xattrs, holes) in &layers {
        for mode in [ApplyMode::Merged, ApplyMode::Overlay] {
            let dir = tempfile::tempdir().unwrap();
            let target = dir.path().join("t");
            if mode == ApplyMode::Merged {
                fs::create_dir(&target).unwrap();
            }
            apply_layer(&layer[..], &target, &ApplyOptions::new(mode))
                .unwrap_or_else(|e| panic!("{maker} ({mode:?}): {e}"));
            assert_same(&view(&expected, *xattrs), &view(&scan(&target), *xattrs), &format!("{maker} ({mode:?})"));
            let blocks = fs::metadata(target.join("sparse")).unwrap().blocks() * 512;
            if *holes {
                assert!(blocks <= 1 << 20, "{maker} ({mode:?}): the sparse file takes {blocks} bytes on disk");
            }
        }
        // The same layer, extracted by GNU tar itself, is the same tree.
        let by_tar = gnu_tar(layer).unwrap_or_else(|e| panic!("GNU tar extracts {maker}: {e}"));
        assert_same(&view(&by_tar, *xattrs), &view(&expected, *xattrs), &format!("GNU tar extracting {maker}"));
    }
}

/// One edge case: an archive and whether vessel must take it.
struct Case {
    name: &'static str,
    archive: Vec<u8>,
    accept: bool,
}

fn sparse_old_gnu() -> Vec<u8> {
    // Old GNU sparse: 2 data segments and the closing empty one (as GNU
    // writes it) in the header, realsize 1 MiB.
    let mut b = Block::gnu(b'S', b"sp", 1024);
    b.octal(386, 12, 0).octal(398, 12, 512).octal(410, 12, 1 << 19).octal(422, 12, 512);
    b.octal(434, 12, 1 << 20).octal(446, 12, 0).octal(483, 12, 1 << 20);
    [b.sealed(), vec![1; 512], vec![2; 512], end_blocks()].concat()
}

fn sparse_old_gnu_short_map() -> Vec<u8> {
    let mut b = Block::gnu(b'S', b"sp", 512);
    b.octal(386, 12, 0).octal(398, 12, 512).octal(483, 12, 1 << 20);
    [b.sealed(), vec![1; 512], end_blocks()].concat()
}

fn cases() -> Vec<Case> {
    let long = format!("{}/{}", "p".repeat(80), "q".repeat(80));
    let base256_ids = {
        let mut b = Block::gnu(b'0', b"big-ids", 3);
        b.base256(108, 8, 3_000_000).base256(116, 8, 3_000_001).base256(136, 12, 4_102_444_800);
        [b.sealed(), padded(b"abc"), end_blocks()].concat()
    };
    let base256_size = {
        let mut b = Block::gnu(b'0', b"b256-size", 0);
        b.base256(124, 12, 5);
        [b.sealed(), padded(b"hello"), end_blocks()].concat()
    };
    let signed_sum =
        [Block::ustar(b'0', "\u{e9}t\u{e9}".as_bytes(), 2).sealed_signed(), padded(b"ok"), end_blocks()].concat();
    let v7_dir = {
        let mut b = Block([0; 512]);
        b.set(0, b"olddir/").octal(100, 8, 0o755).octal(108, 8, 0).octal(116, 8, 0).octal(124, 12, 0);
        b.octal(136, 12, 1_700_000_000);
        [b.sealed(), file_entry(b"olddir/f", b"v7"), end_blocks()].concat()
    };
    let mut gnu_long_link = Block::gnu(b'K', b"././@LongLink", long.len() as u64 + 1);
    gnu_long_link.octal(100, 8, 0o644);
    let mut gnu_long_name = Block::gnu(b'L', b"././@LongLink", long.len() as u64 + 1);
    gnu_long_name.octal(100, 8, 0o644);
    let nul_long = [long.as_bytes(), b"\0"].concat();
    // Found by the property tests (props.rs), shrunk.
    let mut odd_link = Block::ustar(b'1', b"link", 0);
    odd_link.set(157, b"file").octal(100, 8, 0o4755).octal(108, 8, 1000);
    let found = vec![
        Case {
            name: "a hardlink whose owner and mode differ from its file's",
            archive: [file_entry(b"file", b"x"), odd_link.sealed(), end_blocks()].concat(),
            accept: false,
        },
        Case {
            name: "a user xattr on a symlink (the kernel holds none: skipped)",
            archive: [
                pax_header(b'x', &[("SCHILY.xattr.user.p", b"v")]),
                Block::ustar(b'2', b"sym", 0).set(157, b"target").clone().sealed(),
                end_blocks(),
            ]
            .concat(),
            accept: true,
        },
        Case {
            name: "a symlink with an empty target",
            archive: [Block::ustar(b'2', b"sym", 0).sealed(), end_blocks()].concat(),
            accept: false,
        },
    ];
    let mut cases = vec![
        Case {
            name: "PAX size overrides the header size",
            archive: [
                pax_header(b'x', &[("size", b"5")]),
                Block::ustar(b'0', b"f", 0).sealed(),
                padded(b"hello"),
                end_blocks(),
            ]
            .concat(),
            accept: true,
        },
        Case {
            name: "PAX size 0 hides a smuggled entry in the data",
            archive: [
                pax_header(b'x', &[("size", b"0")]),
                Block::ustar(b'0', b"innocent", 1024).sealed(),
                file_entry(b"smuggled", b"surprise"),
                end_blocks(),
            ]
            .concat(),
            accept: true,
        },
        Case {
            name: "PAX uid, gid, uname, gname",
            archive: [
                pax_header(b'x', &[("uid", b"3000000"), ("gid", b"3000001"), ("uname", b"nobody"), ("gname", b"x")]),
                file_entry(b"f", b"ids"),
                end_blocks(),
            ]
            .concat(),
            accept: true,
        },
        Case {
            name: "PAX mtime with a fraction and before the epoch",
            archive: [pax_header(b'x', &[("mtime", b"-1.25")]), file_entry(b"old", b""), end_blocks()].concat(),
            accept: true,
        },
        Case {
            name: "PAX path and linkpath of 161 bytes",
            archive: [
                file_entry(b"target", b"t"),
                pax_header(b'x', &[("path", long.as_bytes()), ("linkpath", b"target")]),
                Block::ustar(b'1', b"short", 0).set(157, b"target").clone().sealed(),
                pax_header(b'x', &[("path", b"sym"), ("linkpath", long.as_bytes())]),
                Block::ustar(b'2', b"sym", 0).sealed(),
                end_blocks(),
            ]
            .concat(),
            accept: true,
        },
        Case {
            name: "GNU long name and long link",
            archive: [
                gnu_long_name.clone().sealed(),
                padded(&nul_long),
                Block::gnu(b'0', b"truncated", 4).sealed(),
                padded(b"long"),
                gnu_long_link.sealed(),
                padded(&nul_long),
                Block::gnu(b'2', b"ln", 0).sealed(),
                end_blocks(),
            ]
            .concat(),
            accept: true,
        },
        Case { name: "base-256 uid, gid and mtime", archive: base256_ids, accept: true },
        Case { name: "base-256 size", archive: base256_size, accept: true },
        Case { name: "signed header checksum", archive: signed_sum, accept: true },
        Case { name: "V7 header, directory by trailing slash", archive: v7_dir, accept: true },
        Case { name: "old GNU sparse entry", archive: sparse_old_gnu(), accept: true },
        Case {
            name: "PAX 0.0 sparse map",
            archive: [
                pax_header(
                    b'x',
                    &[
                        ("GNU.sparse.size", b"1048576"),
                        ("GNU.sparse.numblocks", b"2"),
                        ("GNU.sparse.offset", b"524288"),
                        ("GNU.sparse.numbytes", b"3"),
                        ("GNU.sparse.offset", b"1048576"),
                        ("GNU.sparse.numbytes", b"0"),
                    ],
                ),
                file_entry(b"sp", b"xyz"),
                end_blocks(),
            ]
            .concat(),
            accept: true,
        },
        Case { name: "no end-of-archive blocks", archive: file_entry(b"f", b"no end"), accept: true },
        Case {
            name: "one zero block at the end",
            archive: [file_entry(b"f", b"lone"), vec![0; 512]].concat(),
            accept: true,
        },
        Case {
            name: "a git-archive style global comment",
            archive: [pax_header(b'g', &[("comment", b"0123abcd")]), file_entry(b"f", b"g"), end_blocks()].concat(),
            accept: true,
        },
        // Refused: the parsers (GNU tar, Python, Go) disagree, or the
        // archive is broken.
        Case {
            name: "bad checksum after a good entry",
            archive: {
                let mut h = Block::ustar(b'0', b"second", 0).sealed();
                h[0] = b'x';
                [file_entry(b"first", b"1"), h, end_blocks()].concat()
            },
            accept: false,
        },
        Case {
            name: "a zero block, then a header",
            archive: [file_entry(b"a", b"1"), vec![0; 512], file_entry(b"hidden", b"2"), end_blocks()].concat(),
            accept: false,
        },
        Case {
            name: "octal size with an embedded NUL",
            archive: {
                let mut b = Block::ustar(b'0', b"f", 0);
                b.set(124, b"0000000012\x0034");
                [b.sealed(), padded(&[9; 10]), end_blocks()].concat()
            },
            accept: false,
        },
        Case {
            name: "data on a symlink",
            archive: [Block::ustar(b'2', b"s", 512).sealed(), file_entry(b"inside", b"x"), end_blocks()].concat(),
            accept: false,
        },
        Case {
            name: "data on a hardlink",
            archive: [
                file_entry(b"t", b"t"),
                Block::ustar(b'1', b"h", 512).set(157, b"t").clone().sealed(),
                file_entry(b"inside", b"x"),
                end_blocks(),
            ]
            .concat(),
            accept: false,
        },
        Case {
            name: "a PAX path and a GNU long name",
            archive: [
                pax_header(b'x', &[("path", b"from-pax")]),
                gnu_long_name.sealed(),
                padded(&nul_long),
                Block::gnu(b'0', b"f", 0).sealed(),
                end_blocks(),
            ]
            .concat(),
            accept: false,
        },
        Case {
            name: "a global PAX header that sets a path",
            archive: [pax_header(b'g', &[("path", b"global")]), file_entry(b"f", b"x"), end_blocks()].concat(),
            accept: false,
        },
        Case {
            name: "PAX mtime in exponent form",
            archive: [pax_header(b'x', &[("mtime", b"1e9")]), file_entry(b"f", b""), end_blocks()].concat(),
            accept: false,
        },
        Case {
            name: "PAX size with a plus sign",
            archive: [
                pax_header(b'x', &[("size", b"+2")]),
                Block::ustar(b'0', b"f", 0).sealed(),
                padded(b"ab"),
                end_blocks(),
            ]
            .concat(),
            accept: false,
        },
        Case {
            name: "a GNU header with a filled prefix area",
            archive: {
                let mut b = Block::gnu(b'0', b"f", 0);
                b.set(345, b"prefix");
                [b.sealed(), end_blocks()].concat()
            },
            accept: false,
        },
        Case {
            name: "a '0' entry named like a directory",
            archive: [Block::ustar(b'0', b"d/", 0).sealed(), end_blocks()].concat(),
            accept: false,
        },
        Case {
            name: "uid 4294967295 (chown's 'unchanged')",
            archive: [pax_header(b'x', &[("uid", b"4294967295")]), file_entry(b"f", b""), end_blocks()].concat(),
            accept: false,
        },
        Case {
            name: "a sparse map that ends before the file's size",
            archive: sparse_old_gnu_short_map(),
            accept: false,
        },
        Case {
            name: "an entry running past the end",
            archive: [Block::ustar(b'0', b"f", 4096).sealed(), vec![1; 1024]].concat(),
            accept: false,
        },
    ];
    cases.extend(found);
    cases
}

fn show<T>(r: &Result<T, String>) -> String {
    match r {
        Ok(_) => "reads".into(),
        Err(e) => format!("error: {}", e.replace('\n', " ").chars().take(50).collect::<String>()),
    }
}

#[test]
fn edge_archives_are_read_as_gnu_tar_and_python_read_them() {
    if !need_tools("edge_archives_are_read_as_gnu_tar_and_python_read_them") {
        return;
    }
    let mut table = vec![
        "| case | GNU tar | Python tarfile | GNU tar = Python | vessel |".to_owned(),
        "|---|---|---|---|---|".to_owned(),
    ];
    for case in cases() {
        let by_tar = gnu_tar(&case.archive);
        let by_python = python_tarfile(&case.archive);
        let merged = vessel(&case.archive, ApplyMode::Merged);
        let overlay = vessel(&case.archive, ApplyMode::Overlay);
        let agree = |a: &Result<Tree, String>, b: &Result<Tree, String>| match (a, b) {
            (Ok(a), Ok(b)) => loose(a) == loose(b),
            _ => false,
        };
        let verdict = match (&merged, &overlay) {
            (Ok(m), Ok(o)) => {
                assert_eq!(loose(m), loose(o), "{}: the two modes read it differently", case.name);
                if agree(&merged, &by_tar) && agree(&merged, &by_python) {
                    "reads, same tree"
                } else {
                    "reads, DIFFERENT tree"
                }
            }
            (Err(_), Err(_)) => "refused",
            _ => panic!("{}: one mode refused, one read it: {merged:?} {overlay:?}", case.name),
        };
        let tools_agree = if agree(&by_tar, &by_python) { "yes" } else { "no" };
        let shown = match &merged {
            Err(e) => format!("refused: {}", e.rsplit(": ").next().unwrap_or(e)),
            Ok(_) => verdict.to_owned(),
        };
        table.push(format!("| {} | {} | {} | {tools_agree} | {shown} |", case.name, show(&by_tar), show(&by_python)));
        if case.accept {
            assert_eq!(
                verdict,
                "reads, same tree",
                "{}:\nvessel vs GNU tar: {}\nvessel vs Python: {}",
                case.name,
                differences(&merged, &by_tar),
                differences(&merged, &by_python)
            );
        } else {
            assert_eq!(verdict, "refused", "{}: vessel read it: {merged:?}", case.name);
        }
    }
    println!("{}", table.join("\n"));
}
