//! Node certificates: what the cluster key says about one node, and how peers check it.
//!
//! A certificate names the node's role (`edge`, `shard`, `standalone`), its node id, its Noise
//! static public key, when it becomes valid and when it expires, and the cluster key that
//! issued it; the issuer's Ed25519 signature covers all of that under a domain-separation
//! string. The operator issues certificates (`qpq-server node-cert`) with the cluster key, which
//! no edge or shard holds. A peer accepts a certificate when its issuer is one of the cluster
//! keys it trusts (two during a rollover), the signature verifies, the certified key is the
//! one the handshake authenticated, and the current time lies in its validity; the caller then
//! checks the role.
//!
//! Encoding (version 2), all integers big-endian:
//! `[version][role][issuer: 32][node key: 32][not_before: u64][not_after: u64]`
//! `[node id length: u8][node id][signature: 64]`, at most [`MAX_NODE_CERTIFICATE_LEN`] bytes.

use std::collections::HashSet;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::KeyError;
use crate::keys::{ClusterPublicKey, NodeRole};

/// Domain separation for node certificate signatures.
const CERT_DOMAIN: &[u8] = b"quicproquo node certificate v2";
/// Version byte of the encoded certificate.
const CERT_VERSION: u8 = 2;
/// Longest node id a certificate carries.
pub const MAX_NODE_ID_LEN: usize = 128;
/// Bytes before the node id: version, role, issuer, node key, not-before, not-after, id length.
const HEADER_LEN: usize = 1 + 1 + 32 + 32 + 8 + 8 + 1;
/// Largest encoded certificate.
pub const MAX_NODE_CERTIFICATE_LEN: usize = HEADER_LEN + MAX_NODE_ID_LEN + 64;
/// How far ahead of a peer's clock a certificate's `not_before` may be and still be accepted.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Most cluster keys a verifier trusts at once (a rollover needs two).
pub const MAX_TRUSTED_KEYS: usize = 8;

/// Seconds since the Unix epoch, now (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The node id derived from a Noise public key: its first 8 bytes in hex.
pub fn default_node_id(noise_public: &[u8; 32]) -> String {
    hex::encode(&noise_public[..8])
}

/// Checks a node id: 1 to [`MAX_NODE_ID_LEN`] ASCII letters, digits, `-`, `_` or `.`.
pub fn check_node_id(node_id: &str) -> Result<(), KeyError> {
    if node_id.is_empty()
        || node_id.len() > MAX_NODE_ID_LEN
        || !node_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(KeyError::InvalidCertificate(
            "the node id must be 1 to 128 letters, digits, '-', '_' or '.'",
        ));
    }
    Ok(())
}

/// What a certificate states about a node, before it is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFields {
    /// The role the node may play.
    pub role: NodeRole,
    /// The node's Noise static public key.
    pub node_key: [u8; 32],
    /// The node's id (a shard's place on the ring).
    pub node_id: String,
    /// First second (Unix time) the certificate is valid.
    pub not_before: u64,
    /// Last second (Unix time) the certificate is valid.
    pub not_after: u64,
}

impl CertificateFields {
    /// Checks the node id and that the validity is not empty.
    pub fn check(&self) -> Result<(), KeyError> {
        check_node_id(&self.node_id)?;
        if self.not_after <= self.not_before {
            return Err(KeyError::InvalidCertificate(
                "not_after must come after not_before",
            ));
        }
        Ok(())
    }
}

/// The bytes the issuer signs: the domain string, then the encoding up to the signature.
pub(crate) fn signed_message(issuer: &[u8; 32], fields: &CertificateFields) -> Vec<u8> {
    let mut msg = Vec::with_capacity(CERT_DOMAIN.len() + HEADER_LEN + fields.node_id.len());
    msg.extend_from_slice(CERT_DOMAIN);
    encode_body(issuer, fields, &mut msg);
    msg
}

