//! The ops listener: `/metrics` moves with traffic, `/readyz` turns 503 while a drain lets
//! in-flight calls finish, and the binary prints its ops address and logs JSON on request.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use quicproquo_core::NodeRole;
use quicproquo_core::mls::Suite;
use quicproquo_server::store::AnyStore;
use quicproquo_server::store::postgres::PgStore;
use support::{TestServer, User, local, postgres_store};

const BIN: &str = env!("CARGO_BIN_EXE_qpq-server");

/// `GET path` on the ops listener: (status, body).
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: ops\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {answer:?}"))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of the sample `series` (name with labels, exactly as rendered) in `metrics`.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn ops_server(store: Option<AnyStore>, grace: Duration) -> Result<TestServer> {
    TestServer::start_with(NodeRole::Standalone, store, |c| {
        c.ops_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        c.shutdown_grace = grace;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_a_chat() -> Result<()> {
    local(async {
        let server = ops_server(None, Duration::from_secs(5))?;
        let ops = server.handle()?.ops_addr().context("ops listener")?;
        ensure!(get(ops, "/livez")?.0 == 200);
        ensure!(get(ops, "/readyz")?.0 == 200);
        ensure!(get(ops, "/nope")?.0 == 404);
        let (status, before) = get(ops, "/metrics")?;
        ensure!(status == 200);
        ensure!(before.contains("qpq_info{role=\"standalone\""), "{before}");

        let dir = tempfile::tempdir()?;
        let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
        let mut bob = User::register(&server, dir.path(), "bob", Suite::Classical).await?;
        let id = alice.chat().create_group("g").await?;
        alice.chat().invite("g", &["bob".into()], &mut |_| {}).await?;
        bob.chat().receive_all(&mut |_| {}).await?;
        let cursor = bob.state.groups.get(&id).map_or(0, |m| m.cursor);
        let mut sub = bob.session.delivery.subscribe(&id, cursor).await?;
        alice.chat().send("g", b"hello", &mut |_| {}).await?;
        tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await?
            .context("subscription ended")?;

        // The push is counted once the subscriber has acknowledged it: poll briefly.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut after = get(ops, "/metrics")?.1;
        while sample(&after, "qpq_fanout_entries_total") == 0.0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
            after = get(ops, "/metrics")?.1;
        }
        let send = "qpq_rpc_requests_total{rpc_service=\"DeliveryService\",rpc_method=\"send\",status=\"ok\"}";
        for series in [
            send,
            "qpq_handshakes_total{result=\"ok\"}",
            "qpq_connections_accepted_total",
            "qpq_appends_total{outcome=\"appended\"}",
            "qpq_append_batch_size_count",
            "qpq_fanout_entries_total",
            "qpq_rpc_duration_seconds_count{rpc_service=\"DeliveryService\",rpc_method=\"send\"}",
        ] {
            ensure!(
                sample(&after, series) > sample(&before, series),
                "{series} did not move:\n{after}"
            );
        }
        ensure!(sample(&after, send) >= 2.0, "a commit and a message");
        ensure!(sample(&after, "qpq_connections_open") >= 2.0);
        // No per-user or per-group label.
        ensure!(!after.contains("alice") && !after.contains(&hex::encode(&id)));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_during_a_drain_while_in_flight_calls_finish() -> Result<()> {
    let (store, db) = postgres_store().await?;
    let db = db.context("a test database")?;
    local(async {
        let mut server = ops_server(store, Duration::from_secs(20))?;
        let ops = server.handle()?.ops_addr().context("ops listener")?;
        let dir = tempfile::tempdir()?;
        let mut alice = User::register(&server, dir.path(), "alice", Suite::Classical).await?;
        let id = alice.chat().create_group("g").await?;
        ensure!(get(ops, "/readyz")?.0 == 200);

        // Hold the group's row lock, so the next append waits inside the store.
        let (mut blocker, connection) =
            tokio_postgres::connect(db.url(), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let tx = blocker.transaction().await?;
        tx.execute(
            "SELECT 1 FROM groups WHERE group_id = $1 FOR UPDATE",
            &[&id],
        )
        .await?;
        let sending = tokio::task::spawn_local(async move {
            alice
                .chat()
                .send("g", b"in flight", &mut |_| {})
                .await
                .map(drop)
        });
        // Wait until the append is blocked on the lock.
        let (watcher, connection) =
            tokio_postgres::connect(db.url(), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let row = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                     AND datname = current_database()",
                    &[],
                )
                .await?;
            if row.get::<_, i64>(0) > 0 {
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the append never blocked"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // Drain (what SIGTERM does): readiness flips at once, liveness stays.
        let handle = server.handle.take().context("handle")?;
        handle.shutdown();
        ensure!(get(ops, "/readyz")? == (503, "not ready: draining\n".to_owned()));
        ensure!(get(ops, "/livez")?.0 == 200);
        let (_, metrics) = get(ops, "/metrics")?;
        ensure!(metrics.contains("\nqpq_draining 1\n"), "{metrics}");
        ensure!(!sending.is_finished(), "the call must still be in flight");

        // Release the lock: the in-flight send completes, then the server exits.
        tx.commit().await?;
        tokio::time::timeout(Duration::from_secs(20), sending)
            .await
            .context("the in-flight send did not finish")???;
        tokio::task::spawn_blocking(move || handle.join()).await??;
        ensure!(
            get(ops, "/livez").is_err(),
            "the ops listener stops with the server"
        );
        Ok(())
    })
    .await
}

#[test]
fn the_binary_prints_its_ops_address_and_logs_json() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut child = Command::new(BIN)
        .current_dir(tmp.path())
        .args([
            "standalone",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .env_remove("QPQ_CONFIG")
        .env_remove("QPQ_DATABASE_URL")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env("QPQ_LOG", "info")
        .env("QPQ_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let (mut first, mut second) = (String::new(), String::new());
    stdout.read_line(&mut first)?;
    stdout.read_line(&mut second)?;
    let words: Vec<&str> = second.split_whitespace().collect();
    let ["qpq-server", "standalone", "ops", addr] = words[..] else {
        let _ = child.kill();
        bail!("unexpected ops line: {second:?} (after {first:?})");
    };
    let ops: SocketAddr = addr.parse()?;
    ensure!(get(ops, "/livez")?.0 == 200);
    ensure!(get(ops, "/readyz")?.0 == 200);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    ensure!(status.success());
    let exit = child.wait()?;
    ensure!(exit.success(), "{exit:?}");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut stderr)?;
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(!lines.is_empty(), "no log lines");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        ensure!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
    }
    ensure!(
        lines.iter().any(|l| l.contains("\"message\":\"stopped\"")),
        "{stderr}"
    );
    Ok(())
}

/// An edge with no live shard could serve no send: it answers `/readyz` 503 "no live shard"
/// (while `/livez` stays 200), and turns ready as soon as a shard registers its lease.
///
/// A plain test: an edge reads the ring on a runtime of its own while it starts, which must not
/// happen inside the test's runtime.
#[test]
fn an_edge_is_not_ready_while_no_shard_is_alive() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (store, db) = rt.block_on(postgres_store())?;
    let db = db.context("a Postgres database")?;
    let edge = TestServer::start_with(NodeRole::Edge, store, |c| {
        c.ops_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        c.cluster.ring_refresh = Duration::from_millis(50);
    })?;
    let ops = edge.handle()?.ops_addr().context("ops listener")?;
    ensure!(get(ops, "/livez")?.0 == 200);
    ensure!(get(ops, "/readyz")? == (503, "not ready: no live shard\n".to_owned()));

    let shard_store = AnyStore::Postgres(rt.block_on(PgStore::connect(db.url(), 2))?);
    let _shard = TestServer::start_with(NodeRole::Shard, Some(shard_store), |_| {})?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(ops, "/readyz")?;
        if status == 200 {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "still not ready after a shard registered: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
