//! What an edge serves to the shards it follows: the sinks their `watch` and `watchInboxes`
//! push into, which publish to the edge's hub for local subscribers.

use std::rc::Rc;
use std::sync::Arc;

use quicproquo_proto::cluster_capnp::{entry_sink, inbox_sink};
use quicproquo_telemetry::propagation::{LinkContext, WireContext};

use crate::obs::calls::InFlight;
use crate::obs::spans::trace_of;
use crate::ordering::hub::Hub;
use crate::wire::codec::read_entry;
use crate::wire::parse;

/// Receives a shard's pushed entries for one group and publishes them to local subscribers.
pub(super) struct EntrySink {
    pub(super) hub: Arc<Hub>,
    pub(super) calls: Rc<InFlight>,
}

impl entry_sink::Server for EntrySink {
    async fn deliver(
        self: Rc<Self>,
        params: entry_sink::DeliverParams,
        _: entry_sink::DeliverResults,
    ) -> Result<(), capnp::Error> {
        let calls = Rc::clone(&self.calls);
        calls
            .serve("EntrySink", "deliver", WireContext::default(), async move {
                self.publish(params.get()?)
            })
            .await
    }
}

impl EntrySink {
    fn publish(&self, p: entry_sink::deliver_params::Reader<'_>) -> Result<(), capnp::Error> {
        let group = parse::group_id(p.get_group_id()?)?;
        let entries = p.get_entries()?;
        // Present only when the shard traced some of these appends: one context per entry.
        let origins = if p.has_origins() {
            Some(p.get_origins()?)
        } else {
            None
        };
        for (i, e) in entries.iter().enumerate() {
            let origin = origins
                .filter(|o| i < o.len() as usize)
                .and_then(|o| LinkContext::from_wire(&trace_of(Ok(o.get(i as u32)))));
            self.hub.publish(&group, read_entry(e)?, origin);
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
