//! Bad input on the wire: each bad connection is closed, the server keeps serving a good client,
//! and nothing panics (a panic would surface as a failed `join`).

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use quicproquo_core::channel::{ChannelLimits, channel};
use quicproquo_core::noise::{self, NOISE_PARAMS, PROLOGUE};
use quicproquo_core::{NodeRole, NoiseKeypair};
use support::{TestServer, closed_by_server, eventually, local};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WITHIN: Duration = Duration::from_secs(10);

/// Starts a server and a good client connected before the bad input arrives; after `bad` runs,
/// checks the good client still works, a new client can connect, and the server shuts down
/// cleanly (no thread panicked).
async fn survives<F, Fut>(
    tweak: impl FnOnce(&mut quicproquo_server::ServerConfig),
    bad: F,
) -> Result<()>
where
    F: FnOnce(TestServer) -> Fut,
    Fut: Future<Output = Result<TestServer>>,
{
    local(async {
        let server = TestServer::start(NodeRole::Standalone, tweak)?;
        let before = server.connect().await?;
        before.ping(b"before").await?;
        let mut server = bad(server).await?;
        assert_eq!(before.ping(b"during").await?.payload, b"during");
        let after = server.connect().await?;
        assert_eq!(after.ping(b"after").await?.payload, b"after");
        server.stop().await?;
        Ok(())
    })
    .await
}

fn failed_handshakes(server: &TestServer) -> Result<u64> {
    Ok(server
        .handle()?
        .stats()
        .handshakes_failed
        .load(Ordering::Relaxed))
}

#[tokio::test]
async fn garbage_bytes_are_refused() -> Result<()> {
    survives(
        |_| {},
        |server| async move {
            let mut s = TcpStream::connect(server.addr).await?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
                .await?;
            closed_by_server(&mut s, WITHIN).await?;
            eventually(WITHIN, || failed_handshakes(&server).unwrap_or(0) >= 1).await?;
            Ok(server)
        },
    )
    .await
}

#[tokio::test]
async fn a_truncated_handshake_is_refused() -> Result<()> {
    survives(
        |_| {},
        |server| async move {
            let mut s = TcpStream::connect(server.addr).await?;
            // Message 1 of XX is 32 bytes; announce it and send 10, then close our side.
            s.write_all(&32u16.to_be_bytes()).await?;
            s.write_all(&[0x42; 10]).await?;
            s.shutdown().await?;
            closed_by_server(&mut s, WITHIN).await?;
            eventually(WITHIN, || failed_handshakes(&server).unwrap_or(0) >= 1).await?;
            Ok(server)
        },
    )
    .await
}

/// A Noise message 1 whose ephemeral key is a low-order point (here all zero) gets no answer:
/// the connection is closed before message 2, and counted as a failed handshake.
#[tokio::test]
async fn a_low_order_ephemeral_key_gets_no_answer() -> Result<()> {
    survives(
        |_| {},
        |server| async move {
            let mut s = TcpStream::connect(server.addr).await?;
            s.write_all(&32u16.to_be_bytes()).await?;
            s.write_all(&[0u8; 32]).await?;
            let mut answer = Vec::new();
            tokio::time::timeout(WITHIN, s.read_to_end(&mut answer)).await??;
            anyhow::ensure!(
                answer.is_empty(),
                "the server answered {} bytes",
                answer.len()
            );
            eventually(WITHIN, || failed_handshakes(&server).unwrap_or(0) >= 1).await?;
            Ok(server)
        },
    )
    .await
}

