//! `qpq-server`: runs a quicproquo node (standalone, edge or shard), or manages its keys and
//! the cluster database's schema.

mod cli;

use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use quicproquo_core::NodeRole;
use quicproquo_server::config::{self, DEFAULT_DATA_DIR, FileConfig, Overrides, ServerConfig};
use quicproquo_server::store::postgres;
use quicproquo_server::{bind_and_start, keystore};
use std::io::Write;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "qpq-server",
    version,
    about = "quicproquo delivery cluster node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role in one process: what a new user runs.
    Standalone(Overrides),
    /// Run an edge node: terminates client connections.
    Edge(Overrides),
    /// Run a Delivery Service shard.
    Shard(Overrides),
    /// Print the cluster public key clients pin (creating the keys on first use).
    ClusterKey {
        /// Directory holding the keys.
        #[arg(long, env = "QPQ_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Show the cluster's shard ring: its version, the live shards and (with --group) the
    /// shard that owns a group.
    Ring {
        /// The cluster database.
        #[arg(long, env = "QPQ_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// A group id (hex) whose owner to show.
        #[arg(long)]
        group: Option<String>,
    },
    /// Run a local cluster on loopback: migrate, then start the shards and edges as child
    /// processes, print their addresses, and stop them all on ctrl-c or SIGTERM.
    DevCluster {
        /// The cluster database.
        #[arg(long, env = "QPQ_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Edge processes.
        #[arg(long, default_value_t = 2)]
        edges: usize,
        /// Shard processes.
        #[arg(long, default_value_t = 3)]
        shards: usize,
        /// Directory for the cluster key and each node's data directory.
        #[arg(long, default_value = "qpq-dev-cluster")]
        data_dir: PathBuf,
        /// Loopback address the nodes listen on (port 0 each).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Shard lease length.
        #[arg(long, default_value = "5s")]
        lease_ttl: String,
    },
    /// Apply the PostgreSQL migrations the cluster database lacks, and print what was applied.
    /// Safe to run from several replicas at once.
    Migrate {
        /// The database, e.g. `postgres://qpq@db:5432/qpq` [default: `database_url` from the
        /// configuration file].
        #[arg(long, env = "QPQ_DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Configuration file to read `database_url` from [default: ./qpq-server.toml when it
        /// exists].
        #[arg(long, env = "QPQ_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("QPQ_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Installs the SIGTERM and SIGINT handlers; the returned future resolves when either arrives.
///
/// Installed before the server announces itself, so a signal sent right after the
/// "listening" line is never lost to the default action.
pub(crate) fn shutdown_signal() -> Result<Pin<Box<dyn Future<Output = ()>>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(Box::pin(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }))
}

fn serve(role: NodeRole, overrides: Overrides) -> Result<()> {
    let file = FileConfig::load(overrides.config.as_deref())?;
    let config = ServerConfig::resolve(role, file, overrides)?;
    for var in config::unknown_env_vars(std::env::vars().map(|(k, _)| k)) {
        warn!(variable = %var, "unknown QPQ_ environment variable ignored");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the signal runtime")?;
    let signal = runtime.block_on(async { shutdown_signal() })?;
    let handle = bind_and_start(config)?;
    // One machine-readable line on stdout: scripts and tests read the bound address from it.
    println!(
        "qpq-server {role} listening on {} cluster-key {}",
        handle.local_addr(),
        handle.cluster_key()
    );
    std::io::stdout().flush().context("writing to stdout")?;
    runtime.block_on(signal);
    info!("shutting down");
    handle.shutdown();
    handle.join()?;
    info!("stopped");
    Ok(())
}

fn migrate(database_url: Option<String>, config: Option<PathBuf>) -> Result<()> {
    let url = match database_url.filter(|u| !u.trim().is_empty()) {
        Some(url) => url,
        None => FileConfig::load(config.as_deref())?
            .database_url
            .filter(|u| !u.trim().is_empty())
            .context(
                "no database: pass --database-url, set QPQ_DATABASE_URL or set database_url in \
                 the configuration file",
            )?,
    };
    config::check_database_url(&url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    let applied = runtime
        .block_on(postgres::migrate(&url))
        .with_context(|| format!("migrating {}", config::redact_database_url(&url)))?;
    let mut out = std::io::stdout().lock();
    if applied.is_empty() {
        writeln!(out, "schema up to date; no migration applied")?;
    }
    for version in &applied {
        writeln!(out, "applied {version}")?;
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Standalone(o) => serve(NodeRole::Standalone, o),
        Command::Edge(o) => serve(NodeRole::Edge, o),
        Command::Shard(o) => serve(NodeRole::Shard, o),
        Command::ClusterKey { data_dir } => {
            let key = keystore::cluster_key(&data_dir)?;
            println!("{}", key.public_key());
            Ok(())
        }
        Command::Migrate {
            database_url,
            config,
        } => migrate(database_url, config),
        Command::Ring {
            database_url,
            group,
        } => cli::ring(&database_url, group.as_deref()),
        Command::DevCluster {
            database_url,
            edges,
            shards,
            data_dir,
            host,
            lease_ttl,
        } => cli::dev_cluster::run(&cli::dev_cluster::Plan {
            database_url,
            edges,
            shards,
            base_dir: data_dir,
            host,
            lease_ttl,
        }),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qpq-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
