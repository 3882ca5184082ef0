//! The quicproquo server: the edge, shard and standalone roles of the delivery cluster.
//!
//! What it is: the library behind the `qpq-server` binary, so tests and tools can run a server
//! in process. A standalone node plays every role in one process; an edge serves clients and
//! routes each group's ordering calls to its owner shard; a shard orders logs for edges only.
//!
//! What it is not: a client (see `quicproquo-client`), nor the MLS or Noise machinery (see
//! `quicproquo-core`). The server never decrypts a message: it reads the public MLS framing
//! only.
//!
//! # Layout
//!
//! Top-level modules form layers; each imports only from the layers before it, never after
//! (a test reads the `crate::` paths of every file and fails on a cycle or an upward import):
//!
//! | layer | module | role, and the rules that live there |
//! |---|---|---|
//! | 1 | [`model`], [`keystore`], [`pool`] | values and rules with no I/O: group and message ids, user names, append requests and outcomes, the append decision, the epoch rule, the size rule; the node's keys on disk; the bounded CPU pool that runs CPU-heavy checks off the connections' threads |
//! | 2 | [`obs`] | the one metrics registry, spans, calls in flight (the wrapper every served method runs in) |
//! | 3 | [`store`] | the durable stores (Postgres, embedded) behind the Authentication and Delivery Services, each calling the model's decision |
//! | 4 | [`auth`], [`ordering`] | the Authentication Service's rules (KeyPackage checks, fetch rate); the appender (group commit), live feeds and the typed ordering error |
//! | 5 | [`wire`] | Cap'n Proto codecs, one parser per wire type, one mapping of every error to a typed RPC error |
//! | 6 | [`cluster`] | the ring, shard leases, links between nodes, the edge's router |
//! | 7 | [`rpc`] | every served interface: bootstrap, Authentication and Delivery Services, the shard's internal interface, subscriptions |
//! | 8 | [`config`] | settings: defaults < `qpq-server.toml` < `QPQ_*` < flags, validated |
//! | 9 | [`node`] | the process: the worker runtime, the ops listener, and one module per role (standalone, edge, shard) |
//!
//! Tracing and log setup are in `quicproquo-telemetry`; the command line is the binary's.

#![forbid(unsafe_code)]

pub mod auth;
pub mod cluster;
pub mod config;
pub mod keystore;
pub mod model;
pub mod node;
pub mod obs;
pub mod ordering;
pub mod pool;
pub mod rpc;
pub mod store;
pub mod wire;

pub use config::{ConfigError, FileConfig, Overrides, ServerConfig};
pub use keystore::NodeIdentity;
pub use node::{ServerError, ServerHandle, bind_and_start, open_store, start};
