//! How a node takes part in the cluster: the settings of shards and edges (their certificate,
//! the cluster keys they trust, the ring), and their checks.

use std::path::PathBuf;
use std::time::Duration;

use quicproquo_core::ClusterPublicKey;
use quicproquo_core::cert::MAX_TRUSTED_KEYS;

use super::{ConfigError, FileConfig, Overrides, duration, invalid};

/// Default `certificate_renewal_window`.
const DEFAULT_RENEWAL_WINDOW: Duration = Duration::from_secs(7 * 86_400);
/// Default `certificate_check_interval`.
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// The certificate and trust flags and `QPQ_*` variables (flattened into the overrides).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TrustOverrides {
    /// This node's certificate, issued by `qpq-server node-cert`; re-read when it changes
    /// [default: none; edges and shards need one].
    #[arg(long, env = "QPQ_NODE_CERTIFICATE_FILE")]
    pub node_certificate_file: Option<PathBuf>,
    /// This node's Noise key file, which must exist (e.g. mounted from a secret)
    /// [default: DATA_DIR/node.key, created on first use].
    #[arg(long, env = "QPQ_NODE_KEY_FILE")]
    pub node_key_file: Option<PathBuf>,
    /// Cluster public keys (hex) whose certificates this node accepts from its peers,
    /// comma-separated: the old and the new key during a rollover [default: the key that
    /// issued this node's certificate].
    #[arg(long, env = "QPQ_CLUSTER_PUBLIC_KEYS", value_delimiter = ',')]
    pub cluster_public_keys: Option<Vec<String>>,
    /// Secret that keys the hashes of group ids in logs and traces; the same on every node
    /// [default: DATA_DIR/telemetry.key, created on first use].
    #[arg(long, env = "QPQ_TELEMETRY_KEY_FILE")]
    pub telemetry_key_file: Option<PathBuf>,
    /// Warn (log and metric) when the certificate expires within this, e.g. `7d` [default: 7d].
    #[arg(long, env = "QPQ_CERTIFICATE_RENEWAL_WINDOW")]
    pub certificate_renewal_window: Option<String>,
    /// How often the certificate file is checked for a renewal, e.g. `30s` [default: 30s].
    #[arg(long, env = "QPQ_CERTIFICATE_CHECK_INTERVAL")]
    pub certificate_check_interval: Option<String>,
}

/// How a node takes part in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Address a shard registers for edges to reach it; `None`: the bound address.
    pub advertise: Option<String>,
    /// The cluster signing key file, for a standalone node (which certifies itself); `None`:
    /// `DATA_DIR/cluster.key`, created on first use. Edges and shards refuse it.
    pub cluster_key_file: Option<PathBuf>,
    /// This node's certificate file (edges and shards).
    pub node_certificate_file: Option<PathBuf>,
    /// This node's Noise key file; `None`: `DATA_DIR/node.key`.
    pub node_key_file: Option<PathBuf>,
    /// Cluster keys trusted for peers' certificates; empty: the issuer of this node's.
    pub cluster_public_keys: Vec<ClusterPublicKey>,
    /// The telemetry key file; `None`: `DATA_DIR/telemetry.key`.
    pub telemetry_key_file: Option<PathBuf>,
    /// Warn when the certificate expires within this.
    pub certificate_renewal_window: Duration,
    /// How often the certificate file is checked for a renewal.
    pub certificate_check_interval: Duration,
    /// A shard's place on the ring; `None`: derived from its Noise key.
    pub node_id: Option<String>,
    /// A shard's lease length.
    pub lease_ttl: Duration,
    /// How often an edge re-reads the shard set.
    pub ring_refresh: Duration,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            advertise: None,
            cluster_key_file: None,
            node_certificate_file: None,
            node_key_file: None,
            cluster_public_keys: Vec::new(),
            telemetry_key_file: None,
            certificate_renewal_window: DEFAULT_RENEWAL_WINDOW,
            certificate_check_interval: DEFAULT_CHECK_INTERVAL,
            node_id: None,
            lease_ttl: Duration::from_secs(10),
            ring_refresh: Duration::from_secs(1),
        }
    }
}

