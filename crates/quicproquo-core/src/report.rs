//! A member's signed report of a commit it cannot process (ADR 0015).
//!
//! The Delivery Service's public view of a group cannot check a commit's confirmation tag,
//! membership tag or encrypted path secrets (ADR 0012), so a validly signed commit that every
//! member refuses can still be appended. A member that fails to process such a commit reports
//! it: it signs, with its identity key,
//!
//! `"quicproquo commit report v1" ‖ u16 group id length ‖ group id ‖ u64 seq ‖
//!  SHA-256(commit bytes) ‖ reporter identity`
//!
//! (integers big-endian). The signature binds the report to one group, one position in its
//! log and the exact bytes logged there, so it cannot be replayed elsewhere, and it names who
//! reported: the server keeps the report in the log's revert marker, where every member can
//! check it.
//!
//! Encoding (137 bytes): version `1` ‖ reporter (32) ‖ seq (8, big-endian) ‖ commit hash (32) ‖
//! signature (64).

use sha2::{Digest, Sha256};

use crate::identity::{IdentityKey, IdentityKeypair};

const REPORT_DOMAIN: &[u8] = b"quicproquo commit report v1";
const VERSION: u8 = 1;
/// Length of an encoded report.
pub const REPORT_LEN: usize = 1 + 32 + 8 + 32 + 64;

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The bytes are not an encoded report of this version.
    #[error("malformed commit report")]
    Malformed,
    /// The report names another group position's commit: its hash is not that of the bytes
    /// logged at its seq.
    #[error("the report names other commit bytes than the ones logged at its seq")]
    WrongCommit,
    /// The signature does not verify with the reporter's identity key.
    #[error("the report's signature does not verify with the reporter's identity key")]
    BadSignature,
}

/// A signed report that the commit at `seq` in a group cannot be processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReport {
    /// Who reports (whose identity key signed).
    pub reporter: IdentityKey,
    /// The reported commit's position in the group's log.
    pub seq: u64,
    /// SHA-256 of the reported commit's bytes as logged.
    pub commit_hash: [u8; 32],
    signature: [u8; 64],
}

impl CommitReport {
    /// Signs a report of `commit` (its bytes as logged) at `seq` in `group_id`.
    pub fn sign(keypair: &IdentityKeypair, group_id: &[u8], seq: u64, commit: &[u8]) -> Self {
        let reporter = keypair.public();
        let commit_hash: [u8; 32] = Sha256::digest(commit).into();
        let signature = keypair.sign_message(&signed(group_id, seq, &commit_hash, &reporter));
        Self {
            reporter,
            seq,
            commit_hash,
            signature,
        }
    }

    /// The report's encoding ([`REPORT_LEN`] bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(REPORT_LEN);
        out.push(VERSION);
        out.extend_from_slice(self.reporter.as_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.commit_hash);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes a report (not yet verified: see [`CommitReport::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, ReportError> {
        if bytes.len() != REPORT_LEN || bytes[0] != VERSION {
            return Err(ReportError::Malformed);
        }
        let field = |from: usize, to: usize| bytes.get(from..to).ok_or(ReportError::Malformed);
        let reporter =
            IdentityKey::from_slice(field(1, 33)?).map_err(|_| ReportError::Malformed)?;
        let seq = u64::from_be_bytes(
            field(33, 41)?
                .try_into()
                .map_err(|_| ReportError::Malformed)?,
        );
        let commit_hash = field(41, 73)?
            .try_into()
            .map_err(|_| ReportError::Malformed)?;
        let signature = field(73, REPORT_LEN)?
            .try_into()
            .map_err(|_| ReportError::Malformed)?;
        Ok(Self {
            reporter,
            seq,
            commit_hash,
            signature,
        })
    }

    /// Checks that the report is about `commit` (its bytes as logged at the report's seq) in
    /// `group_id`, and that the reporter signed it.
    pub fn verify(&self, group_id: &[u8], commit: &[u8]) -> Result<(), ReportError> {
        let hash: [u8; 32] = Sha256::digest(commit).into();
        if hash != self.commit_hash {
            return Err(ReportError::WrongCommit);
        }
        let message = signed(group_id, self.seq, &self.commit_hash, &self.reporter);
        if !self.reporter.verify_signed(&message, &self.signature) {
            return Err(ReportError::BadSignature);
        }
        Ok(())
    }
}

/// The signed message: the domain, then the group, seq, commit hash and reporter.
fn signed(group_id: &[u8], seq: u64, commit_hash: &[u8; 32], reporter: &IdentityKey) -> Vec<u8> {
    let mut msg = Vec::with_capacity(REPORT_DOMAIN.len() + 2 + group_id.len() + 8 + 64);
    msg.extend_from_slice(REPORT_DOMAIN);
    // Group ids are at most 256 bytes; a longer one cannot be a group's and never verifies.
    let len = u16::try_from(group_id.len()).unwrap_or(u16::MAX);
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(group_id);
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(commit_hash);
    msg.extend_from_slice(reporter.as_bytes());
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::KeyError;

    #[test]
    fn a_report_verifies_only_for_its_group_seq_commit_and_signer() -> Result<(), KeyError> {
        let bob = IdentityKeypair::generate()?;
        let report = CommitReport::sign(&bob, b"group", 7, b"commit bytes");
        let decoded = CommitReport::decode(&report.encode()).map_err(|_| KeyError::BadBinding)?;
        assert_eq!(decoded, report);
        assert_eq!(decoded.verify(b"group", b"commit bytes"), Ok(()));
        assert_eq!(
            decoded.verify(b"group", b"other bytes"),
            Err(ReportError::WrongCommit)
        );
        assert_eq!(
            decoded.verify(b"other group", b"commit bytes"),
            Err(ReportError::BadSignature)
        );
        let mut moved = decoded.clone();
        moved.seq = 8;
        assert_eq!(
            moved.verify(b"group", b"commit bytes"),
            Err(ReportError::BadSignature)
        );
        let mallory = IdentityKeypair::generate()?;
        let mut claimed = decoded.clone();
        claimed.reporter = mallory.public();
        assert_eq!(
            claimed.verify(b"group", b"commit bytes"),
            Err(ReportError::BadSignature)
        );
        let mut flipped = report.encode();
        flipped[100] ^= 1;
        let flipped = CommitReport::decode(&flipped).map_err(|_| KeyError::BadBinding)?;
        assert_eq!(
            flipped.verify(b"group", b"commit bytes"),
            Err(ReportError::BadSignature)
        );
        Ok(())
    }

    #[test]
    fn malformed_reports_are_refused() -> Result<(), KeyError> {
        let bob = IdentityKeypair::generate()?;
        let bytes = CommitReport::sign(&bob, b"g", 1, b"c").encode();
        assert_eq!(
            CommitReport::decode(&bytes[..REPORT_LEN - 1]),
            Err(ReportError::Malformed)
        );
        let mut versioned = bytes.clone();
        versioned[0] = 2;
        assert_eq!(
            CommitReport::decode(&versioned),
            Err(ReportError::Malformed)
        );
        assert_eq!(CommitReport::decode(&[]), Err(ReportError::Malformed));
        Ok(())
    }
}
