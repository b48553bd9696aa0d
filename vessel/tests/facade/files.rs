//! Files and directories through the facade: reads, writes, handles, and the
//! path checks that keep every call inside the vessel.

use super::*;

pub(super) async fn file_operations(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("files").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    v.write_file("a.txt", b"one", 0o640)?;
    ensure!(v.read_file("a.txt")? == b"one");
    ensure!(v.read_file("/work/a.txt")? == b"one", "relative = work_dir-relative");
    let st = v.stat("a.txt")?;
    ensure!(st.size == 3 && st.mode == 0o640 && st.file_type == vessel::FileType::File && st.name == "a.txt");
    v.write_file("a.txt", b"two!", 0o600)?;
    ensure!(v.read_file("a.txt")? == b"two!");
    v.rename_file("a.txt", "/tmp/b.txt")?;
    ensure!(v.stat("a.txt").is_err() && v.read_file("/tmp/b.txt")? == b"two!");
    v.delete_file("/tmp/b.txt")?;
    match v.read_file("/tmp/b.txt") {
        Err(e) if e.kind() == VesselErrorKind::NotFound => {}
        other => return Err(anyhow!("read of a deleted file: {other:?}")),
    }
    // Files written through the API are seen by commands, and vice versa.
    v.write_file("in.txt", b"from the api\n", 0o644)?;
    let (code, out, _) = run(&v, "cat in.txt; echo from the container > out.txt", true).await?;
    ensure!(code == 0 && out == "from the api\n");
    ensure!(v.read_file("out.txt")? == b"from the container\n");
    // Image files are readable.
    ensure!(!v.read_file("/bin/busybox")?.is_empty());
    mgr.close().await?;
    Ok(())
}

pub(super) async fn directory_operations(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("dirs").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    v.make_dir("d", 0o750)?;
    ensure!(v.stat("d")?.is_dir() && v.stat("d")?.mode == 0o750);
    ensure!(v.make_dir("d", 0o755).is_err(), "make_dir of an existing dir fails");
    ensure!(v.make_dir("x/y", 0o755).is_err(), "make_dir without parent fails");
    v.make_dir_all("x/y/z", 0o755)?;
    v.make_dir_all("x/y/z", 0o755)?;
    v.write_file("x/y/z/f", b"", 0o644)?;
    v.write_file("x/file", b"1", 0o644)?;
    ensure!(v.make_dir_all("x/file/sub", 0o755).is_err(), "a file in the way");
    let names: Vec<String> = v.read_dir("x")?.into_iter().map(|e| e.name).collect();
    ensure!(names == ["file", "y"], "{names:?}");
    let root: Vec<String> = v.read_dir("/")?.into_iter().map(|e| e.name).collect();
    ensure!(root.contains(&"bin".to_string()) && root.contains(&"work".to_string()), "{root:?}");
    ensure!(v.delete_file("x/y").is_err(), "a non-empty dir is not deleted");
    v.delete_file("x/y/z/f")?;
    v.delete_file("x/y/z")?;
    ensure!(v.stat("x/y/z").is_err());
    mgr.close().await?;
    Ok(())
}

pub(super) async fn open_file_handles(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("handles").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let mut f = v.open_file("log", OpenFlags::O_RDWR | OpenFlags::O_CREAT, 0o644)?;
    f.write_all(b"hello world")?;
    f.seek(SeekFrom::Start(6))?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    ensure!(s == "world");
    ensure!(f.write_at(b"W", 6)? == 1);
    let mut buf = [0u8; 5];
    f.read_at(&mut buf, 6)?;
    ensure!(&buf == b"World");
    f.truncate(5)?;
    f.sync()?;
    ensure!(f.stat()?.size == 5);
    drop(f);
    let mut a = v.open_file("log", OpenFlags::O_WRONLY | OpenFlags::O_APPEND, 0)?;
    a.write_all(b"+more")?;
    ensure!(v.read_file("log")? == b"hello+more");
    ensure!(v.open_file("log", OpenFlags::O_CREAT | OpenFlags::O_EXCL | OpenFlags::O_WRONLY, 0o644).is_err());
    // A snapshot remounts: an old handle goes stale instead of writing into a sealed layer.
    v.create_snapshot("s").await?;
    match a.write_all(b"late") {
        Err(e) if e.to_string().contains("stale") => {}
        other => return Err(anyhow!("write through a stale handle: {other:?}")),
    }
    ensure!(v.read_file("log")? == b"hello+more");
    mgr.close().await?;
    Ok(())
}

