//! Flow control of pushes: a window of calls in flight to one subscriber, by count and by
//! bytes, released by the subscriber's answers (its progress), instead of one awaited round
//! trip per batch.
//!
//! A push goes out when the window admits it: always when nothing is in flight (so one entry
//! always fits, however large), otherwise while fewer than [`MAX_PUSHES_IN_FLIGHT`] calls and
//! at most the byte budget are unanswered. What a subscriber that stops reading can make this
//! node hold is therefore bounded by its window: the pushes in flight (each under the page
//! budget) and nothing else; whatever it has not been sent waits in the log, and it catches up
//! from the store once it answers again.
//!
//! A frame subscription ([`super::frames`]) has no answers: its window is the bytes of frames
//! sent beyond the subscriber's acknowledged sequence number, with no cap on their count.
//! Acknowledgements are the subscriber's word, and it could acknowledge frames it was never
//! sent (or not yet); so a frame also waits while the connection's push port holds a window's
//! worth of frames not yet taken by its writer. What the node holds for a subscriber then
//! stays within its window whatever it acknowledges.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use futures::stream::{FuturesUnordered, StreamExt};
use quicproquo_core::mux::PushPort;

use super::frames::Acked;

/// Most pushes in flight (sent, not yet answered) to one subscriber.
pub(super) const MAX_PUSHES_IN_FLIGHT: usize = 8;

/// Entries that make a pending batch go out although earlier pushes are unanswered; below
/// this, entries wait for an answer and join the next push (fewer, larger pushes under load,
/// and an idle subscriber still gets each entry at once).
pub(super) const EAGER_ENTRIES: usize = 64;

type Answer = Pin<Box<dyn Future<Output = (usize, Result<(), capnp::Error>)>>>;

/// What is in flight: calls awaiting answers, or frames awaiting an acknowledgement.
enum InFlight {
    Calls(FuturesUnordered<Answer>),
    Frames {
        /// The last sequence number and the bytes of each batch of frames sent.
        sent: VecDeque<(u64, usize)>,
        acked: Rc<Acked>,
        /// The connection's push port, whose queue must have room too.
        port: PushPort,
    },
}

/// The pushes in flight to one subscriber.
pub(super) struct Window {
    in_flight: InFlight,
    bytes: usize,
    max_bytes: usize,
}

impl Window {
    /// A window of at most `max_bytes` unanswered bytes (and [`MAX_PUSHES_IN_FLIGHT`] calls).
    pub(super) fn new(max_bytes: usize) -> Self {
        Self {
            in_flight: InFlight::Calls(FuturesUnordered::new()),
            bytes: 0,
            max_bytes,
        }
    }

    /// A window of at most `max_bytes` of frames beyond what `acked` says was taken, and
    /// beyond what `port` holds unwritten.
    pub(super) fn frames(max_bytes: usize, acked: Rc<Acked>, port: PushPort) -> Self {
        Self {
            in_flight: InFlight::Frames {
                sent: VecDeque::new(),
                acked,
                port,
            },
            bytes: 0,
            max_bytes,
        }
    }

    /// Releases what was acknowledged (frames); how many batches were.
    fn release(&mut self) -> usize {
        let InFlight::Frames { sent, acked, .. } = &mut self.in_flight else {
            return 0;
        };
        let acked = acked.seq();
        let mut released = 0;
        while let Some(&(seq, bytes)) = sent.front()
            && seq <= acked
        {
            sent.pop_front();
            self.bytes = self.bytes.saturating_sub(bytes);
            released += 1;
        }
        released
    }

    fn pushes(&self) -> usize {
        match &self.in_flight {
            InFlight::Calls(calls) => calls.len(),
            InFlight::Frames { sent, .. } => sent.len(),
        }
    }

    /// The most pushes in flight: calls are capped, frames only by bytes.
    fn max_pushes(&self) -> usize {
        match self.in_flight {
            InFlight::Calls(_) => MAX_PUSHES_IN_FLIGHT,
            InFlight::Frames { .. } => usize::MAX,
        }
    }

    /// Push frame bytes the connection holds unwritten (0 for calls).
    fn queued(&self) -> usize {
        match &self.in_flight {
            InFlight::Calls(_) => 0,
            InFlight::Frames { port, .. } => port.queued_bytes(),
        }
    }

