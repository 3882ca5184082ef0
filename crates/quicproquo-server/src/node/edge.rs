//! An edge: terminates clients' Noise connections and serves them the Authentication Service
//! (over the shared store) and the Delivery Service, whose ordering calls its router forwards
//! to each group's owner shard and whose subscriptions share one upstream feed per group.
//! It keeps no state of its own: any edge can serve any client.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{RoleParts, ServerError, io_err};
use crate::cluster::link::Dialer;
use crate::cluster::router::{Router, RouterSettings};
use crate::config::ServerConfig;
use crate::keystore::NodeIdentity;
use crate::obs::Observer;
use crate::rpc::backend::Backend;
use crate::store::AnyStore;

/// Longest an edge waits to reach a shard (connect, handshake, bootstrap).
const MAX_DIAL: Duration = Duration::from_secs(5);

/// Starts the router (after reading the ring once), stopped by `stop` after the workers.
pub(super) fn start(
    config: &ServerConfig,
    identity: &Arc<NodeIdentity>,
    store: &AnyStore,
    observer: &Arc<Observer>,
    stop: &CancellationToken,
) -> Result<RoleParts, ServerError> {
    let settings = RouterSettings {
        ring_refresh: config.cluster.ring_refresh,
        dialer: Dialer {
            identity: Arc::clone(identity),
            verifier: identity.verifier(),
            timeout: config.handshake_timeout.min(MAX_DIAL),
            max_frame_bytes: config.max_frame_bytes,
        },
    };
    let (router, thread) = Router::start(
        store.clone(),
        settings,
        config.max_message_bytes,
        Arc::clone(observer),
        stop.clone(),
    )
    .map_err(io_err("starting the router"))?;
    Ok(RoleParts {
        backend: Some(Backend::Routed(Arc::clone(&router))),
        router: Some(router),
        threads: vec![thread],
        ..RoleParts::default()
    })
}
