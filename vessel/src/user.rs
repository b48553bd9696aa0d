//! The image's `USER`, resolved as docker resolves it: `user[:group]`,
//! each a name or a number, names looked up in the vessel's own
//! `/etc/passwd` and `/etc/group` (read through the confined file API, so a
//! symlinked `/etc/passwd` cannot name a host file). Supplementary groups
//! are the `/etc/group` entries that list the user. An unknown name is an
//! error when the vessel is created, never a silent run as root.

use std::os::fd::OwnedFd;

use crate::error::{Result, VesselError};
use crate::fs as vfs;

/// Who a vessel's commands run as, in container ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct User {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) additional_gids: Vec<u32>,
}

/// The manifest label that pins the resolved user at creation, so a
/// vessel whose commands later rewrite or delete `/etc/passwd` still opens
/// (and runs as) the same ids: `uid:gid[:gid,gid...]`.
pub(crate) const USER_LABEL: &str = "vessel.user";

impl User {
    pub(crate) fn label(&self) -> String {
        let groups: Vec<String> = self.additional_gids.iter().map(u32::to_string).collect();
        format!("{}:{}:{}", self.uid, self.gid, groups.join(","))
    }

    pub(crate) fn from_label(label: &str) -> Option<Self> {
        let mut parts = label.splitn(3, ':');
        let uid = parts.next()?.parse().ok()?;
        let gid = parts.next()?.parse().ok()?;
        let additional_gids = match parts.next() {
            Some("") | None => Vec::new(),
            Some(g) => g.split(',').map(str::parse).collect::<Result<_, _>>().ok()?,
        };
        Some(Self { uid, gid, additional_gids })
    }
}

/// `name:x:uid:gid:...` lines of a passwd-format file.
fn entries(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines().filter(|l| !l.trim_start().starts_with('#')).map(|l| l.split(':').collect::<Vec<_>>())
}

fn read(root: &OwnedFd, path: &str) -> Option<String> {
    vfs::read_file(root, path).ok().map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Resolves `spec` (the image config's `User`; `None` or empty is root).
pub(crate) fn resolve(root: &OwnedFd, spec: Option<&str>) -> Result<User> {
    let spec = spec.unwrap_or("").trim();
    let unknown = |reason: String| VesselError::UnknownUser { user: spec.to_owned(), reason };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "root" } else { user };
    let passwd = read(root, "/etc/passwd").unwrap_or_default();
    let groups = read(root, "/etc/group").unwrap_or_default();
    let entry =
        entries(&passwd).find(|e| e.len() >= 4 && (e[0] == user || (user.parse::<u32>().is_ok() && e[2] == user)));
    let (uid, mut gid, name) = match (user.parse::<u32>(), &entry) {
        (Ok(uid), Some(e)) => (uid, e[3].parse().unwrap_or(0), Some(e[0])),
        (Ok(uid), None) => (uid, 0, None),
        (Err(_), Some(e)) => {
            let uid = e[2].parse().map_err(|_| unknown(format!("bad uid {:?} in /etc/passwd", e[2])))?;
            (uid, e[3].parse().map_err(|_| unknown(format!("bad gid {:?} in /etc/passwd", e[3])))?, Some(e[0]))
        }
        (Err(_), None) => return Err(unknown(format!("no user {user:?} in the image's /etc/passwd"))),
    };
    if let Some(g) = group {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => entries(&groups)
                .find(|e| e.len() >= 3 && e[0] == g)
                .and_then(|e| e[2].parse().ok())
                .ok_or_else(|| unknown(format!("no group {g:?} in the image's /etc/group")))?,
        };
    }
    let mut additional_gids: Vec<u32> = match name {
        Some(n) => entries(&groups)
            .filter(|e| e.len() >= 4 && e[3].split(',').any(|m| m.trim() == n))
            .filter_map(|e| e[2].parse().ok())
            .filter(|g| *g != gid)
            .collect(),
        None => Vec::new(),
    };
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(User { uid, gid, additional_gids })
}
