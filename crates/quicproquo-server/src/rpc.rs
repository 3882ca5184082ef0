//! The Cap'n Proto services this node serves to a connection.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use quicproquo_core::NodeRole;
use quicproquo_proto::bootstrap_capnp::bootstrap;
use quicproquo_proto::common_capnp;
use tokio::sync::Notify;

/// Counts calls in progress on one connection, so a drain can wait for them.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    calls: Cell<usize>,
    idle: Notify,
}

impl InFlight {
    pub(crate) fn enter(self: &Rc<Self>) -> InFlightGuard {
        self.calls.set(self.calls.get() + 1);
        InFlightGuard(Rc::clone(self))
    }

    /// Resolves once no call is in progress.
    pub(crate) async fn idle(&self) {
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
pub(crate) struct InFlightGuard(Rc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let n = self.0.calls.get().saturating_sub(1);
        self.0.calls.set(n);
        if n == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The bootstrap capability handed to every connection after the handshake.
pub(crate) struct BootstrapImpl {
    role: NodeRole,
    in_flight: Rc<InFlight>,
}

impl BootstrapImpl {
    pub(crate) fn new(role: NodeRole, in_flight: Rc<InFlight>) -> Self {
        Self { role, in_flight }
    }
}

fn wire_role(role: NodeRole) -> common_capnp::NodeRole {
    match role {
        NodeRole::Edge => common_capnp::NodeRole::Edge,
        NodeRole::Shard => common_capnp::NodeRole::Shard,
        _ => common_capnp::NodeRole::Standalone,
    }
}

impl bootstrap::Server for BootstrapImpl {
    async fn ping(
        self: Rc<Self>,
        params: bootstrap::PingParams,
        mut results: bootstrap::PingResults,
    ) -> Result<(), capnp::Error> {
        let _guard = self.in_flight.enter();
        let params = params.get()?;
        let payload = params.get_payload()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let mut out = results.get();
        out.set_payload(payload);
        out.set_role(wire_role(self.role));
        out.set_server_time_micros(now);
        Ok(())
    }
}
