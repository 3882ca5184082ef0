//! A standalone node: one process playing every role. Its own appender orders every group's
//! log over its store (embedded or Postgres), and its clients' Delivery Services use that
//! appender directly.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{RoleParts, ServerError, io_err};
use crate::config::ServerConfig;
use crate::obs::Observer;
use crate::ordering::Appender;
use crate::pool::CpuPool;
use crate::rpc::backend::Backend;
use crate::store::AnyStore;

/// Starts the appender, stopped by `stop` after the workers.
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
    Ok(RoleParts {
        backend: Some(Backend::Local(appender)),
        threads: vec![thread],
        ..RoleParts::default()
    })
}
