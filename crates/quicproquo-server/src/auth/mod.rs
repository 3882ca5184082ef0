//! The Authentication Service's rules: which KeyPackages are accepted (valid, of an accepted
//! suite, the uploader's own), how often one identity may fetch another's, and when a pool is
//! low. Identities, names and KeyPackages are kept in the [`crate::store`].
//!
//! What it is not: the RPC face (`crate::rpc::auth` serves it to bound connections).

use std::collections::HashMap;
use std::sync::PoisonError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quicproquo_core::IdentityKey;
use quicproquo_core::mls::{KeyPackageChecker, MlsError, Suite};

use crate::pool::{CpuPool, PoolError};
use crate::store::{AnyStore, KeyPackageRecord};

/// Most KeyPackages accepted in one upload.
pub const MAX_UPLOAD: usize = 256;
/// Most identities in one fetch (one commit adding a 1000-member group).
pub const MAX_FETCH: usize = 1000;

/// Why the Authentication Service refused a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The KeyPackage is invalid or of a suite this node does not accept.
    #[error("invalid KeyPackage: {0}")]
    BadKeyPackage(MlsError),
    /// The KeyPackage's credential is not the uploader's identity.
    #[error("KeyPackage credential is not the caller's identity")]
    WrongIdentity,
    /// Too many fetches of these targets' KeyPackages by this requester.
    #[error("too many KeyPackage fetches for this identity; retry later")]
    RateLimited,
    /// The CPU pool could not run the check (it shut down, or the check panicked).
    #[error("KeyPackage check failed to run: {0}")]
    Pool(PoolError),
}

/// Settings of the Authentication Service.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Ciphersuites whose KeyPackages are accepted.
    pub suites: Vec<Suite>,
    /// Fetches one identity may make of another identity's KeyPackages per minute.
    pub fetch_limit_per_minute: u32,
    /// Below this many pooled KeyPackages, `keyPackageCount` tells the client to top up.
    pub low_watermark: u32,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            suites: Suite::ALL.to_vec(),
            fetch_limit_per_minute: 30,
            low_watermark: 10,
        }
    }
}

/// The Authentication Service's rules, shared by every connection: KeyPackage validation,
/// the fetch rate per (requester, target), the top-up watermark.
pub struct AuthContext {
    store: AnyStore,
    checker: Arc<KeyPackageChecker>,
    pool: CpuPool,
    limiter: FetchLimiter,
    low_watermark: u32,
}

impl AuthContext {
    /// The Authentication Service over `store`, with `settings`, checking KeyPackages on
    /// `pool`.
    pub fn new(store: AnyStore, settings: &AuthSettings, pool: CpuPool) -> Self {
        Self {
            store,
            checker: Arc::new(KeyPackageChecker::new(&settings.suites)),
            pool,
            limiter: FetchLimiter::new(settings.fetch_limit_per_minute, Duration::from_secs(60)),
            low_watermark: settings.low_watermark,
        }
    }

    /// The store holding identities, names and KeyPackages.
    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// Checks, on the CPU pool, that every one of `packages` is a valid KeyPackage of an
    /// accepted suite whose credential is `owner`'s identity, and returns them ready to store
    /// (in order), or the first refusal.
    pub async fn check_key_packages(
        &self,
        owner: IdentityKey,
        packages: Vec<Vec<u8>>,
    ) -> Result<Vec<KeyPackageRecord>, AuthError> {
        let checker = Arc::clone(&self.checker);
        self.pool
            .run(move || {
                packages
                    .into_iter()
                    .map(|data| check_one(&checker, &owner, data))
                    .collect()
            })
            .await
            .map_err(AuthError::Pool)?
    }

    /// Counts one fetch by `requester` of each of `targets`' KeyPackages, or refuses the
    /// whole fetch (counting nothing) when any pair is over its rate.
    pub fn admit_fetch(
        &self,
        requester: IdentityKey,
        targets: &[IdentityKey],
    ) -> Result<(), AuthError> {
        if self.limiter.admit(requester, targets) {
            Ok(())
        } else {
            Err(AuthError::RateLimited)
        }
    }

    /// Whether a pool of `remaining` KeyPackages should be topped up.
    pub fn is_low(&self, remaining: u32) -> bool {
        remaining < self.low_watermark
    }
}

/// Checks one KeyPackage (see [`AuthContext::check_key_packages`]).
fn check_one(
    checker: &KeyPackageChecker,
    owner: &IdentityKey,
    data: Vec<u8>,
) -> Result<KeyPackageRecord, AuthError> {
    let checked = checker.check(&data).map_err(AuthError::BadKeyPackage)?;
    if checked.identity != *owner {
        return Err(AuthError::WrongIdentity);
    }
    Ok(KeyPackageRecord {
        hash_ref: checked.hash_ref,
        data,
    })
}

/// Fixed-window counters per (requester, target).
struct FetchLimiter {
    limit: u32,
    window: Duration,
    windows: Mutex<HashMap<(IdentityKey, IdentityKey), (Instant, u32)>>,
}

/// Above this many tracked pairs, expired windows are swept.
const LIMITER_SWEEP_AT: usize = 100_000;

impl FetchLimiter {
    fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one fetch of each target; refuses (counting nothing) if any pair is over limit.
    fn admit(&self, requester: IdentityKey, targets: &[IdentityKey]) -> bool {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if windows.len() > LIMITER_SWEEP_AT {
            windows.retain(|_, (start, _)| now.duration_since(*start) < self.window);
        }
        let mut wanted: HashMap<IdentityKey, u32> = HashMap::new();
        for t in targets {
            *wanted.entry(*t).or_default() += 1;
        }
        let over = wanted.iter().any(|(t, n)| {
            windows
                .get(&(requester, *t))
                .map_or(*n > self.limit, |(start, used)| {
                    let used = if now.duration_since(*start) >= self.window {
                        0
                    } else {
                        *used
                    };
                    used.saturating_add(*n) > self.limit
                })
        });
        if over {
            return false;
        }
        for (t, n) in wanted {
            let entry = windows.entry((requester, t)).or_insert((now, 0));
            if now.duration_since(entry.0) >= self.window {
                *entry = (now, 0);
            }
            entry.1 += n;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicproquo_core::IdentityKeypair;

    #[test]
    fn limiter_counts_per_pair_and_refuses_whole_batches() -> Result<(), Box<dyn std::error::Error>>
    {
        let l = FetchLimiter::new(2, Duration::from_secs(60));
        let (a, b, c) = (
            IdentityKeypair::generate()?.public(),
            IdentityKeypair::generate()?.public(),
            IdentityKeypair::generate()?.public(),
        );
        assert!(l.admit(a, &[b]));
        assert!(l.admit(a, &[b, c]));
        // b is at its limit for a; the batch is refused and c is not counted.
        assert!(!l.admit(a, &[c, b]));
        assert!(l.admit(a, &[c]));
        assert!(!l.admit(a, &[c]));
        // Other requesters have their own budget.
        assert!(l.admit(c, &[b, b]));
        let expired = FetchLimiter::new(1, Duration::ZERO);
        assert!(expired.admit(a, &[b]));
        assert!(expired.admit(a, &[b]));
        Ok(())
    }
}
