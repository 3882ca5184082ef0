//! The floor: a bare Noise fan-out relay on a thread of its own. It accepts the receivers'
//! connections, then the sender's; every frame the sender sends is decrypted once and sealed
//! and written to every receiver under its own session (the project's Noise channel, the same
//! snow backend as the server). No RPC, no store, no ordering: what any fan-out must pay.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use quicproquo_core::channel::{ChannelLimits, channel};
use quicproquo_core::noise;
use quicproquo_core::{NodeRole, NodeVerifier, NoiseKeypair};
use quicproquo_server::NodeIdentity;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::spawn_local;

use crate::cpu;
use crate::{Measured, Settings};

const DEADLINE: Duration = Duration::from_secs(60);
/// The relay's thread name, by which its CPU is counted.
const RELAY_THREAD: &str = "bare-relay";

/// Starts the relay for `receivers` receivers followed by one sender; it ends when the
/// sender disconnects.
fn spawn_relay(
    identity: NodeIdentity,
    receivers: usize,
) -> Result<(SocketAddr, std::thread::JoinHandle<Result<()>>)> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let thread = std::thread::Builder::new()
        .name(RELAY_THREAD.into())
        .spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener)?;
                let mut writers = Vec::with_capacity(receivers);
                for _ in 0..receivers {
                    let (mut s, _) = listener.accept().await?;
                    s.set_nodelay(true)?;
                    let hs =
                        noise::respond(&mut s, &identity.noise, &identity.certificate(), DEADLINE)
                            .await?;
                    let (_, w) = s.into_split();
                    let (_, writer) =
                        channel(tokio::io::empty(), w, hs.session, ChannelLimits::default());
                    writers.push(writer);
                }
                let (mut s, _) = listener.accept().await?;
                s.set_nodelay(true)?;
                let hs = noise::respond(&mut s, &identity.noise, &identity.certificate(), DEADLINE)
                    .await?;
                let (r, _w) = s.into_split();
                let (mut reader, _) =
                    channel(r, tokio::io::sink(), hs.session, ChannelLimits::default());
                while let Some(frame) = reader.recv_frame().await? {
                    for w in &mut writers {
                        w.send_frame(&frame).await?;
                    }
                }
                Ok(())
            })
        })?;
    Ok((addr, thread))
}

async fn connect(
    addr: SocketAddr,
    verifier: &NodeVerifier,
) -> Result<(TcpStream, std::sync::Arc<noise::Session>)> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let key = NoiseKeypair::generate()?;
    let hs = noise::initiate(&mut s, &key, verifier, DEADLINE).await?;
    Ok((s, hs.session))
}

/// Runs both phases through the bare relay: paced (one message per frame), then a backlog
/// (`batch` messages per frame, as the server's pushes carry entries under a backlog), with
/// messages of `message_bytes` (the size of one pushed entry).
pub(crate) async fn run(s: &Settings, message_bytes: usize) -> Result<[Measured; 2]> {
    let dir = tempfile::tempdir()?;
    let identity = NodeIdentity::load_or_create(dir.path(), NodeRole::Standalone)?;
    let verifier = NodeVerifier::new(identity.cluster_public());
    let (addr, relay) = spawn_relay(identity, s.subscribers)?;

    let delivered = Rc::new(Cell::new(0u64));
    let frames = Rc::new(Cell::new(0u64));
    let target = Rc::new(Cell::new(0u64));
    let done = Rc::new(Notify::new());
    let mut receivers = Vec::with_capacity(s.subscribers);
    for _ in 0..s.subscribers {
        let (stream, session) = connect(addr, &verifier).await?;
        let (r, w) = stream.into_split();
        let (mut reader, _) = channel(r, tokio::io::sink(), session, ChannelLimits::default());
        let (delivered, target, done) =
            (Rc::clone(&delivered), Rc::clone(&target), Rc::clone(&done));
        let frames = Rc::clone(&frames);
        receivers.push(spawn_local(async move {
            let _keep = w;
            while let Ok(Some(frame)) = reader.recv_frame().await {
                frames.set(frames.get() + 1);
                delivered.set(delivered.get() + (frame.len() / message_bytes) as u64);
                if delivered.get() >= target.get() {
                    done.notify_one();
                }
            }
        }));
    }
    let (stream, session) = connect(addr, &verifier).await?;
    let (_r, w) = stream.into_split();
    let (_, mut sender) = channel(tokio::io::empty(), w, session, ChannelLimits::default());
    let message = vec![0x5a; message_bytes];
    let recipients = s.subscribers as u64;

    let wait = |goal: u64| {
        let (delivered, done) = (Rc::clone(&delivered), Rc::clone(&done));
        async move {
            let until = tokio::time::Instant::now() + s.deadline;
            while delivered.get() < goal {
                if tokio::time::timeout_at(until, done.notified())
                    .await
                    .is_err()
                {
                    bail!("bare: {} of {goal} deliveries", delivered.get());
                }
            }
            Ok(Instant::now())
        }
    };

    target.set(s.paced_messages * recipients);
    let cpu0 = cpu::snapshot();
    let start = Instant::now();
    for i in 0..s.paced_messages {
        let planned = start + Duration::from_secs_f64(i as f64 / s.rate);
        tokio::time::sleep_until(planned.into()).await;
        sender.send_frame(&message).await?;
    }
    let end = wait(target.get()).await?;
    let paced = Measured {
        deliveries: delivered.get(),
        pushes: frames.get(),
        wall: end - start,
        server_cpu_ns: cpu::Snapshot::since(&cpu0, &[RELAY_THREAD]),
        worker_cpu_ns: cpu::Snapshot::since(&cpu0, &[RELAY_THREAD]),
    };

    let goal = (s.paced_messages + s.backlog_messages) * recipients;
    target.set(goal);
    let cpu0 = cpu::snapshot();
    let start = Instant::now();
    let mut left = s.backlog_messages;
    while left > 0 {
        let n = left.min(s.batch);
        sender
            .send_frame(&message.repeat(usize::try_from(n)?))
            .await?;
        left -= n;
    }
    let end = wait(goal).await?;
    let backlog = Measured {
        deliveries: delivered.get() - paced.deliveries,
        pushes: frames.get() - paced.pushes,
        wall: end - start,
        server_cpu_ns: cpu::Snapshot::since(&cpu0, &[RELAY_THREAD]),
        worker_cpu_ns: cpu::Snapshot::since(&cpu0, &[RELAY_THREAD]),
    };
    drop(sender);
    relay
        .join()
        .map_err(|_| anyhow::anyhow!("the relay panicked"))?
        .context("relay")?;
    drop(receivers);
    Ok([paced, backlog])
}
