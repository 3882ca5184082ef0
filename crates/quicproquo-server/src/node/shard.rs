//! A shard: orders the logs of the groups the ring gives it. Its appender is served to edges
//! only (`ShardService`, behind node certificates); on Postgres it holds a lease that puts it on
//! the ring while it runs. It serves no clients.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{RoleParts, ServerError, io_err};
use crate::cluster::lease;
use crate::config::{ConfigError, ServerConfig};
use crate::keystore::NodeIdentity;
use crate::obs::Observer;
use crate::ordering::Appender;
use crate::pool::CpuPool;
use crate::store::AnyStore;
use crate::store::postgres_cluster::LeaseClaim;

/// Starts the appender (stopped by `stop` after the workers) and, on Postgres, the lease
/// (dropped when `shutdown` begins, so edges move the shard's groups during the drain).
pub(super) fn start(
    config: &ServerConfig,
    identity: &NodeIdentity,
    store: &AnyStore,
    observer: &Arc<Observer>,
    pool: &CpuPool,
    (stop, shutdown): (&CancellationToken, &CancellationToken),
    local_addr: SocketAddr,
) -> Result<RoleParts, ServerError> {
    let (appender, thread) = Appender::start(
        store.clone(),
        config.max_message_bytes,
        Arc::clone(observer),
        (pool.clone(), config.limits.max_cached_group_views),
        stop.clone(),
    )
    .map_err(io_err("starting the appender"))?;
    let mut threads = vec![thread];
    let id = super::node_id(config, identity);
    if let AnyStore::Postgres(pg) = store {
        let claim = LeaseClaim {
            node_id: id.clone(),
            address: advertised(config, local_addr)?,
            noise_key: *identity.noise.public(),
            ttl: config.cluster.lease_ttl,
        };
        let thread = lease::start(pg.clone(), claim, shutdown.clone())
            .map_err(io_err("starting the shard lease"))?;
        threads.push(thread);
    }
    Ok(RoleParts {
        shard: Some(appender),
        node_id: Some(id),
        threads,
        ..RoleParts::default()
    })
}

/// The address a shard registers: `advertise`, or the bound address when that is specific.
fn advertised(config: &ServerConfig, local: SocketAddr) -> Result<String, ServerError> {
    if let Some(a) = &config.cluster.advertise {
        return Ok(a.clone());
    }
    if local.ip().is_unspecified() {
        return Err(ServerError::Config(ConfigError::Invalid {
            key: "advertise",
            message: format!(
                "a shard listening on {local} must say where edges reach it (e.g. \
                 advertise = \"shard-0.example:7100\")"
            ),
        }));
    }
    Ok(local.to_string())
}
