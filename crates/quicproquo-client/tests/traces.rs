//! The `qpq` binary's traces, received by a real OTLP/HTTP receiver in this test from `qpq`
//! processes and from a server running in this process:
//!
//! - each run is one trace under a root span named after the command (`qpq ping`), INTERNAL,
//!   with its integer `process.exit.code`;
//! - a failing command (wrong server key, connection refused, missing state, unknown group)
//!   makes its root span an error with a telling `error.type`;
//! - `qpq recv --follow` stopped with SIGTERM exits cleanly and exports its root span: no span
//!   of any run (the server's included) has a parent that was never exported.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use quicproquo_core::{ClusterSigningKey, NodeRole};
use quicproquo_server::{NodeIdentity, ServerConfig};
use quicproquo_testkit::otlp::Receiver;

const BIN: &str = env!("CARGO_BIN_EXE_qpq");

/// One field of a protobuf message: its number and value.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// A fixed-size field (timestamps, doubles), skipped.
    Fixed,
}

/// The fields of a protobuf message, in order.
fn fields(mut buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>> {
    fn varint(buf: &mut &[u8]) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first().context("truncated varint")?;
            *buf = rest;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("varint too long")
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut buf)?),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                ensure!(buf.len() >= n, "truncated fixed field");
                buf = &buf[n..];
                Field::Fixed
            }
            2 => {
                let n = usize::try_from(varint(&mut buf)?)?;
                ensure!(buf.len() >= n, "truncated bytes field");
                let (head, rest) = buf.split_at(n);
                buf = rest;
                Field::Bytes(head)
            }
            t => bail!("unexpected wire type {t}"),
        };
        out.push((key >> 3, field));
    }
    Ok(out)
}

/// An attribute value as OTLP carries it.
#[derive(Debug, Clone, PartialEq)]
enum Attr {
    Text(String),
    Int(i64),
    Other,
}

/// What these tests read of a span, with the resource that sent it.
#[derive(Debug, Clone, Default)]
struct Got {
    resource: Vec<(String, Attr)>,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    name: String,
    kind: u64,
    attributes: Vec<(String, Attr)>,
    status: u64,
}

