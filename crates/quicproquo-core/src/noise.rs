//! The Noise_XX handshake, with the cluster's vouching for server nodes.
//!
//! Pattern `Noise_XX_25519_ChaChaPoly_SHA256`, prologue `quicproquo/1`. Handshake messages are
//! sent as `[u16 big-endian length][message]`. The responder (a server node) puts its
//! [`NodeCertificate`] in the payload of message 2; the initiator checks it against the pinned
//! cluster public key before sending message 3, so a client never completes a handshake with a
//! node the cluster does not vouch for.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::cert::{NodeCertificate, NodeVerifier};
use crate::error::KeyError;
use crate::error::TransportError;
use crate::keys::{NodeRole, NoiseKeypair};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_SHA256";
/// The prologue both sides mix into the handshake: a protocol version.
pub const PROLOGUE: &[u8] = b"quicproquo/1";
/// Largest Noise message (RFC: 65535 bytes).
pub const MAX_NOISE_MESSAGE: usize = 65535;
/// AEAD tag length.
pub const TAG_LEN: usize = 16;
/// Largest plaintext carried by one transport message.
pub const MAX_NOISE_PLAINTEXT: usize = MAX_NOISE_MESSAGE - TAG_LEN;
/// Handshake messages are small; anything longer is refused without reading it.
const MAX_HANDSHAKE_MESSAGE: usize = 512;

/// The established transport keys, shared by the read and write halves of a channel.
///
/// Uses snow's stateless transport state: each half keeps its own nonce counter, so the halves
/// need no lock between them.
pub struct Session {
    state: snow::StatelessTransportState,
}

impl Session {
    pub(crate) fn seal(
        &self,
        nonce: u64,
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, TransportError> {
        self.state
            .write_message(nonce, plaintext, out)
            .map_err(|e| TransportError::Encrypt(e.to_string()))
    }

    pub(crate) fn open(
        &self,
        nonce: u64,
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, TransportError> {
        self.state
            .read_message(nonce, ciphertext, out)
            .map_err(|_| TransportError::Decrypt)
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

/// What a completed handshake yields.
#[derive(Debug)]
pub struct HandshakeOutcome {
    /// Transport keys for the channel.
    pub session: Arc<Session>,
    /// The Noise handshake hash: unique to this session, for channel binding.
    pub handshake_hash: [u8; 32],
    /// The peer's Noise static public key.
    pub remote_static: [u8; 32],
    /// The role the server's certificate vouches for (initiator side only).
    pub server_role: Option<NodeRole>,
    /// The certificate the initiator presented in message 3, if any (responder side only).
    /// Unverified: the responder checks it against its cluster key and `remote_static`.
    pub peer_certificate: Option<NodeCertificate>,
}

fn snow_error(e: snow::Error) -> TransportError {
    TransportError::Handshake(e.to_string())
}

fn builder(local: &NoiseKeypair) -> Result<snow::Builder<'_>, TransportError> {
    let params: snow::params::NoiseParams = NOISE_PARAMS
        .parse()
        .map_err(|e: snow::Error| TransportError::Handshake(e.to_string()))?;
    snow::Builder::new(params)
        .local_private_key(local.secret())
        .and_then(|b| b.prologue(PROLOGUE))
        .map_err(snow_error)
}

async fn write_handshake<S: AsyncWrite + Unpin>(
    io: &mut S,
    msg: &[u8],
) -> Result<(), TransportError> {
    let len = u16::try_from(msg.len())
        .map_err(|_| TransportError::Handshake("handshake message too long".into()))?;
    let mut buf = Vec::with_capacity(2 + msg.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(msg);
    io.write_all(&buf).await?;
    io.flush().await?;
    Ok(())
}

/// Length of an X25519 public key, the first field of handshake messages 1 and 2 (the sender's
/// ephemeral key, in the clear).
const KEY_LEN: usize = 32;

/// Refuses a low-order X25519 public key: one whose product with any clamped scalar (a
/// multiple of the cofactor) is the identity, so every Diffie-Hellman with it is all zero.
/// Public data only, so the comparison need not be constant-time.
fn check_contributory(public: &[u8]) -> Result<(), TransportError> {
    let Ok(point) = <[u8; KEY_LEN]>::try_from(public) else {
        return Err(TransportError::Handshake(
            "public key of the wrong length".into(),
        ));
    };
    // Any fixed scalar works: x25519 clamps it to a multiple of 8, which sends exactly the
    // low-order points (and only them) to zero.
    let shared = x25519_dalek::x25519([0x5a; KEY_LEN], point);
    if shared == [0u8; KEY_LEN] {
        return Err(TransportError::LowOrderKey);
    }
    Ok(())
}

/// Checks the ephemeral key that opens handshake message `msg` (messages 1 and 2); a message
/// too short to hold one is left to the handshake itself to refuse.
fn check_ephemeral(msg: &[u8]) -> Result<(), TransportError> {
    match msg.get(..KEY_LEN) {
        Some(e) => check_contributory(e),
        None => Ok(()),
    }
}

async fn read_handshake<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut [u8; MAX_HANDSHAKE_MESSAGE],
) -> Result<usize, TransportError> {
    let mut len = [0u8; 2];
    read_exact_or_closed(io, &mut len).await?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > MAX_HANDSHAKE_MESSAGE {
        return Err(TransportError::Handshake(format!(
            "handshake message of {len} bytes exceeds {MAX_HANDSHAKE_MESSAGE}"
        )));
    }
    read_exact_or_closed(io, &mut buf[..len]).await?;
    Ok(len)
}

async fn read_exact_or_closed<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut [u8],
) -> Result<(), TransportError> {
    match io.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(TransportError::Closed),
        Err(e) => Err(e.into()),
    }
}

fn finish(
    hs: snow::HandshakeState,
    server_role: Option<NodeRole>,
    peer_certificate: Option<NodeCertificate>,
) -> Result<HandshakeOutcome, TransportError> {
    let remote_static: [u8; 32] = hs
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| TransportError::Handshake("peer sent no static key".into()))?;
    check_contributory(&remote_static)?;
    let handshake_hash: [u8; 32] = hs
        .get_handshake_hash()
        .try_into()
        .map_err(|_| TransportError::Handshake("unexpected handshake hash length".into()))?;
    let state = hs.into_stateless_transport_mode().map_err(snow_error)?;
    Ok(HandshakeOutcome {
        session: Arc::new(Session { state }),
        handshake_hash,
        remote_static,
        server_role,
        peer_certificate,
    })
}

