//! Published ports: a host socket whose connections are relayed to a port
//! of the vessel (as docker-proxy and podman's rootlessport do), so a dev
//! server an agent started can be opened from the host. The relay connects
//! from the host, so the vessel's filter sees only replies.

use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};

use crate::RuntimeError;

/// One published port; the listener closes when it is dropped.
#[derive(Debug)]
pub(super) struct Published {
    pub(super) addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Published {
    /// Listens on an ephemeral port of `host` and relays to `target`,
    /// connecting from network namespace `inside` when given (a rootless
    /// vessel's, which the host cannot route to).
    pub(super) async fn start(
        host: IpAddr,
        target: SocketAddr,
        inside: Option<std::path::PathBuf>,
    ) -> Result<Self, RuntimeError> {
        let listener = TcpListener::bind(SocketAddr::new(host, 0))
            .await
            .map_err(RuntimeError::io("listen on", host.to_string()))?;
        let addr = listener.local_addr().map_err(RuntimeError::io("read the address of", host.to_string()))?;
        let task = tokio::spawn(async move {
            let mut relays = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut client, _)) = accepted else { continue };
                        let inside = inside.clone();
                        relays.spawn(async move {
                            // Nothing listening in the vessel: the client sees its connection closed.
                            if let Ok(mut vessel) = connect(target, inside).await {
                                let _ = tokio::io::copy_bidirectional(&mut client, &mut vessel).await;
                            }
                        });
                    }
                    // Reap finished relays; aborting this task aborts them all.
                    Some(_) = relays.join_next(), if !relays.is_empty() => {}
                }
            }
        });
        Ok(Self { addr, task })
    }
}

/// A connection to `target`, made in namespace `inside` if given (the
/// socket stays in it; a local connect there does not block).
async fn connect(target: SocketAddr, inside: Option<std::path::PathBuf>) -> std::io::Result<TcpStream> {
    let Some(ns) = inside else { return TcpStream::connect(target).await };
    let stream = tokio::task::spawn_blocking(move || {
        super::in_ns(Some(&ns), || std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2)))
    })
    .await
    .map_err(std::io::Error::other)?
    .map_err(std::io::Error::other)??;
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}

impl Drop for Published {
    fn drop(&mut self) {
        self.task.abort();
    }
}