fn encode_body(issuer: &[u8; 32], fields: &CertificateFields, out: &mut Vec<u8>) {
    out.push(CERT_VERSION);
    out.push(fields.role.to_byte());
    out.extend_from_slice(issuer);
    out.extend_from_slice(&fields.node_key);
    out.extend_from_slice(&fields.not_before.to_be_bytes());
    out.extend_from_slice(&fields.not_after.to_be_bytes());
    // The node id is at most MAX_NODE_ID_LEN (128) bytes: checked on issue and on decode.
    out.push(u8::try_from(fields.node_id.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(fields.node_id.as_bytes());
}

/// A cluster key's signed statement about one node (see the module documentation).
#[derive(Clone, PartialEq, Eq)]
pub struct NodeCertificate {
    issuer: [u8; 32],
    fields: CertificateFields,
    signature: [u8; 64],
}

impl NodeCertificate {
    pub(crate) fn from_parts(
        issuer: [u8; 32],
        fields: CertificateFields,
        signature: [u8; 64],
    ) -> Self {
        Self {
            issuer,
            fields,
            signature,
        }
    }

    /// The certified role.
    pub fn role(&self) -> NodeRole {
        self.fields.role
    }

    /// The certified node id.
    pub fn node_id(&self) -> &str {
        &self.fields.node_id
    }

    /// The certified Noise static public key.
    pub fn node_key(&self) -> &[u8; 32] {
        &self.fields.node_key
    }

    /// First second (Unix time) of validity.
    pub fn not_before(&self) -> u64 {
        self.fields.not_before
    }

    /// Last second (Unix time) of validity.
    pub fn not_after(&self) -> u64 {
        self.fields.not_after
    }

    /// The cluster key that issued it (not yet checked against anything).
    pub fn issuer(&self) -> Result<ClusterPublicKey, KeyError> {
        ClusterPublicKey::from_bytes(&self.issuer)
    }

    /// Seconds from `now` until the certificate expires (0 once it has).
    pub fn remaining_at(&self, now: u64) -> u64 {
        self.fields.not_after.saturating_sub(now)
    }

    /// Encodes the certificate (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.fields.node_id.len() + 64);
        encode_body(&self.issuer, &self.fields, &mut out);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes a certificate; checks its form only, not its signature or validity.
    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        let malformed = KeyError::MalformedCertificate;
        if bytes.len() < HEADER_LEN + 64 || bytes.len() > MAX_NODE_CERTIFICATE_LEN {
            return Err(malformed);
        }
        if bytes[0] != CERT_VERSION {
            return Err(malformed);
        }
        let role = NodeRole::from_byte(bytes[1]).ok_or(KeyError::MalformedCertificate)?;
        let take32 = |at: usize| -> [u8; 32] {
            let mut out = [0u8; 32];
            out.copy_from_slice(&bytes[at..at + 32]);
            out
        };
        let take8 = |at: usize| -> u64 {
            let mut out = [0u8; 8];
            out.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(out)
        };
        let issuer = take32(2);
        let node_key = take32(34);
        let not_before = take8(66);
        let not_after = take8(74);
        let id_len = usize::from(bytes[82]);
        if bytes.len() != HEADER_LEN + id_len + 64 {
            return Err(malformed);
        }
        let node_id = std::str::from_utf8(&bytes[HEADER_LEN..HEADER_LEN + id_len])
            .map_err(|_| KeyError::MalformedCertificate)?
            .to_owned();
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&bytes[HEADER_LEN + id_len..]);
        let fields = CertificateFields {
            role,
            node_key,
            node_id,
            not_before,
            not_after,
        };
        fields.check().map_err(|_| KeyError::MalformedCertificate)?;
        Ok(Self {
            issuer,
            fields,
            signature,
        })
    }

    /// The certificate as one line of hex, as `qpq-server node-cert` writes it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.encode())
    }

    /// Parses what [`NodeCertificate::to_hex`] wrote (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        if text.len() > 2 * MAX_NODE_CERTIFICATE_LEN {
            return Err(KeyError::MalformedCertificate);
        }
        let bytes = hex::decode(text).map_err(|_| KeyError::MalformedCertificate)?;
        Self::decode(&bytes)
    }
}

