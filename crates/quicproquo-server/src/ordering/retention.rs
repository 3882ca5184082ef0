//! The retention job (ADR 0016): a background thread on each node that orders groups (a
//! standalone node, or a shard for the groups the ring gives it) that deletes, every
//! `retention_interval`, what [`crate::store::retention`] says may go, batch by batch, and
//! measures the bytes the store holds.
//!
//! Which groups a node owns is asked anew at each pass ([`Owned`]), so a shard that takes a
//! group over prunes it from its next pass on; two shards that briefly both believe they own
//! a group only repeat idempotent deletions. Welcomes and KeyPackages belong to no group: the
//! node that owns the shared part (the standalone node, or one shard chosen by the ring)
//! prunes them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::model::group::GroupId;
use crate::obs::Observer;
use crate::store::retention::{RetentionPolicy, RetentionStore};
use crate::store::{AnyStore, StoreError};

/// Groups looked at per candidate query.
const CANDIDATE_PAGE: usize = 512;

/// The retention job's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSettings {
    /// What may be deleted, and the batch size.
    pub policy: RetentionPolicy,
    /// Time between the end of one pass and the start of the next.
    pub interval: Duration,
}

/// What this node prunes in one pass.
pub struct Owned {
    /// Whether it prunes the Welcomes and KeyPackages (one node of the cluster does).
    pub shared: bool,
    /// Whether it owns a group's log.
    pub group: Box<dyn Fn(&GroupId) -> bool + Send + Sync>,
}

impl Owned {
    /// Everything: a standalone node.
    pub fn everything() -> Self {
        Self {
            shared: true,
            group: Box::new(|_| true),
        }
    }
}

impl std::fmt::Debug for Owned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owned")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

/// Asks which groups this node owns now.
pub type OwnedFuture = Pin<Box<dyn Future<Output = Result<Owned, StoreError>> + Send>>;

/// Starts the job on its own thread; it stops when `stop` is cancelled (between batches).
pub fn start(
    store: AnyStore,
    settings: RetentionSettings,
    observer: Arc<Observer>,
    owned: impl Fn() -> OwnedFuture + Send + 'static,
    stop: CancellationToken,
) -> std::io::Result<JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("qpq-retention".into())
        .spawn(move || rt.block_on(run(store, settings, observer, owned, stop)))
}

async fn run(
    store: AnyStore,
    settings: RetentionSettings,
    observer: Arc<Observer>,
    owned: impl Fn() -> OwnedFuture,
    stop: CancellationToken,
) {
    let job = Job {
        store: &store,
        policy: settings.policy,
        observer: &observer,
        stop: &stop,
    };
    loop {
        let stats = &observer.metrics.retention;
        match job.pass(&owned).await {
            Ok(Some(report)) => {
                stats.passes.fetch_add(1, Ordering::Relaxed);
                stats.last_pass.store(unix_now(), Ordering::Relaxed);
                if report.any() {
                    info!(
                        log_entries = report.log_entries,
                        welcomes = report.welcomes,
                        key_packages = report.key_packages,
                        "retention pass deleted old data"
                    );
                } else {
                    debug!("retention pass found nothing to delete");
                }
            }
            Ok(None) => break,
            Err(e) => {
                stats.failed_passes.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "retention pass stopped; the next one starts over");
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(settings.interval) => {}
        }
    }
}

/// Rows one pass deleted.
#[derive(Debug, Default, Clone, Copy)]
struct Report {
    log_entries: u64,
    welcomes: u64,
    key_packages: u64,
}

impl Report {
    fn any(&self) -> bool {
        self.log_entries + self.welcomes + self.key_packages > 0
    }
}

struct Job<'a> {
    store: &'a AnyStore,
    policy: RetentionPolicy,
    observer: &'a Observer,
    stop: &'a CancellationToken,
}

impl Job<'_> {
    /// One pass; `None` when stopped part way.
    async fn pass(&self, owned: &impl Fn() -> OwnedFuture) -> Result<Option<Report>, StoreError> {
        let owned = owned().await?;
        let stats = &self.observer.metrics.retention;
        let mut report = Report::default();
        let mut after: Option<GroupId> = None;
        loop {
            let page = self
                .store
                .retention_candidates(after.as_ref(), CANDIDATE_PAGE, &self.policy)
                .await?;
            for group in page.groups.iter().filter(|g| (owned.group)(g)) {
                let Some(n) = self
                    .drain(|| self.store.prune_group_log(group, &self.policy))
                    .await?
                else {
                    return Ok(None);
                };
                stats.log_entries.fetch_add(n, Ordering::Relaxed);
                report.log_entries += n;
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
            if self.stop.is_cancelled() {
                return Ok(None);
            }
        }
        if owned.shared {
            let Some(n) = self
                .drain(|| self.store.prune_welcomes(&self.policy))
                .await?
            else {
                return Ok(None);
            };
            stats.welcomes.fetch_add(n, Ordering::Relaxed);
            report.welcomes = n;
            let Some(n) = self
                .drain(|| self.store.prune_key_packages(self.policy.batch))
                .await?
            else {
                return Ok(None);
            };
            stats.key_packages.fetch_add(n, Ordering::Relaxed);
            report.key_packages = n;
        }
        let bytes = self.store.stored_bytes().await?;
        for (gauge, v) in stats.stored.iter().zip([
            bytes.group_log,
            bytes.welcomes,
            bytes.key_packages,
            bytes.group_views,
        ]) {
            gauge.store(v, Ordering::Relaxed);
        }
        Ok(Some(report))
    }

    /// Runs `batch` until it deletes less than a full batch; the rows deleted, or `None` when
    /// stopped part way.
    async fn drain<F>(&self, batch: impl Fn() -> F) -> Result<Option<u64>, StoreError>
    where
        F: Future<Output = Result<usize, StoreError>>,
    {
        let mut total = 0u64;
        loop {
            if self.stop.is_cancelled() {
                return Ok(None);
            }
            let n = batch().await?;
            total += n as u64;
            if n < self.policy.batch {
                return Ok(Some(total));
            }
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
