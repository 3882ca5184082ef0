//! A shard's lease: registered when the shard starts, renewed every third of its length,
//! dropped when the shard stops (so edges move its groups at once rather than at expiry).
//!
//! If renewals fail for longer than the lease (the database is unreachable, the process was
//! paused), the lease expires and edges route around the shard. While renewals fail the
//! shard tries again every [`RETRY_AFTER_FAILURE`] instead of waiting for the next regular
//! renewal, so it rejoins (a new ring version) as soon as the database answers: after an
//! outage longer than the lease, edges would otherwise see no live shard and refuse sends
//! until each shard's next renewal. Every attempt is bounded by the renewal period, so one
//! stuck on a dead connection cannot hold the next back. Serving a group whose lease was lost
//! is harmless: Postgres still arbitrates every append.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::postgres::PgStore;
use crate::store::postgres_cluster::LeaseClaim;

/// Pause before trying again after a renewal failed.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(100);

/// Shortest renewal period, whatever the lease.
const MIN_PERIOD: Duration = Duration::from_millis(50);

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

/// How often a healthy lease is renewed: a third of its length.
fn renewal_period(ttl: Duration) -> Duration {
    (ttl / 3).max(MIN_PERIOD)
}

/// A run of failed renewals, for logging: the first failure is a warning, later ones are
/// repeated at most once per renewal period, and the recovery says how long it took.
struct Failures {
    since: Instant,
    count: u32,
    last_warned: Instant,
}

async fn keep(store: PgStore, claim: LeaseClaim, stop: CancellationToken) {
    let period = renewal_period(claim.ttl);
    let mut wait = period;
    let mut failures: Option<Failures> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
        let error = match tokio::time::timeout(period, store.renew_lease(&claim)).await {
            Ok(Ok(rejoined)) => {
                if let Some(f) = failures.take() {
                    info!(node = %claim.node_id, failed_attempts = f.count,
                        after_ms = f.since.elapsed().as_millis() as u64,
                        "shard lease renewed again");
                }
                if rejoined {
                    info!(node = %claim.node_id, "shard lease re-registered (it had expired)");
                }
                wait = period;
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {period:?}"),
        };
        wait = RETRY_AFTER_FAILURE;
        let now = Instant::now();
        match &mut failures {
            None => {
                warn!(node = %claim.node_id, error = %error,
                    "cannot renew the shard lease; retrying every {RETRY_AFTER_FAILURE:?}");
                failures = Some(Failures {
                    since: now,
                    count: 1,
                    last_warned: now,
                });
            }
            Some(f) => {
                f.count += 1;
                if now.duration_since(f.last_warned) >= period {
                    f.last_warned = now;
                    warn!(node = %claim.node_id, error = %error, failed_attempts = f.count,
                        "still cannot renew the shard lease");
                } else {
                    debug!(node = %claim.node_id, error = %error, "shard lease renewal failed");
                }
            }
        }
    }
    match store.drop_lease(&claim.node_id).await {
        Ok(()) => info!(node = %claim.node_id, "shard lease dropped"),
        Err(e) => warn!(error = %e, "cannot drop the shard lease; it will expire"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_renewed_every_third_of_its_length_and_retried_sooner() {
        assert_eq!(
            renewal_period(Duration::from_secs(9)),
            Duration::from_secs(3)
        );
        assert_eq!(renewal_period(Duration::from_millis(30)), MIN_PERIOD);
        assert!(RETRY_AFTER_FAILURE < renewal_period(Duration::from_secs(1)));
    }
}
