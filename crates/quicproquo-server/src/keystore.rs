//! Key files: this node's Noise static key, its certificate, the telemetry key, and (for a
//! standalone node and the operator's commands) the cluster signing key.
//!
//! Both are created on first use, hex-encoded, mode 0600, in a directory of mode 0700. A file is
//! written to a temporary name, synced, then hard-linked into place, so a crash never leaves a
//! half-written key and two processes starting at once agree on one key.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::sync::{PoisonError, RwLock};

use quicproquo_core::{
    ClusterPublicKey, ClusterSigningKey, KeyError, NodeCertificate, NodeRole, NodeVerifier,
    NoiseKeypair,
};
use zeroize::Zeroizing;

/// File holding the cluster's Ed25519 secret seed.
pub const CLUSTER_KEY_FILE: &str = "cluster.key";
/// File holding this node's X25519 Noise static secret.
pub const NODE_KEY_FILE: &str = "node.key";
/// File a node's certificate is written to by `qpq-server node-cert --node-key-dir` and
/// `dev-cluster`.
pub const NODE_CERTIFICATE_FILE: &str = "node.cert";
/// File holding the telemetry key when no `telemetry_key_file` is configured.
pub const TELEMETRY_KEY_FILE: &str = "telemetry.key";

/// Errors reading or creating key files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyStoreError {
    /// A file or directory operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A key file's contents are not a valid key.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: KeyError,
    },
    /// A node certificate file is unreadable as one, or the certificate is refused (expired,
    /// not yet valid, another role, another node key, an untrusted issuer, a bad signature).
    #[error("node certificate {path}: {source}")]
    Certificate {
        /// The certificate file.
        path: PathBuf,
        /// Why it is refused.
        source: KeyError,
    },
    /// Generating a key failed.
    #[error(transparent)]
    Generate(#[from] KeyError),
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> KeyStoreError + 'a {
    move |source| KeyStoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Creates the data directory (mode 0700) if it does not exist.
pub fn ensure_data_dir(dir: &Path) -> Result<(), KeyStoreError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("creating data directory", dir))
}

/// What is wrong with a key file of permission bits `mode`, if anything.
///
/// The rule: no one but the owner (and its group, read-only) may touch a key.
/// - any access by others: always wrong;
/// - group write: always wrong (the group could replace the key);
/// - group read: accepted only when the file is read-only (no write bit at all), as a key
///   provisioned onto a read-only mount is: a Kubernetes Secret with `defaultMode: 0400`
///   becomes 0440 under the pod's `fsGroup`. A writable, group-readable key is one somebody
///   copied carelessly, and the warning says so.
fn exposure(mode: u32) -> Option<&'static str> {
    if mode & 0o007 != 0 {
        Some("key file is accessible by others; chmod 600 it")
    } else if mode & 0o020 != 0 {
        Some("key file is writable by its group; chmod 600 it")
    } else if mode & 0o040 != 0 && mode & 0o222 != 0 {
        Some(
            "key file is readable by its group and writable; chmod 600 it (group read is \
             accepted only on a read-only file, e.g. a Kubernetes Secret of mode 0440)",
        )
    } else {
        None
    }
}

/// Logs a warning when the key file at `path` is exposed (see [`exposure`]).
fn warn_if_exposed(path: &Path) {
    if let Ok(meta) = fs::metadata(path)
        && let Some(problem) = exposure(meta.permissions().mode() & 0o777)
    {
        tracing::warn!(file = %path.display(), "{problem}");
    }
}

/// Reads the hex secret at `dir/name`, creating it with `generate` if it does not exist.
fn load_or_create(
    dir: &Path,
    name: &str,
    generate: impl FnOnce() -> Result<Zeroizing<String>, KeyStoreError>,
) -> Result<Zeroizing<String>, KeyStoreError> {
    ensure_data_dir(dir)?;
    let path = dir.join(name);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let text = Zeroizing::new(text);
            warn_if_exposed(&path);
            return Ok(text);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("reading", &path)(e)),
    }
    let secret = generate()?;
    let mut suffix = [0u8; 8];
    unique_suffix(&mut suffix);
    let tmp = dir.join(format!(".{name}.{}", hex::encode(suffix)));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(secret.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    })();
    let linked = written.and_then(|()| fs::hard_link(&tmp, &path));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(secret),
        // Another process created it first: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => fs::read_to_string(&path)
            .map(Zeroizing::new)
            .map_err(io_err("reading", &path)),
        Err(e) => Err(io_err("writing", &path)(e)),
    }
}

