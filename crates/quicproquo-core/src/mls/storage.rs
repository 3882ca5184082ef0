//! The client's openmls storage: every entity in a compact binary encoding, secrets in
//! zeroizing buffers, and a journal of the entries changed since the last save.
//!
//! openmls writes a group's message secrets after every decryption. Its in-memory store encodes
//! each entity as JSON (every secret byte a decimal number, every empty tree slot `null`), which
//! made that write the larger part of a member's decryption in a large group. Here each entity is
//! postcard-encoded (integers as varints; [`encode`] writes openmls's byte strings in one pass)
//! into a buffer that is wiped when it is replaced, grown or dropped (as a slice, not byte by
//! byte: see [`secret`]). The one exception is the group's join configuration, whose openmls decoder
//! needs a self-describing format: it stays JSON (it is tiny, holds no secret and is written
//! only when a group is created or joined).
//!
//! Keys are `label u8` followed by the postcard encoding of openmls's key (a group id, a hash
//! reference, a public key, or a tuple of them). Lists (own leaf nodes, the proposal queue) are
//! stored as `(len u32 BE, item)*` so that an append never decodes the list.
//!
//! Stores given one [`SharedValues`] hold each large ratchet tree they have in common once
//! (see [`shared`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use encode::encode_into;
use secret::SecretBytes;

/// Errors of [`CompactStorage`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An openmls entity or key could not be encoded.
    #[error("encoding an MLS entity failed")]
    Encode,
    /// A stored value does not decode as the entity openmls asked for.
    #[error("a stored MLS entity does not decode")]
    Decode,
    /// A thread panicked while holding the store's lock.
    #[error("the MLS store's lock was poisoned")]
    Poisoned,
}

/// What an entry key is for: its first byte.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum Label {
    JoinConfig = 1,
    OwnLeafNodes = 2,
    QueuedProposal = 3,
    ProposalRefs = 4,
    Tree = 5,
    InterimTranscriptHash = 6,
    Context = 7,
    ConfirmationTag = 8,
    GroupState = 9,
    MessageSecrets = 10,
    ResumptionPskStore = 11,
    OwnLeafIndex = 12,
    EpochSecrets = 13,
    SignatureKeyPair = 14,
    EncryptionKeyPair = 15,
    EpochKeyPairs = 16,
    KeyPackage = 17,
    Psk = 18,
}

/// A stored value: zeroized when dropped.
pub type Value = Zeroizing<Vec<u8>>;

/// One entry changed since the last [`CompactStorage::take_changes`]: its key, and its value
/// now (`None`: deleted).
#[derive(Debug)]
pub struct Change {
    /// The entry's key.
    pub key: Vec<u8>,
    /// The entry's new value, or `None` if it was deleted.
    pub value: Option<Value>,
}

/// A value as held: the store's own, or a public one shared through [`SharedValues`].
enum Stored {
    Own(SecretBytes),
    Shared(Arc<[u8]>),
}

impl Stored {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Own(v) => v,
            Self::Shared(v) => v,
        }
    }

    /// A copy of the value to hand out.
    fn to_value(&self) -> Value {
        Zeroizing::new(self.bytes().to_vec())
    }
}

#[derive(Default)]
struct Inner {
    values: HashMap<Vec<u8>, Stored>,
    changed: HashSet<Vec<u8>>,
}

/// The client's openmls [`StorageProvider`](openmls_traits::storage::StorageProvider): compact
/// binary entities in memory, with a journal of changed keys so that a persisted copy can be
/// updated with only what changed.
#[derive(Default)]
pub struct CompactStorage {
    inner: RwLock<Inner>,
    /// Where large public values go to be held once, if anywhere.
    shared: Option<SharedValues>,
}

impl std::fmt::Debug for CompactStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries = self.inner.read().map(|i| i.values.len()).ok();
        f.debug_struct("CompactStorage")
            .field("entries", &entries)
            .finish_non_exhaustive()
    }
}

/// Bytes beyond a replaced value's length (and an eighth of it) that a new one gets room for.
const SLACK: usize = 64;

/// The postcard encoding of `value` in a fresh wiped-on-drop buffer of `capacity` bytes.
fn encode<T: Serialize + ?Sized>(value: &T, capacity: usize) -> Result<SecretBytes, StorageError> {
    let mut out = SecretBytes::with_capacity(capacity);
    encode_into(value, &mut out)?;
    Ok(out)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|_| StorageError::Decode)
}

fn key<K: Serialize + ?Sized>(label: Label, k: &K) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::with_capacity(48);
    out.push(label as u8);
    encode_into(k, &mut out)?;
    Ok(out)
}

/// The items of a stored list, each still encoded.
fn list_items(mut bytes: &[u8]) -> Result<Vec<&[u8]>, StorageError> {
    let mut items = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes.split_at_checked(4).ok_or(StorageError::Decode)?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let (item, rest) = rest.split_at_checked(len).ok_or(StorageError::Decode)?;
        items.push(item);
        bytes = rest;
    }
    Ok(items)
}

