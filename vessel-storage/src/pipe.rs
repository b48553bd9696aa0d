//! A bounded byte pipe between async code and a blocking codec thread that
//! carries errors and an explicit end-of-stream.
//!
//! `tokio::io::duplex` turns a writer that went away into a clean EOF, which
//! would let a storage commit a truncated blob when a compressor fails
//! half-way. Here a stream ends cleanly only if the writer said so with
//! [`PipeWriter::finish`]; a failed or dropped writer (also one dropped by
//! a panic) makes the reader fail. The facade streams snapshots through it
//! too, so no layer of vessel can store a truncated blob as complete.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

/// Chunks in flight; with chunks of at most [`CHUNK`] this bounds the pipe's memory.
const DEPTH: usize = 8;
/// The size the pipe's users read and write in.
pub const CHUNK: usize = 256 * 1024;

enum Msg {
    Data(Bytes),
    End,
    Fail(io::Error),
}

/// A new pipe: write at one end (async or blocking), read at the other.
pub fn pipe() -> (PipeWriter, PipeReader) {
    let (tx, rx) = mpsc::channel(DEPTH);
    (PipeWriter { tx: Some(tx) }, PipeReader { rx, cur: Bytes::new(), state: State::Open })
}

fn reader_gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the pipe's reader went away")
}

/// The writing end; see the module docs for how a stream ends.
#[derive(Debug)]
pub struct PipeWriter {
    tx: Option<mpsc::Sender<Msg>>,
}

impl PipeWriter {
    fn sender(&self) -> io::Result<&mpsc::Sender<Msg>> {
        self.tx.as_ref().ok_or_else(reader_gone)
    }

    /// Sends one chunk (async side).
    pub async fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.sender()?.send(Msg::Data(data)).await.map_err(|_| reader_gone())
    }

    /// Ends the stream cleanly (async side).
    pub async fn finish(mut self) -> io::Result<()> {
        let tx = self.tx.take().ok_or_else(reader_gone)?;
        tx.send(Msg::End).await.map_err(|_| reader_gone())
    }

    /// Ends the stream cleanly (blocking side).
    pub fn finish_blocking(mut self) -> io::Result<()> {
        let tx = self.tx.take().ok_or_else(reader_gone)?;
        tx.blocking_send(Msg::End).map_err(|_| reader_gone())
    }

    /// Ends the stream with an error the reader will see (either side; never blocks).
    pub fn fail(mut self, err: io::Error) {
        if let Some(tx) = self.tx.take() {
            // If the channel is full the message is lost, but dropping the
            // sender below still fails the reader (UnexpectedEof).
            let _ = tx.try_send(Msg::Fail(err));
        }
    }
}

/// Blocking writes; only for use off the async runtime (in `spawn_blocking`).
impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(CHUNK);
        self.sender()?.blocking_send(Msg::Data(Bytes::copy_from_slice(&buf[..n]))).map_err(|_| reader_gone())?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug)]
enum State {
    Open,
    Ended,
    Failed(io::ErrorKind, String),
}

/// The reading end: a clean end only after [`PipeWriter::finish`].
#[derive(Debug)]
pub struct PipeReader {
    rx: mpsc::Receiver<Msg>,
    cur: Bytes,
    state: State,
}

impl PipeReader {
    /// Applies a received message; returns `Ok(false)` at a clean end.
    fn accept(&mut self, msg: Option<Msg>) -> io::Result<bool> {
        match msg {
            Some(Msg::Data(b)) => {
                self.cur = b;
                Ok(true)
            }
            Some(Msg::End) => {
                self.state = State::Ended;
                Ok(false)
            }
            Some(Msg::Fail(e)) => {
                self.state = State::Failed(e.kind(), e.to_string());
                Err(e)
            }
            None => {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the pipe's writer stopped before the end of the stream",
                );
                self.state = State::Failed(e.kind(), e.to_string());
                Err(e)
            }
        }
    }

    fn terminal(&self) -> Option<io::Result<()>> {
        match &self.state {
            State::Open => None,
            State::Ended => Some(Ok(())),
            State::Failed(kind, msg) => Some(Err(io::Error::new(*kind, msg.clone()))),
        }
    }

    fn take_into(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        n
    }
}

impl AsyncRead for PipeReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        while self.cur.is_empty() {
            if let Some(t) = self.terminal() {
                return Poll::Ready(t);
            }
            let msg = ready!(self.rx.poll_recv(cx));
            if !self.accept(msg)? {
                return Poll::Ready(Ok(()));
            }
        }
        let n = self.take_into(buf.initialize_unfilled());
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// Blocking reads; only for use off the async runtime (in `spawn_blocking`).
impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.cur.is_empty() {
            if let Some(t) = self.terminal() {
                return t.map(|()| 0);
            }
            let msg = self.rx.blocking_recv();
            if !self.accept(msg)? {
                return Ok(0);
            }
        }
        Ok(self.take_into(out))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, Write};

    use bytes::Bytes;
    use tokio::io::AsyncReadExt;

    use super::pipe;

    #[tokio::test]
    async fn clean_end_only_when_finished() {
        let (mut w, mut r) = pipe();
        let t = tokio::spawn(async move {
            w.send(Bytes::from_static(b"hello ")).await.unwrap();
            w.send(Bytes::from_static(b"world")).await.unwrap();
            w.finish().await.unwrap();
        });
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
        t.await.unwrap();
    }

    #[tokio::test]
    async fn dropped_writer_is_an_error_not_eof() {
        let (mut w, mut r) = pipe();
        w.send(Bytes::from_static(b"partial")).await.unwrap();
        drop(w);
        let mut v = Vec::new();
        let e = r.read_to_end(&mut v).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(v, b"partial");
        // and it stays failed
        assert!(r.read(&mut [0; 4]).await.is_err());
    }

    #[tokio::test]
    async fn failure_reaches_the_reader() {
        let (w, mut r) = pipe();
        w.fail(io::Error::new(io::ErrorKind::InvalidData, "bad frame"));
        let e = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("bad frame"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_writer_to_async_reader() {
        let (mut w, mut r) = pipe();
        let h = tokio::task::spawn_blocking(move || {
            for i in 0..1000u32 {
                w.write_all(&i.to_le_bytes().repeat(1000)).unwrap();
            }
            w.finish_blocking().unwrap();
        });
        let mut v = Vec::new();
        r.read_to_end(&mut v).await.unwrap();
        h.await.unwrap();
        assert_eq!(v.len(), 4_000_000);
        assert_eq!(&v[3_996_000..3_996_004], &999u32.to_le_bytes());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_reader_stops_a_blocking_writer() {
        let (mut w, r) = pipe();
        drop(r);
        let res = tokio::task::spawn_blocking(move || w.write_all(&[0; 1024])).await.unwrap();
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
