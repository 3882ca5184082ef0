//! Core of quicproquo: keys, the Noise_XX session and the framed encrypted channel.
//!
//! What it is: the pieces both ends of a connection share. [`keys`] holds the X25519 Noise
//! static keys and the cluster's Ed25519 key that vouches for server nodes (secrets zeroized on
//! drop). [`noise`] runs the `Noise_XX_25519_ChaChaPoly_SHA256` handshake over any async byte
//! stream, with a deadline, and checks the server's node certificate against the pinned cluster
//! key. [`channel`] carries application frames (`[u32 length][bytes]`) over Noise transport
//! messages, splitting frames larger than one Noise message and refusing frames over the
//! configured maximum before allocating; it also offers an `AsyncRead + AsyncWrite` view so
//! Cap'n Proto RPC runs over the encrypted channel, and [`rpc`] builds that RPC system with the
//! reader limits every connection uses. [`mls`] holds the MLS ciphersuites, the
//! client's openmls provider and KeyPackages; [`group`] is the client's MLS group (create, join,
//! commit, encrypt, process a server-ordered log) and the keyless [`group::inspect`] the server
//! uses to order that log. [`duration`] parses the `250ms` / `10s` / `5m` / `1h` durations every
//! command line and configuration file of the project accepts.
//!
//! What it is not: it opens no sockets and knows no RPC interface, role or storage;
//! those live in `quicproquo-server` and `quicproquo-client`.
//!
//! # Layout
//!
//! | module | role, and the rules that live there |
//! |---|---|
//! | [`keys`], [`identity`] | Noise static keys and the cluster key; identity keys and the session binding |
//! | [`cert`] | node certificates (role, node id, key, validity, issuer) and their verifier over a set of trusted cluster keys |
//! | [`noise`] | the handshake (with its deadline and certificate check) |
//! | [`channel`] | frames over Noise messages; the frame size limit, checked before allocating |
//! | [`rpc`] | the RPC system over a session; the reader limits of every connection |
//! | [`mls`], [`group`] | ciphersuites, the openmls provider, KeyPackages; the client's MLS group and the server's keyless `inspect` |
//! | [`report`] | a member's signed report of a commit it cannot process (ADR 0015) |
//! | [`duration`] | the one parser of durations (`500ms`, `10s`, `1m`, `2h`) for every binary |
//! | [`error`] | the crate's error types |
//!
//! `group` and `mls` depend on `keys`/`identity` only; `rpc` on `channel`, which depends on
//! `noise`.

#![forbid(unsafe_code)]

pub mod cert;
pub mod channel;
pub mod duration;
pub mod error;
pub mod gate;
pub mod group;
pub mod identity;
pub mod inbound;
pub mod keys;
pub mod mls;
pub mod mux;
pub mod noise;
pub mod report;
pub mod rpc;

pub use cert::{CertificateFields, NodeCertificate, NodeVerifier};
pub use channel::{ChannelLimits, NoiseReader, NoiseWriter};
pub use error::{KeyError, TransportError};
pub use identity::{IdentityKey, IdentityKeypair};
pub use keys::{ClusterPublicKey, ClusterSigningKey, NodeRole, NoiseKeypair};
pub use noise::{HandshakeOutcome, Session};
