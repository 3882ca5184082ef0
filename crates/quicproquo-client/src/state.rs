//! The device's state file (`qpq-state.bin`): identity key, user name, ciphersuite and the MLS
//! secrets (KeyPackage private keys, later group state).
//!
//! Written atomically (a temporary file in the same directory, fsynced, then renamed over the
//! old one), mode 0600. Secrets are zeroized in memory when dropped. Format, big-endian:
//! `"QPQSTATE" | version u32 = 1 | identity seed [32] | suite u8 | name_len u16 | name |
//! mls_len u64 | mls storage | inbox cursor u64 | group count u32 | groups`, each group being
//! `id_len u16 | id | name_len u16 | name | cursor u64 | own count u16 | (len u8 | id)*`.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use quicproquo_core::mls::{MlsError, MlsIdentity, MlsProvider, Suite};
use quicproquo_core::{IdentityKeypair, KeyError};
use zeroize::Zeroizing;

/// Default state file name.
pub const DEFAULT_STATE_FILE: &str = "qpq-state.bin";
const MAGIC: &[u8; 8] = b"QPQSTATE";
const VERSION: u32 = 1;

/// State file errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// There is no state file yet.
    #[error("no client state at {0} (run `qpq register --name NAME` first)")]
    Missing(PathBuf),
    /// Reading or writing the file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not a state file of a version we read.
    #[error("{0} is not a valid qpq state file")]
    Corrupt(PathBuf),
    /// A key could not be generated.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The MLS secrets could not be (de)serialized.
    #[error(transparent)]
    Mls(#[from] MlsError),
}

/// What the device remembers about one group besides its MLS state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupMeta {
    /// The local name (the creator's chosen name, or the id's first hex digits on joiners).
    pub name: String,
    /// Every log entry up to this sequence number has been processed.
    pub cursor: u64,
    /// Message ids we sent that have not yet come back through the log (we skip our own
    /// messages when reading the log: MLS cannot decrypt one's own application messages).
    pub own_pending: Vec<Vec<u8>>,
}

/// Everything a device keeps between runs.
pub struct ClientState {
    identity: IdentityKeypair,
    mls_identity: MlsIdentity,
    /// The claimed user name, once registered.
    pub name: Option<String>,
    /// The ciphersuite of this device's KeyPackages.
    pub suite: Suite,
    /// The MLS provider holding this device's MLS secrets.
    pub mls: MlsProvider,
    /// Groups, by MLS group id.
    pub groups: BTreeMap<Vec<u8>, GroupMeta>,
    /// Every Welcome in our inbox up to this sequence number has been processed.
    pub inbox_cursor: u64,
}

impl std::fmt::Debug for ClientState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientState")
            .field("identity", &self.identity.public())
            .field("name", &self.name)
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

impl ClientState {
    /// A new device with a fresh identity.
    pub fn create(suite: Suite) -> Result<Self, StateError> {
        let identity = IdentityKeypair::generate()?;
        Ok(Self {
            mls_identity: MlsIdentity::new(&identity),
            identity,
            name: None,
            suite,
            mls: MlsProvider::default(),
            groups: BTreeMap::new(),
            inbox_cursor: 0,
        })
    }

    /// The identity key pair.
    pub fn identity(&self) -> &IdentityKeypair {
        &self.identity
    }

    /// The MLS signer and credential.
    pub fn mls_identity(&self) -> &MlsIdentity {
        &self.mls_identity
    }

