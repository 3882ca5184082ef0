//! Client spans: one CLIENT span per RPC, named like the server's span for the same call
//! (`{rpc.method}` = `quicproquo.{Service}/{method}`, the OpenTelemetry RPC conventions
//! 1.42.0, `rpc.system.name = capnp`), whose W3C context goes in the request's `trace` field
//! so the server's span becomes its child.
//!
//! Every failed call is an error on its span (`error.type`: the server's code, `timeout`, or
//! what failed), and `rpc.response.status_code` says how each call ended.
//!
//! Spans carry no identity key, user name, group id or payload byte: only the call's name and,
//! for a send, the message's size.

use std::net::SocketAddr;

use quicproquo_proto::common_capnp::trace_context;
use quicproquo_telemetry::propagation;
use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::ClientError;

/// The client span of one call of `service`/`method` (child of the current span).
pub(crate) fn rpc_span(server: SocketAddr, service: &'static str, method: &'static str) -> Span {
    let name = format!("quicproquo.{service}/{method}");
    tracing::info_span!(
        "rpc.client",
        otel.name = %name,
        otel.kind = "client",
        otel.status_code = Empty,
        rpc.system.name = "capnp",
        rpc.method = %name,
        server.address = %server.ip(),
        server.port = i64::from(server.port()),
        rpc.response.status_code = Empty,
        "error.type" = Empty,
        messaging.system = Empty,
        "messaging.operation.type" = Empty,
        messaging.message.body.size = Empty,
    )
}

/// Writes `span`'s W3C context into a request's `trace` field (left empty when the span is
/// not traced).
pub(crate) fn write_trace(mut out: trace_context::Builder<'_>, span: &Span) {
    let wire = propagation::inject(span);
    if !wire.is_empty() {
        out.set_traceparent(&wire.traceparent);
        out.set_tracestate(&wire.tracestate);
    }
}

/// The `error.type` of a failed call: the server's error code, or what failed on the way.
fn error_type(e: &ClientError) -> &'static str {
    match e {
        ClientError::Timeout { .. } => "timeout",
        ClientError::Draining(_) => "draining",
        ClientError::Rpc(r) if r.kind == capnp::ErrorKind::Disconnected => "disconnected",
        _ => e.code().map_or("_OTHER", |c| c.as_str()),
    }
}

/// Runs `call` inside `span` and records how it ended: `rpc.response.status_code`, and the
/// error status with `error.type` when it failed.
pub(crate) async fn traced<T>(
    span: &Span,
    call: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    let result = call.instrument(span.clone()).await;
    match &result {
        Ok(_) => {
            span.record("rpc.response.status_code", "ok");
        }
        Err(e) => {
            let error_type = error_type(e);
            span.record("rpc.response.status_code", error_type);
            span.record("otel.status_code", "ERROR");
            span.record("error.type", error_type);
        }
    }
    result
}
