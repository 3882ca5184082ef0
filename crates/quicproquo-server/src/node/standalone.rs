//! A standalone node: one process playing every role. Its own appender orders every group's
//! log over its store (embedded or Postgres), and its clients' Delivery Services use that
//! appender directly. It owns every group, so its retention job prunes them all.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{RoleParts, ServerError, io_err};
use crate::config::ServerConfig;
use crate::obs::Observer;
use crate::ordering::Appender;
use crate::ordering::retention::{self, Owned};
use crate::pool::CpuPool;
use crate::rpc::backend::Backend;
use crate::store::AnyStore;

/// Starts the appender and the retention job, stopped by `stop` after the workers.
pub(super) fn start(
    config: &ServerConfig,
    store: &AnyStore,
    observer: &Arc<Observer>,
    pool: &CpuPool,
    stop: &CancellationToken,
) -> Result<RoleParts, ServerError> {
    let (appender, thread) = Appender::start(
        store.clone(),
        config.max_message_bytes,
        Arc::clone(observer),
        (pool.clone(), config.limits.max_cached_group_views),
        stop.clone(),
    )
    .map_err(io_err("starting the appender"))?;
    let pruner = retention::start(
        store.clone(),
        config.retention,
        Arc::clone(observer),
        || Box::pin(async { Ok(Owned::everything()) }),
        stop.clone(),
    )
    .map_err(io_err("starting the retention job"))?;
    Ok(RoleParts {
        backend: Some(Backend::Local(appender)),
        threads: vec![thread, pruner],
        ..RoleParts::default()
    })
}
