//! The client side of the Delivery Service.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use quicproquo_core::IdentityKey;
use quicproquo_proto::delivery_capnp::{
    delivery_service, inbox_stream, message_stream, send_result, subscription, welcome,
};
use quicproquo_proto::envelope_capnp::envelope;
use tokio::sync::mpsc;

use crate::frames::{ASKED_WINDOW_BYTES, Batch, ClientFrames, Registration};
use crate::trace::{rpc_span, traced, write_trace};
use crate::wire::{read_group_id, read_identities};
use crate::{ClientError, call_error, timed};

/// What kind of message an envelope holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeKind {
    /// An application message.
    Application,
    /// A commit.
    Commit,
    /// A proposal.
    Proposal,
    /// A revert marker written by the server (ADR 0015): the group went back to the epoch
    /// before the commit the payload (a member's signed report) names; the envelope's epoch is
    /// the group's epoch after the revert.
    Revert,
}

/// One entry of a group's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The group.
    pub group_id: Vec<u8>,
    /// Position in the group's log.
    pub seq: u64,
    /// The epoch from the message's framing.
    pub epoch: u64,
    /// The kind of message.
    pub kind: EnvelopeKind,
    /// The sender's message id.
    pub message_id: Vec<u8>,
    /// The serialized MLS message.
    pub payload: Vec<u8>,
    /// Server time of the append (Unix microseconds).
    pub appended_at_micros: u64,
}

/// A group as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group.
    pub group_id: Vec<u8>,
    /// Its epoch.
    pub epoch: u64,
    /// The last sequence number appended.
    pub last_seq: u64,
    /// Current members.
    pub members: Vec<IdentityKey>,
    /// Our acknowledged cursor.
    pub cursor: u64,
}

/// A Welcome from our inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Position in our inbox.
    pub seq: u64,
    /// The group.
    pub group_id: Vec<u8>,
    /// The commit that added us: read the group after it.
    pub commit_seq: u64,
    /// The serialized Welcome.
    pub welcome: Vec<u8>,
}

/// The result of a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Appended at `seq`; the group is at `epoch`.
    Appended {
        /// Sequence number.
        seq: u64,
        /// Epoch after the append.
        epoch: u64,
    },
    /// Already appended (a retry) at `seq`.
    Duplicate {
        /// The first append's sequence number.
        seq: u64,
    },
    /// Our handshake message lost the epoch.
    StaleEpoch {
        /// The group's epoch.
        current_epoch: u64,
        /// The winning commit's sequence number.
        winner_seq: u64,
    },
}

/// What travels with a commit: the Welcome for the members it adds and the new epoch's
/// GroupInfo. The server derives the membership change from the commit itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitParts {
    /// The Welcome for the added members.
    pub welcome: Option<Vec<u8>>,
    /// The new epoch's GroupInfo (an MLSMessage), signed by the committer.
    pub group_info: Vec<u8>,
}

pub(crate) fn read_envelope(e: envelope::Reader<'_>) -> Result<Envelope, ClientError> {
    Ok(Envelope {
        group_id: read_group_id(e.get_group_id())?,
        seq: e.get_seq(),
        epoch: e.get_epoch(),
        kind: match e
            .get_kind()
            .map_err(|_| ClientError::Rpc(capnp::Error::failed("unknown kind".into())))?
        {
            envelope::Kind::Commit => EnvelopeKind::Commit,
            envelope::Kind::Proposal => EnvelopeKind::Proposal,
            envelope::Kind::Revert => EnvelopeKind::Revert,
            _ => EnvelopeKind::Application,
        },
        message_id: e.get_message_id().map_err(call_error)?.to_vec(),
        payload: e.get_payload().map_err(call_error)?.to_vec(),
        appended_at_micros: e.get_appended_at_micros(),
    })
}

fn read_welcome(w: welcome::Reader<'_>) -> Result<Welcome, ClientError> {
    Ok(Welcome {
        seq: w.get_seq(),
        group_id: read_group_id(w.get_group_id())?,
        commit_seq: w.get_commit_seq(),
        welcome: w.get_welcome().map_err(call_error)?.to_vec(),
    })
}

/// Receives pushed batches and forwards them to a channel.
struct StreamSink(mpsc::UnboundedSender<Batch<Envelope>>);

fn batch<T>(items: Vec<T>) -> Batch<T> {
    Batch {
        items,
        bytes: 0,
        last_seq: 0,
    }
}

