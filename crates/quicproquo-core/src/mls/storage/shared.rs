//! Public entities that many members in one process hold byte for byte, kept once.
//!
//! Every member of a group stores the group's ratchet tree after each epoch change, and at a
//! given epoch all of them store the same bytes: about 1.5 MB for a 1000-member group on the
//! hybrid suite. A process holding many members of the same groups (the load generator) gives
//! their stores one [`SharedValues`], and each such tree is then held once. Only public
//! entities are shared (they are not zeroized: nothing secret may go here).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};

/// Values shorter than this are not worth a lookup.
pub(super) const MIN_SHARED_BYTES: usize = 64 * 1024;

/// Bytes at each end of a value that pick its bucket (with its length); within a bucket a
/// full comparison decides.
const SAMPLE: usize = 4096;

/// Weak references to the values held, by bucket ([`fingerprint`]).
type Buckets = HashMap<u64, Vec<Weak<[u8]>>>;

/// A pool of shared public values for the [`CompactStorage`](super::CompactStorage)s of one
/// process (cheap to clone: every clone is the same pool). It holds only weak references:
/// a value lives as long as a store holds it.
#[derive(Clone, Default)]
pub struct SharedValues {
    buckets: Arc<Mutex<Buckets>>,
}

impl std::fmt::Debug for SharedValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedValues").finish_non_exhaustive()
    }
}

impl SharedValues {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// The pool's copy of `bytes`: one held already, or `bytes`, now in the pool. Values no
    /// store holds any more are forgotten on the way (a weak reference keeps its allocation).
    pub(super) fn intern(&self, bytes: &[u8]) -> Arc<[u8]> {
        let Ok(mut buckets) = self.buckets.lock() else {
            // A thread panicked while holding the pool: keep this value to itself.
            return Arc::from(bytes);
        };
        buckets.retain(|_, values| {
            values.retain(|v| v.strong_count() > 0);
            !values.is_empty()
        });
        let values = buckets.entry(fingerprint(bytes)).or_default();
        if let Some(held) = values
            .iter()
            .filter_map(Weak::upgrade)
            .find(|v| v[..] == *bytes)
        {
            return held;
        }
        let value: Arc<[u8]> = Arc::from(bytes);
        values.push(Arc::downgrade(&value));
        value
    }

    /// How many distinct values the pool holds.
    pub fn len(&self) -> usize {
        self.buckets.lock().map_or(0, |b| {
            b.values()
                .flatten()
                .filter(|v| v.strong_count() > 0)
                .count()
        })
    }

    /// Whether the pool holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The bucket of `bytes`: its length and the bytes at both ends.
fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.len().hash(&mut h);
    bytes[..bytes.len().min(SAMPLE)].hash(&mut h);
    bytes[bytes.len().saturating_sub(SAMPLE)..].hash(&mut h);
    h.finish()
}
