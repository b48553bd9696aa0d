//! The CLI's side: finds or starts a vessel's keeper and makes calls on it.

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use vessel::{Manager, VesselId};

use super::wire::{Bytes, Call, Conn, Frame, Reply};

/// A call the keeper refused or that failed there, with the exit code a
/// command's start failure has (126, 127), as a direct `vessel exec` has.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct KeeperError {
    pub(crate) message: String,
    pub(crate) exit_code: Option<u8>,
}

/// The keeper of vessel `id`, if one runs. A socket that refuses is a
/// dead keeper's: it is gone with its holder, and the vessel is free.
pub(crate) async fn connect(mgr: &Manager, id: &VesselId) -> Result<Option<Conn>> {
    let path = super::socket_path(mgr, id);
    match UnixStream::connect(&path).await {
        Ok(s) => Ok(Some(Conn::new(s))),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("connecting to the keeper at {}", path.display())),
    }
}

/// The keeper of vessel `id`, started (as `vessel <globals> keep ID`) if
/// none runs.
pub(crate) async fn connect_or_start(
    mgr: &Manager,
    id: &VesselId,
    globals: &[String],
    linger: Duration,
) -> Result<Conn> {
    if let Some(c) = connect(mgr, id).await? {
        return Ok(c);
    }
    let dir = super::keepers_dir(mgr);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let log = std::fs::File::create(dir.join(format!("{id}.log"))).context("creating the keeper's log")?;
    let mut cmd = std::process::Command::new(std::env::current_exe().context("finding this program")?);
    cmd.args(globals)
        .args(["keep", id.as_str(), "--linger", &linger.as_secs_f64().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Its own process group: the terminal's ^C for this command is
        // not the keeper's (and it ignores the hangup of the session).
        .process_group(0);
    let mut child = cmd.spawn().context("starting the vessel's keeper")?;
    let out = child.stdout.take().context("the keeper's stdout")?;
    let said = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).map(|_| line)
    })
    .await??;
    // Not waited for: it outlives this command (and is reaped by init).
    drop(child);
    if said.trim_end() != "ready" {
        // Another command may have started one first.
        if let Some(c) = connect(mgr, id).await? {
            return Ok(c);
        }
        bail!("the vessel's keeper did not start: {}", said.trim_end());
    }
    connect(mgr, id).await?.context("the keeper started but does not answer")
}

/// Makes `call` and returns its reply; output frames go to this
/// process's stdout and stderr as they come.
pub(crate) async fn call(mut conn: Conn, call: Call) -> Result<Reply> {
    conn.send(&Frame::Call(call)).await.context("calling the keeper")?;
    finish(&mut conn).await
}

/// Reads frames until the reply, printing data.
async fn finish(conn: &mut Conn) -> Result<Reply> {
    loop {
        match conn.recv().await.context("reading from the keeper")? {
            Some(f) => {
                if let Some(r) = print(f)? {
                    return r;
                }
            }
            None => bail!("the keeper ended the call without a reply (it was stopped)"),
        }
    }
}

/// Prints a data frame; a reply ends the call (`Failed` as an error).
fn print(f: Frame) -> Result<Option<Result<Reply>>> {
    match f {
        Frame::Stdout { data } => write_all(&mut std::io::stdout(), &data)?,
        Frame::Stderr { data } => write_all(&mut std::io::stderr(), &data)?,
        Frame::Reply(Reply::Failed { message, exit_code }) => {
            return Ok(Some(Err(KeeperError { message, exit_code }.into())));
        }
        Frame::Reply(r) => return Ok(Some(Ok(r))),
        other => bail!("the keeper sent {other:?} out of turn"),
    }
    Ok(None)
}

fn write_all(w: &mut impl Write, data: &Bytes) -> Result<()> {
    w.write_all(&data.0)?;
    w.flush()?;
    Ok(())
}

/// Makes `call` with this process's stdin as the call's input (if `stdin`).
pub(crate) async fn call_with_input(mut conn: Conn, call: Call, stdin: bool) -> Result<Reply> {
    conn.send(&Frame::Call(call)).await.context("calling the keeper")?;
    if !stdin {
        return finish(&mut conn).await;
    }
    let mut input = tokio::io::stdin();
    let mut buf = vec![0u8; super::wire::CHUNK.min(64 << 10)];
    let mut open = true;
    loop {
        tokio::select! {
            n = input.read(&mut buf), if open => {
                let n = n.context("reading stdin")?;
                if n == 0 {
                    open = false;
                    conn.send(&Frame::StdinEnd).await?;
                } else {
                    conn.send(&Frame::Stdin { data: Bytes(buf[..n].to_vec()) }).await?;
                }
            }
            f = conn.recv() => match f.context("reading from the keeper")? {
                Some(f) => if let Some(r) = print(f)? { return r },
                None => bail!("the keeper ended the call without a reply (it was stopped)"),
            },
        }
    }
}

/// Makes `call` sending `data` as its input.
pub(crate) async fn call_with_data(mut conn: Conn, call: Call, data: &[u8]) -> Result<Reply> {
    conn.send(&Frame::Call(call)).await.context("calling the keeper")?;
    conn.send_data(data, |data| Frame::Stdin { data }).await?;
    conn.send(&Frame::StdinEnd).await?;
    finish(&mut conn).await
}
