//! One message send yields one trace across the client, the edge, the owning shard and
//! Postgres, exported over OTLP/HTTP to a receiver in this test; the pushes that fan the
//! message out (shard to edge, edge to the subscriber) link back to that trace; and nothing
//! exported or logged during the run names an identity, a user, a group or a message.
//!
//! The edge and the shard run as real `qpq-server` processes configured only through the
//! standard `OTEL_*` variables; the client runs in this process.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use quicproquo_client::{ConnectOptions, Connection};
use quicproquo_core::ClusterPublicKey;
use quicproquo_core::mls::Suite;
use quicproquo_server::store::postgres::migrate;
use quicproquo_testkit::postgres::fresh_database;
use support::{User, local};

const BIN: &str = env!("CARGO_BIN_EXE_qpq-server");

/// Every OTLP/HTTP request body received.
type Bodies = Arc<Mutex<Vec<Vec<u8>>>>;

/// A minimal OTLP/HTTP receiver: answers 200 to every POST and keeps its body.
fn otlp_receiver() -> Result<(SocketAddr, Bodies)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let bodies: Bodies = Arc::default();
    let kept = Arc::clone(&bodies);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = receive(stream, &kept);
        }
    });
    Ok((addr, bodies))
}

fn receive(mut stream: std::net::TcpStream, bodies: &Bodies) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    bodies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(body);
    stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    Ok(())
}

/// A received span with the service that sent it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    span: Span,
}

fn text(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
}

