//! Limits one host or one unbound peer cannot exhaust, through real sockets: per-address caps
//! on connections and handshakes (up to 10 000 idle connections from one address), the bind
//! deadline, the idle timeout, small pings before `bind`, replies paged by bytes,
//! subscriptions per connection and binds per address. Each refusal is a counted close (or a
//! typed error), and honest clients are served throughout.
//! Several source addresses are played with 127.0.0.x on loopback.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use quicproquo_core::mls::Suite;
use quicproquo_core::{IdentityKeypair, NodeRole};
use quicproquo_proto::errors::{ErrorCode, code_of};
use quicproquo_server::obs::metrics::ConnectionStats;
use support::{
    RawClient, TestServer, User, closed_by_server, eventually, handshake_from, local, tcp_from,
};

const WITHIN: Duration = Duration::from_secs(10);

fn read(server: &TestServer, counter: impl Fn(&ConnectionStats) -> &AtomicU64) -> Result<u64> {
    Ok(counter(server.handle()?.stats()).load(Ordering::Relaxed))
}

/// The server's `/metrics` text.
fn metrics(server: &TestServer) -> Result<String> {
    let mut out = String::new();
    server.handle()?.observer().metrics.render(&mut out);
    Ok(out)
}

/// N connections idling after the handshake from one address fill its cap: the next one from
/// that address is closed at once and counted, while a client from another address still
/// connects, binds and is served.
#[tokio::test]
async fn one_address_cannot_hold_every_connection() -> Result<()> {
    const CAP: usize = 3;
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |c| {
            c.limits.max_connections_per_address = CAP;
        })?;
        let mut idle = Vec::new();
        for _ in 0..CAP {
            idle.push(handshake_from([127, 0, 0, 2], &server).await?);
        }
        let mut excess = tcp_from([127, 0, 0, 2], &server).await?;
        closed_by_server(&mut excess, WITHIN).await?;
        assert_eq!(read(&server, |s| &s.address_connections_full)?, 1);
        assert_eq!(read(&server, |s| &s.refused_at_capacity)?, 0);
        assert!(
            metrics(&server)?
                .contains("qpq_connections_limited_total{reason=\"address_connections\"} 1\n")
        );

        let other = RawClient::connect_from([127, 0, 0, 3], &server).await?;
        other.bind(&IdentityKeypair::generate()?).await?;
        let payload = vec![7u8; 4096];
        assert_eq!(other.ping(&payload).await?, payload);

        // A slot given back (once the server sees the close) is free again for that address:
        // CAP - 1 idle connections and `other` stay open.
        drop(idle.pop());
        let open = format!("qpq_connections_open {CAP}\n");
        eventually(WITHIN, || metrics(&server).is_ok_and(|m| m.contains(&open))).await?;
        let again = RawClient::connect_from([127, 0, 0, 2], &server).await?;
        assert_eq!(again.ping(b"back").await?, b"back");
        Ok(())
    })
    .await
}

/// Handshakes in progress are capped per address too: a stalled handshake holds its
/// address's only slot, the next connection from there is closed at once, and another
/// address is served.
#[tokio::test]
async fn one_address_cannot_hold_every_handshake() -> Result<()> {
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |c| {
            c.limits.max_handshakes_per_address = 1;
        })?;
        let _stalled = tcp_from([127, 0, 0, 2], &server).await?;
        eventually(WITHIN, || {
            server
                .handle()
                .map(|h| h.stats().accepted.load(Ordering::Relaxed) >= 1)
                .unwrap_or(false)
        })
        .await?;
        let mut excess = tcp_from([127, 0, 0, 2], &server).await?;
        closed_by_server(&mut excess, WITHIN).await?;
        assert_eq!(read(&server, |s| &s.address_handshakes_full)?, 1);
        assert!(
            metrics(&server)?
                .contains("qpq_connections_limited_total{reason=\"address_handshakes\"} 1\n")
        );
        let other = RawClient::connect_from([127, 0, 0, 3], &server).await?;
        assert_eq!(other.ping(b"served").await?, b"served");
        Ok(())
    })
    .await
}

/// A connection that completes the handshake but binds no identity is closed at the bind
/// deadline and counted; a bound client, connected earlier, stays.
#[tokio::test]
async fn an_unbound_connection_is_closed_at_the_bind_deadline() -> Result<()> {
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |c| {
            c.limits.bind_timeout = Duration::from_secs(1);
        })?;
        let bound = server.connect().await?;
        bound.bind(&IdentityKeypair::generate()?).await?;
        let (mut unbound, _) = handshake_from([127, 0, 0, 1], &server).await?;
        let started = tokio::time::Instant::now();
        closed_by_server(&mut unbound, WITHIN).await?;
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "closed before the deadline, after {:?}",
            started.elapsed()
        );
        assert_eq!(read(&server, |s| &s.bind_timeouts)?, 1);
        assert!(
            metrics(&server)?
                .contains("qpq_connections_limited_total{reason=\"bind_timeout\"} 1\n")
        );
        // The bound client's own deadline has passed too: binding exempts it.
        assert_eq!(bound.ping(b"still here").await?.payload, b"still here");
        Ok(())
    })
    .await
}

