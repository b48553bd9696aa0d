//! The frames between the host and the sandbox agent (`sandbox/agent.c`),
//! one typed place for both directions. A frame is a kind byte, a process
//! id and a payload length (little-endian `u32`s), then the payload.
//! Whatever the agent says is read as untrusted: it runs inside the vessel,
//! where code could (with the right privileges) tamper with it, so a bad
//! frame ends the sandbox, never the host.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The protocol version both sides must speak (the agent says its own first).
pub(crate) const AGENT_VERSION: u32 = 1;
/// The largest frame either side sends.
pub(crate) const MAX_FRAME: u32 = 1 << 20;
/// Input goes to a process in chunks of at most this, one in flight.
pub(crate) const STDIN_CHUNK: usize = 64 << 10;

/// Agent flags of a spawn request.
const F_TTY: u32 = 1;
const F_KEEP_GROUP: u32 = 2;
const F_STDIN: u32 = 4;

/// What to start in the sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessSpec {
    /// argv; `args[0]` is looked up in `PATH` from `env`.
    pub args: Vec<String>,
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// Working directory inside the vessel (empty: the agent's, `/`).
    pub cwd: String,
    /// User, group and supplementary groups, as the container sees them.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub additional_gids: Vec<u32>,
    /// Run on a new pseudo-terminal of this size (output on stdout).
    pub tty: Option<crate::TtySize>,
    /// Give it a stdin pipe (else `/dev/null`).
    pub stdin: bool,
    /// Leave its process group running when it exits (a background
    /// process's children); otherwise they are killed with it, as they
    /// were when each command had its own container.
    pub keep_group: bool,
}

/// A request to the agent.
#[derive(Debug)]
pub(crate) enum Request<'a> {
    Spawn(u32, &'a ProcessSpec),
    Stdin(u32, &'a [u8]),
    CloseStdin(u32),
    Signal(u32, i32),
    Freeze,
    Thaw,
    Quit,
}

fn frame(kind: u8, id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    out.push(kind);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

impl Request<'_> {
    /// The frame's bytes; `InvalidRequest` for a spawn the agent could not take.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, crate::RuntimeError> {
        Ok(match self {
            Self::Spawn(id, spec) => frame(b'S', *id, &encode_spawn(spec)?),
            Self::Stdin(id, data) => frame(b'I', *id, data),
            Self::CloseStdin(id) => frame(b'I', *id, &[]),
            Self::Signal(id, sig) => frame(b'K', *id, &(*sig as u32).to_le_bytes()),
            Self::Freeze => frame(b'F', 0, &[]),
            Self::Thaw => frame(b'T', 0, &[]),
            Self::Quit => frame(b'Q', 0, &[]),
        })
    }
}

fn encode_spawn(s: &ProcessSpec) -> Result<Vec<u8>, crate::RuntimeError> {
    let bad = |why: &str| crate::RuntimeError::InvalidRequest(why.to_owned());
    if s.args.is_empty() {
        return Err(bad("empty argv"));
    }
    if s.additional_gids.len() > 256 {
        return Err(bad("more than 256 supplementary groups"));
    }
    let strings = std::iter::once(&s.cwd).chain(&s.args).chain(&s.env);
    if strings.clone().any(|v| v.contains('\0')) {
        return Err(bad("a NUL byte in argv, env or the work dir"));
    }
    let mut flags = 0;
    if s.tty.is_some() {
        flags |= F_TTY;
    }
    if s.keep_group {
        flags |= F_KEEP_GROUP;
    }
    if s.stdin {
        flags |= F_STDIN;
    }
    let size = s.tty.unwrap_or(crate::TtySize { rows: 0, cols: 0 });
    let mut out = Vec::new();
    for v in [flags, s.uid, s.gid] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&size.rows.to_le_bytes());
    out.extend_from_slice(&size.cols.to_le_bytes());
    for v in [s.additional_gids.len() as u32, s.args.len() as u32, s.env.len() as u32] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for g in &s.additional_gids {
        out.extend_from_slice(&g.to_le_bytes());
    }
    for v in strings {
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    if out.len() > MAX_FRAME as usize {
        return Err(bad("argv and env exceed the sandbox's 1 MiB request"));
    }
    Ok(out)
}

/// What the agent says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    Hello { version: u32 },
    Started { id: u32, pid: u32, oom_kills: u64 },
    StartFailed { id: u32, errno: i32 },
    Output { id: u32, stderr: bool, data: Vec<u8> },
    Exited { id: u32, wait_status: i32, oom_kills: u64 },
    Ack { id: u32 },
    Frozen,
    Thawed,
}

fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(d: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(d.get(at..at + 8)?.try_into().ok()?))
}

/// The next event; `None` at a clean end of stream (the agent is gone).
pub(crate) async fn read_event(r: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Event>> {
    let mut h = [0u8; 9];
    match r.read_exact(&mut h[..1]).await {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        r => r?,
    };
    r.read_exact(&mut h[1..]).await?;
    let (kind, id, len) = (h[0], u32_at(&h, 1).unwrap_or(0), u32_at(&h, 5).unwrap_or(0));
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("an agent frame of {len} bytes")));
    }
    let mut d = vec![0u8; len as usize];
    r.read_exact(&mut d).await?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("a malformed agent frame {:?}", kind as char));
    Ok(Some(match kind {
        b'H' => Event::Hello { version: u32_at(&d, 0).ok_or_else(bad)? },
        b'P' => Event::Started { id, pid: u32_at(&d, 0).ok_or_else(bad)?, oom_kills: u64_at(&d, 4).ok_or_else(bad)? },
        b'E' => Event::StartFailed { id, errno: u32_at(&d, 0).ok_or_else(bad)? as i32 },
        b'O' => Event::Output { id, stderr: false, data: d },
        b'R' => Event::Output { id, stderr: true, data: d },
        b'X' => Event::Exited {
            id,
            wait_status: u32_at(&d, 0).ok_or_else(bad)? as i32,
            oom_kills: u64_at(&d, 4).ok_or_else(bad)?,
        },
        b'A' => Event::Ack { id },
        b'f' => Event::Frozen,
        b't' => Event::Thawed,
        _ => return Err(bad()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawn_request_carries_every_field_in_order() {
        let spec = ProcessSpec {
            args: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec!["A=b".into()],
            cwd: "/w".into(),
            uid: 1000,
            gid: 1001,
            additional_gids: vec![7],
            tty: Some(crate::TtySize { rows: 30, cols: 100 }),
            stdin: true,
            keep_group: false,
        };
        let f = Request::Spawn(5, &spec).encode().unwrap();
        assert_eq!(f[0], b'S');
        assert_eq!(u32_at(&f, 1), Some(5));
        let d = &f[9..];
        assert_eq!(u32_at(&f, 5), Some(d.len() as u32));
        assert_eq!(u32_at(d, 0), Some(F_TTY | F_STDIN));
        assert_eq!((u32_at(d, 4), u32_at(d, 8)), (Some(1000), Some(1001)));
        assert_eq!(&d[12..16], &[30, 0, 100, 0]);
        assert_eq!((u32_at(d, 16), u32_at(d, 20), u32_at(d, 24), u32_at(d, 28)), (Some(1), Some(3), Some(1), Some(7)));
        assert_eq!(&d[32..], b"/w\0sh\0-c\0true\0A=b\0");
    }

    #[test]
    fn bad_requests_are_refused_before_they_reach_the_agent() {
        let empty = ProcessSpec::default();
        assert!(Request::Spawn(1, &empty).encode().is_err());
        let nul = ProcessSpec { args: vec!["a\0b".into()], ..Default::default() };
        assert!(Request::Spawn(1, &nul).encode().is_err());
        let huge = ProcessSpec { args: vec!["x".repeat(2 << 20)], ..Default::default() };
        assert!(Request::Spawn(1, &huge).encode().is_err());
    }

    #[tokio::test]
    async fn events_decode_and_garbage_is_an_error() {
        let mut bytes = frame(b'H', 0, &1u32.to_le_bytes());
        let mut exited = 9u32.to_le_bytes().to_vec();
        exited.extend_from_slice(&2u64.to_le_bytes());
        bytes.extend(frame(b'X', 3, &exited));
        bytes.extend(frame(b'O', 3, b"hi"));
        let mut r = &bytes[..];
        assert_eq!(read_event(&mut r).await.unwrap(), Some(Event::Hello { version: 1 }));
        assert_eq!(read_event(&mut r).await.unwrap(), Some(Event::Exited { id: 3, wait_status: 9, oom_kills: 2 }));
        assert_eq!(
            read_event(&mut r).await.unwrap(),
            Some(Event::Output { id: 3, stderr: false, data: b"hi".to_vec() })
        );
        assert_eq!(read_event(&mut r).await.unwrap(), None);
        for bad in [frame(b'Z', 0, &[]), frame(b'P', 1, &[1]), vec![b'O', 0, 0, 0, 0, 255, 255, 255, 255]] {
            assert!(read_event(&mut &bad[..]).await.is_err(), "{bad:?}");
        }
    }
}
