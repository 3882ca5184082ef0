//! W3C trace context (`traceparent`, `tracestate`) for the `trace` field every cross-process
//! Cap'n Proto request carries.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceId};
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

/// Makes `span` the root of a trace of its own, whatever span is current where it was made.
pub fn set_root(span: &tracing::Span) {
    let _ = span.set_parent(opentelemetry::Context::new());
}

/// Links `span` to the span `other` (e.g. a batch to each request it carries).
pub fn link(span: &tracing::Span, other: &tracing::Span) {
    let cx = other.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// Whether `span` is recorded and sampled (starting it if it has not started: set its parent
/// and links first).
pub fn is_sampled(span: &tracing::Span) -> bool {
    !span.is_none() && span.context().span().span_context().is_sampled()
}

/// The span contexts an earlier operation leaves for later work on its behalf to link to: the
/// call that appended a log entry (its *origin*) and, on an edge, the span that received the
/// entry from the shard (its last *hop*). The spans that push the entry on link to both (the
/// messaging convention for deliveries that are not children of the send), so from the send's
/// trace the links lead to every push that carried the message, hop by hop.
///
/// Only exists while tracing: [`LinkContext::of`] is `None` for a span that no OpenTelemetry
/// layer records, so untraced entries carry nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkContext {
    origin: Option<SpanContext>,
    hop: Option<SpanContext>,
}

/// The valid span context of `span`, if an OpenTelemetry layer records it.
fn context_of(span: &tracing::Span) -> Option<SpanContext> {
    if span.is_none() {
        return None;
    }
    let cx = span.context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.clone())
}

impl LinkContext {
    /// `span` as the origin (the call that appended an entry), when it is recorded by an
    /// OpenTelemetry layer.
    pub fn of(span: &tracing::Span) -> Option<Self> {
        context_of(span).map(|sc| Self {
            origin: Some(sc),
            hop: None,
        })
    }

    /// The origin carried in `wire`, when it holds a valid context (a remote context).
    pub fn from_wire(wire: &WireContext) -> Option<Self> {
        if wire.is_empty() || wire.traceparent.len() > 128 || wire.tracestate.len() > 512 {
            return None;
        }
        let cx = TraceContextPropagator::new().extract(wire);
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| Self {
            origin: Some(sc.clone()),
            hop: None,
        })
    }

    /// `origin` (if any) passed on through `hop`: the span that received it on its way to
    /// subscribers. `None` when neither is traced.
    pub fn through(origin: Option<&Self>, hop: &tracing::Span) -> Option<Self> {
        let origin = origin.and_then(|o| o.origin.clone());
        let hop = context_of(hop);
        (origin.is_some() || hop.is_some()).then_some(Self { origin, hop })
    }

    /// The origin as `traceparent` / `tracestate` for the wire (empty when there is none).
    pub fn to_wire(&self) -> WireContext {
        let mut out = WireContext::default();
        if let Some(origin) = &self.origin {
            let cx = opentelemetry::Context::new().with_remote_span_context(origin.clone());
            TraceContextPropagator::new().inject_context(&cx, &mut out);
        }
        out
    }

    /// The trace of the origin (else of the hop), as 32 lower-case hex digits.
    pub fn trace_id(&self) -> String {
        self.origin
            .as_ref()
            .or(self.hop.as_ref())
            .map(|sc| sc.trace_id().to_string())
            .unwrap_or_default()
    }

    /// Adds links from `span` to the origin and the hop.
    pub fn link_from(&self, span: &tracing::Span) {
        for sc in self.origin.iter().chain(&self.hop) {
            span.add_link(sc.clone());
        }
    }
}

/// Links `span` to the origin and hop of each of `contexts`, each linked span once (a batch of
/// entries received together shares its hop).
pub fn link_each<'a>(
    span: &tracing::Span,
    contexts: impl Iterator<Item = Option<&'a LinkContext>>,
) {
    let mut seen: Vec<(TraceId, SpanId)> = Vec::new();
    for lc in contexts.flatten() {
        for sc in lc.origin.iter().chain(&lc.hop) {
            let key = (sc.trace_id(), sc.span_id());
            if !seen.contains(&key) {
                seen.push(key);
                span.add_link(sc.clone());
            }
        }
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
        assert_eq!(link.as_ref().map(LinkContext::to_wire), Some(w.clone()));
        assert!(LinkContext::from_wire(&WireContext::default()).is_none());
        assert!(LinkContext::of(&tracing::Span::none()).is_none());
        // Passed on through an untraced hop, the origin is kept as it was.
        let through = LinkContext::through(link.as_ref(), &tracing::Span::none());
        assert_eq!(through.map(|l| l.to_wire()), Some(w));
        assert!(LinkContext::through(None, &tracing::Span::none()).is_none());
    }
}
