//! MLS (RFC 9420) through openmls: the ciphersuites, the client's provider and its compact
//! storage ([`storage`]), KeyPackages.
//!
//! The credential of a device is an MLS basic credential whose identity is the device's Ed25519
//! identity key, and the leaf's signature key is that same key. The server relies on this: a
//! KeyPackage is accepted for an identity only when both match it ([`check_key_package`]).

pub mod storage;

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    BasicCredential, Capabilities, Ciphersuite, CredentialWithKey, ExtensionType, KeyPackage,
    KeyPackageIn, KeyPackageVerifyError, Lifetime, OpenMlsProvider, ProtocolVersion,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::types::SignatureScheme;
use zeroize::Zeroizing;

use crate::identity::{IdentityKey, IdentityKeypair};
pub use storage::{Change, CompactStorage, SharedValues, StorageError, Value};

/// The MLS ciphersuites quicproquo speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Suite {
    /// `MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519` (0x004F): X-Wing hybrid KEM
    /// (X25519 + ML-KEM-768), the default.
    #[default]
    Hybrid,
    /// `MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519` (0x0001): classical.
    Classical,
}

impl Suite {
    /// Every suite, default first.
    pub const ALL: [Self; 2] = [Self::Hybrid, Self::Classical];

    /// The openmls ciphersuite.
    pub fn ciphersuite(self) -> Ciphersuite {
        match self {
            Self::Hybrid => Ciphersuite::MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519,
            Self::Classical => Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519,
        }
    }

    /// The suite of an openmls ciphersuite, if it is one of ours.
    pub fn from_ciphersuite(cs: Ciphersuite) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.ciphersuite() == cs)
    }

    /// `hybrid` or `classical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hybrid => "hybrid",
            Self::Classical => "classical",
        }
    }

    /// Parses `hybrid` or `classical`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// MLS errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MlsError {
    /// The bytes are not a KeyPackage.
    #[error("malformed KeyPackage")]
    Malformed,
    /// A KeyPackage or leaf signature does not verify.
    #[error("KeyPackage signature does not verify")]
    BadSignature,
    /// The KeyPackage's lifetime is over, not yet begun, or missing.
    #[error("KeyPackage is expired or not yet valid")]
    Expired,
    /// The KeyPackage uses a ciphersuite this deployment does not accept.
    #[error("KeyPackage ciphersuite {0:?} is not accepted")]
    WrongSuite(Ciphersuite),
    /// The credential is not a basic credential naming the leaf's own Ed25519 signature key.
    #[error("KeyPackage credential does not match its signature key")]
    BadCredential,
    /// The KeyPackage is otherwise invalid (protocol version, extensions, keys).
    #[error("invalid KeyPackage: {0}")]
    Invalid(String),
    /// openmls failed internally or could not store key material.
    #[error("mls library error: {0}")]
    Library(String),
    /// The serialized client storage is corrupt.
    #[error("corrupt MLS state")]
    CorruptState,
}

/// The openmls provider of a client: RustCrypto plus the in-memory [`CompactStorage`] of MLS
/// secrets that the client persists in its state file.
#[derive(Debug, Default)]
pub struct MlsProvider {
    crypto: RustCrypto,
    storage: CompactStorage,
}

impl OpenMlsProvider for MlsProvider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = CompactStorage;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.crypto
    }
}

/// Format byte of [`MlsProvider::export_storage`]: 2 since entities are postcard-encoded (the
/// unversioned format before it held JSON entities and began with a zero byte).
const EXPORT_FORMAT: u8 = 2;

impl MlsProvider {
    /// A provider whose store holds its large ratchet trees once in `shared`, with those of
    /// every other provider given the same pool (many members of the same groups in one
    /// process).
    pub fn sharing(shared: SharedValues) -> Self {
        Self {
            crypto: RustCrypto::default(),
            storage: CompactStorage::sharing(shared),
        }
    }

    /// Serializes every stored entry (KeyPackage private keys, group state): `format u8 = 2`,
    /// `count u64`, then `key_len u64, value_len u64, key, value` per entry, all big-endian,
    /// sorted by key.
    pub fn export_storage(&self) -> Result<Zeroizing<Vec<u8>>, MlsError> {
        let entries = self.entries()?;
        let size = entries
            .iter()
            .map(|(k, v)| 16 + k.len() + v.len())
            .sum::<usize>();
        let mut out = Zeroizing::new(Vec::with_capacity(9 + size));
        out.push(EXPORT_FORMAT);
        out.extend_from_slice(&(entries.len() as u64).to_be_bytes());
        for (k, v) in &entries {
            out.extend_from_slice(&(k.len() as u64).to_be_bytes());
            out.extend_from_slice(&(v.len() as u64).to_be_bytes());
            out.extend_from_slice(k);
            out.extend_from_slice(v);
        }
        Ok(out)
    }