impl ClusterSettings {
    /// The cluster settings from the flags/environment over the file over `defaults`.
    pub(super) fn resolve(
        file: &mut FileConfig,
        overrides: &mut Overrides,
        defaults: Self,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            advertise: overrides
                .advertise
                .take()
                .or(file.advertise.take())
                .filter(|a| !a.trim().is_empty()),
            cluster_key_file: overrides
                .cluster_key_file
                .take()
                .or(file.cluster_key_file.take()),
            node_certificate_file: overrides
                .trust
                .node_certificate_file
                .take()
                .or(file.node_certificate_file.take()),
            node_key_file: overrides
                .trust
                .node_key_file
                .take()
                .or(file.node_key_file.take()),
            cluster_public_keys: parse_public_keys(
                overrides
                    .trust
                    .cluster_public_keys
                    .take()
                    .or(file.cluster_public_keys.take())
                    .unwrap_or_default(),
            )?,
            telemetry_key_file: overrides
                .trust
                .telemetry_key_file
                .take()
                .or(file.telemetry_key_file.take()),
            certificate_renewal_window: duration(
                "certificate_renewal_window",
                overrides
                    .trust
                    .certificate_renewal_window
                    .take()
                    .or(file.certificate_renewal_window.take()),
                defaults.certificate_renewal_window,
            )?,
            certificate_check_interval: duration(
                "certificate_check_interval",
                overrides
                    .trust
                    .certificate_check_interval
                    .take()
                    .or(file.certificate_check_interval.take()),
                defaults.certificate_check_interval,
            )?,
            node_id: overrides
                .node_id
                .take()
                .or(file.node_id.take())
                .filter(|n| !n.trim().is_empty()),
            lease_ttl: duration(
                "lease_ttl",
                overrides.lease_ttl.take().or(file.lease_ttl.take()),
                defaults.lease_ttl,
            )?,
            ring_refresh: duration(
                "ring_refresh",
                overrides.ring_refresh.take().or(file.ring_refresh.take()),
                defaults.ring_refresh,
            )?,
        })
    }

    /// Checks the cluster settings' ranges and formats.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = self;
        if c.certificate_check_interval < Duration::from_secs(1)
            || c.certificate_check_interval > Duration::from_secs(3600)
        {
            return Err(invalid(
                "certificate_check_interval",
                "must be between 1s and 1h",
            ));
        }
        if c.certificate_renewal_window > Duration::from_secs(365 * 86_400) {
            return Err(invalid(
                "certificate_renewal_window",
                "must be at most 365d",
            ));
        }
        if c.lease_ttl < Duration::from_millis(300) || c.lease_ttl > Duration::from_secs(600) {
            return Err(invalid("lease_ttl", "must be between 300ms and 10m"));
        }
        if c.ring_refresh < Duration::from_millis(50) || c.ring_refresh > Duration::from_secs(60) {
            return Err(invalid("ring_refresh", "must be between 50ms and 1m"));
        }
        if let Some(a) = &c.advertise
            && (a.len() > 255
                || a.rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()))
        {
            return Err(invalid("advertise", "must be host:port"));
        }
        if let Some(n) = &c.node_id
            && (n.len() > 128
                || !n
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.')))
        {
            return Err(invalid(
                "node_id",
                "must be at most 128 letters, digits, '-', '_' or '.'",
            ));
        }
        Ok(())
    }
}

/// Parses the trusted cluster public keys (hex, at most [`MAX_TRUSTED_KEYS`]).
fn parse_public_keys(texts: Vec<String>) -> Result<Vec<ClusterPublicKey>, ConfigError> {
    let keys = texts
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| {
            ClusterPublicKey::from_hex(t).map_err(|e| invalid("cluster_public_keys", e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if keys.len() > MAX_TRUSTED_KEYS {
        return Err(invalid(
            "cluster_public_keys",
            format!("at most {MAX_TRUSTED_KEYS} keys"),
        ));
    }
    Ok(keys)
}
