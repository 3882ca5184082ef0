//! Push frames of one connection (ADR 0019): where a frame subscription's entries go, and the
//! acknowledgements (`PushAck` frames) that release its window.
//!
//! A frame carries one entry, encoded once per node for every subscriber of the group (the
//! encoding is cached on the published entry), so pushing to a subscriber costs its Noise seal
//! and a share of one coalesced socket write, with no call and no answer. The subscriber
//! acknowledges by sequence number, at its pace; its window (bytes of frames sent and not
//! acknowledged) is kept by [`super::push::Window`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use capnp::message::{Builder, ReaderOptions};
use quicproquo_core::TransportError;
use quicproquo_core::channel::PushHandler;
use quicproquo_core::mux::PushPort;
use quicproquo_proto::delivery_capnp::{push_ack, push_frame};
use tokio::sync::Notify;

use crate::model::group::{GroupId, LogEntry};
use crate::wire::codec::write_envelope;
use crate::wire::parse;

/// Words a `PushAck` may make the reader traverse (it holds a group id and a number).
const ACK_WORDS: usize = 64;
/// The longest push frame a peer may send (a `PushAck` of the longest group id is ~300 B).
pub const MAX_ACK_BYTES: usize = 1024;
/// Acknowledgements in a row that may release nothing (they name no subscription of the
/// connection, another subscription's tag, or nothing new) before the connection is closed.
/// A subscriber acknowledges only entries it took, so each of its acknowledgements releases
/// something, but for the few that cross the end of their subscription.
pub const MAX_IDLE_ACKS: u32 = 64;

/// How far a subscriber has acknowledged its frames.
#[derive(Default)]
pub(super) struct Acked {
    seq: Cell<u64>,
    moved: Notify,
}

impl Acked {
    /// The highest sequence number acknowledged.
    pub(super) fn seq(&self) -> u64 {
        self.seq.get()
    }

    /// Records an acknowledgement up to `seq`; whether it moved (an older one changes
    /// nothing).
    pub(super) fn advance(&self, seq: u64) -> bool {
        if seq > self.seq.get() {
            self.seq.set(seq);
            self.moved.notify_waiters();
            return true;
        }
        false
    }

    /// Resolves once the acknowledged sequence number is above `seq`.
    pub(super) async fn above(&self, seq: u64) {
        loop {
            let moved = self.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if self.seq.get() > seq {
                return;
            }
            moved.await;
        }
    }
}

/// The frame subscriptions of one connection, and its push port.
#[derive(Clone, Default)]
pub struct ConnectionFrames {
    inner: Rc<Inner>,
}

#[derive(Default)]
struct Inner {
    port: RefCell<Option<PushPort>>,
    /// Each frame subscription's tag and acknowledgements, by group.
    subscriptions: RefCell<HashMap<GroupId, (u64, Rc<Acked>)>>,
    /// Acknowledgements in a row that released nothing.
    idle_acks: Cell<u32>,
}

impl ConnectionFrames {
    /// Gives the connection's push port (once its channel is built).
    pub fn set_port(&self, port: PushPort) {
        *self.inner.port.borrow_mut() = Some(port);
    }

    /// The handler of the peer's push frames: each must be a well-formed `PushAck`, else the
    /// connection ends. An acknowledgement naming no frame subscription of the connection
    /// (one that just ended, or another tag) is ignored, but more than [`MAX_IDLE_ACKS`] in a
    /// row that release nothing end the connection: each costs a read and a decode.
    /// Frames longer than [`MAX_ACK_BYTES`] end the connection unread.
    pub fn ack_handler(&self) -> (PushHandler, usize) {
        let inner = Rc::clone(&self.inner);
        let handler: PushHandler = Box::new(move |frame| {
            let (group, seq, tag) =
                read_ack(&frame).map_err(|e| TransportError::Push(e.to_string()))?;
            let moved = match inner.subscriptions.borrow().get(&group) {
                Some((number, acked)) if *number == tag => acked.advance(seq),
                _ => false,
            };
            if moved {
                inner.idle_acks.set(0);
                return Ok(());
            }
            let idle = inner.idle_acks.get().saturating_add(1);
            inner.idle_acks.set(idle);
            if idle > MAX_IDLE_ACKS {
                return Err(TransportError::Push(format!(
                    "{idle} acknowledgements in a row released nothing"
                )));
            }
            Ok(())
        });
        (handler, MAX_ACK_BYTES)
    }

