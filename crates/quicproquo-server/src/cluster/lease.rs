//! A shard's lease: registered when the shard starts, renewed every third of its length,
//! dropped when the shard stops (so edges move its groups at once rather than at expiry).
//!
//! If renewals fail for longer than the lease (the database is unreachable, the process was
//! paused), the lease expires and edges route around the shard; the shard keeps trying and
//! rejoins (a new ring version) as soon as a renewal succeeds. Serving a group whose lease
//! was lost is harmless: Postgres still arbitrates every append.

use std::thread::JoinHandle;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::postgres::PgStore;
use crate::store::postgres_cluster::LeaseClaim;

/// Starts the lease thread. It registers the lease before returning (so a shard is on the
/// ring once it says it is listening) and drops it when `stop` is cancelled.
pub fn start(
    store: PgStore,
    claim: LeaseClaim,
    stop: CancellationToken,
) -> std::io::Result<JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Err(e) = rt.block_on(store.renew_lease(&claim)) {
        return Err(std::io::Error::other(format!(
            "registering the shard lease: {e}"
        )));
    }
    info!(node = %claim.node_id, address = %claim.address, "shard lease registered");
    std::thread::Builder::new()
        .name("qpq-lease".into())
        .spawn(move || rt.block_on(keep(store, claim, stop)))
}

async fn keep(store: PgStore, claim: LeaseClaim, stop: CancellationToken) {
    let every = (claim.ttl / 3).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
        match store.renew_lease(&claim).await {
            Ok(true) => info!(node = %claim.node_id, "shard lease re-registered (it had expired)"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "cannot renew the shard lease"),
        }
    }
    match store.drop_lease(&claim.node_id).await {
        Ok(()) => info!(node = %claim.node_id, "shard lease dropped"),
        Err(e) => warn!(error = %e, "cannot drop the shard lease; it will expire"),
    }
}
