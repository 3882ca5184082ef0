//! Keys: X25519 Noise static keys, the cluster's Ed25519 key and node certificates.
//!
//! Every server node has a Noise static key. The cluster key (Ed25519) signs each node's Noise
//! public key together with its role; the signature travels in the responder's handshake payload
//! as a [`NodeCertificate`]. Clients pin the cluster public key, so any node the cluster vouches
//! for is accepted and nothing else is.

use std::collections::HashSet;
use std::fmt;
use std::sync::Mutex;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use zeroize::{Zeroize, Zeroizing};

use crate::error::KeyError;

/// Domain separation for node certificate signatures.
const CERT_DOMAIN: &[u8] = b"quicproquo node certificate v1";
/// Version byte of the encoded certificate.
const CERT_VERSION: u8 = 1;
/// Encoded certificate length: version, role, Ed25519 signature.
pub const NODE_CERTIFICATE_LEN: usize = 2 + 64;

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
    fn to_byte(self) -> u8 {
        match self {
            Self::Edge => 1,
            Self::Shard => 2,
            Self::Standalone => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
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

impl fmt::Display for NodeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn certificate_message(role: NodeRole, noise_public: &[u8; 32]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(CERT_DOMAIN.len() + 1 + 32);
    msg.extend_from_slice(CERT_DOMAIN);
    msg.push(role.to_byte());
    msg.extend_from_slice(noise_public);
    msg
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

    /// Vouches for a node's Noise static public key in the given role.
    pub fn certify(&self, role: NodeRole, noise_public: &[u8; 32]) -> NodeCertificate {
        let signature = self.0.sign(&certificate_message(role, noise_public));
        NodeCertificate {
            role,
            signature: signature.to_bytes(),
        }
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

    /// Checks that `cert` vouches for `noise_public`; returns the certified role.
    pub fn verify(
        &self,
        cert: &NodeCertificate,
        noise_public: &[u8; 32],
    ) -> Result<NodeRole, KeyError> {
        let signature = ed25519_dalek::Signature::from_bytes(&cert.signature);
        self.0
            .verify_strict(&certificate_message(cert.role, noise_public), &signature)
            .map_err(|_| KeyError::UntrustedNode)?;
        Ok(cert.role)
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

/// Verifies node certificates under a pinned cluster key, remembering those already verified.
///
/// A client that reconnects to the same nodes (a load generator opens thousands of connections)
/// then pays for one Ed25519 verification per node, not per connection. Certificates are
/// deterministic signatures over public data, so a cached (key, certificate) pair that verified
/// once verifies forever under the same cluster key.
#[derive(Debug)]
pub struct NodeVerifier {
    cluster: ClusterPublicKey,
    verified: Mutex<HashSet<([u8; 32], [u8; NODE_CERTIFICATE_LEN])>>,
}

/// Most (key, certificate) pairs a [`NodeVerifier`] remembers before starting afresh.
const VERIFIED_CACHE_LIMIT: usize = 4096;

impl NodeVerifier {
    /// A verifier for certificates signed by `cluster`.
    pub fn new(cluster: ClusterPublicKey) -> Self {
        Self {
            cluster,
            verified: Mutex::new(HashSet::new()),
        }
    }

    /// The pinned cluster key.
    pub fn cluster_key(&self) -> ClusterPublicKey {
        self.cluster
    }

    /// Checks that `cert` vouches for `noise_public`; returns the certified role.
    pub fn verify(
        &self,
        cert: &NodeCertificate,
        noise_public: &[u8; 32],
    ) -> Result<NodeRole, KeyError> {
        let entry = (*noise_public, cert.encode());
        let mut verified = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if verified.contains(&entry) {
            return Ok(cert.role);
        }
        drop(verified);
        let role = self.cluster.verify(cert, noise_public)?;
        verified = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if verified.len() >= VERIFIED_CACHE_LIMIT {
            verified.clear();
        }
        verified.insert(entry);
        Ok(role)
    }
}

/// A cluster key's signature over a node's role and Noise static public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeCertificate {
    role: NodeRole,
    signature: [u8; 64],
}

impl NodeCertificate {
    /// The certified role.
    pub fn role(&self) -> NodeRole {
        self.role
    }

    /// Encodes as `[version][role][signature]`.
    pub fn encode(&self) -> [u8; NODE_CERTIFICATE_LEN] {
        let mut out = [0u8; NODE_CERTIFICATE_LEN];
        out[0] = CERT_VERSION;
        out[1] = self.role.to_byte();
        out[2..].copy_from_slice(&self.signature);
        out
    }

    /// Decodes `[version][role][signature]`.
    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() != NODE_CERTIFICATE_LEN || bytes[0] != CERT_VERSION {
            return Err(KeyError::MalformedCertificate);
        }
        let role = NodeRole::from_byte(bytes[1]).ok_or(KeyError::MalformedCertificate)?;
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&bytes[2..]);
        Ok(Self { role, signature })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_round_trips_and_verifies() -> Result<(), KeyError> {
        let cluster = ClusterSigningKey::generate()?;
        let node = NoiseKeypair::generate()?;
        let cert = cluster.certify(NodeRole::Edge, node.public());
        let decoded = NodeCertificate::decode(&cert.encode())?;
        assert_eq!(decoded, cert);
        assert_eq!(
            cluster.public_key().verify(&decoded, node.public())?,
            NodeRole::Edge
        );
        Ok(())
    }

    #[test]
    fn certificate_rejects_other_cluster_other_node_and_other_role() -> Result<(), KeyError> {
        let cluster = ClusterSigningKey::generate()?;
        let other_cluster = ClusterSigningKey::generate()?;
        let node = NoiseKeypair::generate()?;
        let other_node = NoiseKeypair::generate()?;
        let cert = cluster.certify(NodeRole::Shard, node.public());
        assert!(matches!(
            other_cluster.public_key().verify(&cert, node.public()),
            Err(KeyError::UntrustedNode)
        ));
        assert!(matches!(
            cluster.public_key().verify(&cert, other_node.public()),
            Err(KeyError::UntrustedNode)
        ));
        let mut encoded = cert.encode();
        encoded[1] = 1; // claim the edge role with the shard's signature
        let forged = NodeCertificate::decode(&encoded)?;
        assert!(matches!(
            cluster.public_key().verify(&forged, node.public()),
            Err(KeyError::UntrustedNode)
        ));
        assert!(matches!(
            NodeCertificate::decode(&encoded[..10]),
            Err(KeyError::MalformedCertificate)
        ));
        Ok(())
    }

    #[test]
    fn verifier_caches_only_what_verified() -> Result<(), KeyError> {
        let cluster = ClusterSigningKey::generate()?;
        let node = NoiseKeypair::generate()?;
        let other = NoiseKeypair::generate()?;
        let cert = cluster.certify(NodeRole::Edge, node.public());
        let verifier = NodeVerifier::new(cluster.public_key());
        assert_eq!(verifier.verify(&cert, node.public())?, NodeRole::Edge);
        assert_eq!(verifier.verify(&cert, node.public())?, NodeRole::Edge);
        // A cached certificate does not vouch for another key.
        assert!(verifier.verify(&cert, other.public()).is_err());
        let wrong = NodeVerifier::new(ClusterSigningKey::generate()?.public_key());
        assert!(wrong.verify(&cert, node.public()).is_err());
        assert!(wrong.verify(&cert, node.public()).is_err());
        Ok(())
    }

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
}