impl fmt::Debug for NodeCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCertificate")
            .field("role", &self.fields.role)
            .field("node_id", &self.fields.node_id)
            .field("node_key", &hex::encode(self.fields.node_key))
            .field("issuer", &hex::encode(self.issuer))
            .field("not_before", &self.fields.not_before)
            .field("not_after", &self.fields.not_after)
            .finish_non_exhaustive()
    }
}

/// Checks everything about `cert` but its role, under the trusted `keys` at time `now`,
/// signature included.
pub(crate) fn check(
    cert: &NodeCertificate,
    noise_public: &[u8; 32],
    keys: &[ClusterPublicKey],
    now: u64,
) -> Result<NodeRole, KeyError> {
    check_except_signature(cert, noise_public, keys, now)?;
    check_signature(cert, keys)?;
    Ok(cert.role())
}

fn check_signature(cert: &NodeCertificate, keys: &[ClusterPublicKey]) -> Result<(), KeyError> {
    let issuer = keys
        .iter()
        .find(|k| k.to_bytes() == cert.issuer)
        .ok_or(KeyError::UnknownClusterKey)?;
    if !issuer.verify_signature(&signed_message(&cert.issuer, &cert.fields), &cert.signature) {
        return Err(KeyError::UntrustedNode);
    }
    Ok(())
}

fn check_except_signature(
    cert: &NodeCertificate,
    noise_public: &[u8; 32],
    keys: &[ClusterPublicKey],
    now: u64,
) -> Result<(), KeyError> {
    if &cert.fields.node_key != noise_public {
        return Err(KeyError::CertificateForAnotherKey);
    }
    if !keys.iter().any(|k| k.to_bytes() == cert.issuer) {
        return Err(KeyError::UnknownClusterKey);
    }
    if now.saturating_add(CLOCK_SKEW.as_secs()) < cert.fields.not_before {
        return Err(KeyError::CertificateNotYetValid {
            not_before: cert.fields.not_before,
        });
    }
    if now > cert.fields.not_after {
        return Err(KeyError::CertificateExpired {
            not_after: cert.fields.not_after,
        });
    }
    Ok(())
}

/// Verifies node certificates under the trusted cluster keys, remembering the signatures
/// already verified.
///
/// A client that reconnects to the same nodes (a load generator opens thousands of connections)
/// then pays for one Ed25519 verification per node certificate, not per connection. The
/// signature of a given encoding verifies forever under the same key; the validity and the
/// certified key are checked on every call.
#[derive(Debug)]
pub struct NodeVerifier {
    keys: Vec<ClusterPublicKey>,
    verified: Mutex<HashSet<Vec<u8>>>,
}

/// Most certificates a [`NodeVerifier`] remembers before starting afresh.
const VERIFIED_CACHE_LIMIT: usize = 4096;

impl NodeVerifier {
    /// A verifier for certificates issued by `cluster`.
    pub fn new(cluster: ClusterPublicKey) -> Self {
        Self {
            keys: vec![cluster],
            verified: Mutex::new(HashSet::new()),
        }
    }

    /// A verifier trusting every key of `keys` (at least one, at most [`MAX_TRUSTED_KEYS`];
    /// repeats count once): during a rollover, the old cluster key and the new one.
    pub fn with_keys(keys: impl IntoIterator<Item = ClusterPublicKey>) -> Result<Self, KeyError> {
        let mut unique: Vec<ClusterPublicKey> = Vec::new();
        for k in keys {
            if !unique.contains(&k) {
                unique.push(k);
            }
        }
        if unique.is_empty() || unique.len() > MAX_TRUSTED_KEYS {
            return Err(KeyError::TrustedKeyCount {
                count: unique.len(),
                max: MAX_TRUSTED_KEYS,
            });
        }
        Ok(Self {
            keys: unique,
            verified: Mutex::new(HashSet::new()),
        })
    }

