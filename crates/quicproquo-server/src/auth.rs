//! The Authentication Service, served to a connection once it has bound its identity.
//!
//! Every method acts for the bound identity only: uploads are checked to be the caller's own
//! KeyPackages, counts are the caller's, and fetches are limited per (caller, target) pair so
//! nobody can drain someone else's pool.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use quicproquo_core::IdentityKey;
use quicproquo_core::mls::{KeyPackageChecker, MlsError, Suite};
use quicproquo_proto::auth_capnp::authentication_service;
use quicproquo_proto::errors::{ErrorCode, error};
use tracing::warn;

use crate::ops::spans::trace_of;
use crate::rpc::InFlight;
use crate::store::{AnyStore, KeyPackageRecord, Store, StoreError, UserName};

/// Most KeyPackages accepted in one upload.
pub const MAX_UPLOAD: usize = 256;
/// Most identities in one fetch (one commit adding a 1000-member group).
pub const MAX_FETCH: usize = 1000;

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

/// What every connection's Authentication Service shares.
pub(crate) struct AuthContext {
    pub(crate) store: AnyStore,
    checker: KeyPackageChecker,
    limiter: FetchLimiter,
    low_watermark: u32,
}

impl AuthContext {
    pub(crate) fn new(store: AnyStore, settings: &AuthSettings) -> Self {
        Self {
            store,
            checker: KeyPackageChecker::new(&settings.suites),
            limiter: FetchLimiter::new(settings.fetch_limit_per_minute, Duration::from_secs(60)),
            low_watermark: settings.low_watermark,
        }
    }
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

pub(crate) fn store_error(e: StoreError) -> capnp::Error {
    match e {
        StoreError::NameTaken => error(ErrorCode::NameTaken, e),
        StoreError::AlreadyNamed => error(ErrorCode::AlreadyNamed, e),
        StoreError::InvalidName => error(ErrorCode::InvalidName, e),
        StoreError::UnknownIdentity => error(ErrorCode::UnknownIdentity, e),
        StoreError::Unavailable(_) => {
            warn!(error = %e, "store unavailable");
            error(ErrorCode::Unavailable, "store unavailable; retry")
        }
        _ => {
            warn!(error = %e, "store error");
            error(ErrorCode::Internal, "internal error")
        }
    }
}

/// Parses and normalises a user name sent by a client.
fn user_name(text: capnp::text::Reader<'_>) -> Result<UserName, capnp::Error> {
    let raw = text
        .to_str()
        .map_err(|_| error(ErrorCode::InvalidName, "user name is not UTF-8"))?;
    UserName::parse(raw).map_err(store_error)
}

/// Parses a list of at most [`MAX_FETCH`] identity keys.
fn identity_list(list: capnp::data_list::Reader<'_>) -> Result<Vec<IdentityKey>, capnp::Error> {
    if list.len() as usize > MAX_FETCH {
        return Err(error(
            ErrorCode::InvalidArgument,
            format!("at most {MAX_FETCH} identities per call"),
        ));
    }
    list.iter()
        .map(|id| IdentityKey::from_slice(id?).map_err(|e| error(ErrorCode::InvalidArgument, e)))
        .collect()
}

fn key_package_error(e: &MlsError) -> capnp::Error {
    error(ErrorCode::BadKeyPackage, e)
}

/// The Authentication Service of one bound connection.
pub(crate) struct AuthService {
    identity: IdentityKey,
    ctx: Arc<AuthContext>,
    in_flight: Rc<InFlight>,
}

impl AuthService {
    pub(crate) fn new(
        identity: IdentityKey,
        ctx: Arc<AuthContext>,
        in_flight: Rc<InFlight>,
    ) -> Self {
        Self {
            identity,
            ctx,
            in_flight,
        }
    }

    fn check_upload(&self, data: &[u8]) -> Result<KeyPackageRecord, capnp::Error> {
        let checked = self
            .ctx
            .checker
            .check(data)
            .map_err(|e| key_package_error(&e))?;
        if checked.identity != self.identity {
            return Err(error(
                ErrorCode::WrongIdentity,
                "KeyPackage credential is not the caller's identity",
            ));
        }
        Ok(KeyPackageRecord {
            hash_ref: checked.hash_ref,
            data: data.to_vec(),
        })
    }
}

impl authentication_service::Server for AuthService {
    async fn upload_key_packages(
        self: Rc<Self>,
        params: authentication_service::UploadKeyPackagesParams,
        mut results: authentication_service::UploadKeyPackagesResults,
    ) -> Result<(), capnp::Error> {
        let trace = trace_of(params.get().and_then(|p| p.get_trace()));
        let in_flight = Rc::clone(&self.in_flight);
        in_flight
            .serve(
                "AuthenticationService",
                "uploadKeyPackages",
                trace,
                async move {
                    let params = params.get()?;
                    let packages = params.get_packages()?;
                    if packages.len() as usize > MAX_UPLOAD {
                        return Err(error(
                            ErrorCode::InvalidArgument,
                            format!("at most {MAX_UPLOAD} KeyPackages per upload"),
                        ));
                    }
                    // Validate everything before storing anything.
                    let mut records = Vec::with_capacity(packages.len() as usize);
                    for kp in packages.iter() {
                        records.push(self.check_upload(kp?)?);
                    }
                    let last_resort = if params.has_last_resort() {
                        Some(self.check_upload(params.get_last_resort()?)?)
                    } else {
                        None
                    };
                    let remaining = self
                        .ctx
                        .store
                        .add_key_packages(&self.identity, &records, last_resort.as_ref())
                        .await
                        .map_err(store_error)?;
                    results.get().set_remaining(remaining);
                    Ok(())
                },
            )
            .await
    }

