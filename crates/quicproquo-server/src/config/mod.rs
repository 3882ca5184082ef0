//! Server configuration: defaults < `qpq-server.toml` < `QPQ_*` environment < flags.
//!
//! [`Overrides`] is what the environment and the command line give (clap reads both, flags
//! winning); [`FileConfig`] is the file, which rejects unknown keys. [`ServerConfig::resolve`]
//! layers them over the defaults and validates the result before any port is bound.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use quicproquo_core::NodeRole;
use serde::Deserialize;

use crate::auth::AuthSettings;
use crate::model::group::MAX_MESSAGE_ID;
use crate::model::page::{FRAME_HEADROOM, log_entry_bytes};

mod cluster;
mod limits;
mod parse;
mod retention;

pub use cluster::{ClusterSettings, TrustOverrides};
pub use limits::{LimitOverrides, LimitSettings};
use parse::parse_suites;
pub use parse::{check_database_url, parse_duration, parse_ops_listen, redact_database_url};
pub use retention::RetentionOverrides;

/// Default configuration file, read from the working directory when it exists.
pub const DEFAULT_CONFIG_FILE: &str = "qpq-server.toml";
/// Default client-facing listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7000";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "qpq-data";
/// Default ops (metrics and health) listen address: loopback, so nothing is exposed unless
/// configured.
pub const DEFAULT_OPS_LISTEN: &str = "127.0.0.1:9090";

/// Smallest accepted `max_frame_bytes`: one Noise message must fit.
const MIN_FRAME_BYTES: usize = 64 * 1024;
/// Default `max_message_bytes`: 12 MiB, room for a 1000-member post-quantum Welcome.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 12 * 1024 * 1024;
/// Largest accepted `max_frame_bytes`.
const MAX_FRAME_BYTES: usize = 1024 * 1024 * 1024;

/// Every `QPQ_*` variable the server reads (the client's own are listed so they are not
/// reported as unknown when both run from one shell).
pub const KNOWN_ENV: &[&str] = &[
    "QPQ_CONFIG",
    "QPQ_LOG_RETENTION",
    "QPQ_LOG_MAX_AGE",
    "QPQ_RETENTION_INTERVAL",
    "QPQ_RETENTION_BATCH",
    "QPQ_LISTEN",
    "QPQ_DATA_DIR",
    "QPQ_WORKERS",
    "QPQ_MAX_CONNECTIONS",
    "QPQ_MAX_HANDSHAKES",
    "QPQ_MAX_CONNECTIONS_PER_ADDRESS",
    "QPQ_MAX_HANDSHAKES_PER_ADDRESS",
    "QPQ_BIND_TIMEOUT",
    "QPQ_MAX_UNBOUND_PING_BYTES",
    "QPQ_IDLE_TIMEOUT",
    "QPQ_CPU_POOL_THREADS",
    "QPQ_CPU_POOL_QUEUE",
    "QPQ_MAX_REPLY_BYTES",
    "QPQ_MAX_CALLS_IN_FLIGHT",
    "QPQ_MAX_SUBSCRIPTIONS_PER_CONNECTION",
    "QPQ_WRITE_STALL_TIMEOUT",
    "QPQ_BIND_LIMIT_PER_ADDRESS",
    "QPQ_KEY_PACKAGE_FETCH_LIMIT_PER_IDENTITY",
    "QPQ_KEY_PACKAGE_FETCH_LIMIT_PER_ADDRESS",
    "QPQ_RATE_LIMITER_ENTRIES",
    "QPQ_MAX_CACHED_GROUP_VIEWS",
    "QPQ_HANDSHAKE_TIMEOUT",
    "QPQ_MAX_FRAME_BYTES",
    "QPQ_MAX_MESSAGE_BYTES",
    "QPQ_SHUTDOWN_GRACE",
    "QPQ_DATABASE_URL",
    "QPQ_RUNTIME_ROLE",
    "QPQ_DATABASE_CA_FILE",
    "QPQ_ADVERTISE",
    "QPQ_CLUSTER_KEY_FILE",
    "QPQ_NODE_CERTIFICATE_FILE",
    "QPQ_NODE_KEY_FILE",
    "QPQ_CLUSTER_PUBLIC_KEYS",
    "QPQ_TELEMETRY_KEY_FILE",
    "QPQ_CERTIFICATE_RENEWAL_WINDOW",
    "QPQ_CERTIFICATE_CHECK_INTERVAL",
    "QPQ_NODE_ID",
    "QPQ_LEASE_TTL",
    "QPQ_RING_REFRESH",
    "QPQ_LOG",
    "QPQ_KEY_PACKAGE_SUITES",
    "QPQ_KEY_PACKAGE_FETCH_LIMIT",
    "QPQ_KEY_PACKAGE_LOW_WATERMARK",
    "QPQ_OPS_LISTEN",
    "QPQ_CLIENT_TRACE_RATIO",
    "QPQ_LOG_FORMAT",
    "QPQ_SERVER",
    "QPQ_SERVER_KEY",
    "QPQ_STATE",
    "QPQ_TIMEOUT",
];

