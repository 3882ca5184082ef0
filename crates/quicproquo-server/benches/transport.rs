//! Transport benchmarks, each next to a bare baseline measured in the same run.
//!
//! - `handshake/bare_snow_xx_tcp`: TCP connect + a plain snow Noise_XX handshake against a
//!   minimal responder (no certificate, no caps, no workers).
//! - `handshake/qpq_accept_path`: TCP connect + the client's handshake (certificate checked
//!   against the pinned cluster key) against the real server's accept path.
//! - `throughput/raw_tcp/N`: loopback TCP, `N`-byte writes, no encryption.
//! - `throughput/noise_framed/N`: the framed Noise channel, `N`-byte frames.
//!
//! Run: `cargo bench -p quicproquo-server --bench transport`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quicproquo_core::channel::{ChannelLimits, channel};
use quicproquo_core::noise::{self, NOISE_PARAMS, PROLOGUE};
use quicproquo_core::{ClusterSigningKey, NodeRole, NodeVerifier, NoiseKeypair};
use quicproquo_server::{NodeIdentity, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(10);
/// Bytes moved per throughput iteration.
const BYTES_PER_ITER: usize = 64 * 1024 * 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}

async fn write_msg(s: &mut TcpStream, m: &[u8]) -> Result<()> {
    s.write_all(&u16::try_from(m.len())?.to_be_bytes()).await?;
    s.write_all(m).await?;
    Ok(())
}

async fn read_msg(s: &mut TcpStream, buf: &mut [u8]) -> Result<usize> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let n = usize::from(u16::from_be_bytes(len));
    s.read_exact(&mut buf[..n]).await?;
    Ok(n)
}

/// A minimal snow XX responder on its own single-threaded runtime thread.
fn spawn_bare_responder() -> Result<std::net::SocketAddr> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let params = NOISE_PARAMS.parse()?;
    let key = snow::Builder::new(params).generate_keypair()?;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        rt.block_on(async move {
            let listener = TcpListener::from_std(std_listener)?;
            loop {
                let (mut s, _) = listener.accept().await?;
                let private = key.private.clone();
                tokio::spawn(async move {
                    let r: Result<()> = async {
                        s.set_nodelay(true)?;
                        let mut hs = snow::Builder::new(NOISE_PARAMS.parse()?)
                            .local_private_key(&private)?
                            .prologue(PROLOGUE)?
                            .build_responder()?;
                        let (mut buf, mut out) = ([0u8; 512], [0u8; 512]);
                        let n = read_msg(&mut s, &mut buf).await?;
                        hs.read_message(&buf[..n], &mut out)?;
                        let n = hs.write_message(&[], &mut out)?;
                        write_msg(&mut s, &out[..n]).await?;
                        let n = read_msg(&mut s, &mut buf).await?;
                        hs.read_message(&buf[..n], &mut out)?;
                        hs.into_stateless_transport_mode()?;
                        Ok(())
                    }
                    .await;
                    drop(r);
                });
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        })
    });
    Ok(addr)
}

async fn bare_initiator(addr: std::net::SocketAddr, private: &[u8]) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut hs = snow::Builder::new(NOISE_PARAMS.parse()?)
        .local_private_key(private)?
        .prologue(PROLOGUE)?
        .build_initiator()?;
    let (mut buf, mut out) = ([0u8; 512], [0u8; 512]);
    let n = hs.write_message(&[], &mut out)?;
    write_msg(&mut s, &out[..n]).await?;
    let n = read_msg(&mut s, &mut buf).await?;
    hs.read_message(&buf[..n], &mut out)?;
    let n = hs.write_message(&[], &mut out)?;
    write_msg(&mut s, &out[..n]).await?;
    hs.into_stateless_transport_mode()?;
    Ok(())
}

