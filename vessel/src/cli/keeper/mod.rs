//! Keepers: what holds a vessel open between CLI commands while its
//! background processes run.
//!
//! A `vessel` command is short-lived, and a vessel's live sandbox lives
//! only as long as the process that opened it (so a crash never leaves a
//! sandbox behind). `vessel exec -d` therefore starts a keeper: a detached
//! `vessel keep ID` process (its own session, as containerd's shim or
//! podman's conmon outlives the command that started a container) that
//! opens the vessel, holds it (the vessel's lock and lease) and serves
//! calls on a unix socket, `<mount root>/keepers/<id>.sock` (dir 0700,
//! socket 0600, and each peer's uid checked with `SO_PEERCRED`: only the
//! keeper's own user, or root, is served). While a keeper runs, every
//! command on that vessel goes through it (exec, read, write, snapshot,
//! restore, ps, logs, kill, wait, pause, resume), so a later `vessel exec`
//! reaches a server started by `exec -d`. The keeper ends, closing the
//! vessel, on `vessel stop` or `vessel rm -f` (SIGTERM), or once no
//! process has run and no command has called for its linger time (ended
//! processes' statuses stay readable until then). `kill -9` of a keeper
//! takes its sandbox with it, as for any holder; the next command finds
//! the stale socket refused and works directly.

pub(crate) mod client;
mod serve;
pub(crate) mod wire;

use std::path::PathBuf;

use vessel::{Manager, VesselId};

pub(crate) use serve::serve;

/// Where the keeper of vessel `id` listens.
pub(crate) fn socket_path(mgr: &Manager, id: &VesselId) -> PathBuf {
    keepers_dir(mgr).join(format!("{id}.sock"))
}

/// The keepers' sockets and logs: the user's own (0700).
pub(crate) fn keepers_dir(mgr: &Manager) -> PathBuf {
    mgr.mount_root().join("keepers")
}