/// Before `bind`, a ping echoes a small payload only; a larger one is refused with
/// `too_large`. After `bind`, large pings work as before.
#[tokio::test]
async fn a_large_ping_before_bind_is_refused() -> Result<()> {
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |c| {
            c.limits.max_unbound_ping_bytes = 64;
        })?;
        let conn = server.connect().await?;
        let small = [1u8; 64];
        assert_eq!(conn.ping(&small).await?.payload, small);
        let refused = conn.ping(&[2u8; 65]).await;
        assert_eq!(
            refused.err().and_then(|e| e.code()),
            Some(ErrorCode::TooLarge)
        );
        let large = vec![3u8; 1024 * 1024];
        let refused = conn.ping(&large).await;
        assert_eq!(
            refused.err().and_then(|e| e.code()),
            Some(ErrorCode::TooLarge)
        );
        assert!(metrics(&server)?.contains(
            "qpq_rpc_requests_total{rpc_service=\"Bootstrap\",rpc_method=\"ping\",status=\"too_large\"} 2\n"
        ));

        conn.bind(&IdentityKeypair::generate()?).await?;
        assert!(conn.ping(&large).await?.payload == large, "large ping after bind");
        Ok(())
    })
    .await
}

/// A bound connection that makes no call and holds no subscription is closed after the idle
/// timeout and counted; a client that holds a subscription stays however quiet it is.
#[tokio::test]
async fn an_idle_connection_without_subscription_is_closed() -> Result<()> {
    local(async {
        let idle_timeout = Duration::from_secs(1);
        let server = TestServer::start(NodeRole::Standalone, |c| {
            c.limits.idle_timeout = idle_timeout;
        })?;
        let dir = tempfile::tempdir()?;
        let quiet = User::register(&server, dir.path(), "quiet", Suite::Classical).await?;
        let _inbox = quiet.session.delivery.subscribe_inbox(0).await?;
        let idle = RawClient::connect_from([127, 0, 0, 1], &server).await?;
        idle.bind(&IdentityKeypair::generate()?).await?;
        let last_call = tokio::time::Instant::now();

        eventually(WITHIN, || {
            read(&server, |s| &s.idle_timeouts).unwrap_or(0) >= 1
        })
        .await?;
        assert!(
            last_call.elapsed() >= idle_timeout - Duration::from_millis(100),
            "closed before the timeout, after {:?}",
            last_call.elapsed()
        );
        assert!(
            idle.ping(b"anyone?").await.is_err(),
            "the idle connection is closed"
        );
        assert!(
            metrics(&server)?
                .contains("qpq_connections_limited_total{reason=\"idle_timeout\"} 1\n")
        );
        // Not a synchronisation: the subscriber must outlast one more whole timeout with no
        // call before it is asked anything, to show the timeout passed it by.
        tokio::time::sleep_until(last_call + idle_timeout * 2 + Duration::from_millis(200)).await;
        assert_eq!(quiet.conn.ping(b"still here").await?.payload, b"still here");
        assert_eq!(read(&server, |s| &s.idle_timeouts)?, 1);
        Ok(())
    })
    .await
}

/// Replies are paged by bytes: with a 64 KiB reply budget, one `fetch` of up to 1000 entries
/// returns only the 40 kB messages that fit (the first always does), and a member reading
/// the log page after page still gets every message.
#[tokio::test]
async fn fetch_is_paged_by_bytes_and_readers_still_get_everything() -> Result<()> {
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |c| {
            c.limits.max_reply_bytes = 64 * 1024;
        })?;
        let dir = tempfile::tempdir()?;
        let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
        let mut bob = User::register(&server, dir.path(), "bob", Suite::Classical).await?;
        let id = alice.chat().create_group("big").await?;
        let joined = alice
            .chat()
            .invite("big", &["bob".into()], &mut |_| {})
            .await?;
        bob.recv().await?;
        let body = vec![b'x'; 40_000];
        for _ in 0..3 {
            alice.chat().send("big", &body, &mut |_| {}).await?;
        }
        let page = bob.session.delivery.fetch(&id, joined, 1000).await?;
        assert_eq!(page.len(), 1, "one 40 kB message per 64 KiB page");
        let more = bob.session.delivery.fetch(&id, page[0].seq, 1000).await?;
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].seq, page[0].seq + 1);

        let got = User::messages(&bob.recv().await?);
        assert_eq!(got.len(), 3, "every message, read page by page");
        assert!(got.iter().all(|(_, text)| text.len() == body.len()));
        Ok(())
    })
    .await
}

