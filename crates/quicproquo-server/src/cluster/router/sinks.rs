//! What an edge serves to the shards it follows: the sinks their `watch` and `watchInboxes`
//! push into, which publish to the edge's hub for local subscribers.
//!
//! Receiving a traced push is a span of its own (`EntrySink/deliver`, SERVER), the child of
//! the shard's push span, linked to the appends of the entries it brings: the middle link of
//! the fan-out chain shard push → edge reception → edge pushes to subscribers.

use std::rc::Rc;
use std::sync::Arc;

use quicproquo_core::IdentityKey;
use quicproquo_proto::cluster_capnp::{entry_sink, inbox_sink};
use quicproquo_proto::errors::{ErrorCode, error};
use quicproquo_telemetry::propagation::{self, LinkContext, WireContext};
use tracing::Span;

use super::followed::check_followed;
use crate::model::group::{GroupId, MAX_CHANGE};
use crate::obs::calls::InFlight;
use crate::obs::spans::{record_group, trace_of};
use crate::ordering::hub::Hub;
use crate::wire::codec::read_entry;
use crate::wire::parse;

/// Receives a shard's pushed entries for one group and publishes them to local subscribers.
pub(super) struct EntrySink {
    pub(super) hub: Arc<Hub>,
    pub(super) calls: Rc<InFlight>,
    /// The group this feed follows: pushes for any other are refused.
    pub(super) group: GroupId,
}

impl entry_sink::Server for EntrySink {
    async fn deliver(
        self: Rc<Self>,
        params: entry_sink::DeliverParams,
        _: entry_sink::DeliverResults,
    ) -> Result<(), capnp::Error> {
        let trace = params
            .get()
            .map_or_else(|_| WireContext::default(), pushed_by);
        let calls = Rc::clone(&self.calls);
        calls
            .serve("EntrySink", "deliver", trace, async move {
                self.publish(params.get()?)
            })
            .await
    }
}

/// The context of the shard's push: the element after the entries' own in `origins`, when
/// the shard traced the push (the receiving span becomes its child).
fn pushed_by(p: entry_sink::deliver_params::Reader<'_>) -> WireContext {
    let (Ok(entries), true) = (p.get_entries(), p.has_origins()) else {
        return WireContext::default();
    };
    match p.get_origins() {
        Ok(origins) if origins.len() == entries.len() + 1 => {
            trace_of(Ok(origins.get(entries.len())))
        }
        _ => WireContext::default(),
    }
}

/// A commit's position and the members it removed.
type Removal = (u64, Arc<[IdentityKey]>);

/// The membership effects of the batch's commits, checked: at most one per entry, each at
/// most [`MAX_CHANGE`] well-formed identities.
fn read_removals(
    p: &entry_sink::deliver_params::Reader<'_>,
    entries: u32,
) -> Result<Vec<Removal>, capnp::Error> {
    if !p.has_removals() {
        return Ok(Vec::new());
    }
    let list = p.get_removals()?;
    if list.len() > entries {
        return Err(error(
            ErrorCode::InvalidArgument,
            "more removals than entries",
        ));
    }
    list.iter()
        .map(|r| {
            let ids = parse::identities(r.get_identities()?, MAX_CHANGE)?;
            Ok((r.get_seq(), Arc::from(ids)))
        })
        .collect()
}

impl EntrySink {
    /// Publishes the pushed entries to local subscribers, inside the receiving span: it links
    /// to each traced entry's append, and each entry carries on both the append and this span
    /// for the pushes to subscribers to link to.
    fn publish(&self, p: entry_sink::deliver_params::Reader<'_>) -> Result<(), capnp::Error> {
        let group = parse::group_id(p.get_group_id()?)?;
        check_followed(&self.group, &group)?;
        let entries = p.get_entries()?;
        // Present only when the shard traced some of these appends: one context per entry.
        let origins = if p.has_origins() {
            Some(p.get_origins()?)
        } else {
            None
        };
        let appends: Vec<Option<LinkContext>> = (0..entries.len())
            .map(|i| {
                origins
                    .filter(|o| i < o.len())
                    .and_then(|o| LinkContext::from_wire(&trace_of(Ok(o.get(i)))))
            })
            .collect();
        let received = Span::current();
        record_group(&received, self.calls.observer(), group.as_bytes());
        received.record("messaging.system", "quicproquo");
        received.record("messaging.operation.name", "deliver");
        received.record("messaging.batch.message_count", i64::from(entries.len()));
        propagation::link_each(&received, appends.iter().map(Option::as_ref));
        let removals = read_removals(&p, entries.len())?;
        for (e, append) in entries.iter().zip(&appends) {
            let origin = LinkContext::through(append.as_ref(), &received);
            let entry = read_entry(e)?;
            let removed = removals
                .iter()
                .find(|(seq, _)| *seq == entry.seq)
                .map(|(_, ids)| Arc::clone(ids));
            self.hub.publish(&group, entry, origin, removed);
        }
        if p.get_resync() {
            self.hub.resync(&group);
        }
        Ok(())
    }
}

/// Receives a shard's inbox notifications.
pub(super) struct InboxSink {
    pub(super) hub: Arc<Hub>,
    pub(super) calls: Rc<InFlight>,
}

impl inbox_sink::Server for InboxSink {
    async fn notify(
        self: Rc<Self>,
        params: inbox_sink::NotifyParams,
        _: inbox_sink::NotifyResults,
    ) -> Result<(), capnp::Error> {
        let calls = Rc::clone(&self.calls);
        calls
            .serve("InboxSink", "notify", WireContext::default(), async move {
                self.publish(params.get()?.get_identities()?)
            })
            .await
    }
}

impl InboxSink {
    fn publish(&self, ids: capnp::data_list::Reader<'_>) -> Result<(), capnp::Error> {
        if ids.is_empty() {
            // The shard dropped notifications: every inbox must look.
            self.hub.resync_all_inboxes();
            return Ok(());
        }
        let identities = ids
            .iter()
            .map(|id| parse::identity(id?))
            .collect::<Result<Vec<_>, _>>()?;
        self.hub.notify_inboxes(&identities);
        Ok(())
    }
}
