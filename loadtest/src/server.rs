//! The server under test: an in-process `standalone` server on the embedded store (the
//! default), the same in a child process (`--server-process`: its memory and CPU are then its
//! own), or a remote cluster (`--target`).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use quicproquo_core::{ClusterPublicKey, NodeRole};
use quicproquo_server::{NodeIdentity, ServerConfig, ServerHandle};

/// The server the members talk to.
pub(crate) enum Target {
    /// Running in this process.
    InProcess {
        handle: Box<ServerHandle>,
        _dir: tempfile::TempDir,
    },
    /// A child process running `qpq-loadtest serve`.
    Child {
        child: Child,
        stdin: Option<ChildStdin>,
        _dir: tempfile::TempDir,
    },
    /// Somebody else's cluster.
    Remote,
}

/// Where to connect and which key vouches for the nodes.
pub(crate) struct Endpoint {
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) cluster_key: ClusterPublicKey,
    pub(crate) target: Target,
}

impl Target {
    /// The child server's pid, if the server is a child process.
    pub(crate) fn pid(&self) -> Option<u32> {
        match self {
            Self::Child { child, .. } => Some(child.id()),
            _ => None,
        }
    }

    /// Whether the server runs in this process.
    pub(crate) fn in_process(&self) -> bool {
        matches!(self, Self::InProcess { .. })
    }

    /// The server's commit and proposal verifications so far (`qpq_handshake_verify_duration_seconds`):
    /// how many, and their total time in seconds. Read from the server's metrics when it runs
    /// in this process; `None` for a child process or a remote cluster.
    pub(crate) fn verifications(&self) -> Option<(u64, f64)> {
        match self {
            Self::InProcess { handle, .. } => {
                let h = &handle.observer().metrics.verify_seconds;
                Some((h.count(), h.sum()))
            }
            _ => None,
        }
    }

    /// Short description for the report.
    pub(crate) fn describe(&self, addrs: &[SocketAddr]) -> String {
        match self {
            Self::InProcess { .. } => "in-process standalone server, embedded store".into(),
            Self::Child { .. } => "standalone server in a child process, embedded store".into(),
            Self::Remote => format!(
                "remote: {}",
                addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }

    /// Stops a server we started and waits for it.
    pub(crate) fn stop(self) -> Result<()> {
        match self {
            Self::InProcess { handle, _dir } => {
                handle.shutdown();
                handle.join()?;
            }
            Self::Child {
                mut child,
                stdin,
                _dir,
            } => {
                // Closing its standard input is the child's signal to shut down.
                drop(stdin);
                child.wait().context("waiting for the server process")?;
            }
            Self::Remote => {}
        }
        Ok(())
    }
}

/// The configuration the load test's own server runs with: room for every member.
fn config(dir: &Path, max_connections: usize) -> ServerConfig {
    let mut config = ServerConfig::for_role(NodeRole::Standalone, dir.join("data"));
    config.max_connections = max_connections;
    config.max_handshakes = max_connections.clamp(1024, 65_536);
    // Every member connects from loopback: the per-address caps are the global ones here.
    config.limits.max_connections_per_address = config.max_connections;
    config.limits.max_handshakes_per_address = config.max_handshakes;
    // ... and so are the per-address rates of binds and KeyPackage fetches.
    config.limits.rates.binds_per_address = u32::MAX;
    config.limits.rates.fetches_per_address = u32::MAX;
    config.limits.rates.fetches_per_identity = u32::MAX;
    // Members may sit connected between phases for as long as a large set-up takes.
    config.limits.idle_timeout = Duration::from_secs(24 * 3600);
    config.handshake_timeout = Duration::from_secs(60);
    config.shutdown_grace = Duration::from_secs(2);
    config
}

/// Starts a standalone server in this process.
pub(crate) fn in_process(max_connections: usize) -> Result<Endpoint> {
    let dir = tempfile::tempdir()?;
    let config = config(dir.path(), max_connections);
    let identity = NodeIdentity::load_or_create(&config.data_dir, NodeRole::Standalone)?;
    let store = quicproquo_server::open_store(&config)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let handle = quicproquo_server::start(config, listener, identity, store)?;
    Ok(Endpoint {
        addrs: vec![handle.local_addr()],
        cluster_key: handle.cluster_key(),
        target: Target::InProcess {
            handle: Box::new(handle),
            _dir: dir,
        },
    })
}

/// Starts a standalone server in a child process (this binary's `serve` subcommand).
pub(crate) fn child(max_connections: usize) -> Result<Endpoint> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe().context("locating the qpq-loadtest binary")?;
    let mut child = Command::new(exe)
        .arg("serve")
        .arg(dir.path())
        .arg(max_connections.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the server process")?;
    let stdout = child.stdout.take().context("server process stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the server's address")?;
    let mut words = line.split_whitespace();
    let (Some("listening"), Some(addr), Some(key)) = (words.next(), words.next(), words.next())
    else {
        let _ = child.kill();
        bail!("the server process did not start (said {line:?})");
    };
    let addr: SocketAddr = addr.parse().context("server address")?;
    let cluster_key = parse_key(key)?;
    let stdin = child.stdin.take();
    Ok(Endpoint {
        addrs: vec![addr],
        cluster_key,
        target: Target::Child {
            child,
            stdin,
            _dir: dir,
        },
    })
}

/// A remote cluster.
pub(crate) async fn remote(target: &[String], key: &str) -> Result<Endpoint> {
    let addrs = quicproquo_client::resolve(target).await?;
    Ok(Endpoint {
        addrs,
        cluster_key: parse_key(key)?,
        target: Target::Remote,
    })
}

fn parse_key(hex_key: &str) -> Result<ClusterPublicKey> {
    ClusterPublicKey::from_hex(hex_key.trim()).context("--server-key")
}

/// The `serve` subcommand: runs a standalone server until standard input closes.
pub(crate) fn serve(dir: &Path, max_connections: usize) -> Result<()> {
    crate::sys::raise_nofile_limit(max_connections as u64 + 1024);
    let config = config(dir, max_connections);
    let identity = NodeIdentity::load_or_create(&config.data_dir, NodeRole::Standalone)?;
    let store = quicproquo_server::open_store(&config)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let handle = quicproquo_server::start(config, listener, identity, store)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "listening {} {}",
            handle.local_addr(),
            handle.cluster_key().to_hex()
        )?;
        out.flush()?;
    }
    // Wait for the parent to close our standard input (or to exit).
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut sink);
    handle.shutdown();
    handle.join()?;
    Ok(())
}
