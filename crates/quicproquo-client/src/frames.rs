//! The subscriber's side of push frames (ADR 0019): a group subscription's entries arrive as
//! push frames beside RPC on the connection, one entry per frame, and are acknowledged by
//! sequence number so the server's window moves.
//!
//! Frames are decoded where the connection reads them (one decode per entry) and handed to
//! the group's [`Subscription`](crate::delivery::Subscription) through a channel. That channel
//! holds at most the server's window (what was not acknowledged), because the subscription
//! acknowledges only what its reader took.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use capnp::message::Builder;
use quicproquo_core::TransportError;
use quicproquo_core::channel::{ChannelLimits, PushHandler};
use quicproquo_core::mux::PushPort;
use quicproquo_core::rpc::reader_options;
use quicproquo_proto::delivery_capnp::{push_ack, push_frame};
use tokio::sync::mpsc;

use crate::delivery::{Envelope, read_envelope};

/// What a subscription's channel carries: pushed items, the bytes of the frames that carried
/// them and the last sequence number among them (0 when not acknowledged by frames).
pub(crate) struct Batch<T> {
    pub(crate) items: Vec<T>,
    pub(crate) bytes: usize,
    pub(crate) last_seq: u64,
}

/// A registered subscription: its number (the `tag` it is asked with: a later subscription to
/// the same group has another), the next sequence number it expects, and its channel.
struct Sender {
    number: u64,
    next: u64,
    tx: mpsc::UnboundedSender<Batch<Envelope>>,
}

/// The frame subscriptions of one connection, by group id.
#[derive(Clone, Default)]
pub(crate) struct ClientFrames {
    inner: Rc<Inner>,
}

#[derive(Default)]
struct Inner {
    port: RefCell<Option<PushPort>>,
    groups: RefCell<HashMap<Vec<u8>, Sender>>,
    registered: std::cell::Cell<u64>,
}

impl ClientFrames {
    /// Gives the connection's push port (once its channel is built).
    pub(crate) fn set_port(&self, port: PushPort) {
        *self.inner.port.borrow_mut() = Some(port);
    }

    /// The handler of the server's push frames: a malformed one ends the connection; one for a
    /// group with no subscription here (just dropped) is ignored.
    /// Frames up to the channel's largest are taken.
    pub(crate) fn handler(&self, limits: ChannelLimits) -> (PushHandler, usize) {
        let inner = Rc::clone(&self.inner);
        let options = reader_options(limits);
        let handler: PushHandler = Box::new(move |frame| {
            let bad = |e: &dyn std::fmt::Display| TransportError::Push(e.to_string());
            let mut slice = &frame[..];
            let message = capnp::serialize::read_message_from_flat_slice(&mut slice, options)
                .map_err(|e| bad(&e))?;
            let root = message
                .get_root::<push_frame::Reader<'_>>()
                .map_err(|e| bad(&e))?;
            match root.which().map_err(|e| bad(&e))? {
                push_frame::Entry(entry) => {
                    let entry = read_envelope(entry.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
                    let mut groups = inner.groups.borrow_mut();
                    if let Some(sub) = groups.get_mut(&entry.group_id)
                        // An entry it has (from an earlier subscription to the group whose
                        // frames were still coming) is not handed over twice.
                        && entry.seq >= sub.next
                    {
                        sub.next = entry.seq.saturating_add(1);
                        let last_seq = entry.seq;
                        let batch = Batch {
                            items: vec![entry],
                            bytes: frame.len(),
                            last_seq,
                        };
                        // A receiver that is gone unregisters itself.
                        let _ = sub.tx.send(batch);
                    }
                }
                push_frame::Ended(ended) => {
                    let ended = ended.map_err(|e| bad(&e))?;
                    let group = ended.get_group_id().map_err(|e| bad(&e))?;
                    let mut groups = inner.groups.borrow_mut();
                    if groups
                        .get(group)
                        .is_some_and(|s| s.number == ended.get_tag())
                    {
                        groups.remove(group);
                    }
                }
            }
            Ok(())
        });
        (handler, limits.max_frame_bytes)
    }

    /// Registers a frame subscription to `group` (before it is asked for: frames may come
    /// before the answer); `None` when one is registered already or the connection has no
    /// push port.
    /// The subscription reads after `after_seq`.
    pub(crate) fn register(
        &self,
        group: &[u8],
        after_seq: u64,
    ) -> Option<(Registration, mpsc::UnboundedReceiver<Batch<Envelope>>)> {
        let port = self.inner.port.borrow().clone()?;
        let mut groups = self.inner.groups.borrow_mut();
        if groups.contains_key(group) {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let number = self.inner.registered.get() + 1;
        self.inner.registered.set(number);
        groups.insert(
            group.to_vec(),
            Sender {
                number,
                next: after_seq.saturating_add(1),
                tx,
            },
        );
        Some((
            Registration {
                frames: self.clone(),
                number,
                group: group.to_vec(),
                port,
                every: usize::MAX,
                unacked: 0,
            },
            rx,
        ))
    }
}

/// A frame subscription's place on its connection and its acknowledgements; unregisters on
/// drop.
pub(crate) struct Registration {
    frames: ClientFrames,
    number: u64,
    group: Vec<u8>,
    port: PushPort,
    /// Acknowledge once this many bytes were taken since the last acknowledgement.
    every: usize,
    unacked: usize,
}

impl Registration {
    /// The subscription's `tag`.
    pub(crate) fn tag(&self) -> u64 {
        self.number
    }

    /// The server's window: acknowledge every quarter of it.
    pub(crate) fn set_window(&mut self, window_bytes: u64) {
        let window = usize::try_from(window_bytes).unwrap_or(usize::MAX);
        self.every = (window / 4).max(1);
    }

    /// The reader took `bytes` of frames, up to `last_seq`: acknowledges when a quarter of the
    /// window has been taken since the last acknowledgement.
    pub(crate) fn took(&mut self, bytes: usize, last_seq: u64) -> Result<(), TransportError> {
        self.unacked = self.unacked.saturating_add(bytes);
        if self.unacked < self.every {
            return Ok(());
        }
        self.unacked = 0;
        let mut message = Builder::new_default();
        let mut ack = message.init_root::<push_ack::Builder<'_>>();
        ack.set_group_id(&self.group);
        ack.set_seq(last_seq);
        self.port
            .push(Arc::from(capnp::serialize::write_message_to_words(
                &message,
            )))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut groups = self.frames.inner.groups.borrow_mut();
        if groups
            .get(&self.group)
            .is_some_and(|s| s.number == self.number)
        {
            groups.remove(&self.group);
        }
    }
}
