//! The quicproquo server: the edge, shard and standalone roles of the delivery cluster.
//!
//! What it is: the library behind the `qpq-server` binary, so tests and tools can run a server
//! in process. [`config`] resolves and validates settings (defaults < `qpq-server.toml` <
//! `QPQ_*` environment < flags); [`keystore`] keeps the cluster and node keys in the data
//! directory; [`server`] runs the listener, the per-core workers and each connection (Noise
//! handshake, then Cap'n Proto RPC over the encrypted channel); `rpc` implements the served
//! interfaces.
//!
//! [`auth`] is the Authentication Service (identities, names, KeyPackages) over a [`store`]
//! (Postgres or the embedded file).
//!
//! [`delivery`] is the Delivery Service: ordered group logs with group commit, live feeds and
//! subscriptions. [`cluster`] splits it over processes: shards register leases in Postgres,
//! edges hash each group onto a ring of shards and forward its ordering calls to the owner.
//!
//! [`ops`] holds the metrics, the RPC and store spans, and the HTTP ops listener
//! (`/metrics`, `/livez`, `/readyz`); tracing and log setup are in `quicproquo-telemetry`.
//!
//! What it is not: a client (see `quicproquo-client`). A standalone node plays every role in
//! one process; an edge serves clients and routes; a shard orders logs for edges only.

#![forbid(unsafe_code)]

pub mod auth;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod keystore;
pub mod ops;
mod rpc;
pub mod server;
pub mod store;

pub use config::{ConfigError, FileConfig, Overrides, ServerConfig};
pub use keystore::NodeIdentity;
pub use server::{ServerError, ServerHandle, Stats, bind_and_start, open_store, start};
