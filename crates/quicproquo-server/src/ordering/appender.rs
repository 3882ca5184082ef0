//! The appender: batched appends (group commit), publishing each new entry to the live feeds.
//!
//! Appends from every connection go through one appender task. It takes whatever requests are
//! waiting (up to [`MAX_BATCH`] requests and [`MAX_BATCH_BYTES`] bytes) and writes them in one
//! store transaction, so at low load a
//! request is written alone and at once, and under load many requests share one durable
//! commit. Only after the transaction commits are outcomes returned, and then entries published.
//!
//! Publishing is an optimisation: subscribers that miss entries (lagging, or a gap after a
//! restart) read them from the store, which stays the only truth.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use quicproquo_core::IdentityKey;

use quicproquo_telemetry::propagation::{self, LinkContext};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, warn};

use super::OrderingError;
use super::hub::Hub;
use super::views::{Checked, Views};
use crate::model::group::{AppendOutcome, AppendRequest, EntryKind, GroupId, LogEntry};
use crate::obs::Observer;
use crate::obs::metrics::AppendResult;
use crate::pool::CpuPool;
use crate::store::log::LogStore;
use crate::store::{AnyStore, StoreError};

/// Most requests written in one transaction. A transaction costs PostgreSQL a fixed part per
/// group it touches (the group's row lock, its membership reads, its row update) besides the
/// rows: under load, the more requests share it, the less that part weighs on each. At 256 a
/// shard with hundreds of senders waiting wrote full batches back to back; at 1024 it takes
/// everything waiting, and the benchmark's appends averaged 0.71 of `pgbench -M simple` rather
/// than 0.67 over 15 paired runs (`docs/benchmarks.md`). At low load a batch is whatever is
/// waiting, as before.
pub const MAX_BATCH: usize = 1024;
/// Most bytes of requests ([`AppendRequest::size`]) written in one transaction, far below
/// what PostgreSQL takes in one protocol message (1 GiB): a batch that reaches it is written
/// and the request that would pass it starts the next one. A request larger than this alone
/// (it cannot be: `max_message_bytes` is smaller) would still be written, alone.
pub const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;
/// Queued appends beyond which senders wait.
const QUEUE: usize = 8192;

type Reply = oneshot::Sender<Result<AppendOutcome, StoreError>>;
/// A queued append: the request, where to answer, and the span of the call that made it
/// (the batch's span is its child or links to it).
type Queued = (AppendRequest, Reply, Span);

/// The appender of one node (a shard, or a standalone node): owns the append queue and the
/// live feeds it publishes to.
pub struct Appender {
    store: AnyStore,
    views: Views,
    max_message_bytes: usize,
    queue: mpsc::Sender<Queued>,
    hub: Arc<Hub>,
    observer: Arc<Observer>,
}

impl std::fmt::Debug for Appender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appender").finish_non_exhaustive()
    }
}

