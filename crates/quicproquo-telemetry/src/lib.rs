//! Observability shared by the quicproquo server and client: structured logs, OpenTelemetry
//! traces exported over OTLP/HTTP, W3C trace context for the Cap'n Proto calls, and the keyed
//! hash that lets logs and spans correlate a group or identity without naming it.
//!
//! What it is: [`init`] installs the process's `tracing` subscriber once (logs to stderr as
//! text or JSON, filtered by `QPQ_LOG` / `RUST_LOG`; spans of the quicproquo crates to an
//! OTLP exporter when one is configured) and returns a [`Telemetry`] guard whose
//! [`Telemetry::shutdown`] flushes the traces. Every exported span carries the resource of
//! [`resource`] (service, version, instance, host) and follows the OpenTelemetry semantic
//! conventions of [`resource::SCHEMA_URL`] (1.42.0). [`propagation`] turns the current span
//! into a `traceparent`/`tracestate` pair and back. [`sampling`] decides which traces are
//! recorded, and how far a client's sampled flag is honoured. [`Redactor`] is the keyed hash.
//!
//! What it is not: a metrics library (the server's `/metrics` lives in the server crate) or
//! an HTTP stack: [`otlp`] configures the exporter's standard client (reqwest, rustls) for
//! `http://` and `https://` collectors.
//!
//! Export never blocks the data path: finished spans go into a bounded queue drained by the
//! OpenTelemetry SDK's batch thread, and spans are dropped when the queue is full.
//!
//! # Layout
//!
//! | module | role |
//! |---|---|
//! | this file | the subscriber and exporter set-up ([`init`], [`init_with`], [`Telemetry`]) |
//! | [`resource`] | who this process is: `service.*`, `host.name`, the conventions version |
//! | [`sampling`] | the sampling rule, and the server's decision on a client's sampled flag |
//! | [`export`] | integer attributes stay integers on their way to the exporter |
//! | [`otlp`] | the OTLP/HTTP client: reqwest with rustls, the collector's CA |
//! | [`propagation`] | W3C context on the wire, span links |
//! | `redact` | the keyed hash ([`Redactor`]) |
//!
//! It depends on no other quicproquo crate.

#![forbid(unsafe_code)]

pub mod export;
pub mod otlp;
pub mod propagation;
mod redact;
pub mod resource;
pub mod sampling;

use opentelemetry::InstrumentationScope;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider};
use tracing_subscriber::filter::{EnvFilter, FilterExt as _, LevelFilter, Targets, filter_fn};
use tracing_subscriber::layer::Filter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

pub use redact::Redactor;
pub use resource::Instance;

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// `QPQ_LOG_FORMAT` (or the given format) is neither `text` nor `json`.
    #[error("unknown log format `{0}` (use text or json)")]
    LogFormat(String),
    /// The OTLP endpoint is not a plain `http://host:port[/path]` URL.
    #[error("invalid OTLP endpoint `{endpoint}`: {message}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        message: String,
    },
    /// The OTLP exporter could not be built.
    #[error("building the OTLP exporter: {0}")]
    Exporter(String),
    /// A global subscriber was already installed in this process.
    #[error("the tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// Parses `text` or `json` (case-insensitive).
    pub fn parse(text: &str) -> Result<Self, TelemetryError> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(TelemetryError::LogFormat(text.to_owned())),
        }
    }

    /// The format named by `QPQ_LOG_FORMAT` (text when unset).
    pub fn from_env() -> Result<Self, TelemetryError> {
        std::env::var("QPQ_LOG_FORMAT").map_or(Ok(Self::Text), |v| Self::parse(&v))
    }
}

/// What to set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// `service.name` when `OTEL_SERVICE_NAME` is unset (e.g. `qpq-edge`).
    pub service_name: String,
    /// The log format.
    pub log_format: LogFormat,
    /// Level filter when neither `QPQ_LOG` nor `RUST_LOG` is set (e.g. `info`).
    pub default_log_level: String,
    /// The OTLP/HTTP collector base URL from the configuration file; the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` variables win.
    pub otlp_endpoint: Option<String>,
    /// Whether to export traces at all (a one-shot command does not, whatever the
    /// environment says).
    pub export_traces: bool,
}

/// The installed telemetry; call [`Telemetry::shutdown`] before exiting to flush traces.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    endpoint: Option<String>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// The collector's trace URL, when exporting.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Exports the spans still queued and stops the exporter. Blocks (up to the exporter's
    /// timeout): call it outside any async runtime, as the last step before exiting.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }
}

