//! Spans for RPCs and pushes, after the OpenTelemetry semantic conventions 1.42.0 (see
//! `quicproquo_telemetry::resource::SCHEMA_URL`): RPC spans are named `{rpc.method}`, the
//! fully-qualified `quicproquo.{Service}/{method}`, with `rpc.system.name = capnp` and
//! `rpc.response.status_code`; pushes are messaging `send` spans (CLIENT) linked to what they
//! carry; store calls are database spans ([`super::db`]).
//!
//! Errors: a span is marked failed (`otel.status_code = ERROR`, `error.type`) only for a fault
//! — the node or a peer failed (`unavailable`, `internal`, a broken connection). A refusal the
//! caller caused (`name_taken`, `not_member`, `stale_epoch` answers, ...) is an expected outcome:
//! its code is in `rpc.response.status_code` and the status stays unset.
//!
//! Attributes never carry an identity key, user name, raw group id, message id or payload
//! byte: a group appears only as `qpq.group`, its keyed hash
//! ([`quicproquo_telemetry::Redactor`]), recorded only on spans that are sampled.

use std::time::Instant;

use quicproquo_proto::common_capnp::trace_context;
use quicproquo_proto::errors::{ErrorCode, code_of};
use quicproquo_telemetry::propagation::{self, LinkContext, WireContext};
use quicproquo_telemetry::sampling::{Admission, admit};
use tracing::field::Empty;
use tracing::{Instrument, Span};

use super::Observer;
pub(crate) use super::db::{StoreOutcome, store_call};

/// The `rpc.system.name` of every quicproquo call.
pub(crate) const RPC_SYSTEM: &str = "capnp";

/// Services only cluster nodes call: their trace context is trusted as it comes. Every other
/// service is called by clients, whose sampled flag the node honours only up to its client
/// ratio ([`admit`]).
const NODE_SERVICES: &[&str] = &["ShardService", "EntrySink", "InboxSink"];

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

/// The fully-qualified `rpc.method`, which is also the span's name.
fn rpc_method(service: &str, method: &str) -> String {
    format!("quicproquo.{service}/{method}")
}

/// A server span for `service`/`method`. Its parent is the caller's context `parent`: as sent
/// by a cluster node, or as [`admit`]ted under `client_ratio` for a client.
pub(crate) fn server_span(
    service: &'static str,
    method: &'static str,
    parent: &WireContext,
    client_ratio: f64,
) -> Span {
    let name = rpc_method(service, method);
    let span = tracing::info_span!(
        "rpc.server",
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system.name = RPC_SYSTEM,
        rpc.method = %name,
        rpc.response.status_code = Empty,
        "error.type" = Empty,
        qpq.group = Empty,
        messaging.system = Empty,
        messaging.operation.name = Empty,
        messaging.batch.message_count = Empty,
        messaging.message.body.size = Empty,
    );
    if NODE_SERVICES.contains(&service) {
        propagation::set_parent(&span, parent);
    } else {
        match admit(parent, client_ratio) {
            Admission::Join(wire) => propagation::set_parent(&span, &wire),
            Admission::Root => propagation::set_root(&span),
        }
    }
    span
}

/// A client span for a call this node makes to `service`/`method` (child of the current
/// span). Record where it goes with [`record_server`].
pub(crate) fn client_span(service: &'static str, method: &'static str) -> Span {
    let name = rpc_method(service, method);
    tracing::info_span!(
        "rpc.client",
        otel.name = %name,
        otel.kind = "client",
        otel.status_code = Empty,
        rpc.system.name = RPC_SYSTEM,
        rpc.method = %name,
        rpc.response.status_code = Empty,
        "error.type" = Empty,
        server.address = Empty,
        server.port = Empty,
        qpq.group = Empty,
    )
}

/// Records `server.address` and `server.port` from `target`, the `host:port` a call is sent to
/// (as configured, e.g. a shard's advertised address).
pub(crate) fn record_server(span: &Span, target: &str) {
    match target.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())) {
        Some((host, Ok(port))) => {
            span.record(
                "server.address",
                host.trim_start_matches('[').trim_end_matches(']'),
            );
            span.record("server.port", i64::from(port));
        }
        _ => {
            span.record("server.address", target);
        }
    }
}

/// Records `qpq.group`, the keyed hash of `group`, on `span` when it is sampled (set its
/// parent and links first).
pub(crate) fn record_group(span: &Span, observer: &Observer, group: &[u8]) {
    if propagation::is_sampled(span) {
        span.record("qpq.group", observer.redactor.hash(group));
    }
}

/// Who a push goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushTarget {
    /// A subscribed client's group stream (`MessageStream.deliver`, from an edge or
    /// standalone node).
    Client,
    /// A subscribed client's group entries as push frames (`subscribeFrames`, ADR 0019).
    Frames,
    /// A subscribed client's inbox stream (`InboxStream.deliver`).
    Inbox,
    /// An edge following a group (`EntrySink.deliver`, from a shard).
    Edge,
}

