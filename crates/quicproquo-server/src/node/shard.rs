//! A shard: orders the logs of the groups the ring gives it. Its appender is served to edges
//! only (`ShardService`, behind node certificates); on Postgres it holds a lease that puts it on
//! the ring while it runs. It serves no clients. Its retention job prunes the groups the ring
//! gives it at each pass; the shard that owns `SHARED_RETENTION_KEY` on the ring also prunes Welcomes and
//! KeyPackages.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{RoleParts, ServerError, io_err};
use crate::cluster::lease;
use crate::cluster::ring::Ring;
use crate::config::{ConfigError, ServerConfig};
use crate::keystore::NodeIdentity;
use crate::obs::Observer;
use crate::ordering::Appender;
use crate::ordering::retention::{self, Owned, OwnedFuture};
use crate::pool::CpuPool;
use crate::store::AnyStore;
use crate::store::postgres::PgStore;
use crate::store::postgres_cluster::LeaseClaim;

/// The ring position whose owner prunes what belongs to no group (Welcomes, KeyPackages).
pub(super) const SHARED_RETENTION_KEY: &[u8] = b"qpq-retention-shared";

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
        let (pg, me) = (pg.clone(), id.clone());
        let pruner = retention::start(
            store.clone(),
            config.retention,
            Arc::clone(observer),
            move || owned_by(pg.clone(), me.clone()),
            shutdown.clone(),
        )
        .map_err(io_err("starting the retention job"))?;
        threads.push(pruner);
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

/// What the ring gives shard `me` now: the groups it owns, and the shared part if it owns
/// [`SHARED_RETENTION_KEY`].
fn owned_by(pg: PgStore, me: String) -> OwnedFuture {
    Box::pin(async move {
        let snapshot = pg.ring().await?;
        let ring = Ring::new(snapshot.shards.iter().map(|s| s.node_id.as_str()));
        let shared = ring.owner(SHARED_RETENTION_KEY) == Some(me.as_str());
        Ok(Owned {
            shared,
            group: Box::new(move |g| ring.owner(g.as_bytes()) == Some(me.as_str())),
        })
    })
}
