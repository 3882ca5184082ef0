//! The push path's flow control: a subscriber that stops reading holds only its window on the
//! server, the others of its group are served as before, and once it reads again it receives
//! everything, exactly once and in order (from the store, where the live feed moved on).

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use quicproquo_client::Connection;
use quicproquo_core::NodeRole;
use quicproquo_core::mls::Suite;
use support::{TestServer, User, local};

/// Messages sent while the slow subscriber stalls: more than a group's live feed keeps
/// (1024), so it must catch up from the store.
const MESSAGES: usize = 1100;
/// Plaintext bytes per message.
const BODY: usize = 2048;
/// The node's page budget, which is also each subscriber's bytes in flight.
const WINDOW_BYTES: usize = 64 * 1024;
const WITHIN: Duration = Duration::from_secs(60);

/// What the slow subscriber's thread is told.
enum Step {
    Subscribe(Vec<u8>, u64),
    Resume,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_holds_only_its_window() -> Result<()> {
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |c| {
            c.limits.max_reply_bytes = WINDOW_BYTES;
            // This test is about what a stalled subscriber holds, not how long it may stall.
            c.limits.write_stall_timeout = Duration::from_secs(3600);
        })?;
        let dir = tempfile::tempdir()?;
        let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
        let bob = User::register(&server, dir.path(), "bob", Suite::Classical).await?;

        // Carol lives on a thread of her own: while it blocks, nothing reads her connection
        // and nothing answers the server's pushes.
        let (addr, options, carol_dir) =
            (server.addr, server.options.clone(), dir.path().to_owned());
        let (to_carol, steps) = std::sync::mpsc::channel::<Step>();
        let (carol_says, from_carol) = tokio::sync::mpsc::unbounded_channel::<Result<Vec<u64>>>();
        let carol = std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let set = tokio::task::LocalSet::new();
            set.block_on(&rt, async move {
                let conn = Connection::connect(addr, &options).await?;
                let carol = User::register_on(conn, &carol_dir, "carol", Suite::Classical).await?;
                let _ = carol_says.send(Ok(Vec::new()));
                let Ok(Step::Subscribe(id, after)) = steps.recv() else {
                    anyhow::bail!("expected a subscription");
                };
                let mut sub = carol.session.delivery.subscribe(&id, after).await?;
                let _ = carol_says.send(Ok(Vec::new()));
                // Stall: the whole thread blocks, so the connection is not read.
                let Ok(Step::Resume) = steps.recv() else {
                    anyhow::bail!("expected to resume");
                };
                let mut seqs = Vec::new();
                while seqs.len() < MESSAGES {
                    let batch = tokio::time::timeout(WITHIN, sub.next())
                        .await?
                        .context("carol's subscription ended")?;
                    seqs.extend(batch.iter().map(|e| e.seq));
                }
                let _ = carol_says.send(Ok(seqs));
                anyhow::Ok(())
            })
        });
        let mut from_carol = from_carol;
        from_carol.recv().await.context("carol's thread")??;

        let id = alice.chat().create_group("g").await?;
        alice
            .chat()
            .invite("g", &["bob".into(), "carol".into()], &mut |_| {})
            .await?;
        let after = alice
            .session
            .delivery
            .groups()
            .await?
            .into_iter()
            .find(|g| g.group_id == id)
            .map(|g| g.last_seq)
            .context("no group")?;
        to_carol.send(Step::Subscribe(id.clone(), after))?;
        from_carol.recv().await.context("carol's thread")??;
        let mut bob_sub = bob.session.delivery.subscribe(&id, after).await?;

        let metrics = &server.handle()?.observer().metrics;
        let pushed_before = metrics.fanout_entries.load(Ordering::Relaxed);
        let body = vec![b'x'; BODY];
        for _ in 0..MESSAGES {
            alice.chat().send("g", &body, &mut |_| {}).await?;
        }
        // Bob, who reads, gets everything while carol stalls.
        let mut bob_seqs = Vec::new();
        while bob_seqs.len() < MESSAGES {
            let batch = tokio::time::timeout(WITHIN, bob_sub.next())
                .await?
                .context("bob's subscription ended")?;
            bob_seqs.extend(batch.iter().map(|e| e.seq));
        }
        let expected: Vec<u64> = (after + 1..=after + MESSAGES as u64).collect();
        ensure!(bob_seqs == expected, "bob got every entry once, in order");

        // Stalled with a full window, her subscription lets go of the group's live feed: it
        // holds none of the entries she has not taken.
        let releases = &metrics.feed_releases;
        support::eventually(WITHIN, || releases.load(Ordering::Relaxed) >= 1).await?;

        // What the server sent carol stays within her window, however much the group sends.
        let pushed = metrics.fanout_entries.load(Ordering::Relaxed) - pushed_before;
        let stalled = pushed.saturating_sub(MESSAGES as u64);
        let window_entries = (WINDOW_BYTES / BODY) as u64;
        ensure!(
            stalled <= window_entries,
            "{stalled} entries pushed to a stalled subscriber (window: {window_entries})"
        );

        // Once she reads again, carol gets everything, exactly once and in order.
        to_carol.send(Step::Resume)?;
        let carol_seqs = tokio::time::timeout(WITHIN, from_carol.recv())
            .await?
            .context("carol's thread")??;
        ensure!(
            carol_seqs == expected,
            "carol got every entry once, in order"
        );
        carol
            .join()
            .map_err(|_| anyhow::anyhow!("carol's thread panicked"))??;
        Ok(())
    })
    .await
}

