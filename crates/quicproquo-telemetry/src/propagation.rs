//! W3C trace context (`traceparent`, `tracestate`) for the `trace` field every cross-process
//! Cap'n Proto request carries.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
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
}
