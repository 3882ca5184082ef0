//! What the node tells the client about the session itself: today, that it is draining.

use std::cell::Cell;
use std::rc::Rc;

use quicproquo_proto::bootstrap_capnp::session_events;
use tokio::sync::Notify;

/// Set when the node this session is bound to announced it is shutting down: the client
/// should connect to another node and resubscribe from its cursors (calls in progress still
/// complete on the old connection).
#[derive(Debug, Clone, Default)]
pub struct Draining(Rc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    set: Cell<bool>,
    notify: Notify,
}

impl Draining {
    /// Whether the node announced a drain.
    pub fn is_set(&self) -> bool {
        self.0.set.get()
    }

    /// Resolves once the node announces a drain.
    pub async fn wait(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }

    fn set(&self) {
        self.0.set.set(true);
        self.0.notify.notify_waiters();
    }
}

/// The capability handed to the node at bind time.
pub(crate) struct Events(pub(crate) Draining);

impl session_events::Server for Events {
    async fn draining(
        self: Rc<Self>,
        _: session_events::DrainingParams,
        _: session_events::DrainingResults,
    ) -> Result<(), capnp::Error> {
        self.0.set();
        Ok(())
    }
}