    /// The first trusted cluster key.
    pub fn cluster_key(&self) -> ClusterPublicKey {
        self.keys[0]
    }

    /// Every trusted cluster key.
    pub fn cluster_keys(&self) -> &[ClusterPublicKey] {
        &self.keys
    }

    /// Checks that `cert` vouches for `noise_public` now; returns the certified role.
    pub fn verify(
        &self,
        cert: &NodeCertificate,
        noise_public: &[u8; 32],
    ) -> Result<NodeRole, KeyError> {
        self.verify_at(cert, noise_public, unix_now())
    }

    /// Checks that `cert` vouches for `noise_public` at Unix time `now`; returns the
    /// certified role.
    pub fn verify_at(
        &self,
        cert: &NodeCertificate,
        noise_public: &[u8; 32],
        now: u64,
    ) -> Result<NodeRole, KeyError> {
        check_except_signature(cert, noise_public, &self.keys, now)?;
        let encoded = cert.encode();
        let mut verified = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if verified.contains(&encoded) {
            return Ok(cert.role());
        }
        drop(verified);
        check_signature(cert, &self.keys)?;
        verified = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if verified.len() >= VERIFIED_CACHE_LIMIT {
            verified.clear();
        }
        verified.insert(encoded);
        Ok(cert.role())
    }

