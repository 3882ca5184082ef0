//! Keys: X25519 Noise static keys, the cluster's Ed25519 key and node certificates.
//!
//! Every server node has a Noise static key. The cluster key (Ed25519), kept by the operator,
//! issues each node a certificate naming its role, node id, Noise public key and validity (see
//! [`crate::cert`]); the certificate travels in the responder's handshake payload. Clients pin
//! the cluster public key (or, during a rollover, the old and the new one), so any node the
//! cluster vouches for is accepted and nothing else is.

use std::fmt;
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use zeroize::{Zeroize, Zeroizing};

use crate::cert::{CertificateFields, NodeCertificate, default_node_id, signed_message, unix_now};
use crate::error::KeyError;

/// How long a certificate [`ClusterSigningKey::certify`] issues is valid.
pub const SELF_ISSUED_VALIDITY: Duration = Duration::from_secs(365 * 86_400);

fn random_32() -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom::fill(bytes.as_mut()).map_err(|e| KeyError::Rng(e.to_string()))?;
    Ok(bytes)
}

fn decode_hex_32(what: &'static str, s: &str) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let mut out = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(s.trim(), out.as_mut())
        .map_err(|_| KeyError::InvalidEncoding { what, expected: 32 })?;
    Ok(out)
}

/// An X25519 static key pair for the Noise handshake. The secret is zeroized on drop.
pub struct NoiseKeypair {
    secret: Zeroizing<[u8; 32]>,
    public: [u8; 32],
}

impl NoiseKeypair {
    /// Generates a new key pair from the operating system's RNG.
    pub fn generate() -> Result<Self, KeyError> {
        Ok(Self::from_secret(random_32()?))
    }

    /// Builds a key pair from secret bytes (clamping happens inside X25519).
    pub fn from_secret(secret: Zeroizing<[u8; 32]>) -> Self {
        let public = x25519_dalek::x25519(*secret, x25519_dalek::X25519_BASEPOINT_BYTES);
        Self { secret, public }
    }

    /// Parses a hex-encoded secret key.
    pub fn from_secret_hex(s: &str) -> Result<Self, KeyError> {
        Ok(Self::from_secret(decode_hex_32("noise secret key", s)?))
    }

    /// The secret key, hex-encoded, for storing in a key file.
    pub fn secret_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.secret.as_ref()))
    }

    /// The public key.
    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.secret
    }
}

impl fmt::Debug for NoiseKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseKeypair")
            .field("public", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

/// The role a node plays in the cluster, bound into its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NodeRole {
    /// Terminates client connections and routes calls to shards.
    Edge,
    /// Owns groups and orders their logs.
    Shard,
    /// Every role in one process.
    Standalone,
}

impl NodeRole {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            Self::Edge => 1,
            Self::Shard => 2,
            Self::Standalone => 3,
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Edge),
            2 => Some(Self::Shard),
            3 => Some(Self::Standalone),
            _ => None,
        }
    }

    /// Lower-case name, as used in logs and command output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Edge => "edge",
            Self::Shard => "shard",
            Self::Standalone => "standalone",
        }
    }
}

impl std::str::FromStr for NodeRole {
    type Err = KeyError;

    /// Parses `edge`, `shard` or `standalone`.
    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s.trim() {
            "edge" => Ok(Self::Edge),
            "shard" => Ok(Self::Shard),
            "standalone" => Ok(Self::Standalone),
            _ => Err(KeyError::UnknownRole(s.trim().to_owned())),
        }
    }
}

impl fmt::Display for NodeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The cluster's Ed25519 signing key. Zeroized on drop (ed25519-dalek's `zeroize` feature).
pub struct ClusterSigningKey(SigningKey);

