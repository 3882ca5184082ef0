//! `qpq-loadtest`: the quicproquo load test.
//!
//! What it is: a load generator that drives *real* members: each has its own TCP connection
//! with a Noise_XX handshake and identity binding, its own Ed25519 identity, real KeyPackages
//! and its own MLS state (the client library's groups over openmls). Groups are built the way
//! clients build them (the creator fetches KeyPackages in one batch and adds everyone in as
//! few commits as it can; every member processes its Welcome), then members send application
//! messages at a fixed total rate and decrypt everyone else's, optionally while members are
//! removed and re-added (churn). Latency runs from each message's *planned* send time to each
//! recipient's decryption (no coordinated omission), in HDR histograms. Without `--target` it
//! starts an in-process `standalone` server on the embedded store; the `connections` scenario
//! holds many idle authenticated connections and reports the server's memory per connection.
//!
//! What it is not: a functional test suite (it checks agreement and counts errors, but a run
//! with errors still reports), nor a model of realistic user behaviour beyond a fixed send
//! rate. Members share a few worker threads (one per core by default), so the generator's own
//! CPU use is reported next to the server's.
//!
//! # Layout
//!
//! Modules by role, lowest first: a module imports only from its own row and the rows above
//! it. Everything a member says to the server goes through `quicproquo-client`'s public API.
//!
//! | Role | Module | What lives there |
//! |------|--------|------------------|
//! | Options | `cli`, `threshold` | the options and the settings they resolve to; pass/fail rules |
//! | Measuring | `stats`, `seen`, `sys` | HDR histograms, counters and errors; which messages arrived; CPU and memory from `/proc` |
//! | One member | `member` | connect, register, create groups, join from Welcomes; its commits through the client's commit driver |
//! | Steady state | `steady`, `churn` | sending and receiving on a schedule; churn's removals and re-adds |
//! | Running | `worker`, `server`, `run`, `report` | threads that own members; the server under test; the controller and its phases; the table and JSON |
//!
//! Rules with one home: a member's commits (setup and churn) are driven by
//! `quicproquo_client::commit` (never discarded on a transport error), its own pending commit
//! read back is merged by `commit::is_pending_own_commit`, durations are parsed by
//! `quicproquo_core::duration`, and a failure is counted once, where it happens
//! (`member::fail`).

#![forbid(unsafe_code)]

mod churn;
mod cli;
mod member;
mod report;
mod run;
mod seen;
mod server;
mod stats;
mod steady;
mod sys;
mod threshold;
mod worker;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use crate::cli::{Args, Internal};

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qpq-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let args = Args::parse();
    if let Some(Internal::Serve {
        dir,
        max_connections,
    }) = &args.internal
    {
        server::serve(dir, *max_connections)?;
        return Ok(ExitCode::SUCCESS);
    }
    let settings = args.settings()?;
    // Logs (`QPQ_LOG`, `QPQ_LOG_FORMAT`, default: warnings) and, with
    // OTEL_EXPORTER_OTLP_ENDPOINT set, traces of the members' calls and of the in-process
    // server, so the cost of tracing can be measured with the same workload.
    let telemetry = quicproquo_telemetry::init(&quicproquo_telemetry::Options {
        service_name: "qpq-loadtest".to_owned(),
        log_format: quicproquo_telemetry::LogFormat::from_env()?,
        default_log_level: "warn".to_owned(),
        otlp_endpoint: None,
        export_traces: true,
    })?;
    if let Some(endpoint) = telemetry.endpoint() {
        eprintln!("exporting traces to {endpoint}");
    }
    let report = run::run(&args, settings);
    telemetry.shutdown();
    let report = report?;
    println!("{}", report::table(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
