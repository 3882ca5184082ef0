//! Client spans: one CLIENT span per RPC, named like the server's span for the same call
//! (`quicproquo.{Service}/{method}`, OpenTelemetry RPC conventions), whose W3C context goes in
//! the request's `trace` field so the server's span becomes its child.
//!
//! Spans carry no identity key, user name, group id or payload byte: only the call's name and,
//! for a send, the message's size.

use quicproquo_proto::common_capnp::trace_context;
use quicproquo_telemetry::propagation;
use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::ClientError;

/// The client span of one call of `service`/`method` (child of the current span).
pub(crate) fn rpc_span(service: &'static str, method: &'static str) -> Span {
    tracing::info_span!(
        "rpc.client",
        otel.name = format!("quicproquo.{service}/{method}"),
        otel.kind = "client",
        otel.status_code = Empty,
        rpc.system = "capnp",
        rpc.service = format!("quicproquo.{service}"),
        rpc.method = method,
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

/// The `error.type` of a failed call: the server's error code, `timeout`, or `error`.
fn error_type(e: &ClientError) -> &'static str {
    match e {
        ClientError::Timeout { .. } => "timeout",
        _ => e.code().map_or("error", |c| c.as_str()),
    }
}

/// Runs `call` inside `span` and marks the span failed when the call fails.
pub(crate) async fn traced<T>(
    span: &Span,
    call: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    let result = call.instrument(span.clone()).await;
    if let Err(e) = &result {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", error_type(e));
    }
    result
}
