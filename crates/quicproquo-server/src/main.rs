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
use quicproquo_server::{bind_and_start, keystore, node};
use quicproquo_telemetry::{self as telemetry, Telemetry};
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
    /// Print the cluster public key clients pin (creating the signing key on first use). The
    /// operator keeps the signing key; nodes get certificates (node-cert).
    ClusterKey {
        /// Directory holding the keys.
        #[arg(long, env = "QPQ_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Create the telemetry key every node hashes group ids with (DIR/telemetry.key), once;
    /// prints nothing.
    TelemetryKey {
        /// Directory for the key.
        #[arg(long, env = "QPQ_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Print this node's Noise public key, the one to certify (creating it on first use).
    NodeKey {
        /// The node's data directory.
        #[arg(long, env = "QPQ_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Issue a node certificate with the cluster signing key (an operator's step): the role,
    /// node key and node id it certifies, valid from now for --expires.
    NodeCert {
        /// The cluster signing key [default: DATA_DIR/cluster.key; it must exist].
        #[arg(long)]
        cluster_key_file: Option<PathBuf>,
        /// Directory holding the cluster key when --cluster-key-file is not given.
        #[arg(long, env = "QPQ_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The node's role: edge, shard or standalone.
        #[arg(long)]
        role: String,
        /// The node's Noise public key in hex (qpq-server node-key prints it).
        #[arg(long)]
        node_key: Option<String>,
        /// Or: the directory holding the node's key (node.key, created there on first use);
        /// the certificate then goes to DIR/node.cert unless --out says otherwise.
        #[arg(long)]
        node_key_dir: Option<PathBuf>,
        /// The node id (a shard's place on the ring) [default: derived from the node key].
        #[arg(long)]
        node_id: Option<String>,
        /// How long the certificate is valid, e.g. 30d, 12h (at most 400d).
        #[arg(long, default_value = "30d")]
        expires: String,
        /// Write the certificate to this file (atomically) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
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
        /// PEM certificates trusted for the database's TLS [default: the public web roots].
        #[arg(long, env = "QPQ_DATABASE_CA_FILE")]
        database_ca_file: Option<PathBuf>,
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
        /// Then grant this role (the one the nodes connect as) the data operations they need
        /// on every table, and no schema rights; run as the role that owns the schema.
        #[arg(long, env = "QPQ_RUNTIME_ROLE")]
        grant_runtime_role: Option<String>,
        /// PEM certificates trusted for the database's TLS [default: the public web roots].
        #[arg(long, env = "QPQ_DATABASE_CA_FILE")]
        database_ca_file: Option<PathBuf>,
    },
}

/// A node about to serve: its role, its resolved configuration and its node id.
struct Serving {
    role: NodeRole,
    config: ServerConfig,
    node_id: String,
}

/// For a serving command: resolves the configuration and loads the node's keys, whose node id
/// names the process in its traces (`service.instance.id`). `None` for the other commands.
fn prepare(cli: &Cli) -> Result<Option<Serving>> {
    let (role, overrides) = match &cli.command {
        Command::Standalone(o) => (NodeRole::Standalone, o),
        Command::Edge(o) => (NodeRole::Edge, o),
        Command::Shard(o) => (NodeRole::Shard, o),
        _ => return Ok(None),
    };
    let file = FileConfig::load(overrides.config.as_deref())?;
    let config = ServerConfig::resolve(role, file, overrides.clone())?;
    let identity = node::load_identity(&config)?;
    let node_id = node::node_id(&config, &identity);
    Ok(Some(Serving {
        role,
        config,
        node_id,
    }))
}

/// Installs logging (`QPQ_LOG` / `RUST_LOG`, `QPQ_LOG_FORMAT`) and, for a serving node with an
/// OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT` or `otlp_endpoint` in the config file), trace
/// export under the node's id.
fn init_telemetry(serving: Option<&Serving>) -> Result<Telemetry> {
    let options = telemetry::Options {
        service_name: serving
            .map_or_else(|| "qpq-server".to_owned(), |s| format!("qpq-{}", s.role)),
        log_format: telemetry::LogFormat::from_env()?,
        default_log_level: "info".to_owned(),
        otlp_endpoint: serving.and_then(|s| s.config.otlp_endpoint.clone()),
        export_traces: serving.is_some(),
    };
    let instance = telemetry::Instance {
        id: serving.map(|s| s.node_id.clone()),
    };
    Ok(telemetry::init_with(&options, &instance)?)
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

fn serve(serving: Serving) -> Result<()> {
    let Serving { role, config, .. } = serving;
    for var in config::unknown_env_vars(std::env::vars().map(|(k, _)| k)) {
        warn!(variable = %var, "unknown QPQ_ environment variable ignored");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the signal runtime")?;
    let signal = runtime.block_on(async { shutdown_signal() })?;
    let handle = bind_and_start(config)?;
    // Machine-readable lines on stdout: scripts and tests read the bound addresses from them.
    // Both lines go out in one write, so a reader that takes only the first still finds the
    // pipe's buffer holding the second rather than a closed pipe.
    let ops = handle
        .ops_addr()
        .map_or_else(|| "off".to_owned(), |a| a.to_string());
    let lines = format!(
        "qpq-server {role} listening on {} cluster-key {}\nqpq-server {role} ops {ops}\n",
        handle.local_addr(),
        handle.cluster_key()
    );
    let mut out = std::io::stdout().lock();
    out.write_all(lines.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")?;
    drop(out);
    runtime.block_on(signal);
    info!("shutting down");
    handle.shutdown();
    handle.join()?;
    info!("stopped");
    Ok(())
}

fn migrate(
    database_url: Option<String>,
    config: Option<PathBuf>,
    options: &postgres::MigrateOptions<'_>,
) -> Result<()> {
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
        .block_on(postgres::migrate_with(&url, options))
        .with_context(|| format!("migrating {}", config::redact_database_url(&url)))?;
    let mut out = std::io::stdout().lock();
    if applied.is_empty() {
        writeln!(out, "schema up to date; no migration applied")?;
    }
    for version in &applied {
        writeln!(out, "applied {version}")?;
    }
    if let Some(role) = options.runtime_role {
        writeln!(out, "granted the runtime role {role} its data operations")?;
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}

fn run(cli: Cli, serving: Option<Serving>) -> Result<()> {
    match cli.command {
        Command::Standalone(_) | Command::Edge(_) | Command::Shard(_) => {
            serve(serving.context("the node's configuration was not read")?)
        }
        Command::ClusterKey { data_dir } => {
            let key = keystore::cluster_key(&data_dir)?;
            println!("{}", key.public_key());
            Ok(())
        }
        Command::NodeKey { data_dir } => cli::certs::node_key(&data_dir),
        Command::TelemetryKey { data_dir } => {
            keystore::telemetry_key(&data_dir, None)?;
            Ok(())
        }
        Command::NodeCert {
            cluster_key_file,
            data_dir,
            role,
            node_key,
            node_key_dir,
            node_id,
            expires,
            out,
        } => cli::certs::node_cert(&cli::certs::Request {
            cluster_key_file: cluster_key_file
                .unwrap_or_else(|| data_dir.join(keystore::CLUSTER_KEY_FILE)),
            role,
            node_key,
            node_key_dir,
            node_id,
            expires,
            out,
        }),
        Command::Migrate {
            database_url,
            config,
            grant_runtime_role,
            database_ca_file,
        } => migrate(
            database_url,
            config,
            &postgres::MigrateOptions {
                runtime_role: grant_runtime_role.as_deref(),
                ca_file: database_ca_file.as_deref(),
            },
        ),
        Command::Ring {
            database_url,
            group,
            database_ca_file,
        } => cli::ring(&database_url, group.as_deref(), database_ca_file.as_deref()),
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
    // The configuration and keys are read before logging starts: their errors go to stderr
    // like every other error of a command.
    let prepared =
        prepare(&cli).and_then(|serving| Ok((init_telemetry(serving.as_ref())?, serving)));
    let (telemetry, serving) = match prepared {
        Ok(t) => t,
        Err(e) => {
            eprintln!("qpq-server: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = run(cli, serving);
    // Flush the spans still queued (blocking; every runtime is gone by now).
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qpq-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
