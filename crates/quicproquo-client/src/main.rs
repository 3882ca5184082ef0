//! `qpq`: the quicproquo command-line client (its commands live in `cli/`).

use std::process::ExitCode;

use clap::Parser;

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
    let local = tokio::task::LocalSet::new();
    let command = tracing::info_span!("qpq.command", otel.name = "qpq command");
    let result = local.block_on(
        &runtime,
        tracing::Instrument::instrument(cli::run(cli), command),
    );
    drop(local);
    drop(runtime);
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qpq: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
