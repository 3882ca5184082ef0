//! Command-line options, and the settings they resolve to.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use quicproquo_core::mls::Suite;

use crate::threshold::Threshold;

/// Drives real MLS members against a quicproquo server or cluster and reports latency.
#[derive(Debug, Parser)]
#[command(name = "qpq-loadtest", version)]
pub(crate) struct Args {
    /// What to run.
    #[command(subcommand)]
    pub(crate) internal: Option<Internal>,
    /// Scenario: `messages` (groups, Welcomes, steady traffic) or `connections` (idle
    /// authenticated connections).
    #[arg(long, value_enum, default_value = "messages")]
    pub(crate) scenario: Scenario,
    /// Server addresses to drive (members are spread over them); without it an in-process
    /// standalone server on the embedded store is started.
    #[arg(long, value_delimiter = ',', env = "QPQ_SERVER")]
    pub(crate) target: Vec<String>,
    /// The cluster public key (hex) the target's nodes are vouched for by.
    #[arg(long, env = "QPQ_SERVER_KEY")]
    pub(crate) server_key: Option<String>,
    /// With --target: the ops endpoints (`http://host:port`, as `ops_listen`) of the nodes that
    /// verify commits (the shards, or a standalone node): the report then states the server's
    /// verification time, read from their `qpq_handshake_verify_duration_seconds`.
    #[arg(long, value_delimiter = ',', env = "QPQ_METRICS")]
    pub(crate) metrics: Vec<String>,
    /// Without --target: run the server as a child process (its memory and CPU are then
    /// measured exactly) instead of in this process. Always so for `connections`.
    #[arg(long)]
    pub(crate) server_process: bool,
    /// Members (devices), each with its own connection, identity and MLS state.
    #[arg(long, default_value_t = 100)]
    pub(crate) members: usize,
    /// Members per group (the creator included).
    #[arg(long, default_value_t = 100)]
    pub(crate) group_size: usize,
    /// Groups [default: members / group-size]. Members are assigned round-robin, so with
    /// groups x group-size > members a member is in several groups.
    #[arg(long)]
    pub(crate) groups: Option<usize>,
    /// Application messages per second, all groups together.
    #[arg(long, default_value_t = 50.0)]
    pub(crate) rate: f64,
    /// Further rates to run after the first, each for --duration on the same groups
    /// (comma-separated), to find the highest rate the deployment sustains.
    #[arg(long, value_delimiter = ',')]
    pub(crate) sweep: Vec<f64>,
    /// How long the steady state lasts (or how long idle connections are held), e.g. `30s`.
    #[arg(long, default_value = "10s")]
    pub(crate) duration: String,
    /// Plaintext bytes per application message (at least 24: the timing header).
    #[arg(long, default_value_t = 128)]
    pub(crate) payload_bytes: usize,
    /// MLS ciphersuite: `hybrid` (X-Wing, post-quantum) or `classical`.
    #[arg(long, default_value = "hybrid")]
    pub(crate) ciphersuite: String,
    /// Members per group that decrypt every application message [default: all]. The others
    /// still receive every entry on their own connection (checking order by sequence number
    /// and completeness by message id, and timing delivery from the planned send time the
    /// message id names) and process every commit with real MLS.
    #[arg(long)]
    pub(crate) decrypting: Option<usize>,
    /// Members added per commit when groups are built [default: everyone in one commit].
    #[arg(long)]
    pub(crate) add_batch: Option<usize>,
    /// Churn: members removed and re-added per churn step in each group (0: none).
    #[arg(long, default_value_t = 0)]
    pub(crate) churn: usize,
    /// Time between churn steps, e.g. `5s`.
    #[arg(long, default_value = "5s")]
    pub(crate) churn_every: String,
    /// Worker threads the members share [default: one per core].
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Setup operations (connects, uploads, joins) in flight per worker thread.
    #[arg(long, default_value_t = 32)]
    pub(crate) concurrency: usize,
    /// How long to wait for outstanding deliveries after the last planned send, e.g. `10s`.
    #[arg(long, default_value = "10s")]
    pub(crate) drain: String,
    /// Deadline for each connect and call, e.g. `60s`.
    #[arg(long, default_value = "120s")]
    pub(crate) timeout: String,
    /// Pass/fail rules on the steady state, e.g. `p99<50ms`, `errors=0`, `rate>=1000`
    /// (deliveries/s); repeat or comma-separate. Any failing rule makes the exit status 2.
    #[arg(long, value_delimiter = ',')]
    pub(crate) threshold: Vec<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
    pub(crate) quiet: bool,
}