/// A messaging `send` span (CLIENT) for one push of `count` entries to `target`.
///
/// A live push runs in a subscription task, outside any call: `parent` is `None` and the span
/// starts a trace of its own, linked (the messaging convention for deliveries that are not
/// children of the send) to the append of each entry and to the span that received it on this
/// node (`links`): from a send's trace, the links lead hop by hop to every push that carried
/// it. A push during a catch-up is a child of the catch-up span instead.
///
/// At `debug`: there is one per delivery (per subscriber and push), and a log layer at
/// `info` that saw it would format its dozen fields each time, though it logs nothing of it
/// (on a `dev-cluster` edge a tenth of its CPU). The trace export takes the server's `debug`
/// spans, so it still gets every push; without an exporter and with logs at `info` the span
/// is never built.
pub(crate) fn push_span<'a>(
    target: PushTarget,
    count: usize,
    parent: Option<&Span>,
    links: impl Iterator<Item = Option<&'a LinkContext>>,
) -> Span {
    let name = match target {
        PushTarget::Client => "quicproquo.MessageStream/deliver",
        PushTarget::Frames => "quicproquo.PushFrame/entry",
        PushTarget::Inbox => "quicproquo.InboxStream/deliver",
        PushTarget::Edge => "quicproquo.EntrySink/deliver",
    };
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    let span = tracing::debug_span!(
        parent: parent.and_then(Span::id),
        "messaging.send",
        otel.name = name,
        otel.kind = "client",
        otel.status_code = Empty,
        rpc.system.name = RPC_SYSTEM,
        rpc.method = name,
        rpc.response.status_code = Empty,
        "error.type" = Empty,
        messaging.system = "quicproquo",
        "messaging.operation.type" = "send",
        messaging.operation.name = "deliver",
        messaging.batch.message_count = count,
        qpq.group = Empty,
    );
    propagation::link_each(&span, links);
    span
}

/// An INTERNAL span for one catch-up of a subscription from the store (`stream`: `group` or
/// `inbox`): the reads and the pushes it makes are its children. It starts a trace of its own,
/// linked to the call that subscribed (`subscription`), so a subscription's store reads are
/// found from the subscribe call and are never stray one-span traces.
pub(crate) fn catch_up_span(stream: &'static str, subscription: Option<&LinkContext>) -> Span {
    let span = tracing::info_span!(
        parent: None,
        "subscription.catch_up",
        otel.name = "subscription catch-up",
        otel.kind = "internal",
        otel.status_code = Empty,
        "error.type" = Empty,
        qpq.stream = stream,
        qpq.group = Empty,
    );
    if let Some(s) = subscription {
        s.link_from(&span);
    }
    span
}

/// The `rpc.response.status_code` of a finished call, and whether it is a fault (the node or a
/// peer failed) rather than an answer. Faults: `unavailable`, `internal`, and every error
/// without a code (a broken connection, an overloaded or failed call).
pub(crate) fn rpc_outcome<T>(result: &Result<T, capnp::Error>) -> (&'static str, bool) {
    let Err(e) = result else {
        return ("ok", false);
    };
    match code_of(e) {
        Some(code) => (
            code.as_str(),
            matches!(code, ErrorCode::Unavailable | ErrorCode::Internal),
        ),
        None => (
            match e.kind {
                capnp::ErrorKind::Disconnected => "disconnected",
                capnp::ErrorKind::Overloaded => "overloaded",
                capnp::ErrorKind::Unimplemented => "unimplemented",
                _ => "failed",
            },
            true,
        ),
    }
}

/// Records a finished call's outcome on its span: the status code always, the error only for
/// a fault.
pub(crate) fn record_outcome<T>(span: &Span, result: &Result<T, capnp::Error>) {
    let (status, fault) = rpc_outcome(result);
    span.record("rpc.response.status_code", status);
    if fault {
        record_error(span, status);
    }
}

/// The status label of a finished call in the metrics (`ok`, its code, or `error`).
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
    let span = server_span(service, method, &trace, observer.client_trace_ratio);
    let started = Instant::now();
    let result = call.instrument(span.clone()).await;
    record_outcome(&span, &result);
    observer
        .metrics
        .rpc(service, method, status_of(&result), started.elapsed());
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicproquo_proto::errors::error;

    #[test]
    fn refusals_are_answers_and_failures_are_faults() {
        let ok: Result<(), capnp::Error> = Ok(());
        assert_eq!(rpc_outcome(&ok), ("ok", false));
        let refused: Result<(), _> = Err(error(ErrorCode::NameTaken, "taken"));
        assert_eq!(rpc_outcome(&refused), ("name_taken", false));
        let down: Result<(), _> = Err(error(ErrorCode::Unavailable, "no shard"));
        assert_eq!(rpc_outcome(&down), ("unavailable", true));
        let gone: Result<(), _> = Err(capnp::Error::disconnected("peer left".into()));
        assert_eq!(rpc_outcome(&gone), ("disconnected", true));
    }
}
