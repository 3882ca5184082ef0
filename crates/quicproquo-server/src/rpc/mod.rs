//! Every Cap'n Proto interface this node serves: the bootstrap, the Authentication and
//! Delivery Services of a bound client, the shard's internal interface, and the live
//! subscriptions that push entries and Welcomes.
//!
//! Each served method runs through [`crate::obs::calls::InFlight::serve`] (span, metrics, drain
//! accounting), reads its parameters through [`crate::wire::parse`] and answers errors through
//! the one mapping in [`crate::wire::errors`]. The ordering calls go to a [`backend::Backend`]:
//! this node's own appender, or the edge's router.

/// Serves one method of an interface: reads the caller's trace context from `params` (for
/// requests that carry a `trace` field; without `params` the call starts its own trace), then
/// runs `body` through the connection's [`InFlight::serve`](crate::obs::calls::InFlight::serve)
/// (span, metrics, drain accounting). Every served method is written
/// `serve!(self.in_flight, "Service", "method", params, async move { ... })`.
macro_rules! serve {
    ($in_flight:expr, $service:literal, $method:literal, $params:ident, $body:expr) => {{
        let trace = $crate::obs::spans::trace_of($params.get().and_then(|p| p.get_trace()));
        let in_flight = ::std::rc::Rc::clone(&$in_flight);
        in_flight.serve($service, $method, trace, $body).await
    }};
    ($in_flight:expr, $service:literal, $method:literal, $body:expr) => {{
        let in_flight = ::std::rc::Rc::clone(&$in_flight);
        in_flight
            .serve(
                $service,
                $method,
                ::quicproquo_telemetry::propagation::WireContext::default(),
                $body,
            )
            .await
    }};
}

mod auth;
pub mod backend;
pub mod bootstrap;
mod delivery;
pub mod frames;
mod push;
mod shard;
mod subscribe;

pub use delivery::MAX_FETCH;

use quicproquo_proto::errors::ErrorCode;

use crate::obs::spans::StoreOutcome;
use crate::store::StoreError;

/// A store error on its database span: the code it reaches the peer with, and whether the
/// store failed (unreachable, inconsistent) rather than answered (every refusal a caller can
/// cause). No wildcard: a new error must be classified here.
impl StoreOutcome for StoreError {
    fn outcome(&self) -> &'static str {
        let code = match self {
            Self::NameTaken => ErrorCode::NameTaken,
            Self::AlreadyNamed => ErrorCode::AlreadyNamed,
            Self::InvalidName => ErrorCode::InvalidName,
            Self::UnknownIdentity => ErrorCode::UnknownIdentity,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Corrupt(_) => ErrorCode::Internal,
            Self::GroupExists => ErrorCode::GroupExists,
            Self::UnknownGroup => ErrorCode::UnknownGroup,
            Self::NotMember => ErrorCode::NotMember,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::HistoryGone { .. } => ErrorCode::HistoryGone,
        };
        code.as_str()
    }

    fn is_fault(&self) -> bool {
        match self {
            Self::Unavailable(_) | Self::Corrupt(_) => true,
            Self::NameTaken
            | Self::AlreadyNamed
            | Self::InvalidName
            | Self::UnknownIdentity
            | Self::GroupExists
            | Self::UnknownGroup
            | Self::NotMember
            | Self::InvalidArgument(_)
            | Self::HistoryGone { .. } => false,
        }
    }
}
