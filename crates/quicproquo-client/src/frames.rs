//! The subscriber's side of push frames (ADR 0019): a group subscription's entries arrive as
//! push frames beside RPC on the connection, one entry per frame, and are acknowledged by
//! sequence number so the server's window moves.
//!
//! Frames are decoded where the connection reads them (one decode per entry) and handed to
//! the group's [`Subscription`](crate::delivery::Subscription) through a channel. The server
//! is not trusted to keep its window: a subscription asks for at most [`ASKED_WINDOW_BYTES`],
//! counts the bytes of the frames it received beyond its last acknowledgement, and a server
//! that pushes more than the window it granted (or, before its answer, the window asked)
//! ends its connection. The channel therefore holds at most that window, because the
//! subscription acknowledges only what its reader took.
//!
//! Every `subscribeFrames` call is followed by one `ended` frame naming its tag. A
//! subscription dropped here waits for it ("draining"), and a new subscription to the same
//! group on the connection is registered only after it: no frame of the old one can be taken
//! for the new one's (their entries carry no tag).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use capnp::message::Builder;
use quicproquo_core::TransportError;
use quicproquo_core::channel::{ChannelLimits, PushHandler};
use quicproquo_core::mux::PushPort;
use quicproquo_core::rpc::reader_options;
use quicproquo_proto::delivery_capnp::{push_ack, push_frame};
use tokio::sync::{Notify, mpsc};

use crate::delivery::{Envelope, read_envelope};

/// The window a frame subscription asks for: the most bytes of entry frames the server may
/// send beyond what it acknowledged, and so the most its channel holds.
pub(crate) const ASKED_WINDOW_BYTES: u64 = 4 * 1024 * 1024;

/// What a subscription's channel carries: pushed items, the bytes of the frames that carried
/// them and the last sequence number among them (0 when not acknowledged by frames).
pub(crate) struct Batch<T> {
    pub(crate) items: Vec<T>,
    pub(crate) bytes: usize,
    pub(crate) last_seq: u64,
}

/// A registered subscription: its number (the `tag` it is asked with: a later subscription to
/// the same group has another), the next sequence number it expects, its channel (`None` once
/// dropped here: it drains until its `ended` frame), its window and the bytes of the frames
/// it received beyond its last acknowledgement.
struct Sender {
    number: u64,
    next: u64,
    tx: Option<mpsc::UnboundedSender<Batch<Envelope>>>,
    window: usize,
    outstanding: usize,
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
    registered: Cell<u64>,
    /// Woken when a subscription ends (its `ended` frame came).
    ended: Notify,
}

impl ClientFrames {
    /// Gives the connection's push port (once its channel is built).
    pub(crate) fn set_port(&self, port: PushPort) {
        *self.inner.port.borrow_mut() = Some(port);
    }

