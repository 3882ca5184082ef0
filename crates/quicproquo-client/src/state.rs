//! The device's state file (`qpq-state.bin`): identity key, user name, ciphersuite, groups'
//! metadata and the MLS secrets (KeyPackage private keys, group state).
//!
//! A save appends one frame holding only what changed since the previous save (the MLS storage
//! entries openmls wrote or deleted, and the metadata if it changed), then fsyncs: its cost
//! follows the change, not the state's size. A frame is checked (SHA-256) and replayed only
//! whole, so a write torn by a crash loses nothing that an earlier save acknowledged. When the
//! appended frames outgrow the state, or after a torn write, the next save rewrites the file
//! compactly (a temporary file in the same directory, fsynced, renamed over the old one). The
//! file is mode 0600 and secrets are zeroized in memory when dropped. The layout is in [`log`].
//!
//! Superseded MLS secrets stay in the file until the next compaction, at most as many bytes as
//! the state itself (64 KiB for a small one).

mod log;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use quicproquo_core::mls::{MlsError, MlsIdentity, MlsProvider, Suite};
use quicproquo_core::{IdentityKeypair, KeyError};
use zeroize::Zeroizing;

/// Default state file name.
pub const DEFAULT_STATE_FILE: &str = "qpq-state.bin";

/// Frames appended since the last compaction may grow to this many bytes, or to the size of the
/// compact state if larger, before a save compacts the file.
const MIN_COMPACTION_SLACK: u64 = 64 * 1024;

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
    /// The file is not a state file, or is damaged before its last save.
    #[error("{0} is not a valid qpq state file")]
    Corrupt(PathBuf),
    /// The file is a state file of a version this client does not read.
    #[error(
        "{path} is a qpq state file of version {version}; this qpq reads version {} only \
         (a device's state from an older qpq cannot be carried over: register a new device)",
        log::VERSION
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The version it declares.
        version: u32,
    },
    /// Another process holds the state (see [`StateLock`]).
    #[error(
        "{0} is in use by another qpq process (one at a time per state file: a running \
         `recv --follow` holds it until it stops)"
    )]
    InUse(PathBuf),
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

/// How the file on disk relates to the state in memory.
#[derive(Debug, Default)]
struct OnDisk {
    /// The file that holds the state as of the last save (or load), frames appendable; `None`
    /// when no file is known to (a new state, a failed save, a torn last frame).
    path: Option<PathBuf>,
    /// That file, open for appending.
    file: Option<File>,
    /// Bytes of the file at its last compaction.
    compact_len: u64,
    /// Bytes appended since.
    appended: u64,
    /// The metadata as last written.
    meta: Vec<u8>,
}

/// An exclusive hold on a state file for one process (an advisory lock on `PATH.lock`), released
/// when dropped or when the process exits. Saves append what changed since the saver's own last
/// save, so two processes saving one state file would interleave changes made from different
/// states: a process that writes the state takes this first.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the hold on the state file at `path`, or fails at once with
    /// [`StateError::InUse`] if another process has it.
    pub fn acquire(path: &Path) -> Result<Self, StateError> {
        let mut name = path.as_os_str().to_owned();
        name.push(".lock");
        let lock_path = PathBuf::from(name);
        let io_error = |source| StateError::Io {
            action: "locking",
            path: lock_path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_error)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(StateError::InUse(path.to_owned())),
            Err(fs::TryLockError::Error(e)) => Err(io_error(e)),
        }
    }
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
    on_disk: Mutex<OnDisk>,
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