    /// Like [`NodeVerifier::verify`], and the role must be one of `allowed`.
    pub fn verify_role(
        &self,
        cert: &NodeCertificate,
        noise_public: &[u8; 32],
        allowed: &[NodeRole],
    ) -> Result<NodeRole, KeyError> {
        let role = self.verify(cert, noise_public)?;
        if !allowed.contains(&role) {
            return Err(KeyError::WrongRole {
                found: role,
                allowed: allowed
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(" or "),
            });
        }
        Ok(role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{ClusterSigningKey, NoiseKeypair};

    fn fields(
        role: NodeRole,
        node: &NoiseKeypair,
        not_before: u64,
        not_after: u64,
    ) -> CertificateFields {
        CertificateFields {
            role,
            node_key: *node.public(),
            node_id: "edge-1".into(),
            not_before,
            not_after,
        }
    }

    #[test]
    fn certificate_round_trips_and_verifies() -> Result<(), KeyError> {
        let cluster = ClusterSigningKey::generate()?;
        let node = NoiseKeypair::generate()?;
        let now = unix_now();
        let cert = cluster.issue(&fields(NodeRole::Edge, &node, now - 10, now + 3600))?;
        let decoded = NodeCertificate::from_hex(&cert.to_hex())?;
        assert_eq!(decoded, cert);
        assert_eq!(decoded.node_id(), "edge-1");
        assert_eq!(decoded.issuer()?, cluster.public_key());
        assert_eq!(
            cluster.public_key().verify(&decoded, node.public())?,
            NodeRole::Edge
        );
        assert!(cert.encode().len() <= MAX_NODE_CERTIFICATE_LEN);
        Ok(())
    }

    #[test]
    fn refusals_name_their_reason() -> Result<(), KeyError> {
        let cluster = ClusterSigningKey::generate()?;
        let other_cluster = ClusterSigningKey::generate()?;
        let node = NoiseKeypair::generate()?;
        let other_node = NoiseKeypair::generate()?;
        let now = unix_now();
        let cert = cluster.issue(&fields(NodeRole::Shard, &node, now - 10, now + 3600))?;
        let verifier = NodeVerifier::new(cluster.public_key());
        assert!(matches!(
            NodeVerifier::new(other_cluster.public_key()).verify(&cert, node.public()),
            Err(KeyError::UnknownClusterKey)
        ));
        assert!(matches!(
            verifier.verify(&cert, other_node.public()),
            Err(KeyError::CertificateForAnotherKey)
        ));
        assert!(matches!(
            verifier.verify_at(&cert, node.public(), now + 3601),
            Err(KeyError::CertificateExpired { .. })
        ));
        assert!(matches!(
            verifier.verify_at(&cert, node.public(), now - 10 - CLOCK_SKEW.as_secs() - 1),
            Err(KeyError::CertificateNotYetValid { .. })
        ));
        assert!(matches!(
            verifier.verify_role(&cert, node.public(), &[NodeRole::Edge]),
            Err(KeyError::WrongRole {
                found: NodeRole::Shard,
                ..
            })
        ));
        // Claiming another role (or a longer validity) with the shard's signature.
        let mut encoded = cert.encode();
        encoded[1] = NodeRole::Edge.to_byte();
        let forged = NodeCertificate::decode(&encoded)?;
        assert!(matches!(
            verifier.verify(&forged, node.public()),
            Err(KeyError::UntrustedNode)
        ));
        let mut encoded = cert.encode();
        encoded[80] ^= 1;
        let stretched = NodeCertificate::decode(&encoded)?;
        assert!(matches!(
            verifier.verify(&stretched, node.public()),
            Err(KeyError::UntrustedNode)
        ));
        assert!(matches!(
            NodeCertificate::decode(&cert.encode()[..10]),
            Err(KeyError::MalformedCertificate)
        ));
        Ok(())
    }

    #[test]
    fn issuing_checks_the_fields() -> Result<(), KeyError> {
        let cluster = ClusterSigningKey::generate()?;
        let node = NoiseKeypair::generate()?;
        let mut f = fields(NodeRole::Edge, &node, 100, 100);
        assert!(matches!(
            cluster.issue(&f),
            Err(KeyError::InvalidCertificate(_))
        ));
        f.not_after = 200;
        f.node_id = "a b".into();
        assert!(cluster.issue(&f).is_err());
        f.node_id = "x".repeat(MAX_NODE_ID_LEN + 1);
        assert!(cluster.issue(&f).is_err());
        f.node_id = "x".repeat(MAX_NODE_ID_LEN);
        assert_eq!(cluster.issue(&f)?.encode().len(), MAX_NODE_CERTIFICATE_LEN);
        Ok(())
    }

    #[test]
    fn a_verifier_trusts_every_key_of_its_set() -> Result<(), KeyError> {
        let old = ClusterSigningKey::generate()?;
        let new = ClusterSigningKey::generate()?;
        let node = NoiseKeypair::generate()?;
        let by_old = old.certify(NodeRole::Edge, node.public());
        let by_new = new.certify(NodeRole::Edge, node.public());
        let both = NodeVerifier::with_keys([old.public_key(), new.public_key()])?;
        assert_eq!(both.verify(&by_old, node.public())?, NodeRole::Edge);
        assert_eq!(both.verify(&by_new, node.public())?, NodeRole::Edge);
        let only_new = NodeVerifier::new(new.public_key());
        assert!(only_new.verify(&by_old, node.public()).is_err());
        assert!(NodeVerifier::with_keys([]).is_err());
        Ok(())
    }

    #[test]
    fn the_cache_keeps_checking_validity_and_key() -> Result<(), KeyError> {
        let cluster = ClusterSigningKey::generate()?;
        let node = NoiseKeypair::generate()?;
        let other = NoiseKeypair::generate()?;
        let now = unix_now();
        let cert = cluster.issue(&fields(NodeRole::Edge, &node, now - 10, now + 60))?;
        let verifier = NodeVerifier::new(cluster.public_key());
        assert_eq!(verifier.verify(&cert, node.public())?, NodeRole::Edge);
        assert_eq!(verifier.verify(&cert, node.public())?, NodeRole::Edge);
        assert!(verifier.verify(&cert, other.public()).is_err());
        assert!(verifier.verify_at(&cert, node.public(), now + 61).is_err());
        Ok(())
    }
}
