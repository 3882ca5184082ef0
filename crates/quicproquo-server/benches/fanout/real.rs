//! The real server: a standalone node in this process, one group of `subscribers + 1` members
//! (a creator that sends, everyone else subscribed on a connection of its own), each a light
//! receiver that only takes the pushed batches off its connection and counts them.

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use quicproquo_client::chat::Chat;
use quicproquo_client::delivery::SendOutcome;
use quicproquo_client::{ClientState, ConnectOptions, Connection, Session};
use quicproquo_core::NodeRole;
use quicproquo_core::group::Group;
use quicproquo_core::mls::Suite;
use quicproquo_server::{NodeIdentity, ServerConfig, ServerHandle};
use tokio::sync::Notify;
use tokio::task::spawn_local;

use crate::cpu;
use crate::{Measured, Settings, plaintext};

/// The server's threads: connection workers, the appender, and the store's blocking pool
/// (tokio's default thread name; the bench's own runtime names its threads otherwise).
const SERVER_THREADS: [&str; 2] = ["qpq-", "tokio-r"];
/// The part of [`SERVER_THREADS`] that serves connections (subscriptions, pushes, calls).
const WORKER_THREADS: [&str; 1] = ["qpq-worker"];

/// Starts a standalone server in this process with room for every member on loopback, and
/// for `in_flight` calls outstanding on one connection (the backlog's sender).
pub(crate) fn start_server(dir: &Path, members: usize, in_flight: usize) -> Result<ServerHandle> {
    let mut config = ServerConfig::for_role(NodeRole::Standalone, dir.join("data"));
    config.limits.max_calls_in_flight = config.limits.max_calls_in_flight.max(in_flight);
    config.max_connections = members + 64;
    config.max_handshakes = config.max_connections;
    config.limits.max_connections_per_address = config.max_connections;
    config.limits.max_handshakes_per_address = config.max_handshakes;
    config.limits.rates.binds_per_address = u32::MAX;
    config.limits.rates.fetches_per_address = u32::MAX;
    config.limits.rates.fetches_per_identity = u32::MAX;
    config.limits.idle_timeout = Duration::from_secs(3600);
    config.handshake_timeout = Duration::from_secs(60);
    config.shutdown_grace = Duration::from_secs(2);
    let identity = NodeIdentity::load_or_create(&config.data_dir, NodeRole::Standalone)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let store = quicproquo_server::open_store(&config)?;
    Ok(quicproquo_server::start(config, listener, identity, store)?)
}

/// A registered member: its connection and bound session.
struct Member {
    state: ClientState,
    name: String,
    session: Session,
    _conn: Connection,
}

async fn register(addr: SocketAddr, options: &ConnectOptions, index: usize) -> Result<Member> {
    let name = format!("fan{index:04}");
    let mut state = ClientState::create(Suite::Classical)?;
    state.name = Some(name.clone());
    let conn = Connection::connect(addr, options).await?;
    let session = conn.bind(state.identity()).await?;
    session.auth.claim_name(&name).await?;
    let kps = state
        .mls_identity()
        .key_packages(&state.mls, Suite::Classical, 1)?;
    session.auth.upload_key_packages(&kps, None).await?;
    Ok(Member {
        state,
        name,
        session,
        _conn: conn,
    })
}

/// What every receiver adds to.
#[derive(Default)]
struct Counts {
    delivered: Cell<u64>,
    pushes: Cell<u64>,
    target: Cell<u64>,
    out_of_order: Cell<u64>,
    last_at: Cell<Option<Instant>>,
    done: Notify,
}

impl Counts {
    fn add(&self, n: u64) {
        self.pushes.set(self.pushes.get() + 1);
        self.delivered.set(self.delivered.get() + n);
        if self.delivered.get() >= self.target.get() {
            self.last_at.set(Some(Instant::now()));
            self.done.notify_one();
        }
    }

    /// Waits until `target` deliveries were counted, or fails after `deadline`.
    async fn wait(&self, deadline: Duration) -> Result<Instant> {
        let until = tokio::time::Instant::now() + deadline;
        while self.delivered.get() < self.target.get() {
            if tokio::time::timeout_at(until, self.done.notified())
                .await
                .is_err()
            {
                bail!(
                    "{} of {} deliveries within {deadline:?}",
                    self.delivered.get(),
                    self.target.get()
                );
            }
        }
        self.last_at.get().context("no delivery time")
    }
}