fn suite_byte(suite: Suite) -> u8 {
    match suite {
        Suite::Classical => 2,
        _ => 1,
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
            on_disk: Mutex::default(),
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

    /// Reads the state at `path`. A last frame torn by a crash is ignored (the state is that of
    /// the save before it) and the next save rewrites the file.
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
        let corrupt = || StateError::Corrupt(path.to_owned());
        let replayed = log::replay(&bytes).map_err(|e| match e {
            log::Unreadable::Corrupt => corrupt(),
            log::Unreadable::Version(version) => StateError::Version {
                path: path.to_owned(),
                version,
            },
        })?;
        let (seed, suite) = replayed.identity.ok_or_else(corrupt)?;
        let suite = match suite {
            1 => Suite::Hybrid,
            2 => Suite::Classical,
            _ => return Err(corrupt()),
        };
        let meta = replayed.meta.unwrap_or_default();
        let (name, inbox_cursor, groups) = decode_meta(&meta).ok_or_else(corrupt)?;
        let identity = IdentityKeypair::from_seed(&seed);
        let on_disk = OnDisk {
            path: (!replayed.torn).then(|| path.to_owned()),
            file: None,
            compact_len: bytes.len() as u64,
            appended: 0,
            meta,
        };
        Ok(Self {
            mls_identity: MlsIdentity::new(&identity),
            identity,
            name,
            suite,
            mls: MlsProvider::from_entries(replayed.mls),
            groups,
            inbox_cursor,
            on_disk: Mutex::new(on_disk),
        })
    }

    /// Reads the state at `path`, or starts a new device if there is none.
    pub fn load_or_create(path: &Path, suite: Suite) -> Result<Self, StateError> {
        match Self::load(path) {
            Err(StateError::Missing(_)) => Self::create(suite),
            other => other,
        }
    }

    /// Saves the state to `path`, mode 0600: appends what changed since the last save (or
    /// load) of this state to the same file and fsyncs it, or writes the whole file atomically
    /// if it is another file, after a torn or failed write, or once the appended frames
    /// outgrow the state. When it returns, the state is durable.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let mut disk = self.on_disk.lock().map_err(|_| self.poisoned(path))?;
        let changes = self.mls.take_changes()?;
        let meta = self.encode_meta()?;
        let slack = disk.compact_len.max(MIN_COMPACTION_SLACK);
        if disk.path.as_deref() != Some(path) || disk.appended > slack {
            return self.rewrite(path, &mut disk, meta);
        }
        let mut body = log::Body::with_capacity(
            changes
                .iter()
                .map(|c| 7 + c.key.len() + c.value.as_ref().map_or(0, |v| v.len()))
                .sum::<usize>()
                + meta.len()
                + 5,
        );
        let too_large = || StateError::Mls(MlsError::CorruptState);
        for change in &changes {
            match &change.value {
                Some(v) => body.put(&change.key, v),
                None => body.delete(&change.key),
            }
            .ok_or_else(too_large)?;
        }
        if meta != disk.meta {
            body.meta(&meta).ok_or_else(too_large)?;
        }
        if body.is_empty() {
            return Ok(());
        }
        let frame = body.into_frame().ok_or_else(too_large)?;
        let appended = (|| {
            if disk.file.is_none() {
                disk.file = Some(OpenOptions::new().append(true).open(path)?);
            }
            let file = disk.file.as_mut().ok_or(io::ErrorKind::NotFound)?;
            file.write_all(&frame)?;
            file.sync_data()
        })();
        if let Err(source) = appended {
            // What was taken from the journal is not on disk: the next save rewrites it all.
            disk.path = None;
            disk.file = None;
            return Err(StateError::Io {
                action: "appending to",
                path: path.to_owned(),
                source,
            });
        }
        disk.appended += frame.len() as u64;
        disk.meta = meta;
        Ok(())
    }

    /// Rewrites the whole state to `path` compactly and atomically, mode 0600, dropping the
    /// superseded entries that appended saves left behind.
    pub fn compact(&self, path: &Path) -> Result<(), StateError> {
        let mut disk = self.on_disk.lock().map_err(|_| self.poisoned(path))?;
        self.mls.take_changes()?;
        let meta = self.encode_meta()?;
        self.rewrite(path, &mut disk, meta)
    }

    fn poisoned(&self, path: &Path) -> StateError {
        StateError::Io {
            action: "saving",
            path: path.to_owned(),
            source: io::Error::other("an earlier save panicked"),
        }
    }

    fn rewrite(&self, path: &Path, disk: &mut OnDisk, meta: Vec<u8>) -> Result<(), StateError> {
        disk.path = None;
        disk.file = None;
        let entries = self.mls.entries()?;
        let size = entries
            .iter()
            .map(|(k, v)| 7 + k.len() + v.len())
            .sum::<usize>();
        let mut body = log::Body::with_capacity(40 + meta.len() + size);
        let too_large = || StateError::Mls(MlsError::CorruptState);
        body.identity(&self.identity.seed(), suite_byte(self.suite));
        body.meta(&meta).ok_or_else(too_large)?;
        for (k, v) in &entries {
            body.put(k, v).ok_or_else(too_large)?;
        }
        let frame = body.into_frame().ok_or_else(too_large)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| DEFAULT_STATE_FILE.to_owned());
        let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&log::header())?;
            f.write_all(&frame)?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            // Make the rename itself durable.
            File::open(&dir)?.sync_all()?;
            Ok::<_, io::Error>(f)
        })();
        match written {
            Ok(file) => {
                *disk = OnDisk {
                    path: Some(path.to_owned()),
                    file: Some(file),
                    compact_len: (log::HEADER_LEN + frame.len()) as u64,
                    appended: 0,
                    meta,
                };
                Ok(())
            }
            Err(source) => {
                let _ = fs::remove_file(&tmp);
                Err(StateError::Io {
                    action: "writing",
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }

    /// `name_len u16 | name | inbox cursor u64 | group count u32 | groups`, each group being
    /// `id_len u16 | id | name_len u16 | name | cursor u64 | own count u16 | (len u8 | id)*`.
    fn encode_meta(&self) -> Result<Vec<u8>, StateError> {
        let too_long = || StateError::Mls(MlsError::CorruptState);
        let name = self.name.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(64 + name.len() + 64 * self.groups.len());
        let name_len = u16::try_from(name.len()).map_err(|_| too_long())?;
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&self.inbox_cursor.to_be_bytes());
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
}

/// The user name, inbox cursor and groups of [`ClientState::encode_meta`] output.
type Meta = (Option<String>, u64, BTreeMap<Vec<u8>, GroupMeta>);

fn decode_meta(bytes: &[u8]) -> Option<Meta> {
    if bytes.is_empty() {
        return Some((None, 0, BTreeMap::new()));
    }
    let mut r = bytes;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = r.split_at_checked(n)?;
        r = tail;
        Some(head)
    };
    let name_len = usize::from(u16::from_be_bytes(take(2)?.try_into().ok()?));
    let name = String::from_utf8(take(name_len)?.to_vec()).ok()?;
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
    Some(((!name.is_empty()).then_some(name), inbox_cursor, groups))
}

#[cfg(test)]
mod tests;
