//! `qpq-server dev-cluster`: a local cluster in one command.
//!
//! Migrates the database, creates (or reuses) a cluster key in the base directory, issues every
//! node a certificate into its own data directory (as an operator would: the nodes never see
//! the signing key), starts the shards and then the edges as child processes of this same
//! binary on loopback (each with its own data directory and port 0, all with one telemetry
//! key), prints the cluster key and one line per node, and on
//! ctrl-c or SIGTERM stops the edges (which drain) and then the shards. A node that dies is
//! reported and the others keep running; restart it with the command its line shows.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use quicproquo_core::{ClusterSigningKey, NodeRole};
use quicproquo_server::keystore;
use quicproquo_server::store::postgres;
use rustix::process::{Pid, Signal, kill_process};

/// How the local cluster is laid out.
pub(crate) struct Plan {
    pub(crate) database_url: String,
    pub(crate) edges: usize,
    pub(crate) shards: usize,
    pub(crate) base_dir: PathBuf,
    pub(crate) host: String,
    pub(crate) lease_ttl: String,
}

struct Node {
    role: &'static str,
    child: Child,
    address: String,
    exited: bool,
}

/// Per-address caps of a local cluster's nodes when the environment sets none: a node's whole
/// default capacity (`max_connections`, `max_handshakes`), since every client is on loopback.
const LOOPBACK_CONNECTIONS: &str = "10000";
const LOOPBACK_HANDSHAKES: &str = "1024";
/// Binds and KeyPackage fetches per minute from loopback in a local cluster.
const LOOPBACK_RATE: &str = "1000000";

/// How long the certificates of a local cluster are valid (reissued at every start).
const DEV_CERTIFICATE_VALIDITY: Duration = Duration::from_secs(30 * 86_400);