fn handshakes(c: &mut Criterion) {
    let rt = runtime();
    let bare_addr = spawn_bare_responder().unwrap_or_else(|e| panic!("bare responder: {e}"));
    let client_key = snow::Builder::new(NOISE_PARAMS.parse().unwrap_or_else(|e| panic!("{e}")))
        .generate_keypair()
        .unwrap_or_else(|e| panic!("{e}"));

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = ServerConfig::for_role(NodeRole::Standalone, dir.path().join("data"));
    let identity = NodeIdentity::load_or_create(&config.data_dir, NodeRole::Standalone)
        .unwrap_or_else(|e| panic!("{e}"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let server = {
        let store = quicproquo_server::open_store(&config).unwrap_or_else(|e| panic!("{e}"));
        quicproquo_server::start(config, listener, identity, store)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let server_addr = server.local_addr();
    let pinned = NodeVerifier::new(server.cluster_key());
    let qpq_key = NoiseKeypair::generate().unwrap_or_else(|e| panic!("{e}"));

    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("bare_snow_xx_tcp", |b| {
        b.to_async(&rt).iter(|| async {
            bare_initiator(bare_addr, &client_key.private)
                .await
                .unwrap_or_else(|e| panic!("bare handshake: {e}"));
        });
    });
    group.bench_function("qpq_accept_path", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = TcpStream::connect(server_addr)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            s.set_nodelay(true).unwrap_or_else(|e| panic!("{e}"));
            noise::initiate(&mut s, &qpq_key, &pinned, DEADLINE)
                .await
                .unwrap_or_else(|e| panic!("handshake: {e}"));
        });
    });
    group.finish();
    server.shutdown();
    let _ = server.join();
}

async fn tcp_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (a, b) = (a?, b?.0);
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    Ok((a, b))
}

async fn raw_round(size: usize, count: usize) -> Result<Duration> {
    let (mut tx, mut rx) = tcp_pair().await?;
    let payload = vec![0x5Au8; size];
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..count {
            tx.write_all(&payload).await?;
        }
        tx.flush().await?;
        Ok::<_, std::io::Error>(tx)
    });
    let mut buf = vec![0u8; size];
    for _ in 0..count {
        rx.read_exact(&mut buf).await?;
    }
    let elapsed = started.elapsed();
    drop(sender.await??);
    Ok(elapsed)
}

async fn framed_round(size: usize, count: usize) -> Result<Duration> {
    let cluster = ClusterSigningKey::generate()?;
    let (server_key, client_key) = (NoiseKeypair::generate()?, NoiseKeypair::generate()?);
    let cert = cluster.certify(NodeRole::Edge, server_key.public());
    let (mut a, mut b) = tcp_pair().await?;
    let pinned = NodeVerifier::new(cluster.public_key());
    let (ao, bo) = tokio::join!(
        noise::initiate(&mut a, &client_key, &pinned, DEADLINE),
        noise::respond(&mut b, &server_key, &cert, DEADLINE)
    );
    let (ao, bo) = (ao?, bo?);
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let (_ar, mut tx) = channel(ar, aw, Arc::clone(&ao.session), ChannelLimits::default());
    let (mut rx, _bw) = channel(br, bw, Arc::clone(&bo.session), ChannelLimits::default());
    let payload = vec![0x5Au8; size];
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..count {
            tx.send_frame(&payload).await?;
        }
        Ok::<_, quicproquo_core::TransportError>(tx)
    });
    for _ in 0..count {
        let frame = rx.recv_frame().await?;
        anyhow::ensure!(frame.map(|f| f.len()) == Some(size), "short frame");
    }
    let elapsed = started.elapsed();
    drop(sender.await??);
    Ok(elapsed)
}

fn throughput(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("throughput");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for size in [256usize, 64 * 1024] {
        let count = BYTES_PER_ITER / size / if size < 4096 { 16 } else { 1 };
        group.throughput(Throughput::Bytes((size * count) as u64));
        group.bench_function(format!("raw_tcp/{size}"), |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += raw_round(size, count)
                        .await
                        .unwrap_or_else(|e| panic!("raw: {e}"));
                }
                total
            });
        });
        group.bench_function(format!("noise_framed/{size}"), |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += framed_round(size, count)
                        .await
                        .unwrap_or_else(|e| panic!("framed: {e}"));
                }
                total
            });
        });
    }
    group.finish();
}

criterion_group!(benches, handshakes, throughput);
criterion_main!(benches);
