//! A real OTLP/HTTP receiver in the test process, and the queries the trace tests ask of what
//! it received.

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

/// OTLP span kinds.
pub(crate) const INTERNAL: i32 = 1;
pub(crate) const SERVER: i32 = 2;
pub(crate) const CLIENT: i32 = 3;
/// OTLP status code of a failed span.
pub(crate) const STATUS_ERROR: i32 = 2;

/// The testkit's OTLP receiver, with the queries these tests ask of what it received.
pub(crate) struct Receiver(quicproquo_testkit::otlp::Receiver);

impl Receiver {
    pub(crate) fn start() -> Result<Self> {
        Ok(Self(quicproquo_testkit::otlp::Receiver::start()?))
    }

    /// The base URL exporters are given.
    pub(crate) fn endpoint(&self) -> String {
        self.0.endpoint()
    }

    /// Every request body received so far.
    pub(crate) fn bodies(&self) -> Vec<Vec<u8>> {
        self.0.bodies()
    }

    /// Every span received so far, with the resource that sent it.
    pub(crate) fn spans(&self) -> Result<Vec<Got>> {
        let mut out = Vec::new();
        for body in self.bodies() {
            let req = ExportTraceServiceRequest::decode(body.as_slice())?;
            for rs in req.resource_spans {
                let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                let service = text(&resource, "service.name").unwrap_or_default();
                let instance = text(&resource, "service.instance.id").unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        out.push(Got {
                            service: service.clone(),
                            instance: instance.clone(),
                            resource: resource.clone(),
                            schema_url: rs.schema_url.clone(),
                            span,
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A received span with the process that sent it.
#[derive(Debug, Clone)]
pub(crate) struct Got {
    pub(crate) service: String,
    pub(crate) instance: String,
    pub(crate) resource: Vec<KeyValue>,
    pub(crate) schema_url: String,
    pub(crate) span: Span,
}

pub(crate) fn value<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
}

pub(crate) fn text(attrs: &[KeyValue], key: &str) -> Option<String> {
    match value(attrs, key)? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

pub(crate) fn int(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match value(attrs, key)? {
        Value::IntValue(n) => Some(*n),
        _ => None,
    }
}

/// The one span named `name` from `service` whose parent is `parent`.
pub(crate) fn child<'a>(
    all: &'a [Got],
    parent: &Span,
    service: &str,
    name: &str,
) -> Result<&'a Got> {
    all.iter()
        .find(|g| {
            g.service == service
                && g.span.name == name
                && g.span.trace_id == parent.trace_id
                && g.span.parent_span_id == parent.span_id
        })
        .with_context(|| {
            let in_trace: Vec<_> = all
                .iter()
                .filter(|g| g.span.trace_id == parent.trace_id)
                .map(|g| (g.service.as_str(), g.span.name.as_str()))
                .collect();
            format!(
                "no {name} from {service} under {}: {in_trace:?}",
                parent.name
            )
        })
}

/// Whether `span` links to `target`.
pub(crate) fn links_to(span: &Span, target: &Span) -> bool {
    span.links
        .iter()
        .any(|l| l.trace_id == target.trace_id && l.span_id == target.span_id)
}

/// The spans from `service` named `name` that link to `target` (in traces of their own: a
/// push is not a child of what it links to).
pub(crate) fn linked<'a>(all: &'a [Got], target: &Span, service: &str, name: &str) -> Vec<&'a Got> {
    all.iter()
        .filter(|g| {
            g.service == service
                && g.span.name == name
                && g.span.trace_id != target.trace_id
                && links_to(&g.span, target)
        })
        .collect()
}
