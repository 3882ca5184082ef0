//! The edge's upstream feeds: one `watch` per followed group on its current owner, one
//! `watchInboxes` per shard, each re-established (and local subscribers told to resync)
//! whenever the connection breaks or the owner changes.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use quicproquo_proto::cluster_capnp::{entry_sink, inbox_sink};
use tokio_util::sync::CancellationToken;

use super::State;
use super::sinks::{EntrySink, InboxSink};
use crate::model::group::GroupId;
use crate::store::postgres_cluster::ShardRecord;

/// Waits `delay`, or less if the ring changes; `false` when stopped.
async fn pause(state: &State, stop: &CancellationToken, delay: Duration) -> bool {
    let mut changed = state.ring_changed.subscribe();
    tokio::select! {
        () = stop.cancelled() => false,
        _ = changed.changed() => true,
        () = tokio::time::sleep(delay) => true,
    }
}

/// Keeps one upstream feed of `group` from its current owner until `stop`.
pub(super) async fn follow_group(state: Rc<State>, group: GroupId, stop: CancellationToken) {
    let mut ring = state.ring_changed.subscribe();
    while !stop.is_cancelled() {
        let Some(rec) = state.pick(group.as_bytes()) else {
            if !pause(&state, &stop, state.retry_delay()).await {
                return;
            }
            continue;
        };
        let Ok(link) = state.link(&rec).await else {
            if !pause(&state, &stop, state.retry_delay()).await {
                return;
            }
            continue;
        };
        let sink: entry_sink::Client = capnp_rpc::new_client(EntrySink {
            hub: Arc::clone(&state.hub),
            calls: Rc::clone(&state.calls),
            group: group.clone(),
        });
        let mut call = link.client.watch_request();
        call.get().set_group_id(group.as_bytes());
        call.get().set_sink(sink);
        let subscription = match call.send().promise.await {
            Ok(r) => r.get().and_then(|r| r.get_subscription()),
            Err(e) => Err(e),
        };
        let Ok(subscription) = subscription else {
            state.suspect(&rec.node_id);
            if !pause(&state, &stop, state.retry_delay()).await {
                return;
            }
            continue;
        };
        // Whatever was appended while no feed was held is in the log only.
        state.hub.resync(&group);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = link.closed() => {
                    state.suspect(&rec.node_id);
                    break;
                }
                r = ring.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let owner = state.pick(group.as_bytes()).map(|r| r.node_id);
                    if owner.as_deref() != Some(rec.node_id.as_str()) {
                        break;
                    }
                }
            }
        }
        drop(subscription);
    }
}

/// Keeps the inbox feed of shard `rec` until `stop`.
pub(super) async fn follow_inboxes(state: Rc<State>, rec: ShardRecord, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let Ok(link) = state.link(&rec).await else {
            if !pause(&state, &stop, state.retry_delay()).await {
                return;
            }
            continue;
        };
        let sink: inbox_sink::Client = capnp_rpc::new_client(InboxSink {
            hub: Arc::clone(&state.hub),
            calls: Rc::clone(&state.calls),
        });
        let mut call = link.client.watch_inboxes_request();
        call.get().set_sink(sink);
        let subscription = match call.send().promise.await {
            Ok(r) => r.get().and_then(|r| r.get_subscription()),
            Err(e) => Err(e),
        };
        let Ok(subscription) = subscription else {
            if !pause(&state, &stop, state.retry_delay()).await {
                return;
            }
            continue;
        };
        state.hub.resync_all_inboxes();
        tokio::select! {
            () = stop.cancelled() => return,
            () = link.closed() => {}
        }
        drop(subscription);
    }
}
