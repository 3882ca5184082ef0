//! The GroupInfo a committer uploads with its commit: the one openmls built for the Welcome
//! (which carries the ratchet tree, for the joiners), re-signed without the tree. The server
//! keeps the tree in its public view (ADR 0018), so each commit uploads and the server checks
//! a few hundred bytes instead of a copy of the whole tree.

use openmls::prelude::SignContent;
use openmls::prelude::tls_codec::Serialize as _;
use openmls_traits::signatures::Signer;

use super::GroupError;
use super::lifetime::{put_vector, take, vector};

/// MLSMessage header of a GroupInfo: version mls10, wire format mls_group_info.
const HEADER: [u8; 4] = [0, 1, 0, 4];
/// The ratchet_tree extension type.
const RATCHET_TREE: u16 = 2;

/// `group_info` (a serialized MLSMessage GroupInfo) without its ratchet_tree extension, signed
/// again by `signer` (RFC 9420 §12.4.3: the signature covers the extensions). Everything else
/// (group context, other extensions, confirmation tag, signer index) is kept byte for byte.
pub(super) fn without_ratchet_tree(
    group_info: &[u8],
    signer: &impl Signer,
) -> Result<Vec<u8>, GroupError> {
    let malformed = || GroupError::library("openmls built a malformed GroupInfo");
    let mut r = group_info.strip_prefix(&HEADER).ok_or_else(malformed)?;
    let start = r;
    // GroupContext: version, cipher_suite, group_id, epoch, tree_hash,
    // confirmed_transcript_hash, extensions.
    take(&mut r, 4).ok_or_else(malformed)?;
    vector(&mut r).ok_or_else(malformed)?;
    take(&mut r, 8).ok_or_else(malformed)?;
    for _ in 0..3 {
        vector(&mut r).ok_or_else(malformed)?;
    }
    let context = &start[..start.len() - r.len()];
    let mut all = vector(&mut r).ok_or_else(malformed)?;
    let mut kept = Vec::new();
    while !all.is_empty() {
        let before = all;
        let kind = take(&mut all, 2).ok_or_else(malformed)?;
        vector(&mut all).ok_or_else(malformed)?;
        if u16::from_be_bytes([kind[0], kind[1]]) != RATCHET_TREE {
            kept.extend_from_slice(&before[..before.len() - all.len()]);
        }
    }
    let tail = r;
    vector(&mut r).ok_or_else(malformed)?; // confirmation tag
    take(&mut r, 4).ok_or_else(malformed)?; // signer
    let tag_and_signer = &tail[..tail.len() - r.len()];
    vector(&mut r).ok_or_else(malformed)?; // signature
    if !r.is_empty() {
        return Err(malformed());
    }
    let mut tbs = Vec::with_capacity(context.len() + kept.len() + tag_and_signer.len() + 4);
    tbs.extend_from_slice(context);
    put_vector(&mut tbs, &kept).ok_or_else(malformed)?;
    tbs.extend_from_slice(tag_and_signer);
    let content = SignContent::new("GroupInfoTBS", tbs.clone().into())
        .tls_serialize_detached()
        .map_err(GroupError::library)?;
    let signature = signer
        .sign(&content)
        .map_err(|e| GroupError::library(format!("signing the GroupInfo: {e:?}")))?;
    let mut out = Vec::with_capacity(HEADER.len() + tbs.len() + signature.len() + 4);
    out.extend_from_slice(&HEADER);
    out.extend_from_slice(&tbs);
    put_vector(&mut out, &signature).ok_or_else(malformed)?;
    Ok(out)
}