/// Configuration errors, reported before anything is bound.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation (names the offending key).
        message: String,
    },
    /// A setting has a value outside its allowed range or format.
    #[error("invalid setting `{key}`: {message}")]
    Invalid {
        /// The setting's name as written in the config file.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Settings from the environment and the command line (all optional).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// Configuration file [default: ./qpq-server.toml when it exists].
    #[arg(long, env = "QPQ_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on for connections [default: 127.0.0.1:7000].
    #[arg(long, env = "QPQ_LISTEN")]
    pub listen: Option<String>,
    /// Directory for keys and the embedded store [default: ./qpq-data].
    #[arg(long, env = "QPQ_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Worker threads, each running its own single-threaded runtime [default: one per core].
    #[arg(long, env = "QPQ_WORKERS")]
    pub workers: Option<usize>,
    /// Most connections open at once; more are closed on accept [default: 10000].
    #[arg(long, env = "QPQ_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most handshakes in progress at once; more are closed on accept [default: 1024].
    #[arg(long, env = "QPQ_MAX_HANDSHAKES")]
    pub max_handshakes: Option<usize>,
    /// Per-address caps, the bind deadline and the size of a ping before bind.
    #[command(flatten)]
    pub limits: LimitOverrides,
    /// The retention job: how long log entries and Welcomes are kept.
    #[command(flatten)]
    pub retention: RetentionOverrides,
    /// Deadline for a client to complete the Noise handshake, e.g. `10s`, `500ms` [default: 10s].
    #[arg(long, env = "QPQ_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<String>,
    /// Largest frame (and RPC message) accepted, in bytes [default: 16777216].
    #[arg(long, env = "QPQ_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Largest MLS message (with its Welcome) the Delivery Service accepts, in bytes; must
    /// leave room within max_frame_bytes [default: 12582912].
    #[arg(long, env = "QPQ_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Time given to in-flight calls on shutdown, e.g. `30s` [default: 30s].
    #[arg(long, env = "QPQ_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// MLS ciphersuites whose KeyPackages are accepted, comma-separated
    /// [default: hybrid,classical].
    #[arg(long, env = "QPQ_KEY_PACKAGE_SUITES", value_delimiter = ',')]
    pub key_package_suites: Option<Vec<String>>,
    /// KeyPackage fetches one identity may make of another per minute [default: 30].
    #[arg(long, env = "QPQ_KEY_PACKAGE_FETCH_LIMIT")]
    pub key_package_fetch_limit: Option<u32>,
    /// Pool size below which clients are told to upload more KeyPackages [default: 10].
    #[arg(long, env = "QPQ_KEY_PACKAGE_LOW_WATERMARK")]
    pub key_package_low_watermark: Option<u32>,
    /// PostgreSQL database of a cluster, e.g. `postgres://qpq@db:5432/qpq` [default: none].
    #[arg(long, env = "QPQ_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// PEM certificates trusted for the database's TLS [default: the public web roots]. TLS
    /// follows the URL's sslmode; without one it is required unless the host is loopback.
    #[arg(long, env = "QPQ_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
    /// Address other nodes use to reach this shard, `host:port` [default: the bound address].
    #[arg(long, env = "QPQ_ADVERTISE")]
    pub advertise: Option<String>,
    /// File holding the cluster signing key, for a standalone node, which certifies itself
    /// [default: DATA_DIR/cluster.key, created on first use]. Edges and shards start from a
    /// certificate instead (--node-certificate-file).
    #[arg(long, env = "QPQ_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// The node certificate, the cluster keys trusted, the telemetry key.
    #[command(flatten)]
    pub trust: TrustOverrides,
    /// A shard's stable identity, its place on the ring [default: derived from its node key].
    #[arg(long, env = "QPQ_NODE_ID")]
    pub node_id: Option<String>,
    /// How long a shard's lease lasts without renewal, e.g. `10s` [default: 10s].
    #[arg(long, env = "QPQ_LEASE_TTL")]
    pub lease_ttl: Option<String>,
    /// How often an edge re-reads the set of shards, e.g. `1s` [default: 1s].
    #[arg(long, env = "QPQ_RING_REFRESH")]
    pub ring_refresh: Option<String>,
    /// HTTP listener for /metrics, /livez and /readyz, `host:port` or `off`
    /// [default: 127.0.0.1:9090].
    #[arg(long, env = "QPQ_OPS_LISTEN")]
    pub ops_listen: Option<String>,
    /// Fraction (0 to 1) of the traces clients mark sampled that this node continues; the
    /// others it does not record [default: the node's own OTEL_TRACES_SAMPLER ratio].
    #[arg(long, env = "QPQ_CLIENT_TRACE_RATIO")]
    pub client_trace_ratio: Option<f64>,
}