/// The next entries of `sub`, until the one at `last` (or the subscription ends).
async fn seqs_until(
    sub: &mut quicproquo_client::delivery::Subscription<quicproquo_client::delivery::Envelope>,
    last: u64,
) -> Result<Vec<u64>> {
    let mut seqs = Vec::new();
    while seqs.last().is_none_or(|s| *s < last) {
        let Some(batch) = tokio::time::timeout(WITHIN, sub.next()).await? else {
            break;
        };
        seqs.extend(batch.iter().map(|e| e.seq));
    }
    Ok(seqs)
}

/// A commit carries its membership effect to the live feed: subscribers read on after it
/// without a store read each (a commit used to send every subscriber back to the store), and
/// a member the commit removed gets that commit, then its subscription ends.
#[tokio::test]
async fn a_commit_reaches_subscribers_without_a_store_read_each() -> Result<()> {
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |_| {})?;
        let dir = tempfile::tempdir()?;
        let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
        let names: Vec<String> = (0..8).map(|i| format!("member{i}")).collect();
        let mut members = Vec::new();
        for n in &names {
            members.push(User::register(&server, dir.path(), n, Suite::Classical).await?);
        }
        let id = alice.chat().create_group("g").await?;
        alice.chat().invite("g", &names, &mut |_| {}).await?;
        let after = alice
            .session
            .delivery
            .groups()
            .await?
            .into_iter()
            .find(|g| g.group_id == id)
            .map(|g| g.last_seq)
            .context("no group")?;
        let mut subs = Vec::new();
        for m in &members {
            subs.push(m.session.delivery.subscribe(&id, after).await?);
        }
        // Every subscription is live once it has pushed a message.
        alice.chat().send("g", b"before", &mut |_| {}).await?;
        for sub in &mut subs {
            ensure!(seqs_until(sub, after + 1).await? == [after + 1]);
        }
        let catch_ups = &server.handle()?.observer().metrics.catch_ups;
        let before = catch_ups.load(Ordering::Relaxed);

        alice.chat().update("g", &mut |_| {}).await?;
        alice.chat().send("g", b"after", &mut |_| {}).await?;
        for sub in &mut subs {
            ensure!(seqs_until(sub, after + 3).await? == [after + 2, after + 3]);
        }
        alice.chat().remove("g", &names[..1], &mut |_| {}).await?;
        alice.chat().send("g", b"without", &mut |_| {}).await?;
        // The removed member gets the commit that removed it, then nothing more.
        ensure!(seqs_until(&mut subs[0], after + 5).await? == [after + 4]);
        ensure!(
            tokio::time::timeout(WITHIN, subs[0].next())
                .await?
                .is_none(),
            "the removed member's subscription ended"
        );
        for sub in &mut subs[1..] {
            ensure!(seqs_until(sub, after + 5).await? == [after + 4, after + 5]);
        }
        let read = catch_ups.load(Ordering::Relaxed) - before;
        ensure!(
            read == 0,
            "{read} subscriptions read the store for the commits"
        );
        Ok(())
    })
    .await
}
