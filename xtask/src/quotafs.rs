//! A btrfs filesystem with quotas on, loop-mounted from a sparse file, for
//! what needs vessels' disk quotas (tests, benches, the demo): their temp
//! dirs (`TMPDIR`) and so their mount roots live on it. Unmounted and
//! deleted on drop.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::util::run;

#[derive(Debug)]
pub(crate) struct QuotaFs {
    image: PathBuf,
    mount: PathBuf,
    /// A temp dir on it, for `TMPDIR`.
    pub(crate) tmp: PathBuf,
}

impl QuotaFs {
    pub(crate) fn start() -> Result<Self> {
        let id = std::process::id();
        let image = PathBuf::from(format!("/var/tmp/vessel-btrfs-{id}.img"));
        let mount = PathBuf::from(format!("/tmp/vessel-btrfs-{id}"));
        let file = std::fs::File::create(&image).with_context(|| format!("creating {}", image.display()))?;
        // Sparse: it takes on the host disk only what the tests write.
        file.set_len(64 << 30)?;
        drop(file);
        let me = Self { tmp: mount.join("tmp"), image, mount };
        run(Command::new("mkfs.btrfs").arg("-q").arg(&me.image)).context("mkfs.btrfs (run `cargo xtask setup`)")?;
        std::fs::create_dir_all(&me.mount)?;
        // discard: what is deleted in it is given back to the host disk.
        run(Command::new("mount").args(["-o", "loop,discard"]).arg(&me.image).arg(&me.mount))?;
        run(Command::new("btrfs").args(["quota", "enable"]).arg(&me.mount))?;
        std::fs::create_dir(&me.tmp)?;
        println!("quota fs: btrfs with quotas at {}", me.mount.display());
        Ok(me)
    }
}

impl Drop for QuotaFs {
    fn drop(&mut self) {
        let umount = Command::new("umount").arg(&self.mount).status();
        if !umount.is_ok_and(|s| s.success()) {
            // Something still holds it: detach now, freed when let go.
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_file(&self.image);
    }
}