    /// Rebuilds a provider from [`MlsProvider::export_storage`] output; an export of another
    /// format is [`MlsError::CorruptState`].
    pub fn import_storage(mut bytes: &[u8]) -> Result<Self, MlsError> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], MlsError> {
            let (head, tail) = bytes.split_at_checked(n).ok_or(MlsError::CorruptState)?;
            *bytes = tail;
            Ok(head)
        }
        fn take_len(bytes: &mut &[u8]) -> Result<usize, MlsError> {
            let raw: [u8; 8] = take(bytes, 8)?
                .try_into()
                .map_err(|_| MlsError::CorruptState)?;
            usize::try_from(u64::from_be_bytes(raw)).map_err(|_| MlsError::CorruptState)
        }
        if take(&mut bytes, 1)? != [EXPORT_FORMAT] {
            return Err(MlsError::CorruptState);
        }
        let count = take_len(&mut bytes)?;
        let mut entries = Vec::with_capacity(count.min(1 << 16));
        for _ in 0..count {
            let (kl, vl) = (take_len(&mut bytes)?, take_len(&mut bytes)?);
            let k = take(&mut bytes, kl)?.to_vec();
            let v = Zeroizing::new(take(&mut bytes, vl)?.to_vec());
            entries.push((k, v));
        }
        if !bytes.is_empty() {
            return Err(MlsError::CorruptState);
        }
        Ok(Self::from_entries(entries))
    }

    /// A provider whose store holds `entries` (as [`MlsProvider::entries`] lists them), with an
    /// empty journal of changes.
    pub fn from_entries(entries: impl IntoIterator<Item = (Vec<u8>, Value)>) -> Self {
        Self {
            crypto: RustCrypto::default(),
            storage: CompactStorage::from_entries(entries),
        }
    }

    /// Every stored entry, sorted by key.
    pub fn entries(&self) -> Result<Vec<(Vec<u8>, Value)>, MlsError> {
        self.storage.entries().map_err(MlsError::from)
    }

    /// The entries written or deleted since the last call (or since the provider was built),
    /// each with its value now; a persisted copy updated with them equals [`Self::entries`].
    pub fn take_changes(&self) -> Result<Vec<Change>, MlsError> {
        self.storage.take_changes().map_err(MlsError::from)
    }
}

impl From<StorageError> for MlsError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Decode => Self::CorruptState,
            other => Self::Library(other.to_string()),
        }
    }
}

/// A device's MLS signer and credential, derived from its identity key.
pub struct MlsIdentity {
    identity: IdentityKey,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
}

