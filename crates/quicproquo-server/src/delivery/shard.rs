//! The shard side of the Delivery Service: batched appends (group commit) and the in-memory
//! fan-out of new entries to subscribers.
//!
//! Appends from every connection go through one appender task. It takes whatever requests are
//! waiting (up to [`MAX_BATCH`]) and writes them in one store transaction, so at low load a
//! request is written alone and at once, and under load many requests share one durable
//! commit. Only after the transaction commits are outcomes returned and entries published.
//!
//! Publishing is an optimisation: subscribers that miss entries (lagging, or a gap after a
//! restart) read them from the store, which stays the only truth.

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::hub::Hub;
use crate::store::log::{AppendOutcome, AppendRequest, LogEntry, LogStore};
use crate::store::{AnyStore, StoreError};

/// Most requests written in one transaction.
pub const MAX_BATCH: usize = 256;
/// Queued appends beyond which senders wait.
const QUEUE: usize = 8192;

type Reply = oneshot::Sender<Result<AppendOutcome, StoreError>>;

/// The Delivery Service shard: owns the appender and the live feeds.
pub struct Shard {
    store: AnyStore,
    max_message_bytes: usize,
    queue: mpsc::Sender<(AppendRequest, Reply)>,
    hub: Arc<Hub>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").finish_non_exhaustive()
    }
}

impl Shard {
    /// Starts the appender on its own thread; it stops when `shutdown` is cancelled and the
    /// queue is drained.
    pub fn start(
        store: AnyStore,
        max_message_bytes: usize,
        shutdown: CancellationToken,
    ) -> std::io::Result<(Arc<Self>, JoinHandle<()>)> {
        let (queue, rx) = mpsc::channel(QUEUE);
        let hub = Arc::new(Hub::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (appender_store, appender_hub) = (store.clone(), Arc::clone(&hub));
        let thread = std::thread::Builder::new()
            .name("qpq-appender".into())
            .spawn(move || rt.block_on(appender(appender_store, appender_hub, rx, shutdown)))?;
        let shard = Self {
            store,
            max_message_bytes,
            queue,
            hub,
        };
        Ok((Arc::new(shard), thread))
    }

    /// The largest message (with its Welcome) accepted.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// The store behind this shard.
    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// Appends one message; resolves once it is durable (or refused).
    pub async fn append(&self, req: AppendRequest) -> Result<AppendOutcome, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((req, tx))
            .await
            .map_err(|_| StoreError::Unavailable("the shard is shutting down".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the shard is shutting down".into()))?
    }

    /// The live feeds the appender publishes to.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }
}

async fn appender(
    store: AnyStore,
    hub: Arc<Hub>,
    mut rx: mpsc::Receiver<(AppendRequest, Reply)>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            biased;
            next = rx.recv() => next,
            () = shutdown.cancelled() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // Moved, not cloned: after the append each request becomes its published entry.
        let (requests, replies): (Vec<AppendRequest>, Vec<Reply>) = batch.drain(..).unzip();
        match store.append(&requests).await {
            Ok(outcomes) => {
                let now = crate::store::embedded::now_micros();
                for ((req, reply), outcome) in requests.into_iter().zip(replies).zip(outcomes) {
                    if let AppendOutcome::Appended { seq, .. } = outcome {
                        if let Some(change) = &req.commit
                            && change.welcome.is_some()
                        {
                            hub.notify_inboxes(&change.added);
                        }
                        hub.publish(
                            &req.group_id,
                            Arc::new(LogEntry {
                                seq,
                                epoch: req.epoch,
                                kind: req.kind,
                                message_id: req.message_id,
                                payload: req.payload,
                                appended_at_micros: now,
                            }),
                        );
                    }
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                warn!(error = %e, size = replies.len(), "append batch failed");
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
            }
        }
    }
}