/// The traces URL to export to: the traces-specific variable, the generic one (with
/// `/v1/traces` appended, as the specification says), or the configured base URL. `None`
/// when tracing is off (no endpoint, `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`).
pub fn traces_endpoint(configured: Option<&str>) -> Option<String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return None;
    }
    if let Some(url) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Some(url);
    }
    let base = env("OTEL_EXPORTER_OTLP_ENDPOINT").or_else(|| {
        configured
            .map(str::to_owned)
            .filter(|v| !v.trim().is_empty())
    })?;
    Some(format!("{}/v1/traces", base.trim_end_matches('/')))
}

/// The log filter: `QPQ_LOG`, else `RUST_LOG`, else `default`.
///
/// tokio-postgres logs every statement's parameters at `debug`, which would put identity keys
/// and group ids in the log: it stays at `info` unless the filter names it explicitly.
fn log_filter(default: &str) -> EnvFilter {
    let text = std::env::var("QPQ_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_owned());
    let filter = EnvFilter::try_new(&text).unwrap_or_else(|_| EnvFilter::new(default));
    if text.contains("tokio_postgres") {
        return filter;
    }
    match "tokio_postgres=info".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// Spans exported: the quicproquo crates' spans at `info` and above, whatever the log level,
/// and the server's spans at `debug` too (its per-delivery push spans are at `debug`, so that a
/// log layer at `info` does not format one per delivery); events (which become span events)
/// at `info` and above only, as before.
fn span_filter<S>() -> impl Filter<S> {
    Targets::new()
        .with_target("quicproquo_server", LevelFilter::DEBUG)
        .with_target("quicproquo_client", LevelFilter::INFO)
        .with_target("quicproquo_telemetry", LevelFilter::INFO)
        .with_target("qpq", LevelFilter::INFO)
        .with_target("qpq_server", LevelFilter::INFO)
        .and(filter_fn(|meta| {
            meta.is_span() || *meta.level() <= tracing::Level::INFO
        }))
}

/// Builds the tracer provider exporting to `endpoint`, sampling by `rule`.
fn provider(
    service_name: &str,
    instance: &Instance,
    rule: sampling::Rule,
    endpoint: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let client = otlp::http_client(endpoint)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    // The batch processor reads the OTEL_BSP_* queue settings itself.
    let batch = BatchSpanProcessor::builder(exporter).build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(export::IntAttributes::new(batch))
        .with_sampler(sampling::Sampler::new(rule))
        .with_resource(resource::build(service_name, instance))
        .build())
}

/// Installs the process's subscriber: logs to stderr, and spans to OTLP when an endpoint is
/// configured (see [`traces_endpoint`]). Call once, early in `main`. The process gets a random
/// `service.instance.id`; a server names itself with [`init_with`].
pub fn init(options: &Options) -> Result<Telemetry, TelemetryError> {
    init_with(options, &Instance::default())
}

/// Like [`init`], for the process `instance` names.
pub fn init_with(options: &Options, instance: &Instance) -> Result<Telemetry, TelemetryError> {
    let endpoint =
        traces_endpoint(options.otlp_endpoint.as_deref()).filter(|_| options.export_traces);
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let (rule, rule_warning) = sampling::Rule::parse(
        var("OTEL_TRACES_SAMPLER").as_deref(),
        var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
    );
    let provider = endpoint
        .as_deref()
        .map(|e| provider(&options.service_name, instance, rule, e))
        .transpose()?;
    let fmt = match options.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(log_filter(&options.default_log_level));
    let scope = InstrumentationScope::builder("quicproquo")
        .with_version(env!("CARGO_PKG_VERSION"))
        .with_schema_url(resource::SCHEMA_URL)
        .build();
    // Spans carry the attributes their code sets, nothing of the bridge's own: no timings
    // (`busy_ns`, `idle_ns`), no `target`, no `code.*` (which would name the span helper,
    // not the caller), no thread.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer_with_scope(scope))
            .with_tracked_inactivity(false)
            .with_target(false)
            .with_location(false)
            .with_threads(false)
            .with_filter(span_filter())
    });
    Registry::default()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    if let Some(url) = &endpoint {
        sampling::install(rule);
        tracing::info!(endpoint = %url, "exporting traces over OTLP/HTTP");
        if let Some(warning) = rule_warning {
            tracing::warn!("{warning}");
        }
    }
    Ok(Telemetry { provider, endpoint })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse() {
        assert_eq!(LogFormat::parse("JSON").ok(), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse("text").ok(), Some(LogFormat::Text));
        assert!(LogFormat::parse("xml").is_err());
    }
}
