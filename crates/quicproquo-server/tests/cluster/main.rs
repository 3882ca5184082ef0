//! Fault tests of the sharded cluster: separate edge and shard processes on loopback against
//! one Postgres, members driven through the client library, nodes killed mid-traffic.

mod commits;
mod follow;
#[path = "../support/forge.rs"]
#[allow(dead_code, unreachable_pub)]
mod forge;
mod hardening;
mod harness;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use harness::{BIN, Cluster, Member, gone, signal};
use quicproquo_client::chat::ChatEvent;
use quicproquo_client::follow::Follower;
use quicproquo_server::cluster::ring::Ring;
use quicproquo_server::store::postgres::PgStore;
use rustix::process::Signal;

/// One message a receiver decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Got {
    seq: u64,
    body: String,
    at: Instant,
}

type Inbox = Rc<RefCell<HashMap<(String, String), Vec<Got>>>>;

/// Polls `check` every 20 ms until it holds or `within` passes.
async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !check() {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The shard that owns `group` in the ring the database describes now.
async fn owner(url: &str, group: &[u8]) -> Result<String> {
    let store = PgStore::connect(url, 1).await?;
    let snapshot = store.ring().await?;
    let ring = Ring::new(snapshot.shards.iter().map(|s| s.node_id.as_str()));
    let owner = ring.owner(group).context("no live shard")?;
    let record = snapshot
        .shards
        .iter()
        .find(|s| s.node_id == owner)
        .context("owner not in the snapshot")?;
    Ok(record.address.clone())
}

/// Waits (polling, with a deadline) until the database's ring lists `n` live shards.
async fn live_shards_become(url: &str, n: usize) -> Result<()> {
    let store = PgStore::connect(url, 1).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let live = store.ring().await?.shards.len();
        if live == n {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the ring has {live} shards, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three shards, two edges, three groups (a sender and two receivers each, receivers spread
/// over both edges), messages at a steady rate while: one shard is killed with SIGKILL and
/// later restarted; one edge drains on SIGTERM and is restarted; the other edge is killed
/// with SIGKILL. Every acknowledged message must reach every receiver exactly once, in log
/// order, with no gap, and clients must recover without help.
#[tokio::test(flavor = "current_thread")]
async fn acknowledged_messages_survive_shard_and_edge_failures() -> Result<()> {
    tokio::task::LocalSet::new().run_until(failures()).await
}

async fn failures() -> Result<()> {
    let db = quicproquo_testkit::postgres::fresh_database().await?;
    let tmp = tempfile::tempdir()?;
    let mut cluster = Cluster::start(db.url(), &tmp.path().join("cluster"), 2, 3)?;
    let options = cluster.options();

    // The ring is visible to operators.
    let out = std::process::Command::new(BIN)
        .args(["ring", "--database-url", db.url(), "--group", "00ff"])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    ensure!(text.contains("with 3 shard(s)"), "ring output: {text}");
    ensure!(text.contains("group 00ff owner "), "ring output: {text}");

    // Members: group g has sender s{g} and receivers r{g}a (edge 0 first), r{g}b (edge 1 first).
    const GROUPS: usize = 3;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let mut group_ids = Vec::new();
    for g in 0..GROUPS {
        let dir = tmp.path();
        let mut s = Member::register(
            &format!("send{g}"),
            dir,
            cluster.edge_addrs(g % 2)?,
            &options,
        )
        .await?;
        let ra =
            Member::register(&format!("recv{g}a"), dir, cluster.edge_addrs(0)?, &options).await?;
        let rb =
            Member::register(&format!("recv{g}b"), dir, cluster.edge_addrs(1)?, &options).await?;
        let name = format!("g{g}");
        group_ids.push(s.chat().create_group(&name).await?);
        s.chat()
            .invite(&name, &[ra.name.clone(), rb.name.clone()], &mut |_| {})
            .await?;
        senders.push(s);
        receivers.push((name.clone(), ra));
        receivers.push((name, rb));
    }

    // Receivers follow live through the library's follower, as `qpq recv --follow` does.
    let got: Inbox = Rc::default();
    let mut followers = Vec::new();
    for (group, m) in receivers {
        let got = Rc::clone(&got);
        let options = options.clone();
        followers.push(tokio::task::spawn_local(async move {
            let Member {
                name,
                path,
                mut state,
                conn,
                session,
                addrs,
            } = m;
            let mut follower =
                Follower::new(&mut state, &path, addrs, options).with_connection(conn, session);
            loop {
                for e in follower.next().await? {
                    if let ChatEvent::Message { seq, body, .. } = e {
                        got.borrow_mut()
                            .entry((name.clone(), group.clone()))
                            .or_default()
                            .push(Got {
                                seq,
                                body: String::from_utf8(body)?,
                                at: Instant::now(),
                            });
                    }
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        }));
    }

    // Steady traffic, faults at fixed ticks.
    let shard_victim = owner(db.url(), &group_ids[0]).await?;
    let shard_info = cluster
        .shards
        .iter()
        .find(|s| s.address == shard_victim)
        .cloned()
        .context("victim shard not among dev-cluster's")?;
    let (edge0, edge1) = (cluster.edges[0].clone(), cluster.edges[1].clone());
    let mut acked: BTreeMap<(usize, u64), String> = BTreeMap::new();
    let mut sent_at: HashMap<(usize, u64), Instant> = HashMap::new();
    let mut faults: Vec<(&str, Instant)> = Vec::new();
    let mut unacked = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(120));
    for t in 0..90u32 {
        tick.tick().await;
        match t {
            15 => {
                signal(shard_info.pid, Signal::KILL);
                faults.push(("shard SIGKILL", Instant::now()));
            }
            35 => {
                // The dead shard stopped renewing: its lease expires and it leaves the ring;
                // restarted, it registers again and the ring has three shards once more.
                live_shards_become(db.url(), 2).await?;
                cluster.restart(&shard_info)?;
                live_shards_become(db.url(), 3).await?;
                faults.push(("shard restarted", Instant::now()));
            }
            50 => {
                signal(edge1.pid, Signal::TERM);
                faults.push(("edge SIGTERM (drain)", Instant::now()));
            }
            60 => {
                eventually(Duration::from_secs(40), "edge 1 to finish draining", || {
                    gone(edge1.pid)
                })
                .await?;
                cluster.restart(&edge1)?;
            }
            70 => {
                signal(edge0.pid, Signal::KILL);
                faults.push(("edge SIGKILL", Instant::now()));
            }
            _ => {}
        }
        for (g, sender) in senders.iter_mut().enumerate() {
            let body = format!("g{g} m{t}");
            let now = Instant::now();
            match sender
                .chat()
                .send(&format!("g{g}"), body.as_bytes(), &mut |_| {})
                .await
            {
                Ok(seq) => {
                    acked.insert((g, seq), body);
                    sent_at.insert((g, seq), now);
                }
                Err(_) => {
                    // Not acknowledged: it may or may not be in the log. Move on, maybe to
                    // another edge.
                    unacked += 1;
                    if sender.conn.ping(b"").await.is_err() {
                        let _ = sender.reconnect(&options).await;
                    }
                }
            }
        }
    }
    ensure!(
        acked.len() > 200,
        "only {} sends were acknowledged",
        acked.len()
    );

    // Every receiver gets every acknowledged message.
    let complete = || {
        let got = got.borrow();
        (0..GROUPS).all(|g| {
            ["a", "b"].iter().all(|r| {
                let seen = got.get(&(format!("recv{g}{r}"), format!("g{g}")));
                acked
                    .iter()
                    .filter(|((ag, _), _)| *ag == g)
                    .all(|((_, seq), _)| seen.is_some_and(|v| v.iter().any(|x| x.seq == *seq)))
            })
        })
    };
    if let Err(e) = eventually(
        Duration::from_secs(60),
        "every acknowledged message",
        complete,
    )
    .await
    {
        let report: Vec<String> = got
            .borrow()
            .iter()
            .map(|((who, group), list)| {
                let g: usize = group[1..].parse().unwrap_or(usize::MAX);
                let missing: Vec<u64> = acked
                    .keys()
                    .filter(|(ag, seq)| *ag == g && !list.iter().any(|x| x.seq == *seq))
                    .map(|(_, seq)| *seq)
                    .collect();
                format!(
                    "{who} in {group}: {} received, missing {missing:?}",
                    list.len()
                )
            })
            .collect();
        for line in report {
            eprintln!("{line}");
        }
        for f in followers {
            if f.is_finished() {
                eprintln!("a follower ended: {:?}", f.await);
            }
        }
        return Err(e);
    }
    for f in &followers {
        ensure!(!f.is_finished(), "a follower gave up");
    }

    let got = got.borrow();
    for g in 0..GROUPS {
        let a = &got[&(format!("recv{g}a"), format!("g{g}"))];
        let b = &got[&(format!("recv{g}b"), format!("g{g}"))];
        for (who, list) in [("a", a), ("b", b)] {
            // Exactly once and in log order: strictly increasing sequence numbers.
            ensure!(
                list.windows(2).all(|w| w[0].seq < w[1].seq),
                "r{g}{who} saw a duplicate or out-of-order entry"
            );
            // No gap: the log after the join is all this sender's messages.
            ensure!(
                list.windows(2).all(|w| w[1].seq == w[0].seq + 1),
                "r{g}{who} has a gap"
            );
            for ((ag, seq), body) in acked.iter().filter(|((ag, _), _)| *ag == g) {
                let x = list
                    .iter()
                    .find(|x| x.seq == *seq)
                    .with_context(|| format!("r{g}{who} lacks g{ag} #{seq}"))?;
                ensure!(&x.body == body, "g{ag} #{seq} altered");
            }
        }
        let (sa, sb): (Vec<_>, Vec<_>) = (
            a.iter().map(|x| (x.seq, &x.body)).collect(),
            b.iter().map(|x| (x.seq, &x.body)).collect(),
        );
        ensure!(sa == sb, "the receivers of g{g} disagree on the log");
    }

    // Recovery: from each fault to the first message sent after it reaching all receivers.
    for (what, at) in &faults {
        let first = sent_at
            .iter()
            .filter(|(_, t)| *t > at)
            .min_by_key(|(_, t)| **t)
            .map(|(k, _)| *k);
        if let Some((g, seq)) = first {
            let delivered = [format!("recv{g}a"), format!("recv{g}b")]
                .iter()
                .filter_map(|r| got.get(&(r.clone(), format!("g{g}"))))
                .filter_map(|v| v.iter().find(|x| x.seq == seq).map(|x| x.at))
                .max();
            if let Some(d) = delivered {
                eprintln!(
                    "recovery after {what}: first later message delivered to all after {:?}",
                    d.duration_since(*at)
                );
            }
        }
    }
    eprintln!(
        "{} acknowledged, {unacked} unacknowledged sends",
        acked.len()
    );
    drop(got);
    for f in followers {
        f.abort();
    }
    cluster.stop()
}

/// Two shards both serving one group at once (as with an edge on a stale ring): appends and
/// competing commits sent through both, concurrently. Postgres arbitrates: one order, one
/// commit per epoch, no sequence number twice, no gap.
#[tokio::test(flavor = "current_thread")]
async fn two_shards_serving_one_group_never_fork_it() -> Result<()> {
    tokio::task::LocalSet::new().run_until(two_owners()).await
}

async fn two_owners() -> Result<()> {
    use quicproquo_core::{IdentityKeypair, NodeRole, NodeVerifier};
    use quicproquo_proto::cluster_capnp::shard_service;
    use quicproquo_proto::delivery_capnp::send_result;
    use quicproquo_proto::envelope_capnp::envelope;
    use quicproquo_server::NodeIdentity;
    use quicproquo_server::cluster::link::Dialer;
    use quicproquo_server::model::group::{EntryKind, GroupId};
    use quicproquo_server::store::log::LogStore;

    let db = quicproquo_testkit::postgres::fresh_database().await?;
    let tmp = tempfile::tempdir()?;
    let base = tmp.path().join("cluster");
    let cluster = Cluster::start(db.url(), &base, 1, 2)?;
    // This test acts as a node of the cluster, talking to both shards directly.
    let identity = NodeIdentity::load(
        &tmp.path().join("tester"),
        Some(&base.join("cluster.key")),
        NodeRole::Edge,
    )?;
    let dialer = Dialer {
        identity: std::sync::Arc::new(identity),
        verifier: NodeVerifier::new(cluster.key),
        timeout: Duration::from_secs(10),
        max_frame_bytes: 16 << 20,
    };
    let store = PgStore::connect(db.url(), 2).await?;
    let snapshot = store.ring().await?;
    ensure!(snapshot.shards.len() == 2, "expected two shards");
    let mut links = Vec::new();
    for s in &snapshot.shards {
        links.push(dialer.dial(&s.node_id, &s.address, &s.noise_key).await?);
    }
    // Two real members, so that each epoch gets two commits that both verify against the
    // group's public view: Alice's through one shard, Bob's through the other.
    use quicproquo_core::group::Group;
    use quicproquo_core::mls::{MlsIdentity, MlsProvider, Suite};
    let alice = MlsIdentity::new(&IdentityKeypair::generate()?);
    let bob = MlsIdentity::new(&IdentityKeypair::generate()?);
    let (pa, pb) = (MlsProvider::default(), MlsProvider::default());
    let (member, bob_id) = (alice.identity(), bob.identity());
    let group = b"one group, two owners".to_vec();
    let mut ga = Group::create(&pa, &alice, Suite::Classical, &group)?;
    let mut create = links[0].client.create_group_request();
    create.get().set_group_id(&group);
    create.get().set_creator(member.as_bytes());
    create.get().set_group_info(&ga.group_info(&pa, &alice)?);
    create.send().promise.await?;

    /// A message to append: its id, sender, epoch and, for a commit, its bytes, Welcome and
    /// GroupInfo (an application message's payload is its id: shards do not read it).
    struct Msg<'a> {
        id: String,
        sender: &'a [u8],
        epoch: u64,
        commit: Option<&'a quicproquo_core::group::CommitOutput>,
    }

    // (message id, outcome): Some(seq) when appended, None when it lost the epoch.
    async fn append(
        client: &shard_service::Client,
        group: &[u8],
        m: Msg<'_>,
    ) -> Result<(String, Option<u64>)> {
        let mut call = client.append_request();
        {
            let mut r = call.get().init_request();
            r.set_group_id(group);
            r.set_sender(m.sender);
            r.set_message_id(m.id.as_bytes());
            r.set_epoch(m.epoch);
            match m.commit {
                Some(out) => {
                    r.set_kind(envelope::Kind::Commit);
                    r.set_payload(&out.commit);
                    r.set_has_commit(true);
                    let mut c = r.init_commit();
                    if let Some(w) = &out.welcome {
                        c.set_welcome(w);
                    }
                    c.set_group_info(&out.group_info);
                }
                None => {
                    r.set_kind(envelope::Kind::Application);
                    r.set_payload(m.id.as_bytes());
                }
            }
        }
        let response = call.send().promise.await?;
        let outcome = match response.get()?.get_result()?.which()? {
            send_result::Appended(a) => Some(a?.get_seq()),
            send_result::StaleEpoch(_) => None,
            send_result::Duplicate(_) => anyhow::bail!("{} reported as a duplicate", m.id),
        };
        Ok((m.id, outcome))
    }

    let mut appended: Vec<(String, u64)> = Vec::new();
    let kp = bob.key_packages(&pb, Suite::Classical, 1)?;
    let add = ga.add_members(&pa, &alice, &kp)?;
    let first = Msg {
        id: "commit e0 add".into(),
        sender: member.as_bytes(),
        epoch: 0,
        commit: Some(&add),
    };
    let (id, seq) = append(&links[0].client, &group, first).await?;
    appended.push((id, seq.ok_or_else(|| anyhow::anyhow!("the add lost"))?));
    ga.merge_pending_commit(&pa)?;
    let mut gb = Group::join(&pb, add.welcome.as_deref().unwrap_or_default())?;

    const ROUNDS: u64 = 15;
    for epoch in 1..=ROUNDS {
        let oa = ga.self_update(&pa, &alice)?;
        let ob = gb.self_update(&pb, &bob)?;
        // Alternate which shard gets whose commit.
        let (la, lb) = if epoch % 2 == 0 { (0, 1) } else { (1, 0) };
        let mut calls = vec![
            append(
                &links[la].client,
                &group,
                Msg {
                    id: format!("commit e{epoch} alice via {la}"),
                    sender: member.as_bytes(),
                    epoch,
                    commit: Some(&oa),
                },
            ),
            append(
                &links[lb].client,
                &group,
                Msg {
                    id: format!("commit e{epoch} bob via {lb}"),
                    sender: bob_id.as_bytes(),
                    epoch,
                    commit: Some(&ob),
                },
            ),
        ];
        for (side, link) in links.iter().enumerate() {
            for i in 0..4 {
                calls.push(append(
                    &link.client,
                    &group,
                    Msg {
                        id: format!("app e{epoch} #{i} via {side}"),
                        sender: member.as_bytes(),
                        epoch,
                        commit: None,
                    },
                ));
            }
        }
        let results = futures::future::try_join_all(calls).await?;
        let won = |who: &str| {
            results
                .iter()
                .any(|(id, seq)| id.starts_with("commit") && id.contains(who) && seq.is_some())
        };
        let (alice_won, bob_won) = (won("alice"), won("bob"));
        ensure!(
            alice_won != bob_won,
            "epoch {epoch}: alice {alice_won}, bob {bob_won}"
        );
        // Both follow the winner: its committer merges, the other drops its own commit.
        if alice_won {
            ga.merge_pending_commit(&pa)?;
            gb.discard_pending_commit(&pb)?;
            gb.process(&pb, &oa.commit)?;
        } else {
            gb.merge_pending_commit(&pb)?;
            ga.discard_pending_commit(&pa)?;
            ga.process(&pa, &ob.commit)?;
        }
        ensure!(ga.epoch() == epoch + 1 && gb.epoch() == epoch + 1);
        appended.extend(results.into_iter().filter_map(|(id, seq)| Some((id, seq?))));
    }

    // One log: every acknowledged seq once, numbered 1..=n with no gap, each where it was said
    // to be, and exactly one commit per epoch, in epoch order.
    let gid = GroupId::new(&group)?;
    let log = store.read_log(&gid, &member, 0, 1000).await?;
    ensure!(
        log.len() == appended.len(),
        "log has {} entries, {} acked",
        log.len(),
        appended.len()
    );
    for (i, e) in log.iter().enumerate() {
        ensure!(e.seq == i as u64 + 1, "gap or repeat at {}", e.seq);
    }
    for (id, seq) in &appended {
        let entry = &log[(*seq - 1) as usize];
        ensure!(
            entry.message_id == id.as_bytes(),
            "seq {seq} holds another message"
        );
    }
    let commit_epochs: Vec<u64> = log
        .iter()
        .filter(|e| e.kind == EntryKind::Commit)
        .map(|e| e.epoch)
        .collect();
    ensure!(
        commit_epochs == (0..=ROUNDS).collect::<Vec<_>>(),
        "commits by epoch: {commit_epochs:?}"
    );
    for l in &links {
        l.close();
    }
    cluster.stop()
}
