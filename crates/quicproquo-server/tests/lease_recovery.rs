//! A shard whose lease lapsed during a database outage is back on the ring as soon as the
//! database answers again, not at its next regular renewal.
//!
//! A real `qpq-server shard` process reaches a real Postgres through a TCP relay in this test.
//! Cutting the relay (every relayed connection closed, new ones closed at once) is the outage:
//! it lasts until the database clock shows the shard's lease expired, and half a renewal period
//! (a third of the lease) more. The relay is then restored, and the lease must be live again
//! well before the next regular renewal, which is when the shard would have tried again
//! without retrying failed renewals at once.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use quicproquo_testkit::postgres::fresh_database;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio_postgres::NoTls;
use tokio_postgres::config::Host;

const BIN: &str = env!("CARGO_BIN_EXE_qpq-server");
const NODE_ID: &str = "lease-recovery-shard";
/// The shard's lease: renewed every 3 s when healthy.
const LEASE_TTL: &str = "9s";
/// How long the outage goes on after the lease expired: half a renewal period, so that the
/// database answers again halfway between two regular renewals (not a synchronisation: the
/// outage's length).
const OUTAGE_PAST_EXPIRY: Duration = Duration::from_millis(1500);
/// How soon after the database answers again the lease must be live: well under the 1.5 s
/// the next regular renewal would be away.
const REJOIN_WITHIN: Duration = Duration::from_secs(1);

/// A TCP relay to the database that can be cut and restored.
struct Relay {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Relay {
    async fn start(upstream: (String, u16)) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (accept_up, accept_conns) = (Arc::clone(&up), Arc::clone(&conns));
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accept_up.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                accept_conns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(task.abort_handle());
            }
        });
        Ok(Self { addr, up, conns })
    }

    /// The outage: closes every relayed connection and refuses new ones.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for conn in self
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            conn.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// The database's host and port.
fn upstream(url: &str) -> Result<(String, u16)> {
    let config: tokio_postgres::Config = url.parse()?;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        _ => bail!("the test database must be reached over TCP: {url}"),
    };
    Ok((host, config.get_ports().first().copied().unwrap_or(5432)))
}

/// `url` as a key=value string reaching the database through `relay`.
fn relayed(url: &str, relay: SocketAddr) -> Result<String> {
    let config: tokio_postgres::Config = url.parse()?;
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut relayed = format!(
        "host={} port={} dbname={}",
        relay.ip(),
        relay.port(),
        quote(
            config
                .get_dbname()
                .context("the test URL names a database")?
        )
    );
    if let Some(user) = config.get_user() {
        relayed.push_str(&format!(" user={}", quote(user)));
    }
    if let Some(password) = config.get_password() {
        relayed.push_str(&format!(
            " password={}",
            quote(std::str::from_utf8(password)?)
        ));
    }
    Ok(relayed)
}

/// Whether the database holds a live lease for the test shard (by the database clock).
async fn lease_live(db: &tokio_postgres::Client) -> Result<Option<bool>> {
    Ok(db
        .query_opt(
            "SELECT lease_until > now() FROM shard_leases WHERE node_id = $1",
            &[&NODE_ID],
        )
        .await?
        .map(|row| row.get(0)))
}

/// Polls `lease_live` until it is `want`; returns how long that took.
async fn wait_lease(db: &tokio_postgres::Client, want: bool, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if lease_live(db).await? == Some(want) {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < limit,
            "the lease did not become {} within {limit:?}",
            if want { "live" } else { "expired" }
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Shard(Child);

impl Drop for Shard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the shard and waits for its "listening" line (it registers its lease before).
fn start_shard(data_dir: &std::path::Path, database_url: &str) -> Result<Shard> {
    // The operator's step: a cluster key kept apart from the shard, and a shard certificate
    // issued with it for the shard's own key and node id.
    let operator = data_dir.join("operator");
    let out = Command::new(BIN)
        .arg("cluster-key")
        .arg("--data-dir")
        .arg(&operator)
        .output()?;
    ensure!(out.status.success(), "qpq-server cluster-key failed");
    let out = Command::new(BIN)
        .args([
            "node-cert",
            "--role",
            "shard",
            "--node-id",
            NODE_ID,
            "--expires",
            "1d",
        ])
        .arg("--data-dir")
        .arg(&operator)
        .arg("--node-key-dir")
        .arg(data_dir)
        .output()?;
    ensure!(
        out.status.success(),
        "qpq-server node-cert failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = Shard(
        Command::new(BIN)
            .args(["shard", "--listen", "127.0.0.1:0", "--ops-listen", "off"])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--node-certificate-file")
            .arg(data_dir.join("node.cert"))
            .args(["--database-url", database_url])
            .args(["--node-id", NODE_ID, "--lease-ttl", LEASE_TTL])
            .env("QPQ_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let stdout = child.0.stdout.take().context("shard stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .context("the shard did not start")?;
    ensure!(
        line.contains("listening on"),
        "unexpected first line: {line}"
    );
    Ok(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_rejoins_as_soon_as_the_database_answers_after_an_outage() -> Result<()> {
    let database = fresh_database().await?;
    let out = Command::new(BIN)
        .args(["migrate", "--database-url", database.url()])
        .output()?;
    ensure!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (db, connection) = tokio_postgres::connect(database.url(), NoTls).await?;
    tokio::spawn(connection);

    let relay = Relay::start(upstream(database.url())?).await?;
    let shard_url = relayed(database.url(), relay.addr)?;
    let dir = tempfile::tempdir()?;
    let shard = start_shard(dir.path(), &shard_url)?;
    assert_eq!(lease_live(&db).await?, Some(true), "registered at start");

    relay.cut();
    let expired_after = wait_lease(&db, false, Duration::from_secs(30)).await?;
    tokio::time::sleep(OUTAGE_PAST_EXPIRY).await;
    relay.restore();
    let rejoined_after = wait_lease(&db, true, Duration::from_secs(30)).await?;
    eprintln!(
        "lease expired {expired_after:?} into the outage; live again {rejoined_after:?} after \
         the database answered"
    );
    assert!(
        rejoined_after < REJOIN_WITHIN,
        "the shard took {rejoined_after:?} to re-register after the database answered again"
    );
    drop(shard);
    Ok(())
}
