//! Ping over Noise + Cap'n Proto through the real server, for every role.

mod support;

use std::time::Duration;

use anyhow::Result;
use quicproquo_client::{ClientError, ConnectOptions, Connection};
use quicproquo_core::{ClusterSigningKey, NodeRole};
use support::{TestServer, local};

#[tokio::test]
async fn ping_round_trips_for_every_role() -> Result<()> {
    local(async {
        for role in [NodeRole::Standalone, NodeRole::Edge, NodeRole::Shard] {
            let server = TestServer::start(role, |_| {})?;
            let conn = server.connect().await?;
            assert_eq!(conn.server_role(), role);
            let pong = conn.ping(b"hello").await?;
            assert_eq!(pong.payload, b"hello");
            conn.close().await;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn ten_mib_payload_crosses_the_rpc_channel_intact() -> Result<()> {
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |_| {})?;
        let conn = server.connect().await?;
        // Large echoes are for bound sessions only (an unbound peer gets small pings).
        conn.bind(&quicproquo_core::IdentityKeypair::generate()?)
            .await?;
        let payload: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i % 253) as u8).collect();
        let pong = conn.ping(&payload).await?;
        assert!(pong.payload == payload, "10 MiB payload altered in transit");
        // The connection is still usable afterwards.
        assert_eq!(conn.ping(b"after").await?.payload, b"after");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn many_clients_share_the_workers() -> Result<()> {
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |_| {})?;
        let mut conns = Vec::new();
        for _ in 0..32 {
            conns.push(server.connect().await?);
        }
        let pings = conns.iter().enumerate().map(|(i, c)| async move {
            let body = format!("client {i}");
            let pong = c.ping(body.as_bytes()).await?;
            anyhow::ensure!(pong.payload == body.as_bytes(), "crossed replies");
            Ok(())
        });
        for r in futures::future::join_all(pings).await {
            r?;
        }
        assert_eq!(
            server
                .handle()?
                .stats()
                .handshakes_ok
                .load(std::sync::atomic::Ordering::Relaxed),
            32
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_message_over_the_frame_limit_is_refused_and_the_server_carries_on() -> Result<()> {
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |c| {
            c.max_frame_bytes = 1024 * 1024;
            c.max_message_bytes = 512 * 1024;
        })?;
        let conn = server.connect().await?;
        let too_big = vec![0u8; 2 * 1024 * 1024];
        let r = conn.ping(&too_big).await;
        assert!(r.is_err(), "a 2 MiB call must not pass a 1 MiB limit");
        let good = server.connect().await?;
        assert_eq!(good.ping(b"still here").await?.payload, b"still here");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn wrong_pinned_cluster_key_is_refused_with_a_clear_error() -> Result<()> {
    local(async {
        let server = TestServer::start(NodeRole::Edge, |_| {})?;
        let impostor = ClusterSigningKey::generate()?.public_key();
        let r = Connection::connect(server.addr, &ConnectOptions::new(impostor)).await;
        match r {
            Err(ClientError::WrongClusterKey { addr }) => assert_eq!(addr, server.addr),
            other => anyhow::bail!("expected WrongClusterKey, got {other:?}"),
        }
        let good = server.connect().await?;
        assert_eq!(good.ping(b"ok").await?.payload, b"ok");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn refused_connection_and_timeout_are_reported() -> Result<()> {
    local(async {
        // A port nobody listens on: bind, learn the port, close.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let key = ClusterSigningKey::generate()?.public_key();
        let r = Connection::connect(addr, &ConnectOptions::new(key)).await;
        assert!(matches!(r, Err(ClientError::Connect { .. })), "{r:?}");

        // A listener that accepts but never answers the handshake.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let silent_addr = silent.local_addr()?;
        let mut options = ConnectOptions::new(key);
        options.timeout = Duration::from_millis(200);
        let (r, _accepted) =
            tokio::join!(Connection::connect(silent_addr, &options), silent.accept());
        assert!(
            matches!(
                r,
                Err(ClientError::Timeout {
                    stage: "handshake",
                    ..
                })
            ),
            "{r:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn shutdown_stops_every_thread_and_closes_clients() -> Result<()> {
    local(async {
        let mut server = TestServer::start(NodeRole::Standalone, |c| {
            c.shutdown_grace = Duration::from_secs(5);
        })?;
        let conn = server.connect().await?;
        conn.ping(b"x").await?;
        server.stop().await?;
        assert!(conn.ping(b"y").await.is_err(), "connection must be closed");
        assert!(tokio::net::TcpStream::connect(server.addr).await.is_err());
        Ok(())
    })
    .await
}

/// A shard's internal interface answers only edges whose Noise handshake carried a certificate
/// from the cluster key: a fellow edge gets it; a node certified for another role is refused
/// with `wrong_role`; a peer whose certificate another key signed is refused with
/// `not_a_node`, and so is a client (a shard also refuses to bind clients).
#[tokio::test]
async fn a_shard_serves_its_internal_interface_to_cluster_nodes_only() -> Result<()> {
    use quicproquo_core::NodeVerifier;
    use quicproquo_proto::errors::{ErrorCode, code_of};
    use quicproquo_server::NodeIdentity;
    use quicproquo_server::cluster::ClusterError;
    use quicproquo_server::cluster::link::Dialer;
    use quicproquo_server::keystore;

    local(async {
        let server = TestServer::start(NodeRole::Shard, |_| {})?;
        let data = server.data_dir();
        let shard_key = *keystore::node_key(&data)?.public();
        let cluster_key = server.handle()?.cluster_key();
        let addr = server.addr.to_string();
        let tmp = tempfile::tempdir()?;
        let dial = |identity: NodeIdentity| {
            let dialer = Dialer {
                identity: std::sync::Arc::new(identity),
                verifier: NodeVerifier::new(cluster_key),
                timeout: Duration::from_secs(5),
                max_frame_bytes: 1 << 20,
            };
            let addr = addr.clone();
            async move { dialer.dial("shard", &addr, &shard_key).await }
        };

        // A node of this cluster.
        let member = NodeIdentity::load(
            &tmp.path().join("edge"),
            Some(&data.join(keystore::CLUSTER_KEY_FILE)),
            NodeRole::Edge,
        )?;
        let link = dial(member).await?;
        link.close();

        // A node of this cluster, but certified as a shard: only edges call a shard.
        let shard_peer = NodeIdentity::load(
            &tmp.path().join("shard-peer"),
            Some(&data.join(keystore::CLUSTER_KEY_FILE)),
            NodeRole::Shard,
        )?;
        match dial(shard_peer).await {
            Err(ClusterError::Rpc(e)) => assert_eq!(code_of(&e), Some(ErrorCode::WrongRole)),
            Err(e) => anyhow::bail!("expected wrong_role, got {e}"),
            Ok(_) => anyhow::bail!("a shard's certificate opened the shard interface"),
        }

        // A node of another cluster (its certificate signed by another key).
        let stranger = NodeIdentity::load_or_create(&tmp.path().join("other"), NodeRole::Edge)?;
        match dial(stranger).await {
            Err(ClusterError::Rpc(e)) => assert_eq!(code_of(&e), Some(ErrorCode::NotANode)),
            Err(e) => anyhow::bail!("expected not_a_node, got {e}"),
            Ok(_) => anyhow::bail!("a stranger got the shard interface"),
        }

        // A client: no certificate, and no client service on a shard either.
        let conn = server.connect().await?;
        let identity = quicproquo_core::IdentityKeypair::generate()?;
        let bound = conn.bind(&identity).await;
        assert_eq!(
            bound.err().and_then(|e| e.code()),
            Some(ErrorCode::WrongRole)
        );
        Ok(())
    })
    .await
}
