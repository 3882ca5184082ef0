//! The Noise handshake and the framed channel over real loopback TCP sockets.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use quicproquo_core::channel::{ChannelLimits, channel};
use quicproquo_core::noise::{self, MAX_NOISE_MESSAGE};
use quicproquo_core::{
    ClusterSigningKey, HandshakeOutcome, NodeRole, NodeVerifier, NoiseKeypair, NoiseReader,
    NoiseWriter, TransportError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(10);

type Half = (NoiseReader<OwnedReadHalf>, NoiseWriter<OwnedWriteHalf>);

async fn tcp_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    Ok((client?, accepted?.0))
}

fn split(stream: TcpStream, outcome: &HandshakeOutcome, limits: ChannelLimits) -> Half {
    let (r, w) = stream.into_split();
    channel(r, w, Arc::clone(&outcome.session), limits)
}

/// A handshaken pair of channels: (client side, server side).
async fn connected(limits: ChannelLimits) -> Result<(Half, Half)> {
    connected_with(limits, limits).await
}

/// Like [`connected`], with separate limits for the client and the server side.
async fn connected_with(client: ChannelLimits, server: ChannelLimits) -> Result<(Half, Half)> {
    let cluster = ClusterSigningKey::generate()?;
    let server_key = NoiseKeypair::generate()?;
    let client_key = NoiseKeypair::generate()?;
    let cert = cluster.certify(NodeRole::Standalone, server_key.public());
    let (mut c, mut s) = tcp_pair().await?;
    let pinned = NodeVerifier::new(cluster.public_key());
    let (co, so) = tokio::join!(
        noise::initiate(&mut c, &client_key, &pinned, DEADLINE),
        noise::respond(&mut s, &server_key, &cert, DEADLINE)
    );
    let (co, so) = (co?, so?);
    assert_eq!(co.handshake_hash, so.handshake_hash);
    assert_eq!(&co.remote_static, server_key.public());
    assert_eq!(&so.remote_static, client_key.public());
    assert_eq!(co.server_role, Some(NodeRole::Standalone));
    Ok((split(c, &co, client), split(s, &so, server)))
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn ten_mib_frame_crosses_intact_in_both_directions() -> Result<()> {
    let ((mut cr, mut cw), (mut sr, mut sw)) = connected(ChannelLimits::default()).await?;
    let big = pattern(10 * 1024 * 1024);
    let (sent, got) = tokio::join!(cw.send_frame(&big), sr.recv_frame());
    sent?;
    assert!(got? == Some(big.clone()), "10 MiB frame changed in transit");
    let (sent, got) = tokio::join!(sw.send_frame(&big), cr.recv_frame());
    sent?;
    assert!(got? == Some(big), "10 MiB frame changed on the way back");
    Ok(())
}

#[tokio::test]
async fn frames_of_every_boundary_size_round_trip() -> Result<()> {
    let ((_cr, mut cw), (mut sr, _sw)) = connected(ChannelLimits::default()).await?;
    let plain = MAX_NOISE_MESSAGE - 16;
    let sizes = [
        0,
        1,
        255,
        plain - 4,
        plain - 3,
        plain,
        plain + 1,
        2 * plain + 7,
        65536,
    ];
    let writer = async {
        for &n in &sizes {
            cw.send_frame(&pattern(n)).await?;
        }
        drop(cw);
        Ok::<_, TransportError>(())
    };
    let reader = async {
        let mut got = Vec::new();
        while let Some(f) = sr.recv_frame().await? {
            got.push(f);
        }
        Ok::<_, TransportError>(got)
    };
    let (w, got) = tokio::join!(writer, reader);
    w?;
    let got = got?;
    assert_eq!(got.len(), sizes.len());
    for (frame, &n) in got.iter().zip(&sizes) {
        assert_eq!(frame, &pattern(n));
    }
    Ok(())
}

#[tokio::test]
async fn stream_view_carries_bytes_and_ends_cleanly() -> Result<()> {
    let ((_cr, mut cw), (mut sr, _sw)) = connected(ChannelLimits::default()).await?;
    let data = pattern(3 * 1024 * 1024 + 17);
    let writer = async {
        for piece in data.chunks(10_000) {
            cw.write_all(piece).await?;
        }
        cw.flush().await?;
        cw.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let mut got = Vec::new();
    let (w, r) = tokio::join!(writer, sr.read_to_end(&mut got));
    w?;
    r?;
    assert!(got == data, "stream view altered the bytes");
    Ok(())
}

#[tokio::test]
async fn oversized_frame_is_refused_before_its_body_arrives() -> Result<()> {
    let small = ChannelLimits {
        max_frame_bytes: 1024,
    };
    let ((_cr, mut cw), (mut sr, _sw)) = connected_with(ChannelLimits::default(), small).await?;
    // A frame within the limit passes.
    cw.send_frame(&[7u8; 1024]).await?;
    assert_eq!(sr.recv_frame().await?.map(|f| f.len()), Some(1024));
    // A header announcing 4 GiB - 1 with no body: the receiver fails at the header instead of
    // allocating or waiting for the body.
    cw.send_unframed(&u32::MAX.to_be_bytes()).await?;
    match tokio::time::timeout(DEADLINE, sr.recv_frame()).await? {
        Err(TransportError::FrameTooLarge { len, max: 1024 }) => {
            assert_eq!(len, u32::MAX as usize)
        }
        other => bail!("expected FrameTooLarge, got {other:?}"),
    }
    // The reader stays failed.
    assert!(sr.recv_frame().await.is_err());
    // The stream view rejects it the same way.
    let ((_cr, mut cw), (mut sr, _sw)) = connected_with(ChannelLimits::default(), small).await?;
    cw.send_unframed(&2048u32.to_be_bytes()).await?;
    let mut buf = [0u8; 16];
    let err = sr.read(&mut buf).await.err();
    assert_eq!(err.map(|e| e.kind()), Some(std::io::ErrorKind::InvalidData));
    // And a sender refuses to exceed its own limit.
    let ((_cr, mut strict_writer), _) = connected(small).await?;
    assert!(matches!(
        strict_writer.send_frame(&[0u8; 1025]).await,
        Err(TransportError::FrameTooLarge {
            len: 1025,
            max: 1024
        })
    ));
    Ok(())
}

#[tokio::test]
async fn truncated_frame_is_an_error_not_a_clean_end() -> Result<()> {
    let ((_cr, mut cw), (mut sr, _sw)) = connected(ChannelLimits::default()).await?;
    let mut partial = 100u32.to_be_bytes().to_vec();
    partial.extend_from_slice(&[1u8; 10]);
    cw.send_unframed(&partial).await?;
    drop(cw);
    assert!(matches!(sr.recv_frame().await, Err(TransportError::Closed)));
    Ok(())
}

#[tokio::test]
async fn tampered_transport_message_fails_authentication() -> Result<()> {
    let cluster = ClusterSigningKey::generate()?;
    let server_key = NoiseKeypair::generate()?;
    let cert = cluster.certify(NodeRole::Edge, server_key.public());
    let (mut c, mut s) = tcp_pair().await?;
    let client_key = NoiseKeypair::generate()?;
    let pinned = NodeVerifier::new(cluster.public_key());
    let (co, so) = tokio::join!(
        noise::initiate(&mut c, &client_key, &pinned, DEADLINE),
        noise::respond(&mut s, &server_key, &cert, DEADLINE)
    );
    let (_co, so) = (co?, so?);
    // A well-formed length prefix followed by 40 bytes that are not a valid ciphertext.
    let mut bogus = 40u16.to_be_bytes().to_vec();
    bogus.extend_from_slice(&[0xA5; 40]);
    c.write_all(&bogus).await?;
    let (mut sr, _sw) = split(s, &so, ChannelLimits::default());
    assert!(matches!(
        sr.recv_frame().await,
        Err(TransportError::Decrypt)
    ));
    Ok(())
}

#[tokio::test]
async fn wrong_pinned_cluster_key_aborts_the_handshake() -> Result<()> {
    let cluster = ClusterSigningKey::generate()?;
    let impostor = ClusterSigningKey::generate()?;
    let server_key = NoiseKeypair::generate()?;
    let cert = cluster.certify(NodeRole::Edge, server_key.public());
    let (mut c, mut s) = tcp_pair().await?;
    let client_key = NoiseKeypair::generate()?;
    let pinned = NodeVerifier::new(impostor.public_key());
    let client = async {
        let r = noise::initiate(&mut c, &client_key, &pinned, DEADLINE).await;
        drop(c);
        r
    };
    let (co, so) = tokio::join!(client, noise::respond(&mut s, &server_key, &cert, DEADLINE));
    assert!(matches!(co, Err(TransportError::WrongClusterKey)));
    assert!(matches!(so, Err(TransportError::Closed)));
    Ok(())
}

#[tokio::test]
async fn stalled_initiator_hits_the_handshake_deadline() -> Result<()> {
    let cluster = ClusterSigningKey::generate()?;
    let server_key = NoiseKeypair::generate()?;
    let cert = cluster.certify(NodeRole::Edge, server_key.public());
    let (_c, mut s) = tcp_pair().await?;
    let r = noise::respond(&mut s, &server_key, &cert, Duration::from_millis(50)).await;
    assert!(matches!(r, Err(TransportError::HandshakeTimeout)));
    Ok(())
}

#[tokio::test]
async fn garbage_instead_of_a_handshake_is_refused() -> Result<()> {
    let cluster = ClusterSigningKey::generate()?;
    let server_key = NoiseKeypair::generate()?;
    let cert = cluster.certify(NodeRole::Edge, server_key.public());
    let (mut c, mut s) = tcp_pair().await?;
    // Length 0xFFFF: longer than any handshake message.
    c.write_all(&[0xFF; 64]).await?;
    let r = noise::respond(&mut s, &server_key, &cert, DEADLINE).await;
    assert!(matches!(r, Err(TransportError::Handshake(_))));
    // A plausible length with random contents.
    let (mut c, mut s) = tcp_pair().await?;
    let mut msg = 32u16.to_be_bytes().to_vec();
    msg.extend_from_slice(&[0x11; 32]);
    c.write_all(&msg).await?;
    drop(c);
    let r = noise::respond(&mut s, &server_key, &cert, DEADLINE).await;
    assert!(r.is_err());
    Ok(())
}

/// Receive buffers grow with a large frame's bytes and are given back whole once the peer
/// goes quiet: an idle reader holds no receive buffer, whatever it received before.
#[tokio::test]
async fn receive_buffers_follow_the_bytes_that_arrive() -> Result<()> {
    let ((_cr, mut cw), (mut sr, _sw)) = connected(ChannelLimits::default()).await?;
    for size in [1 << 20, 100] {
        let frame = pattern(size);
        cw.send_frame(&frame).await?;
        assert_eq!(sr.recv_frame().await?, Some(frame));
        // One poll of the next read finds nothing to read: the peer is quiet.
        tokio::select! {
            biased;
            r = sr.recv_frame() => bail!("nothing was sent, got {r:?}"),
            () = std::future::ready(()) => {}
        }
        assert_eq!(
            sr.buffer_capacity(),
            0,
            "{} bytes kept after a {size}-byte frame",
            sr.buffer_capacity()
        );
    }
    // And they grow again for the next frame.
    let again = pattern(300_000);
    cw.send_frame(&again).await?;
    assert_eq!(sr.recv_frame().await?, Some(again));
    Ok(())
}

/// Makes `reader` take push frames of up to 2 MiB into the returned list, in order.
fn collect_pushes(reader: &mut NoiseReader<OwnedReadHalf>) -> Rc<RefCell<Vec<Vec<u8>>>> {
    let got: Rc<RefCell<Vec<Vec<u8>>>> = Rc::default();
    let into = Rc::clone(&got);
    reader.on_push(
        Box::new(move |frame| {
            into.borrow_mut().push(frame);
            Ok(())
        }),
        2 * 1024 * 1024,
    );
    got
}

/// Push frames beside the stream view, on one channel: in order, whole, and not mixed into
/// the byte stream, however large; the pump writes both and closes the socket after a shutdown.
#[tokio::test]
async fn push_frames_travel_beside_the_byte_stream() -> Result<()> {
    use tokio::io::AsyncWriteExt;

    let ((_cr, cw), (mut sr, _sw)) = connected(ChannelLimits::default()).await?;
    let got = collect_pushes(&mut sr);
    let (mut rpc, port, pump) = quicproquo_core::mux::mux(cw);
    let pushes: Vec<Arc<[u8]>> = [0usize, 1, 70_000, 1024 * 1024, 5]
        .iter()
        .map(|&n| Arc::from(pattern(n + 1)))
        .collect();
    let stream = pattern(600_000);
    let local = tokio::task::LocalSet::new();
    let (written, read, pumped) = local
        .run_until(async {
            let pump = tokio::task::spawn_local(pump);
            let write = async {
                for (i, p) in pushes.iter().enumerate() {
                    port.push(Arc::clone(p))?;
                    let part = stream.len() / pushes.len();
                    rpc.write_all(&stream[i * part..(i + 1) * part]).await?;
                    rpc.flush().await?;
                }
                let rest = stream.len() / pushes.len() * pushes.len();
                rpc.write_all(&stream[rest..]).await?;
                port.written().await?;
                rpc.shutdown().await?;
                drop(rpc);
                anyhow::Ok(())
            };
            let read = async {
                let mut all = Vec::new();
                sr.read_to_end(&mut all).await?;
                anyhow::Ok(all)
            };
            let (w, r) = tokio::join!(write, read);
            (w, r, pump.await)
        })
        .await;
    written?;
    assert!(read? == stream, "the byte stream changed beside the pushes");
    pumped??;
    let got = got.borrow();
    assert_eq!(got.len(), pushes.len(), "every push frame arrives once");
    for (g, p) in got.iter().zip(&pushes) {
        assert!(g[..] == p[..], "a push frame changed or came out of order");
    }
    assert!(
        port.push(Arc::from(pattern(1))).is_err(),
        "no pushes after close"
    );
    Ok(())
}

/// The reading side as a task of its own (`inbound`): push frames reach their handler and the
/// RPC bytes the RPC reader, each whole and in order, with the RPC reader not reading while
/// pushes arrive; the pump ends at the end of the stream.
#[tokio::test]
async fn a_read_pump_splits_push_frames_from_the_byte_stream() -> Result<()> {
    use tokio::io::AsyncWriteExt;

    let ((_cr, cw), (mut sr, _sw)) = connected(ChannelLimits::default()).await?;
    let got = collect_pushes(&mut sr);
    let (mut rpc_in, read_pump) = quicproquo_core::inbound::split(sr);
    let (mut rpc, port, pump) = quicproquo_core::mux::mux(cw);
    // More pushes than the RPC bytes the pump holds, and a byte stream several times that.
    let pushes: Vec<Arc<[u8]>> = (0..200).map(|n| Arc::from(pattern(n * 7 + 1))).collect();
    let stream = pattern(5 * quicproquo_core::inbound::RPC_IN_LIMIT + 3);
    let local = tokio::task::LocalSet::new();
    let (written, read, pumped) = local
        .run_until(async {
            let pump = tokio::task::spawn_local(pump);
            let read_pump = tokio::task::spawn_local(read_pump);
            for p in &pushes {
                port.push(Arc::clone(p))?;
            }
            port.written().await?;
            // Every push is handled with no RPC read at all.
            let handled = async {
                while got.borrow().len() < pushes.len() {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(Duration::from_secs(10), handled).await?;
            let write = async {
                rpc.write_all(&stream).await?;
                rpc.shutdown().await?;
                drop(rpc);
                anyhow::Ok(())
            };
            let read = async {
                let mut all = Vec::new();
                rpc_in.read_to_end(&mut all).await?;
                anyhow::Ok(all)
            };
            let (w, r) = tokio::join!(write, read);
            pump.await??;
            anyhow::Ok((w, r, read_pump.await?))
        })
        .await?;
    written?;
    assert!(read? == stream, "the byte stream changed beside the pushes");
    pumped?;
    let got = got.borrow();
    assert_eq!(got.len(), pushes.len(), "every push frame arrives once");
    for (g, p) in got.iter().zip(&pushes) {
        assert!(g[..] == p[..], "a push frame changed or came out of order");
    }
    Ok(())
}

/// A peer that sends RPC bytes faster than the RPC system reads them makes the read pump hold
/// at most `RPC_IN_LIMIT` of them (the rest waits in the socket), and nothing is lost.
#[tokio::test]
async fn a_read_pump_holds_at_most_its_limit_of_unread_rpc_bytes() -> Result<()> {
    use quicproquo_core::inbound::RPC_IN_LIMIT;
    use tokio::io::AsyncWriteExt;

    let ((_cr, cw), (sr, _sw)) = connected(ChannelLimits::default()).await?;
    let (mut rpc_in, read_pump) = quicproquo_core::inbound::split(sr);
    let (mut rpc, _port, pump) = quicproquo_core::mux::mux(cw);
    let stream = pattern(16 * RPC_IN_LIMIT);
    let sent = stream.clone();
    let local = tokio::task::LocalSet::new();
    let read = local
        .run_until(async {
            tokio::task::spawn_local(pump);
            tokio::task::spawn_local(read_pump);
            tokio::task::spawn_local(async move {
                rpc.write_all(&sent).await?;
                rpc.shutdown().await?;
                anyhow::Ok(())
            });
            let filled = async {
                while rpc_in.held() < RPC_IN_LIMIT {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(Duration::from_secs(10), filled).await?;
            // The writer and both pumps keep running; what is held stays at the limit.
            for _ in 0..1_000 {
                tokio::task::yield_now().await;
                assert!(
                    rpc_in.held() <= RPC_IN_LIMIT,
                    "the read pump holds {} unread bytes",
                    rpc_in.held()
                );
            }
            let mut all = Vec::new();
            rpc_in.read_to_end(&mut all).await?;
            anyhow::Ok(all)
        })
        .await?;
    assert!(read == stream, "the byte stream changed under backpressure");
    Ok(())
}

/// A read pump passes the channel's error to the RPC reader (here a push frame its handler
/// refuses), and ends once the RPC reader is gone.
#[tokio::test]
async fn a_read_pump_reports_errors_and_ends_with_its_reader() -> Result<()> {
    let ((_cr, cw), (mut sr, _sw)) = connected(ChannelLimits::default()).await?;
    sr.on_push(
        Box::new(|_| Err(TransportError::Push("refused by the handler".into()))),
        1024,
    );
    let (mut rpc_in, read_pump) = quicproquo_core::inbound::split(sr);
    let (_rpc, port, pump) = quicproquo_core::mux::mux(cw);
    let local = tokio::task::LocalSet::new();
    let (read, pumped) = local
        .run_until(async {
            tokio::task::spawn_local(pump);
            let read_pump = tokio::task::spawn_local(read_pump);
            port.push(Arc::from(pattern(10)))?;
            let mut buf = [0u8; 16];
            let read = rpc_in.read(&mut buf).await;
            anyhow::Ok((read, read_pump.await?))
        })
        .await?;
    match read {
        Err(e) => assert!(e.to_string().contains("refused by the handler"), "{e}"),
        Ok(n) => bail!("read {n} bytes after a refused push frame"),
    }
    assert!(pumped.is_err(), "the pump ends with the channel's error");

    let ((_cr, _cw), (sr, _sw)) = connected(ChannelLimits::default()).await?;
    let (rpc_in, read_pump) = quicproquo_core::inbound::split(sr);
    let local = tokio::task::LocalSet::new();
    let ended = local
        .run_until(async {
            let read_pump = tokio::task::spawn_local(read_pump);
            drop(rpc_in);
            tokio::time::timeout(Duration::from_secs(10), read_pump).await
        })
        .await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the pump ends once its RPC reader is dropped"
    );
    Ok(())
}

/// A reader that asked for no push frames refuses one: the connection ends.
#[tokio::test]
async fn an_unasked_push_frame_ends_the_connection() -> Result<()> {
    let ((_cr, cw), (mut sr, _sw)) = connected(ChannelLimits::default()).await?;
    let (_rpc, port, pump) = quicproquo_core::mux::mux(cw);
    let local = tokio::task::LocalSet::new();
    let read = local
        .run_until(async {
            tokio::task::spawn_local(pump);
            port.push(Arc::from(pattern(10)))?;
            let mut buf = [0u8; 16];
            anyhow::Ok(sr.read(&mut buf).await)
        })
        .await?;
    match read {
        Err(e) => assert!(e.to_string().contains("push frame refused"), "{e}"),
        Ok(n) => bail!("read {n} bytes of an unasked push frame"),
    }
    Ok(())
}

/// A push frame longer than the reader takes ends the connection before it is buffered.
#[tokio::test]
async fn an_oversized_push_frame_ends_the_connection() -> Result<()> {
    let ((_cr, cw), (mut sr, _sw)) = connected(ChannelLimits::default()).await?;
    sr.on_push(Box::new(|_| Ok(())), 1024);
    let (_rpc, port, pump) = quicproquo_core::mux::mux(cw);
    let local = tokio::task::LocalSet::new();
    let read = local
        .run_until(async {
            tokio::task::spawn_local(pump);
            port.push(Arc::from(pattern(1025)))?;
            let mut buf = [0u8; 16];
            anyhow::Ok(sr.read(&mut buf).await)
        })
        .await?;
    match read {
        Err(e) => assert!(e.to_string().contains("1025"), "{e}"),
        Ok(n) => bail!("read {n} bytes of an oversized push frame"),
    }
    assert!(
        sr.buffer_capacity() < 64 * 1024,
        "nothing was buffered for it"
    );
    Ok(())
}
