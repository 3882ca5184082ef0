//! The shard's side of the internal interface: `ShardService`, served to cluster nodes only.
//!
//! `append` goes through the shard's appender (group commit), exactly like a standalone
//! node's own appends. `watch` and `watchInboxes` push what this shard's appender publishes,
//! batched, one awaited call at a time (flow control); if the edge falls behind, the shard
//! tells it to resync instead of buffering without bound.

use std::rc::Rc;
use std::sync::Arc;

use quicproquo_core::IdentityKey;
use quicproquo_proto::cluster_capnp::{entry_sink, shard_service};
use quicproquo_proto::errors::{ErrorCode, error};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tracing::debug;

use super::wire::{read_request, write_outcome};
use crate::delivery::hub::FeedEvent;
use crate::delivery::shard::Shard;
use crate::delivery::subscribe::spawn;
use crate::delivery::{log_error, write_envelope};
use crate::ops::Observer;
use crate::ops::spans::trace_of;
use crate::rpc::InFlight;
use crate::store::log::{GroupId, LogEntry, LogStore};

/// Entries pushed per call at most.
const BATCH: usize = 256;

/// `ShardService` for one connection from a cluster node.
pub(crate) struct ShardServiceImpl {
    shard: Arc<Shard>,
    in_flight: Rc<InFlight>,
}

impl ShardServiceImpl {
    pub(crate) fn new(shard: Arc<Shard>, in_flight: Rc<InFlight>) -> Self {
        Self { shard, in_flight }
    }
}

fn group_id(bytes: &[u8]) -> Result<GroupId, capnp::Error> {
    GroupId::new(bytes).map_err(log_error)
}

impl shard_service::Server for ShardServiceImpl {
    async fn create_group(
        self: Rc<Self>,
        params: shard_service::CreateGroupParams,
        _: shard_service::CreateGroupResults,
    ) -> Result<(), capnp::Error> {
        let trace = trace_of(params.get().and_then(|p| p.get_trace()));
        let in_flight = Rc::clone(&self.in_flight);
        in_flight
            .serve("ShardService", "createGroup", trace, async move {
                let p = params.get()?;
                let group = group_id(p.get_group_id()?)?;
                let creator = IdentityKey::from_slice(p.get_creator()?)
                    .map_err(|e| error(ErrorCode::InvalidArgument, e))?;
                self.shard
                    .store()
                    .create_group(&group, &creator)
                    .await
                    .map_err(log_error)
            })
            .await
    }

    async fn append(
        self: Rc<Self>,
        params: shard_service::AppendParams,
        mut results: shard_service::AppendResults,
    ) -> Result<(), capnp::Error> {
        let trace = trace_of(params.get().and_then(|p| p.get_trace()));
        let in_flight = Rc::clone(&self.in_flight);
        in_flight
            .serve("ShardService", "append", trace, async move {
                let req = read_request(params.get()?.get_request()?)?;
                tracing::Span::current().record(
                    "qpq.group",
                    self.in_flight
                        .observer()
                        .redactor
                        .hash(req.group_id.as_bytes()),
                );
                if req.payload.len() > self.shard.max_message_bytes() {
                    return Err(error(ErrorCode::TooLarge, "message too large"));
                }
                let outcome = self.shard.append(req).await.map_err(log_error)?;
                write_outcome(results.get().init_result(), outcome)
            })
            .await
    }

    async fn watch(
        self: Rc<Self>,
        params: shard_service::WatchParams,
        mut results: shard_service::WatchResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let group = group_id(p.get_group_id()?)?;
        let sink = p.get_sink()?;
        let feed = self.shard.hub().group_feed(&group).0;
        let observer = Arc::clone(self.shard.observer());
        let subscription = spawn(move |_| async move {
            if let Err(e) = push_group(&group, feed, &sink, &observer).await {
                debug!(error = %e, "group watch ended");
            }
        });
        results.get().set_subscription(subscription);
        Ok(())
    }

    async fn watch_inboxes(
        self: Rc<Self>,
        params: shard_service::WatchInboxesParams,
        mut results: shard_service::WatchInboxesResults,
    ) -> Result<(), capnp::Error> {
        let sink = params.get()?.get_sink()?;
        let mut feed = self.shard.hub().all_inboxes();
        let subscription = spawn(move |_| async move {
            loop {
                let ids = match feed.recv().await {
                    Ok(ids) => ids,
                    // Whole batches were dropped: the edge cannot know whose, so it must
                    // recheck every inbox. An empty list says exactly that.
                    Err(RecvError::Lagged(_)) => Arc::new(Vec::new()),
                    Err(RecvError::Closed) => return,
                };
                let mut req = sink.notify_request();
                {
                    let mut list = req.get().init_identities(ids.len() as u32);
                    for (i, id) in ids.iter().enumerate() {
                        list.set(i as u32, id.as_bytes());
                    }
                }
                if let Err(e) = req.send().promise.await {
                    debug!(error = %e, "inbox watch ended");
                    return;
                }
            }
        });
        results.get().set_subscription(subscription);
        Ok(())
    }
}

async fn push_group(
    group: &GroupId,
    mut feed: tokio::sync::broadcast::Receiver<FeedEvent>,
    sink: &entry_sink::Client,
    observer: &Observer,
) -> Result<(), capnp::Error> {
    loop {
        let mut resync = false;
        let mut batch: Vec<Arc<LogEntry>> = Vec::new();
        match feed.recv().await {
            Ok(FeedEvent::Entry(e)) => batch.push(e),
            Ok(FeedEvent::Resync) | Err(RecvError::Lagged(_)) => resync = true,
            Err(RecvError::Closed) => return Ok(()),
        }
        while batch.len() < BATCH {
            match feed.try_recv() {
                Ok(FeedEvent::Entry(e)) => batch.push(e),
                Ok(FeedEvent::Resync) | Err(TryRecvError::Lagged(_)) => resync = true,
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        let mut req = sink.deliver_request();
        {
            let mut p = req.get();
            p.set_group_id(group.as_bytes());
            p.set_resync(resync);
            let mut list = p.init_entries(batch.len() as u32);
            for (i, e) in batch.iter().enumerate() {
                write_envelope(list.reborrow().get(i as u32), group, e);
            }
        }
        req.send().promise.await?;
        observer.metrics.fanout(batch.len());
    }
}
