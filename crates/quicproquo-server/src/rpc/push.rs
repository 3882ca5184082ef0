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

use std::future::Future;
use std::pin::Pin;

use futures::stream::{FuturesUnordered, StreamExt};

/// Most pushes in flight (sent, not yet answered) to one subscriber.
pub(super) const MAX_PUSHES_IN_FLIGHT: usize = 8;

/// Entries that make a pending batch go out although earlier pushes are unanswered; below
/// this, entries wait for an answer and join the next push (fewer, larger pushes under load,
/// and an idle subscriber still gets each entry at once).
pub(super) const EAGER_ENTRIES: usize = 64;

type Answer = Pin<Box<dyn Future<Output = (usize, Result<(), capnp::Error>)>>>;

/// The pushes in flight to one subscriber.
pub(super) struct Window {
    in_flight: FuturesUnordered<Answer>,
    bytes: usize,
    max_bytes: usize,
}

impl Window {
    /// A window of at most `max_bytes` unanswered bytes (and [`MAX_PUSHES_IN_FLIGHT`] calls).
    pub(super) fn new(max_bytes: usize) -> Self {
        Self {
            in_flight: FuturesUnordered::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// Whether nothing is in flight.
    pub(super) fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Whether a push of `bytes` may go now: always when nothing is in flight, otherwise while
    /// both budgets hold.
    pub(super) fn admits(&self, bytes: usize) -> bool {
        self.in_flight.is_empty()
            || (self.in_flight.len() < MAX_PUSHES_IN_FLIGHT
                && self.bytes.saturating_add(bytes) <= self.max_bytes)
    }

    /// Whether no push at all may go before an answer.
    pub(super) fn is_full(&self) -> bool {
        !self.in_flight.is_empty()
            && (self.in_flight.len() >= MAX_PUSHES_IN_FLIGHT || self.bytes >= self.max_bytes)
    }

    /// Accounts a sent push of `bytes` until `answer` resolves.
    pub(super) fn sent(
        &mut self,
        bytes: usize,
        answer: impl Future<Output = Result<(), capnp::Error>> + 'static,
    ) {
        self.bytes = self.bytes.saturating_add(bytes);
        self.in_flight
            .push(Box::pin(async move { (bytes, answer.await) }));
    }

    /// Waits for the next answer and releases its share of the window; the push's error if it
    /// failed. Never resolves while nothing is in flight (guard it with [`Window::is_idle`]).
    pub(super) async fn progress(&mut self) -> Result<(), capnp::Error> {
        match self.in_flight.next().await {
            Some((bytes, answer)) => {
                self.bytes = self.bytes.saturating_sub(bytes);
                answer
            }
            None => std::future::pending().await,
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
        while !self.in_flight.is_empty() {
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
    async fn a_failed_push_is_reported() {
        let mut w = Window::new(100);
        w.sent(10, async { Err(capnp::Error::disconnected("gone".into())) });
        assert!(w.drain().await.is_err());
    }
}