/// Hidden subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Internal {
    /// Runs a standalone server on the embedded store in DIR for a parent load test; prints
    /// `listening ADDR KEY` and stops when standard input closes.
    #[command(hide = true)]
    Serve {
        /// Data directory.
        dir: PathBuf,
        /// Connection cap.
        max_connections: usize,
    },
}

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Scenario {
    /// Groups, Welcomes and application messages.
    Messages,
    /// Idle authenticated connections.
    Connections,
}

/// The resolved settings of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Settings {
    pub(crate) scenario: Scenario,
    pub(crate) members: usize,
    pub(crate) group_size: usize,
    pub(crate) groups: usize,
    pub(crate) rates: Vec<f64>,
    #[serde(serialize_with = "secs")]
    pub(crate) duration: Duration,
    pub(crate) payload_bytes: usize,
    /// Members per group that decrypt application messages (the first positions).
    pub(crate) decrypting: usize,
    #[serde(serialize_with = "suite_name")]
    pub(crate) suite: Suite,
    pub(crate) add_batch: usize,
    pub(crate) churn: usize,
    #[serde(serialize_with = "secs")]
    pub(crate) churn_every: Duration,
    pub(crate) threads: usize,
    pub(crate) concurrency: usize,
    #[serde(serialize_with = "secs")]
    pub(crate) drain: Duration,
    #[serde(serialize_with = "secs")]
    pub(crate) timeout: Duration,
    #[serde(skip)]
    pub(crate) thresholds: Vec<Threshold>,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn suite_name<S: serde::Serializer>(suite: &Suite, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(suite.as_str())
}

/// Bytes of the timing header at the start of every plaintext.
pub(crate) const HEADER_BYTES: usize = 24;

/// Parses `30s`, `500ms`, `2m`, `1h` (the project's one duration syntax, see
/// [`quicproquo_core::duration`]).
pub(crate) fn parse_duration(text: &str) -> Result<Duration> {
    quicproquo_core::duration::parse_duration(text)
        .map_err(|e| anyhow::anyhow!("invalid duration {text:?}: {e}"))
}

impl Args {
    /// Checks the options and resolves defaults.
    pub(crate) fn settings(&self) -> Result<Settings> {
        ensure!(self.members > 0, "--members must be at least 1");
        let suite = Suite::parse(&self.ciphersuite).with_context(|| {
            format!(
                "unknown ciphersuite {:?} (hybrid or classical)",
                self.ciphersuite
            )
        })?;
        let group_size = self.group_size.min(self.members);
        let messages = self.scenario == Scenario::Messages;
        if messages {
            ensure!(group_size >= 2, "--group-size must be at least 2");
        }
        let groups = self.groups.unwrap_or((self.members / group_size).max(1));
        let mut rates = vec![self.rate];
        rates.extend(&self.sweep);
        if messages {
            ensure!(
                rates.iter().all(|r| r.is_finite() && *r > 0.0),
                "rates must be positive"
            );
            ensure!(groups > 0, "--groups must be at least 1");
        }
        ensure!(
            self.payload_bytes >= HEADER_BYTES,
            "--payload-bytes must be at least {HEADER_BYTES}"
        );
        let add_batch = self.add_batch.unwrap_or(group_size).max(1);
        if self.churn > 0 {
            ensure!(
                self.churn < group_size - 1,
                "--churn must leave members in the group"
            );
        }
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from))
            .max(1);
        let thresholds = self
            .threshold
            .iter()
            .map(|t| Threshold::parse(t))
            .collect::<Result<Vec<_>>>()?;
        if !self.target.is_empty() && self.server_key.is_none() {
            bail!("--target needs --server-key (the cluster public key, hex)");
        }
        if self.target.is_empty() && !self.metrics.is_empty() {
            bail!("--metrics names a remote cluster's ops endpoints: it needs --target");
        }
        Ok(Settings {
            scenario: self.scenario,
            members: self.members,
            group_size,
            groups,
            rates,
            duration: parse_duration(&self.duration)?,
            payload_bytes: self.payload_bytes,
            decrypting: self.decrypting.unwrap_or(group_size).min(group_size),
            suite,
            add_batch,
            churn: self.churn,
            churn_every: parse_duration(&self.churn_every)?,
            threads,
            concurrency: self.concurrency.max(1),
            drain: parse_duration(&self.drain)?,
            timeout: parse_duration(&self.timeout)?,
            thresholds,
        })
    }
}