#[tokio::test]
async fn a_bit_flipped_handshake_is_refused() -> Result<()> {
    survives(
        |_| {},
        |server| async move {
            let mut s = TcpStream::connect(server.addr).await?;
            let builder = snow::Builder::new(NOISE_PARAMS.parse()?);
            let key = builder.generate_keypair()?;
            let mut hs = snow::Builder::new(NOISE_PARAMS.parse()?)
                .local_private_key(&key.private)?
                .prologue(PROLOGUE)?
                .build_initiator()?;
            let mut buf = [0u8; 1024];
            let mut payload = [0u8; 1024];
            let n = hs.write_message(&[], &mut buf)?;
            s.write_all(&(n as u16).to_be_bytes()).await?;
            s.write_all(&buf[..n]).await?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await?;
            let len = usize::from(u16::from_be_bytes(len));
            s.read_exact(&mut buf[..len]).await?;
            hs.read_message(&buf[..len], &mut payload)?;
            let n = hs.write_message(&[], &mut buf)?;
            buf[n / 2] ^= 0x01; // flip one bit of message 3
            s.write_all(&(n as u16).to_be_bytes()).await?;
            s.write_all(&buf[..n]).await?;
            closed_by_server(&mut s, WITHIN).await?;
            eventually(WITHIN, || failed_handshakes(&server).unwrap_or(0) >= 1).await?;
            Ok(server)
        },
    )
    .await
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_off_at_the_deadline() -> Result<()> {
    survives(
        |c| c.handshake_timeout = Duration::from_millis(300),
        |server| async move {
            let mut s = TcpStream::connect(server.addr).await?;
            // Send nothing at all.
            closed_by_server(&mut s, WITHIN).await?;
            eventually(WITHIN, || failed_handshakes(&server).unwrap_or(0) >= 1).await?;
            Ok(server)
        },
    )
    .await
}

#[tokio::test]
async fn a_frame_over_the_maximum_closes_that_connection() -> Result<()> {
    survives(
        |_| {},
        |server| async move {
            // Announce a 64 MiB frame, over the server's 16 MiB default, and send a little of it.
            // The server may send an RPC abort message, then closes.
            let mut bytes = (64u32 * 1024 * 1024).to_be_bytes().to_vec();
            bytes.extend_from_slice(&[0u8; 100]);
            closes_on(&server, &bytes).await?;
            Ok(server)
        },
    )
    .await
}

#[tokio::test]
async fn the_handshake_cap_closes_excess_connections_at_once() -> Result<()> {
    survives(
        |c| {
            c.max_handshakes = 1;
            c.handshake_timeout = Duration::from_millis(500);
        },
        |server| async move {
            // One stalled client holds the only handshake slot...
            let _stalled = TcpStream::connect(server.addr).await?;
            eventually(WITHIN, || {
                server
                    .handle()
                    .map(|h| h.stats().accepted.load(Ordering::Relaxed) >= 2)
                    .unwrap_or(false)
            })
            .await?;
            // ...so the next one is closed straight away.
            let mut excess = TcpStream::connect(server.addr).await?;
            closed_by_server(&mut excess, WITHIN).await?;
            assert!(
                server
                    .handle()?
                    .stats()
                    .refused_at_capacity
                    .load(Ordering::Relaxed)
                    >= 1
            );
            // Once the stalled one times out, the slot is free again (checked by `survives`).
            eventually(WITHIN, || failed_handshakes(&server).unwrap_or(0) >= 1).await?;
            Ok(server)
        },
    )
    .await
}

/// Sends `bytes` (frame headers and bodies, unframed) on a fresh session and checks that the
/// server closes that connection without saying much.
async fn closes_on(server: &TestServer, bytes: &[u8]) -> Result<()> {
    let mut s = TcpStream::connect(server.addr).await?;
    let key = NoiseKeypair::generate()?;
    let outcome = noise::initiate(&mut s, &key, &server.options.verifier, WITHIN).await?;
    let (r, w) = s.into_split();
    let (mut reader, mut writer) = channel(r, w, outcome.session, ChannelLimits::default());
    writer.send_unframed(bytes).await?;
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(WITHIN, reader.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "server kept the connection open");
    assert!(
        sink.len() < 4096,
        "server kept talking: {} bytes",
        sink.len()
    );
    Ok(())
}

/// Push frames from a client may only be acknowledgements: one longer than 1 KiB, one that is
/// not a well-formed `PushAck`, or more than 64 in a row that release nothing (no subscription
/// of the connection) close that connection (ADR 0019).
#[tokio::test]
async fn a_bad_push_frame_closes_that_connection() -> Result<()> {
    use quicproquo_core::channel::PUSH_FLAG;
    use quicproquo_proto::delivery_capnp::push_ack;
    use quicproquo_server::rpc::frames::MAX_IDLE_ACKS;
    let mut ack = capnp::message::Builder::new_default();
    {
        let mut a = ack.init_root::<push_ack::Builder<'_>>();
        a.set_group_id(&[3u8; 16]);
        a.set_seq(u64::MAX);
        a.set_tag(1);
    }
    let ack = capnp::serialize::write_message_to_words(&ack);
    let mut idle_acks = Vec::new();
    for _ in 0..=MAX_IDLE_ACKS {
        idle_acks.extend_from_slice(&(PUSH_FLAG | ack.len() as u32).to_be_bytes());
        idle_acks.extend_from_slice(&ack);
    }
    survives(
        |_| {},
        |server| async move {
            // Announced longer than an acknowledgement may be: refused before its body.
            let mut oversized = (PUSH_FLAG | (64 * 1024)).to_be_bytes().to_vec();
            oversized.extend_from_slice(&[0u8; 100]);
            closes_on(&server, &oversized).await?;
            // Short enough, but not a Cap'n Proto message.
            let mut garbage = (PUSH_FLAG | 16).to_be_bytes().to_vec();
            garbage.extend_from_slice(&[0xffu8; 16]);
            closes_on(&server, &garbage).await?;
            // Well-formed, but acknowledging nothing, again and again.
            closes_on(&server, &idle_acks).await?;
            Ok(server)
        },
    )
    .await
}
