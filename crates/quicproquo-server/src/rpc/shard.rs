//! The shard's internal interface: `ShardService`, served to cluster nodes only.
//!
//! `append` goes through the shard's appender (group commit), exactly like a standalone
//! node's own appends. `watch` pushes what this shard's appender publishes in pages (count
//! and bytes) under a window of pushes in flight released by the edge's answers
//! ([`super::push`]); `watchInboxes` one awaited call at a time. If the edge falls behind,
//! the shard tells it to resync instead of buffering without bound.
//!
//! A traced entry push carries, in `origins`, the context of each entry's append and, after
//! them, one more: the push's own, which the edge's receiving span takes as its parent.

use std::rc::Rc;
use std::sync::Arc;

use quicproquo_core::IdentityKey;
use quicproquo_proto::cluster_capnp::{entry_sink, inbox_sink, shard_service};
use quicproquo_telemetry::propagation;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tracing::{Instrument, debug};

use super::push::Window;
use super::subscribe::spawn;
use crate::model::group::GroupId;
use crate::model::page::{Page, entry_size};
use crate::obs::Observer;
use crate::obs::calls::InFlight;
use crate::obs::spans::{
    PushTarget, push_span, record_group, record_outcome, write_trace, write_wire,
};
use crate::ordering::Appender;
use crate::ordering::hub::{FeedEvent, Published};
use crate::wire::codec::{read_request, write_envelope, write_outcome};
use crate::wire::{ordering_error, parse};

/// Entries pushed per call at most.
const BATCH: u32 = 256;

/// `ShardService` for one connection from a cluster node.
pub(super) struct ShardServiceImpl {
    shard: Arc<Appender>,
    in_flight: Rc<InFlight>,
    /// The most one push to an edge carries: [`BATCH`] entries and this many bytes.
    page_bytes: usize,
}

impl ShardServiceImpl {
    pub(super) fn new(shard: Arc<Appender>, in_flight: Rc<InFlight>, page_bytes: usize) -> Self {
        Self {
            shard,
            in_flight,
            page_bytes,
        }
    }
}

impl shard_service::Server for ShardServiceImpl {
    async fn create_group(
        self: Rc<Self>,
        params: shard_service::CreateGroupParams,
        _: shard_service::CreateGroupResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "ShardService",
            "createGroup",
            params,
            async move {
                let p = params.get()?;
                let group = parse::group_id(p.get_group_id()?)?;
                let creator = parse::identity(p.get_creator()?)?;
                let group_info = p.get_group_info()?.to_vec();
                let observer = self.in_flight.observer();
                record_group(&tracing::Span::current(), observer, group.as_bytes());
                self.shard
                    .create_group(&group, &creator, group_info)
                    .await
                    .map_err(ordering_error)
            }
        )
    }

    async fn append(
        self: Rc<Self>,
        params: shard_service::AppendParams,
        mut results: shard_service::AppendResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "ShardService",
            "append",
            params,
            async move {
                let req = read_request(params.get()?.get_request()?)?;
                let observer = self.in_flight.observer();
                record_group(&tracing::Span::current(), observer, req.group_id.as_bytes());
                let outcome = self.shard.append(req).await.map_err(ordering_error)?;
                write_outcome(results.get().init_result(), outcome)
            }
        )
    }

    async fn report_commit(
        self: Rc<Self>,
        params: shard_service::ReportCommitParams,
        mut results: shard_service::ReportCommitResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "ShardService",
            "reportCommit",
            params,
            async move {
                let p = params.get()?;
                let group = parse::group_id(p.get_group_id()?)?;
                let reporter = parse::identity(p.get_reporter()?)?;
                let observer = self.in_flight.observer();
                record_group(&tracing::Span::current(), observer, group.as_bytes());
                let marker = self
                    .shard
                    .report_commit(&group, &reporter, p.get_seq(), p.get_report()?)
                    .await
                    .map_err(ordering_error)?;
                let mut r = results.get();
                r.set_revert_seq(marker.seq);
                r.set_epoch(marker.epoch);
                Ok(())
            }
        )
    }

    async fn watch(
        self: Rc<Self>,
        params: shard_service::WatchParams,
        mut results: shard_service::WatchResults,
    ) -> Result<(), capnp::Error> {
        serve!(self.in_flight, "ShardService", "watch", async move {
            let p = params.get()?;
            let group = parse::group_id(p.get_group_id()?)?;
            let sink = p.get_sink()?;
            let feed = self.shard.hub().group_feed(&group).0;
            let observer = Arc::clone(self.shard.observer());
            let page = Page::new(BATCH, self.page_bytes);
            let subscription = spawn(&self.in_flight, async move {
                if let Err(e) = push_group(&group, feed, &sink, &observer, page).await {
                    debug!(error = %e, "group watch ended");
                }
            });
            results.get().set_subscription(subscription);
            Ok(())
        })
    }

    async fn watch_inboxes(
        self: Rc<Self>,
        params: shard_service::WatchInboxesParams,
        mut results: shard_service::WatchInboxesResults,
    ) -> Result<(), capnp::Error> {
        serve!(self.in_flight, "ShardService", "watchInboxes", async move {
            let sink = params.get()?.get_sink()?;
            let feed = self.shard.hub().all_inboxes();
            let subscription = spawn(&self.in_flight, async move {
                if let Err(e) = push_inboxes(feed, &sink).await {
                    debug!(error = %e, "inbox watch ended");
                }
            });
            results.get().set_subscription(subscription);
            Ok(())
        })
    }
}

