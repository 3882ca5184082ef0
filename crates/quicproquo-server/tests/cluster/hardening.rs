//! Bounded resources and retention in a real cluster: the connection attacks against an edge
//! process (its own resident memory read from /proc), and the retention job running on each
//! group's owner shard.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use capnp::message::Builder;
use capnp_rpc::rpc_capnp::message;
use quicproquo_client::ConnectOptions;
use quicproquo_core::channel::{ChannelLimits, NoiseReader, NoiseWriter, channel};
use quicproquo_proto::errors::ErrorCode;
use quicproquo_server::cluster::ring::Ring;
use quicproquo_server::model::group::GroupId;
use quicproquo_server::store::postgres::PgStore;
use quicproquo_server::store::retention::RetentionStore;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::harness::{Cluster, Member};

const WITHIN: Duration = Duration::from_secs(30);

/// Resident memory of process `pid`, in bytes.
fn rss_of(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}

/// The node's `/metrics` text.
fn metrics(ops: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(ops)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: ops\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// The value of `series` (name with labels, as rendered) in `text`, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A connection from 127.0.0.2 that completed the handshake with the node at `addr`.
async fn raw_channel(
    addr: SocketAddr,
    options: &ConnectOptions,
) -> Result<(NoiseReader<OwnedReadHalf>, NoiseWriter<OwnedWriteHalf>)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 2], 0)))?;
    let mut stream = socket.connect(addr).await?;
    let key = quicproquo_core::NoiseKeypair::generate()?;
    let outcome =
        quicproquo_core::noise::initiate(&mut stream, &key, &options.verifier, WITHIN).await?;
    let (r, w) = stream.into_split();
    Ok(channel(r, w, outcome.session, ChannelLimits::default()))
}

/// Bytes the node sends on `reader` until it closes the connection.
async fn bytes_until_closed(reader: &mut NoiseReader<OwnedReadHalf>) -> Result<usize> {
    let mut got = 0;
    let read_all = async {
        while let Ok(Some(frame)) = reader.recv_frame().await {
            got += frame.len();
        }
    };
    tokio::time::timeout(WITHIN, read_all)
        .await
        .context("the edge did not close the connection")?;
    Ok(got)
}

#[tokio::test(flavor = "current_thread")]
async fn an_edge_process_withstands_the_connection_attacks() -> Result<()> {
    tokio::task::LocalSet::new().run_until(edge_attacks()).await
}