/// The configuration file's contents. Unknown keys are an error.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Overrides::listen`].
    pub listen: Option<String>,
    /// See [`Overrides::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`Overrides::workers`].
    pub workers: Option<usize>,
    /// See [`Overrides::max_connections`].
    pub max_connections: Option<usize>,
    /// See [`Overrides::max_handshakes`].
    pub max_handshakes: Option<usize>,
    /// See [`LimitOverrides::max_connections_per_address`].
    pub max_connections_per_address: Option<usize>,
    /// See [`LimitOverrides::max_handshakes_per_address`].
    pub max_handshakes_per_address: Option<usize>,
    /// See [`LimitOverrides::bind_timeout`].
    pub bind_timeout: Option<String>,
    /// See [`LimitOverrides::max_unbound_ping_bytes`].
    pub max_unbound_ping_bytes: Option<usize>,
    /// See [`LimitOverrides::idle_timeout`].
    pub idle_timeout: Option<String>,
    /// See [`LimitOverrides::cpu_pool_threads`].
    pub cpu_pool_threads: Option<usize>,
    /// See [`LimitOverrides::cpu_pool_queue`].
    pub cpu_pool_queue: Option<usize>,
    /// See [`LimitOverrides::max_reply_bytes`].
    pub max_reply_bytes: Option<usize>,
    /// See [`LimitOverrides::max_calls_in_flight`].
    pub max_calls_in_flight: Option<usize>,
    /// See [`LimitOverrides::max_subscriptions_per_connection`].
    pub max_subscriptions_per_connection: Option<usize>,
    /// See [`LimitOverrides::write_stall_timeout`].
    pub write_stall_timeout: Option<String>,
    /// See [`LimitOverrides::bind_limit_per_address`].
    pub bind_limit_per_address: Option<u32>,
    /// See [`LimitOverrides::key_package_fetch_limit_per_identity`].
    pub key_package_fetch_limit_per_identity: Option<u32>,
    /// See [`LimitOverrides::key_package_fetch_limit_per_address`].
    pub key_package_fetch_limit_per_address: Option<u32>,
    /// See [`LimitOverrides::rate_limiter_entries`].
    pub rate_limiter_entries: Option<usize>,
    /// See [`LimitOverrides::max_cached_group_views`].
    pub max_cached_group_views: Option<usize>,
    /// See [`RetentionOverrides::log_retention`].
    pub log_retention: Option<String>,
    /// See [`RetentionOverrides::log_max_age`].
    pub log_max_age: Option<String>,
    /// See [`RetentionOverrides::retention_interval`].
    pub retention_interval: Option<String>,
    /// See [`RetentionOverrides::retention_batch`].
    pub retention_batch: Option<usize>,
    /// See [`Overrides::handshake_timeout`].
    pub handshake_timeout: Option<String>,
    /// See [`Overrides::max_frame_bytes`].
    pub max_frame_bytes: Option<usize>,
    /// See [`Overrides::max_message_bytes`].
    pub max_message_bytes: Option<usize>,
    /// See [`Overrides::shutdown_grace`].
    pub shutdown_grace: Option<String>,
    /// See [`Overrides::key_package_suites`].
    pub key_package_suites: Option<Vec<String>>,
    /// See [`Overrides::key_package_fetch_limit`].
    pub key_package_fetch_limit: Option<u32>,
    /// See [`Overrides::key_package_low_watermark`].
    pub key_package_low_watermark: Option<u32>,
    /// See [`Overrides::database_url`].
    pub database_url: Option<String>,
    /// See [`Overrides::database_ca_file`].
    pub database_ca_file: Option<PathBuf>,
    /// See [`Overrides::advertise`].
    pub advertise: Option<String>,
    /// See [`Overrides::cluster_key_file`].
    pub cluster_key_file: Option<PathBuf>,
    /// See [`TrustOverrides::node_certificate_file`].
    pub node_certificate_file: Option<PathBuf>,
    /// See [`TrustOverrides::node_key_file`].
    pub node_key_file: Option<PathBuf>,
    /// See [`TrustOverrides::cluster_public_keys`].
    pub cluster_public_keys: Option<Vec<String>>,
    /// See [`TrustOverrides::telemetry_key_file`].
    pub telemetry_key_file: Option<PathBuf>,
    /// See [`TrustOverrides::certificate_renewal_window`].
    pub certificate_renewal_window: Option<String>,
    /// See [`TrustOverrides::certificate_check_interval`].
    pub certificate_check_interval: Option<String>,
    /// See [`Overrides::node_id`].
    pub node_id: Option<String>,
    /// See [`Overrides::lease_ttl`].
    pub lease_ttl: Option<String>,
    /// See [`Overrides::ring_refresh`].
    pub ring_refresh: Option<String>,
    /// See [`Overrides::ops_listen`].
    pub ops_listen: Option<String>,
    /// See [`Overrides::client_trace_ratio`].
    pub client_trace_ratio: Option<f64>,
    /// OTLP/HTTP collector base URL for traces, e.g. `http://collector:4318`; the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` variable wins over it [default: none, tracing off].
    pub otlp_endpoint: Option<String>,
}