/// A connection holds at most `max_subscriptions_per_connection` subscriptions: the next is
/// refused with `limit_reached`, and closing one makes room again.
#[tokio::test]
async fn subscriptions_per_connection_are_capped() -> Result<()> {
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |c| {
            c.limits.max_subscriptions_per_connection = 2;
        })?;
        let dir = tempfile::tempdir()?;
        let alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
        let first = alice.session.delivery.subscribe_inbox(0).await?;
        let _second = alice.session.delivery.subscribe_inbox(0).await?;
        let refused = alice.session.delivery.subscribe_inbox(0).await;
        assert_eq!(
            refused.err().and_then(|e| e.code()),
            Some(ErrorCode::LimitReached)
        );
        // Another connection has its own budget.
        let bob = User::register(&server, dir.path(), "bob", Suite::Classical).await?;
        let _bobs = bob.session.delivery.subscribe_inbox(0).await?;
        // Dropping a subscription ends it on the server, which frees a slot.
        drop(first);
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            match alice.session.delivery.subscribe_inbox(0).await {
                Ok(_third) => break,
                Err(e) if e.code() == Some(ErrorCode::LimitReached) => {
                    anyhow::ensure!(tokio::time::Instant::now() < deadline, "no slot freed");
                    tokio::task::yield_now().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    })
    .await
}

/// Binds (each may register a new identity) are rate limited per source address: past the
/// limit one address is refused with `rate_limited` and counted, another is served.
#[tokio::test]
async fn binds_are_rate_limited_per_address() -> Result<()> {
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |c| {
            c.limits.rates.binds_per_address = 2;
        })?;
        for _ in 0..2 {
            let c = RawClient::connect_from([127, 0, 0, 2], &server).await?;
            c.bind(&IdentityKeypair::generate()?).await?;
        }
        let third = RawClient::connect_from([127, 0, 0, 2], &server).await?;
        let refused = third.bind(&IdentityKeypair::generate()?).await;
        let code = refused
            .err()
            .and_then(|e| e.downcast_ref::<capnp::Error>().and_then(code_of));
        assert_eq!(code, Some(ErrorCode::RateLimited));
        assert!(metrics(&server)?.contains("qpq_rate_limited_total{limit=\"bind_address\"} 1\n"));
        let other = RawClient::connect_from([127, 0, 0, 3], &server).await?;
        other.bind(&IdentityKeypair::generate()?).await?;
        assert_eq!(other.ping(b"served").await?, b"served");
        Ok(())
    })
    .await
}

/// Raises this process's open-file limit to its hard limit (a test holding thousands of
/// sockets, both ends in one process) and returns the soft limit now in force.
fn raise_open_files() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// 10 000 connections from one address that complete the handshake and then idle: the
/// address's cap (256) holds, every other attempt is closed on accept and counted, and a
/// client from another loopback address still registers and chats. Resident memory of this
/// process (the server runs in it, and the attackers' sockets) grows by less than 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_from_one_address_are_capped() -> Result<()> {
    const ATTEMPTS: usize = 10_000;
    const CAP: usize = 256;
    let open_files = raise_open_files();
    anyhow::ensure!(
        open_files >= 2 * CAP as u64 + 512,
        "needs {} open files, the limit is {open_files}",
        2 * CAP + 512
    );
    let server = TestServer::start(NodeRole::Standalone, |c| {
        // Idle connections are not cut by the bind deadline during the test: the cap alone
        // holds them off.
        c.limits.bind_timeout = Duration::from_secs(300);
    })?;
    let before = support::rss()?;
    let server = std::sync::Arc::new(server);
    let mut held = Vec::new();
    let mut refused = 0usize;
    // 64 attempts at a time; each either completes its handshake (and is kept) or is closed.
    for chunk in (0..ATTEMPTS).collect::<Vec<_>>().chunks(64) {
        let tries = chunk.iter().map(|_| {
            let server = std::sync::Arc::clone(&server);
            tokio::spawn(async move { handshake_from([127, 0, 0, 2], &server).await })
        });
        for r in futures::future::join_all(tries).await {
            match r? {
                Ok(conn) => held.push(conn),
                Err(_) => refused += 1,
            }
        }
    }
    assert!(held.len() <= CAP, "{} connections held", held.len());
    assert_eq!(held.len() + refused, ATTEMPTS);
    let stats = server.handle()?.stats();
    let counted = stats.address_connections_full.load(Ordering::Relaxed)
        + stats.address_handshakes_full.load(Ordering::Relaxed);
    assert!(
        counted as usize >= ATTEMPTS - CAP,
        "{counted} refusals counted"
    );

    // Another address registers and chats.
    local(async {
        let dir = tempfile::tempdir()?;
        let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
        let mut bob = User::register(&server, dir.path(), "bob", Suite::Classical).await?;
        alice.chat().create_group("g").await?;
        alice
            .chat()
            .invite("g", &["bob".into()], &mut |_| {})
            .await?;
        alice.chat().send("g", b"still served", &mut |_| {}).await?;
        let got = User::messages(&bob.recv().await?);
        assert_eq!(got.len(), 1);
        Ok::<_, anyhow::Error>(())
    })
    .await?;
    let grown = support::rss()?.saturating_sub(before);
    eprintln!(
        "{} of {ATTEMPTS} connections held, resident memory grew by {grown} bytes",
        held.len()
    );
    assert!(grown < 64 << 20, "resident memory grew by {grown} bytes");
    Ok(())
}
