//! Every Cap'n Proto interface this node serves: the bootstrap, the Authentication and
//! Delivery Services of a bound client, the shard's internal interface, and the live
//! subscriptions that push entries and Welcomes.
//!
//! Each served method runs through [`crate::obs::calls::InFlight::serve`] (span, metrics, drain
//! accounting), reads its parameters through [`crate::wire::parse`] and answers errors through
//! the one mapping in [`crate::wire::errors`]. The ordering calls go to a [`backend::Backend`]:
//! this node's own appender, or the edge's router.

mod auth;
pub mod backend;
pub mod bootstrap;
mod delivery;
mod shard;
mod subscribe;

pub use delivery::MAX_FETCH;
