//! A minimal OTLP/HTTP transport: one blocking HTTP/1.1 `POST` per export batch over plain
//! TCP.
//!
//! The OpenTelemetry SDK's batch processor calls it from its own thread, never from a server
//! worker, so blocking here cannot stall the data path. It supports `http://` endpoints only
//! (a collector or agent on the node or its private network); the trade is a few hundred
//! lines of HTTP and TLS stack not compiled into every node.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};

use crate::TelemetryError;

/// Deadline for connecting, and for each read or write.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response (headers and body) read from the collector.
const MAX_RESPONSE: usize = 64 * 1024;

/// Errors of one export request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OtlpHttpError {
    /// The request's URL has no host or port this client can reach.
    #[error("cannot send to {0}: only http://host:port URLs are supported")]
    Url(String),
    /// Connecting, writing or reading failed.
    #[error("collector I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The collector's answer is not an HTTP/1.x response.
    #[error("the collector sent a malformed response")]
    Malformed,
}

/// The HTTP client handed to the OTLP exporter.
#[derive(Debug, Clone)]
pub struct MiniHttpClient {
    timeout: Duration,
}

impl MiniHttpClient {
    /// A client for `endpoint`, which must be an `http://` URL with a host.
    pub fn new(endpoint: &str) -> Result<Self, TelemetryError> {
        let invalid = |message: &str| TelemetryError::Endpoint {
            endpoint: endpoint.to_owned(),
            message: message.to_owned(),
        };
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|_| invalid("not a URL (expected http://host:port)"))?;
        if uri.scheme_str() != Some("http") {
            return Err(invalid(
                "only http:// is supported; send to a collector on the node or private network",
            ));
        }
        if uri.host().is_none() {
            return Err(invalid("no host"));
        }
        Ok(Self { timeout: TIMEOUT })
    }

    fn send(&self, request: &Request<Bytes>) -> Result<Response<Bytes>, OtlpHttpError> {
        let uri = request.uri();
        let host = uri
            .host()
            .ok_or_else(|| OtlpHttpError::Url(uri.to_string()))?;
        let port = uri.port_u16().unwrap_or(80);
        let addr = (host, port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| OtlpHttpError::Url(uri.to_string()))?;
        let mut stream = TcpStream::connect_timeout(&addr, self.timeout)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = format!(
            "{} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {}\r\nConnection: close\r\n",
            request.method(),
            request.body().len()
        );
        for (name, value) in request.headers() {
            if let Ok(v) = value.to_str()
                && name != http::header::CONTENT_LENGTH
                && name != http::header::CONNECTION
                && name != http::header::HOST
            {
                head.push_str(&format!("{name}: {v}\r\n"));
            }
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(request.body())?;
        stream.flush()?;
        let mut answer = Vec::new();
        stream.take(MAX_RESPONSE as u64).read_to_end(&mut answer)?;
        parse_response(&answer)
    }
}

/// Parses an HTTP/1.x response; the body is kept only when its length is declared.
fn parse_response(answer: &[u8]) -> Result<Response<Bytes>, OtlpHttpError> {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(OtlpHttpError::Malformed)?;
    let head = std::str::from_utf8(&answer[..end]).map_err(|_| OtlpHttpError::Malformed)?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or(OtlpHttpError::Malformed)?;
    let mut parts = status_line.split_whitespace();
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(OtlpHttpError::Malformed);
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(OtlpHttpError::Malformed)?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    let rest = &answer[end + 4..];
    let body = match length {
        Some(n) if n <= rest.len() => Bytes::copy_from_slice(&rest[..n]),
        _ => Bytes::new(),
    };
    Response::builder()
        .status(status)
        .body(body)
        .map_err(|_| OtlpHttpError::Malformed)
}

#[async_trait::async_trait]
impl HttpClient for MiniHttpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        Ok(self.send(&request)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse() -> Result<(), OtlpHttpError> {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokextra")?;
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.body().as_ref(), b"ok");
        let r = parse_response(b"HTTP/1.0 503 Busy\r\n\r\n")?;
        assert_eq!(r.status().as_u16(), 503);
        assert!(parse_response(b"garbage").is_err());
        assert!(MiniHttpClient::new("https://collector:4318").is_err());
        assert!(MiniHttpClient::new("http://collector:4318").is_ok());
        Ok(())
    }
}
