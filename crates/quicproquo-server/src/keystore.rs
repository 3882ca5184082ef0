//! Key files in the data directory: the cluster key and this node's Noise static key.
//!
//! Both are created on first use, hex-encoded, mode 0600, in a directory of mode 0700. A file is
//! written to a temporary name, synced, then hard-linked into place, so a crash never leaves a
//! half-written key and two processes starting at once agree on one key.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use quicproquo_core::{
    ClusterPublicKey, ClusterSigningKey, KeyError, NodeCertificate, NodeRole, NoiseKeypair,
};
use zeroize::Zeroizing;

/// File holding the cluster's Ed25519 secret seed.
pub const CLUSTER_KEY_FILE: &str = "cluster.key";
/// File holding this node's X25519 Noise static secret.
pub const NODE_KEY_FILE: &str = "node.key";

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
            if let Ok(meta) = fs::metadata(&path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(file = %path.display(), "key file is readable by group or others; chmod 600 it");
            }
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

/// A node's Noise key and the cluster's certificate for it.
#[derive(Debug)]
pub struct NodeIdentity {
    /// The Noise static key.
    pub noise: NoiseKeypair,
    /// The cluster key's signature over the role and the Noise public key.
    pub certificate: NodeCertificate,
    /// The cluster public key clients pin.
    pub cluster_public: ClusterPublicKey,
    /// Hashes group ids for spans and logs under a key derived from the cluster secret, so
    /// every node of the cluster names a group alike and no one else can recompute it.
    pub redactor: quicproquo_telemetry::Redactor,
}

/// Loads the cluster signing key from `path`, which must exist (the key every node of a
/// cluster shares, e.g. mounted from a secret).
pub fn cluster_key_file(path: &Path) -> Result<ClusterSigningKey, KeyStoreError> {
    let text = fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(io_err("reading", path))?;
    ClusterSigningKey::from_secret_hex(&text).map_err(|source| KeyStoreError::Invalid {
        path: path.to_owned(),
        source,
    })
}

impl NodeIdentity {
    /// Loads (or creates) the keys in `dir` and certifies the node key for `role`.
    pub fn load_or_create(dir: &Path, role: NodeRole) -> Result<Self, KeyStoreError> {
        Self::load(dir, None, role)
    }

    /// Like [`NodeIdentity::load_or_create`], but takes the cluster key from
    /// `cluster_key_file` when given (it must exist) instead of the data directory.
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
        Ok(Self {
            redactor: quicproquo_telemetry::Redactor::new(cluster.secret_hex().as_bytes()),
            certificate: cluster.certify(role, noise.public()),
            cluster_public: cluster.public_key(),
            noise,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_once_with_private_modes() -> Result<(), Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("data");
        let first = NodeIdentity::load_or_create(&dir, NodeRole::Standalone)?;
        let again = NodeIdentity::load_or_create(&dir, NodeRole::Standalone)?;
        assert_eq!(first.cluster_public, again.cluster_public);
        assert_eq!(first.noise.public(), again.noise.public());
        assert_eq!(fs::metadata(&dir)?.permissions().mode() & 0o777, 0o700);
        for f in [CLUSTER_KEY_FILE, NODE_KEY_FILE] {
            assert_eq!(
                fs::metadata(dir.join(f))?.permissions().mode() & 0o777,
                0o600
            );
        }
        first
            .cluster_public
            .verify(&first.certificate, first.noise.public())?;
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&dir)?.count(), 2);
        Ok(())
    }

    #[test]
    fn a_corrupt_key_file_is_reported() -> Result<(), Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        fs::write(tmp.path().join(CLUSTER_KEY_FILE), "not hex")?;
        assert!(matches!(
            cluster_key(tmp.path()),
            Err(KeyStoreError::Invalid { .. })
        ));
        Ok(())
    }
}