impl FileConfig {
    /// Parses TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })
    }

    /// Reads the file named by `explicit`, or `qpq-server.toml` in the working directory if it
    /// exists. An explicitly named file must exist.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match explicit {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }
}

/// The resolved, validated configuration of one server process.
///
/// Its `Debug` output masks the database password.
#[derive(Clone)]
pub struct ServerConfig {
    /// The role this process plays.
    pub role: NodeRole,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Keys (and later the embedded store) live here.
    pub data_dir: PathBuf,
    /// Worker threads.
    pub workers: usize,
    /// Connection cap.
    pub max_connections: usize,
    /// Cap on handshakes in progress.
    pub max_handshakes: usize,
    /// Handshake deadline.
    pub handshake_timeout: Duration,
    /// Per-address caps, the bind deadline and the size of a ping before bind.
    pub limits: LimitSettings,
    /// The retention job on nodes that order groups (standalone, shard).
    pub retention: crate::ordering::retention::RetentionSettings,
    /// Largest frame and RPC message accepted.
    pub max_frame_bytes: usize,
    /// Largest MLS message (with its Welcome) the Delivery Service accepts.
    pub max_message_bytes: usize,
    /// Grace period for in-flight calls at shutdown.
    pub shutdown_grace: Duration,
    /// Authentication Service settings.
    pub auth: AuthSettings,
    /// The cluster's PostgreSQL database (libpq-style URL or `key=value` string), if any.
    pub database_url: Option<String>,
    /// Certificates trusted for the database's TLS; `None`: the public web roots.
    pub database_ca_file: Option<PathBuf>,
    /// Cluster settings (shards and edges).
    pub cluster: ClusterSettings,
    /// Where the ops listener (metrics, health) binds; `None`: no ops listener.
    pub ops_listen: Option<SocketAddr>,
    /// The OTLP collector named in the configuration file, if any.
    pub otlp_endpoint: Option<String>,
    /// The fraction of client-sampled traces continued; `None`: the node's sampling ratio.
    pub client_trace_ratio: Option<f64>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("role", &self.role)
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("workers", &self.workers)
            .field("max_connections", &self.max_connections)
            .field("max_handshakes", &self.max_handshakes)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("limits", &self.limits)
            .field("retention", &self.retention)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("auth", &self.auth)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_database_url),
            )
            .field("database_ca_file", &self.database_ca_file)
            .field("cluster", &self.cluster)
            .field("ops_listen", &self.ops_listen)
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("client_trace_ratio", &self.client_trace_ratio)
            .finish()
    }
}