impl std::fmt::Debug for MlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlsIdentity")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl MlsIdentity {
    /// The MLS view of `keypair`: a basic credential naming the Ed25519 public key, signed by
    /// that same key.
    pub fn new(keypair: &IdentityKeypair) -> Self {
        let identity = keypair.public();
        let seed = keypair.seed();
        let signer = SignatureKeyPair::from_raw(
            SignatureScheme::ED25519,
            seed.to_vec(),
            identity.as_bytes().to_vec(),
        );
        let credential = CredentialWithKey {
            credential: BasicCredential::new(identity.as_bytes().to_vec()).into(),
            signature_key: identity.as_bytes().to_vec().into(),
        };
        Self {
            identity,
            signer,
            credential,
        }
    }

    /// The identity key.
    pub fn identity(&self) -> IdentityKey {
        self.identity
    }

    /// The openmls signer.
    pub fn signer(&self) -> &SignatureKeyPair {
        &self.signer
    }

    /// The credential with its signature key, as openmls takes it.
    pub fn credential(&self) -> &CredentialWithKey {
        &self.credential
    }

    /// Creates `count` KeyPackages; their private keys go into `provider`'s storage. Returns
    /// them TLS-serialized, ready to upload.
    pub fn key_packages(
        &self,
        provider: &MlsProvider,
        suite: Suite,
        count: usize,
    ) -> Result<Vec<Vec<u8>>, MlsError> {
        (0..count)
            .map(|_| self.build(provider, suite.ciphersuite(), false, None))
            .collect()
    }

    /// Creates the last-resort KeyPackage: marked as such, so openmls keeps its private keys
    /// after a Welcome uses it.
    pub fn last_resort_key_package(
        &self,
        provider: &MlsProvider,
        suite: Suite,
    ) -> Result<Vec<u8>, MlsError> {
        self.build(provider, suite.ciphersuite(), true, None)
    }

    /// Creates a KeyPackage with an explicit lifetime (`not_before`, `not_after`, Unix
    /// seconds); for tests of expiry handling.
    #[doc(hidden)]
    pub fn key_package_with_lifetime(
        &self,
        provider: &MlsProvider,
        ciphersuite: Ciphersuite,
        not_before: u64,
        not_after: u64,
    ) -> Result<Vec<u8>, MlsError> {
        let lifetime = Lifetime::init(not_before, not_after);
        self.build(provider, ciphersuite, false, Some(lifetime))
    }

    /// Creates a KeyPackage in any openmls ciphersuite; for tests of suite filtering.
    #[doc(hidden)]
    pub fn key_package_in(
        &self,
        provider: &MlsProvider,
        ciphersuite: Ciphersuite,
    ) -> Result<Vec<u8>, MlsError> {
        self.build(provider, ciphersuite, false, None)
    }

    fn build(
        &self,
        provider: &MlsProvider,
        ciphersuite: Ciphersuite,
        last_resort: bool,
        lifetime: Option<Lifetime>,
    ) -> Result<Vec<u8>, MlsError> {
        let mut builder = KeyPackage::builder().leaf_node_capabilities(leaf_capabilities());
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        if let Some(lifetime) = lifetime {
            builder = builder.key_package_lifetime(lifetime);
        }
        let bundle = builder
            .build(ciphersuite, provider, &self.signer, self.credential.clone())
            .map_err(|e| MlsError::Library(e.to_string()))?;
        bundle
            .key_package()
            .tls_serialize_detached()
            .map_err(|e| MlsError::Library(e.to_string()))
    }
}

/// The capabilities of every leaf we create (KeyPackages and the creator's leaf of a group):
/// both of our suites and support for the last-resort extension.
pub(crate) fn leaf_capabilities() -> Capabilities {
    Capabilities::builder()
        .ciphersuites(Suite::ALL.map(Suite::ciphersuite).to_vec())
        .extensions(vec![ExtensionType::LastResort])
        .build()
}

/// What the Authentication Service learns from a KeyPackage that passed [`check_key_package`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedKeyPackage {
    /// The identity the credential names (and whose key signed the KeyPackage).
    pub identity: IdentityKey,
    /// The KeyPackage's hash reference.
    pub hash_ref: Vec<u8>,
    /// Its ciphersuite.
    pub suite: Suite,
    /// The end of its lifetime (Unix seconds): past it, it must not be handed out.
    pub not_after: u64,
}

/// Validates uploaded KeyPackages for the Authentication Service.
#[derive(Debug)]
pub struct KeyPackageChecker {
    crypto: RustCrypto,
    accepted: Vec<Suite>,
}

impl KeyPackageChecker {
    /// A checker accepting KeyPackages of the `accepted` suites.
    pub fn new(accepted: &[Suite]) -> Self {
        Self {
            crypto: RustCrypto::default(),
            accepted: accepted.to_vec(),
        }
    }

    /// See [`check_key_package`].
    pub fn check(&self, bytes: &[u8]) -> Result<CheckedKeyPackage, MlsError> {
        check_key_package(bytes, &self.crypto, &self.accepted)
    }
}

/// Parses and fully validates a serialized KeyPackage: signatures, lifetime, protocol version,
/// ciphersuite (one of `accepted`) and credential (a basic credential naming the leaf's own
/// Ed25519 signature key).
pub fn check_key_package(
    bytes: &[u8],
    crypto: &RustCrypto,
    accepted: &[Suite],
) -> Result<CheckedKeyPackage, MlsError> {
    validate_key_package(bytes, crypto, accepted).map(|(_, checked)| checked)
}

