//! W3C trace context (`traceparent`, `tracestate`) for the `trace` field every cross-process
//! Cap'n Proto request carries.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A W3C trace context as carried on the wire; both fields empty when not tracing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireContext {
    /// The `traceparent` header value.
    pub traceparent: String,
    /// The `tracestate` header value.
    pub tracestate: String,
}

impl WireContext {
    /// Whether this carries a trace.
    pub fn is_empty(&self) -> bool {
        self.traceparent.is_empty()
    }
}

impl Injector for WireContext {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = value,
            "tracestate" => self.tracestate = value,
            _ => {}
        }
    }
}

impl Extractor for WireContext {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" if !self.traceparent.is_empty() => Some(&self.traceparent),
            "tracestate" if !self.tracestate.is_empty() => Some(&self.tracestate),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The context of `span` (empty when it is not recorded by an OpenTelemetry layer).
pub fn inject(span: &tracing::Span) -> WireContext {
    let cx = span.context();
    let mut out = WireContext::default();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut out);
    }
    out
}

/// Makes `span` a child of the remote context in `wire` (a no-op when it is empty or
/// malformed: the span then starts a trace of its own).
pub fn set_parent(span: &tracing::Span, wire: &WireContext) {
    if wire.is_empty() || wire.traceparent.len() > 128 || wire.tracestate.len() > 512 {
        return;
    }
    let cx = TraceContextPropagator::new().extract(wire);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the span `other` (e.g. a batch to each request it carries).
pub fn link(span: &tracing::Span, other: &tracing::Span) {
    let cx = other.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// The span context of an earlier operation, kept so that later work on its behalf can link
/// back to it: a published log entry keeps the context of the call that appended it, and the
/// spans that push it to subscribers link to that context (the messaging convention for
/// deliveries that are not children of the send).
///
/// Only exists while tracing: [`LinkContext::of`] is `None` for a span that no OpenTelemetry
/// layer records, so untraced entries carry nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkContext(SpanContext);

impl LinkContext {
    /// The context of `span`, when it is recorded by an OpenTelemetry layer.
    pub fn of(span: &tracing::Span) -> Option<Self> {
        if span.is_none() {
            return None;
        }
        let cx = span.context();
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| Self(sc.clone()))
    }

    /// The context carried in `wire`, when it holds a valid one (a remote context).
    pub fn from_wire(wire: &WireContext) -> Option<Self> {
        if wire.is_empty() || wire.traceparent.len() > 128 || wire.tracestate.len() > 512 {
            return None;
        }
        let cx = TraceContextPropagator::new().extract(wire);
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| Self(sc.clone()))
    }

    /// This context as `traceparent` / `tracestate` for the wire.
    pub fn to_wire(&self) -> WireContext {
        let cx = opentelemetry::Context::new().with_remote_span_context(self.0.clone());
        let mut out = WireContext::default();
        TraceContextPropagator::new().inject_context(&cx, &mut out);
        out
    }

    /// The trace this context belongs to, as 32 lower-case hex digits.
    pub fn trace_id(&self) -> String {
        self.0.trace_id().to_string()
    }

    /// Adds a link from `span` to this context.
    pub fn link_from(&self, span: &tracing::Span) {
        span.add_link(self.0.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extractor_reads_only_w3c_fields() {
        let w = WireContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: String::new(),
        };
        assert!(w.get("traceparent").is_some());
        assert!(w.get("tracestate").is_none());
        let cx = TraceContextPropagator::new().extract(&w);
        assert!(cx.span().span_context().is_valid());
    }

    #[test]
    fn link_contexts_round_trip_through_the_wire() {
        let w = WireContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: "vendor=value".into(),
        };
        let link = LinkContext::from_wire(&w);
        assert_eq!(
            link.as_ref().map(LinkContext::trace_id).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(link.map(|l| l.to_wire()), Some(w));
        assert!(LinkContext::from_wire(&WireContext::default()).is_none());
        assert!(LinkContext::of(&tracing::Span::none()).is_none());
    }
}