fn push_item(list: &mut Vec<u8>, item: &[u8]) -> Result<(), StorageError> {
    let len = u32::try_from(item.len()).map_err(|_| StorageError::Encode)?;
    encode::reserve(list, 4 + item.len());
    list.extend_from_slice(&len.to_be_bytes());
    list.extend_from_slice(item);
    Ok(())
}

impl CompactStorage {
    fn write_inner(&self) -> Result<std::sync::RwLockWriteGuard<'_, Inner>, StorageError> {
        self.inner.write().map_err(|_| StorageError::Poisoned)
    }

    fn read_inner(&self) -> Result<std::sync::RwLockReadGuard<'_, Inner>, StorageError> {
        self.inner.read().map_err(|_| StorageError::Poisoned)
    }

    /// An empty store whose large ratchet trees are held once in `shared`, with those of
    /// every other store given the same pool.
    pub fn sharing(shared: SharedValues) -> Self {
        Self {
            inner: RwLock::default(),
            shared: Some(shared),
        }
    }

    /// Stores `value` under `key`, replacing (and zeroizing) what was there.
    fn put<T: Serialize + ?Sized>(&self, key: Vec<u8>, value: &T) -> Result<(), StorageError> {
        let mut inner = self.write_inner()?;
        // Room for the value it replaces and an eighth more: the encoder reserves a varint's
        // worst case before writing one, entries such as the message secrets grow a little
        // with each new sender, and growing moves (and zeroizes) the whole buffer.
        let capacity = inner.values.get(&key).map_or(256, |v| {
            let len = v.bytes().len();
            len + len / 8 + SLACK
        });
        let value = encode(value, capacity)?;
        let stored = match &self.shared {
            // The ratchet tree is public: it may be shared, unzeroized.
            Some(pool)
                if key.first() == Some(&(Label::Tree as u8))
                    && value.len() >= shared::MIN_SHARED_BYTES =>
            {
                Stored::Shared(pool.intern(&value))
            }
            _ => Stored::Own(value),
        };
        inner.changed.insert(key.clone());
        inner.values.insert(key, stored);
        Ok(())
    }

    fn put_raw(&self, key: Vec<u8>, value: SecretBytes) -> Result<(), StorageError> {
        let mut inner = self.write_inner()?;
        inner.changed.insert(key.clone());
        inner.values.insert(key, Stored::Own(value));
        Ok(())
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let inner = self.read_inner()?;
        inner.values.get(key).map(|v| decode(v.bytes())).transpose()
    }

    fn delete(&self, key: Vec<u8>) -> Result<(), StorageError> {
        let mut inner = self.write_inner()?;
        if inner.values.remove(&key).is_some() {
            inner.changed.insert(key);
        }
        Ok(())
    }

    /// Appends the encoding of `item` to the list under `key`.
    fn append<T: Serialize + ?Sized>(&self, key: Vec<u8>, item: &T) -> Result<(), StorageError> {
        let item = encode(item, 256)?;
        let mut inner = self.write_inner()?;
        let list = inner
            .values
            .entry(key.clone())
            .or_insert_with(|| Stored::Own(SecretBytes::default()));
        if let Stored::Shared(v) = list {
            *list = Stored::Own(SecretBytes::from(v.to_vec()));
        }
        if let Stored::Own(list) = list {
            push_item(list, &item)?;
        }
        inner.changed.insert(key);
        Ok(())
    }

    fn list<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Vec<T>, StorageError> {
        let inner = self.read_inner()?;
        match inner.values.get(key) {
            Some(v) => list_items(v.bytes())?.into_iter().map(decode).collect(),
            None => Ok(Vec::new()),
        }
    }

    /// Removes every item of the list under `key` whose encoding is `item`.
    fn remove_from_list(&self, key: Vec<u8>, item: &[u8]) -> Result<(), StorageError> {
        let mut inner = self.write_inner()?;
        let Some(list) = inner.values.get(&key) else {
            return Ok(());
        };
        let list = list.bytes();
        let mut kept = SecretBytes::with_capacity(list.len());
        for other in list_items(list)? {
            if other != item {
                push_item(&mut kept, other)?;
            }
        }
        inner.values.insert(key.clone(), Stored::Own(kept));
        inner.changed.insert(key);
        Ok(())
    }

    /// The entries changed (written or deleted) since the last call, each with its value now;
    /// the journal is then empty.
    pub fn take_changes(&self) -> Result<Vec<Change>, StorageError> {
        let mut inner = self.write_inner()?;
        let changed = std::mem::take(&mut inner.changed);
        Ok(changed
            .into_iter()
            .map(|key| {
                let value = inner.values.get(&key).map(Stored::to_value);
                Change { key, value }
            })
            .collect())
    }

    /// Every entry, sorted by key.
    pub fn entries(&self) -> Result<Vec<(Vec<u8>, Value)>, StorageError> {
        let inner = self.read_inner()?;
        let mut all: Vec<_> = inner
            .values
            .iter()
            .map(|(k, v)| (k.clone(), v.to_value()))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    /// A store holding `entries`, with an empty journal.
    pub fn from_entries(entries: impl IntoIterator<Item = (Vec<u8>, Value)>) -> Self {
        Self {
            inner: RwLock::new(Inner {
                values: entries
                    .into_iter()
                    .map(|(k, mut v)| (k, Stored::Own(SecretBytes::from(std::mem::take(&mut *v)))))
                    .collect(),
                changed: HashSet::new(),
            }),
            shared: None,
        }
    }
}

