//! An edge accepts pushes only for the groups it asked to follow: a shard (here one the test
//! plays, with a valid shard certificate and a lease on the ring) that answers an edge's
//! `watch` of one group by pushing entries of another is refused, while pushes for the
//! followed group go through. Real edge process, real Postgres, real Noise and RPC.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use capnp_rpc::rpc_twoparty_capnp::Side;
use quicproquo_client::{ConnectOptions, Connection};
use quicproquo_core::cert::unix_now;
use quicproquo_core::channel::ChannelLimits;
use quicproquo_core::rpc::rpc_system;
use quicproquo_core::{
    CertificateFields, ClusterSigningKey, IdentityKeypair, NodeCertificate, NodeRole, NoiseKeypair,
    noise,
};
use quicproquo_proto::bootstrap_capnp::bootstrap;
use quicproquo_proto::cluster_capnp::shard_service;
use quicproquo_proto::delivery_capnp::subscription;
use quicproquo_proto::errors::{ErrorCode, code_of};
use quicproquo_server::keystore;
use quicproquo_server::model::group::GroupId;
use quicproquo_server::store::log::LogStore;
use quicproquo_server::store::postgres::{PgStore, migrate};
use quicproquo_server::store::postgres_cluster::LeaseClaim;
use quicproquo_testkit::postgres::fresh_database;
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_qpq-server");

/// What the rogue shard saw when it pushed: (group pushed, the edge's answer).
type Pushed = (Vec<u8>, std::result::Result<(), capnp::Error>);

/// The rogue shard's bootstrap: hands out its ShardService to whoever asks.
struct RogueBootstrap {
    shard: shard_service::Client,
}

impl bootstrap::Server for RogueBootstrap {
    async fn cluster(
        self: Rc<Self>,
        _: bootstrap::ClusterParams,
        mut results: bootstrap::ClusterResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_shard(self.shard.clone());
        Ok(())
    }
}

/// Answers a `watch` of one group by pushing (empty) batches for `other` and then for the
/// watched group, and reports the edge's answers.
struct RogueShard {
    other: Vec<u8>,
    report: mpsc::UnboundedSender<Pushed>,
}

struct Nothing;
impl subscription::Server for Nothing {}

impl shard_service::Server for RogueShard {
    async fn watch(
        self: Rc<Self>,
        params: shard_service::WatchParams,
        mut results: shard_service::WatchResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let watched = p.get_group_id()?.to_vec();
        let sink = p.get_sink()?;
        let report = self.report.clone();
        let other = self.other.clone();
        tokio::task::spawn_local(async move {
            for group in [other, watched] {
                let mut call = sink.deliver_request();
                call.get().set_group_id(&group);
                call.get().init_entries(0);
                let answer = call.send().promise.await.map(drop);
                let _ = report.send((group, answer));
            }
        });
        results
            .get()
            .set_subscription(capnp_rpc::new_client(Nothing));
        Ok(())
    }
}