fn spawn(
    plan: &Plan,
    role: &'static str,
    index: usize,
    cluster: &ClusterSigningKey,
) -> Result<Node> {
    let exe = std::env::current_exe().context("locating the qpq-server binary")?;
    let data_dir = plan.base_dir.join(format!("{role}-{index}"));
    let node_role = if role == "edge" {
        NodeRole::Edge
    } else {
        NodeRole::Shard
    };
    keystore::certify_node_dir(
        cluster,
        &data_dir,
        node_role,
        None,
        DEV_CERTIFICATE_VALIDITY,
    )?;
    let mut cmd = Command::new(exe);
    cmd.arg(role)
        .arg("--listen")
        .arg(format!("{}:0", plan.host))
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--node-certificate-file")
        .arg(data_dir.join(keystore::NODE_CERTIFICATE_FILE))
        .arg("--telemetry-key-file")
        .arg(plan.base_dir.join(keystore::TELEMETRY_KEY_FILE))
        .arg("--database-url")
        .arg(&plan.database_url)
        .arg("--lease-ttl")
        .arg(&plan.lease_ttl)
        .arg("--ops-listen")
        .arg(format!("{}:0", plan.host))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // Every client of a local cluster comes from loopback: unless told otherwise, one address
    // may hold as much as the node does (the per-address caps guard public nodes).
    for (var, flag, value) in [
        (
            "QPQ_MAX_CONNECTIONS_PER_ADDRESS",
            "--max-connections-per-address",
            LOOPBACK_CONNECTIONS,
        ),
        (
            "QPQ_MAX_HANDSHAKES_PER_ADDRESS",
            "--max-handshakes-per-address",
            LOOPBACK_HANDSHAKES,
        ),
        (
            "QPQ_BIND_LIMIT_PER_ADDRESS",
            "--bind-limit-per-address",
            LOOPBACK_RATE,
        ),
        (
            "QPQ_KEY_PACKAGE_FETCH_LIMIT_PER_ADDRESS",
            "--key-package-fetch-limit-per-address",
            LOOPBACK_RATE,
        ),
    ] {
        if std::env::var_os(var).is_none() {
            cmd.arg(flag).arg(value);
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {role} {index}"))?;
    let stdout = child.stdout.take().context("reading the node's output")?;
    let mut line = String::new();
    let mut reader = BufReader::new(stdout);
    reader
        .read_line(&mut line)
        .with_context(|| format!("reading {role} {index}'s address"))?;
    // "qpq-server <role> listening on <addr> cluster-key <hex>"
    let address = line
        .split_whitespace()
        .nth(4)
        .map(str::to_owned)
        .with_context(|| {
            let _ = child.kill();
            format!("{role} {index} did not start (see its log above)")
        })?;
    // "qpq-server <role> ops <addr>"
    let mut ops_line = String::new();
    reader
        .read_line(&mut ops_line)
        .with_context(|| format!("reading {role} {index}'s ops address"))?;
    let ops = ops_line.split_whitespace().nth(3).unwrap_or("off");
    println!(
        "{role} {address} pid {} data-dir {} ops {ops}",
        child.id(),
        data_dir.display()
    );
    std::io::stdout().flush()?;
    Ok(Node {
        role,
        child,
        address,
        exited: false,
    })
}

fn terminate(nodes: &mut [Node], grace: Duration) {
    for n in nodes.iter().filter(|n| !n.exited) {
        if let Some(pid) = i32::try_from(n.child.id()).ok().and_then(Pid::from_raw) {
            let _ = kill_process(pid, Signal::TERM);
        }
    }
    let deadline = Instant::now() + grace;
    for n in nodes.iter_mut().filter(|n| !n.exited) {
        loop {
            match n.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!("{} {} did not stop in time; killing it", n.role, n.address);
                    let _ = n.child.kill();
                    let _ = n.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        n.exited = true;
    }
}

/// Runs the cluster until ctrl-c or SIGTERM.
pub(crate) fn run(plan: &Plan) -> Result<()> {
    if plan.edges == 0 || plan.shards == 0 {
        bail!("a cluster needs at least one edge and one shard");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    let applied = runtime
        .block_on(postgres::migrate(&plan.database_url))
        .context("migrating the database")?;
    for version in applied {
        println!("applied {version}");
    }
    keystore::ensure_data_dir(&plan.base_dir)?;
    let key = keystore::cluster_key(&plan.base_dir)?;
    keystore::telemetry_key(&plan.base_dir, None)?;
    println!("cluster-key {}", key.public_key());
    let mut signal = runtime.block_on(async { crate::shutdown_signal() })?;
    let mut shards = Vec::new();
    let mut edges = Vec::new();
    let started = (|| -> Result<()> {
        for i in 0..plan.shards {
            shards.push(spawn(plan, "shard", i, &key)?);
        }
        for i in 0..plan.edges {
            edges.push(spawn(plan, "edge", i, &key)?);
        }
        Ok(())
    })();
    if let Err(e) = started {
        terminate(&mut edges, Duration::from_secs(10));
        terminate(&mut shards, Duration::from_secs(10));
        return Err(e);
    }
    let servers: Vec<&str> = edges.iter().map(|e| e.address.as_str()).collect();
    println!(
        "ready: qpq --server {} --server-key {}",
        servers.join(","),
        key.public_key()
    );
    drop(key);
    std::io::stdout().flush()?;
    runtime.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                () = &mut signal => break,
                _ = tick.tick() => {
                    for n in edges.iter_mut().chain(shards.iter_mut()).filter(|n| !n.exited) {
                        if let Ok(Some(status)) = n.child.try_wait() {
                            n.exited = true;
                            // Whoever started us may no longer read our output.
                            let _ = writeln!(
                                std::io::stdout(),
                                "{} {} exited ({status})",
                                n.role,
                                n.address
                            );
                        }
                    }
                }
            }
        }
    });
    // Edges first: they drain their clients while the shards still serve their last calls.
    terminate(&mut edges, Duration::from_secs(40));
    terminate(&mut shards, Duration::from_secs(40));
    let _ = writeln!(std::io::stdout(), "stopped");
    Ok(())
}
