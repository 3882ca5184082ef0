//! Device identities: the Ed25519 identity key (the MLS credential) and its binding to a Noise
//! session.
//!
//! After the Noise handshake the client signs
//! `"quicproquo identity binding v1" ‖ handshake hash ‖ client Noise static key` with its
//! identity key. The handshake hash is unique to the session, so a binding cannot be replayed on
//! another connection, and the static key ties it to the key the server authenticated.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use zeroize::{Zeroize, Zeroizing};

use crate::error::KeyError;

const BINDING_DOMAIN: &[u8] = b"quicproquo identity binding v1";

/// A device's public identity key: 32 bytes of Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey([u8; 32]);

impl IdentityKey {
    /// Wraps 32 bytes, checking they are a valid Ed25519 public key.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::InvalidEncoding {
            what: "identity key",
            expected: 32,
        })?;
        Ok(Self(bytes))
    }

    /// Parses a slice of exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| KeyError::InvalidEncoding {
            what: "identity key",
            expected: 32,
        })?;
        Self::from_bytes(arr)
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The fingerprint people compare out of band: SHA-256 of the key, as 16 groups of 4 hex
    /// digits (`1a2b 3c4d ...`).
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.0);
        let hex = hex::encode(digest);
        hex.as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Verifies an Ed25519 signature by this identity over `message` (strict verification).
    /// Callers domain-separate `message` (see [`crate::report`]).
    pub(crate) fn verify_signed(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        key.verify_strict(message, &signature).is_ok()
    }

    /// Verifies a session binding made by this identity.
    pub fn verify_binding(
        &self,
        handshake_hash: &[u8; 32],
        client_static: &[u8; 32],
        signature: &[u8],
    ) -> Result<(), KeyError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::BadBinding)?;
        let signature =
            ed25519_dalek::Signature::from_slice(signature).map_err(|_| KeyError::BadBinding)?;
        key.verify_strict(&binding_message(handshake_hash, client_static), &signature)
            .map_err(|_| KeyError::BadBinding)
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKey({})", hex::encode(&self.0[..8]))
    }
}

fn binding_message(handshake_hash: &[u8; 32], client_static: &[u8; 32]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(BINDING_DOMAIN.len() + 64);
    msg.extend_from_slice(BINDING_DOMAIN);
    msg.extend_from_slice(handshake_hash);
    msg.extend_from_slice(client_static);
    msg
}

/// A device's identity key pair. The secret is zeroized on drop.
pub struct IdentityKeypair(SigningKey);

impl IdentityKeypair {
    /// Generates a new identity from the operating system's RNG.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| KeyError::Rng(e.to_string()))?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// Rebuilds the key pair from its 32-byte secret seed.
    pub fn from_seed(seed: &Zeroizing<[u8; 32]>) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// The 32-byte secret seed, for the client's state file (and for MLS, which takes the
    /// same key as raw bytes).
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        let mut bytes = self.0.to_bytes();
        let out = Zeroizing::new(bytes);
        bytes.zeroize();
        out
    }

    /// The public identity key.
    pub fn public(&self) -> IdentityKey {
        IdentityKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `message` with the identity key. Callers domain-separate `message` (see
    /// [`crate::report`]).
    pub(crate) fn sign_message(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// Signs the binding of this identity to a Noise session.
    pub fn sign_binding(&self, handshake_hash: &[u8; 32], client_static: &[u8; 32]) -> [u8; 64] {
        self.0
            .sign(&binding_message(handshake_hash, client_static))
            .to_bytes()
    }
}

impl fmt::Debug for IdentityKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdentityKeypair")
            .field(&self.public())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_verifies_only_for_its_session_key_and_identity() -> Result<(), KeyError> {
        let alice = IdentityKeypair::generate()?;
        let mallory = IdentityKeypair::generate()?;
        let (hash, other_hash, stat) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let sig = alice.sign_binding(&hash, &stat);
        alice.public().verify_binding(&hash, &stat, &sig)?;
        assert!(
            alice
                .public()
                .verify_binding(&other_hash, &stat, &sig)
                .is_err()
        );
        assert!(
            alice
                .public()
                .verify_binding(&hash, &[4u8; 32], &sig)
                .is_err()
        );
        assert!(mallory.public().verify_binding(&hash, &stat, &sig).is_err());
        assert!(
            alice
                .public()
                .verify_binding(&hash, &stat, &sig[..63])
                .is_err()
        );
        Ok(())
    }

    #[test]
    fn fingerprint_is_stable_and_grouped() -> Result<(), KeyError> {
        let id = IdentityKeypair::generate()?;
        let again = IdentityKeypair::from_seed(&id.seed());
        assert_eq!(id.public(), again.public());
        let fp = id.public().fingerprint();
        assert_eq!(fp, again.public().fingerprint());
        assert_eq!(fp.split(' ').count(), 16);
        Ok(())
    }
}
