//! The same workload on a cluster of 1 shard and of 3 shards: throughput and delivery latency.
//!
//! Each run starts `qpq-server dev-cluster` (2 edges, N shards) on loopback against a fresh
//! Postgres database, registers `groups` senders and `2 × groups` receivers spread over both
//! edges, creates one group per sender with its two receivers (real MLS: KeyPackages, commit,
//! Welcomes), subscribes the receivers (live push), then for `secs` seconds every sender keeps
//! `in_flight` sends outstanding. Messages are real MLS PrivateMessages encrypted before the
//! timed run and replayed with fresh message ids (the Delivery Service only reads the public
//! framing), so the figures are the cluster's, not client MLS. Latency runs from the moment a
//! send is issued to the moment a receiver's subscription yields the entry.
//!
//! Everything — Postgres, both edges, every shard and the clients — shares this machine's
//! cores, so more shards add processes, not capacity: the ratio shows what sharding costs or
//! gains here, not what it gains on separate machines.
//!
//! Run: `cargo bench -p quicproquo-server --bench cluster`. `QPQ_BENCH_GROUPS` (12),
//! `QPQ_BENCH_SECS` (10) and `QPQ_BENCH_IN_FLIGHT` (8 per sender) change the shape. Without
//! `--bench` it runs a small smoke version that fails on any error.

// Shared with the fault tests; this benchmark uses only part of it.
#[allow(dead_code)]
#[path = "../tests/cluster/harness.rs"]
mod harness;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use harness::{Cluster, Member};
use quicproquo_client::SendOutcome;
use quicproquo_core::group::Group;