    /// Whether nothing is in flight (and, for frames, the connection's queue has room).
    pub(super) fn is_idle(&mut self) -> bool {
        self.release();
        self.pushes() == 0 && self.queued() < self.max_bytes
    }

    /// Whether a push of `bytes` may go now: always when nothing is in flight, otherwise while
    /// both budgets hold; frames also need room in the connection's queue (an empty queue
    /// takes any one push).
    pub(super) fn admits(&mut self, bytes: usize) -> bool {
        self.release();
        let queued = self.queued();
        (queued == 0 || queued.saturating_add(bytes) <= self.max_bytes)
            && (self.pushes() == 0
                || (self.pushes() < self.max_pushes()
                    && self.bytes.saturating_add(bytes) <= self.max_bytes))
    }

    /// Whether no push at all may go before an answer (or, for frames, before the
    /// connection writes what it holds).
    pub(super) fn is_full(&mut self) -> bool {
        self.release();
        (self.pushes() != 0 && (self.pushes() >= self.max_pushes() || self.bytes >= self.max_bytes))
            || self.queued() >= self.max_bytes
    }

    /// Accounts frames of `bytes` sent up to `last_seq` until the subscriber acknowledges it.
    pub(super) fn sent_frames(&mut self, last_seq: u64, bytes: usize) {
        if let InFlight::Frames { sent, .. } = &mut self.in_flight {
            self.bytes = self.bytes.saturating_add(bytes);
            sent.push_back((last_seq, bytes));
        }
    }

    /// Accounts a sent push of `bytes` until `answer` resolves.
    pub(super) fn sent(
        &mut self,
        bytes: usize,
        answer: impl Future<Output = Result<(), capnp::Error>> + 'static,
    ) {
        if let InFlight::Calls(calls) = &mut self.in_flight {
            self.bytes = self.bytes.saturating_add(bytes);
            calls.push(Box::pin(async move { (bytes, answer.await) }));
        }
    }

    /// Waits for the next answer (or acknowledgement, or for frames the connection's writer
    /// taking what it holds) and releases its share of the window; the push's error if it
    /// failed. Never resolves while no call is in flight (guard it with [`Window::is_idle`]);
    /// for frames, resolves at once when nothing is in flight or queued.
    pub(super) async fn progress(&mut self) -> Result<(), capnp::Error> {
        match &mut self.in_flight {
            InFlight::Calls(calls) => match calls.next().await {
                Some((bytes, answer)) => {
                    self.bytes = self.bytes.saturating_sub(bytes);
                    answer
                }
                None => std::future::pending().await,
            },
            InFlight::Frames { sent, acked, port } => {
                let front = sent.front().map(|&(seq, _)| seq);
                if front.is_none() && port.queued_bytes() == 0 {
                    // Nothing to wait for: what held the window (the queue) is gone.
                    return Ok(());
                }
                let (acked, port) = (Rc::clone(acked), port.clone());
                let acknowledged = async {
                    match front {
                        Some(seq) => acked.above(seq.saturating_sub(1)).await,
                        None => std::future::pending().await,
                    }
                };
                // The connection's queue empties as the socket takes it.
                let written = async {
                    if port.queued_bytes() == 0 {
                        return std::future::pending().await;
                    }
                    port.written().await
                };
                tokio::select! {
                    () = acknowledged => {}
                    result = written => result.map_err(|e| {
                        capnp::Error::disconnected(format!("push frames not written: {e}"))
                    })?,
                }
                self.release();
                Ok(())
            }
        }
    }

    /// Waits until a push of `bytes` is admitted.
    pub(super) async fn reserve(&mut self, bytes: usize) -> Result<(), capnp::Error> {
        while !self.admits(bytes) {
            self.progress().await?;
        }
        Ok(())
    }

