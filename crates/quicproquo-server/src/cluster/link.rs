//! Connections from a node to a shard's internal interface.
//!
//! The dialing node presents its own certificate in Noise message 3 (issued by a cluster key,
//! like the shard's in message 2), checks that the shard's certificate is valid under a key it
//! trusts, vouches for the shard role, and that its static key is the one the shard registered, then asks the shard's
//! bootstrap for `ShardService`. The RPC system runs as a local task; [`Link::closed`] fires
//! when the connection ends for any reason.

use std::sync::Arc;
use std::time::Duration;

use capnp_rpc::rpc_twoparty_capnp::Side;
use quicproquo_core::channel::ChannelLimits;
use quicproquo_core::rpc::rpc_system;
use quicproquo_core::{NodeRole, NodeVerifier, noise};
use quicproquo_proto::bootstrap_capnp::bootstrap;
use quicproquo_proto::cluster_capnp::shard_service;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::ClusterError;
use crate::keystore::NodeIdentity;

/// What a node needs to dial shards.
#[derive(Debug)]
pub struct Dialer {
    /// This node's keys and certificate.
    pub identity: Arc<NodeIdentity>,
    /// Verifies the shard's certificate under the cluster key.
    pub verifier: NodeVerifier,
    /// Deadline for TCP connect + handshake + bootstrap.
    pub timeout: Duration,
    /// Largest frame accepted from the shard.
    pub max_frame_bytes: usize,
}

/// An open connection to one shard.
#[derive(Clone)]
pub struct Link {
    /// The shard's internal interface.
    pub client: shard_service::Client,
    closed: CancellationToken,
}

impl Link {
    /// Resolves when the connection has ended.
    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Closes the connection (in-flight calls fail).
    pub fn close(&self) {
        self.closed.cancel();
    }
}

impl Dialer {
    /// Connects to shard `node` at `address`, expecting the Noise key `noise_key`.
    ///
    /// Must be called inside a `tokio::task::LocalSet`.
    pub async fn dial(
        &self,
        node: &str,
        address: &str,
        noise_key: &[u8; 32],
    ) -> Result<Link, ClusterError> {
        let unreachable = |message: String| ClusterError::Unreachable {
            node: node.to_owned(),
            address: address.to_owned(),
            message,
        };
        let attempt = async {
            let mut stream = TcpStream::connect(address)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let _ = stream.set_nodelay(true);
            let outcome = noise::initiate_as_node(
                &mut stream,
                &self.identity.noise,
                &self.verifier,
                &self.identity.certificate(),
                self.timeout,
            )
            .await
            .map_err(|e| unreachable(e.to_string()))?;
            if outcome.server_role != Some(NodeRole::Shard) || &outcome.remote_static != noise_key {
                return Err(ClusterError::WrongNode {
                    node: node.to_owned(),
                    address: address.to_owned(),
                });
            }
            let (r, w) = stream.into_split();
            let limits = ChannelLimits {
                max_frame_bytes: self.max_frame_bytes,
            };
            let mut rpc = rpc_system(r, w, outcome.session, limits, Side::Client, None);
            let bootstrap: bootstrap::Client = rpc.bootstrap(Side::Server);
            let closed = CancellationToken::new();
            let ended = closed.clone();
            tokio::task::spawn_local(async move {
                tokio::select! {
                    _ = rpc => {}
                    () = ended.cancelled() => {}
                }
                ended.cancel();
            });
            let response = bootstrap.cluster_request().send().promise.await;
            let client = response.and_then(|r| r.get()?.get_shard());
            match client {
                Ok(client) => Ok(Link { client, closed }),
                Err(e) => {
                    closed.cancel();
                    Err(ClusterError::Rpc(e))
                }
            }
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
    }
}
