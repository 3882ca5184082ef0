//! The Authentication Service's rules: which KeyPackages are accepted (valid, of an accepted
//! suite, the uploader's own), how often one identity may fetch another's, and when a pool is
//! low. Identities, names and KeyPackages are kept in the [`crate::store`].
//!
//! What it is not: the RPC face (`crate::rpc::auth` serves it to bound connections).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quicproquo_core::IdentityKey;
use quicproquo_core::mls::{KeyPackageChecker, MlsError, Suite};

use crate::obs::rates::RateLimitStats;
use crate::pool::{CpuPool, PoolError};

pub mod limiter;

use crate::store::{AnyStore, KeyPackageRecord};
use limiter::RateLimiter;

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
    /// Too many fetches of these targets' KeyPackages by this requester, or too many in
    /// total by this identity or from this address.
    #[error("too many KeyPackage fetches for this identity; retry later")]
    RateLimited,
    /// Too many binds (each may register a new identity) from this address.
    #[error("too many registrations from this address; retry later")]
    BindRateLimited,
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
    /// Fetches per (requester, target).
    pairs: RateLimiter<(IdentityKey, IdentityKey)>,
    /// Targets fetched per requester.
    requesters: RateLimiter<IdentityKey>,
    /// Targets fetched per source address.
    fetch_addresses: RateLimiter<IpAddr>,
    /// Binds per source address.
    bind_addresses: RateLimiter<IpAddr>,
    low_watermark: u32,
    refused: Arc<RateLimitStats>,
}

/// Per-identity and per-address rates, and how many keys each limiter tracks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateSettings {
    /// Binds (each may register a new identity) per source address per minute.
    pub binds_per_address: u32,
    /// KeyPackage targets one identity may fetch per minute, all targets together.
    pub fetches_per_identity: u32,
    /// KeyPackage targets fetched from one source address per minute.
    pub fetches_per_address: u32,
    /// Keys each limiter tracks at most (its memory bound).
    pub capacity: usize,
}

impl Default for RateSettings {
    fn default() -> Self {
        Self {
            binds_per_address: 120,
            fetches_per_identity: 2000,
            fetches_per_address: 10_000,
            capacity: 65_536,
        }
    }
}

impl AuthContext {
    /// The Authentication Service over `store`, with `settings` and `rates`, checking
    /// KeyPackages on `pool` and counting refusals in `refused`.
    pub fn new(
        store: AnyStore,
        settings: &AuthSettings,
        rates: &RateSettings,
        pool: CpuPool,
        refused: Arc<RateLimitStats>,
    ) -> Self {
        let minute = Duration::from_secs(60);
        Self {
            store,
            checker: Arc::new(KeyPackageChecker::new(&settings.suites)),
            pool,
            pairs: RateLimiter::new(settings.fetch_limit_per_minute, minute, rates.capacity),
            requesters: RateLimiter::new(rates.fetches_per_identity, minute, rates.capacity),
            fetch_addresses: RateLimiter::new(rates.fetches_per_address, minute, rates.capacity),
            bind_addresses: RateLimiter::new(rates.binds_per_address, minute, rates.capacity),
            low_watermark: settings.low_watermark,
            refused,
        }
    }

    /// Counts one bind from `address`, or refuses it when the address is over its rate
    /// (`None`: a peer without an address to count, never refused).
    pub fn admit_bind(&self, address: Option<IpAddr>) -> Result<(), AuthError> {
        match address {
            Some(a) if !self.bind_addresses.try_take(&a, 1, Instant::now()) => {
                self.refused.bind_address.fetch_add(1, Ordering::Relaxed);
                Err(AuthError::BindRateLimited)
            }
            _ => Ok(()),
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

    /// Counts one fetch by `requester` (from `address`) of each of `targets`' KeyPackages,
    /// or refuses the whole fetch (counting nothing) when the requester's total, the
    /// address's total or any (requester, target) pair is over its rate.
    pub fn admit_fetch(
        &self,
        requester: IdentityKey,
        address: Option<IpAddr>,
        targets: &[IdentityKey],
    ) -> Result<(), AuthError> {
        let now = Instant::now();
        let n = u32::try_from(targets.len()).unwrap_or(u32::MAX);
        let refuse = |counter: &AtomicU64| {
            counter.fetch_add(1, Ordering::Relaxed);
            Err(AuthError::RateLimited)
        };
        if !self.requesters.try_take(&requester, n, now) {
            return refuse(&self.refused.fetch_identity);
        }
        if let Some(a) = address
            && !self.fetch_addresses.try_take(&a, n, now)
        {
            self.requesters.give_back(&requester, n);
            return refuse(&self.refused.fetch_address);
        }
        let mut wanted: HashMap<IdentityKey, u32> = HashMap::new();
        for t in targets {
            *wanted.entry(*t).or_default() += 1;
        }
        let mut taken = Vec::with_capacity(wanted.len());
        for (t, k) in wanted {
            if self.pairs.try_take(&(requester, t), k, now) {
                taken.push((t, k));
                continue;
            }
            for (t, k) in taken {
                self.pairs.give_back(&(requester, t), k);
            }
            self.requesters.give_back(&requester, n);
            if let Some(a) = address {
                self.fetch_addresses.give_back(&a, n);
            }
            return refuse(&self.refused.fetch_pair);
        }
        Ok(())
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
        not_after: Some(checked.not_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicproquo_core::IdentityKeypair;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn fetches_are_limited_per_pair_per_identity_and_per_address() -> TestResult {
        let dir = tempfile::tempdir()?;
        let store = AnyStore::Embedded(crate::store::embedded::EmbeddedStore::open(
            &dir.path().join("s.redb"),
        )?);
        let settings = AuthSettings {
            fetch_limit_per_minute: 2,
            ..AuthSettings::default()
        };
        let rates = RateSettings {
            fetches_per_identity: 5,
            fetches_per_address: 7,
            binds_per_address: 1,
            capacity: 1024,
        };
        let refused = Arc::new(RateLimitStats::default());
        let ctx = AuthContext::new(
            store,
            &settings,
            &rates,
            CpuPool::new(1, 1, Arc::default())?,
            Arc::clone(&refused),
        );
        let id = || IdentityKeypair::generate().map(|k| k.public());
        let (a, b, c, d) = (id()?, id()?, id()?, id()?);
        let here: Option<IpAddr> = Some("192.0.2.1".parse()?);
        ctx.admit_fetch(a, here, &[b])?;
        ctx.admit_fetch(a, here, &[b, c])?;
        // b is at its pair limit for a: the batch is refused and c is not counted.
        assert!(ctx.admit_fetch(a, here, &[c, b]).is_err());
        assert_eq!(refused.fetch_pair.load(Ordering::Relaxed), 1);
        ctx.admit_fetch(a, here, &[c, d])?;
        // a has fetched 5 targets: its total is spent, whoever the targets.
        assert!(ctx.admit_fetch(a, here, &[d]).is_err());
        assert_eq!(refused.fetch_identity.load(Ordering::Relaxed), 1);
        // Another identity from the same address: 5 of the address's 7 are spent.
        ctx.admit_fetch(b, here, &[a, c])?;
        assert!(ctx.admit_fetch(b, here, &[d]).is_err());
        assert_eq!(refused.fetch_address.load(Ordering::Relaxed), 1);
        ctx.admit_fetch(b, Some("192.0.2.2".parse()?), &[d])?;
        // One bind per address per minute here.
        ctx.admit_bind(here)?;
        assert!(matches!(
            ctx.admit_bind(here),
            Err(AuthError::BindRateLimited)
        ));
        ctx.admit_bind(None)?;
        Ok(())
    }
}