impl ServerConfig {
    /// Defaults for `role`, for tests and embedding: listen on an ephemeral loopback port.
    pub fn for_role(role: NodeRole, data_dir: PathBuf) -> Self {
        Self {
            role,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            workers: default_workers(),
            max_connections: 10_000,
            max_handshakes: 1024,
            handshake_timeout: Duration::from_secs(10),
            limits: LimitSettings::default(),
            retention: retention::default_settings(),
            max_frame_bytes: quicproquo_core::channel::DEFAULT_MAX_FRAME_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            shutdown_grace: Duration::from_secs(30),
            auth: AuthSettings::default(),
            database_url: None,
            database_ca_file: None,
            cluster: ClusterSettings::default(),
            ops_listen: None,
            otlp_endpoint: None,
            client_trace_ratio: None,
        }
    }

    /// Layers `overrides` over `file` over the defaults, and validates the result.
    pub fn resolve(
        role: NodeRole,
        mut file: FileConfig,
        mut overrides: Overrides,
    ) -> Result<Self, ConfigError> {
        let defaults = Self::for_role(role, PathBuf::from(DEFAULT_DATA_DIR));
        let auth = resolve_auth(&mut file, &mut overrides, defaults.auth)?;
        let cluster = ClusterSettings::resolve(&mut file, &mut overrides, defaults.cluster)?;
        let limits = LimitSettings::resolve(&mut file, &mut overrides.limits, defaults.limits)?;
        let retention =
            retention::resolve(&mut file, &mut overrides.retention, defaults.retention)?;
        let listen_text = overrides
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_text
            .to_socket_addrs()
            .map_err(|e| invalid("listen", format!("`{listen_text}`: {e}")))?
            .next()
            .ok_or_else(|| invalid("listen", format!("`{listen_text}` resolves to nothing")))?;
        let ops_text = overrides
            .ops_listen
            .or(file.ops_listen)
            .unwrap_or_else(|| DEFAULT_OPS_LISTEN.to_owned());
        let ops_listen = parse_ops_listen(&ops_text)?;
        let mut config = Self {
            role,
            listen,
            data_dir: overrides
                .data_dir
                .or(file.data_dir)
                .unwrap_or(defaults.data_dir),
            workers: overrides
                .workers
                .or(file.workers)
                .unwrap_or(defaults.workers),
            max_connections: overrides
                .max_connections
                .or(file.max_connections)
                .unwrap_or(defaults.max_connections),
            max_handshakes: overrides
                .max_handshakes
                .or(file.max_handshakes)
                .unwrap_or(defaults.max_handshakes),
            handshake_timeout: duration(
                "handshake_timeout",
                overrides
                    .handshake_timeout
                    .take()
                    .or(file.handshake_timeout.take()),
                defaults.handshake_timeout,
            )?,
            limits,
            retention,
            max_frame_bytes: overrides
                .max_frame_bytes
                .or(file.max_frame_bytes)
                .unwrap_or(defaults.max_frame_bytes),
            max_message_bytes: 0,
            shutdown_grace: duration(
                "shutdown_grace",
                overrides
                    .shutdown_grace
                    .take()
                    .or(file.shutdown_grace.take()),
                defaults.shutdown_grace,
            )?,
            auth,
            database_url: overrides
                .database_url
                .or(file.database_url)
                .filter(|url| !url.trim().is_empty()),
            database_ca_file: overrides.database_ca_file.or(file.database_ca_file),
            cluster,
            ops_listen,
            otlp_endpoint: file.otlp_endpoint.filter(|e| !e.trim().is_empty()),
            client_trace_ratio: overrides.client_trace_ratio.or(file.client_trace_ratio),
        };
        // Without an explicit limit, messages may use the frame minus room for the call and
        // the envelope a reply wraps each one in.
        config.max_message_bytes = overrides
            .max_message_bytes
            .or(file.max_message_bytes)
            .unwrap_or_else(|| {
                defaults.max_message_bytes.min(
                    config
                        .max_frame_bytes
                        .saturating_sub(FRAME_HEADROOM + log_entry_bytes(MAX_MESSAGE_ID, 0)),
                )
            });
        config.validate()?;
        config.validate_store()?;
        Ok(config)
    }