/// Pushes every inbox notification of this shard to an edge's sink, one awaited call at a
/// time; notifications dropped while the edge was behind become one "recheck all" (empty list).
async fn push_inboxes(
    mut feed: tokio::sync::broadcast::Receiver<Arc<Vec<IdentityKey>>>,
    sink: &inbox_sink::Client,
) -> Result<(), capnp::Error> {
    loop {
        let ids = match feed.recv().await {
            Ok(ids) => ids,
            // Whole batches were dropped: the edge cannot know whose, so it must recheck
            // every inbox. An empty list says exactly that.
            Err(RecvError::Lagged(_)) => Arc::new(Vec::new()),
            Err(RecvError::Closed) => return Ok(()),
        };
        let mut req = sink.notify_request();
        {
            let mut list = req.get().init_identities(ids.len() as u32);
            for (i, id) in ids.iter().enumerate() {
                list.set(i as u32, id.as_bytes());
            }
        }
        req.send().promise.await?;
    }
}

/// Pushes `group`'s feed to an edge's sink in pages of `page` (count and bytes), with a
/// window of pushes in flight released by the edge's answers; entries the feed dropped while
/// the edge was behind become a `resync` (the edge's subscribers read the log).
async fn push_group(
    group: &GroupId,
    mut feed: tokio::sync::broadcast::Receiver<FeedEvent>,
    sink: &entry_sink::Client,
    observer: &Observer,
    page: Page,
) -> Result<(), capnp::Error> {
    let mut window = Window::new(page.bytes);
    // An entry that did not fit on the last page: it starts the next.
    let mut carry: Option<Arc<Published>> = None;
    let mut resync = false;
    loop {
        // Take no more from the feed than the window can send.
        while window.is_full() {
            window.progress().await?;
        }
        let (mut batch, mut bytes): (Vec<Arc<Published>>, usize) = (Vec::new(), 0);
        if let Some(e) = carry.take() {
            bytes = entry_size(&e);
            batch.push(e);
        }
        if batch.is_empty() && !resync {
            tokio::select! {
                biased;
                answered = window.progress(), if !window.is_idle() => {
                    answered?;
                    continue;
                }
                event = feed.recv() => match event {
                    Ok(FeedEvent::Entry(e)) => {
                        bytes = entry_size(&e);
                        batch.push(e);
                    }
                    Ok(FeedEvent::Resync) | Err(RecvError::Lagged(_)) => resync = true,
                    Err(RecvError::Closed) => return window.drain().await,
                },
            }
        }
        while batch.len() < page.entries as usize {
            match feed.try_recv() {
                Ok(FeedEvent::Entry(e)) => {
                    let size = entry_size(&e);
                    if !page.admits(batch.len(), bytes, size) {
                        carry = Some(e);
                        break;
                    }
                    bytes += size;
                    batch.push(e);
                }
                Ok(FeedEvent::Resync) | Err(TryRecvError::Lagged(_)) => resync = true,
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        window.reserve(bytes).await?;
        let span = push_span(
            PushTarget::Edge,
            batch.len(),
            None,
            batch.iter().map(|e| e.origin.as_ref()),
        );
        record_group(&span, observer, group.as_bytes());
        let mut req = sink.deliver_request();
        {
            let mut p = req.get();
            p.set_group_id(group.as_bytes());
            p.set_resync(resync);
            let mut list = p.reborrow().init_entries(batch.len() as u32);
            for (i, e) in batch.iter().enumerate() {
                write_envelope(list.reborrow().get(i as u32), group, e);
            }
            // Each commit's membership effect, so the edge need not ask the store per
            // subscriber.
            let effects: Vec<(u64, &[IdentityKey])> = batch
                .iter()
                .filter_map(|e| e.removed.as_deref().map(|r| (e.seq, r)))
                .collect();
            if !effects.is_empty() {
                let mut removals = p.reborrow().init_removals(effects.len() as u32);
                for (i, (seq, removed)) in effects.iter().enumerate() {
                    let mut r = removals.reborrow().get(i as u32);
                    r.set_seq(*seq);
                    let mut ids = r.init_identities(removed.len() as u32);
                    for (j, id) in removed.iter().enumerate() {
                        ids.set(j as u32, id.as_bytes());
                    }
                }
            }
            // Only a traced push carries origins (one per entry, then the push's own
            // context), so an untraced push costs nothing more.
            if propagation::is_sampled(&span) || batch.iter().any(|e| e.origin.is_some()) {
                let mut origins = p.init_origins(batch.len() as u32 + 1);
                for (i, e) in batch.iter().enumerate() {
                    if let Some(origin) = &e.origin {
                        write_wire(origins.reborrow().get(i as u32), &origin.to_wire());
                    }
                }
                write_trace(origins.reborrow().get(batch.len() as u32), &span);
            }
        }
        resync = false;
        let answer = req.send().promise;
        window.sent(bytes, async move {
            let result = answer.instrument(span.clone()).await;
            record_outcome(&span, &result);
            result.map(drop)
        });
        observer.metrics.fanout(batch.len());
    }
}