impl Appender {
    /// Starts the appender on its own thread; it stops when `shutdown` is cancelled and the
    /// queue is drained.
    pub fn start(
        store: AnyStore,
        max_message_bytes: usize,
        observer: Arc<Observer>,
        (pool, max_cached_views): (CpuPool, usize),
        shutdown: CancellationToken,
    ) -> std::io::Result<(Arc<Self>, JoinHandle<()>)> {
        let (queue, rx) = mpsc::channel(QUEUE);
        let hub = Arc::new(Hub::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (appender_store, appender_hub, appender_observer) =
            (store.clone(), Arc::clone(&hub), Arc::clone(&observer));
        let thread = std::thread::Builder::new()
            .name("qpq-appender".into())
            .spawn(move || {
                rt.block_on(appender(
                    appender_store,
                    appender_hub,
                    appender_observer,
                    rx,
                    shutdown,
                ))
            })?;
        let shard = Self {
            views: Views::new(store.clone(), pool, Arc::clone(&observer), max_cached_views),
            store,
            max_message_bytes,
            queue,
            hub,
            observer,
        };
        Ok((Arc::new(shard), thread))
    }

    /// The largest message (with its Welcome) accepted.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// The store behind this appender.
    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// Appends one message; resolves once it is durable (or refused). A commit or proposal is
    /// verified against its group's public view first (see [`Views`]), one at a time per
    /// group.
    pub async fn append(&self, req: AppendRequest) -> Result<AppendOutcome, OrderingError> {
        req.check_size(self.max_message_bytes)?;
        if req.kind == EntryKind::Application {
            return self.enqueue(req).await;
        }
        // Boxed: the verification's future is kilobytes, and without the box every append's
        // future (an application message's too) would be as large, and copied as often.
        Box::pin(self.append_handshake(req)).await
    }

    /// Appends a commit or proposal once verified against its group's view.
    async fn append_handshake(&self, req: AppendRequest) -> Result<AppendOutcome, OrderingError> {
        let slot = self.views.slot(&req.group_id);
        let mut slot = slot.lock().await;
        let req = match self.views.check(&mut slot, req).await? {
            Checked::Outcome(outcome) => return Ok(outcome),
            Checked::PassThrough(req) => return self.enqueue(req).await,
            Checked::Verified(req) => req,
        };
        let outcome = self.enqueue(req).await;
        Views::settle(&mut slot, &outcome);
        outcome
    }

    /// The groups' public views.
    pub fn views(&self) -> &Views {
        &self.views
    }

    /// Queues one request for the next batch; resolves with its outcome.
    async fn enqueue(&self, req: AppendRequest) -> Result<AppendOutcome, OrderingError> {
        let closed = || OrderingError::Unavailable("the appender is shutting down".into());
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((req, tx, Span::current()))
            .await
            .map_err(|_| closed())?;
        Ok(rx.await.map_err(|_| closed())??)
    }

    /// Creates `group` with `creator` as its only member, and its public view built from the
    /// creator's GroupInfo.
    pub async fn create_group(
        &self,
        group: &GroupId,
        creator: &IdentityKey,
        group_info: Vec<u8>,
    ) -> Result<(), OrderingError> {
        let view = self.views.create(group, creator, group_info).await?;
        Ok(self
            .store
            .create_group_with_view(group, creator, Some(&view))
            .await?)
    }

    /// Handles `reporter`'s signed report of the commit at `seq` in `group` (ADR 0015):
    /// reverts the group to the epoch before it if the rules allow, with the group's view
    /// slot held.
    pub async fn report_commit(
        &self,
        group: &GroupId,
        reporter: &IdentityKey,
        seq: u64,
        report: &[u8],
    ) -> Result<super::revert::RevertMarker, OrderingError> {
        super::revert::Reporting {
            views: &self.views,
            store: &self.store,
            hub: &self.hub,
            observer: &self.observer,
        }
        .report(group, reporter, seq, report)
        .await
    }

    /// The live feeds the appender publishes to.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The metrics and redaction key this appender reports with.
    pub fn observer(&self) -> &Arc<Observer> {
        &self.observer
    }
}

/// The span of one append transaction: a child of the first request's call, linked to the
/// calls of the others (so each send's trace reaches the store, and a batch shows whom it
/// served).
fn batch_span(calls: &[Span]) -> Span {
    let parent = calls.first().and_then(Span::id);
    let span = tracing::info_span!(
        parent: parent,
        "shard.append_batch",
        otel.name = "appender batch",
        otel.kind = "internal",
        qpq.batch_size = calls.len(),
    );
    for call in calls.iter().skip(1) {
        propagation::link(&span, call);
    }
    span
}

fn result_of(outcome: &AppendOutcome) -> AppendResult {
    match outcome {
        AppendOutcome::Appended { .. } => AppendResult::Appended,
        AppendOutcome::Duplicate { .. } => AppendResult::Duplicate,
        AppendOutcome::StaleEpoch { .. } => AppendResult::StaleEpoch,
        _ => AppendResult::Refused,
    }
}

async fn appender(
    store: AnyStore,
    hub: Arc<Hub>,
    observer: Arc<Observer>,
    mut rx: mpsc::Receiver<Queued>,
    shutdown: CancellationToken,
) {
    let metrics = &observer.metrics;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // A request taken from the queue that did not fit the last batch's bytes: it starts the
    // next one.
    let mut carried: Option<Queued> = None;
    loop {
        let first = match carried.take() {
            Some(c) => Some(c),
            None => tokio::select! {
                biased;
                next = rx.recv() => next,
                () = shutdown.cancelled() => {
                    rx.close();
                    rx.recv().await
                }
            },
        };
        let Some(first) = first else { break };
        let mut bytes = first.0.size();
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => {
                    let size = next.0.size();
                    if bytes.saturating_add(size) > MAX_BATCH_BYTES {
                        carried = Some(next);
                        break;
                    }
                    bytes += size;
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        // Moved, not cloned: after the append each request becomes its published entry.
        let mut requests = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        let mut calls = Vec::with_capacity(batch.len());
        for (req, reply, call) in batch.drain(..) {
            requests.push(req);
            replies.push(reply);
            calls.push(call);
        }
        let span = batch_span(&calls);
        metrics.append_batch_size.observe(requests.len() as f64);
        let started = Instant::now();
        let result = store.append(&requests).instrument(span).await;
        metrics
            .append_batch_seconds
            .observe_duration(started.elapsed());
        match result {
            Ok(outcomes) => {
                let now = crate::store::embedded::now_micros();
                // Every answer goes before any entry is published. Publishing wakes the task
                // of every subscriber of the group; a worker thread runs the tasks woken from
                // here in the order they were woken, so an answer sent after them waited for
                // the whole fan-out on its sender's thread (a 1000-member group: milliseconds)
                // before its sender learnt the message was durable.
                let mut appended = Vec::with_capacity(requests.len());
                let answers = requests.into_iter().zip(replies).zip(calls);
                for (((req, reply), call), outcome) in answers.zip(outcomes) {
                    metrics.append(result_of(&outcome));
                    if let AppendOutcome::Appended { seq, .. } = &outcome {
                        appended.push((req, *seq, call));
                    }
                    let _ = reply.send(Ok(outcome));
                }
                for (req, seq, call) in appended {
                    if let Some(change) = &req.commit
                        && change.welcome.is_some()
                    {
                        hub.notify_inboxes(&change.added);
                    }
                    // The commit's membership effect goes with it to every subscriber,
                    // derived here once (from the verified commit) for all of them.
                    let removed: Option<Arc<[IdentityKey]>> = match (req.kind, &req.commit) {
                        (EntryKind::Commit, Some(change)) => {
                            Some(Arc::from(change.removed.as_slice()))
                        }
                        _ => None,
                    };
                    let entry = LogEntry {
                        seq,
                        epoch: req.epoch,
                        kind: req.kind,
                        message_id: req.message_id,
                        payload: req.payload,
                        appended_at_micros: now,
                    };
                    // The fan-out of this entry links back to the call that appended it.
                    hub.publish(&req.group_id, entry, LinkContext::of(&call), removed);
                }
            }
            Err(e) => {
                warn!(error = %e, size = replies.len(), "append batch failed");
                for reply in replies {
                    metrics.append(AppendResult::Failed);
                    let _ = reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
            }
        }
    }
}
