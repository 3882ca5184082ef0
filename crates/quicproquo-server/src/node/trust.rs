//! This node's place in the cluster's trust: which identity it starts with, and the watcher
//! that keeps its certificate current.
//!
//! An edge or a shard starts from its node key and a certificate the operator issued
//! (`node_certificate_file`); it holds no cluster signing key. A standalone node is its own
//! operator: it certifies itself with the cluster key in its data directory (or
//! `cluster_key_file`). The watcher re-reads the certificate file when its modification time
//! or size changes (at most every `certificate_check_interval`, at most 4 KiB read), presents
//! a renewed certificate from the next handshake on, and warns (log and metric) while the
//! certificate expires within `certificate_renewal_window`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use quicproquo_core::NodeRole;
use quicproquo_core::cert::unix_now;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{ServerError, io_err};
use crate::config::{ConfigError, ServerConfig};
use crate::keystore::{CertificateSource, NodeIdentity};
use crate::obs::Observer;

/// How often a node warns again while its certificate stays inside the renewal window.
const WARN_EVERY: Duration = Duration::from_secs(3600);

/// Loads the identity `config` names: a certificate for an edge or a shard, a self-issued
/// one for a standalone node. Refuses an edge or a shard with no certificate, and a
/// `node_id` that differs from the certificate's.
pub fn load_identity(config: &ServerConfig) -> Result<NodeIdentity, ServerError> {
    let cluster = &config.cluster;
    let identity = match (&cluster.node_certificate_file, config.role) {
        (_, NodeRole::Edge | NodeRole::Shard) if cluster.cluster_key_file.is_some() => {
            return Err(ConfigError::Invalid {
                key: "cluster_key_file",
                message: format!(
                    "a {} must not hold the cluster signing key: give it a certificate \
                     (qpq-server node-cert) in node_certificate_file, and keep the key with \
                     the operator",
                    config.role
                ),
            }
            .into());
        }
        (Some(file), _) => NodeIdentity::with_certificate(
            &config.data_dir,
            &CertificateSource {
                file,
                node_key_file: cluster.node_key_file.as_deref(),
                trusted: &cluster.cluster_public_keys,
                telemetry_key_file: cluster.telemetry_key_file.as_deref(),
            },
            config.role,
        )?,
        (None, NodeRole::Edge | NodeRole::Shard) => {
            let role = config.role;
            return Err(ConfigError::Invalid {
                key: "node_certificate_file",
                message: format!(
                    "a {role} starts from a certificate the operator issued: qpq-server \
                     node-cert --role {role} --node-key <this node's key, from qpq-server \
                     node-key>"
                ),
            }
            .into());
        }
        (None, _) => {
            let mut identity = NodeIdentity::load(
                &config.data_dir,
                cluster.cluster_key_file.as_deref(),
                config.role,
            )?;
            if let Some(path) = &cluster.telemetry_key_file {
                identity.use_telemetry_key_file(path)?;
            }
            identity
        }
    };
    let certified = identity.certificate();
    if let Some(configured) = &cluster.node_id
        && identity.certificate_file().is_some()
        && configured != certified.node_id()
    {
        return Err(ConfigError::Invalid {
            key: "node_id",
            message: format!(
                "`{configured}` differs from the certificate's node id `{}`",
                certified.node_id()
            ),
        }
        .into());
    }
    Ok(identity)
}

/// What identifies a version of the certificate file without reading it.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Starts the certificate watcher when the identity came from a certificate file; it stops
/// with `stop`.
pub(super) fn start_watcher(
    identity: &Arc<NodeIdentity>,
    observer: &Arc<Observer>,
    config: &ServerConfig,
    stop: &CancellationToken,
) -> Result<Option<JoinHandle<()>>, ServerError> {
    let stats = &observer.metrics.certificates;
    stats
        .expires_at
        .store(identity.certificate().not_after(), Ordering::Relaxed);
    let Some(path) = identity.certificate_file().map(Path::to_owned) else {
        return Ok(None);
    };
    let watch = Watch {
        identity: Arc::clone(identity),
        observer: Arc::clone(observer),
        path,
        interval: config.cluster.certificate_check_interval,
        window: config.cluster.certificate_renewal_window,
    };
    watch.check_expiry(&mut None);
    let stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("qpq-cert-watch".into())
        .spawn(move || watch.run(&stop))
        .map_err(io_err("spawning the certificate watcher"))?;
    Ok(Some(thread))
}

struct Watch {
    identity: Arc<NodeIdentity>,
    observer: Arc<Observer>,
    path: PathBuf,
    interval: Duration,
    window: Duration,
}

impl Watch {
    fn run(&self, stop: &CancellationToken) {
        let Ok(rt) = super::runtime() else {
            error!("the certificate watcher could not start its runtime");
            return;
        };
        let mut seen = stamp(&self.path);
        let mut warned = None;
        rt.block_on(async {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(self.interval) => {}
                }
                let now = stamp(&self.path);
                if now.is_some() && now != seen {
                    seen = now;
                    self.reload();
                }
                self.check_expiry(&mut warned);
            }
        });
    }

    fn reload(&self) {
        let stats = &self.observer.metrics.certificates;
        match self.identity.reload_certificate() {
            Ok(Some(cert)) => {
                stats.reloads.fetch_add(1, Ordering::Relaxed);
                stats.expires_at.store(cert.not_after(), Ordering::Relaxed);
                info!(
                    file = %self.path.display(),
                    not_after = cert.not_after(),
                    issuer = %cert.issuer().map(|k| k.to_hex()).unwrap_or_default(),
                    "renewed node certificate in use"
                );
            }
            Ok(None) => {}
            Err(e) => {
                stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "changed certificate file refused; keeping the current certificate");
            }
        }
    }

    /// Sets the renewal gauge and warns (again after [`WARN_EVERY`]) inside the window.
    fn check_expiry(&self, warned: &mut Option<std::time::Instant>) {
        let cert = self.identity.certificate();
        let now = unix_now();
        let left = cert.remaining_at(now);
        let due = left <= self.window.as_secs();
        let stats = &self.observer.metrics.certificates;
        stats.renewal_due.store(u64::from(due), Ordering::Relaxed);
        if !due {
            *warned = None;
            return;
        }
        if warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        *warned = Some(std::time::Instant::now());
        if left == 0 {
            error!(
                file = %self.path.display(),
                not_after = cert.not_after(),
                "node certificate expired: peers refuse this node until it is renewed"
            );
        } else {
            warn!(
                file = %self.path.display(),
                not_after = cert.not_after(),
                seconds_left = left,
                "node certificate expires soon: issue a new one (qpq-server node-cert)"
            );
        }
    }
}