impl message_stream::Server for StreamSink {
    async fn deliver(
        self: Rc<Self>,
        params: message_stream::DeliverParams,
        _: message_stream::DeliverResults,
    ) -> Result<(), capnp::Error> {
        let list = params.get()?.get_entries()?;
        let mut entries = Vec::with_capacity(list.len() as usize);
        for e in list.iter() {
            entries.push(read_envelope(e).map_err(|e| capnp::Error::failed(e.to_string()))?);
        }
        self.0
            .send(batch(entries))
            .map_err(|_| capnp::Error::disconnected("subscriber went away".into()))
    }
}

struct InboxSink(mpsc::UnboundedSender<Batch<Welcome>>);

impl inbox_stream::Server for InboxSink {
    async fn deliver(
        self: Rc<Self>,
        params: inbox_stream::DeliverParams,
        _: inbox_stream::DeliverResults,
    ) -> Result<(), capnp::Error> {
        let list = params.get()?.get_welcomes()?;
        let welcomes = list
            .iter()
            .map(read_welcome)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        self.0
            .send(batch(welcomes))
            .map_err(|_| capnp::Error::disconnected("subscriber went away".into()))
    }
}

/// Most items [`Subscription::next`] returns at once.
const MAX_BATCH: usize = 1024;

/// A live subscription; dropping it ends the subscription on the server.
pub struct Subscription<T> {
    rx: mpsc::UnboundedReceiver<Batch<T>>,
    /// A frame subscription's registration and acknowledgements (`None`: pushed as calls).
    frames: Option<Registration>,
    _cap: subscription::Client,
}

impl<T> std::fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl<T> Subscription<T> {
    /// The next pushed batch (everything that has arrived, up to 1024 items); `None` once the
    /// subscription has ended.
    pub async fn next(&mut self) -> Option<Vec<T>> {
        let first = self.rx.recv().await?;
        let (mut items, mut bytes, mut last_seq) = (first.items, first.bytes, first.last_seq);
        while items.len() < MAX_BATCH {
            let Ok(more) = self.rx.try_recv() else {
                break;
            };
            items.extend(more.items);
            bytes += more.bytes;
            last_seq = last_seq.max(more.last_seq);
        }
        if let Some(frames) = &mut self.frames {
            // A connection that can no longer take acknowledgements is over: the channel
            // ends once what arrived is taken.
            let _ = frames.took(bytes, last_seq);
        }
        Some(items)
    }
}

/// The Delivery Service, scoped to the identity the session is bound to.
#[derive(Clone)]
pub struct DeliveryClient {
    cap: delivery_service::Client,
    addr: SocketAddr,
    timeout: Duration,
    frames: ClientFrames,
}

impl std::fmt::Debug for DeliveryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl DeliveryClient {
    pub(crate) fn new(
        cap: delivery_service::Client,
        addr: SocketAddr,
        timeout: Duration,
        frames: ClientFrames,
    ) -> Self {
        Self {
            cap,
            addr,
            timeout,
            frames,
        }
    }

    /// Registers a new group with us as its only member. `group_info` is the group's GroupInfo
    /// at epoch 0 with its ratchet tree (`Group::group_info`): the server builds its public
    /// view of the group from it.
    pub async fn create_group(
        &self,
        group_id: &[u8],
        group_info: &[u8],
    ) -> Result<(), ClientError> {
        let span = rpc_span(self.addr, "DeliveryService", "createGroup");
        let mut req = self.cap.create_group_request();
        write_trace(req.get().init_trace(), &span);
        req.get().set_group_id(group_id);
        req.get().set_group_info(group_info);
        let call = timed(self.addr, self.timeout, "create group", req.send().promise);
        traced(&span, call).await?;
        Ok(())
    }

    /// The group's latest GroupInfo as the server verified it, and its epoch (members only).
    pub async fn group_info(&self, group_id: &[u8]) -> Result<(Vec<u8>, u64), ClientError> {
        let span = rpc_span(self.addr, "DeliveryService", "groupInfo");
        let mut req = self.cap.group_info_request();
        write_trace(req.get().init_trace(), &span);
        req.get().set_group_id(group_id);
        let call = timed(self.addr, self.timeout, "group info", req.send().promise);
        let resp = traced(&span, call).await?;
        let r = resp.get().map_err(call_error)?;
        let info = r.get_group_info().map_err(call_error)?.to_vec();
        Ok((info, r.get_epoch()))
    }

