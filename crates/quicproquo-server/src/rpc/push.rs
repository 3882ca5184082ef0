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

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use futures::stream::{FuturesUnordered, StreamExt};

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

    /// A window of at most `max_bytes` of frames beyond what `acked` says was taken.
    pub(super) fn frames(max_bytes: usize, acked: Rc<Acked>) -> Self {
        Self {
            in_flight: InFlight::Frames {
                sent: VecDeque::new(),
                acked,
            },
            bytes: 0,
            max_bytes,
        }
    }

    /// Releases what was acknowledged (frames); how many batches were.
    fn release(&mut self) -> usize {
        let InFlight::Frames { sent, acked } = &mut self.in_flight else {
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

    /// Whether nothing is in flight.
    pub(super) fn is_idle(&mut self) -> bool {
        self.release();
        self.pushes() == 0
    }

    /// Whether a push of `bytes` may go now: always when nothing is in flight, otherwise while
    /// both budgets hold.
    pub(super) fn admits(&mut self, bytes: usize) -> bool {
        self.release();
        self.pushes() == 0
            || (self.pushes() < self.max_pushes()
                && self.bytes.saturating_add(bytes) <= self.max_bytes)
    }

    /// Whether no push at all may go before an answer.
    pub(super) fn is_full(&mut self) -> bool {
        self.release();
        self.pushes() != 0 && (self.pushes() >= self.max_pushes() || self.bytes >= self.max_bytes)
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

    /// Waits for the next answer (or acknowledgement) and releases its share of the window;
    /// the push's error if it failed. Never resolves while nothing is in flight (guard it with
    /// [`Window::is_idle`]).
    pub(super) async fn progress(&mut self) -> Result<(), capnp::Error> {
        match &mut self.in_flight {
            InFlight::Calls(calls) => match calls.next().await {
                Some((bytes, answer)) => {
                    self.bytes = self.bytes.saturating_sub(bytes);
                    answer
                }
                None => std::future::pending().await,
            },
            InFlight::Frames { sent, acked } => {
                let Some(&(seq, _)) = sent.front() else {
                    return std::future::pending().await;
                };
                let acked = Rc::clone(acked);
                acked.above(seq.saturating_sub(1)).await;
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
    use super::*;

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
    async fn frames_are_released_by_acknowledgements() -> Result<(), capnp::Error> {
        let acked = Rc::new(Acked::default());
        let mut w = Window::frames(100, Rc::clone(&acked));
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
        let (progressed, ()) = tokio::join!(w.progress(), async move { ack.advance(5) });
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
    async fn a_failed_push_is_reported() {
        let mut w = Window::new(100);
        w.sent(10, async { Err(capnp::Error::disconnected("gone".into())) });
        assert!(w.drain().await.is_err());
    }
}
