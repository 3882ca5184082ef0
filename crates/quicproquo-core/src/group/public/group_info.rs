//! The check of the GroupInfo a committer uploads for the epoch its commit starts.

use super::*;

impl PublicView {
    /// Checks the committer's GroupInfo for the merged epoch on its encoding (RFC 9420
    /// §12.4.3): an MLSMessage GroupInfo whose group context is the view's (which binds the
    /// tree through its tree hash: a joiner checks the tree it gets against it), whose
    /// extensions are well framed and of the types a GroupInfo may carry but not the ratchet
    /// tree (the server has the tree; hashing a copy of it per commit would cost more than
    /// the whole check), whose confirmation tag is the commit's and signer the committer,
    /// and whose signature verifies with the committer's leaf key.
    pub(super) fn check_group_info(
        &self,
        raw: &[u8],
        committer: LeafNodeIndex,
        tag: &ConfirmationTag,
    ) -> Result<(), ViewError> {
        // MLSMessage: version mls10, wire format mls_group_info.
        let body = raw
            .strip_prefix(&[0, 1, 0, 4])
            .ok_or(ViewError::GroupInfo("not a GroupInfo"))?;
        let context = self
            .group
            .group_context()
            .tls_serialize_detached()
            .map_err(library)?;
        let mut rest = body
            .strip_prefix(context.as_slice())
            .ok_or(ViewError::GroupInfo("it does not describe the new epoch"))?;
        let malformed = ViewError::GroupInfo("malformed");
        let mut extensions = framing::vector(&mut rest).ok_or(malformed.clone())?;
        while !extensions.is_empty() {
            let kind = framing::take(&mut extensions, 2).ok_or(malformed.clone())?;
            let kind = u16::from_be_bytes([kind[0], kind[1]]);
            if kind == 2 {
                return Err(ViewError::GroupInfo(
                    "it carries the ratchet tree: upload it without (the server has the tree)",
                ));
            }
            // external_pub (4), external_senders (5) and private ones.
            if !matches!(kind, 4 | 5 | 0xf000..) {
                return Err(ViewError::GroupInfo(
                    "an extension a GroupInfo may not carry",
                ));
            }
            framing::vector(&mut extensions).ok_or(malformed.clone())?;
        }
        let tag = tag.tls_serialize_detached().map_err(library)?;
        rest = rest
            .strip_prefix(tag.as_slice())
            .ok_or(ViewError::GroupInfo(
                "its confirmation tag is not the commit's",
            ))?;
        let signer = framing::take(&mut rest, 4).ok_or(malformed.clone())?;
        if u32::from_be_bytes([signer[0], signer[1], signer[2], signer[3]]) != committer.u32() {
            return Err(ViewError::GroupInfo("its signer is not the committer"));
        }
        let tbs = &body[..body.len() - rest.len()];
        let signature = framing::vector(&mut rest).ok_or(malformed.clone())?;
        if !rest.is_empty() {
            return Err(malformed);
        }
        let leaf = self
            .group
            .leaf(committer)
            .ok_or(ViewError::GroupInfo("its signer is not the committer"))?;
        let content = SignContent::new("GroupInfoTBS", tbs.to_vec().into())
            .tls_serialize_detached()
            .map_err(library)?;
        RustCrypto::default()
            .verify_signature(
                SignatureScheme::ED25519,
                &content,
                leaf.signature_key().as_slice(),
                signature,
            )
            .map_err(|_| ViewError::GroupInfo("its signature does not verify"))
    }
}