/// How the server pushes to the receivers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    /// `MessageStream.deliver` calls, each answered.
    Calls,
    /// Push frames beside RPC, acknowledged by sequence number.
    Frames,
}

/// Runs both phases against the real server: paced (one entry per push), then a backlog.
pub(crate) async fn run(
    s: &Settings,
    addr: SocketAddr,
    options: ConnectOptions,
    push: Push,
) -> Result<([Measured; 2], usize)> {
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let mut members = Vec::with_capacity(s.subscribers + 1);
    // Register in chunks: every handshake at once would only queue on the server.
    for chunk in (0..=s.subscribers).collect::<Vec<_>>().chunks(64) {
        let batch =
            futures::future::try_join_all(chunk.iter().map(|i| register(addr, &options, *i)))
                .await?;
        members.extend(batch);
    }
    let (creator, others) = members.split_first_mut().context("no members")?;
    let path = dir.path().join("creator.bin");
    let mut chat = Chat::new(&mut creator.state, &path, &creator.session);
    let id = chat.create_group("fanout").await?;
    let names: Vec<String> = others.iter().map(|m| m.name.clone()).collect();
    chat.invite("fanout", &names, &mut |_| {}).await?;
    let after = creator
        .session
        .delivery
        .groups()
        .await?
        .into_iter()
        .find(|g| g.group_id == id)
        .map(|g| g.last_seq)
        .context("the creator does not see the group")?;
    eprintln!(
        "real: {} members registered, group created in {:.1?}",
        s.subscribers + 1,
        t.elapsed()
    );

    let counts = Rc::new(Counts::default());
    let mut receivers = Vec::with_capacity(others.len());
    let (t, cpu0) = (Instant::now(), cpu::snapshot());
    for m in others.iter() {
        let mut sub = match push {
            Push::Calls => m.session.delivery.subscribe_calls(&id, after).await?,
            Push::Frames => m.session.delivery.subscribe(&id, after).await?,
        };
        let counts = Rc::clone(&counts);
        receivers.push(spawn_local(async move {
            let mut next = after + 1;
            while let Some(batch) = sub.next().await {
                for e in &batch {
                    if e.seq != next {
                        counts.out_of_order.set(counts.out_of_order.get() + 1);
                    }
                    next = e.seq + 1;
                }
                counts.add(batch.len() as u64);
            }
        }));
    }

    eprintln!(
        "real: {} subscribed in {:.1?}, {:.1} ms of server CPU per subscription",
        others.len(),
        t.elapsed(),
        cpu::Snapshot::since(&cpu0, &SERVER_THREADS) as f64 / 1e6 / others.len().max(1) as f64
    );

    let mut group = Group::load(&creator.state.mls, &id)?.context("no group")?;
    let total = s.paced_messages + s.backlog_messages;
    let mut messages = Vec::with_capacity(usize::try_from(total)?);
    for i in 0..total {
        let body = plaintext(i, s.payload_bytes);
        messages.push(group.encrypt(&creator.state.mls, creator.state.mls_identity(), &body)?);
    }
    let message_bytes = messages.first().map_or(0, Vec::len);
    let mut messages = messages.into_iter();
    let recipients = others.len() as u64;
    let delivery = creator.session.delivery.clone();

    // Paced: one message every 1/rate, each send its own task.
    counts.target.set(s.paced_messages * recipients);
    let cpu0 = cpu::snapshot();
    let start = Instant::now();
    let mut sends = Vec::new();
    for i in 0..s.paced_messages {
        let planned = start + Duration::from_secs_f64(i as f64 / s.rate);
        tokio::time::sleep_until(planned.into()).await;
        let (delivery, gid, msg) = (delivery.clone(), id.clone(), messages.next());
        let msg = msg.context("message pool")?;
        sends.push(spawn_local(async move {
            delivery.send(&gid, &i.to_be_bytes(), &msg, None).await
        }));
    }
    let end = counts.wait(s.deadline).await?;
    let paced = Measured {
        deliveries: counts.delivered.get(),
        pushes: counts.pushes.get(),
        wall: end - start,
        server_cpu_ns: cpu::Snapshot::since(&cpu0, &SERVER_THREADS),
        worker_cpu_ns: cpu::Snapshot::since(&cpu0, &WORKER_THREADS),
    };
    check_sends(sends).await?;

    // Backlog: every message at once, `in_flight` sends outstanding, from a connection of the
    // creator on a thread of its own. On this thread the sends would wait behind the
    // receivers' work, so they would come at the pace the receivers drain and the server
    // would never hold a backlog (the bare relay's sender is not paced by its receivers
    // either).
    counts.target.set(total * recipients);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let sender = BacklogSender {
        addr,
        options: options.clone(),
        seed: creator.state.identity().seed(),
        group: id.clone(),
        pool: messages.collect(),
        in_flight: s.in_flight,
    };
    let sending = std::thread::Builder::new()
        .name("fanout-sender".into())
        .spawn(move || sender.run(ready_tx, go_rx))?;
    ready_rx
        .await
        .context("the sender thread did not connect")??;
    let cpu0 = cpu::snapshot();
    let start = Instant::now();
    go_tx
        .send(())
        .map_err(|()| anyhow::anyhow!("the sender thread is gone"))?;
    let end = match counts.wait(s.deadline).await {
        Ok(end) => end,
        // A send that failed explains the missing deliveries better than the count does.
        Err(e) if sending.is_finished() => {
            sending
                .join()
                .map_err(|_| anyhow::anyhow!("the sender thread panicked"))??;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let backlog = Measured {
        deliveries: counts.delivered.get() - paced.deliveries,
        pushes: counts.pushes.get() - paced.pushes,
        wall: end - start,
        server_cpu_ns: cpu::Snapshot::since(&cpu0, &SERVER_THREADS),
        worker_cpu_ns: cpu::Snapshot::since(&cpu0, &WORKER_THREADS),
    };
    sending
        .join()
        .map_err(|_| anyhow::anyhow!("the sender thread panicked"))??;
    ensure!(
        counts.out_of_order.get() == 0,
        "{} entries arrived out of order",
        counts.out_of_order.get()
    );
    drop(receivers);
    Ok(([paced, backlog], message_bytes))
}

/// The backlog's sender: the creator on a connection of its own, on a thread of its own.
struct BacklogSender {
    addr: SocketAddr,
    options: ConnectOptions,
    seed: zeroize::Zeroizing<[u8; 32]>,
    group: Vec<u8>,
    pool: Vec<Vec<u8>>,
    in_flight: usize,
}

impl BacklogSender {
    /// Connects and binds, says so on `ready`, waits for `go`, then sends the whole pool with
    /// `in_flight` sends outstanding.
    fn run(
        self,
        ready: tokio::sync::oneshot::Sender<Result<()>>,
        go: tokio::sync::oneshot::Receiver<()>,
    ) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let identity = quicproquo_core::IdentityKeypair::from_seed(&self.seed);
            let bound = async {
                let conn = Connection::connect(self.addr, &self.options).await?;
                let session = conn.bind(&identity).await?;
                anyhow::Ok((conn, session))
            }
            .await;
            let (_conn, session) = match bound {
                Ok(bound) => {
                    let _ = ready.send(Ok(()));
                    bound
                }
                Err(e) => {
                    let _ = ready.send(Err(anyhow::anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            go.await.context("the bench went away")?;
            let pool = Rc::new(self.pool);
            let next = Rc::new(Cell::new(0usize));
            let mut sends = Vec::new();
            for _ in 0..self.in_flight {
                let (delivery, gid, pool, next) = (
                    session.delivery.clone(),
                    self.group.clone(),
                    Rc::clone(&pool),
                    Rc::clone(&next),
                );
                sends.push(spawn_local(async move {
                    loop {
                        let i = next.get();
                        let Some(msg) = pool.get(i) else {
                            return Ok(SendOutcome::Duplicate { seq: 0 });
                        };
                        next.set(i + 1);
                        let mid = backlog_id(i).to_be_bytes();
                        delivery.send(&gid, &mid, msg, None).await?;
                    }
                }));
            }
            check_sends(sends).await
        })
    }
}

/// Message ids of the backlog phase, distinct from the paced phase's.
fn backlog_id(i: usize) -> u64 {
    (1 << 40) + i as u64
}

async fn check_sends(
    sends: Vec<tokio::task::JoinHandle<Result<SendOutcome, quicproquo_client::ClientError>>>,
) -> Result<()> {
    for send in sends {
        send.await??;
    }
    Ok(())
}
