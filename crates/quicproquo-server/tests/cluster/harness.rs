//! A multi-process cluster for the fault tests: `qpq-server dev-cluster` on loopback against a
//! throwaway Postgres, plus nodes the tests restart themselves, and members driven through
//! the client library.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use quicproquo_client::chat::Chat;
use quicproquo_client::{ClientState, ConnectOptions, Connection, Session, connect_any_after};
use quicproquo_core::ClusterPublicKey;
use quicproquo_core::mls::Suite;
use rustix::process::{Pid, Signal, kill_process};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_qpq-server");

/// One node process as dev-cluster reported it.
#[derive(Debug, Clone)]
pub(crate) struct NodeInfo {
    pub(crate) role: String,
    pub(crate) address: String,
    pub(crate) pid: u32,
    pub(crate) data_dir: PathBuf,
    /// Its ops listener (`/metrics`), when it has one.
    pub(crate) ops: Option<String>,
}

/// A running dev-cluster and the nodes restarted by the test.
pub(crate) struct Cluster {
    pub(crate) database_url: String,
    pub(crate) base: PathBuf,
    pub(crate) key: ClusterPublicKey,
    pub(crate) shards: Vec<NodeInfo>,
    pub(crate) edges: Vec<NodeInfo>,
    parent: Child,
    restarted: Vec<Child>,
}

/// The nodes' log filter: `QPQ_TEST_NODE_LOG` when set (e.g. `quicproquo_server=debug` to see
/// why a node dropped a connection), warnings otherwise.
fn node_log() -> String {
    std::env::var("QPQ_TEST_NODE_LOG").unwrap_or_else(|_| "warn".to_owned())
}

fn read_line(rx: &mpsc::Receiver<String>, deadline: Instant) -> Result<String> {
    let left = deadline.saturating_duration_since(Instant::now());
    rx.recv_timeout(left)
        .context("dev-cluster stopped talking before it was ready")
}

impl Cluster {
    /// Starts `edges` edges and `shards` shards with a short lease.
    pub(crate) fn start(
        database_url: &str,
        base: &Path,
        edges: usize,
        shards: usize,
    ) -> Result<Self> {
        Self::start_with_env(database_url, base, (edges, shards), &[])
    }