/// The attacks of `tests/attacks.rs` against an edge process of a cluster: 16 connections
/// announcing 16 MiB messages, and messages capnp-rpc would echo; the edge's resident memory
/// stays under 16 MiB more than before, nothing is echoed, and new members register and
/// chat through it throughout.
async fn edge_attacks() -> Result<()> {
    let db = quicproquo_testkit::postgres::fresh_database().await?;
    let tmp = tempfile::tempdir()?;
    let cluster = Cluster::start(db.url(), &tmp.path().join("cluster"), 1, 1)?;
    let options = cluster.options();
    let edge = cluster.edges[0].clone();
    let addr: SocketAddr = edge.address.parse()?;
    let ops = edge.ops.clone().context("the edge's ops address")?;
    let mut alice = Member::register("alice", tmp.path(), vec![addr], &options).await?;
    alice.chat().create_group("room").await?;
    let before = rss_of(edge.pid)?;

    let mut held = Vec::new();
    for _ in 0..16 {
        let (reader, mut writer) = raw_channel(addr, &options).await?;
        let words: u32 = 2_097_151;
        let mut lie = Vec::new();
        lie.extend_from_slice(&(8 + words * 8).to_be_bytes());
        lie.extend_from_slice(&0u32.to_le_bytes());
        lie.extend_from_slice(&words.to_le_bytes());
        lie.extend_from_slice(&[0u8; 64]);
        writer.send_unframed(&lie).await?;
        held.push((reader, writer));
    }
    let deadline = Instant::now() + WITHIN;
    loop {
        let text = metrics(&ops)?;
        if sample(&text, "qpq_rpc_buffered_bytes") == (16 * 2048) as f64 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the edge did not read every header"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let grown = rss_of(edge.pid)?.saturating_sub(before);
    eprintln!("edge resident memory grew by {grown} bytes under 16 oversized headers");
    ensure!(grown < 16 << 20, "the edge grew by {grown} bytes");
    let bob = Member::register("bob", tmp.path(), vec![addr], &options).await?;

    for kind in [99u16, 10] {
        let mut m = Builder::new_default();
        {
            let call = m.init_root::<message::Builder<'_>>().init_call();
            call.init_params()
                .init_content()
                .set_as::<capnp::data::Owned>(&vec![0x41u8; 24_000][..])?;
        }
        let mut bytes = capnp::serialize::write_message_to_words(&m);
        let segments = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) + 1;
        let at = (4 + 4 * segments as usize).div_ceil(8) * 8 + 8;
        bytes[at..at + 2].copy_from_slice(&kind.to_le_bytes());
        let (mut reader, mut writer) = raw_channel(addr, &options).await?;
        writer.send_frame(&bytes).await?;
        let echoed = bytes_until_closed(&mut reader).await?;
        ensure!(
            echoed < 1024,
            "{echoed} bytes came back for a {kind} message"
        );
    }
    // Both refusals are counted (the count may trail the close by a moment).
    let deadline = Instant::now() + WITHIN;
    while sample(
        &metrics(&ops)?,
        "qpq_connections_limited_total{reason=\"refused_message\"}",
    ) != 2.0
    {
        ensure!(Instant::now() < deadline, "both refusals counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Members keep chatting through the edge.
    alice
        .chat()
        .invite("room", std::slice::from_ref(&bob.name), &mut |_| {})
        .await?;
    let mut bob = bob;
    let mut events = Vec::new();
    bob.chat().receive_all(&mut |e| events.push(e)).await?;
    alice
        .chat()
        .send("room", b"still here", &mut |_| {})
        .await?;
    let mut got = Vec::new();
    bob.chat().receive_all(&mut |e| got.push(e)).await?;
    ensure!(
        got.iter().any(|e| matches!(e,
            quicproquo_client::chat::ChatEvent::Message { body, .. } if body == b"still here")),
        "{got:?}"
    );
    let grown = rss_of(edge.pid)?.saturating_sub(before);
    eprintln!("edge resident memory grew by {grown} bytes after both attacks");
    ensure!(grown < 16 << 20, "the edge grew by {grown} bytes");
    drop(held);
    cluster.stop()
}

#[tokio::test(flavor = "current_thread")]
async fn retention_runs_on_each_groups_owner() -> Result<()> {
    tokio::task::LocalSet::new().run_until(retention()).await
}

/// Two shards, `log_retention = 0s`: once both members of each of four groups acknowledged
/// the commit and the message, every group's log is deleted, each by its owner shard only
/// (the shards' counters add up to the entries, and each counts its own groups'), and a read
/// from the start through the edge gets `history_gone`.
async fn retention() -> Result<()> {
    let db = quicproquo_testkit::postgres::fresh_database().await?;
    let tmp = tempfile::tempdir()?;
    let cluster = Cluster::start_with_env(
        db.url(),
        &tmp.path().join("cluster"),
        (1, 2),
        &[
            ("QPQ_LOG_RETENTION", "0s"),
            ("QPQ_RETENTION_INTERVAL", "200ms"),
        ],
    )?;
    super::live_shards_become(db.url(), 2).await?;
    let options = cluster.options();
    let addrs = cluster.edge_addrs(0)?;
    let mut groups = Vec::new();
    let mut creators = Vec::new();
    for g in 0..4 {
        let mut c =
            Member::register(&format!("creator{g}"), tmp.path(), addrs.clone(), &options).await?;
        let mut m =
            Member::register(&format!("member{g}"), tmp.path(), addrs.clone(), &options).await?;
        let name = format!("g{g}");
        groups.push(c.chat().create_group(&name).await?);
        c.chat()
            .invite(&name, &[m.name.clone()], &mut |_| {})
            .await?;
        m.chat().receive_all(&mut |_| {}).await?;
        c.chat().send(&name, b"hello", &mut |_| {}).await?;
        m.chat().receive_all(&mut |_| {}).await?;
        c.chat().receive_all(&mut |_| {}).await?;
        creators.push(c);
    }

    let store = PgStore::connect(db.url(), 2).await?;
    let deadline = Instant::now() + WITHIN;
    for id in &groups {
        let g = GroupId::new(id)?;
        loop {
            if store.pruned_seq(&g).await? == 2 {
                break;
            }
            ensure!(Instant::now() < deadline, "a group's log was not pruned");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Each shard deleted the entries of the groups the ring gives it, and only those.
    let snapshot = store.ring().await?;
    let ring = Ring::new(snapshot.shards.iter().map(|s| s.node_id.as_str()));
    let mut total = 0.0;
    for shard in &cluster.shards {
        let node_id = &snapshot
            .shards
            .iter()
            .find(|s| s.address == shard.address)
            .context("a shard missing from the ring")?
            .node_id;
        let owned = groups
            .iter()
            .filter(|g| ring.owner(g) == Some(node_id.as_str()))
            .count();
        let ops = shard.ops.as_deref().context("a shard's ops address")?;
        let deleted = sample(
            &metrics(ops)?,
            "qpq_retention_deleted_total{kind=\"log_entries\"}",
        );
        ensure!(
            deleted == (2 * owned) as f64,
            "shard {node_id} deleted {deleted} entries for {owned} groups"
        );
        total += deleted;
    }
    ensure!(total == 8.0, "{total} entries deleted in all");

    let code = creators[0]
        .session
        .delivery
        .fetch(&groups[0], 0, 10)
        .await
        .err()
        .and_then(|e| e.code());
    ensure!(code == Some(ErrorCode::HistoryGone), "{code:?}");
    // The group goes on after its log was emptied.
    creators[1].chat().send("g1", b"on", &mut |_| {}).await?;
    let after = creators[1]
        .session
        .delivery
        .fetch(&groups[1], 2, 10)
        .await?;
    ensure!(after.iter().map(|e| e.seq).collect::<Vec<_>>() == vec![3]);
    cluster.stop()
}

#[tokio::test(flavor = "current_thread")]
async fn a_commit_reaches_an_edges_subscribers_without_a_store_read_each() -> Result<()> {
    tokio::task::LocalSet::new()
        .run_until(commit_effect())
        .await
}

/// The shard sends each commit's membership effect with it: the edge's subscribers read on
/// after a commit without reading the log (its `qpq_subscription_catch_ups_total` does not
/// move), and the member the commit removed gets it, then its subscription ends.
async fn commit_effect() -> Result<()> {
    let db = quicproquo_testkit::postgres::fresh_database().await?;
    let tmp = tempfile::tempdir()?;
    let cluster = Cluster::start(db.url(), &tmp.path().join("cluster"), 1, 1)?;
    let options = cluster.options();
    let addrs = cluster.edge_addrs(0)?;
    let ops = cluster.edges[0]
        .ops
        .clone()
        .context("the edge's ops address")?;
    let mut alice = Member::register("alice", tmp.path(), addrs.clone(), &options).await?;
    let names: Vec<String> = (0..4).map(|i| format!("member{i}")).collect();
    let mut members = Vec::new();
    for n in &names {
        members.push(Member::register(n, tmp.path(), addrs.clone(), &options).await?);
    }
    let id = alice.chat().create_group("g").await?;
    alice.chat().invite("g", &names, &mut |_| {}).await?;
    let after = 1;
    let mut subs = Vec::new();
    for m in &members {
        subs.push(m.session.delivery.subscribe(&id, after).await?);
    }
    alice.chat().send("g", b"before", &mut |_| {}).await?;
    for sub in &mut subs {
        let batch = next(sub).await?.context("a subscription ended")?;
        ensure!(batch.iter().map(|e| e.seq).collect::<Vec<_>>() == [2]);
    }
    let catch_ups = |text: &str| sample(text, "qpq_subscription_catch_ups_total");
    let before = catch_ups(&metrics(&ops)?);

    alice.chat().remove("g", &names[..1], &mut |_| {}).await?;
    alice.chat().send("g", b"after", &mut |_| {}).await?;
    let mut seqs = vec![Vec::new(); subs.len()];
    for (sub, got) in subs.iter_mut().zip(&mut seqs) {
        while got.last().is_none_or(|s| *s < 4) {
            let Some(batch) = next(sub).await? else {
                break;
            };
            got.extend(
                batch
                    .iter()
                    .map(|e: &quicproquo_client::delivery::Envelope| e.seq),
            );
        }
    }
    ensure!(
        seqs[0] == [3],
        "the removed member got its removal only: {:?}",
        seqs[0]
    );
    ensure!(
        next(&mut subs[0]).await?.is_none(),
        "and its subscription ended"
    );
    for got in &seqs[1..] {
        ensure!(got == &[3, 4], "{got:?}");
    }
    let read = catch_ups(&metrics(&ops)?) - before;
    ensure!(
        read == 0.0,
        "{read} subscriptions read the log for the commit"
    );
    cluster.stop()
}

/// The next batch pushed to `sub` (`None`: the subscription ended), within [`WITHIN`].
async fn next(
    sub: &mut quicproquo_client::delivery::Subscription<quicproquo_client::delivery::Envelope>,
) -> Result<Option<Vec<quicproquo_client::delivery::Envelope>>> {
    Ok(tokio::time::timeout(WITHIN, sub.next()).await?)
}
