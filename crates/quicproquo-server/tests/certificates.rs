//! Node certificates through real processes and a real Postgres: a node refuses to start with
//! a bad certificate, a shard refuses peers whose certificate is bad or of the wrong role, and
//! a cluster key rollover keeps clients working while the nodes move to the new key.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use capnp_rpc::rpc_twoparty_capnp::Side;
use quicproquo_client::{ClientError, ConnectOptions, Connection};
use quicproquo_core::cert::unix_now;
use quicproquo_core::channel::ChannelLimits;
use quicproquo_core::rpc::rpc_system;
use quicproquo_core::{
    CertificateFields, ClusterPublicKey, ClusterSigningKey, IdentityKeypair, NodeCertificate,
    NodeRole, NodeVerifier, noise,
};
use quicproquo_proto::bootstrap_capnp::bootstrap;
use quicproquo_proto::errors::{ErrorCode, code_of};
use quicproquo_server::keystore;
use quicproquo_server::store::postgres::migrate;
use quicproquo_testkit::postgres::fresh_database;

const BIN: &str = env!("CARGO_BIN_EXE_qpq-server");

/// Issues `role` for the key in `dir` (created there), valid from `from` for `secs` seconds
/// (relative to now), under `node_id`, and writes it to `dir/node.cert`.
fn issue(
    cluster: &ClusterSigningKey,
    dir: &Path,
    role: NodeRole,
    node_id: &str,
    from: i64,
    secs: u64,
) -> Result<PathBuf> {
    let key = keystore::node_key(dir)?;
    let not_before = unix_now().saturating_add_signed(from);
    let cert = cluster.issue(&CertificateFields {
        role,
        node_key: *key.public(),
        node_id: node_id.into(),
        not_before,
        not_after: not_before + secs,
    })?;
    let path = dir.join(keystore::NODE_CERTIFICATE_FILE);
    keystore::write_certificate(&path, &cert)?;
    Ok(path)
}

