//! `qpq`: the quicproquo command-line client (its commands live in `cli/`).
//!
//! Each run is one trace when `OTEL_EXPORTER_OTLP_ENDPOINT` is set: a root span named after the
//! command (`qpq send`, INTERNAL, the OpenTelemetry conventions for CLI programs: its
//! `process.exit.code`, and `error.type` when the command fails), parent of one client span
//! per call. The root span ends, and the trace is flushed, however the command ends: success,
//! failure, or SIGINT / SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use tracing::field::Empty;

mod cli;

use cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qpq: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Logs (`QPQ_LOG`, `QPQ_LOG_FORMAT`, default: warnings) and, with
    // OTEL_EXPORTER_OTLP_ENDPOINT set, the command's trace.
    let telemetry = quicproquo_telemetry::LogFormat::from_env().and_then(|log_format| {
        quicproquo_telemetry::init(&quicproquo_telemetry::Options {
            service_name: "qpq".to_owned(),
            log_format,
            default_log_level: "warn".to_owned(),
            otlp_endpoint: None,
            export_traces: true,
        })
    });
    let telemetry = match telemetry {
        Ok(t) => t,
        Err(e) => {
            eprintln!("qpq: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let root = tracing::info_span!(
        "qpq.command",
        otel.name = format!("qpq {}", cli.command_name()),
        otel.kind = "internal",
        otel.status_code = Empty,
        "error.type" = Empty,
        process.executable.name = "qpq",
        process.pid = i64::from(std::process::id()),
        process.exit.code = Empty,
    );
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(
        &runtime,
        tracing::Instrument::instrument(cli::run(cli), root.clone()),
    );
    // Every task (and the spans it holds) ends before the root span does.
    drop(local);
    drop(runtime);
    let code = cli::exit_code(&result);
    root.record("process.exit.code", i64::from(code));
    if let Err(e) = &result {
        root.record("otel.status_code", "ERROR");
        root.record("error.type", cli::error_type(e));
    }
    drop(root);
    telemetry.shutdown();
    if let Err(e) = result {
        eprintln!("qpq: error: {e:#}");
    }
    ExitCode::from(code)
}
