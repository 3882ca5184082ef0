//! The sharded cluster: which shard owns a group, how shards announce themselves, and how an
//! edge reaches them.
//!
//! - [`ring`]: the consistent-hash ring (SHA-256 points, virtual nodes, pinned vectors).
//! - [`lease`]: a shard's lease in Postgres, renewed while it runs and dropped when it stops.
//! - [`link`]: a Noise-authenticated Cap'n Proto connection from one node to a shard; both
//!   ends present certificates signed by the cluster key.
//! - [`router`]: the edge's router: the live ring, one pooled link per shard, calls forwarded
//!   to owners (moving on when a shard is down), and one upstream feed per group that local
//!   subscribers share, pushed into the sinks the edge serves to the shards it follows
//!   (`EntrySink`, `InboxSink`).
//!
//! What it is not: the shard's side of the internal interface (`crate::rpc`) or a node's
//! start-up (`crate::node`).
//!
//! Correctness never rests on ownership: Postgres arbitrates sequence numbers, epochs and
//! message ids, so two shards that both believe they own a group cannot fork its log.

pub mod lease;
pub mod link;
pub mod ring;
pub mod router;

/// Errors of the cluster machinery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// Connecting to or handshaking with another node failed.
    #[error("cannot reach shard {node} at {address}: {message}")]
    Unreachable {
        /// The shard's node id.
        node: String,
        /// Its advertised address.
        address: String,
        /// What went wrong.
        message: String,
    },
    /// The node reached is not the one the ring names (another key answered).
    #[error("shard {node} at {address} presented another key than it registered")]
    WrongNode {
        /// The shard's node id.
        node: String,
        /// Its advertised address.
        address: String,
    },
    /// A call on the internal interface failed.
    #[error("shard call failed: {0}")]
    Rpc(#[from] capnp::Error),
}