fn spans(bodies: &Bodies) -> Result<Vec<Got>> {
    let mut out = Vec::new();
    for body in bodies.lock().unwrap_or_else(PoisonError::into_inner).iter() {
        let req = ExportTraceServiceRequest::decode(body.as_slice())?;
        for rs in req.resource_spans {
            let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = text(&attrs, "service.name").unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    out.push(Got {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// A `qpq-server` process and where its log goes.
struct Node {
    child: Child,
    addr: SocketAddr,
    ops: SocketAddr,
    log: PathBuf,
}

impl Node {
    fn start(role: &str, dir: &Path, key_file: &Path, db: &str, otlp: SocketAddr) -> Result<Self> {
        let log = dir.join(format!("{role}.log"));
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
            .arg(dir.join(role))
            .arg("--cluster-key-file")
            .arg(key_file)
            .args(["--database-url", db])
            .env_remove("QPQ_CONFIG")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
            .env("OTEL_TRACES_SAMPLER", "parentbased_always_on")
            .env("OTEL_BSP_SCHEDULE_DELAY", "50")
            .env("QPQ_LOG", "debug")
            .env("QPQ_LOG_FORMAT", "json")
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
            bail!("{role} did not start: {first:?} {second:?}");
        };
        Ok(Self {
            addr: addr.parse()?,
            ops: ops.parse()?,
            child,
            log,
        })
    }

    fn stop(&mut self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        ensure!(status.success());
        ensure!(self.child.wait()?.success());
        Ok(())
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

/// The one span named `name` from `service` whose parent is `parent`.
fn child<'a>(all: &'a [Got], parent: &Span, service: &str, name: &str) -> Result<&'a Span> {
    all.iter()
        .find(|g| {
            g.service == service
                && g.span.name == name
                && g.span.trace_id == parent.trace_id
                && g.span.parent_span_id == parent.span_id
        })
        .map(|g| &g.span)
        .with_context(|| {
            let in_trace: Vec<_> = all
                .iter()
                .filter(|g| g.span.trace_id == parent.trace_id)
                .map(|g| {
                    (
                        g.service.as_str(),
                        g.span.name.as_str(),
                        hex::encode(&g.span.span_id),
                        hex::encode(&g.span.parent_span_id),
                    )
                })
                .collect();
            format!(
                "no {name} from {service} under {}: {in_trace:?}",
                parent.name
            )
        })
}

/// A span named `name` from `service` that links to `target` (same trace and span id); it
/// must not be in `target`'s trace itself (a push is not a child of the send).
fn linked<'a>(all: &'a [Got], target: &Span, service: &str, name: &str) -> Option<&'a Span> {
    all.iter()
        .find(|g| {
            g.service == service
                && g.span.name == name
                && g.span.trace_id != target.trace_id
                && g.span
                    .links
                    .iter()
                    .any(|l| l.trace_id == target.trace_id && l.span_id == target.span_id)
        })
        .map(|g| &g.span)
}

/// The value of the unlabelled counter `name` in a Prometheus text page (0 when absent).
fn counter(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_is_one_trace_across_client_edge_shard_and_store_and_names_nobody() -> Result<()> {
    let db = fresh_database().await?;
    migrate(db.url()).await?;
    let (otlp, bodies) = otlp_receiver()?;
    let dir = tempfile::tempdir()?;
    let key_out = Command::new(BIN)
        .args(["cluster-key", "--data-dir"])
        .arg(dir.path().join("key"))
        .output()?;
    ensure!(key_out.status.success());
    let key = ClusterPublicKey::from_hex(String::from_utf8(key_out.stdout)?.trim())?;
    let key_file = dir.path().join("key").join("cluster.key");

    let mut shard = Node::start("shard", dir.path(), &key_file, db.url(), otlp)?;
    let mut edge = Node::start("edge", dir.path(), &key_file, db.url(), otlp)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !get(edge.ops, "/metrics")?.contains("\nqpq_ring_shards 1\n") {
        ensure!(
            std::time::Instant::now() < deadline,
            "the edge never saw the shard"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(get(edge.ops, "/readyz")?.contains(" 200 "));

    let telemetry = quicproquo_telemetry::init(&quicproquo_telemetry::Options {
        service_name: "qpq".into(),
        log_format: quicproquo_telemetry::LogFormat::Text,
        default_log_level: "warn".into(),
        otlp_endpoint: Some(format!("http://{otlp}")),
        export_traces: true,
    })?;
    ensure!(telemetry.exporting());

    let secret = b"zq7 the secret plaintext";
    let (names, identities, group) = local(async {
        let users = tempfile::tempdir()?;
        let mut alice = User::register_on(
            Connection::connect(edge.addr, &ConnectOptions::new(key)).await?,
            users.path(),
            "alicezq7",
            Suite::Classical,
        )
        .await?;
        let mut bob = User::register_on(
            Connection::connect(edge.addr, &ConnectOptions::new(key)).await?,
            users.path(),
            "bobzq7",
            Suite::Classical,
        )
        .await?;
        let group = alice.chat().create_group("g").await?;
        alice
            .chat()
            .invite("g", &["bobzq7".into()], &mut |_| {})
            .await?;
        bob.chat().receive_all(&mut |_| {}).await?;
        let cursor = bob.state.groups.get(&group).map_or(0, |m| m.cursor);
        let mut sub = bob.session.delivery.subscribe(&group, cursor).await?;
        // The edge follows the group on the shard once bob subscribes; until that watch is
        // up, entries reach bob from the log (no live push to link). Send until the shard
        // has pushed an entry to the edge: from then on a send is fanned out live.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while counter(&get(shard.ops, "/metrics")?, "qpq_fanout_entries_total") == 0 {
            ensure!(
                std::time::Instant::now() < deadline,
                "the edge never followed the group on the shard"
            );
            alice.chat().send("g", b"warm-up", &mut |_| {}).await?;
            tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await?
                .context("subscription ended")?;
        }
        alice.chat().send("g", secret, &mut |_| {}).await?;
        tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await?
            .context("subscription ended")?;
        let identities = vec![
            alice.state.identity().public().as_bytes().to_vec(),
            bob.state.identity().public().as_bytes().to_vec(),
        ];
        anyhow::Ok((vec!["alicezq7", "bobzq7"], identities, group))
    })
    .await?;
    let metrics = [get(edge.ops, "/metrics")?, get(shard.ops, "/metrics")?];
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;

    // The message's trace: client send → edge send → edge forward → shard append →
    // appender batch → Postgres append, every span parented on the one before.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (all, chain) = loop {
        let all = spans(&bodies)?;
        let sends: Vec<&Span> = all
            .iter()
            .filter(|g| g.service == "qpq" && g.span.name == "quicproquo.DeliveryService/send")
            .map(|g| &g.span)
            .collect();
        let found = sends
            .iter()
            .max_by_key(|s| s.start_time_unix_nano)
            .and_then(|client| {
                let edge =
                    child(&all, client, "qpq-edge", "quicproquo.DeliveryService/send").ok()?;
                let forward =
                    child(&all, edge, "qpq-edge", "quicproquo.ShardService/append").ok()?;
                let shard =
                    child(&all, forward, "qpq-shard", "quicproquo.ShardService/append").ok()?;
                let batch = child(&all, shard, "qpq-shard", "appender batch").ok()?;
                let store = child(&all, batch, "qpq-shard", "postgresql append").ok()?;
                // Every client call has its client span, parent of the edge's server span.
                for name in [
                    "quicproquo.Bootstrap/bind",
                    "quicproquo.AuthenticationService/claimName",
                    "quicproquo.DeliveryService/subscribe",
                ] {
                    all.iter()
                        .filter(|g| g.service == "qpq" && g.span.name == name && g.span.kind == 3)
                        .find(|g| child(&all, &g.span, "qpq-edge", name).is_ok())?;
                }
                // The fan-out: pushes in traces of their own, linked to the shard's append.
                linked(&all, shard, "qpq-shard", "quicproquo.EntrySink/deliver")?;
                linked(&all, shard, "qpq-edge", "quicproquo.MessageStream/deliver")?;
                Some(vec![
                    (*client).clone(),
                    edge.clone(),
                    forward.clone(),
                    shard.clone(),
                    batch.clone(),
                    store.clone(),
                ])
            });
        if let Some(chain) = found {
            break (all, chain);
        }
        if std::time::Instant::now() > deadline {
            let last = sends
                .iter()
                .max_by_key(|s| s.start_time_unix_nano)
                .context("no client send span")?;
            let edge = child(&all, last, "qpq-edge", "quicproquo.DeliveryService/send")?;
            let forward = child(&all, edge, "qpq-edge", "quicproquo.ShardService/append")?;
            let shard = child(&all, forward, "qpq-shard", "quicproquo.ShardService/append")?;
            let batch = child(&all, shard, "qpq-shard", "appender batch")?;
            child(&all, batch, "qpq-shard", "postgresql append")?;
            bail!(
                "no fan-out span links to the send's trace: {:?}",
                all.iter()
                    .filter(|g| g.span.name.ends_with("/deliver"))
                    .map(|g| (g.service.as_str(), g.span.name.as_str(), g.span.links.len()))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(chain.iter().all(|s| s.trace_id == chain[0].trace_id));
    let kinds: Vec<i32> = chain.iter().map(|s| s.kind).collect();
    // Client, server, client, server, internal, client (SpanKind numbering of OTLP).
    ensure!(kinds == [3, 2, 3, 2, 1, 3], "{kinds:?}");
    let attrs = &chain[1].attributes;
    ensure!(text(attrs, "rpc.system").as_deref() == Some("capnp"));
    ensure!(text(attrs, "rpc.method").as_deref() == Some("send"));
    ensure!(text(attrs, "messaging.operation.type").as_deref() == Some("send"));
    let hashed = text(attrs, "qpq.group").context("the edge names the group by hash")?;
    ensure!(
        text(&chain[3].attributes, "qpq.group") == Some(hashed.clone()),
        "same hash on the shard"
    );
    ensure!(text(&chain[5].attributes, "db.system.name").as_deref() == Some("postgresql"));
    let push = linked(
        &all,
        &chain[3],
        "qpq-edge",
        "quicproquo.MessageStream/deliver",
    )
    .context("the edge's push to the subscriber links to the send")?;
    ensure!(push.kind == 3, "a push is a client call: {}", push.kind);
    ensure!(text(&push.attributes, "messaging.operation.type").as_deref() == Some("process"));

    // Stop the nodes (they flush their spans), then scan everything that left them.
    edge.stop()?;
    shard.stop()?;
    let mut exported: Vec<Vec<u8>> = bodies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for node in [&edge, &shard] {
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
    for n in &names {
        secrets.insert(format!("user name {n}"), n.as_bytes().to_vec());
    }
    for (i, id) in identities.iter().enumerate() {
        secrets.insert(format!("identity {i}"), id.clone());
        secrets.insert(format!("identity {i} (hex)"), hex::encode(id).into_bytes());
        secrets.insert(
            format!("identity {i} (prefix hex)"),
            hex::encode(&id[..6]).into_bytes(),
        );
    }
    secrets.insert("group id".into(), group.clone());
    secrets.insert("group id (hex)".into(), hex::encode(&group).into_bytes());
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
    ensure!(all.len() > 6);
    Ok(())
}
