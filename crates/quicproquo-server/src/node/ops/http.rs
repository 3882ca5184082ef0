//! The ops listener's HTTP/1.1 responder: `GET` only, one request per connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{MAX_OPS_CONNECTIONS, OpsState, readiness, render};

/// Largest request head read; longer requests are refused.
const MAX_HEAD: usize = 8 * 1024;
/// Deadline for reading the request and writing the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts ops connections until `stop`.
pub(super) async fn serve(
    listener: std::net::TcpListener,
    state: Arc<OpsState>,
    stop: CancellationToken,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot register the ops listener; /metrics and probes are off");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_OPS_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    debug!(error = %e, "ops accept failed");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            },
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _permit = permit;
            if tokio::time::timeout(IO_TIMEOUT, answer(stream, &state))
                .await
                .is_err()
            {
                debug!("ops request timed out");
            }
        });
    }
}

/// Reads the request head (up to the blank line) into a bounded buffer.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Some(head);
        }
        if head.len() > MAX_HEAD {
            return None;
        }
    }
}

/// Serves one request.
async fn answer(mut stream: TcpStream, state: &OpsState) {
    let Some(head) = read_head(&mut stream).await else {
        let _ = respond(&mut stream, 400, "text/plain", "bad request\n", false).await;
        return;
    };
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let _ = respond(&mut stream, 405, "text/plain", "only GET\n", head_only).await;
        return;
    }
    let path = target.split('?').next().unwrap_or("");
    let _ = match path {
        "/livez" => respond(&mut stream, 200, "text/plain", "ok\n", head_only).await,
        "/readyz" => match readiness(state).await {
            Ok(()) => respond(&mut stream, 200, "text/plain", "ready\n", head_only).await,
            Err(why) => {
                let body = format!("not ready: {why}\n");
                respond(&mut stream, 503, "text/plain", &body, head_only).await
            }
        },
        "/metrics" => {
            let body = render(state);
            let kind = "text/plain; version=0.0.4; charset=utf-8";
            respond(&mut stream, 200, kind, &body, head_only).await
        }
        _ => respond(&mut stream, 404, "text/plain", "not found\n", head_only).await,
    };
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}