fn unique_suffix(buf: &mut [u8; 8]) {
    // Uniqueness only: a clash makes create_new fail and the caller retries next start.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mixed = (u128::from(std::process::id()) << 64) ^ nanos;
    buf.copy_from_slice(&mixed.to_le_bytes()[..8]);
}

/// Loads the cluster signing key from `dir`, creating it on first use.
pub fn cluster_key(dir: &Path) -> Result<ClusterSigningKey, KeyStoreError> {
    let text = load_or_create(dir, CLUSTER_KEY_FILE, || {
        Ok(ClusterSigningKey::generate()?.secret_hex())
    })?;
    ClusterSigningKey::from_secret_hex(&text).map_err(|source| KeyStoreError::Invalid {
        path: dir.join(CLUSTER_KEY_FILE),
        source,
    })
}

/// Loads this node's Noise static key from `dir`, creating it on first use.
pub fn node_key(dir: &Path) -> Result<NoiseKeypair, KeyStoreError> {
    let text = load_or_create(dir, NODE_KEY_FILE, || {
        Ok(NoiseKeypair::generate()?.secret_hex())
    })?;
    NoiseKeypair::from_secret_hex(&text).map_err(|source| KeyStoreError::Invalid {
        path: dir.join(NODE_KEY_FILE),
        source,
    })
}

/// Most bytes read from a certificate file (a certificate is a few hundred hex digits).
const MAX_CERTIFICATE_FILE: u64 = 4096;

/// Reads and parses the node certificate at `path` (hex, one line, at most 4 KiB).
pub fn read_certificate(path: &Path) -> Result<NodeCertificate, KeyStoreError> {
    use std::io::Read as _;
    let mut text = String::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_CERTIFICATE_FILE).read_to_string(&mut text))
        .map_err(io_err("reading", path))?;
    NodeCertificate::from_hex(&text).map_err(|source| KeyStoreError::Certificate {
        path: path.to_owned(),
        source,
    })
}

/// Writes `certificate` to `path` (hex, one line, mode 0644: a certificate is public), through
/// a temporary file renamed into place, so a node polling the file never reads half of it.
pub fn write_certificate(path: &Path, certificate: &NodeCertificate) -> Result<(), KeyStoreError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let mut suffix = [0u8; 8];
    unique_suffix(&mut suffix);
    let name = path
        .file_name()
        .map_or_else(|| "node.cert".into(), |n| n.to_string_lossy().into_owned());
    let tmp_name = format!(".{name}.{}", hex::encode(suffix));
    let tmp = dir.map_or_else(|| PathBuf::from(&tmp_name), |d| d.join(&tmp_name));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(certificate.to_hex().as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(io_err("writing", path))
}

/// Loads the telemetry key from `path` if given (it must exist), otherwise from
/// `dir/telemetry.key`, created on first use.
pub fn telemetry_key(dir: &Path, path: Option<&Path>) -> Result<Zeroizing<String>, KeyStoreError> {
    let text = match path {
        Some(path) => {
            let text = fs::read_to_string(path)
                .map(Zeroizing::new)
                .map_err(io_err("reading", path))?;
            warn_if_exposed(path);
            text
        }
        None => load_or_create(dir, TELEMETRY_KEY_FILE, || {
            let secret = NoiseKeypair::generate()?;
            Ok(secret.secret_hex())
        })?,
    };
    let trimmed = Zeroizing::new(text.trim().to_owned());
    if trimmed.len() < 32 {
        return Err(KeyStoreError::Invalid {
            path: path.map_or_else(|| dir.join(TELEMETRY_KEY_FILE), Path::to_owned),
            source: KeyError::InvalidEncoding {
                what: "telemetry key (at least 32 characters)",
                expected: 16,
            },
        });
    }
    Ok(trimmed)
}