impl Got {
    fn attr(&self, key: &str) -> Option<&Attr> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    fn resource(&self, key: &str) -> Option<&Attr> {
        self.resource.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

fn key_value(buf: &[u8]) -> Result<(String, Attr)> {
    let (mut key, mut value) = (String::new(), Attr::Other);
    for (n, f) in fields(buf)? {
        match (n, f) {
            (1, Field::Bytes(b)) => key = String::from_utf8(b.to_vec())?,
            (2, Field::Bytes(any)) => {
                for (n, f) in fields(any)? {
                    value = match (n, f) {
                        (1, Field::Bytes(s)) => Attr::Text(String::from_utf8(s.to_vec())?),
                        (3, Field::Varint(i)) => Attr::Int(i64::from_ne_bytes(i.to_ne_bytes())),
                        _ => Attr::Other,
                    };
                }
            }
            _ => {}
        }
    }
    Ok((key, value))
}

fn span(buf: &[u8], resource: &[(String, Attr)]) -> Result<Got> {
    let mut got = Got {
        resource: resource.to_vec(),
        ..Got::default()
    };
    for (n, f) in fields(buf)? {
        match (n, f) {
            (1, Field::Bytes(b)) => got.trace_id = b.to_vec(),
            (2, Field::Bytes(b)) => got.span_id = b.to_vec(),
            (4, Field::Bytes(b)) => got.parent_span_id = b.to_vec(),
            (5, Field::Bytes(b)) => got.name = String::from_utf8(b.to_vec())?,
            (6, Field::Varint(k)) => got.kind = k,
            (9, Field::Bytes(b)) => got.attributes.push(key_value(b)?),
            (15, Field::Bytes(b)) => {
                for (n, f) in fields(b)? {
                    if let (3, Field::Varint(code)) = (n, f) {
                        got.status = code;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(got)
}

/// The spans of one `ExportTraceServiceRequest`.
fn decode(body: &[u8]) -> Result<Vec<Got>> {
    let mut out = Vec::new();
    for (_, rs) in fields(body)?.into_iter().filter(|(n, _)| *n == 1) {
        let Field::Bytes(rs) = rs else { continue };
        let parts = fields(rs)?;
        let mut resource = Vec::new();
        for (n, f) in &parts {
            if let (1, Field::Bytes(r)) = (n, f) {
                for (n, f) in fields(r)? {
                    if let (1, Field::Bytes(kv)) = (n, f) {
                        resource.push(key_value(kv)?);
                    }
                }
            }
        }
        for (n, f) in &parts {
            if let (2, Field::Bytes(scope)) = (n, f) {
                for (n, f) in fields(scope)? {
                    if let (2, Field::Bytes(s)) = (n, f) {
                        out.push(span(s, &resource)?);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// `qpq` exporting its trace to `otlp`.
fn qpq(otlp: SocketAddr, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("QPQ_SERVER")
        .env_remove("QPQ_SERVER_KEY")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_RESOURCE_ATTRIBUTES")
        .env_remove("OTEL_TRACES_SAMPLER_ARG")
        .env("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .args(args);
    c
}

/// The root span of the `qpq` process `pid`.
fn root_of(all: &[Got], pid: u32) -> Result<&Got> {
    all.iter()
        .find(|g| {
            g.resource("process.pid") == Some(&Attr::Int(i64::from(pid)))
                && g.parent_span_id.is_empty()
                && g.name.starts_with("qpq ")
        })
        .with_context(|| format!("no root span from qpq process {pid}"))
}

/// Checks a finished run's root span: named, internal, with its exit code and error type.
fn check_root(root: &Got, name: &str, code: i64, error_type: Option<&str>) -> Result<()> {
    ensure!(root.name == name, "{} instead of {name}", root.name);
    ensure!(root.kind == 1, "{name} is INTERNAL");
    ensure!(
        root.attr("process.exit.code") == Some(&Attr::Int(code)),
        "{root:?}"
    );
    ensure!(root.resource("service.name") == Some(&Attr::Text("qpq".into())));
    ensure!(matches!(
        root.resource("service.instance.id"),
        Some(Attr::Text(_))
    ));
    match error_type {
        Some(t) => {
            ensure!(root.status == 2, "{name} is an error");
            ensure!(
                root.attr("error.type") == Some(&Attr::Text(t.into())),
                "{root:?}"
            );
        }
        None => ensure!(
            root.status != 2 && root.attr("error.type").is_none(),
            "{root:?}"
        ),
    }
    Ok(())
}

fn ok(out: Output) -> Result<Output> {
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

#[test]
fn failed_commands_are_error_roots_and_a_stopped_follower_leaves_no_orphan() -> Result<()> {
    let receiver = Receiver::start()?;
    let otlp = receiver.addr();
    // The server in this process exports too: its spans must find their `qpq` parents.
    let telemetry = quicproquo_telemetry::init(&quicproquo_telemetry::Options {
        service_name: "qpq-standalone".into(),
        log_format: quicproquo_telemetry::LogFormat::Text,
        default_log_level: "warn".into(),
        otlp_endpoint: Some(format!("http://{otlp}")),
        export_traces: true,
    })?;
    let dir = tempfile::tempdir()?;
    let config = ServerConfig::for_role(NodeRole::Standalone, dir.path().join("data"));
    let identity = NodeIdentity::load_or_create(&config.data_dir, NodeRole::Standalone)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let store = quicproquo_server::open_store(&config)?;
    let server = quicproquo_server::start(config, listener, identity, store)?;
    let addr = server.local_addr().to_string();
    let server_port = server.local_addr().port();
    let key = server.cluster_key().to_hex();
    let other = ClusterSigningKey::generate()?.public_key().to_hex();
    let dead_addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (dead, dead_port) = (dead_addr.to_string(), i64::from(dead_addr.port()));
    let state = |user: &str| dir.path().join(format!("{user}.bin")).display().to_string();
    let (alice, bob) = (state("alice"), state("bob"));
    let alice_at: Vec<&str> = vec!["--server", &addr, "--server-key", &key, "--state", &alice];
    let bob_at: Vec<&str> = vec!["--server", &addr, "--server-key", &key, "--state", &bob];
    let at = |user: &str| {
        if user == alice {
            alice_at.clone()
        } else {
            bob_at.clone()
        }
    };

    // Failures: (command line, root span, error.type).
    let failing: [(Vec<&str>, &str, &str); 4] = [
        (
            vec!["--server", &addr, "--server-key", &other, "ping"],
            "qpq ping",
            "wrong_cluster_key",
        ),
        (
            vec!["--server", &dead, "--server-key", &key, "ping"],
            "qpq ping",
            "connection_refused",
        ),
        (
            [at(&alice), vec!["whoami"]].concat(),
            "qpq whoami",
            "state_missing",
        ),
        (
            [at(&alice), vec!["send", "nogroup", "hi"]].concat(),
            "qpq send",
            "state_missing",
        ),
    ];
    let mut runs = Vec::new();
    for (args, name, error_type) in &failing {
        let child = qpq(otlp, args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let out = child.wait_with_output()?;
        ensure!(out.status.code() == Some(1), "{args:?}: {out:?}");
        runs.push((pid, *name, 1, Some(*error_type)));
    }
    for (user, name) in [(&alice, "alice"), (&bob, "bob")] {
        let child = qpq(
            otlp,
            &[
                at(user),
                vec!["register", "--name", name, "--suite", "classical"],
            ]
            .concat(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
        let pid = child.id();
        ok(child.wait_with_output()?)?;
        runs.push((pid, "qpq register", 0, None));
    }
    let unknown = qpq(otlp, &[at(&alice), vec!["send", "nogroup", "hi"]].concat())
        .stderr(Stdio::piped())
        .spawn()?;
    let unknown_pid = unknown.id();
    ensure!(unknown.wait_with_output()?.status.code() == Some(1));
    runs.push((unknown_pid, "qpq send", 1, Some("unknown_group")));
    ok(qpq(otlp, &[at(&alice), vec!["create-group", "g"]].concat()).output()?)?;
    ok(qpq(otlp, &[at(&alice), vec!["invite", "g", "bob"]].concat()).output()?)?;

    // Bob follows until SIGTERM, once he has joined and received alice's message live.
    let mut follower = qpq(otlp, &[at(&bob), vec!["recv", "--follow"]].concat())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let follower_pid = follower.id();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = follower.stdout.take().context("stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &str| -> Result<()> {
        loop {
            let line = lines.recv_timeout(Duration::from_secs(30))?;
            if line.contains(what) {
                return Ok(());
            }
        }
    };
    wait_for("joined group")?;
    ok(qpq(
        otlp,
        &[at(&alice), vec!["send", "g", "hello live"]].concat(),
    )
    .output()?)?;
    wait_for("hello live")?;
    ensure!(
        Command::new("kill")
            .args(["-TERM", &follower_pid.to_string()])
            .status()?
            .success()
    );
    let out = follower.wait_with_output()?;
    ensure!(
        out.status.success(),
        "a stopped follower exits cleanly: {out:?}"
    );
    runs.push((follower_pid, "qpq recv", 0, None));

    server.shutdown();
    server.join()?;
    telemetry.shutdown();

    let mut all = Vec::new();
    for body in receiver.bodies() {
        all.extend(decode(&body)?);
    }
    for (pid, name, code, error_type) in runs {
        let root = root_of(&all, pid)?;
        check_root(root, name, code, error_type).with_context(|| format!("{name} ({pid})"))?;
    }
    let follow_root = root_of(&all, follower_pid)?;
    let in_trace = all.iter().filter(|g| g.trace_id == follow_root.trace_id);
    let served = in_trace
        .filter(|g| g.resource("service.name") == Some(&Attr::Text("qpq-standalone".into())))
        .count();
    ensure!(served > 0, "the server's spans joined the follower's trace");
    // Every call qpq made names the node it went to (the pid-independent check: all CLIENT
    // spans of qpq processes whose server answered).
    let port = i64::from(server_port);
    let calls: Vec<&Got> = all
        .iter()
        .filter(|g| g.kind == 3)
        .filter(|g| g.resource("service.name") != Some(&Attr::Text("qpq-standalone".into())))
        .filter(|g| g.attr("server.port") != Some(&Attr::Int(dead_port)))
        .collect();
    ensure!(!calls.is_empty(), "qpq exported its calls");
    for call in &calls {
        ensure!(
            call.attr("server.address") == Some(&Attr::Text("127.0.0.1".into()))
                && call.attr("server.port") == Some(&Attr::Int(port)),
            "{} names its server: {:?}",
            call.name,
            call.attributes
        );
    }
    let ids: HashSet<(&[u8], &[u8])> = all
        .iter()
        .map(|g| (g.trace_id.as_slice(), g.span_id.as_slice()))
        .collect();
    for g in &all {
        ensure!(
            g.parent_span_id.is_empty()
                || ids.contains(&(g.trace_id.as_slice(), g.parent_span_id.as_slice())),
            "{} has a parent nobody exported",
            g.name
        );
    }
    Ok(())
}
