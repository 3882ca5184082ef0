//! Operator commands of the `qpq-server` binary beyond running a node: `ring` (what the
//! cluster's shard ring looks like), `dev-cluster` (a whole cluster on loopback), `node-key`
//! and `node-cert` (certificates for nodes).

pub(crate) mod certs;
pub(crate) mod dev_cluster;

use std::io::Write;

use anyhow::{Context, Result};
use quicproquo_server::cluster::ring::Ring;
use quicproquo_server::config;
use quicproquo_server::store::postgres::PgStore;

/// `qpq-server ring`: prints the ring version, the live shards and, for `group` (hex), its
/// owner. Reading the ring also retires expired leases, like an edge's refresh does.
pub(crate) fn ring(
    database_url: &str,
    group: Option<&str>,
    ca_file: Option<&std::path::Path>,
) -> Result<()> {
    config::check_database_url(database_url)?;
    let group = group
        .map(|g| hex::decode(g.trim()).context("--group must be the group id in hex"))
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    let snapshot = runtime.block_on(async {
        let store = PgStore::connect_with_ca(database_url, 1, ca_file).await?;
        store.ring().await
    })?;
    let ring = Ring::new(snapshot.shards.iter().map(|s| s.node_id.as_str()));
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "ring version {} with {} shard(s)",
        snapshot.version,
        snapshot.shards.len()
    )?;
    for s in &snapshot.shards {
        writeln!(
            out,
            "shard {} {} lease {:.1}s",
            s.node_id,
            s.address,
            s.expires_in_ms as f64 / 1000.0
        )?;
    }
    if let Some(g) = group {
        match ring.owner(&g) {
            Some(owner) => writeln!(out, "group {} owner {owner}", hex::encode(&g))?,
            None => writeln!(out, "group {} owner none (no live shard)", hex::encode(&g))?,
        }
    }
    out.flush()?;
    Ok(())
}
