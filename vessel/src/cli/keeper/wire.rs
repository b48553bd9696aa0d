//! What the CLI and a keeper say to each other: length-delimited JSON
//! frames on the keeper's unix socket. One connection carries one call;
//! its data (a command's output and input, a file) flows as byte frames
//! around it, so a `vessel exec` through a keeper streams as a direct one does.

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::view::{ChangeView, ExecView, ProcessView};

/// The largest frame either side sends (data goes in chunks of [`CHUNK`]).
const MAX_FRAME: usize = 4 << 20;
/// Bytes of data per frame.
pub(crate) const CHUNK: usize = 1 << 20;

/// A command to run, as `vessel exec` takes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Command {
    pub(crate) argv: Vec<String>,
    pub(crate) work_dir: Option<String>,
    pub(crate) env: Vec<String>,
    pub(crate) timeout_ms: Option<u64>,
}

/// A call on the vessel the keeper holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub(crate) enum Call {
    /// Run a command in the foreground; `snapshot`: commit its changes
    /// under this message (a persisted exec). Stdin follows as data.
    Exec {
        command: Command,
        tty: bool,
        stdin: bool,
        persist: bool,
        snapshot: Option<String>,
    },
    /// Start a background process.
    Spawn {
        command: Command,
    },
    /// The background processes.
    Processes,
    /// A process's output from these offsets; with `follow`, until it ends.
    Output {
        process: u64,
        stdout_offset: u64,
        stderr_offset: u64,
        follow: bool,
    },
    /// Signal a process (and its group).
    Signal {
        process: u64,
        signal: i32,
    },
    /// Wait for a process to end.
    Wait {
        process: u64,
    },
    Pause,
    Resume,
    /// A file's content (sent as data).
    Read {
        path: String,
    },
    /// Write the data that follows to a file, and commit it.
    Write {
        path: String,
        mode: u32,
        snapshot: String,
    },
    Snapshot {
        message: String,
    },
    /// The vessel's manifest.
    Manifest,
    Restore {
        snapshot: String,
    },
    DeleteSnapshot {
        snapshot: String,
    },
    /// What changed since a snapshot (default: the current one), or between two.
    Changes {
        since: Option<String>,
        to: Option<String>,
    },
    /// The vessel's network; with `set`, a new policy (its text form) first.
    Network {
        set: Option<String>,
    },
    /// Publish a port of the vessel (`remove`: stop publishing it).
    Publish {
        port: u16,
        remove: bool,
    },
    /// Stop the vessel's processes, close it and end the keeper.
    Stop,
}

/// The end of a call.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub(crate) enum Reply {
    Done,
    Exec {
        result: ExecView,
        snapshot: Option<Box<vessel::SnapshotManifest>>,
    },
    Spawned {
        process: u64,
    },
    Processes {
        processes: Vec<ProcessView>,
    },
    Process {
        process: ProcessView,
        dropped: [u64; 2],
    },
    Snapshot {
        snapshot: Box<vessel::SnapshotManifest>,
    },
    Manifest {
        manifest: Box<vessel::VesselManifest>,
    },
    Restored {
        stopped: usize,
    },
    Changes {
        changes: Vec<ChangeView>,
    },
    Network {
        network: crate::view::NetworkView,
    },
    /// The call failed; `exit_code` is a command's start failure (126, 127).
    Failed {
        message: String,
        exit_code: Option<u8>,
    },
}

/// One frame.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "frame", rename_all = "snake_case")]
pub(crate) enum Frame {
    Call(Call),
    Stdout { data: Bytes },
    Stderr { data: Bytes },
    Stdin { data: Bytes },
    StdinEnd,
    Reply(Reply),
}

/// Bytes, as base64 in JSON.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bytes(pub(crate) Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map(Bytes).map_err(serde::de::Error::custom)
    }
}

/// A connection, framed.
pub(crate) struct Conn(Framed<UnixStream, LengthDelimitedCodec>);

impl Conn {
    pub(crate) fn new(stream: UnixStream) -> Self {
        Self(Framed::new(stream, LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME).new_codec()))
    }

    pub(crate) async fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(f).map_err(std::io::Error::other)?;
        self.0.send(tokio_util::bytes::Bytes::from(bytes)).await
    }

    /// The next frame; `None` at the end of the connection.
    pub(crate) async fn recv(&mut self) -> std::io::Result<Option<Frame>> {
        match self.0.next().await {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b?)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
    }

    /// Sends `data` as frames made by `make`, in chunks.
    pub(crate) async fn send_data(&mut self, data: &[u8], make: fn(Bytes) -> Frame) -> std::io::Result<()> {
        for c in data.chunks(CHUNK) {
            self.send(&make(Bytes(c.to_vec()))).await?;
        }
        Ok(())
    }
}
