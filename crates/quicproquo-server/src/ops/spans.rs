//! Spans for RPCs and store calls, named and attributed after the OpenTelemetry semantic
//! conventions for RPC (`rpc.system`, `rpc.service`, `rpc.method`, span name
//! `{service}/{method}`), messaging (`messaging.*` on sends) and databases
//! (`db.system.name`, `db.operation.name`).
//!
//! Attributes never carry an identity key, user name, raw group id or payload byte: a group
//! appears only as `qpq.group`, its keyed hash ([`quicproquo_telemetry::Redactor`]).

use std::time::Instant;

use quicproquo_proto::common_capnp::trace_context;
use quicproquo_proto::errors::{ErrorCode, code_of};
use quicproquo_telemetry::propagation::{self, WireContext};
use tracing::field::Empty;
use tracing::{Instrument, Span};

use super::Observer;

/// The `rpc.system` of every quicproquo call.
pub(crate) const RPC_SYSTEM: &str = "capnp";

/// Reads the W3C context from a request's `trace` field (empty when absent or unreadable).
pub(crate) fn trace_of(r: capnp::Result<trace_context::Reader<'_>>) -> WireContext {
    let Ok(r) = r else {
        return WireContext::default();
    };
    let text = |t: capnp::Result<capnp::text::Reader<'_>>| {
        t.ok()
            .and_then(|t| t.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    WireContext {
        traceparent: text(r.get_traceparent()),
        tracestate: text(r.get_tracestate()),
    }
}

/// Writes `span`'s context into a request's `trace` field.
pub(crate) fn write_trace(mut out: trace_context::Builder<'_>, span: &Span) {
    let wire = propagation::inject(span);
    if !wire.is_empty() {
        out.set_traceparent(&wire.traceparent);
        out.set_tracestate(&wire.tracestate);
    }
}

/// A server span for `service`/`method`, child of the remote context `parent`.
pub(crate) fn server_span(
    service: &'static str,
    method: &'static str,
    parent: &WireContext,
) -> Span {
    let span = tracing::info_span!(
        "rpc.server",
        otel.name = format!("quicproquo.{service}/{method}"),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = RPC_SYSTEM,
        rpc.service = format!("quicproquo.{service}"),
        rpc.method = method,
        "error.type" = Empty,
        qpq.group = Empty,
        messaging.system = Empty,
        "messaging.operation.type" = Empty,
        messaging.message.body.size = Empty,
    );
    propagation::set_parent(&span, parent);
    span
}

/// A client span for a call this node makes to `service`/`method` (child of the current
/// span).
pub(crate) fn client_span(service: &'static str, method: &'static str) -> Span {
    tracing::info_span!(
        "rpc.client",
        otel.name = format!("quicproquo.{service}/{method}"),
        otel.kind = "client",
        otel.status_code = Empty,
        rpc.system = RPC_SYSTEM,
        rpc.service = format!("quicproquo.{service}"),
        rpc.method = method,
        "error.type" = Empty,
        qpq.group = Empty,
    )
}

/// A span for one store call (child of the current span).
pub(crate) fn store_span(system: &'static str, operation: &'static str) -> Span {
    tracing::info_span!(
        "db.client",
        otel.name = format!("{system} {operation}"),
        otel.kind = if system == "postgresql" {
            "client"
        } else {
            "internal"
        },
        otel.status_code = Empty,
        db.system.name = system,
        db.operation.name = operation,
        "error.type" = Empty,
        qpq.batch_size = Empty,
    )
}

/// The status label and `error.type` of a finished call.
pub(crate) fn status_of<T>(result: &Result<T, capnp::Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => code_of(e).map_or("error", ErrorCode::as_str),
    }
}

/// Marks `span` as failed with `error_type`.
pub(crate) fn record_error(span: &Span, error_type: &'static str) {
    span.record("otel.status_code", "ERROR");
    span.record("error.type", error_type);
}

/// Serves one RPC: runs `call` inside its server span and records its outcome and latency.
pub(crate) async fn serve<T>(
    observer: &Observer,
    service: &'static str,
    method: &'static str,
    trace: WireContext,
    call: impl Future<Output = Result<T, capnp::Error>>,
) -> Result<T, capnp::Error> {
    let span = server_span(service, method, &trace);
    let started = Instant::now();
    let result = call.instrument(span.clone()).await;
    let status = status_of(&result);
    if result.is_err() {
        record_error(&span, status);
    }
    observer
        .metrics
        .rpc(service, method, status, started.elapsed());
    result
}

/// Runs a store call inside its span.
pub(crate) async fn store_call<T, E: std::fmt::Display>(
    system: &'static str,
    operation: &'static str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let span = store_span(system, operation);
    let result = call.instrument(span.clone()).await;
    if result.is_err() {
        record_error(&span, "store_error");
    }
    result
}