/// What the initiator answers to a server certificate it refuses: a wrong cluster key when no
/// trusted key vouches for the server, the reason itself when one does but not for now.
fn refused_certificate(e: KeyError) -> TransportError {
    match e {
        KeyError::CertificateExpired { .. } | KeyError::CertificateNotYetValid { .. } => {
            TransportError::RefusedCertificate(e)
        }
        _ => TransportError::WrongClusterKey,
    }
}

async fn with_deadline<T>(
    deadline: Duration,
    fut: impl Future<Output = Result<T, TransportError>>,
) -> Result<T, TransportError> {
    tokio::time::timeout(deadline, fut)
        .await
        .map_err(|_| TransportError::HandshakeTimeout)?
}

/// Runs the initiator (client) side of the handshake within `deadline`.
///
/// Fails with [`TransportError::WrongClusterKey`] when the responder's certificate does not
/// verify under the verifier's trusted cluster keys, and with
/// [`TransportError::RefusedCertificate`] when it has expired or is not valid yet; message 3 is
/// then never sent.
pub async fn initiate<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    local: &NoiseKeypair,
    verifier: &NodeVerifier,
    deadline: Duration,
) -> Result<HandshakeOutcome, TransportError> {
    initiate_with(io, local, verifier, None, deadline).await
}

/// Runs the initiator side as a cluster node: like [`initiate`], and also presents
/// `certificate` (this node's, issued by a cluster key) in message 3, so the responder can
/// tell a fellow node from a client.
pub async fn initiate_as_node<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    local: &NoiseKeypair,
    verifier: &NodeVerifier,
    certificate: &NodeCertificate,
    deadline: Duration,
) -> Result<HandshakeOutcome, TransportError> {
    initiate_with(io, local, verifier, Some(certificate), deadline).await
}