    /// Checks that the role may run on the store the configuration names: edge and shard nodes
    /// share the cluster's PostgreSQL database, so they need `database_url`; only a standalone
    /// node may run without one, on the embedded store in its data directory.
    pub fn validate_store(&self) -> Result<(), ConfigError> {
        if self.database_url.is_none() && self.role != NodeRole::Standalone {
            return Err(invalid(
                "database_url",
                format!(
                    "a {} node needs the cluster's PostgreSQL database: set database_url in the \
                     config file, QPQ_DATABASE_URL or --database-url (only standalone runs on \
                     the embedded store)",
                    self.role
                ),
            ));
        }
        Ok(())
    }

    /// The byte budget of one page of a reply or push: `max_reply_bytes`, capped to what a
    /// frame holds beside the rest of a call.
    pub fn reply_budget(&self) -> usize {
        self.limits
            .max_reply_bytes
            .min(self.max_frame_bytes.saturating_sub(FRAME_HEADROOM))
    }

    /// Checks every setting's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1024).contains(&self.workers) {
            return Err(invalid("workers", "must be between 1 and 1024"));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if self.max_handshakes == 0 || self.max_handshakes > self.max_connections {
            return Err(invalid(
                "max_handshakes",
                "must be at least 1 and at most max_connections",
            ));
        }
        if self.handshake_timeout.is_zero() || self.handshake_timeout > Duration::from_secs(300) {
            return Err(invalid(
                "handshake_timeout",
                "must be more than 0 and at most 5m",
            ));
        }
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return Err(invalid(
                "max_frame_bytes",
                format!("must be between {MIN_FRAME_BYTES} and {MAX_FRAME_BYTES}"),
            ));
        }
        // A reply page always holds at least one entry: the largest message in its envelope,
        // with room for the rest of the call, must fit a frame.
        if self.max_message_bytes == 0
            || log_entry_bytes(MAX_MESSAGE_ID, self.max_message_bytes) + FRAME_HEADROOM
                > self.max_frame_bytes
        {
            return Err(invalid(
                "max_message_bytes",
                "must be at least 1 and, in its reply envelope, leave 64 KiB of max_frame_bytes \
                 for the rest of a call",
            ));
        }
        if self.shutdown_grace > Duration::from_secs(3600) {
            return Err(invalid("shutdown_grace", "must be at most 1h"));
        }
        if self.auth.suites.is_empty() {
            return Err(invalid("key_package_suites", "name at least one suite"));
        }
        if self.auth.fetch_limit_per_minute == 0 {
            return Err(invalid("key_package_fetch_limit", "must be at least 1"));
        }
        self.limits.validate()?;
        retention::validate(&self.retention)?;
        if let Some(url) = &self.database_url {
            check_database_url(url)?;
        }
        if self
            .client_trace_ratio
            .is_some_and(|r| !(0.0..=1.0).contains(&r))
        {
            return Err(invalid("client_trace_ratio", "must be between 0 and 1"));
        }
        self.cluster.validate()
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// `QPQ_*` variables in `vars` that nothing reads (likely typos).
pub fn unknown_env_vars(vars: impl Iterator<Item = String>) -> Vec<String> {
    vars.filter(|k| k.starts_with("QPQ_") && !KNOWN_ENV.contains(&k.as_str()))
        .collect()
}

/// A duration setting: `v` parsed, or `default` when unset.
fn duration(
    key: &'static str,
    v: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        Some(text) => parse_duration(&text).map_err(|m| invalid(key, m)),
        None => Ok(default),
    }
}

/// The Authentication Service's settings from the flags/environment over the file.
fn resolve_auth(
    file: &mut FileConfig,
    overrides: &mut Overrides,
    defaults: AuthSettings,
) -> Result<AuthSettings, ConfigError> {
    Ok(AuthSettings {
        suites: match overrides
            .key_package_suites
            .take()
            .or(file.key_package_suites.take())
        {
            Some(names) => parse_suites(&names)?,
            None => defaults.suites,
        },
        fetch_limit_per_minute: overrides
            .key_package_fetch_limit
            .or(file.key_package_fetch_limit)
            .unwrap_or(defaults.fetch_limit_per_minute),
        low_watermark: overrides
            .key_package_low_watermark
            .or(file.key_package_low_watermark)
            .unwrap_or(defaults.low_watermark),
    })
}

#[cfg(test)]
mod tests;
