//! Traces as an operator reads them, from an OTLP receiver in this test: a cluster of one shard
//! and three edges (real `qpq-server` processes configured through the standard `OTEL_*`
//! variables) and a client in this process.
//!
//! - One message send is one trace client → edge → shard → Postgres, each span the child of
//!   the one before, each ending before its parent.
//! - Its fan-out is a chain of its own: the shard's push, the edge's reception (a child of the
//!   push) and the edge's push to the subscriber, each linked to the one before and to the
//!   append, each naming the group by its hash; a subscription's store reads sit inside a
//!   catch-up span linked to the subscribe call.
//! - Every process names itself (service, version, instance, host; pod names passed through
//!   `OTEL_RESOURCE_ATTRIBUTES`), spans follow the semantic conventions 1.42.0 (names, kinds,
//!   integer attributes, no bridge noise), an expected refusal is not an error, and no exported
//!   span has a parent that was never exported.
//! - An edge honours a client's sampled flag only up to its client ratio.
//! - Nothing exported or logged names an identity, a user, a group or a message.

#[path = "traces/otlp.rs"]
mod otlp;
mod support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use opentelemetry_proto::tonic::trace::v1::Span;
use otlp::{
    CLIENT, Got, INTERNAL, Receiver, SERVER, STATUS_ERROR, child, int, linked, links_to, text,
};
use quicproquo_client::{ClientState, ConnectOptions, Connection};
use quicproquo_core::ClusterPublicKey;
use quicproquo_core::mls::Suite;
use quicproquo_proto::errors::ErrorCode;
use quicproquo_server::store::postgres::migrate;
use quicproquo_telemetry::propagation::{self, WireContext};
use quicproquo_testkit::postgres::fresh_database;
use support::{User, local};
use tracing::Instrument as _;

const BIN: &str = env!("CARGO_BIN_EXE_qpq-server");

/// A `qpq-server` process and where its log goes.
struct Node {
    child: Child,
    addr: SocketAddr,
    ops: SocketAddr,
    log: PathBuf,
    data: PathBuf,
}

/// What every node of the test shares.
struct Cluster<'a> {
    dir: &'a Path,
    key_file: &'a Path,
    db: &'a str,
    otlp: String,
}