/// Serves the rogue shard's Noise + RPC on `listener`.
async fn serve_rogue(
    listener: tokio::net::TcpListener,
    key: Rc<NoiseKeypair>,
    cert: NodeCertificate,
    shard: shard_service::Client,
) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let (key, cert, shard) = (Rc::clone(&key), cert.clone(), shard.clone());
        tokio::task::spawn_local(async move {
            let Ok(outcome) =
                noise::respond(&mut stream, &key, &cert, Duration::from_secs(5)).await
            else {
                return;
            };
            let boot: bootstrap::Client = capnp_rpc::new_client(RogueBootstrap { shard });
            let (r, w) = stream.into_split();
            let rpc = rpc_system(
                r,
                w,
                outcome.session,
                ChannelLimits::default(),
                Side::Server,
                Some(boot.client),
            );
            let _ = rpc.await;
        });
    }
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_refuses_pushes_for_a_group_it_did_not_follow() -> Result<()> {
    let db = fresh_database().await?;
    migrate(db.url()).await?;
    let tmp = tempfile::tempdir()?;
    let cluster = ClusterSigningKey::generate()?;
    let now = unix_now();
    let certify = |role, key: &NoiseKeypair, id: &str| {
        cluster.issue(&CertificateFields {
            role,
            node_key: *key.public(),
            node_id: id.into(),
            not_before: now - 10,
            not_after: now + 3600,
        })
    };

    // The edge, a real process with its certificate.
    let edge_dir = tmp.path().join("edge");
    let edge_key = keystore::node_key(&edge_dir)?;
    let cert_file = edge_dir.join(keystore::NODE_CERTIFICATE_FILE);
    keystore::write_certificate(&cert_file, &certify(NodeRole::Edge, &edge_key, "edge")?)?;
    let mut child = Command::new(BIN)
        .args(["edge", "--listen", "127.0.0.1:0", "--ops-listen", "off"])
        .args([
            "--ring-refresh",
            "100ms",
            "--workers",
            "1",
            "--database-url",
            db.url(),
        ])
        .arg("--data-dir")
        .arg(&edge_dir)
        .arg("--node-certificate-file")
        .arg(&cert_file)
        .env_remove("QPQ_CONFIG")
        .env("QPQ_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let _edge = Node(child);
    let edge_addr: SocketAddr = line
        .split_whitespace()
        .nth(4)
        .with_context(|| format!("the edge did not start: {line:?}"))?
        .parse()?;

    tokio::task::LocalSet::new()
        .run_until(async {
            // The rogue shard: a valid shard certificate, a lease on the ring.
            let rogue_key = Rc::new(NoiseKeypair::generate()?);
            let rogue_cert = certify(NodeRole::Shard, &rogue_key, "rogue")?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let rogue_addr = listener.local_addr()?;
            let (report, mut reports) = mpsc::unbounded_channel();
            let shard: shard_service::Client = capnp_rpc::new_client(RogueShard {
                other: b"not-followed".to_vec(),
                report,
            });
            tokio::task::spawn_local(serve_rogue(
                listener,
                Rc::clone(&rogue_key),
                rogue_cert,
                shard,
            ));
            let store = PgStore::connect(db.url(), 2).await?;
            store
                .renew_lease(&LeaseClaim {
                    node_id: "rogue".into(),
                    address: rogue_addr.to_string(),
                    noise_key: *rogue_key.public(),
                    ttl: Duration::from_secs(60),
                })
                .await?;

            // A member of group "followed" subscribes through the edge: the edge watches it
            // on its owner, the rogue shard.
            let me = IdentityKeypair::generate()?;
            let conn =
                Connection::connect(edge_addr, &ConnectOptions::new(cluster.public_key())).await?;
            let session = conn.bind(&me).await?;
            let followed = GroupId::new(b"followed").map_err(|e| anyhow::anyhow!("{e}"))?;
            store.create_group(&followed, &me.public()).await?;
            let _subscription = session.delivery.subscribe(b"followed", 0).await?;

            let mut answers = Vec::new();
            for what in ["first", "second"] {
                let pushed = tokio::time::timeout(Duration::from_secs(15), reports.recv())
                    .await
                    .ok()
                    .flatten()
                    .with_context(|| format!("no answer to the {what} push"))?;
                answers.push(pushed);
            }
            let mut answers = answers.into_iter();
            let (group, answer) = answers.next().context("first")?;
            ensure!(group == b"not-followed");
            match answer {
                Err(e) => ensure!(code_of(&e) == Some(ErrorCode::InvalidArgument), "{e}"),
                Ok(()) => bail!("the edge accepted a push for a group it did not follow"),
            }
            let (group, answer) = answers.next().context("second")?;
            ensure!(group == b"followed");
            answer.map_err(|e| anyhow::anyhow!("a push for the followed group: {e}"))?;
            anyhow::Ok(())
        })
        .await
}
