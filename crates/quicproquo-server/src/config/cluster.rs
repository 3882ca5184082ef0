//! How a node takes part in the cluster: the settings of shards and edges, and their checks.

use std::path::PathBuf;
use std::time::Duration;

use super::{ConfigError, FileConfig, Overrides, duration, invalid};

/// How a node takes part in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Address a shard registers for edges to reach it; `None`: the bound address.
    pub advertise: Option<String>,
    /// The shared cluster key file; `None`: `DATA_DIR/cluster.key`, created on first use.
    pub cluster_key_file: Option<PathBuf>,
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
