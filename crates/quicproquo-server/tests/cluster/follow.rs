//! A live follower while its group's owner shard is killed mid-traffic: every acknowledged
//! message must come out of the follower, and its connection to its edge must survive.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use quicproquo_client::chat::ChatEvent;
use quicproquo_client::follow::Follower;
use rustix::process::Signal;

use crate::harness::{Cluster, Member, signal};
use crate::{eventually, owner};

/// What the follower handed out, and what became of its connection.
#[derive(Default)]
struct Seen {
    seqs: Vec<u64>,
    losses: Vec<String>,
}

/// One round: a follower on edge 0, a sender on edge 1, the group's owner shard killed with
/// SIGKILL mid-traffic. Returns a description of what went wrong, if anything did.
async fn round(db_url: &str, dir: &std::path::Path, round: usize) -> Result<Option<String>> {
    let base = dir.join(format!("cluster-{round}"));
    let cluster = Cluster::start(db_url, &base, 2, 3)?;
    let options = cluster.options();
    let mut sender = Member::register(
        &format!("send{round}"),
        dir,
        cluster.edge_addrs(1)?,
        &options,
    )
    .await?;
    let reader = Member::register(
        &format!("read{round}"),
        dir,
        cluster.edge_addrs(0)?,
        &options,
    )
    .await?;
    let group = sender.chat().create_group("g").await?;
    sender
        .chat()
        .invite("g", std::slice::from_ref(&reader.name), &mut |_| {})
        .await?;

    let seen: Rc<RefCell<Seen>> = Rc::default();
    let follower = {
        let seen = Rc::clone(&seen);
        let options = options.clone();
        tokio::task::spawn_local(async move {
            let Member {
                path,
                mut state,
                conn,
                session,
                addrs,
                ..
            } = reader;
            let mut follower =
                Follower::new(&mut state, &path, addrs, options).with_connection(conn, session);
            let mut reconnects = 0;
            loop {
                let events = follower.next().await?;
                if follower.reconnects() != reconnects {
                    reconnects = follower.reconnects();
                    let why = follower.last_loss().unwrap_or("?").to_owned();
                    seen.borrow_mut().losses.push(why);
                }
                for e in events {
                    if let ChatEvent::Message { seq, .. } = e {
                        seen.borrow_mut().seqs.push(seq);
                    }
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        })
    };
    // The follower is live once it shows a first message.
    let first = sender.chat().send("g", b"warm-up", &mut |_| {}).await?;
    eventually(Duration::from_secs(20), "the follower to go live", || {
        seen.borrow().seqs.contains(&first)
    })
    .await?;

    let victim = owner(&cluster.database_url, &group).await?;
    let shard = cluster
        .shards
        .iter()
        .find(|s| s.address == victim)
        .cloned()
        .context("the owner is not among dev-cluster's shards")?;
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    let mut killed_at = None;
    for t in 0..120u32 {
        tick.tick().await;
        if t == 30 {
            signal(shard.pid, Signal::KILL);
            killed_at = Some(Instant::now());
        }
        let body = format!("m{t}");
        match sender.chat().send("g", body.as_bytes(), &mut |_| {}).await {
            Ok(seq) => {
                acked.insert(seq, body);
            }
            Err(_) => {
                if sender.conn.ping(b"").await.is_err() {
                    let _ = sender.reconnect(&options).await;
                }
            }
        }
    }
    ensure!(killed_at.is_some(), "the shard was never killed");
    let complete = || {
        let seen = seen.borrow();
        acked.keys().all(|s| seen.seqs.contains(s))
    };
    let delivered = eventually(
        Duration::from_secs(30),
        "every acknowledged message",
        complete,
    )
    .await
    .is_ok();
    let problem = {
        let seen = seen.borrow();
        let missing: Vec<u64> = acked
            .keys()
            .filter(|s| !seen.seqs.contains(s))
            .copied()
            .collect();
        let in_order = seen.seqs.windows(2).all(|w| w[0] < w[1]);
        if !delivered || !in_order || !seen.losses.is_empty() || follower.is_finished() {
            Some(format!(
                "round {round}: {} acknowledged, missing {missing:?}, in order {in_order}, \
                 connection losses {:?}, follower ended {}",
                acked.len(),
                seen.losses,
                follower.is_finished()
            ))
        } else {
            None
        }
    };
    follower.abort();
    cluster.stop()?;
    Ok(problem)
}

/// The owner shard of a followed group dies mid-traffic, several times over: the follower's
/// connection to its edge (which never died) stays up, and it hands out every acknowledged
/// message, once and in order.
#[tokio::test(flavor = "current_thread")]
async fn a_follower_misses_nothing_when_the_owner_shard_dies() -> Result<()> {
    tokio::task::LocalSet::new()
        .run_until(async {
            let rounds: usize = std::env::var("QPQ_TEST_FOLLOW_ROUNDS")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(2);
            let tmp = tempfile::tempdir()?;
            let mut problems = Vec::new();
            for r in 0..rounds {
                // A database per round: the shard killed in one is no ghost in the next ring.
                let db = quicproquo_testkit::postgres::fresh_database().await?;
                if let Some(p) = round(db.url(), tmp.path(), r).await? {
                    eprintln!("{p}");
                    problems.push(p);
                }
            }
            ensure!(problems.is_empty(), "{}", problems.join("\n"));
            Ok(())
        })
        .await
}
