//! The node certificate's metrics: when this node's certificate expires, whether it is due
//! for renewal, its reloads, and the peers' certificates refused.

use std::sync::atomic::{AtomicU64, Ordering};

use super::metrics::{counter, gauge};

/// What the certificate watcher and the handshakes report.
#[derive(Debug, Default)]
pub struct CertificateStats {
    /// The current certificate's `not_after` (Unix seconds; 0: unknown).
    pub expires_at: AtomicU64,
    /// 1 while the certificate expires within the renewal window.
    pub renewal_due: AtomicU64,
    /// Renewed certificates picked up from the certificate file.
    pub reloads: AtomicU64,
    /// Changed certificate files refused (the node keeps its current certificate).
    pub reload_failures: AtomicU64,
    /// Peers whose certificate was refused (untrusted issuer, bad signature, expired, another
    /// key); they are served as clients, never as nodes.
    pub peers_refused: AtomicU64,
}

impl CertificateStats {
    /// Renders the families.
    pub fn render(&self, out: &mut String) {
        gauge(
            out,
            "qpq_node_certificate_expiry_timestamp_seconds",
            "When this node's certificate expires (Unix seconds).",
            self.expires_at.load(Ordering::Relaxed),
        );
        gauge(
            out,
            "qpq_node_certificate_renewal_due",
            "1 while this node's certificate expires within certificate_renewal_window.",
            self.renewal_due.load(Ordering::Relaxed),
        );
        counter(
            out,
            "qpq_node_certificate_reloads_total",
            "Renewed certificates picked up from node_certificate_file.",
            self.reloads.load(Ordering::Relaxed),
        );
        counter(
            out,
            "qpq_node_certificate_reload_failures_total",
            "Changed certificate files refused; the node kept its certificate.",
            self.reload_failures.load(Ordering::Relaxed),
        );
        counter(
            out,
            "qpq_peer_certificates_refused_total",
            "Peers whose node certificate was refused.",
            self.peers_refused.load(Ordering::Relaxed),
        );
    }
}