pub(super) async fn path_security(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("paths").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let canary = w.base.join("host-canary");
    std::fs::write(&canary, "host secret\n")?;
    // `..` at the vessel's `/` stays there (as in the Go original, and in
    // a chroot): this is the vessel's passwd, never the host's.
    let passwd = v.read_file("../../../../etc/passwd")?;
    ensure!(passwd == v.read_file("/etc/passwd")?, "`..` above the root left the vessel");
    ensure!(String::from_utf8_lossy(&passwd).contains("app:x:1000"), "not the image's passwd");
    ensure!(v.stat("")?.is_dir() && v.stat("")? == v.stat("/work")?, "\"\" is the work dir");
    match v.read_file("a\0b") {
        Err(e) if e.kind() == VesselErrorKind::InvalidInput => {}
        other => return Err(anyhow!("a NUL byte in a path: {other:?}")),
    }
    // Absolute paths are the vessel's.
    v.write_file(canary.to_str().unwrap(), b"inside", 0o644).or_else(|_| {
        v.make_dir_all(canary.parent().unwrap().to_str().unwrap(), 0o755)?;
        v.write_file(canary.to_str().unwrap(), b"inside", 0o644)
    })?;
    ensure!(std::fs::read_to_string(&canary)? == "host secret\n", "an absolute path reached the host");
    // Symlinks planted by a command resolve inside the vessel.
    let script = format!(
        "ln -s /etc/shadow shadow; ln -s {c} canary; ln -s ../../../../../../../../ up; ln -s /proc/self/root pr",
        c = canary.display()
    );
    let (code, _, err) = run(&v, &script, true).await?;
    ensure!(code == 0, "{err}");
    let host_shadow = std::fs::read("/etc/shadow").unwrap_or_default();
    if let Ok(data) = v.read_file("shadow") {
        ensure!(data != host_shadow || host_shadow.is_empty(), "read the host's /etc/shadow");
    }
    ensure!(v.read_file("canary")? == b"inside", "the planted link resolves in the vessel");
    v.write_file("canary", b"overwritten", 0o644)?;
    ensure!(std::fs::read_to_string(&canary)? == "host secret\n", "a write through a planted link reached the host");
    let through_up = v.read_file(&format!("up{}", canary.display()))?;
    ensure!(through_up == b"overwritten", "`..` in a symlink stays inside");
    ensure!(v.read_file("pr/etc/hostname").is_err(), "magic links are refused");
    v.write_file("up/etc/evil", b"x", 0o644)?;
    ensure!(!Path::new("/etc/evil").exists(), "wrote to the host's /etc");
    // Device nodes and FIFOs a container leaves behind (CAP_MKNOD) are never
    // opened from the host: a block device would read the host's disk, a
    // FIFO would hang. Made here from the host side, as a container could.
    // (Through the idmapped mount, with the vessel root's host ids.)
    let work = v.rootfs().join("work");
    let root_id = v.id_mapping().map_or(0, |m| m.host_id);
    let dev = |name: &str, kind: nix::sys::stat::SFlag, major, minor| {
        vessel::runtime::idmap::as_host_ids(root_id, root_id, || {
            nix::sys::stat::mknod(
                &work.join(name),
                kind,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(major, minor),
            )
        })
    };
    let rootless = vessel::runtime::rootless::mode().is_rootless();
    let nodes: &[&str] = if rootless {
        // Rootless, nobody can make a device node (nor could a container).
        ensure!(dev("blk", nix::sys::stat::SFlag::S_IFBLK, 7, 0) == Err(nix::errno::Errno::EPERM));
        ensure!(dev("chr", nix::sys::stat::SFlag::S_IFCHR, 1, 3) == Err(nix::errno::Errno::EPERM));
        &["fifo"]
    } else {
        dev("blk", nix::sys::stat::SFlag::S_IFBLK, 7, 0)?;
        dev("chr", nix::sys::stat::SFlag::S_IFCHR, 1, 3)?;
        &["blk", "chr", "fifo"]
    };
    vessel::runtime::idmap::as_host_ids(root_id, root_id, || {
        nix::unistd::mkfifo(&work.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o666))
    })?;
    let v = Arc::new(v);
    for &name in nodes {
        let vc = v.clone();
        let tries = tokio::task::spawn_blocking(move || {
            [
                vc.read_file(name).is_err(),
                vc.write_file(name, b"x", 0o644).is_err(),
                vc.open_file(name, OpenFlags::O_RDONLY, 0).is_err(),
                vc.open_file(name, OpenFlags::O_WRONLY | OpenFlags::O_APPEND, 0).is_err(),
            ]
        });
        let refused = tokio::time::timeout(Duration::from_secs(10), tries).await.context("hangs")??;
        ensure!(refused == [true; 4], "{name}: opened from the host {refused:?}");
        ensure!(v.stat(name).is_ok(), "{name}: stat (no open) still works");
    }
    mgr.close().await?;
    Ok(())
}
