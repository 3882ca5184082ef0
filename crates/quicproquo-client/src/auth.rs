//! The client side of the Authentication Service.

use std::net::SocketAddr;
use std::time::Duration;

use quicproquo_core::IdentityKey;
use quicproquo_proto::auth_capnp::authentication_service;

use crate::trace::{rpc_span, traced, write_trace};
use crate::wire::{list_len, read_identity, write_identities};
use crate::{ClientError, call_error, timed};

/// A KeyPackage fetched for another identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedKeyPackage {
    /// Whose KeyPackage it is (as the server filed it; the MLS layer checks the credential).
    pub identity: IdentityKey,
    /// The TLS-serialized KeyPackage.
    pub data: Vec<u8>,
    /// True when it is the identity's last-resort KeyPackage (its pool was empty).
    pub last_resort: bool,
}

/// The Authentication Service, scoped to the identity the session is bound to.
#[derive(Clone)]
pub struct AuthClient {
    cap: authentication_service::Client,
    addr: SocketAddr,
    timeout: Duration,
}

impl std::fmt::Debug for AuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl AuthClient {
    pub(crate) fn new(
        cap: authentication_service::Client,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Self {
        Self { cap, addr, timeout }
    }

    /// Uploads KeyPackages (and optionally the last-resort one); returns the pool size after.
    pub async fn upload_key_packages(
        &self,
        packages: &[Vec<u8>],
        last_resort: Option<&[u8]>,
    ) -> Result<u32, ClientError> {
        let span = rpc_span(self.addr, "AuthenticationService", "uploadKeyPackages");
        let mut req = self.cap.upload_key_packages_request();
        {
            let mut p = req.get();
            write_trace(p.reborrow().init_trace(), &span);
            let count = list_len(packages.len(), "KeyPackages")?;
            let mut list = p.reborrow().init_packages(count);
            for (i, kp) in packages.iter().enumerate() {
                list.set(i as u32, kp);
            }
            if let Some(lr) = last_resort {
                p.set_last_resort(lr);
            }
        }
        let call = timed(self.addr, self.timeout, "upload", req.send().promise);
        let resp = traced(&span, call).await?;
        Ok(resp.get().map_err(call_error)?.get_remaining())
    }

    /// Fetches (consuming) one KeyPackage for each identity; identities with none are absent.
    pub async fn fetch_key_packages(
        &self,
        identities: &[IdentityKey],
    ) -> Result<Vec<FetchedKeyPackage>, ClientError> {
        let span = rpc_span(self.addr, "AuthenticationService", "fetchKeyPackages");
        let mut req = self.cap.fetch_key_packages_request();
        write_trace(req.get().init_trace(), &span);
        let count = list_len(identities.len(), "identities")?;
        write_identities(req.get().init_identities(count), identities);
        let call = timed(self.addr, self.timeout, "fetch", req.send().promise);
        let resp = traced(&span, call).await?;
        let packages = resp
            .get()
            .map_err(call_error)?
            .get_packages()
            .map_err(call_error)?;
        let mut out = Vec::with_capacity(packages.len() as usize);
        for kp in packages.iter() {
            out.push(FetchedKeyPackage {
                identity: read_identity(kp.get_identity())?,
                data: kp.get_package().map_err(call_error)?.to_vec(),
                last_resort: kp.get_last_resort(),
            });
        }
        Ok(out)
    }

    /// How many KeyPackages the server holds for us, and whether we should upload more.
    pub async fn key_package_count(&self) -> Result<(u32, bool), ClientError> {
        let span = rpc_span(self.addr, "AuthenticationService", "keyPackageCount");
        let mut req = self.cap.key_package_count_request();
        write_trace(req.get().init_trace(), &span);
        let call = timed(self.addr, self.timeout, "count", req.send().promise);
        let resp = traced(&span, call).await?;
        let r = resp.get().map_err(call_error)?;
        Ok((r.get_remaining(), r.get_low()))
    }

    /// Claims a user name for our identity.
    pub async fn claim_name(&self, name: &str) -> Result<(), ClientError> {
        let span = rpc_span(self.addr, "AuthenticationService", "claimName");
        let mut req = self.cap.claim_name_request();
        write_trace(req.get().init_trace(), &span);
        req.get().set_name(name);
        let call = timed(self.addr, self.timeout, "claim name", req.send().promise);
        traced(&span, call).await?;
        Ok(())
    }

    /// The user name of each identity (`None` for identities without one).
    pub async fn names_of(
        &self,
        identities: &[IdentityKey],
    ) -> Result<Vec<Option<String>>, ClientError> {
        let span = rpc_span(self.addr, "AuthenticationService", "namesOf");
        let mut req = self.cap.names_of_request();
        write_trace(req.get().init_trace(), &span);
        let count = list_len(identities.len(), "identities")?;
        write_identities(req.get().init_identities(count), identities);
        let call = timed(self.addr, self.timeout, "names", req.send().promise);
        let resp = traced(&span, call).await?;
        let names = resp
            .get()
            .map_err(call_error)?
            .get_names()
            .map_err(call_error)?;
        let mut out = Vec::with_capacity(names.len() as usize);
        for n in names.iter() {
            let n = n
                .map_err(call_error)?
                .to_str()
                .map_err(|e| ClientError::Rpc(capnp::Error::failed(e.to_string())))?;
            out.push((!n.is_empty()).then(|| n.to_owned()));
        }
        Ok(out)
    }

    /// The identity that owns a user name.
    pub async fn resolve_name(&self, name: &str) -> Result<IdentityKey, ClientError> {
        let span = rpc_span(self.addr, "AuthenticationService", "resolveName");
        let mut req = self.cap.resolve_name_request();
        write_trace(req.get().init_trace(), &span);
        req.get().set_name(name);
        let call = timed(self.addr, self.timeout, "resolve name", req.send().promise);
        let resp = traced(&span, call).await?;
        read_identity(resp.get().map_err(call_error)?.get_identity())
    }
}
