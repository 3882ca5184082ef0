//! Error types of the core crate.

use std::io;

/// Errors from parsing, generating or checking keys and node certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A hex string did not decode to a key of the expected length.
    #[error("invalid {what}: expected {expected} hex-encoded bytes")]
    InvalidEncoding {
        /// Which key was being parsed.
        what: &'static str,
        /// The expected length in bytes.
        expected: usize,
    },
    /// The cluster public key is not a valid Ed25519 point.
    #[error("invalid cluster public key")]
    InvalidClusterKey,
    /// The operating system's random number generator failed.
    #[error("random number generator failed: {0}")]
    Rng(String),
    /// A node certificate was malformed.
    #[error("malformed node certificate")]
    MalformedCertificate,
    /// An identity binding signature is malformed or does not verify.
    #[error("identity binding signature does not verify")]
    BadBinding,
    /// A node certificate's signature does not verify under the key that claims to issue it.
    #[error("the node certificate's signature does not verify")]
    UntrustedNode,
    /// A node certificate was issued by a cluster key this peer does not trust.
    #[error("the node certificate was issued by a cluster key this peer does not trust")]
    UnknownClusterKey,
    /// A node certificate certifies another Noise key than the one the handshake proved.
    #[error("the node certificate is for another node key")]
    CertificateForAnotherKey,
    /// A node certificate is not valid yet.
    #[error("the node certificate is not valid before {not_before} (Unix time)")]
    CertificateNotYetValid {
        /// First second of validity.
        not_before: u64,
    },
    /// A node certificate has expired.
    #[error("the node certificate expired at {not_after} (Unix time)")]
    CertificateExpired {
        /// Last second of validity.
        not_after: u64,
    },
    /// A node certificate is valid but for a role this peer does not accept here.
    #[error("a {found} certificate is not accepted here (only {allowed})")]
    WrongRole {
        /// The certified role.
        found: crate::keys::NodeRole,
        /// The roles accepted.
        allowed: String,
    },
    /// A certificate's fields are not acceptable (node id, validity).
    #[error("invalid certificate: {0}")]
    InvalidCertificate(&'static str),
    /// A role name is none of `edge`, `shard`, `standalone`.
    #[error("unknown role `{0}` (edge, shard or standalone)")]
    UnknownRole(String),
    /// A verifier was given no trusted cluster key, or too many.
    #[error("{count} trusted cluster keys: between 1 and {max} are accepted")]
    TrustedKeyCount {
        /// How many distinct keys were given.
        count: usize,
        /// The most accepted.
        max: usize,
    },
}

/// Errors of the Noise handshake and of the framed channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The underlying socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection before the handshake or a frame was complete.
    #[error("connection closed by peer")]
    Closed,
    /// The handshake did not complete within its deadline.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// A handshake message was malformed, too long, or failed authentication.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The peer sent a low-order X25519 public key (ephemeral or static): its Diffie-Hellman
    /// output would be all zero, whatever our secret, so the handshake would give it nothing
    /// to prove. Refused before anything is answered.
    #[error("the peer sent a low-order public key")]
    LowOrderKey,
    /// The server's node certificate did not verify under the pinned cluster key(s).
    #[error("the server is not vouched for by the pinned cluster key")]
    WrongClusterKey,
    /// The server's node certificate verified but may not be used now (expired, not yet
    /// valid): the reason is in the [`KeyError`].
    #[error("the server's certificate is refused: {0}")]
    RefusedCertificate(KeyError),
    /// A transport message failed to decrypt or authenticate (tampering or desynchronisation).
    #[error("transport message failed authentication")]
    Decrypt,
    /// A transport message could not be encrypted (nonce space exhausted).
    #[error("transport message could not be encrypted: {0}")]
    Encrypt(String),
    /// A frame announced (or a caller asked to send) more bytes than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A key or certificate problem during the handshake.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A push frame arrived where none was asked for, or its handler refused it.
    #[error("push frame refused: {0}")]
    Push(String),
}

impl From<TransportError> for io::Error {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Io(e) => e,
            TransportError::Closed => Self::new(io::ErrorKind::UnexpectedEof, e),
            TransportError::HandshakeTimeout => Self::new(io::ErrorKind::TimedOut, e),
            other => Self::new(io::ErrorKind::InvalidData, other),
        }
    }
}
