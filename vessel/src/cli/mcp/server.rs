//! Serving the tools: stdio, or streamable HTTP on loopback behind a
//! bearer token.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rmcp::ServiceExt;
use tokio_util::sync::CancellationToken;
use vessel::Manager;

use super::{Options, Tools, Transport};

/// Serves until the client hangs up (stdio), or until SIGINT or SIGTERM,
/// then closes every vessel it opened.
pub(crate) async fn serve(mgr: Arc<Manager>, options: Options, transport: Transport) -> Result<()> {
    let tools = Tools::new(mgr, options);
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            stop.cancel();
        }
    });
    let served = match transport {
        Transport::Stdio => {
            let running = tools.clone().serve(rmcp::transport::stdio()).await.context("starting the MCP session")?;
            let cancel = running.cancellation_token();
            tokio::select! {
                r = running.waiting() => r.map(|_| ()).context("the MCP session"),
                () = stop.cancelled() => { cancel.cancel(); Ok(()) }
            }
        }
        Transport::Http { addr, token } => serve_http(tools.clone(), addr, token, stop).await,
    };
    let closed = tools.close_all().await;
    served?;
    closed
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn serve_http(tools: Tools, addr: SocketAddr, token: String, stop: CancellationToken) -> Result<()> {
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    };
    if !addr.ip().is_loopback() {
        bail!("--http {addr}: vessel mcp listens on loopback addresses only (its tools run code)");
    }
    let config = StreamableHttpServerConfig::default().with_cancellation_token(stop.child_token());
    let service: StreamableHttpService<Tools, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(tools.clone()), Default::default(), config);
    let token: Arc<str> = token.into();
    let app = axum::Router::new().nest_service("/mcp", service).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                let presented = req
                    .headers()
                    .get(axum::http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                if presented.is_some_and(|p| same_secret(p.as_bytes(), token.as_bytes())) {
                    next.run(req).await
                } else {
                    axum::response::IntoResponse::into_response((
                        axum::http::StatusCode::UNAUTHORIZED,
                        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                        "a bearer token is required\n",
                    ))
                }
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
    let bound = listener.local_addr()?;
    // Scripts and tests read the address (the port may have been 0) here.
    eprintln!("vessel mcp: listening on http://{bound}/mcp");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled_owned().await })
        .await
        .context("serving HTTP")
}

/// Compares the whole of both, so the time taken says nothing of where a
/// guessed token first differs.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A token for `--http` when none was given: 256 random bits, hex.
fn random_token() -> String {
    (0..4).map(|_| format!("{:016x}", rand::random::<u64>())).collect()
}

/// The `--http` bearer token: the first line of `file` (refused when others
/// may read it), else `VESSEL_MCP_TOKEN`, else a random one, printed to
/// stderr. A given token must have at least 16 characters.
pub(crate) fn token(file: Option<&Path>) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let (token, from) = match (file, std::env::var("VESSEL_MCP_TOKEN")) {
        (Some(path), _) => {
            let what = || format!("reading the token file {}", path.display());
            if std::fs::metadata(path).with_context(what)?.permissions().mode() & 0o077 != 0 {
                bail!("the token file {} is readable by others: chmod 600 it", path.display());
            }
            let text = std::fs::read_to_string(path).with_context(what)?;
            (text.lines().next().unwrap_or("").trim().to_owned(), path.display().to_string())
        }
        (None, Ok(t)) => (t, "VESSEL_MCP_TOKEN".to_owned()),
        (None, Err(_)) => {
            let t = random_token();
            eprintln!("vessel mcp: token {t}");
            return Ok(t);
        }
    };
    if token.len() < 16 {
        bail!("the token in {from} is shorter than 16 characters");
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same_secret(b"abcdef", b"abcdef"));
        assert!(!same_secret(b"abcdef", b"abcdeg"));
        assert!(!same_secret(b"abc", b"abcdef"));
        assert_eq!(random_token().len(), 64);
    }
}