    /// Reports that the commit at `seq` cannot be processed, with the caller's signed report
    /// (`quicproquo_core::report`). Returns the seq of the revert marker and the group's epoch
    /// after the revert (also when an earlier report already reverted it); a refusal comes
    /// back as `report_refused` naming the rule.
    pub async fn report_commit(
        &self,
        group_id: &[u8],
        seq: u64,
        report: &[u8],
    ) -> Result<(u64, u64), ClientError> {
        let span = rpc_span(self.addr, "DeliveryService", "reportCommit");
        let mut req = self.cap.report_commit_request();
        write_trace(req.get().init_trace(), &span);
        req.get().set_group_id(group_id);
        req.get().set_seq(seq);
        req.get().set_report(report);
        let call = timed(self.addr, self.timeout, "report commit", req.send().promise);
        let resp = traced(&span, call).await?;
        let r = resp.get().map_err(call_error)?;
        Ok((r.get_revert_seq(), r.get_epoch()))
    }

    /// Appends an MLS message (with its membership change when it is a commit).
    pub async fn send(
        &self,
        group_id: &[u8],
        message_id: &[u8],
        message: &[u8],
        commit: Option<&CommitParts>,
    ) -> Result<SendOutcome, ClientError> {
        let span = rpc_span(self.addr, "DeliveryService", "send");
        span.record("messaging.system", "quicproquo");
        span.record("messaging.operation.type", "send");
        span.record("messaging.message.body.size", message.len());
        let mut req = self.cap.send_request();
        {
            let mut p = req.get();
            write_trace(p.reborrow().init_trace(), &span);
            p.set_group_id(group_id);
            p.set_message_id(message_id);
            p.set_message(message);
            if let Some(c) = commit {
                let mut ci = p.init_commit();
                if let Some(w) = &c.welcome {
                    ci.set_welcome(w);
                }
                ci.set_group_info(&c.group_info);
            }
        }
        let call = timed(self.addr, self.timeout, "send", req.send().promise);
        let resp = traced(&span, call).await?;
        let result = resp
            .get()
            .map_err(call_error)?
            .get_result()
            .map_err(call_error)?;
        match result.which().map_err(|e| ClientError::Rpc(e.into()))? {
            send_result::Appended(a) => {
                let a = a.map_err(call_error)?;
                Ok(SendOutcome::Appended {
                    seq: a.get_seq(),
                    epoch: a.get_epoch(),
                })
            }
            send_result::Duplicate(seq) => Ok(SendOutcome::Duplicate { seq }),
            send_result::StaleEpoch(s) => {
                let s = s.map_err(call_error)?;
                Ok(SendOutcome::StaleEpoch {
                    current_epoch: s.get_current_epoch(),
                    winner_seq: s.get_winner_seq(),
                })
            }
        }
    }

