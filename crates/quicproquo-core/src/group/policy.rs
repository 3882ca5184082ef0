//! Our acceptance policy for group contents: which proposals, and which credentials.

use openmls::prelude::{BasicCredential, Credential, LeafNode, Proposal};

use super::GroupError;
use crate::identity::IdentityKey;

/// Accepts Add, Update and Remove proposals whose new leaves (if any) are bound.
pub(super) fn check_proposal(proposal: &Proposal) -> Result<(), GroupError> {
    match proposal {
        Proposal::Add(add) => leaf_identity(add.key_package().leaf_node()).map(drop),
        Proposal::Update(update) => leaf_identity(update.leaf_node()).map(drop),
        Proposal::Remove(_) => Ok(()),
        other => Err(GroupError::Rejected(format!(
            "proposal type {:?} is not accepted",
            other.proposal_type()
        ))),
    }
}

/// The identity a credential names (basic credential holding an Ed25519 public key).
pub(super) fn identity_of(credential: &Credential) -> Result<IdentityKey, GroupError> {
    let basic =
        BasicCredential::try_from(credential.clone()).map_err(|_| GroupError::BadCredential)?;
    IdentityKey::from_slice(basic.identity()).map_err(|_| GroupError::BadCredential)
}

/// The identity of a leaf whose credential names its own signature key.
pub(super) fn bound_identity(
    credential: &Credential,
    signature_key: &[u8],
) -> Result<IdentityKey, GroupError> {
    let identity = identity_of(credential)?;
    if signature_key != identity.as_bytes() {
        return Err(GroupError::BadCredential);
    }
    Ok(identity)
}

pub(super) fn leaf_identity(leaf: &LeafNode) -> Result<IdentityKey, GroupError> {
    bound_identity(leaf.credential(), leaf.signature_key().as_slice())
}