impl ClusterSigningKey {
    /// Generates a new cluster key from the operating system's RNG.
    pub fn generate() -> Result<Self, KeyError> {
        let seed = random_32()?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// Parses a hex-encoded 32-byte secret seed.
    pub fn from_secret_hex(s: &str) -> Result<Self, KeyError> {
        let seed = decode_hex_32("cluster secret key", s)?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// The secret seed, hex-encoded, for storing in a key file.
    pub fn secret_hex(&self) -> Zeroizing<String> {
        let mut seed = self.0.to_bytes();
        let out = Zeroizing::new(hex::encode(seed));
        seed.zeroize();
        out
    }

    /// The public key clients pin.
    pub fn public_key(&self) -> ClusterPublicKey {
        ClusterPublicKey(self.0.verifying_key())
    }

    /// Issues a certificate for `fields` (its node id and validity are checked first).
    pub fn issue(&self, fields: &CertificateFields) -> Result<NodeCertificate, KeyError> {
        fields.check()?;
        Ok(self.sign(fields))
    }

    /// Vouches for a node's Noise static public key in `role`, under the node id derived from
    /// the key, valid from a minute ago for [`SELF_ISSUED_VALIDITY`]: what a standalone node
    /// (which holds the cluster key itself) and tests use.
    pub fn certify(&self, role: NodeRole, noise_public: &[u8; 32]) -> NodeCertificate {
        let now = unix_now();
        self.sign(&CertificateFields {
            role,
            node_key: *noise_public,
            node_id: default_node_id(noise_public),
            not_before: now.saturating_sub(60),
            not_after: now.saturating_add(SELF_ISSUED_VALIDITY.as_secs()),
        })
    }

    fn sign(&self, fields: &CertificateFields) -> NodeCertificate {
        let issuer = self.public_key().to_bytes();
        let message = signed_message(&issuer, fields);
        NodeCertificate::from_parts(issuer, fields.clone(), self.0.sign(&message).to_bytes())
    }
}

impl fmt::Debug for ClusterSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterSigningKey")
            .field("public", &self.public_key())
            .finish_non_exhaustive()
    }
}

/// The cluster's Ed25519 public key, pinned by clients.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ClusterPublicKey(VerifyingKey);

impl ClusterPublicKey {
    /// Parses a hex-encoded 32-byte public key.
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut bytes).map_err(|_| KeyError::InvalidEncoding {
            what: "cluster public key",
            expected: 32,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Builds the key from its 32 encoded bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| KeyError::InvalidClusterKey)
    }

    /// The key as 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The key, hex-encoded (what `qpq --server-key` takes).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    /// Checks that `cert` vouches for `noise_public` now and that this key issued it;
    /// returns the certified role.
    pub fn verify(
        &self,
        cert: &NodeCertificate,
        noise_public: &[u8; 32],
    ) -> Result<NodeRole, KeyError> {
        crate::cert::check(cert, noise_public, std::slice::from_ref(self), unix_now())
    }

    /// Checks an Ed25519 signature by this key over `message`.
    pub(crate) fn verify_signature(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.0.verify_strict(message, &signature).is_ok()
    }
}

impl fmt::Debug for ClusterPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterPublicKey({})", self.to_hex())
    }
}

impl fmt::Display for ClusterPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_hex() -> Result<(), KeyError> {
        let cluster = ClusterSigningKey::generate()?;
        let again = ClusterSigningKey::from_secret_hex(&cluster.secret_hex())?;
        assert_eq!(again.public_key(), cluster.public_key());
        assert_eq!(
            ClusterPublicKey::from_hex(&cluster.public_key().to_hex())?,
            cluster.public_key()
        );
        let node = NoiseKeypair::generate()?;
        let node_again = NoiseKeypair::from_secret_hex(&node.secret_hex())?;
        assert_eq!(node_again.public(), node.public());
        assert!(ClusterPublicKey::from_hex("abcd").is_err());
        Ok(())
    }

    #[test]
    fn roles_parse_from_their_names() {
        for role in [NodeRole::Edge, NodeRole::Shard, NodeRole::Standalone] {
            assert_eq!(role.as_str().parse::<NodeRole>().ok(), Some(role));
        }
        assert!("client".parse::<NodeRole>().is_err());
    }
}