impl Cluster<'_> {
    /// Starts `role` as `name`, with extra `args` and environment.
    fn start(&self, role: &str, name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Node> {
        let log = self.dir.join(format!("{name}.log"));
        let data = self.dir.join(name);
        // The operator's step: a certificate for the node's key, under its node id if given.
        let node_id = args
            .iter()
            .position(|a| *a == "--node-id")
            .and_then(|i| args.get(i + 1));
        let key_dir = self.key_file.parent().context("key directory")?;
        let mut issue = Command::new(BIN);
        issue
            .args(["node-cert", "--role", role, "--expires", "1d", "--data-dir"])
            .arg(key_dir)
            .arg("--node-key-dir")
            .arg(&data);
        if let Some(id) = node_id {
            issue.args(["--node-id", id]);
        }
        let issued = issue.output()?;
        ensure!(issued.status.success(), "node-cert: {issued:?}");
        let mut child = Command::new(BIN)
            .arg(role)
            .args(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"])
            .args([
                "--lease-ttl",
                "2s",
                "--ring-refresh",
                "100ms",
                "--workers",
                "2",
            ])
            .arg("--data-dir")
            .arg(&data)
            .arg("--node-certificate-file")
            .arg(data.join("node.cert"))
            .arg("--telemetry-key-file")
            .arg(key_dir.join("telemetry.key"))
            .args(["--database-url", self.db])
            .args(args)
            .env_remove("QPQ_CONFIG")
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("OTEL_RESOURCE_ATTRIBUTES")
            .env_remove("OTEL_TRACES_SAMPLER_ARG")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &self.otlp)
            .env("OTEL_TRACES_SAMPLER", "parentbased_always_on")
            .env("OTEL_BSP_SCHEDULE_DELAY", "50")
            .env("QPQ_LOG", "debug")
            .env("QPQ_LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut out = BufReader::new(child.stdout.take().context("stdout")?);
        let (mut first, mut second) = (String::new(), String::new());
        out.read_line(&mut first)?;
        out.read_line(&mut second)?;
        let (Some(addr), Some(ops)) = (
            first.split_whitespace().nth(4),
            second.split_whitespace().nth(3),
        ) else {
            let _ = child.kill();
            bail!("{name} did not start: {first:?} {second:?}");
        };
        Ok(Node {
            addr: addr.parse()?,
            ops: ops.parse()?,
            child,
            log,
            data,
        })
    }
}

impl Node {
    /// Stops the node with SIGTERM; it flushes its spans before it exits.
    fn stop(&mut self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        ensure!(status.success());
        ensure!(self.child.wait()?.success());
        Ok(())
    }

    /// The node id an edge's certificate derives from its Noise key.
    fn derived_id(&self) -> Result<String> {
        let key = quicproquo_server::keystore::node_key(&self.data)?;
        Ok(hex::encode(&key.public()[..8]))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: ops\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// The value of the unlabelled counter or gauge `name` in a Prometheus text page (0 when
/// absent).
fn counter(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// Trace ids below every positive ratio, and above every ratio short of 1 (the SDK's
/// trace-id ratio test reads the low 63 bits).
const LOW: &str = "4bf92f3577b34da60000000000000001";
const HIGH: &str = "4bf92f3577b34da6fffffffffffffffe";
const OTHER: &str = "4bf92f3577b34da67000000000000000";

/// Pings `conn` under a client-side parent continuing trace `trace` with `flags`.
async fn ping_in_trace(conn: &Connection, trace: &str, flags: &str) -> Result<()> {
    // Under a target the exporting layer takes (it takes only the quicproquo crates' spans).
    let parent = tracing::info_span!(target: "qpq", "test.call");
    propagation::set_parent(
        &parent,
        &WireContext {
            traceparent: format!("00-{trace}-00f067aa0ba902b7-{flags}"),
            tracestate: String::new(),
        },
    );
    conn.ping(b"sampled?").instrument(parent).await?;
    Ok(())
}

/// What the client part of the test leaves for the checks.
struct Run {
    names: Vec<&'static str>,
    identities: Vec<Vec<u8>>,
    group: Vec<u8>,
}

/// Registers alice (edge 1) and bob (edge 2), has carol try alice's name, lets bob subscribe
/// and alice send until the shard pushes live and bob's edge pushes from the feed, then sends
/// the secret and pings the gate.
async fn client_part(
    edges: [SocketAddr; 3],
    shard_ops: SocketAddr,
    bob_ops: SocketAddr,
    key: ClusterPublicKey,
    secret: &[u8],
) -> Result<Run> {
    let options = ConnectOptions::new(key);
    let users = tempfile::tempdir()?;
    let connect = |at| Connection::connect(at, &options);
    let mut alice = User::register_on(
        connect(edges[0]).await?,
        users.path(),
        "alicezq7",
        Suite::Classical,
    )
    .await?;
    let mut bob = User::register_on(
        connect(edges[1]).await?,
        users.path(),
        "bobzq7",
        Suite::Classical,
    )
    .await?;
    // A name already taken: an expected refusal.
    let carol = ClientState::create(Suite::Classical)?;
    let session = connect(edges[0]).await?.bind(carol.identity()).await?;
    let refused = session.auth.claim_name("alicezq7").await;
    ensure!(
        matches!(&refused, Err(e) if e.code() == Some(ErrorCode::NameTaken)),
        "{refused:?}"
    );
    let group = alice.chat().create_group("g").await?;
    alice
        .chat()
        .invite("g", &["bobzq7".into()], &mut |_| {})
        .await?;
    bob.chat().receive_all(&mut |_| {}).await?;
    let cursor = bob.state.groups.get(&group).map_or(0, |m| m.cursor);
    let mut sub = bob.session.delivery.subscribe(&group, cursor).await?;
    // Bob's edge follows the group on the shard once he subscribes; until that watch is up,
    // entries reach him from the log. Send until the shard has pushed one live.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut warm_up = async || -> Result<()> {
        ensure!(
            std::time::Instant::now() < deadline,
            "bob's subscription never followed the live feed"
        );
        alice.chat().send("g", b"warm-up", &mut |_| {}).await?;
        tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await?
            .context("subscription ended")?;
        Ok(())
    };
    while counter(&get(shard_ops, "/metrics")?, "qpq_fanout_entries_total") == 0 {
        warm_up().await?;
    }
    // Once the watch is up, the edge tells its subscribers to read what the log got meanwhile.
    // Send until one message reached bob with no catch-up under way or begun: his
    // subscription then follows the feed, and so will the secret.
    loop {
        let before = get(bob_ops, "/metrics")?;
        ensure!(
            before.contains("\nqpq_subscriptions_catching_up "),
            "the edge exports no catch-up gauge"
        );
        let reading = counter(&before, "qpq_subscriptions_catching_up");
        warm_up().await?;
        let after = get(bob_ops, "/metrics")?;
        let caught_up = |page: &str| counter(page, "qpq_subscription_catch_ups_total");
        if reading == 0 && caught_up(&before) == caught_up(&after) {
            break;
        }
    }
    alice.chat().send("g", secret, &mut |_| {}).await?;
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await?
        .context("subscription ended")?;
    // The gate honours sampled client traces for half the trace ids.
    let gate = connect(edges[2]).await?;
    ping_in_trace(&gate, LOW, "01").await?;
    ping_in_trace(&gate, HIGH, "01").await?;
    ping_in_trace(&gate, OTHER, "00").await?;
    Ok(Run {
        names: vec!["alicezq7", "bobzq7"],
        identities: vec![
            alice.state.identity().public().as_bytes().to_vec(),
            bob.state.identity().public().as_bytes().to_vec(),
        ],
        group,
    })
}

/// The newest span from `service` named `name`.
fn newest<'a>(all: &'a [Got], service: &str, name: &str) -> Result<&'a Got> {
    all.iter()
        .filter(|g| g.service == service && g.span.name == name)
        .max_by_key(|g| g.span.start_time_unix_nano)
        .with_context(|| format!("no {name} from {service}"))
}

/// The message's trace: client send → edge send → edge forward → shard append → appender
/// batch → Postgres insert, every span parented on the one before.
fn send_chain(all: &[Got]) -> Result<Vec<Got>> {
    let client = newest(all, "qpq", "quicproquo.DeliveryService/send")?;
    let edge = child(
        all,
        &client.span,
        "qpq-edge",
        "quicproquo.DeliveryService/send",
    )?;
    let forward = child(
        all,
        &edge.span,
        "qpq-edge",
        "quicproquo.ShardService/append",
    )?;
    let shard = child(
        all,
        &forward.span,
        "qpq-shard",
        "quicproquo.ShardService/append",
    )?;
    let batch = child(all, &shard.span, "qpq-shard", "appender batch")?;
    let store = child(all, &batch.span, "qpq-shard", "INSERT group_log")?;
    Ok([client, edge, forward, shard, batch, store]
        .into_iter()
        .cloned()
        .collect())
}

/// Checks the send's trace: kinds, conventions, the group hash, the forward's target.
fn check_send(chain: &[Got], shard: SocketAddr) -> Result<String> {
    let kinds: Vec<i32> = chain.iter().map(|g| g.span.kind).collect();
    ensure!(
        kinds == [CLIENT, SERVER, CLIENT, SERVER, INTERNAL, CLIENT],
        "{kinds:?}"
    );
    for g in &chain[..4] {
        let a = &g.span.attributes;
        ensure!(
            text(a, "rpc.system.name").as_deref() == Some("capnp"),
            "{}",
            g.span.name
        );
        ensure!(text(a, "rpc.method").as_deref() == Some(g.span.name.as_str()));
        ensure!(text(a, "rpc.response.status_code").as_deref() == Some("ok"));
        ensure!(text(a, "rpc.system").is_none() && text(a, "rpc.service").is_none());
    }
    let (client, edge) = (&chain[0].span.attributes, &chain[1].span.attributes);
    ensure!(int(client, "messaging.message.body.size").is_some_and(|n| n > 0));
    ensure!(int(edge, "messaging.message.body.size") == int(client, "messaging.message.body.size"));
    ensure!(text(client, "messaging.operation.type").as_deref() == Some("send"));
    ensure!(
        text(edge, "messaging.operation.type").is_none(),
        "a SERVER span has no messaging operation type"
    );
    let forward = &chain[2].span.attributes;
    ensure!(text(forward, "server.address").as_deref() == Some("127.0.0.1"));
    ensure!(int(forward, "server.port") == Some(i64::from(shard.port())));
    let hashed = text(edge, "qpq.group").context("the edge names the group by hash")?;
    ensure!(text(&chain[3].span.attributes, "qpq.group") == Some(hashed.clone()));
    let store = &chain[5].span.attributes;
    ensure!(text(store, "db.system.name").as_deref() == Some("postgresql"));
    ensure!(text(store, "db.operation.name").as_deref() == Some("INSERT"));
    ensure!(text(store, "db.collection.name").as_deref() == Some("group_log"));
    // Each span of one process ends before its parent does.
    for pair in chain.windows(2) {
        if pair[0].instance == pair[1].instance {
            ensure!(
                pair[1].span.end_time_unix_nano <= pair[0].span.end_time_unix_nano,
                "{} ends after its parent {}",
                pair[1].span.name,
                pair[0].span.name
            );
        }
    }
    Ok(hashed)
}

/// Checks the fan-out of the send: shard push → edge reception → edge push, and bob's
/// subscription catch-ups.
fn check_fan_out(all: &[Got], append: &Span, hashed: &str) -> Result<()> {
    let push = linked(all, append, "qpq-shard", "quicproquo.EntrySink/deliver");
    let push = push.first().context("no shard push links to the append")?;
    let received = child(all, &push.span, "qpq-edge", "quicproquo.EntrySink/deliver")?;
    let delivered = linked(all, append, "qpq-edge", "quicproquo.PushFrame/entry");
    let delivered = delivered
        .iter()
        .find(|d| links_to(&d.span, &received.span))
        .context("the edge's push links to the append and to the reception")?;
    ensure!(received.instance == delivered.instance);
    ensure!(
        links_to(&received.span, append),
        "the reception links to the append"
    );
    ensure!((push.span.kind, received.span.kind, delivered.span.kind) == (CLIENT, SERVER, CLIENT));
    for g in [push, delivered] {
        let a = &g.span.attributes;
        ensure!(text(a, "messaging.operation.type").as_deref() == Some("send"));
        ensure!(int(a, "messaging.batch.message_count").is_some_and(|n| n >= 1));
    }
    for g in [push, received, *delivered] {
        ensure!(
            text(&g.span.attributes, "qpq.group").as_deref() == Some(hashed),
            "{}",
            g.span.name
        );
    }
    // Bob's subscription: its catch-ups read the store inside a span linked to the call.
    let subscribe = newest(
        all,
        "qpq-edge",
        "quicproquo.DeliveryService/subscribeFrames",
    )?;
    let catch_up = all
        .iter()
        .find(|g| g.span.name == "subscription catch-up" && links_to(&g.span, &subscribe.span))
        .context("no catch-up links to the subscribe call")?;
    child(all, &catch_up.span, "qpq-edge", "SELECT group_log")?;
    ensure!(text(&catch_up.span.attributes, "qpq.group").as_deref() == Some(hashed));
    Ok(())
}

/// Checks what holds for every span: conventions, resources, no orphans, no stray reads.
fn check_all(all: &[Got], shard_id: &str, edge_ids: &[String]) -> Result<()> {
    let ids: HashSet<(&[u8], &[u8])> = all
        .iter()
        .map(|g| (g.span.trace_id.as_slice(), g.span.span_id.as_slice()))
        .collect();
    let ints = [
        "messaging.batch.message_count",
        "messaging.message.body.size",
        "server.port",
        "qpq.batch_size",
        "db.operation.batch.size",
    ];
    for g in all {
        let s = &g.span;
        for a in &s.attributes {
            ensure!(
                !["busy_ns", "idle_ns", "target", "thread.id", "thread.name"]
                    .contains(&a.key.as_str())
                    && !a.key.starts_with("code."),
                "{} carries {}",
                s.name,
                a.key
            );
            if ints.contains(&a.key.as_str()) {
                ensure!(
                    int(&s.attributes, &a.key).is_some(),
                    "{} of {} is not an int",
                    a.key,
                    s.name
                );
            }
        }
        if text(&s.attributes, "messaging.operation.type").as_deref() == Some("process") {
            bail!("{} is a process span, which would be CONSUMER", s.name);
        }
        // (`test.call` continues a trace this test made up: its parent exists nowhere.)
        ensure!(
            s.parent_span_id.is_empty()
                || s.name == "test.call"
                || ids.contains(&(&s.trace_id[..], &s.parent_span_id[..])),
            "{} from {} has a parent nobody exported",
            s.name,
            g.service
        );
        if text(&s.attributes, "db.system.name").is_some() {
            ensure!(
                !s.parent_span_id.is_empty(),
                "a stray store read: {}",
                s.name
            );
        }
        ensure!(g.schema_url.ends_with("/1.42.0"), "{}", g.schema_url);
        for key in [
            "service.name",
            "service.version",
            "service.instance.id",
            "host.name",
        ] {
            ensure!(
                text(&g.resource, key).is_some(),
                "{} lacks {key}",
                g.service
            );
        }
        ensure!(text(&g.resource, "service.version").as_deref() == Some(env!("CARGO_PKG_VERSION")));
    }
    let instances = |service: &str| -> HashSet<String> {
        all.iter()
            .filter(|g| g.service == service)
            .map(|g| g.instance.clone())
            .collect()
    };
    ensure!(instances("qpq-shard") == HashSet::from([shard_id.to_owned()]));
    let shard_pod = all
        .iter()
        .find(|g| g.service == "qpq-shard")
        .and_then(|g| text(&g.resource, "k8s.pod.name"));
    ensure!(shard_pod.as_deref() == Some("qpq-shard-0"), "{shard_pod:?}");
    let edges = instances("qpq-edge");
    ensure!(
        edge_ids.iter().all(|id| edges.contains(id)),
        "{edges:?} vs {edge_ids:?}"
    );
    Ok(())
}

/// Checks the refused claim: an error for the client, an answer for the edge and the store.
fn check_refusal(all: &[Got]) -> Result<()> {
    let client = all
        .iter()
        .filter(|g| {
            g.service == "qpq" && g.span.name == "quicproquo.AuthenticationService/claimName"
        })
        .find(|g| {
            g.span
                .status
                .as_ref()
                .is_some_and(|s| s.code == STATUS_ERROR)
        })
        .context("the refused claim is an error on the client")?;
    ensure!(text(&client.span.attributes, "error.type").as_deref() == Some("name_taken"));
    let edge = child(
        all,
        &client.span,
        "qpq-edge",
        "quicproquo.AuthenticationService/claimName",
    )?;
    let a = &edge.span.attributes;
    ensure!(text(a, "rpc.response.status_code").as_deref() == Some("name_taken"));
    ensure!(
        text(a, "error.type").is_none()
            && edge
                .span
                .status
                .as_ref()
                .is_none_or(|s| s.code != STATUS_ERROR)
    );
    let store = child(all, &edge.span, "qpq-edge", "INSERT user_names")?;
    ensure!(text(&store.span.attributes, "qpq.outcome").as_deref() == Some("name_taken"));
    ensure!(
        store
            .span
            .status
            .as_ref()
            .is_none_or(|s| s.code != STATUS_ERROR)
    );
    Ok(())
}

/// Checks the gate: a sampled client trace is continued below the ratio and dropped above it;
/// an unsampled one starts the gate's own trace.
fn check_gate(all: &[Got], gate_id: &str) -> Result<()> {
    let pings: Vec<&Got> = all
        .iter()
        .filter(|g| g.instance == gate_id && g.span.name == "quicproquo.Bootstrap/ping")
        .collect();
    ensure!(pings.len() == 2, "{} pings traced by the gate", pings.len());
    let low = hex::decode(LOW)?;
    let joined = pings
        .iter()
        .find(|g| g.span.trace_id == low)
        .context("the sampled trace below the ratio is continued")?;
    ensure!(!joined.span.parent_span_id.is_empty());
    let own = pings
        .iter()
        .find(|g| g.span.trace_id != low)
        .context("the unsampled trace gets one of the gate's own")?;
    ensure!(own.span.parent_span_id.is_empty());
    for t in [HIGH, OTHER] {
        ensure!(own.span.trace_id != hex::decode(t)?);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_name_every_instance_chain_the_fan_out_and_name_nobody() -> Result<()> {
    let db = fresh_database().await?;
    migrate(db.url()).await?;
    let receiver = Receiver::start()?;
    let dir = tempfile::tempdir()?;
    let key_out = Command::new(BIN)
        .args(["cluster-key", "--data-dir"])
        .arg(dir.path().join("key"))
        .output()?;
    ensure!(key_out.status.success());
    let key = ClusterPublicKey::from_hex(String::from_utf8(key_out.stdout)?.trim())?;
    let key_file = dir.path().join("key").join("cluster.key");
    // One telemetry key for every node, so they hash a group alike.
    quicproquo_server::keystore::telemetry_key(&dir.path().join("key"), None)?;
    let cluster = Cluster {
        dir: dir.path(),
        key_file: &key_file,
        db: db.url(),
        otlp: receiver.endpoint(),
    };
    // The shard's lease is in place before it says it listens, and an edge reads the ring
    // before it does: the edges route from the start.
    let pod = [("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=qpq-shard-0")];
    let mut shard = cluster.start("shard", "shard", &["--node-id", "shard-a"], &pod)?;
    let mut edge1 = cluster.start("edge", "edge1", &[], &[])?;
    let mut edge2 = cluster.start("edge", "edge2", &[], &[])?;
    let gate_args = ["--node-id", "edge-gate", "--client-trace-ratio", "0.5"];
    let mut gate = cluster.start("edge", "gate", &gate_args, &[])?;
    ensure!(get(edge1.ops, "/readyz")?.contains(" 200 "));

    let telemetry = quicproquo_telemetry::init(&quicproquo_telemetry::Options {
        service_name: "qpq".into(),
        log_format: quicproquo_telemetry::LogFormat::Text,
        default_log_level: "warn".into(),
        otlp_endpoint: Some(receiver.endpoint()),
        export_traces: true,
    })?;
    ensure!(telemetry.exporting());
    let secret = b"zq7 the secret plaintext";
    let edges = [edge1.addr, edge2.addr, gate.addr];
    let run = local(client_part(edges, shard.ops, edge2.ops, key, secret)).await?;
    let metrics = [get(edge1.ops, "/metrics")?, get(shard.ops, "/metrics")?];
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    // Stopped nodes have flushed every span: what the receiver holds is all there is.
    let edge_ids = [edge1.derived_id()?, edge2.derived_id()?];
    ensure!(edge_ids[0] != edge_ids[1]);
    for node in [&mut edge1, &mut edge2, &mut gate, &mut shard] {
        node.stop()?;
    }

    let all = receiver.spans()?;
    let chain = send_chain(&all)?;
    let hashed = check_send(&chain, shard.addr)?;
    check_fan_out(&all, &chain[3].span, &hashed)?;
    check_refusal(&all)?;
    check_gate(&all, "edge-gate")?;
    check_all(&all, "shard-a", &edge_ids)?;
    check_private(
        &receiver,
        [&edge1, &edge2, &gate, &shard],
        &metrics,
        &run,
        secret,
    )
}

/// Nothing that left the nodes (spans, logs, metrics) names a user, an identity, the group or
/// the plaintext.
fn check_private(
    receiver: &Receiver,
    nodes: [&Node; 4],
    metrics: &[String],
    run: &Run,
    secret: &[u8],
) -> Result<()> {
    let mut exported = receiver.bodies();
    for node in nodes {
        let log = std::fs::read(&node.log)?;
        ensure!(!log.is_empty(), "the node logged nothing");
        for line in String::from_utf8_lossy(&log).lines() {
            serde_json::from_str::<serde_json::Value>(line)
                .with_context(|| format!("log line is not JSON: {line}"))?;
        }
        exported.push(log);
    }
    exported.extend(metrics.iter().map(|m| m.as_bytes().to_vec()));
    let mut secrets: HashMap<String, Vec<u8>> = HashMap::new();
    for n in &run.names {
        secrets.insert(format!("user name {n}"), n.as_bytes().to_vec());
    }
    for (i, id) in run.identities.iter().enumerate() {
        secrets.insert(format!("identity {i}"), id.clone());
        secrets.insert(format!("identity {i} (hex)"), hex::encode(id).into_bytes());
        secrets.insert(
            format!("identity {i} (prefix hex)"),
            hex::encode(&id[..6]).into_bytes(),
        );
    }
    let group = &run.group;
    secrets.insert("group id".into(), group.clone());
    secrets.insert("group id (hex)".into(), hex::encode(group).into_bytes());
    secrets.insert(
        "group id (prefix hex)".into(),
        hex::encode(&group[..4]).into_bytes(),
    );
    secrets.insert("plaintext".into(), secret.to_vec());
    for blob in &exported {
        for (what, value) in &secrets {
            ensure!(
                !blob.windows(value.len()).any(|w| w == value.as_slice()),
                "{what} appears in exported telemetry or logs"
            );
        }
    }
    Ok(())
}