/// A node's Noise key, the certificate a cluster key issued for it, and the cluster keys it
/// trusts for its peers' certificates.
#[derive(Debug)]
pub struct NodeIdentity {
    /// The Noise static key.
    pub noise: NoiseKeypair,
    certificate: RwLock<NodeCertificate>,
    trusted: Vec<ClusterPublicKey>,
    certificate_file: Option<PathBuf>,
    /// Hashes group ids for spans and logs under the telemetry key, so every node of the
    /// cluster names a group alike and no one else can recompute it.
    pub redactor: quicproquo_telemetry::Redactor,
}

/// Loads the cluster signing key from `path`, which must exist (the operator's key, e.g. for
/// `qpq-server node-cert`).
pub fn cluster_key_file(path: &Path) -> Result<ClusterSigningKey, KeyStoreError> {
    let text = fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(io_err("reading", path))?;
    warn_if_exposed(path);
    ClusterSigningKey::from_secret_hex(&text).map_err(|source| KeyStoreError::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// Loads a node's Noise key from `path`, which must exist (e.g. mounted from a secret).
pub fn node_key_file(path: &Path) -> Result<NoiseKeypair, KeyStoreError> {
    let text = fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(io_err("reading", path))?;
    warn_if_exposed(path);
    NoiseKeypair::from_secret_hex(&text).map_err(|source| KeyStoreError::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// The operator's step for a node whose keys live in `dir`: creates its Noise key there on
/// first use, issues it a certificate for `role` valid from a minute ago for `validity`
/// (under `node_id`, or the id derived from the key), and writes it to `dir/node.cert`.
pub fn certify_node_dir(
    cluster: &ClusterSigningKey,
    dir: &Path,
    role: NodeRole,
    node_id: Option<&str>,
    validity: std::time::Duration,
) -> Result<NodeCertificate, KeyStoreError> {
    let noise = node_key(dir)?;
    let not_before = quicproquo_core::cert::unix_now().saturating_sub(60);
    let certificate = cluster.issue(&quicproquo_core::CertificateFields {
        role,
        node_key: *noise.public(),
        node_id: node_id.map_or_else(
            || quicproquo_core::cert::default_node_id(noise.public()),
            str::to_owned,
        ),
        not_before,
        not_after: not_before + 60 + validity.as_secs(),
    })?;
    write_certificate(&dir.join(NODE_CERTIFICATE_FILE), &certificate)?;
    Ok(certificate)
}

/// Where a node's certificate comes from.
#[derive(Debug, Clone, Copy)]
pub struct CertificateSource<'a> {
    /// The certificate file (`node_certificate_file`).
    pub file: &'a Path,
    /// The node key file (`node_key_file`); `None`: `DATA_DIR/node.key`, created on first use.
    pub node_key_file: Option<&'a Path>,
    /// The cluster keys trusted for peers; empty: the key that issued this node's certificate.
    pub trusted: &'a [ClusterPublicKey],
    /// The telemetry key file; `None`: `DATA_DIR/telemetry.key`.
    pub telemetry_key_file: Option<&'a Path>,
}

impl NodeIdentity {
    /// Loads (or creates) the keys in `dir` and certifies the node key for `role` with the
    /// data directory's cluster key: a standalone node, which is its own operator.
    pub fn load_or_create(dir: &Path, role: NodeRole) -> Result<Self, KeyStoreError> {
        Self::load(dir, None, role)
    }

    /// Like [`NodeIdentity::load_or_create`], but takes the cluster signing key from
    /// `cluster_key_file` when given (it must exist) instead of the data directory. The node
    /// then holds the signing key: for a standalone node and for tests; an edge or a shard
    /// starts from a certificate ([`NodeIdentity::with_certificate`]).
    pub fn load(
        dir: &Path,
        cluster_key_file: Option<&Path>,
        role: NodeRole,
    ) -> Result<Self, KeyStoreError> {
        let cluster = match cluster_key_file {
            Some(path) => self::cluster_key_file(path)?,
            None => cluster_key(dir)?,
        };
        let noise = node_key(dir)?;
        let telemetry = telemetry_key(dir, None)?;
        Ok(Self {
            redactor: quicproquo_telemetry::Redactor::new(telemetry.as_bytes()),
            certificate: RwLock::new(cluster.certify(role, noise.public())),
            trusted: vec![cluster.public_key()],
            certificate_file: None,
            noise,
        })
    }

    /// Loads the node key from `source.node_key_file` or `dir` (created there on first use)
    /// and the certificate from `source.file`, and checks the certificate: it must certify this node key in `role`,
    /// be issued by a trusted cluster key, verify, and be valid now.
    pub fn with_certificate(
        dir: &Path,
        source: &CertificateSource<'_>,
        role: NodeRole,
    ) -> Result<Self, KeyStoreError> {
        let noise = match source.node_key_file {
            Some(path) => node_key_file(path)?,
            None => node_key(dir)?,
        };
        let certificate = read_certificate(source.file)?;
        let trusted = if source.trusted.is_empty() {
            vec![
                certificate
                    .issuer()
                    .map_err(|e| cert_error(source.file, e))?,
            ]
        } else {
            source.trusted.to_vec()
        };
        check_own(&certificate, &noise, &trusted, role).map_err(|e| cert_error(source.file, e))?;
        let telemetry = telemetry_key(dir, source.telemetry_key_file)?;
        Ok(Self {
            redactor: quicproquo_telemetry::Redactor::new(telemetry.as_bytes()),
            certificate: RwLock::new(certificate),
            trusted,
            certificate_file: Some(source.file.to_owned()),
            noise,
        })
    }

    /// The certificate this node presents now.
    pub fn certificate(&self) -> NodeCertificate {
        self.certificate
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The cluster key that issued this node's current certificate (what its clients pin).
    pub fn cluster_public(&self) -> ClusterPublicKey {
        self.certificate().issuer().unwrap_or(self.trusted[0])
    }

    /// The cluster keys this node trusts for its peers' certificates.
    pub fn trusted_keys(&self) -> &[ClusterPublicKey] {
        &self.trusted
    }

    /// Hashes group ids under the key in `path` (`telemetry_key_file`) from now on.
    pub fn use_telemetry_key_file(&mut self, path: &Path) -> Result<(), KeyStoreError> {
        let key = telemetry_key(Path::new("."), Some(path))?;
        self.redactor = quicproquo_telemetry::Redactor::new(key.as_bytes());
        Ok(())
    }

    /// A verifier for peers' certificates under the trusted keys.
    pub fn verifier(&self) -> NodeVerifier {
        NodeVerifier::with_keys(self.trusted.iter().copied())
            .unwrap_or_else(|_| NodeVerifier::new(self.trusted[0]))
    }

    /// The certificate file this node was started with (`None`: it certified itself).
    pub fn certificate_file(&self) -> Option<&Path> {
        self.certificate_file.as_deref()
    }

    /// Re-reads the certificate file and, when it holds another certificate that passes the
    /// same checks as at start (same role, this node key, a trusted issuer, valid now),
    /// presents it from now on. Returns the new certificate, or `None` when nothing changed.
    pub fn reload_certificate(&self) -> Result<Option<NodeCertificate>, KeyStoreError> {
        let Some(path) = self.certificate_file.as_deref() else {
            return Ok(None);
        };
        let fresh = read_certificate(path)?;
        let current = self.certificate();
        if fresh == current {
            return Ok(None);
        }
        check_own(&fresh, &self.noise, &self.trusted, current.role())
            .map_err(|e| cert_error(path, e))?;
        *self
            .certificate
            .write()
            .unwrap_or_else(PoisonError::into_inner) = fresh.clone();
        Ok(Some(fresh))
    }
}

fn cert_error(path: &Path, source: KeyError) -> KeyStoreError {
    KeyStoreError::Certificate {
        path: path.to_owned(),
        source,
    }
}

/// The checks a node makes of its own certificate: every check a peer makes, with the role
/// it was started in.
fn check_own(
    certificate: &NodeCertificate,
    noise: &NoiseKeypair,
    trusted: &[ClusterPublicKey],
    role: NodeRole,
) -> Result<(), KeyError> {
    NodeVerifier::with_keys(trusted.iter().copied())?.verify_role(
        certificate,
        noise.public(),
        &[role],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