    /// Up to `limit` entries after `after_seq`.
    pub async fn fetch(
        &self,
        group_id: &[u8],
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<Envelope>, ClientError> {
        let span = rpc_span(self.addr, "DeliveryService", "fetch");
        let mut req = self.cap.fetch_request();
        {
            let mut p = req.get();
            write_trace(p.reborrow().init_trace(), &span);
            p.set_group_id(group_id);
            p.set_after_seq(after_seq);
            p.set_limit(limit);
        }
        let call = timed(self.addr, self.timeout, "fetch", req.send().promise);
        let resp = traced(&span, call).await?;
        let list = resp
            .get()
            .map_err(call_error)?
            .get_entries()
            .map_err(call_error)?;
        list.iter().map(read_envelope).collect()
    }

    /// Stores our cursor for `group_id`.
    pub async fn acknowledge(&self, group_id: &[u8], seq: u64) -> Result<(), ClientError> {
        let span = rpc_span(self.addr, "DeliveryService", "acknowledge");
        let mut req = self.cap.acknowledge_request();
        write_trace(req.get().init_trace(), &span);
        req.get().set_group_id(group_id);
        req.get().set_seq(seq);
        let call = timed(self.addr, self.timeout, "acknowledge", req.send().promise);
        traced(&span, call).await?;
        Ok(())
    }

    /// The groups we are a member of.
    pub async fn groups(&self) -> Result<Vec<GroupInfo>, ClientError> {
        let span = rpc_span(self.addr, "DeliveryService", "groups");
        let mut req = self.cap.groups_request();
        write_trace(req.get().init_trace(), &span);
        let call = timed(self.addr, self.timeout, "groups", req.send().promise);
        let resp = traced(&span, call).await?;
        let list = resp
            .get()
            .map_err(call_error)?
            .get_groups()
            .map_err(call_error)?;
        let mut out = Vec::with_capacity(list.len() as usize);
        for g in list.iter() {
            out.push(GroupInfo {
                group_id: read_group_id(g.get_group_id())?,
                epoch: g.get_epoch(),
                last_seq: g.get_last_seq(),
                members: read_identities(g.get_members())?,
                cursor: g.get_cursor(),
            });
        }
        Ok(out)
    }

    /// Up to `limit` Welcomes after `after_seq` from our inbox.
    pub async fn inbox(&self, after_seq: u64, limit: u32) -> Result<Vec<Welcome>, ClientError> {
        let span = rpc_span(self.addr, "DeliveryService", "inbox");
        let mut req = self.cap.inbox_request();
        write_trace(req.get().init_trace(), &span);
        req.get().set_after_seq(after_seq);
        req.get().set_limit(limit);
        let call = timed(self.addr, self.timeout, "inbox", req.send().promise);
        let resp = traced(&span, call).await?;
        let list = resp
            .get()
            .map_err(call_error)?
            .get_welcomes()
            .map_err(call_error)?;
        list.iter().map(read_welcome).collect()
    }

    /// Pushes entries of `group_id` after `after_seq`, then new ones as they are appended, as
    /// push frames beside RPC (one subscription per group per connection: a dropped one's end
    /// is awaited first). A server that pushes beyond the window it granted loses the
    /// connection.
    pub async fn subscribe(
        &self,
        group_id: &[u8],
        after_seq: u64,
    ) -> Result<Subscription<Envelope>, ClientError> {
        // Registered first: the server may push before it answers.
        let registered = self.frames.register(group_id, after_seq);
        let (mut registration, rx) =
            timed(self.addr, self.timeout, "subscribe", registered).await?;
        let span = rpc_span(self.addr, "DeliveryService", "subscribeFrames");
        let mut req = self.cap.subscribe_frames_request();
        {
            let mut p = req.get();
            write_trace(p.reborrow().init_trace(), &span);
            p.set_group_id(group_id);
            p.set_after_seq(after_seq);
            p.set_tag(registration.tag());
            p.set_window_bytes(ASKED_WINDOW_BYTES);
        }
        let call = timed(self.addr, self.timeout, "subscribe", req.send().promise);
        let resp = traced(&span, call).await?;
        let r = resp.get().map_err(call_error)?;
        registration
            .set_window(r.get_window_bytes())
            .map_err(ClientError::Rpc)?;
        Ok(Subscription {
            rx,
            frames: Some(registration),
            _cap: r.get_subscription().map_err(call_error)?,
        })
    }

    /// Like [`Self::subscribe`], with each batch pushed as a `MessageStream.deliver` call
    /// answered by this client (the protocol before push frames; kept for comparison and for
    /// servers without them).
    pub async fn subscribe_calls(
        &self,
        group_id: &[u8],
        after_seq: u64,
    ) -> Result<Subscription<Envelope>, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink: message_stream::Client = capnp_rpc::new_client(StreamSink(tx));
        let span = rpc_span(self.addr, "DeliveryService", "subscribe");
        let mut req = self.cap.subscribe_request();
        {
            let mut p = req.get();
            write_trace(p.reborrow().init_trace(), &span);
            p.set_group_id(group_id);
            p.set_after_seq(after_seq);
            p.set_stream(sink);
        }
        let call = timed(self.addr, self.timeout, "subscribe", req.send().promise);
        let resp = traced(&span, call).await?;
        let cap = resp
            .get()
            .map_err(call_error)?
            .get_subscription()
            .map_err(call_error)?;
        Ok(Subscription {
            rx,
            frames: None,
            _cap: cap,
        })
    }

    /// Pushes Welcomes after `after_seq`, then new ones as they arrive.
    pub async fn subscribe_inbox(
        &self,
        after_seq: u64,
    ) -> Result<Subscription<Welcome>, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink: inbox_stream::Client = capnp_rpc::new_client(InboxSink(tx));
        let span = rpc_span(self.addr, "DeliveryService", "subscribeInbox");
        let mut req = self.cap.subscribe_inbox_request();
        write_trace(req.get().init_trace(), &span);
        req.get().set_after_seq(after_seq);
        req.get().set_stream(sink);
        let call = timed(
            self.addr,
            self.timeout,
            "subscribe inbox",
            req.send().promise,
        );
        let resp = traced(&span, call).await?;
        let cap = resp
            .get()
            .map_err(call_error)?
            .get_subscription()
            .map_err(call_error)?;
        Ok(Subscription {
            rx,
            frames: None,
            _cap: cap,
        })
    }
}
