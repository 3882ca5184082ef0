//! `qpq`: the quicproquo command-line client.

use std::process::ExitCode;
use std::time::Duration;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use quicproquo_client::state::DEFAULT_STATE_FILE;
use quicproquo_client::{
    AuthClient, ClientState, ConnectOptions, Connection, connect_any, resolve,
};
use quicproquo_core::ClusterPublicKey;
use quicproquo_core::mls::Suite;

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
    #[arg(long, env = "QPQ_SERVER_KEY", default_value = "")]
    server_key: String,
    /// The device state file.
    #[arg(long, env = "QPQ_STATE", default_value = DEFAULT_STATE_FILE)]
    state: PathBuf,
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
    /// Create this device's identity (if the state has none), claim a user name and upload
    /// KeyPackages.
    Register {
        /// The user name to claim (3-32 characters: a-z, 0-9, '_', '-', '.').
        #[arg(long)]
        name: String,
        /// MLS ciphersuite of this device's KeyPackages.
        #[arg(long, default_value = "hybrid", value_parser = parse_suite)]
        suite: Suite,
        /// How many KeyPackages to upload.
        #[arg(long, default_value_t = DEFAULT_BATCH)]
        key_packages: u32,
    },
    /// Print this device's user name and identity fingerprint.
    Whoami,
    /// Show how many KeyPackages the server holds for this device; upload more when low.
    Keys {
        /// Top the pool up to this many when the server says it is low.
        #[arg(long, default_value_t = DEFAULT_BATCH)]
        top_up_to: u32,
    },
    /// Look up a user by name and print the fingerprint of their identity key.
    Lookup {
        /// The user name.
        name: String,
    },
}

/// KeyPackages uploaded at registration and kept in the pool.
const DEFAULT_BATCH: u32 = 50;

fn parse_suite(s: &str) -> Result<Suite, String> {
    Suite::parse(s).ok_or_else(|| "use hybrid or classical".to_owned())
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

struct Ctx {
    addrs: Vec<std::net::SocketAddr>,
    options: ConnectOptions,
}

impl Ctx {
    async fn new(cli: &Cli) -> Result<Self> {
        if cli.server_key.is_empty() {
            bail!("--server-key is required (the key `qpq-server cluster-key` prints)");
        }
        let key = ClusterPublicKey::from_hex(&cli.server_key).context("--server-key")?;
        let mut options = ConnectOptions::new(key);
        options.timeout = cli.timeout;
        let addrs = resolve(&cli.server).await?;
        Ok(Self { addrs, options })
    }

    async fn connect(&self) -> Result<Connection> {
        Ok(connect_any(&self.addrs, &self.options).await?)
    }
}

/// Generates `count` KeyPackages, saves the state (their private keys) and only then uploads,
/// so the server never holds a KeyPackage whose secrets this device could lose.
async fn upload_batch(
    state: &ClientState,
    path: &std::path::Path,
    auth: &AuthClient,
    count: u32,
    with_last_resort: bool,
) -> Result<u32> {
    let mls = state.mls_identity();
    let packages = mls.key_packages(&state.mls, state.suite, count as usize)?;
    let last_resort = if with_last_resort {
        Some(mls.last_resort_key_package(&state.mls, state.suite)?)
    } else {
        None
    };
    state.save(path)?;
    Ok(auth
        .upload_key_packages(&packages, last_resort.as_deref())
        .await?)
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Ping => {
            let ctx = Ctx::new(&cli).await?;
            let conn = ctx.connect().await?;
            let pong = conn.ping(b"qpq ping").await?;
            println!(
                "pong from {} ({}) in {:.2} ms",
                conn.addr(),
                conn.server_role(),
                pong.rtt.as_secs_f64() * 1e3
            );
            conn.close().await;
        }
        Command::Register {
            name,
            suite,
            key_packages,
        } => {
            let ctx = Ctx::new(&cli).await?;
            let mut state = ClientState::load_or_create(&cli.state, *suite)?;
            if let Some(existing) = &state.name
                && !existing.eq_ignore_ascii_case(name)
            {
                bail!("this device is already registered as {existing}");
            }
            let conn = ctx.connect().await?;
            let auth = conn.bind(state.identity()).await?;
            auth.claim_name(name).await?;
            state.name = Some(name.to_ascii_lowercase());
            let remaining = upload_batch(&state, &cli.state, &auth, *key_packages, true).await?;
            println!(
                "registered {} ({} KeyPackages on the server, {})",
                name.to_ascii_lowercase(),
                remaining,
                state.suite
            );
            println!("fingerprint {}", state.identity().public().fingerprint());
            conn.close().await;
        }
        Command::Whoami => {
            let state = ClientState::load(&cli.state)?;
            println!("{}", state.name.as_deref().unwrap_or("(no name)"));
            println!("fingerprint {}", state.identity().public().fingerprint());
        }
        Command::Keys { top_up_to } => {
            let ctx = Ctx::new(&cli).await?;
            let state = ClientState::load(&cli.state)?;
            let conn = ctx.connect().await?;
            let auth = conn.bind(state.identity()).await?;
            let (remaining, low) = auth.key_package_count().await?;
            if low && remaining < *top_up_to {
                let after =
                    upload_batch(&state, &cli.state, &auth, top_up_to - remaining, false).await?;
                println!(
                    "{after} KeyPackages on the server (uploaded {})",
                    after.saturating_sub(remaining)
                );
            } else {
                println!("{remaining} KeyPackages on the server");
            }
            conn.close().await;
        }
        Command::Lookup { name } => {
            let ctx = Ctx::new(&cli).await?;
            let state = ClientState::load(&cli.state)?;
            let conn = ctx.connect().await?;
            let auth = conn.bind(state.identity()).await?;
            let id = auth.resolve_name(name).await?;
            println!(
                "{} fingerprint {}",
                name.to_ascii_lowercase(),
                id.fingerprint()
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
