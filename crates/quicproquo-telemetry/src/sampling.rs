//! Which traces a process records: its own sampling rule, and how a server treats the sampled
//! flag a client sends.
//!
//! The rule comes from the standard `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`
//! variables, read as the OpenTelemetry SDK reads them (`always_on`, `always_off`,
//! `traceidratio`, and their `parentbased_` forms; anything else falls back to
//! `parentbased_always_on`, the default). [`Sampler`] applies it with one addition: under a
//! parent-based rule, a root span with a sampled link is sampled too, so the pushes that fan out
//! a traced message are traced whatever the ratio.
//!
//! A client's context is not trusted like a peer node's: [`admit`] is the server's own decision
//! for a client-originated call. The client's flag is honoured only for the fraction of trace
//! ids below the configured client ratio (by default the node's own ratio), so a client cannot
//! make a node trace more of its calls than the node would trace on its own.

use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{
    Link, SpanContext, SpanKind, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SamplingDecision, SamplingResult, ShouldSample};

use crate::propagation::WireContext;

/// The rule installed by [`crate::init`], once.
static INSTALLED: OnceLock<Rule> = OnceLock::new();

/// A sampling rule: the ratio of new traces recorded, and whether a span follows its parent's
/// decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    /// Fraction of trace ids sampled where the rule decides itself, in `[0, 1]`.
    pub ratio: f64,
    /// Whether a span with a parent follows the parent's decision (the `parentbased_` rules).
    pub parent_based: bool,
}

impl Default for Rule {
    /// `parentbased_always_on`, the SDK's default.
    fn default() -> Self {
        Self {
            ratio: 1.0,
            parent_based: true,
        }
    }
}

impl Rule {
    /// Reads a rule as `OTEL_TRACES_SAMPLER` (`sampler`) and `OTEL_TRACES_SAMPLER_ARG` (`arg`)
    /// name it. Returns the rule and, when the text was not understood, why the default (or a
    /// ratio of 1) was used instead.
    pub fn parse(sampler: Option<&str>, arg: Option<&str>) -> (Self, Option<String>) {
        let ratio = || {
            arg.and_then(|a| a.trim().parse::<f64>().ok())
                .filter(|r| r.is_finite())
                .map(|r| r.clamp(0.0, 1.0))
        };
        let name = sampler.map(str::trim).unwrap_or_default();
        let (parent_based, base) = match name.strip_prefix("parentbased_") {
            Some(base) => (true, base),
            None if name.is_empty() => return (Self::default(), None),
            None => (false, name),
        };
        let rule = |ratio| Self {
            ratio,
            parent_based,
        };
        match base {
            "always_on" => (rule(1.0), None),
            "always_off" => (rule(0.0), None),
            "traceidratio" => match ratio() {
                Some(r) => (rule(r), None),
                None => (
                    rule(1.0),
                    Some(format!(
                        "OTEL_TRACES_SAMPLER_ARG {arg:?} is not a ratio between 0 and 1: sampling everything"
                    )),
                ),
            },
            _ => (
                Self::default(),
                Some(format!(
                    "OTEL_TRACES_SAMPLER `{name}` is not supported: using parentbased_always_on"
                )),
            ),
        }
    }

    /// The rule the environment names.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Self::parse(
            var("OTEL_TRACES_SAMPLER").as_deref(),
            var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )
        .0
    }
}

/// Records `rule` as this process's rule (the first call wins).
pub(crate) fn install(rule: Rule) {
    let _ = INSTALLED.set(rule);
}

/// The ratio of new traces this process samples: the installed rule's, or the environment's
/// when telemetry is not exporting.
pub fn root_ratio() -> f64 {
    INSTALLED
        .get()
        .copied()
        .unwrap_or_else(Rule::from_env)
        .ratio
}

/// Whether `trace_id` falls within `ratio` of all trace ids: the SDK's `TraceIdRatioBased`
/// test (the low 63 bits of the id against the ratio), so every node decides a trace alike.
pub fn below(trace_id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    let bytes = trace_id.to_bytes();
    let mut low = [0u8; 8];
    low.copy_from_slice(&bytes[8..]);
    (u64::from_be_bytes(low) >> 1) < bound
}

/// The sampler [`crate::init`] installs: [`Rule`] plus "a root span with a sampled link is
/// sampled" under a parent-based rule.
#[derive(Debug, Clone)]
pub struct Sampler {
    rule: Rule,
}

impl Sampler {
    /// A sampler applying `rule`.
    pub fn new(rule: Rule) -> Self {
        Self { rule }
    }

    /// Whether a span with this parent, trace id and links is sampled.
    pub fn decide(&self, parent: Option<&SpanContext>, trace_id: TraceId, links: &[Link]) -> bool {
        if !self.rule.parent_based {
            return below(trace_id, self.rule.ratio);
        }
        match parent.filter(|p| p.is_valid()) {
            Some(p) => p.is_sampled(),
            None if links.iter().any(|l| l.span_context.is_sampled()) => true,
            None => below(trace_id, self.rule.ratio),
        }
    }
}

