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
use quicproquo_telemetry::propagation::{self, LinkContext, WireContext};
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
pub(crate) fn write_trace(out: trace_context::Builder<'_>, span: &Span) {
    write_wire(out, &propagation::inject(span));
}

/// Writes `wire` into a `TraceContext` (nothing when it is empty).
pub(crate) fn write_wire(mut out: trace_context::Builder<'_>, wire: &WireContext) {
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

/// Who a push of log entries goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushTarget {
    /// A subscribed client (`MessageStream.deliver`, from an edge or standalone node).
    Client,
    /// An edge following a group (`EntrySink.deliver`, from a shard).
    Edge,
}

/// A client span for one push of `count` log entries to `target`.
///
/// Pushes run in subscription tasks, outside any call, so the span starts a trace of its own
/// and, following the messaging conventions for deliveries, links to the append of each
/// entry that was traced (`origins`): from the send's trace, the links lead to every push
/// that carried the message. It names no group (the group hash would cost a hash per push
/// even when nothing is traced).
pub(crate) fn push_span<'a>(
    target: PushTarget,
    count: usize,
    origins: impl Iterator<Item = Option<&'a LinkContext>>,
) -> Span {
    let (name, service) = match target {
        PushTarget::Client => (
            "quicproquo.MessageStream/deliver",
            "quicproquo.MessageStream",
        ),
        PushTarget::Edge => ("quicproquo.EntrySink/deliver", "quicproquo.EntrySink"),
    };
    let span = tracing::info_span!(
        parent: None,
        "rpc.client",
        otel.name = name,
        otel.kind = "client",
        otel.status_code = Empty,
        rpc.system = RPC_SYSTEM,
        rpc.service = service,
        rpc.method = "deliver",
        "error.type" = Empty,
        messaging.system = "quicproquo",
        "messaging.operation.type" = "process",
        messaging.operation.name = "deliver",
        messaging.batch.message_count = count,
    );
    for origin in origins.flatten() {
        origin.link_from(&span);
    }
    span
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