fn node_cmd(role: &str, data: &Path, db: &str, trusted: &[ClusterPublicKey]) -> Command {
    let mut c = Command::new(BIN);
    c.arg(role)
        .args(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"])
        .args([
            "--lease-ttl",
            "2s",
            "--ring-refresh",
            "100ms",
            "--workers",
            "1",
        ])
        .args(["--certificate-check-interval", "1s"])
        .arg("--data-dir")
        .arg(data)
        .arg("--node-certificate-file")
        .arg(data.join(keystore::NODE_CERTIFICATE_FILE))
        .args(["--database-url", db])
        .env_remove("QPQ_CONFIG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env("QPQ_LOG", "warn");
    if !trusted.is_empty() {
        let keys: Vec<String> = trusted.iter().map(ClusterPublicKey::to_hex).collect();
        c.arg("--cluster-public-keys").arg(keys.join(","));
    }
    c
}

/// A node process, killed when dropped.
struct Node {
    child: Child,
    addr: SocketAddr,
    ops: SocketAddr,
}

impl Node {
    fn start(mut cmd: Command) -> Result<Self> {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let mut out = BufReader::new(child.stdout.take().context("stdout")?);
        let (mut first, mut second) = (String::new(), String::new());
        out.read_line(&mut first)?;
        out.read_line(&mut second)?;
        let (Some(addr), Some(ops)) = (
            first.split_whitespace().nth(4),
            second.split_whitespace().nth(3),
        ) else {
            let _ = child.kill();
            bail!("the node did not start: {first:?} {second:?}");
        };
        Ok(Self {
            addr: addr.parse()?,
            ops: ops.parse()?,
            child,
        })
    }

    /// The value of the unlabelled metric `name` on the node's `/metrics`.
    fn metric(&self, name: &str) -> Result<u64> {
        use std::io::Write as _;
        let mut s = std::net::TcpStream::connect(self.ops)?;
        write!(s, "GET /metrics HTTP/1.1\r\nHost: ops\r\n\r\n")?;
        let mut page = String::new();
        s.read_to_string(&mut page)?;
        Ok(page
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Polls the metric `name` until it reaches `at_least`, for up to 15 s.
    fn wait_metric(&self, name: &str, at_least: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.metric(name)? < at_least {
            ensure!(Instant::now() < deadline, "{name} never reached {at_least}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a node that must refuse to start; returns its error output.
fn refused(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdout(Stdio::null()).output()?;
    ensure!(!out.status.success(), "the node started: {out:?}");
    Ok(String::from_utf8(out.stderr)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_with_a_bad_certificate() -> Result<()> {
    let db = fresh_database().await?;
    migrate(db.url()).await?;
    let tmp = tempfile::tempdir()?;
    let cluster = ClusterSigningKey::generate()?;
    let other = ClusterSigningKey::generate()?;
    let data = tmp.path().join("edge");
    let url = db.url();

    issue(&cluster, &data, NodeRole::Edge, "e", -7200, 3600)?;
    let err = refused(&mut node_cmd("edge", &data, url, &[]))?;
    ensure!(err.contains("expired"), "expired: {err}");

    issue(&cluster, &data, NodeRole::Shard, "e", -10, 3600)?;
    let err = refused(&mut node_cmd("edge", &data, url, &[]))?;
    ensure!(
        err.contains("a shard certificate is not accepted here"),
        "wrong role: {err}"
    );

    issue(&other, &data, NodeRole::Edge, "e", -10, 3600)?;
    let err = refused(&mut node_cmd("edge", &data, url, &[cluster.public_key()]))?;
    ensure!(
        err.contains("cluster key this peer does not trust"),
        "another cluster key: {err}"
    );

    // Another node's certificate.
    let stranger = tmp.path().join("stranger");
    issue(&cluster, &stranger, NodeRole::Edge, "e", -10, 3600)?;
    std::fs::copy(stranger.join("node.cert"), data.join("node.cert"))?;
    let err = refused(&mut node_cmd("edge", &data, url, &[]))?;
    ensure!(err.contains("another node key"), "another key: {err}");

    // The signing key on an edge.
    issue(&cluster, &data, NodeRole::Edge, "e", -10, 3600)?;
    let key_file = tmp.path().join("cluster.key");
    std::fs::write(&key_file, format!("{}\n", cluster.secret_hex().as_str()))?;
    let err = refused(
        node_cmd("edge", &data, url, &[])
            .arg("--cluster-key-file")
            .arg(&key_file),
    )?;
    ensure!(
        err.contains("must not hold the cluster signing key"),
        "{err}"
    );

    // No certificate at all.
    let err = refused(
        Command::new(BIN)
            .args(["shard", "--listen", "127.0.0.1:0", "--database-url", url])
            .arg("--data-dir")
            .arg(tmp.path().join("bare"))
            .env_remove("QPQ_CONFIG"),
    )?;
    ensure!(err.contains("node_certificate_file"), "{err}");

    // With a good one it starts; expiring within the renewal window (7d by default), it
    // says so on its metrics; outside a shorter window, it does not.
    let node = Node::start(node_cmd("edge", &data, url, &[]))?;
    ensure!(node.metric("qpq_node_certificate_renewal_due")? == 1);
    ensure!(node.metric("qpq_node_certificate_expiry_timestamp_seconds")? > unix_now());
    drop(node);
    let mut cmd = node_cmd("edge", &data, url, &[]);
    cmd.args(["--certificate-renewal-window", "10m"]);
    let node = Node::start(cmd)?;
    ensure!(node.metric("qpq_node_certificate_renewal_due")? == 0);
    Ok(())
}

/// Opens a connection to `addr` as a node presenting `cert` (for `key`), and asks for the
/// shard's internal interface.
async fn ask_for_shard(
    addr: SocketAddr,
    key: &quicproquo_core::NoiseKeypair,
    cert: &NodeCertificate,
    trusted: &NodeVerifier,
) -> Result<std::result::Result<(), capnp::Error>> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let outcome =
        noise::initiate_as_node(&mut stream, key, trusted, cert, Duration::from_secs(5)).await?;
    let (r, w) = stream.into_split();
    let mut rpc = rpc_system(
        r,
        w,
        outcome.session,
        ChannelLimits::default(),
        Side::Client,
        None,
    );
    let boot: bootstrap::Client = rpc.bootstrap(Side::Server);
    tokio::task::spawn_local(async move {
        let _ = rpc.await;
    });
    let answer = boot.cluster_request().send().promise.await;
    Ok(answer.and_then(|a| a.get()?.get_shard().map(drop)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_refuses_peers_that_are_not_valid_edges() -> Result<()> {
    let db = fresh_database().await?;
    migrate(db.url()).await?;
    let tmp = tempfile::tempdir()?;
    let cluster = ClusterSigningKey::generate()?;
    let other = ClusterSigningKey::generate()?;
    let shard_dir = tmp.path().join("shard");
    issue(&cluster, &shard_dir, NodeRole::Shard, "shard-a", -10, 3600)?;
    let shard = Node::start(node_cmd("shard", &shard_dir, db.url(), &[]))?;
    let trusted = NodeVerifier::new(cluster.public_key());

    let peer = |name: &str, by: &ClusterSigningKey, role, from, secs| -> Result<_> {
        let dir = tmp.path().join(name);
        let path = issue(by, &dir, role, name, from, secs)?;
        Ok((
            keystore::node_key(&dir)?,
            keystore::read_certificate(&path)?,
        ))
    };
    let cases = [
        (
            "edge",
            peer("edge", &cluster, NodeRole::Edge, -10, 3600)?,
            None,
        ),
        (
            "expired edge",
            peer("old-edge", &cluster, NodeRole::Edge, -7200, 3600)?,
            Some((ErrorCode::NotANode, "expired")),
        ),
        (
            "foreign edge",
            peer("foreign", &other, NodeRole::Edge, -10, 3600)?,
            Some((ErrorCode::NotANode, "does not trust")),
        ),
        (
            "a client presenting a shard's certificate",
            peer("other-shard", &cluster, NodeRole::Shard, -10, 3600)?,
            Some((ErrorCode::WrongRole, "edges only")),
        ),
        (
            "a client presenting a standalone certificate",
            peer("standalone", &cluster, NodeRole::Standalone, -10, 3600)?,
            Some((ErrorCode::WrongRole, "edges only")),
        ),
    ];
    tokio::task::LocalSet::new()
        .run_until(async {
            for (what, (key, cert), expected) in &cases {
                let answer = ask_for_shard(shard.addr, key, cert, &trusted).await?;
                match (answer, expected) {
                    (Ok(()), None) => {}
                    (Err(e), Some((code, reason))) => {
                        ensure!(code_of(&e) == Some(*code), "{what}: {e}");
                        ensure!(e.to_string().contains(reason), "{what}: {e}");
                    }
                    (answer, _) => bail!("{what}: unexpected {answer:?}"),
                }
            }
            // A client refuses a shard at the handshake by default; one that connects anyway
            // (no certificate) gets no internal interface, and no binding either.
            let client = ConnectOptions::new(cluster.public_key());
            let refused = Connection::connect(shard.addr, &client).await;
            ensure!(
                matches!(
                    refused,
                    Err(ClientError::WrongRole {
                        role: NodeRole::Shard,
                        ..
                    })
                ),
                "a client connected to a shard: {:?}",
                refused.err()
            );
            let mut anyway = client;
            anyway.roles.push(NodeRole::Shard);
            let conn = Connection::connect(shard.addr, &anyway).await?;
            let bound = conn.bind(&IdentityKeypair::generate()?).await;
            ensure!(bound.err().and_then(|e| e.code()) == Some(ErrorCode::WrongRole));
            anyhow::Ok(())
        })
        .await?;
    ensure!(shard.metric("qpq_peer_certificates_refused_total")? == 2);
    Ok(())
}

/// Binds a fresh identity through `edge` with `options` and creates a group (which the edge
/// forwards to the owner shard).
async fn use_cluster(edge: SocketAddr, options: &ConnectOptions, group: &[u8]) -> Result<()> {
    let conn = Connection::connect(edge, options).await?;
    let me = IdentityKeypair::generate()?;
    let session = conn.bind(&me).await?;
    let mls = quicproquo_core::mls::MlsIdentity::new(&me);
    let provider = quicproquo_core::mls::MlsProvider::default();
    let g = quicproquo_core::group::Group::create(
        &provider,
        &mls,
        quicproquo_core::mls::Suite::Classical,
        group,
    )?;
    let info = g.group_info(&provider, &mls)?;
    session.delivery.create_group(group, &info).await?;
    Ok(())
}

/// Clients pinning the old key, the new one, or both; nodes trusting both while each moves
/// to a certificate from the new key, picked up without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_key_rollover_keeps_clients_working() -> Result<()> {
    let db = fresh_database().await?;
    migrate(db.url()).await?;
    let tmp = tempfile::tempdir()?;
    let old = ClusterSigningKey::generate()?;
    let new = ClusterSigningKey::generate()?;
    let both = [old.public_key(), new.public_key()];
    let url = db.url();

    // Step 1: every node trusts both keys; all still present certificates from the old one.
    let shard_dir = tmp.path().join("shard");
    let edge_dir = tmp.path().join("edge");
    issue(&old, &shard_dir, NodeRole::Shard, "shard-a", -10, 3600)?;
    issue(&old, &edge_dir, NodeRole::Edge, "edge-1", -10, 3600)?;
    let shard = Node::start(node_cmd("shard", &shard_dir, url, &both))?;
    let edge = Node::start(node_cmd("edge", &edge_dir, url, &both))?;

    let pin_old = ConnectOptions::new(old.public_key());
    let pin_new = ConnectOptions::new(new.public_key());
    let pin_both = ConnectOptions::with_keys(both)?;
    tokio::task::LocalSet::new()
        .run_until(async {
            use_cluster(edge.addr, &pin_old, b"g-old-1").await?;
            use_cluster(edge.addr, &pin_both, b"g-both-1").await?;
            let refused = Connection::connect(edge.addr, &pin_new).await;
            ensure!(matches!(refused, Err(ClientError::WrongClusterKey { .. })));
            anyhow::Ok(())
        })
        .await?;

    // Step 2: the shard moves to the new key; a new edge still on the old key reaches it.
    issue(&new, &shard_dir, NodeRole::Shard, "shard-a", -10, 3600)?;
    shard.wait_metric("qpq_node_certificate_reloads_total", 1)?;
    let late_dir = tmp.path().join("late-edge");
    issue(&old, &late_dir, NodeRole::Edge, "edge-2", -10, 3600)?;
    let late = Node::start(node_cmd("edge", &late_dir, url, &both))?;
    tokio::task::LocalSet::new()
        .run_until(async {
            use_cluster(late.addr, &pin_old, b"g-old-2").await?;
            use_cluster(late.addr, &pin_both, b"g-both-2").await?;
            use_cluster(edge.addr, &pin_both, b"g-both-3").await?;
            anyhow::Ok(())
        })
        .await?;

    // Step 3: the edge moves too, without a restart: clients pinning the new key (or both)
    // reach it; one pinning only the old key no longer does, and says why.
    issue(&new, &edge_dir, NodeRole::Edge, "edge-1", -10, 3600)?;
    edge.wait_metric("qpq_node_certificate_reloads_total", 1)?;
    tokio::task::LocalSet::new()
        .run_until(async {
            use_cluster(edge.addr, &pin_new, b"g-new-1").await?;
            use_cluster(edge.addr, &pin_both, b"g-both-4").await?;
            let refused = Connection::connect(edge.addr, &pin_old).await;
            ensure!(matches!(refused, Err(ClientError::WrongClusterKey { .. })));
            anyhow::Ok(())
        })
        .await?;

    // Step 4: the old key is dropped: a node trusting only the new key reaches the shard.
    let fresh_dir = tmp.path().join("fresh-edge");
    issue(&new, &fresh_dir, NodeRole::Edge, "edge-3", -10, 3600)?;
    let fresh = Node::start(node_cmd("edge", &fresh_dir, url, &[new.public_key()]))?;
    tokio::task::LocalSet::new()
        .run_until(async {
            use_cluster(fresh.addr, &pin_new, b"g-new-2").await?;
            anyhow::Ok(())
        })
        .await?;
    drop(late);
    Ok(())
}