    /// The handler of the server's push frames: a malformed one, or an entry beyond its
    /// subscription's window, ends the connection; one for a group with no live subscription
    /// here (one dropped, draining) is ignored.
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
                        && let Some(tx) = &sub.tx
                        // An entry it was given is not handed over twice.
                        && entry.seq >= sub.next
                    {
                        // The server sends one frame however large when nothing is
                        // unacknowledged, and otherwise stays within the window.
                        let outstanding = sub.outstanding.saturating_add(frame.len());
                        if sub.outstanding > 0 && outstanding > sub.window {
                            return Err(TransportError::Push(format!(
                                "the server pushed {outstanding} bytes beyond the last \
                                 acknowledgement, over its window of {}",
                                sub.window
                            )));
                        }
                        sub.outstanding = outstanding;
                        sub.next = entry.seq.saturating_add(1);
                        let last_seq = entry.seq;
                        let batch = Batch {
                            items: vec![entry],
                            bytes: frame.len(),
                            last_seq,
                        };
                        // A reader that is gone drops its registration.
                        let _ = tx.send(batch);
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
                        inner.ended.notify_waiters();
                    }
                }
            }
            Ok(())
        });
        (handler, limits.max_frame_bytes)
    }

    /// Registers a frame subscription to `group` (before it is asked for: frames may come
    /// before the answer), reading after `after_seq`. Waits while an earlier subscription to
    /// the group drains (until its `ended` frame). Refused when one is live, or when the
    /// connection has no push port.
    pub(crate) async fn register(
        &self,
        group: &[u8],
        after_seq: u64,
    ) -> Result<(Registration, mpsc::UnboundedReceiver<Batch<Envelope>>), capnp::Error> {
        let port =
            self.inner.port.borrow().clone().ok_or_else(|| {
                capnp::Error::failed("this connection carries no push frames".into())
            })?;
        loop {
            let ended = self.inner.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            match self.inner.groups.borrow().get(group) {
                None => break,
                Some(sub) if sub.tx.is_some() => {
                    return Err(capnp::Error::failed(
                        "this connection already holds a subscription to the group".into(),
                    ));
                }
                Some(_) => {}
            }
            if port.is_closed() {
                return Err(capnp::Error::disconnected("the connection closed".into()));
            }
            ended.await;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let number = self.inner.registered.get() + 1;
        self.inner.registered.set(number);
        let window = usize::try_from(ASKED_WINDOW_BYTES).unwrap_or(usize::MAX);
        self.inner.groups.borrow_mut().insert(
            group.to_vec(),
            Sender {
                number,
                next: after_seq.saturating_add(1),
                tx: Some(tx),
                window,
                outstanding: 0,
            },
        );
        Ok((
            Registration {
                frames: self.clone(),
                number,
                group: group.to_vec(),
                port,
                every: window / 4,
                unacked: 0,
            },
            rx,
        ))
    }

    /// Runs `f` on the live subscription `number` to `group`, if it still is.
    fn live<R>(&self, group: &[u8], number: u64, f: impl FnOnce(&mut Sender) -> R) -> Option<R> {
        let mut groups = self.inner.groups.borrow_mut();
        groups
            .get_mut(group)
            .filter(|s| s.number == number && s.tx.is_some())
            .map(f)
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

    /// The window the server granted: from now on the bound on what it may send beyond the
    /// last acknowledgement; acknowledge every quarter of it. Refused when more than asked.
    pub(crate) fn set_window(&mut self, window_bytes: u64) -> Result<(), capnp::Error> {
        if window_bytes > ASKED_WINDOW_BYTES {
            return Err(capnp::Error::failed(format!(
                "the server granted a window of {window_bytes} bytes, more than the \
                 {ASKED_WINDOW_BYTES} asked"
            )));
        }
        // It fits: it is no more than what was asked, which does.
        let window = usize::try_from(window_bytes).unwrap_or(usize::MAX);
        self.frames
            .live(&self.group, self.number, |s| s.window = window);
        self.every = (window / 4).max(1);
        Ok(())
    }

    /// The reader took `bytes` of frames, up to `last_seq`: acknowledges when a quarter of the
    /// window has been taken since the last acknowledgement (not once the subscription
    /// ended: no acknowledgement can then reach it).
    pub(crate) fn took(&mut self, bytes: usize, last_seq: u64) -> Result<(), TransportError> {
        self.unacked = self.unacked.saturating_add(bytes);
        if self.unacked < self.every {
            return Ok(());
        }
        let acked = std::mem::take(&mut self.unacked);
        let live = self.frames.live(&self.group, self.number, |s| {
            s.outstanding = s.outstanding.saturating_sub(acked);
        });
        if live.is_none() {
            return Ok(());
        }
        let mut message = Builder::new_default();
        let mut ack = message.init_root::<push_ack::Builder<'_>>();
        ack.set_group_id(&self.group);
        ack.set_seq(last_seq);
        ack.set_tag(self.number);
        self.port
            .push(Arc::from(capnp::serialize::write_message_to_words(
                &message,
            )))
    }
}

impl Drop for Registration {
    /// The subscription drains until its `ended` frame: what still comes of it is dropped.
    fn drop(&mut self) {
        self.frames.live(&self.group, self.number, |s| s.tx = None);
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::pin::Pin;
    use std::rc::Rc;

    use anyhow::{Result, bail};
    use futures::FutureExt;
    use quicproquo_core::mux::mux;
    use quicproquo_proto::envelope_capnp::envelope;
    use quicproquo_testkit::noise::pair;
    use tokio::io::AsyncReadExt;

    use super::*;

    const GROUP: &[u8] = b"group-of-sixteen";

    /// An acknowledgement as the node read it: group, seq, tag.
    type Ack = (Vec<u8>, u64, u64);

    /// The push frame carrying entry `seq` of `group` with a payload of `payload` bytes.
    fn entry(group: &[u8], seq: u64, payload: usize) -> Vec<u8> {
        let mut message = Builder::new_default();
        let mut e = message.init_root::<push_frame::Builder<'_>>().init_entry();
        e.set_group_id(group);
        e.set_seq(seq);
        e.set_epoch(1);
        e.set_kind(envelope::Kind::Application);
        e.set_message_id(&[7; 16]);
        e.set_payload(&vec![0xA5; payload]);
        capnp::serialize::write_message_to_words(&message)
    }

    /// The push frame ending subscription `tag` to `group`.
    fn ended(group: &[u8], tag: u64) -> Vec<u8> {
        let mut message = Builder::new_default();
        let mut e = message.init_root::<push_frame::Builder<'_>>().init_ended();
        e.set_group_id(group);
        e.set_tag(tag);
        capnp::serialize::write_message_to_words(&message)
    }

    /// Frame subscriptions on the client end of a real connection, their handler, and
    /// what the node end receives as acknowledgements (group, seq, tag) once `finish` runs.
    struct Conn {
        frames: ClientFrames,
        handler: PushHandler,
        finish: Pin<Box<dyn Future<Output = Result<Vec<Ack>>>>>,
    }

    async fn conn() -> Result<Conn> {
        let limits = ChannelLimits::default();
        let ((_, client_writer), (mut node_reader, _node_writer)) = pair(limits).await?;
        let (rpc, port, pump) = mux(client_writer);
        let frames = ClientFrames::default();
        frames.set_port(port);
        let (handler, _) = frames.handler(limits);
        let acks: Rc<RefCell<Vec<Ack>>> = Rc::default();
        let into = Rc::clone(&acks);
        node_reader.on_push(
            Box::new(move |frame| {
                let mut slice = &frame[..];
                let message = capnp::serialize::read_message_from_flat_slice(
                    &mut slice,
                    capnp::message::ReaderOptions::new(),
                )
                .map_err(|e| TransportError::Push(e.to_string()))?;
                let ack = message
                    .get_root::<push_ack::Reader<'_>>()
                    .map_err(|e| TransportError::Push(e.to_string()))?;
                let group = ack
                    .get_group_id()
                    .map_err(|e| TransportError::Push(e.to_string()))?;
                into.borrow_mut()
                    .push((group.to_vec(), ack.get_seq(), ack.get_tag()));
                Ok(())
            }),
            1024,
        );
        // Ends the client's writing side once what is queued is written, and reads the
        // node's end to its close.
        let finish = Box::pin(async move {
            drop(rpc);
            let mut rest = Vec::new();
            let (pumped, read) = tokio::join!(pump, node_reader.read_to_end(&mut rest));
            pumped?;
            read?;
            if !rest.is_empty() {
                bail!("the client wrote {} bytes of RPC stream", rest.len());
            }
            Ok(acks.take())
        });
        Ok(Conn {
            frames,
            handler,
            finish,
        })
    }

    #[tokio::test]
    async fn a_server_pushing_beyond_its_window_loses_the_connection() -> Result<()> {
        let mut c = conn().await?;
        let (mut registration, _rx) = c.frames.register(GROUP, 0).await?;
        let len = entry(GROUP, 1, 300).len();
        registration.set_window((2 * len + len / 2) as u64)?;
        (c.handler)(entry(GROUP, 1, 300))?;
        (c.handler)(entry(GROUP, 2, 300))?;
        assert!(
            matches!(
                (c.handler)(entry(GROUP, 3, 300)),
                Err(TransportError::Push(_))
            ),
            "a third frame overruns a window of two and a half"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_window_goes_alone() -> Result<()> {
        let mut c = conn().await?;
        let (mut registration, _rx) = c.frames.register(GROUP, 0).await?;
        registration.set_window(1000)?;
        (c.handler)(entry(GROUP, 1, 5000))?;
        assert!(
            (c.handler)(entry(GROUP, 2, 10)).is_err(),
            "nothing may follow it before an acknowledgement"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_window_beyond_the_one_asked_is_refused() -> Result<()> {
        let c = conn().await?;
        let (mut registration, _rx) = c.frames.register(GROUP, 0).await?;
        assert!(registration.set_window(ASKED_WINDOW_BYTES + 1).is_err());
        assert!(registration.set_window(ASKED_WINDOW_BYTES).is_ok());
        Ok(())
    }

    #[tokio::test]
    async fn acknowledgements_free_the_window_and_name_the_subscription() -> Result<()> {
        let mut c = conn().await?;
        let (mut registration, mut rx) = c.frames.register(GROUP, 0).await?;
        let len = entry(GROUP, 1, 300).len();
        registration.set_window((2 * len) as u64)?;
        let tag = registration.tag();
        (c.handler)(entry(GROUP, 1, 300))?;
        (c.handler)(entry(GROUP, 2, 300))?;
        let (mut bytes, mut last) = (0, 0);
        for _ in 0..2 {
            let Some(batch) = rx.recv().await else {
                bail!("the subscription ended");
            };
            bytes += batch.bytes;
            last = batch.last_seq;
        }
        assert_eq!((bytes, last), (2 * len, 2));
        registration.took(bytes, last)?;
        (c.handler)(entry(GROUP, 3, 300))?;
        (c.handler)(entry(GROUP, 4, 300))?;
        drop((registration, rx));
        let acks = (c.finish).await?;
        assert_eq!(
            acks,
            vec![(GROUP.to_vec(), 2, tag)],
            "one acknowledgement, of both"
        );
        Ok(())
    }

    #[tokio::test]
    async fn an_entry_is_handed_over_once_and_an_end_names_its_subscription() -> Result<()> {
        let mut c = conn().await?;
        let (registration, mut rx) = c.frames.register(GROUP, 5).await?;
        (c.handler)(entry(GROUP, 5, 10))?;
        (c.handler)(entry(GROUP, 6, 10))?;
        (c.handler)(entry(GROUP, 6, 10))?;
        (c.handler)(entry(b"another-group-16", 7, 10))?;
        (c.handler)(ended(GROUP, registration.tag() + 1))?;
        let Some(batch) = rx.recv().await else {
            bail!("an end naming another subscription ended this one");
        };
        assert_eq!(batch.items.iter().map(|e| e.seq).collect::<Vec<_>>(), [6]);
        assert!(rx.try_recv().is_err(), "seq 5 is before it, 6 came twice");
        (c.handler)(ended(GROUP, registration.tag()))?;
        assert!(rx.recv().await.is_none(), "its end closes it");
        Ok(())
    }

    #[tokio::test]
    async fn a_new_subscription_waits_for_the_dropped_ones_end() -> Result<()> {
        let mut c = conn().await?;
        let (first, rx) = c.frames.register(GROUP, 0).await?;
        assert!(
            c.frames.register(GROUP, 0).await.is_err(),
            "one live subscription per group"
        );
        let tag = first.tag();
        drop((first, rx));
        let mut second = Box::pin(c.frames.register(GROUP, 0));
        assert!(second.as_mut().now_or_never().is_none(), "it drains");
        // What still comes of the first is dropped, beyond any window.
        for seq in 1..=4 {
            (c.handler)(entry(GROUP, seq, 3 * ASKED_WINDOW_BYTES as usize / 8))?;
        }
        assert!(second.as_mut().now_or_never().is_none());
        (c.handler)(ended(GROUP, tag))?;
        let (registration, mut rx) = second.await?;
        assert_ne!(registration.tag(), tag);
        (c.handler)(entry(GROUP, 1, 10))?;
        let Some(batch) = rx.recv().await else {
            bail!("the second subscription ended");
        };
        assert_eq!(batch.last_seq, 1, "the second reads from its own start");
        Ok(())
    }
}
