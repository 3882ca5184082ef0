//! The last step before the batch exporter: attributes the semantic conventions type as
//! integers leave as integers.
//!
//! `tracing` hands unsigned integers (`u64`, `usize`) to the OpenTelemetry layer, which has no
//! unsigned attribute type and records them as their decimal text. [`IntAttributes`] turns the
//! attributes listed in [`INT_ATTRIBUTES`] back into integers, so `messaging.batch.message_count`
//! is `7`, not `"7"`, whichever code recorded it. Any other attribute is left alone (a group
//! hash may well be all digits).

use std::time::Duration;

use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};

/// Attributes whose value is an integer (OpenTelemetry semantic conventions, and the
/// project's own `qpq.batch_size`).
pub const INT_ATTRIBUTES: &[&str] = &[
    "db.operation.batch.size",
    "messaging.batch.message_count",
    "messaging.message.body.size",
    "network.peer.port",
    "process.exit.code",
    "process.pid",
    "qpq.batch_size",
    "server.port",
];

/// Wraps the span processor that exports, retyping [`INT_ATTRIBUTES`] of each finished span.
#[derive(Debug)]
pub struct IntAttributes<P> {
    inner: P,
}

impl<P> IntAttributes<P> {
    /// Retypes spans before handing them to `inner`.
    pub fn new(inner: P) -> Self {
        Self { inner }
    }
}

/// Turns the integer attributes recorded as text back into integers.
pub fn retype(attributes: &mut [KeyValue]) {
    for kv in attributes {
        if !INT_ATTRIBUTES.contains(&kv.key.as_str()) {
            continue;
        }
        if let Value::String(text) = &kv.value
            && let Ok(n) = text.as_str().parse::<i64>()
        {
            kv.value = Value::I64(n);
        }
    }
}

impl<P: SpanProcessor> SpanProcessor for IntAttributes<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, mut span: SpanData) {
        retype(&mut span.attributes);
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_integers_become_integers_and_nothing_else_changes() {
        let mut attrs = vec![
            KeyValue::new("messaging.batch.message_count", "7"),
            KeyValue::new("server.port", 7000_i64),
            KeyValue::new("qpq.group", "0123456789012345"),
            KeyValue::new("messaging.message.body.size", "not a number"),
        ];
        retype(&mut attrs);
        assert_eq!(attrs[0].value, Value::I64(7));
        assert_eq!(attrs[1].value, Value::I64(7000));
        assert_eq!(attrs[2].value, Value::from("0123456789012345"));
        assert_eq!(attrs[3].value, Value::from("not a number"));
    }
}