    /// Waits until every push in flight was answered.
    pub(super) async fn drain(&mut self) -> Result<(), capnp::Error> {
        while !self.is_idle() {
            self.progress().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::FutureExt;
    use quicproquo_core::channel::ChannelLimits;
    use quicproquo_core::mux::{Pump, RpcWriter, mux};
    use quicproquo_testkit::noise::{End, pair};
    use tokio::net::tcp::OwnedWriteHalf;

    use super::*;

    /// A node's push port on a real connection, with its pump and RPC writer (the pump ends
    /// once that is dropped) and the client's end, which reads nothing.
    async fn port() -> anyhow::Result<(PushPort, Pump<OwnedWriteHalf>, RpcWriter, End)> {
        let (client, (_, node_writer)) = pair(ChannelLimits::default()).await?;
        let (rpc, port, pump) = mux(node_writer);
        Ok((port, pump, rpc, client))
    }

    #[tokio::test]
    async fn one_push_always_fits_and_answers_release_the_window() -> Result<(), capnp::Error> {
        let mut w = Window::new(100);
        assert!(
            w.admits(1_000),
            "a push larger than the budget goes when idle"
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        w.sent(1_000, async move {
            rx.await
                .map_err(|_| capnp::Error::disconnected("gone".into()))
        });
        assert!(
            w.is_full() && !w.admits(1),
            "the window is full until the answer"
        );
        let _ = tx.send(());
        w.progress().await?;
        assert!(w.is_idle() && w.admits(100));
        for _ in 0..MAX_PUSHES_IN_FLIGHT {
            assert!(w.admits(1));
            w.sent(1, async { Ok(()) });
        }
        assert!(!w.admits(1), "at most MAX_PUSHES_IN_FLIGHT calls in flight");
        w.drain().await?;
        assert!(w.is_idle());
        Ok(())
    }

    #[tokio::test]
    async fn frames_are_released_by_acknowledgements() -> anyhow::Result<()> {
        let (port, _pump, _rpc, _client) = port().await?;
        let acked = Rc::new(Acked::default());
        let mut w = Window::frames(100, Rc::clone(&acked), port);
        assert!(w.admits(1_000), "one batch always fits");
        w.sent_frames(5, 60);
        assert!(w.admits(40) && !w.admits(41), "frames are capped by bytes");
        w.sent_frames(9, 40);
        assert!(w.is_full());
        acked.advance(4);
        assert!(
            w.is_full(),
            "an acknowledgement short of a batch releases nothing"
        );
        let ack = Rc::clone(&acked);
        let (progressed, _) = tokio::join!(w.progress(), async move { ack.advance(5) });
        progressed?;
        assert!(!w.is_full() && w.admits(60) && !w.admits(61));
        acked.advance(100);
        assert!(
            w.is_idle(),
            "an acknowledgement past the last batch releases all"
        );
        for seq in 10..10 + 2 * MAX_PUSHES_IN_FLIGHT as u64 {
            w.sent_frames(seq, 1);
        }
        assert!(w.admits(1), "frames are not capped by count");
        Ok(())
    }

    #[tokio::test]
    async fn acknowledging_unwritten_frames_releases_no_room() -> anyhow::Result<()> {
        let (port, pump, rpc, _client) = port().await?;
        let acked = Rc::new(Acked::default());
        let mut w = Window::frames(100, Rc::clone(&acked), port.clone());
        port.push(Arc::from(vec![0u8; 60]))?;
        w.sent_frames(1, 60);
        // The subscriber acknowledges what it cannot have read (nothing was written yet).
        assert!(acked.advance(u64::MAX));
        assert!(
            w.admits(40) && !w.admits(41),
            "the 60 bytes the connection holds still count"
        );
        port.push(Arc::from(vec![0u8; 40]))?;
        w.sent_frames(2, 40);
        assert!(
            w.is_full() && !w.is_idle() && !w.admits(1),
            "a window's worth held unwritten admits nothing"
        );
        assert!(
            w.progress().now_or_never().is_none(),
            "it waits for the writer, not for an acknowledgement"
        );
        // Once the writer has taken them, the window is open again.
        let (pumped, progressed) = tokio::join!(pump, async {
            let progressed = w.progress().await;
            let open = w.is_idle() && w.admits(100);
            drop(rpc);
            progressed.map(|()| open)
        });
        pumped?;
        assert!(progressed?, "written frames free the window");
        Ok(())
    }

    #[tokio::test]
    async fn a_failed_push_is_reported() {
        let mut w = Window::new(100);
        w.sent(10, async { Err(capnp::Error::disconnected("gone".into())) });
        assert!(w.drain().await.is_err());
    }
}
