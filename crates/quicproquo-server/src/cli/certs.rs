//! The operator's certificate commands: `node-key` (a node's Noise public key, to certify)
//! and `node-cert` (a certificate for it, issued with the cluster signing key, which stays
//! with the operator).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use quicproquo_core::cert::{check_node_id, default_node_id, unix_now};
use quicproquo_core::{CertificateFields, NodeRole};
use quicproquo_server::config::parse_duration;
use quicproquo_server::keystore;

/// Longest validity `node-cert` issues: a certificate is the only revocation there is
/// (short ones expire), so years are refused.
const MAX_VALIDITY_DAYS: u64 = 400;

/// What `qpq-server node-cert` was asked.
pub(crate) struct Request {
    /// The cluster signing key file.
    pub(crate) cluster_key_file: PathBuf,
    /// `edge`, `shard` or `standalone`.
    pub(crate) role: String,
    /// The node's Noise public key, hex.
    pub(crate) node_key: Option<String>,
    /// Or a directory holding the node's key (created there on first use).
    pub(crate) node_key_dir: Option<PathBuf>,
    /// The node id; `None`: derived from the node key.
    pub(crate) node_id: Option<String>,
    /// Validity, e.g. `30d`.
    pub(crate) expires: String,
    /// Where to write the certificate; `None`: stdout.
    pub(crate) out: Option<PathBuf>,
}

/// `qpq-server node-key`: prints this node's Noise public key, creating the key on first use.
pub(crate) fn node_key(data_dir: &Path) -> Result<()> {
    let key = keystore::node_key(data_dir)?;
    println!("{}", hex::encode(key.public()));
    Ok(())
}

/// `qpq-server node-cert`: issues a certificate valid from a minute ago for `expires`.
pub(crate) fn node_cert(req: &Request) -> Result<()> {
    let role: NodeRole = req.role.parse()?;
    let mut node_key = [0u8; 32];
    match (&req.node_key, &req.node_key_dir) {
        (Some(hex_key), None) => hex::decode_to_slice(hex_key.trim(), &mut node_key)
            .context("--node-key must be the node's Noise public key: 64 hex digits")?,
        (None, Some(dir)) => node_key = *keystore::node_key(dir)?.public(),
        _ => bail!("name the node by exactly one of --node-key and --node-key-dir"),
    }
    let node_id = req
        .node_id
        .clone()
        .unwrap_or_else(|| default_node_id(&node_key));
    check_node_id(&node_id)?;
    let validity = parse_duration(&req.expires).map_err(anyhow::Error::msg)?;
    if validity.as_secs() < 60 || validity.as_secs() > MAX_VALIDITY_DAYS * 86_400 {
        bail!("--expires must be between 1m and {MAX_VALIDITY_DAYS}d");
    }
    let cluster = keystore::cluster_key_file(&req.cluster_key_file)?;
    let not_before = unix_now().saturating_sub(60);
    let certificate = cluster.issue(&CertificateFields {
        role,
        node_key,
        node_id: node_id.clone(),
        not_before,
        not_after: not_before + 60 + validity.as_secs(),
    })?;
    let out = req.out.clone().or_else(|| {
        req.node_key_dir
            .as_ref()
            .map(|d| d.join(keystore::NODE_CERTIFICATE_FILE))
    });
    match &out {
        Some(path) => keystore::write_certificate(path, &certificate)?,
        None => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", certificate.to_hex())?;
            out.flush()?;
        }
    }
    eprintln!(
        "issued a {role} certificate for node {node_id} by cluster key {}, valid until {} \
         (Unix time)",
        cluster.public_key(),
        certificate.not_after()
    );
    Ok(())
}
