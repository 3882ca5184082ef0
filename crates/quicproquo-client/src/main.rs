//! `qpq`: the quicproquo command-line client.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use quicproquo_client::{ConnectOptions, connect_any, resolve};
use quicproquo_core::ClusterPublicKey;

#[derive(Parser)]
#[command(
    name = "qpq",
    version,
    about = "quicproquo client: end-to-end encrypted group messaging"
)]
struct Cli {
    /// Server address(es), `host:port[,host:port...]`, tried in order.
    #[arg(
        long,
        env = "QPQ_SERVER",
        value_delimiter = ',',
        default_value = "127.0.0.1:7000"
    )]
    server: Vec<String>,
    /// The cluster public key (hex) printed by `qpq-server cluster-key`.
    #[arg(long, env = "QPQ_SERVER_KEY")]
    server_key: String,
    /// Deadline for connecting, the handshake and each call, e.g. `5s`, `500ms`.
    #[arg(long, env = "QPQ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure the round-trip time to a server over Noise + Cap'n Proto.
    Ping,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .ok_or("needs a unit: ms or s")?,
    );
    let n: u64 = number.parse().map_err(|_| "not a number".to_owned())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        _ => Err("unit must be ms or s".to_owned()),
    }
}

async fn run(cli: Cli) -> Result<()> {
    let key = ClusterPublicKey::from_hex(&cli.server_key).context("--server-key")?;
    let mut options = ConnectOptions::new(key);
    options.timeout = cli.timeout;
    let addrs = resolve(&cli.server).await?;
    match cli.command {
        Command::Ping => {
            let conn = connect_any(&addrs, &options).await?;
            let pong = conn.ping(b"qpq ping").await?;
            println!(
                "pong from {} ({}) in {:.2} ms",
                conn.addr(),
                conn.server_role(),
                pong.rtt.as_secs_f64() * 1e3
            );
            conn.close().await;
        }
    }
    Ok(())
}

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
    let local = tokio::task::LocalSet::new();
    match local.block_on(&runtime, run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qpq: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
