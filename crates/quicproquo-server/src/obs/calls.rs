//! Calls in flight on one connection: every served method of every interface runs through
//! [`InFlight::serve`], which counts it (so a drain can wait for it), runs it inside its server
//! span and records its status and latency.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use quicproquo_telemetry::propagation::WireContext;
use tokio::sync::Notify;

use super::{Observer, spans};

/// Counts calls in progress on one connection, so a drain can wait for them, and observes
/// each call (its span, metrics) through the server's [`Observer`].
#[derive(Debug)]
pub struct InFlight {
    calls: Cell<usize>,
    idle: Notify,
    observer: Arc<Observer>,
    /// When the last call started or finished (the connection's last sign of use).
    last_call: Cell<Instant>,
    /// Subscriptions this connection holds open.
    subscriptions: Cell<usize>,
}

impl InFlight {
    /// Accounting for a new connection, reporting to `observer`.
    pub fn new(observer: Arc<Observer>) -> Self {
        Self {
            calls: Cell::new(0),
            idle: Notify::new(),
            observer,
            last_call: Cell::new(Instant::now()),
            subscriptions: Cell::new(0),
        }
    }

    /// The server's observer (metrics, group hashes).
    pub fn observer(&self) -> &Arc<Observer> {
        &self.observer
    }

    /// Serves one call of `service`/`method`: counts it in flight, runs it inside a server
    /// span whose parent is the caller's `trace`, and records its status and latency.
    pub async fn serve<T>(
        self: &Rc<Self>,
        service: &'static str,
        method: &'static str,
        trace: WireContext,
        call: impl Future<Output = Result<T, capnp::Error>>,
    ) -> Result<T, capnp::Error> {
        let _guard = self.enter();
        spans::serve(&self.observer, service, method, trace, call).await
    }

    fn enter(self: &Rc<Self>) -> InFlightGuard {
        self.calls.set(self.calls.get() + 1);
        self.last_call.set(Instant::now());
        InFlightGuard(Rc::clone(self))
    }

    /// Counts a subscription as held until the returned guard drops (a connection that holds
    /// one is in use even when it makes no calls).
    pub fn hold_subscription(self: &Rc<Self>) -> SubscriptionGuard {
        self.subscriptions.set(self.subscriptions.get() + 1);
        SubscriptionGuard(Rc::clone(self))
    }

    /// Since when the connection has been unused — no call in progress and no subscription
    /// held — or `None` while it is in use.
    pub fn idle_since(&self) -> Option<Instant> {
        (self.calls.get() == 0 && self.subscriptions.get() == 0).then(|| self.last_call.get())
    }

    /// Subscriptions held now.
    pub fn subscriptions(&self) -> usize {
        self.subscriptions.get()
    }

    /// Calls in progress now.
    pub fn in_progress(&self) -> usize {
        self.calls.get()
    }

    /// Resolves once no call is in progress.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.calls.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Marks one call as in progress until dropped.
struct InFlightGuard(Rc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let n = self.0.calls.get().saturating_sub(1);
        self.0.calls.set(n);
        self.0.last_call.set(Instant::now());
        if n == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Marks one subscription as held until dropped.
pub struct SubscriptionGuard(Rc<InFlight>);

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        let n = self.0.subscriptions.get().saturating_sub(1);
        self.0.subscriptions.set(n);
        self.0.last_call.set(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn calls_are_counted_until_they_finish() -> Result<(), capnp::Error> {
        let in_flight = Rc::new(InFlight::new(Arc::new(Observer::default())));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let local = tokio::task::LocalSet::new();
        let counter = Rc::clone(&in_flight);
        local
            .run_until(async move {
                let call = tokio::task::spawn_local({
                    let in_flight = Rc::clone(&counter);
                    async move {
                        in_flight
                            .serve("Test", "wait", WireContext::default(), async {
                                rx.await.map_err(|_| capnp::Error::failed("dropped".into()))
                            })
                            .await
                    }
                });
                while counter.in_progress() == 0 {
                    tokio::task::yield_now().await;
                }
                assert_eq!(counter.in_progress(), 1);
                let _ = tx.send(());
                counter.idle().await;
                assert_eq!(counter.in_progress(), 0);
                call.await
                    .map_err(|e| capnp::Error::failed(e.to_string()))?
            })
            .await?;
        let mut out = String::new();
        in_flight.observer().metrics.render(&mut out);
        assert!(out.contains("rpc_service=\"Test\",rpc_method=\"wait\",status=\"ok\"} 1"));
        Ok(())
    }
}