    /// [`Cluster::start`] with `env` set for every node (e.g. `QPQ_*` settings).
    pub(crate) fn start_with_env(
        database_url: &str,
        base: &Path,
        (edges, shards): (usize, usize),
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut parent = Command::new(BIN)
            .args(["dev-cluster", "--database-url", database_url])
            .args([
                "--edges",
                &edges.to_string(),
                "--shards",
                &shards.to_string(),
            ])
            .arg("--data-dir")
            .arg(base)
            .args(["--lease-ttl", "2s"])
            .env("QPQ_LOG", node_log())
            .env("QPQ_RING_REFRESH", "200ms")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = parent.stdout.take().context("dev-cluster stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining after start-up: dev-cluster reports exits on stdout later.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut key = None;
        let (mut shard_nodes, mut edge_nodes) = (Vec::new(), Vec::new());
        loop {
            let line = read_line(&rx, deadline)?;
            let words: Vec<&str> = line.split_whitespace().collect();
            match words[..] {
                ["cluster-key", hex] => key = Some(ClusterPublicKey::from_hex(hex)?),
                [
                    role @ ("shard" | "edge"),
                    addr,
                    "pid",
                    pid,
                    "data-dir",
                    dir,
                    ref rest @ ..,
                ] => {
                    let ops = match rest {
                        ["ops", ops, ..] if *ops != "off" => Some((*ops).to_owned()),
                        _ => None,
                    };
                    let node = NodeInfo {
                        role: role.to_owned(),
                        address: addr.to_owned(),
                        pid: pid.parse()?,
                        data_dir: PathBuf::from(dir),
                        ops,
                    };
                    if role == "shard" {
                        shard_nodes.push(node);
                    } else {
                        edge_nodes.push(node);
                    }
                }
                ["ready:", ..] => break,
                _ => {}
            }
        }
        Ok(Self {
            database_url: database_url.to_owned(),
            base: base.to_owned(),
            key: key.context("dev-cluster printed no cluster key")?,
            shards: shard_nodes,
            edges: edge_nodes,
            parent,
            restarted: Vec::new(),
        })
    }

    /// Client options pinning this cluster's key.
    pub(crate) fn options(&self) -> ConnectOptions {
        let mut o = ConnectOptions::new(self.key);
        o.timeout = Duration::from_secs(10);
        o
    }

    /// The edges' addresses, starting with edge `first`.
    pub(crate) fn edge_addrs(&self, first: usize) -> Result<Vec<std::net::SocketAddr>> {
        let n = self.edges.len();
        (0..n)
            .map(|i| Ok(self.edges[(first + i) % n].address.parse()?))
            .collect()
    }

    /// Starts `node` again (same data directory, hence same key and node id) and returns its
    /// new address. Edges keep their address so clients find them again.
    pub(crate) fn restart(&mut self, node: &NodeInfo) -> Result<String> {
        let listen = if node.role == "edge" {
            node.address.clone()
        } else {
            "127.0.0.1:0".to_owned()
        };
        let mut child = Command::new(BIN)
            .arg(&node.role)
            .args(["--listen", &listen])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--node-certificate-file")
            .arg(node.data_dir.join("node.cert"))
            .arg("--telemetry-key-file")
            .arg(self.base.join("telemetry.key"))
            .args(["--database-url", &self.database_url])
            .args(["--lease-ttl", "2s", "--ring-refresh", "200ms"])
            .args(["--ops-listen", "127.0.0.1:0"])
            .env("QPQ_LOG", node_log())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("node stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .split_whitespace()
            .nth(4)
            .with_context(|| format!("restarted {} did not start", node.role))?
            .to_owned();
        self.restarted.push(child);
        Ok(addr)
    }

    /// Stops the whole cluster with SIGTERM and waits for it.
    pub(crate) fn stop(mut self) -> Result<()> {
        for child in &mut self.restarted {
            signal(child.id(), Signal::TERM);
        }
        signal(self.parent.id(), Signal::TERM);
        let status = self.parent.wait()?;
        for child in &mut self.restarted {
            child.wait()?;
        }
        if !status.success() {
            bail!("dev-cluster exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.restarted {
            let _ = child.kill();
        }
        for n in self.shards.iter().chain(&self.edges) {
            signal(n.pid, Signal::KILL);
        }
        let _ = self.parent.kill();
        let _ = self.parent.wait();
    }
}

/// Sends `sig` to process `pid` (ignoring a process that is already gone).
pub(crate) fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, sig);
    }
}

/// Whether process `pid` has exited (it is no child of ours, so poll /proc).
pub(crate) fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie (state Z) has exited; its parent has not reaped it yet.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// A member: its state file and a connection to one of the edges.
pub(crate) struct Member {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) state: ClientState,
    pub(crate) conn: Connection,
    pub(crate) session: Session,
    pub(crate) addrs: Vec<std::net::SocketAddr>,
}

impl Member {
    /// Creates a device, connects to the first reachable edge of `addrs`, claims `name` and
    /// uploads KeyPackages.
    pub(crate) async fn register(
        name: &str,
        dir: &Path,
        addrs: Vec<std::net::SocketAddr>,
        options: &ConnectOptions,
    ) -> Result<Self> {
        let path = dir.join(format!("{name}.bin"));
        let state = ClientState::create(Suite::Classical)?;
        let conn = connect_any_after(&addrs, None, options).await?;
        let session = conn.bind(state.identity()).await?;
        session.auth.claim_name(name).await?;
        let packages = state
            .mls_identity()
            .key_packages(&state.mls, state.suite, 4)?;
        state.save(&path)?;
        session.auth.upload_key_packages(&packages, None).await?;
        Ok(Self {
            name: name.to_owned(),
            path,
            state,
            conn,
            session,
            addrs,
        })
    }

    pub(crate) fn chat(&mut self) -> Chat<'_> {
        Chat::new(&mut self.state, &self.path, &self.session)
    }

    /// Moves to the next reachable edge after the current one.
    pub(crate) async fn reconnect(&mut self, options: &ConnectOptions) -> Result<()> {
        let conn = connect_any_after(&self.addrs, Some(self.conn.addr()), options).await?;
        self.session = conn.bind(self.state.identity()).await?;
        self.conn = conn;
        Ok(())
    }
}
