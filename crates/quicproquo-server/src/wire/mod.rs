//! The wire: conversions between model values and Cap'n Proto messages, the one parser of each
//! wire type a peer sends (group ids, identity lists, user names, append requests), and the one
//! mapping of every internal error to a typed RPC error.
//!
//! What it is not: a served interface (those are in `crate::rpc`). Everything that reads a
//! peer's message goes through a parser here, so each input is checked once, where it enters.

pub mod codec;
pub mod errors;
pub mod parse;

pub use errors::{model_error, ordering_error, ordering_error_of, store_error};
