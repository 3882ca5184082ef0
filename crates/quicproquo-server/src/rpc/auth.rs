//! The Authentication Service, served to a connection once it has bound its identity.
//!
//! Every method acts for the bound identity only: uploads are checked to be the caller's own
//! KeyPackages, counts are the caller's, and fetches are limited per (caller, target) pair so
//! nobody can drain someone else's pool.

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use quicproquo_core::IdentityKey;
use quicproquo_proto::auth_capnp::authentication_service;
use quicproquo_proto::errors::{ErrorCode, error};

use crate::auth::{AuthContext, MAX_FETCH, MAX_UPLOAD};
use crate::model::UserName;
use crate::obs::calls::InFlight;
use crate::store::Store;
use crate::wire::errors::auth_error;
use crate::wire::{parse, store_error};

/// The Authentication Service of one bound connection.
pub(super) struct AuthService {
    identity: IdentityKey,
    /// Where the connection comes from, for the per-address fetch rate.
    address: Option<IpAddr>,
    ctx: Arc<AuthContext>,
    in_flight: Rc<InFlight>,
}

impl AuthService {
    pub(super) fn new(
        (identity, address): (IdentityKey, Option<IpAddr>),
        ctx: Arc<AuthContext>,
        in_flight: Rc<InFlight>,
    ) -> Self {
        Self {
            identity,
            address,
            ctx,
            in_flight,
        }
    }
}

impl authentication_service::Server for AuthService {
    async fn upload_key_packages(
        self: Rc<Self>,
        params: authentication_service::UploadKeyPackagesParams,
        mut results: authentication_service::UploadKeyPackagesResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "AuthenticationService",
            "uploadKeyPackages",
            params,
            async move {
                let params = params.get()?;
                let packages = params.get_packages()?;
                if packages.len() as usize > MAX_UPLOAD {
                    return Err(error(
                        ErrorCode::InvalidArgument,
                        format!("at most {MAX_UPLOAD} KeyPackages per upload"),
                    ));
                }
                // Validate everything (on the CPU pool) before storing anything; the last
                // resort, if any, is checked last.
                let mut datas = Vec::with_capacity(packages.len() as usize + 1);
                for kp in packages.iter() {
                    datas.push(kp?.to_vec());
                }
                let has_last_resort = params.has_last_resort();
                if has_last_resort {
                    datas.push(params.get_last_resort()?.to_vec());
                }
                let mut records = self
                    .ctx
                    .check_key_packages(self.identity, datas)
                    .await
                    .map_err(auth_error)?;
                let last_resort = if has_last_resort { records.pop() } else { None };
                let remaining = self
                    .ctx
                    .store()
                    .add_key_packages(&self.identity, &records, last_resort.as_ref())
                    .await
                    .map_err(store_error)?;
                results.get().set_remaining(remaining);
                Ok(())
            }
        )
    }

    async fn fetch_key_packages(
        self: Rc<Self>,
        params: authentication_service::FetchKeyPackagesParams,
        mut results: authentication_service::FetchKeyPackagesResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "AuthenticationService",
            "fetchKeyPackages",
            params,
            async move {
                let targets = parse::identities(params.get()?.get_identities()?, MAX_FETCH)?;
                self.ctx
                    .admit_fetch(self.identity, self.address, &targets)
                    .map_err(auth_error)?;
                let fetched = self
                    .ctx
                    .store()
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
            }
        )
    }

    async fn key_package_count(
        self: Rc<Self>,
        params: authentication_service::KeyPackageCountParams,
        mut results: authentication_service::KeyPackageCountResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "AuthenticationService",
            "keyPackageCount",
            params,
            async move {
                let remaining = self
                    .ctx
                    .store()
                    .key_package_count(&self.identity)
                    .await
                    .map_err(store_error)?;
                let mut out = results.get();
                out.set_remaining(remaining);
                out.set_low(self.ctx.is_low(remaining));
                Ok(())
            }
        )
    }

    async fn claim_name(
        self: Rc<Self>,
        params: authentication_service::ClaimNameParams,
        _results: authentication_service::ClaimNameResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "AuthenticationService",
            "claimName",
            params,
            async move {
                let name = parse::user_name(params.get()?.get_name()?)?;
                self.ctx
                    .store()
                    .claim_name(&self.identity, &name)
                    .await
                    .map_err(store_error)
            }
        )
    }

    async fn resolve_name(
        self: Rc<Self>,
        params: authentication_service::ResolveNameParams,
        mut results: authentication_service::ResolveNameResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "AuthenticationService",
            "resolveName",
            params,
            async move {
                let name = parse::user_name(params.get()?.get_name()?)?;
                match self
                    .ctx
                    .store()
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
            }
        )
    }

    async fn names_of(
        self: Rc<Self>,
        params: authentication_service::NamesOfParams,
        mut results: authentication_service::NamesOfResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "AuthenticationService",
            "namesOf",
            params,
            async move {
                let ids = parse::identities(params.get()?.get_identities()?, MAX_FETCH)?;
                let names = self.ctx.store().names_of(&ids).await.map_err(store_error)?;
                let mut out = results.get().init_names(names.len() as u32);
                for (i, n) in names.iter().enumerate() {
                    out.set(i as u32, n.as_ref().map_or("", UserName::as_str));
                }
                Ok(())
            }
        )
    }
}