async fn initiate_with<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    local: &NoiseKeypair,
    verifier: &NodeVerifier,
    certificate: Option<&NodeCertificate>,
    deadline: Duration,
) -> Result<HandshakeOutcome, TransportError> {
    with_deadline(deadline, async {
        let mut hs = builder(local)?.build_initiator().map_err(snow_error)?;
        let mut msg = [0u8; MAX_HANDSHAKE_MESSAGE];
        let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];

        let n = hs.write_message(&[], &mut msg).map_err(snow_error)?;
        write_handshake(io, &msg[..n]).await?;

        let n = read_handshake(io, &mut msg).await?;
        check_ephemeral(&msg[..n])?;
        let p = hs
            .read_message(&msg[..n], &mut payload)
            .map_err(snow_error)?;
        let cert = NodeCertificate::decode(&payload[..p])?;
        let server_static: [u8; 32] = hs
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| TransportError::Handshake("responder sent no static key".into()))?;
        check_contributory(&server_static)?;
        let role = verifier
            .verify(&cert, &server_static)
            .map_err(refused_certificate)?;

        // Message 3 is encrypted to the responder: the certificate is not visible on the wire.
        let own = certificate.map(NodeCertificate::encode);
        let n = hs
            .write_message(own.as_deref().unwrap_or(&[]), &mut msg)
            .map_err(snow_error)?;
        write_handshake(io, &msg[..n]).await?;
        finish(hs, Some(role), None)
    })
    .await
}

/// Runs the responder (server) side of the handshake within `deadline`, presenting `certificate`.
pub async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    local: &NoiseKeypair,
    certificate: &NodeCertificate,
    deadline: Duration,
) -> Result<HandshakeOutcome, TransportError> {
    with_deadline(deadline, async {
        let mut hs = builder(local)?.build_responder().map_err(snow_error)?;
        let mut msg = [0u8; MAX_HANDSHAKE_MESSAGE];
        let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];

        let n = read_handshake(io, &mut msg).await?;
        check_ephemeral(&msg[..n])?;
        hs.read_message(&msg[..n], &mut payload)
            .map_err(snow_error)?;

        let n = hs
            .write_message(&certificate.encode(), &mut msg)
            .map_err(snow_error)?;
        write_handshake(io, &msg[..n]).await?;

        let n = read_handshake(io, &mut msg).await?;
        let p = hs
            .read_message(&msg[..n], &mut payload)
            .map_err(snow_error)?;
        // A client sends nothing; a cluster node sends its certificate.
        let peer_certificate = if p == 0 {
            None
        } else {
            Some(NodeCertificate::decode(&payload[..p])?)
        };
        finish(hs, None, peer_certificate)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The low-order points of Curve25519 (u-coordinates, little-endian), and encodings of them
    /// at or above the field prime p = 2^255 - 19.
    const LOW_ORDER: [&str; 6] = [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ];

    #[test]
    fn low_order_keys_are_refused_and_real_ones_accepted() -> Result<(), TransportError> {
        for hex_point in LOW_ORDER {
            let point =
                hex::decode(hex_point).map_err(|e| TransportError::Handshake(e.to_string()))?;
            assert!(
                matches!(check_contributory(&point), Err(TransportError::LowOrderKey)),
                "{hex_point}"
            );
        }
        let real = NoiseKeypair::generate()?;
        check_contributory(real.public())?;
        Ok(())
    }

    #[tokio::test]
    async fn a_responder_answers_nothing_to_a_low_order_ephemeral() -> Result<(), TransportError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let server = NoiseKeypair::generate()?;
        let cluster = crate::ClusterSigningKey::generate()?;
        let cert = cluster.certify(NodeRole::Standalone, server.public());
        let (mut client, mut io) = tokio::io::duplex(4096);
        let responder =
            tokio::spawn(
                async move { respond(&mut io, &server, &cert, Duration::from_secs(5)).await },
            );
        // Message 1 of XX: the ephemeral key alone, here the all-zero point.
        let mut msg1 = vec![0, KEY_LEN as u8];
        msg1.extend_from_slice(&[0u8; KEY_LEN]);
        client.write_all(&msg1).await?;
        let outcome = responder
            .await
            .map_err(|e| TransportError::Handshake(e.to_string()))?;
        assert!(matches!(outcome, Err(TransportError::LowOrderKey)));
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await?;
        assert!(
            answer.is_empty(),
            "the responder wrote {} bytes",
            answer.len()
        );
        Ok(())
    }
}