impl ShouldSample for Sampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        _name: &str,
        _span_kind: &SpanKind,
        _attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let parent = parent_context
            .filter(|cx| cx.has_active_span())
            .map(|cx| cx.span().span_context().clone());
        let decision = if self.decide(parent.as_ref(), trace_id, links) {
            SamplingDecision::RecordAndSample
        } else {
            SamplingDecision::Drop
        };
        SamplingResult {
            decision,
            attributes: Vec::new(),
            trace_state: parent.map_or_else(TraceState::default, |p| p.trace_state().clone()),
        }
    }
}

/// What a server does with the trace context of a client's call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Continue the client's trace under this parent (its flag says whether to record).
    Join(WireContext),
    /// Start a trace of its own, which the node's [`Rule`] samples (the client did not trace
    /// the call, or sent no valid context).
    Root,
}

/// The server's own decision for a call whose client sent `wire`: a sampled client trace is
/// continued, and recorded only when its trace id is below `client_ratio`; an unsampled or
/// missing one starts a trace of the node's own (no span then points at a parent nobody
/// exported).
pub fn admit(wire: &WireContext, client_ratio: f64) -> Admission {
    if wire.is_empty() || wire.traceparent.len() > 128 || wire.tracestate.len() > 512 {
        return Admission::Root;
    }
    let propagator = TraceContextPropagator::new();
    let cx = propagator.extract(wire);
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() || !sc.is_sampled() {
        return Admission::Root;
    }
    if below(sc.trace_id(), client_ratio) {
        return Admission::Join(wire.clone());
    }
    let declined = SpanContext::new(
        sc.trace_id(),
        sc.span_id(),
        TraceFlags::NOT_SAMPLED,
        true,
        sc.trace_state().clone(),
    );
    let mut out = WireContext::default();
    propagator.inject_context(&Context::new().with_remote_span_context(declined), &mut out);
    Admission::Join(out)
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::SpanId;

    use super::*;

    fn wire(trace: &str, flags: &str) -> WireContext {
        WireContext {
            traceparent: format!("00-{trace}-b7ad6b7169203331-{flags}"),
            tracestate: String::new(),
        }
    }

    /// Low trace ids are below every positive ratio; high ones only below 1.
    const LOW: &str = "0af7651916cd43dd0000000000000001";
    const HIGH: &str = "0af7651916cd43ddfffffffffffffffe";

    #[test]
    fn rules_parse_like_the_sdk() {
        let parse = |s, a| Rule::parse(Some(s), a).0;
        assert_eq!(Rule::parse(None, None), (Rule::default(), None));
        assert_eq!(parse("always_off", None).ratio, 0.0);
        assert!(!parse("traceidratio", Some("0.25")).parent_based);
        assert_eq!(parse("parentbased_traceidratio", Some("0.25")).ratio, 0.25);
        assert!(parse("parentbased_traceidratio", Some("0.25")).parent_based);
        let (rule, warning) = Rule::parse(Some("traceidratio"), Some("lots"));
        assert_eq!(rule.ratio, 1.0);
        assert!(warning.is_some());
        let (rule, warning) = Rule::parse(Some("jaeger_remote"), None);
        assert_eq!(rule, Rule::default());
        assert!(warning.is_some());
    }

    #[test]
    fn ratios_split_trace_ids_like_the_sdk() -> Result<(), Box<dyn std::error::Error>> {
        let low = TraceId::from_hex(LOW)?;
        let high = TraceId::from_hex(HIGH)?;
        assert!(below(low, 0.1) && below(high, 1.0));
        assert!(!below(high, 0.99) && !below(low, 0.0));
        Ok(())
    }

    #[test]
    fn a_sampled_link_samples_a_root_span() -> Result<(), Box<dyn std::error::Error>> {
        let sampler = Sampler::new(Rule {
            ratio: 0.0,
            parent_based: true,
        });
        let high = TraceId::from_hex(HIGH)?;
        let linked = |flags| {
            Link::with_context(SpanContext::new(
                high,
                SpanId::from_hex("b7ad6b7169203331").unwrap_or(SpanId::INVALID),
                flags,
                true,
                TraceState::default(),
            ))
        };
        assert!(!sampler.decide(None, high, &[]));
        assert!(sampler.decide(None, high, &[linked(TraceFlags::SAMPLED)]));
        assert!(!sampler.decide(None, high, &[linked(TraceFlags::NOT_SAMPLED)]));
        let unsampled_parent = linked(TraceFlags::NOT_SAMPLED).span_context;
        assert!(!sampler.decide(
            Some(&unsampled_parent),
            high,
            &[linked(TraceFlags::SAMPLED)]
        ));
        Ok(())
    }

    #[test]
    fn a_client_flag_is_honoured_only_up_to_the_ratio() {
        assert_eq!(
            admit(&wire(LOW, "01"), 0.5),
            Admission::Join(wire(LOW, "01"))
        );
        // Above the ratio: the client's trace goes on, unrecorded.
        assert_eq!(
            admit(&wire(HIGH, "01"), 0.5),
            Admission::Join(wire(HIGH, "00"))
        );
        assert_eq!(
            admit(&wire(HIGH, "01"), 1.0),
            Admission::Join(wire(HIGH, "01"))
        );
        // A client that does not trace, or sends garbage, leaves the decision to the node.
        assert_eq!(admit(&wire(LOW, "00"), 1.0), Admission::Root);
        assert_eq!(admit(&WireContext::default(), 1.0), Admission::Root);
        assert_eq!(admit(&wire("zz", "01"), 1.0), Admission::Root);
    }
}
