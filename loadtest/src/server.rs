//! The server under test: an in-process `standalone` server on the embedded store (the
//! default), the same in a child process (`--server-process`: its memory and CPU are then its
//! own), or a remote cluster (`--target`; its verifying nodes' metrics with `--metrics`).

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
        /// Its metrics endpoint.
        metrics: Metrics,
        _dir: tempfile::TempDir,
    },
    /// Somebody else's cluster, and the metrics endpoints of its verifying nodes (if given).
    Remote { metrics: Option<Metrics> },
}

/// The `/metrics` endpoints of the nodes that verify commits, read over HTTP.
pub(crate) struct Metrics {
    urls: Vec<String>,
    client: reqwest::blocking::Client,
}

impl Metrics {
    /// `endpoints`: ops listen addresses as `http://host:port` (`/metrics` is appended).
    fn new(endpoints: &[String]) -> Result<Self> {
        let first = endpoints.first().context("no metrics endpoint")?;
        let client = quicproquo_telemetry::otlp::http_client(first)
            .with_context(|| format!("metrics endpoint {first}"))?;
        let urls = endpoints
            .iter()
            .map(|e| format!("{}/metrics", e.trim_end_matches('/')))
            .collect();
        Ok(Self { urls, client })
    }

    /// The verification histogram's count and sum, added over the endpoints; `None` if one
    /// does not answer. The blocking client runs on a thread of its own (the caller may be
    /// inside an async runtime).
    fn verifications(&self) -> Option<(u64, f64)> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut total = (0, 0.0);
                    for url in &self.urls {
                        let text = self.client.get(url).send().ok()?.text().ok()?;
                        let (n, s) = verify_histogram(&text)?;
                        total = (total.0 + n, total.1 + s);
                    }
                    Some(total)
                })
                .join()
                .ok()
                .flatten()
        })
    }
}

/// `qpq_handshake_verify_duration_seconds`'s count and sum in a Prometheus text exposition.
fn verify_histogram(text: &str) -> Option<(u64, f64)> {
    let value = |name: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    let count = value("qpq_handshake_verify_duration_seconds_count")?;
    let sum = value("qpq_handshake_verify_duration_seconds_sum")?;
    Some((count as u64, sum))
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
    /// how many, and their total time in seconds. Read from the server's metrics: directly
    /// when it runs in this process, over its ops endpoint for a child process, over the
    /// endpoints given with `--metrics` for a remote cluster (`None` without them).
    pub(crate) fn verifications(&self) -> Option<(u64, f64)> {
        match self {
            Self::InProcess { handle, .. } => {
                let h = &handle.observer().metrics.verify_seconds;
                Some((h.count(), h.sum()))
            }
            Self::Child { metrics, .. }
            | Self::Remote {
                metrics: Some(metrics),
            } => metrics.verifications(),
            Self::Remote { metrics: None } => None,
        }
    }

    /// Short description for the report.
    pub(crate) fn describe(&self, addrs: &[SocketAddr]) -> String {
        match self {
            Self::InProcess { .. } => "in-process standalone server, embedded store".into(),
            Self::Child { .. } => "standalone server in a child process, embedded store".into(),
            Self::Remote { .. } => format!(
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
                mut child, stdin, ..
            } => {
                // Closing its standard input is the child's signal to shut down.
                drop(stdin);
                child.wait().context("waiting for the server process")?;
            }
            Self::Remote { .. } => {}
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
    // Its metrics (verification time) are read over the ops endpoint when it is a child.
    config.ops_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
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
    let (Some("listening"), Some(addr), Some(key), Some(ops)) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        let _ = child.kill();
        bail!("the server process did not start (said {line:?})");
    };
    let addr: SocketAddr = addr.parse().context("server address")?;
    let cluster_key = parse_key(key)?;
    let metrics = Metrics::new(&[format!("http://{ops}")])?;
    let stdin = child.stdin.take();
    Ok(Endpoint {
        addrs: vec![addr],
        cluster_key,
        target: Target::Child {
            child,
            stdin,
            metrics,
            _dir: dir,
        },
    })
}

/// A remote cluster.
pub(crate) async fn remote(target: &[String], key: &str, metrics: &[String]) -> Result<Endpoint> {
    let addrs = quicproquo_client::resolve(target).await?;
    let metrics = if metrics.is_empty() {
        None
    } else {
        Some(Metrics::new(metrics)?)
    };
    Ok(Endpoint {
        addrs,
        cluster_key: parse_key(key)?,
        target: Target::Remote { metrics },
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
        let ops = handle
            .ops_addr()
            .context("the server has no ops endpoint")?;
        writeln!(
            out,
            "listening {} {} {ops}",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verification_histogram_is_read_from_an_exposition() {
        let text = "# TYPE qpq_handshake_verify_duration_seconds histogram\n\
                    qpq_handshake_verify_duration_seconds_bucket{le=\"+Inf\"} 3\n\
                    qpq_handshake_verify_duration_seconds_sum 0.0125\n\
                    qpq_handshake_verify_duration_seconds_count 3\n\
                    qpq_handshake_verify_duration_seconds_count_other 9\n";
        assert_eq!(verify_histogram(text), Some((3, 0.0125)));
        assert_eq!(verify_histogram("qpq_other_count 3\n"), None);
    }
}