struct Settings {
    groups: usize,
    secs: u64,
    in_flight: usize,
    pool: usize,
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// When each message (by id) was issued.
type Started = HashMap<Vec<u8>, Instant>;
/// Each arrival at a receiver: message id and time.
type Arrived = Vec<(Vec<u8>, Instant)>;

struct RunReport {
    shards: usize,
    acked: u64,
    secs: f64,
    latencies_us: Vec<u64>,
    errors: u64,
}

/// Each group's id with one of its members: its sender, or one of its receivers.
type Members = Vec<(Vec<u8>, Member)>;

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// Registers one sender and two receivers per group, spread over both edges; each sender
/// creates its group and invites its receivers, who join (real MLS: KeyPackages, commit,
/// Welcomes). Returns the senders and the receivers.
async fn populate(s: &Settings, cluster: &Cluster, dir: &Path) -> Result<(Members, Members)> {
    let options = cluster.options();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for g in 0..s.groups {
        let mut sender = Member::register(
            &format!("send{g}"),
            dir,
            cluster.edge_addrs(g % 2)?,
            &options,
        )
        .await?;
        let mut rs = Vec::new();
        for r in 0..2 {
            rs.push(
                Member::register(
                    &format!("recv{g}x{r}"),
                    dir,
                    cluster.edge_addrs((g + r) % 2)?,
                    &options,
                )
                .await?,
            );
        }
        let name = format!("g{g}");
        let id = sender.chat().create_group(&name).await?;
        let names: Vec<String> = rs.iter().map(|m| m.name.clone()).collect();
        sender.chat().invite(&name, &names, &mut |_| {}).await?;
        for r in &mut rs {
            r.chat().join(&mut |_| {}).await?;
        }
        senders.push((id.clone(), sender));
        receivers.extend(rs.into_iter().map(|r| (id.clone(), r)));
    }
    Ok((senders, receivers))
}

/// Pre-encrypted pools, one per sender: the timed run measures the cluster, not client MLS.
fn encrypt_pools(s: &Settings, senders: &Members) -> Result<Vec<Vec<Vec<u8>>>> {
    let mut pools = Vec::new();
    for (id, m) in senders {
        let mut g = Group::load(&m.state.mls, id)?.context("sender lost its group")?;
        let mut pool = Vec::with_capacity(s.pool);
        for i in 0..s.pool {
            pool.push(g.encrypt(&m.state.mls, m.state.mls_identity(), &i.to_be_bytes())?);
        }
        pools.push(pool);
    }
    Ok(pools)
}

/// Receivers subscribe from their join point and timestamp every arrival into `arrived`.
async fn subscribe(
    receivers: &Members,
    arrived: &Rc<RefCell<Arrived>>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for (id, m) in receivers {
        let cursor = m.state.groups.get(id).map_or(0, |g| g.cursor);
        let mut sub = m.session.delivery.subscribe(id, cursor).await?;
        let arrived = Rc::clone(arrived);
        tasks.push(tokio::task::spawn_local(async move {
            while let Some(batch) = sub.next().await {
                let now = Instant::now();
                let mut a = arrived.borrow_mut();
                a.extend(batch.into_iter().map(|e| (e.message_id, now)));
            }
        }));
    }
    Ok(tasks)
}

/// For `s.secs` seconds every sender keeps `s.in_flight` sends outstanding, recording when
/// each was issued in `started`; returns the acknowledged and the failed sends.
async fn send_all(
    s: &Settings,
    senders: &Members,
    pools: &[Vec<Vec<u8>>],
    started: &Rc<RefCell<Started>>,
) -> (u64, u64) {
    let errors = Rc::new(RefCell::new(0u64));
    let deadline = Instant::now() + Duration::from_secs(s.secs);
    let mut sending = FuturesUnordered::new();
    for (g, ((id, m), pool)) in senders.iter().zip(pools).enumerate() {
        let (started, errors) = (Rc::clone(started), Rc::clone(&errors));
        sending.push(async move {
            let mut acked = 0u64;
            let mut next = 0usize;
            let mut window = FuturesUnordered::new();
            loop {
                while window.len() < s.in_flight && Instant::now() < deadline {
                    let mid = format!("g{g}-{next}").into_bytes();
                    let msg = &pool[next % pool.len()];
                    next += 1;
                    started.borrow_mut().insert(mid.clone(), Instant::now());
                    let delivery = &m.session.delivery;
                    window.push(async move { delivery.send(id, &mid, msg, None).await });
                }
                match window.next().await {
                    Some(Ok(SendOutcome::Appended { .. })) => acked += 1,
                    Some(_) => *errors.borrow_mut() += 1,
                    None => break,
                }
            }
            acked
        });
    }
    let mut acked = 0;
    while let Some(n) = sending.next().await {
        acked += n;
    }
    drop(sending);
    let errors = *errors.borrow();
    (acked, errors)
}

/// Waits until every acknowledged message has reached both of its receivers; returns the
/// delivery latencies (µs), sorted.
async fn latencies(
    acked: u64,
    started: &RefCell<Started>,
    arrived: &RefCell<Arrived>,
) -> Result<Vec<u64>> {
    let expected = acked * 2;
    let wait = Instant::now() + Duration::from_secs(60);
    while (arrived.borrow().len() as u64) < expected {
        ensure!(Instant::now() < wait, "not every message was delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = started.borrow();
    let mut latencies_us: Vec<u64> = arrived
        .borrow()
        .iter()
        .filter_map(|(mid, at)| {
            started
                .get(mid)
                .map(|t| u64::try_from(at.duration_since(*t).as_micros()).unwrap_or(u64::MAX))
        })
        .collect();
    latencies_us.sort_unstable();
    Ok(latencies_us)
}

async fn run(s: &Settings, shards: usize) -> Result<RunReport> {
    let db = quicproquo_testkit::postgres::fresh_database().await?;
    let tmp = tempfile::tempdir()?;
    let cluster = Cluster::start(db.url(), &tmp.path().join("cluster"), 2, shards)?;
    let (senders, receivers) = populate(s, &cluster, tmp.path()).await?;
    let pools = encrypt_pools(s, &senders)?;
    let started: Rc<RefCell<Started>> = Rc::default();
    let arrived: Rc<RefCell<Arrived>> = Rc::default();
    let tasks = subscribe(&receivers, &arrived).await?;

    let t0 = Instant::now();
    let (acked, errors) = send_all(s, &senders, &pools, &started).await;
    let secs = t0.elapsed().as_secs_f64();
    let latencies_us = latencies(acked, &started, &arrived).await?;
    for t in tasks {
        t.abort();
    }
    drop(receivers);
    drop(senders);
    cluster.stop()?;
    Ok(RunReport {
        shards,
        acked,
        secs,
        latencies_us,
        errors,
    })
}

fn main() -> Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let s = if bench {
        Settings {
            groups: env_or("QPQ_BENCH_GROUPS", 12) as usize,
            secs: env_or("QPQ_BENCH_SECS", 10),
            in_flight: env_or("QPQ_BENCH_IN_FLIGHT", 8) as usize,
            pool: 500,
        }
    } else {
        Settings {
            groups: 2,
            secs: 1,
            in_flight: 2,
            pool: 20,
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let reports = local.block_on(&rt, async {
        let mut out = Vec::new();
        for shards in [1, 3] {
            out.push(run(&s, shards).await?);
        }
        anyhow::Ok(out)
    })?;
    println!(
        "cluster: 2 edges, {} groups (1 sender + 2 receivers each), {} in flight per sender, {} s",
        s.groups, s.in_flight, s.secs
    );
    for r in &reports {
        println!(
            "  {} shard(s): {:>8.0} appends/s, {:>8.0} deliveries/s, delivery p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} errors",
            r.shards,
            r.acked as f64 / r.secs,
            r.latencies_us.len() as f64 / r.secs,
            pct(&r.latencies_us, 0.50),
            pct(&r.latencies_us, 0.99),
            pct(&r.latencies_us, 1.0),
            r.errors
        );
    }
    if let [one, three] = &reports[..] {
        println!(
            "  3 shards / 1 shard: throughput {:.2}x, p99 {:.2}x",
            (three.acked as f64 / three.secs) / (one.acked as f64 / one.secs),
            pct(&three.latencies_us, 0.99) / pct(&one.latencies_us, 0.99).max(f64::MIN_POSITIVE)
        );
    }
    for r in &reports {
        ensure!(
            r.errors == 0,
            "{} shard(s): {} failed sends",
            r.shards,
            r.errors
        );
    }
    Ok(())
}