    async fn fetch_key_packages(
        self: Rc<Self>,
        params: authentication_service::FetchKeyPackagesParams,
        mut results: authentication_service::FetchKeyPackagesResults,
    ) -> Result<(), capnp::Error> {
        let trace = trace_of(params.get().and_then(|p| p.get_trace()));
        let in_flight = Rc::clone(&self.in_flight);
        in_flight
            .serve(
                "AuthenticationService",
                "fetchKeyPackages",
                trace,
                async move {
                    let targets = identity_list(params.get()?.get_identities()?)?;
                    if !self.ctx.limiter.admit(self.identity, &targets) {
                        return Err(error(
                            ErrorCode::RateLimited,
                            "too many KeyPackage fetches for this identity; retry later",
                        ));
                    }
                    let fetched = self
                        .ctx
                        .store
                        .fetch_key_packages(&targets)
                        .await
                        .map_err(store_error)?;
                    let found: Vec<_> = fetched.into_iter().flatten().collect();
                    let mut out = results.get().init_packages(
                        u32::try_from(found.len())
                            .map_err(|_| error(ErrorCode::Internal, "too many"))?,
                    );
                    for (i, kp) in found.iter().enumerate() {
                        let mut entry = out.reborrow().get(i as u32);
                        entry.set_identity(kp.identity.as_bytes());
                        entry.set_package(&kp.data);
                        entry.set_last_resort(kp.last_resort);
                    }
                    Ok(())
                },
            )
            .await
    }

    async fn key_package_count(
        self: Rc<Self>,
        params: authentication_service::KeyPackageCountParams,
        mut results: authentication_service::KeyPackageCountResults,
    ) -> Result<(), capnp::Error> {
        let trace = trace_of(params.get().and_then(|p| p.get_trace()));
        let in_flight = Rc::clone(&self.in_flight);
        in_flight
            .serve(
                "AuthenticationService",
                "keyPackageCount",
                trace,
                async move {
                    let remaining = self
                        .ctx
                        .store
                        .key_package_count(&self.identity)
                        .await
                        .map_err(store_error)?;
                    let mut out = results.get();
                    out.set_remaining(remaining);
                    out.set_low(remaining < self.ctx.low_watermark);
                    Ok(())
                },
            )
            .await
    }

    async fn claim_name(
        self: Rc<Self>,
        params: authentication_service::ClaimNameParams,
        _results: authentication_service::ClaimNameResults,
    ) -> Result<(), capnp::Error> {
        let trace = trace_of(params.get().and_then(|p| p.get_trace()));
        let in_flight = Rc::clone(&self.in_flight);
        in_flight
            .serve("AuthenticationService", "claimName", trace, async move {
                let name = user_name(params.get()?.get_name()?)?;
                self.ctx
                    .store
                    .claim_name(&self.identity, &name)
                    .await
                    .map_err(store_error)
            })
            .await
    }

    async fn resolve_name(
        self: Rc<Self>,
        params: authentication_service::ResolveNameParams,
        mut results: authentication_service::ResolveNameResults,
    ) -> Result<(), capnp::Error> {
        let trace = trace_of(params.get().and_then(|p| p.get_trace()));
        let in_flight = Rc::clone(&self.in_flight);
        in_flight
            .serve("AuthenticationService", "resolveName", trace, async move {
                let name = user_name(params.get()?.get_name()?)?;
                match self
                    .ctx
                    .store
                    .resolve_name(&name)
                    .await
                    .map_err(store_error)?
                {
                    Some(id) => {
                        results.get().set_identity(id.as_bytes());
                        Ok(())
                    }
                    None => Err(error(
                        ErrorCode::UnknownName,
                        format!("no user is named {name}"),
                    )),
                }
            })
            .await
    }

    async fn names_of(
        self: Rc<Self>,
        params: authentication_service::NamesOfParams,
        mut results: authentication_service::NamesOfResults,
    ) -> Result<(), capnp::Error> {
        let trace = trace_of(params.get().and_then(|p| p.get_trace()));
        let in_flight = Rc::clone(&self.in_flight);
        in_flight
            .serve("AuthenticationService", "namesOf", trace, async move {
                let ids = identity_list(params.get()?.get_identities()?)?;
                let mut names = Vec::with_capacity(ids.len());
                for id in ids {
                    let name = self.ctx.store.name_of(&id).await.map_err(store_error)?;
                    names.push(name.map(|n| n.to_string()).unwrap_or_default());
                }
                let mut out = results.get().init_names(names.len() as u32);
                for (i, n) in names.iter().enumerate() {
                    out.set(i as u32, n.as_str());
                }
                Ok(())
            })
            .await
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