/// [`check_key_package`], also returning the validated KeyPackage (to add it to a group).
pub(crate) fn validate_key_package(
    bytes: &[u8],
    crypto: &RustCrypto,
    accepted: &[Suite],
) -> Result<(KeyPackage, CheckedKeyPackage), MlsError> {
    let kp_in = KeyPackageIn::tls_deserialize_exact(bytes).map_err(|_| MlsError::Malformed)?;
    let kp = kp_in
        .validate(crypto, ProtocolVersion::Mls10)
        .map_err(|e| match e {
            KeyPackageVerifyError::InvalidSignature
            | KeyPackageVerifyError::InvalidLeafNodeSignature => MlsError::BadSignature,
            KeyPackageVerifyError::LifetimeError(_) | KeyPackageVerifyError::MissingLifetime => {
                MlsError::Expired
            }
            other => MlsError::Invalid(other.to_string()),
        })?;
    let suite = Suite::from_ciphersuite(kp.ciphersuite())
        .filter(|s| accepted.contains(s))
        .ok_or(MlsError::WrongSuite(kp.ciphersuite()))?;
    let leaf = kp.leaf_node();
    let basic = BasicCredential::try_from(leaf.credential().clone())
        .map_err(|_| MlsError::BadCredential)?;
    let identity =
        IdentityKey::from_slice(basic.identity()).map_err(|_| MlsError::BadCredential)?;
    if leaf.signature_key().as_slice() != identity.as_bytes() {
        return Err(MlsError::BadCredential);
    }
    let hash_ref = kp
        .hash_ref(crypto)
        .map_err(|e| MlsError::Library(e.to_string()))?
        .as_slice()
        .to_vec();
    let not_after = kp.life_time().not_after();
    Ok((
        kp,
        CheckedKeyPackage {
            identity,
            hash_ref,
            suite,
            not_after,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Result<(IdentityKeypair, MlsIdentity, MlsProvider), Box<dyn std::error::Error>> {
        let keys = IdentityKeypair::generate()?;
        let mls = MlsIdentity::new(&keys);
        Ok((keys, mls, MlsProvider::default()))
    }

    #[test]
    fn key_packages_of_both_suites_pass_the_check() -> Result<(), Box<dyn std::error::Error>> {
        let (keys, mls, provider) = device()?;
        for suite in Suite::ALL {
            let kps = mls.key_packages(&provider, suite, 2)?;
            let a = check_key_package(&kps[0], provider.crypto(), &Suite::ALL)?;
            let b = check_key_package(&kps[1], provider.crypto(), &Suite::ALL)?;
            assert_eq!(a.identity, keys.public());
            assert_eq!(a.suite, suite);
            assert_ne!(a.hash_ref, b.hash_ref);
        }
        let lr = mls.last_resort_key_package(&provider, Suite::Hybrid)?;
        check_key_package(&lr, provider.crypto(), &[Suite::Hybrid])?;
        Ok(())
    }

    #[test]
    fn bad_key_packages_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let (_, mls, provider) = device()?;
        let crypto = provider.crypto();
        let good = mls.key_packages(&provider, Suite::Classical, 1)?.remove(0);
        // Wrong suite for this deployment.
        assert!(matches!(
            check_key_package(&good, crypto, &[Suite::Hybrid]),
            Err(MlsError::WrongSuite(_))
        ));
        // A suite that is not ours at all.
        let chacha = mls.key_package_in(
            &provider,
            Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519,
        )?;
        assert!(matches!(
            check_key_package(&chacha, crypto, &Suite::ALL),
            Err(MlsError::WrongSuite(_))
        ));
        // Expired.
        let expired = mls.key_package_with_lifetime(
            &provider,
            Suite::Classical.ciphersuite(),
            1_000_000,
            1_000_100,
        )?;
        assert!(matches!(
            check_key_package(&expired, crypto, &Suite::ALL),
            Err(MlsError::Expired)
        ));
        // A flipped bit in the signature at the end.
        let mut tampered = good.clone();
        if let Some(last) = tampered.last_mut() {
            *last ^= 0x01;
        }
        assert!(matches!(
            check_key_package(&tampered, crypto, &Suite::ALL),
            Err(MlsError::BadSignature)
        ));
        // Garbage and truncation.
        assert!(matches!(
            check_key_package(b"not a key package", crypto, &Suite::ALL),
            Err(MlsError::Malformed)
        ));
        assert!(check_key_package(&good[..good.len() / 2], crypto, &Suite::ALL).is_err());
        Ok(())
    }

    #[test]
    fn storage_round_trips() -> Result<(), Box<dyn std::error::Error>> {
        let (_, mls, provider) = device()?;
        mls.key_packages(&provider, Suite::Classical, 3)?;
        let exported = provider.export_storage()?;
        let again = MlsProvider::import_storage(&exported)?;
        assert_eq!(again.export_storage()?.len(), exported.len());
        assert!(MlsProvider::import_storage(&exported[..exported.len() - 1]).is_err());
        Ok(())
    }
}