    /// Tells the subscriber that its `subscribeFrames` call naming `group` and `tag` was
    /// refused: the `ended` frame every such call is followed by. Nothing when the connection
    /// carries no push frames or is closing.
    pub(super) fn refused(&self, group: &[u8], tag: u64) {
        if let Some(port) = self.inner.port.borrow().as_ref() {
            // A closing connection needs no end.
            let _ = port.push(ended_frame(group, tag));
        }
    }

    /// Registers a frame subscription to `group`: its port and acknowledgements, until the
    /// returned registration drops. `None` when the connection has no push port or already
    /// holds a frame subscription to `group`.
    pub(super) fn register(&self, group: GroupId, tag: u64) -> Option<Registration> {
        let port = self.inner.port.borrow().clone()?;
        let mut subs = self.inner.subscriptions.borrow_mut();
        if subs.contains_key(&group) {
            return None;
        }
        let acked = Rc::new(Acked::default());
        subs.insert(group.clone(), (tag, Rc::clone(&acked)));
        Some(Registration {
            frames: self.clone(),
            group,
            tag,
            port,
            acked,
        })
    }
}

/// One frame subscription's place on its connection; unregisters on drop.
pub(super) struct Registration {
    frames: ConnectionFrames,
    group: GroupId,
    /// The subscriber's name for this subscription, echoed in its `ended` frame.
    pub(super) tag: u64,
    /// Where its frames go.
    pub(super) port: PushPort,
    /// What the subscriber acknowledged.
    pub(super) acked: Rc<Acked>,
}

impl Drop for Registration {
    /// Unregisters, and tells the subscriber that nothing more comes: the `ended` frame, sent
    /// however the subscription ends (removed, failed, released by the subscriber: its task
    /// is then cancelled, so this is the one place that sees every end). Nothing when the
    /// connection is closing (the subscriber is gone).
    fn drop(&mut self) {
        self.frames
            .inner
            .subscriptions
            .borrow_mut()
            .remove(&self.group);
        let _ = self.port.push(ended_frame(self.group.as_bytes(), self.tag));
    }
}

fn read_ack(frame: &[u8]) -> Result<(GroupId, u64, u64), capnp::Error> {
    let mut options = ReaderOptions::new();
    options.traversal_limit_in_words(Some(ACK_WORDS));
    let mut slice = frame;
    let message = capnp::serialize::read_message_from_flat_slice(&mut slice, options)?;
    let ack = message.get_root::<push_ack::Reader<'_>>()?;
    let group = parse::group_id(ack.get_group_id()?)?;
    Ok((group, ack.get_seq(), ack.get_tag()))
}

/// The push frame carrying `entry` of `group`.
pub(super) fn entry_frame(group: &GroupId, entry: &LogEntry) -> Arc<[u8]> {
    let mut message = Builder::new_default();
    let frame = message.init_root::<push_frame::Builder<'_>>();
    write_envelope(frame.init_entry(), group, entry);
    Arc::from(capnp::serialize::write_message_to_words(&message))
}

/// The push frame that ends the frame subscription to `group` the subscriber named `tag`.
pub(super) fn ended_frame(group: &[u8], tag: u64) -> Arc<[u8]> {
    let mut message = Builder::new_default();
    let frame = message.init_root::<push_frame::Builder<'_>>();
    let mut ended = frame.init_ended();
    ended.set_group_id(group);
    ended.set_tag(tag);
    Arc::from(capnp::serialize::write_message_to_words(&message))
}
