//! A rate limiter of bounded memory: token buckets per key in a fixed number of shards, each
//! holding at most a fixed number of keys.
//!
//! A call locks one shard (chosen by the key's hash), never a process-wide table, and never
//! scans more than its shard. A shard that is full when a new key arrives first forgets the
//! keys whose buckets have refilled (they are indistinguishable from new ones), then, if
//! none has, the key it touched least recently. Memory is therefore fixed by the capacity,
//! whatever keys callers invent.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Shards of every limiter (a power of two).
const SHARDS: usize = 64;

/// One key's bucket: tokens left as of `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets of `burst` tokens refilled at `burst` per `window`, per key.
#[derive(Debug)]
pub struct RateLimiter<K> {
    shards: Vec<Mutex<HashMap<K, Bucket>>>,
    per_shard: usize,
    burst: f64,
    per_second: f64,
    hasher: RandomState,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// At most `limit` takes per `window` per key (all of them at once, as a burst), for at
    /// most `capacity` keys tracked at once.
    pub fn new(limit: u32, window: Duration, capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_capacity(per_shard.min(1024))))
                .collect(),
            per_shard,
            burst: f64::from(limit),
            per_second: f64::from(limit) / window.as_secs_f64().max(f64::MIN_POSITIVE),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, HashMap<K, Bucket>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        (b.tokens + elapsed * self.per_second).min(self.burst)
    }

    /// Takes `n` tokens of `key`'s bucket at `now`, or none when fewer are left.
    pub fn try_take(&self, key: &K, n: u32, now: Instant) -> bool {
        let n = f64::from(n);
        let mut shard = self.shard(key);
        if let Some(b) = shard.get_mut(key) {
            let tokens = self.refilled(*b, now);
            if tokens < n {
                return false;
            }
            *b = Bucket {
                tokens: tokens - n,
                at: now,
            };
            return true;
        }
        if n > self.burst {
            return false;
        }
        if shard.len() >= self.per_shard {
            shard.retain(|_, b| self.refilled(*b, now) < self.burst);
            if shard.len() >= self.per_shard
                && let Some(oldest) = shard
                    .iter()
                    .min_by_key(|(_, b)| b.at)
                    .map(|(k, _)| k.clone())
            {
                shard.remove(&oldest);
            }
        }
        shard.insert(
            key.clone(),
            Bucket {
                tokens: self.burst - n,
                at: now,
            },
        );
        true
    }

    /// Gives back `n` tokens taken from `key` (a batch refused as a whole after part of it
    /// was counted).
    pub fn give_back(&self, key: &K, n: u32) {
        if let Some(b) = self.shard(key).get_mut(key) {
            b.tokens = (b.tokens + f64::from(n)).min(self.burst);
        }
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_burst_then_refills_with_time() {
        let l = RateLimiter::new(3, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        assert!(l.try_take(&1u32, 2, t0));
        assert!(l.try_take(&1, 1, t0));
        assert!(!l.try_take(&1, 1, t0), "burst spent");
        assert!(l.try_take(&2, 3, t0), "another key has its own bucket");
        assert!(
            l.try_take(&1, 1, t0 + Duration::from_secs(20)),
            "one refilled"
        );
        assert!(!l.try_take(&1, 1, t0 + Duration::from_secs(21)));
        l.give_back(&1, 1);
        assert!(l.try_take(&1, 1, t0 + Duration::from_secs(21)));
        assert!(!l.try_take(&3, 4, t0), "more than a burst never passes");
    }

    #[test]
    fn memory_stays_bounded_whatever_keys_arrive() {
        let capacity = 640;
        let l = RateLimiter::new(5, Duration::from_secs(60), capacity);
        let t0 = Instant::now();
        for k in 0..100_000u32 {
            assert!(
                l.try_take(&k, 1, t0),
                "a new key always starts with a burst"
            );
        }
        assert!(l.len() <= capacity, "{} keys tracked", l.len());
        // A key that spent its burst just now is among the most recent: still limited.
        for _ in 0..4 {
            assert!(l.try_take(&u32::MAX, 1, t0));
        }
        assert!(l.try_take(&u32::MAX, 1, t0));
        assert!(!l.try_take(&u32::MAX, 1, t0));
    }
}
