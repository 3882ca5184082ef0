//! A real Noise channel over loopback TCP, for tests of what runs on a connection (push
//! frames, their acknowledgements and windows) without a whole node.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use quicproquo_core::channel::{ChannelLimits, channel};
use quicproquo_core::noise;
use quicproquo_core::{
    ClusterSigningKey, NodeRole, NodeVerifier, NoiseKeypair, NoiseReader, NoiseWriter,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// How long the handshake may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// One end of a channel: its reading and its writing half.
pub type End = (NoiseReader<OwnedReadHalf>, NoiseWriter<OwnedWriteHalf>);

/// A handshaken channel between a client (the initiator) and a standalone node (the
/// responder) on loopback TCP, both with `limits`: (client end, node end).
pub async fn pair(limits: ChannelLimits) -> Result<(End, End)> {
    let cluster = ClusterSigningKey::generate()?;
    let node_key = NoiseKeypair::generate()?;
    let client_key = NoiseKeypair::generate()?;
    let certificate = cluster.certify(NodeRole::Standalone, node_key.public());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (mut client, mut node) = (client?, accepted?.0);
    let pinned = NodeVerifier::new(cluster.public_key());
    let (c, n) = tokio::join!(
        noise::initiate(&mut client, &client_key, &pinned, DEADLINE),
        noise::respond(&mut node, &node_key, &certificate, DEADLINE)
    );
    let (c, n) = (c?, n?);
    let (cr, cw) = client.into_split();
    let (nr, nw) = node.into_split();
    Ok((
        channel(cr, cw, Arc::clone(&c.session), limits),
        channel(nr, nw, Arc::clone(&n.session), limits),
    ))
}