mod encode;
mod provider;
mod secret;
pub mod shared;

pub use shared::SharedValues;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_append_remove_and_clear_through_the_journal() -> Result<(), StorageError> {
        let s = CompactStorage::default();
        let k = key(Label::ProposalRefs, &b"group".to_vec())?;
        for item in [
            b"a".to_vec(),
            b"bb".to_vec(),
            b"a".to_vec(),
            b"ccc".to_vec(),
        ] {
            s.append(k.clone(), &item)?;
        }
        assert_eq!(
            s.list::<Vec<u8>>(&k)?,
            [&b"a"[..], b"bb", b"a", b"ccc"].map(<[u8]>::to_vec)
        );
        s.remove_from_list(k.clone(), &encode(&b"a".to_vec(), 8)?)?;
        assert_eq!(
            s.list::<Vec<u8>>(&k)?,
            [&b"bb"[..], b"ccc"].map(<[u8]>::to_vec)
        );
        let changes = s.take_changes()?;
        assert_eq!(changes.len(), 1);
        assert!(s.take_changes()?.is_empty());
        s.delete(k.clone())?;
        let changes = s.take_changes()?;
        assert!(changes.len() == 1 && changes[0].key == k && changes[0].value.is_none());
        assert!(s.list::<Vec<u8>>(&k)?.is_empty());
        // Deleting what is not there changes nothing.
        s.delete(k)?;
        assert!(s.take_changes()?.is_empty());
        Ok(())
    }

    #[test]
    fn a_value_of_the_wrong_shape_is_a_decode_error() -> Result<(), StorageError> {
        let s = CompactStorage::default();
        let k = key(Label::Tree, &b"g".to_vec())?;
        s.put_raw(k.clone(), SecretBytes::from(vec![0xff; 3]))?;
        assert!(matches!(s.get::<Vec<u8>>(&k), Err(StorageError::Decode)));
        s.put_raw(k.clone(), SecretBytes::from(vec![0, 0, 0, 9, 1]))?;
        assert!(matches!(s.list::<Vec<u8>>(&k), Err(StorageError::Decode)));
        Ok(())
    }

    #[test]
    fn stores_given_one_pool_hold_a_large_tree_once() -> Result<(), StorageError> {
        let pool = SharedValues::new();
        let (a, b) = (
            CompactStorage::sharing(pool.clone()),
            CompactStorage::sharing(pool.clone()),
        );
        let tree = vec![5u8; 2 * shared::MIN_SHARED_BYTES];
        let k = key(Label::Tree, &b"g".to_vec())?;
        a.put(k.clone(), &tree)?;
        b.put(k.clone(), &tree)?;
        assert_eq!(pool.len(), 1, "the same tree is held once");
        assert_eq!(b.get::<Vec<u8>>(&k)?, Some(tree.clone()));
        let saved = a.take_changes()?.pop().and_then(|c| c.value);
        let saved = saved.ok_or(StorageError::Decode)?;
        assert_eq!(
            decode::<Vec<u8>>(&saved)?,
            tree,
            "a shared value is saved whole"
        );
        // Another tree (the next epoch) is another value; secrets are never shared.
        let mut next = tree.clone();
        next[shared::MIN_SHARED_BYTES] = 6;
        b.put(k.clone(), &next)?;
        a.put(key(Label::MessageSecrets, &b"g".to_vec())?, &tree)?;
        assert_eq!(pool.len(), 2);
        assert_eq!(a.get::<Vec<u8>>(&k)?, Some(tree));
        drop(a);
        assert_eq!(pool.len(), 1, "a tree no store holds is let go");
        drop(b);
        assert!(pool.is_empty());
        // A small tree is not worth sharing.
        let c = CompactStorage::sharing(pool.clone());
        c.put(k, &vec![1u8; 100])?;
        assert!(pool.is_empty());
        // Nor is anything but a tree, however large (message secrets are secret).
        let secrets = vec![9u8; 2 * shared::MIN_SHARED_BYTES];
        c.put(key(Label::MessageSecrets, &b"g".to_vec())?, &secrets)?;
        assert!(pool.is_empty(), "only trees are shared");
        Ok(())
    }

    #[test]
    fn growing_a_buffer_keeps_its_contents() -> Result<(), StorageError> {
        let mut out = Vec::with_capacity(2);
        let big = vec![7u8; 1000];
        encode_into(&big, &mut out)?;
        assert_eq!(decode::<Vec<u8>>(&out)?, big);
        Ok(())
    }
}