    /// Reads the state at `path`.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let bytes = match fs::read(path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::Missing(path.to_owned()));
            }
            Err(source) => {
                return Err(StateError::Io {
                    action: "reading",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::decode(&bytes).ok_or_else(|| StateError::Corrupt(path.to_owned()))?
    }

    /// Reads the state at `path`, or starts a new device if there is none.
    pub fn load_or_create(path: &Path, suite: Suite) -> Result<Self, StateError> {
        match Self::load(path) {
            Err(StateError::Missing(_)) => Self::create(suite),
            other => other,
        }
    }

    fn decode(bytes: &[u8]) -> Option<Result<Self, StateError>> {
        let mut r = bytes;
        let mut take = |n: usize| -> Option<&[u8]> {
            let (head, tail) = r.split_at_checked(n)?;
            r = tail;
            Some(head)
        };
        if take(8)? != MAGIC {
            return None;
        }
        if u32::from_be_bytes(take(4)?.try_into().ok()?) != VERSION {
            return None;
        }
        let seed: Zeroizing<[u8; 32]> = Zeroizing::new(take(32)?.try_into().ok()?);
        let suite = match take(1)?[0] {
            1 => Suite::Hybrid,
            2 => Suite::Classical,
            _ => return None,
        };
        let name_len = usize::from(u16::from_be_bytes(take(2)?.try_into().ok()?));
        let name = String::from_utf8(take(name_len)?.to_vec()).ok()?;
        let mls_len = usize::try_from(u64::from_be_bytes(take(8)?.try_into().ok()?)).ok()?;
        let mls_bytes = take(mls_len)?;
        let mls = match MlsProvider::import_storage(mls_bytes) {
            Ok(m) => m,
            Err(e) => return Some(Err(e.into())),
        };
        let inbox_cursor = u64::from_be_bytes(take(8)?.try_into().ok()?);
        let group_count = u32::from_be_bytes(take(4)?.try_into().ok()?);
        let mut groups = BTreeMap::new();
        for _ in 0..group_count {
            let id_len = usize::from(u16::from_be_bytes(take(2)?.try_into().ok()?));
            let id = take(id_len)?.to_vec();
            let name_len = usize::from(u16::from_be_bytes(take(2)?.try_into().ok()?));
            let name = String::from_utf8(take(name_len)?.to_vec()).ok()?;
            let cursor = u64::from_be_bytes(take(8)?.try_into().ok()?);
            let own_count = u16::from_be_bytes(take(2)?.try_into().ok()?);
            let mut own_pending = Vec::with_capacity(usize::from(own_count));
            for _ in 0..own_count {
                let len = usize::from(take(1)?[0]);
                own_pending.push(take(len)?.to_vec());
            }
            groups.insert(
                id,
                GroupMeta {
                    name,
                    cursor,
                    own_pending,
                },
            );
        }
        if !r.is_empty() {
            return None;
        }
        let identity = IdentityKeypair::from_seed(&seed);
        Some(Ok(Self {
            mls_identity: MlsIdentity::new(&identity),
            identity,
            name: (!name.is_empty()).then_some(name),
            suite,
            mls,
            groups,
            inbox_cursor,
        }))
    }

    fn encode(&self) -> Result<Zeroizing<Vec<u8>>, StateError> {
        let mls = self.mls.export_storage()?;
        let name = self.name.as_deref().unwrap_or("");
        let name_len = u16::try_from(name.len()).map_err(|_| MlsError::CorruptState)?;
        let mut out = Zeroizing::new(Vec::with_capacity(64 + name.len() + mls.len()));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(self.identity.seed().as_ref());
        out.push(match self.suite {
            Suite::Classical => 2,
            _ => 1,
        });
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(mls.len() as u64).to_be_bytes());
        out.extend_from_slice(&mls);
        out.extend_from_slice(&self.inbox_cursor.to_be_bytes());
        let too_long = || StateError::Mls(MlsError::CorruptState);
        let count = u32::try_from(self.groups.len()).map_err(|_| too_long())?;
        out.extend_from_slice(&count.to_be_bytes());
        for (id, meta) in &self.groups {
            let id_len = u16::try_from(id.len()).map_err(|_| too_long())?;
            out.extend_from_slice(&id_len.to_be_bytes());
            out.extend_from_slice(id);
            let name_len = u16::try_from(meta.name.len()).map_err(|_| too_long())?;
            out.extend_from_slice(&name_len.to_be_bytes());
            out.extend_from_slice(meta.name.as_bytes());
            out.extend_from_slice(&meta.cursor.to_be_bytes());
            let own = u16::try_from(meta.own_pending.len()).map_err(|_| too_long())?;
            out.extend_from_slice(&own.to_be_bytes());
            for m in &meta.own_pending {
                let len = u8::try_from(m.len()).map_err(|_| too_long())?;
                out.push(len);
                out.extend_from_slice(m);
            }
        }
        Ok(out)
    }

    /// Writes the state to `path` atomically, mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let bytes = self.encode()?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| DEFAULT_STATE_FILE.to_owned());
        let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
        let io_err = |action, source| StateError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            // Make the rename itself durable.
            fs::File::open(&dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(|e| io_err("writing", e))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn state_round_trips_atomically_with_mode_0600() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(DEFAULT_STATE_FILE);
        assert!(matches!(
            ClientState::load(&path),
            Err(StateError::Missing(_))
        ));
        let mut state = ClientState::load_or_create(&path, Suite::Classical)?;
        state.name = Some("alice".into());
        state.inbox_cursor = 3;
        state.groups.insert(
            b"g1".to_vec(),
            GroupMeta {
                name: "friends".into(),
                cursor: 42,
                own_pending: vec![b"m1".to_vec(), b"m2".to_vec()],
            },
        );
        state
            .mls_identity()
            .key_packages(&state.mls, Suite::Classical, 2)?;
        state.save(&path)?;
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        let again = ClientState::load(&path)?;
        assert_eq!(again.identity().public(), state.identity().public());
        assert_eq!(again.name.as_deref(), Some("alice"));
        assert_eq!(again.suite, Suite::Classical);
        assert_eq!(again.inbox_cursor, 3);
        assert_eq!(again.groups, state.groups);
        // Same entries (the map's order may differ, so compare sizes and sorted bytes).
        let (a, b) = (again.mls.export_storage()?, state.mls.export_storage()?);
        assert_eq!(a.len(), b.len());
        let (mut a, mut b) = (a.to_vec(), b.to_vec());
        a.sort_unstable();
        b.sort_unstable();
        assert!(a == b, "MLS storage changed across save and load");
        // Only the state file is left in the directory.
        assert_eq!(fs::read_dir(dir.path())?.count(), 1);
        // A damaged file is reported, not half-read.
        let bytes = fs::read(&path)?;
        fs::write(&path, &bytes[..bytes.len() - 3])?;
        assert!(matches!(
            ClientState::load(&path),
            Err(StateError::Corrupt(_))
        ));
        Ok(())
    }
}
