//! The view's openmls public storage and its compact state encoding: each entity
//! postcard-encoded, framed into one blob a store writes with the commit that produced it.

use super::*;

/// Error of [`ViewStorage`]: an entity did not encode or decode.
#[derive(Debug, thiserror::Error)]
#[error("group view storage: {0}")]
pub struct ViewStorageError(&'static str);

/// The openmls public storage of one view write: each entity postcard-encoded, then the whole
/// framed into one state blob ([`ViewStorage::encode`]). A [`discarding`](Self::discarding)
/// one encodes nothing: a merge that is not a snapshot writes no part of the state (the store
/// keeps the verified message instead, ADR 0018).
#[derive(Default)]
pub(super) struct ViewStorage {
    discard: bool,
    tree: RefCell<Option<Vec<u8>>>,
    context: RefCell<Option<Vec<u8>>>,
    transcript: RefCell<Option<Vec<u8>>>,
    tag: RefCell<Option<Vec<u8>>>,
    pub(super) proposals: RefCell<Vec<Encoded>>,
}

/// One queued proposal, encoded: its reference and the proposal.
pub(super) type Encoded = (Vec<u8>, Vec<u8>);

/// Version byte of the encoded state.
const STATE_VERSION: u8 = 1;

impl ViewStorage {
    /// A storage whose writes of the state's parts are dropped unencoded (proposals are still
    /// recorded: they are small).
    pub(super) fn discarding() -> Self {
        Self {
            discard: true,
            ..Self::default()
        }
    }

    /// `version u8`, then tree, context, transcript hash, confirmation tag, each as
    /// `len u32 BE` + bytes.
    pub(super) fn encode(&self) -> Result<Vec<u8>, ViewError> {
        let parts = [&self.tree, &self.context, &self.transcript, &self.tag];
        let mut out = Vec::with_capacity(
            1 + parts
                .iter()
                .map(|p| 4 + p.borrow().as_ref().map_or(0, Vec::len))
                .sum::<usize>(),
        );
        out.push(STATE_VERSION);
        for part in parts {
            let part = part.borrow();
            let bytes = part
                .as_ref()
                .ok_or(ViewError::Corrupt("a part was not written"))?;
            let len = u32::try_from(bytes.len()).map_err(|_| ViewError::Corrupt("too large"))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }

    pub(super) fn decode(state: &[u8], proposals: &[u8]) -> Result<Self, ViewError> {
        let (&version, mut rest) = state
            .split_first()
            .ok_or(ViewError::Corrupt("empty state"))?;
        if version != STATE_VERSION {
            return Err(ViewError::Corrupt("unknown state version"));
        }
        let storage = Self::default();
        for part in [
            &storage.tree,
            &storage.context,
            &storage.transcript,
            &storage.tag,
        ] {
            let bytes = take(&mut rest)?;
            *part.borrow_mut() = Some(bytes.to_vec());
        }
        if !rest.is_empty() {
            return Err(ViewError::Corrupt("trailing bytes"));
        }
        *storage.proposals.borrow_mut() = decode_proposals(proposals)?;
        Ok(storage)
    }
}

fn take<'a>(bytes: &mut &'a [u8]) -> Result<&'a [u8], ViewError> {
    let short = ViewError::Corrupt("truncated");
    if bytes.len() < 4 {
        return Err(short);
    }
    let (len, rest) = bytes.split_at(4);
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if rest.len() < len {
        return Err(short);
    }
    let (part, rest) = rest.split_at(len);
    *bytes = rest;
    Ok(part)
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

pub(super) fn encode_proposals(queued: &[Encoded]) -> Vec<u8> {
    let mut out = Vec::new();
    for (r, p) in queued {
        put(&mut out, r);
        put(&mut out, p);
    }
    out
}

fn decode_proposals(mut bytes: &[u8]) -> Result<Vec<Encoded>, ViewError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let r = take(&mut bytes)?.to_vec();
        let p = take(&mut bytes)?.to_vec();
        out.push((r, p));
    }
    Ok(out)
}

fn to_bytes<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, ViewStorageError> {
    postcard::to_allocvec(value).map_err(|_| ViewStorageError("encode"))
}

fn from_bytes<T: serde::de::DeserializeOwned>(
    bytes: Option<&Vec<u8>>,
) -> Result<Option<T>, ViewStorageError> {
    bytes
        .map(|b| postcard::from_bytes(b).map_err(|_| ViewStorageError("decode")))
        .transpose()
}

macro_rules! write_part {
    ($name:ident, $field:ident, $bound:ident) => {
        fn $name<G: traits::GroupId<CURRENT_VERSION>, T: traits::$bound<CURRENT_VERSION>>(
            &self,
            _group_id: &G,
            value: &T,
        ) -> Result<(), ViewStorageError> {
            if self.discard {
                return Ok(());
            }
            *self.$field.borrow_mut() = Some(to_bytes(value)?);
            Ok(())
        }
    };
}

macro_rules! read_part {
    ($name:ident, $field:ident, $bound:ident) => {
        fn $name<G: traits::GroupId<CURRENT_VERSION>, T: traits::$bound<CURRENT_VERSION>>(
            &self,
            _group_id: &G,
        ) -> Result<Option<T>, ViewStorageError> {
            from_bytes(self.$field.borrow().as_ref())
        }
    };
}

macro_rules! delete_part {
    ($name:ident, $field:ident) => {
        fn $name<G: traits::GroupId<CURRENT_VERSION>>(
            &self,
            _group_id: &G,
        ) -> Result<(), ViewStorageError> {
            *self.$field.borrow_mut() = None;
            Ok(())
        }
    };
}

/// One group's storage: the group id arguments are ignored (a [`ViewStorage`] holds one group).
impl PublicStorageProvider<CURRENT_VERSION> for ViewStorage {
    type PublicError = ViewStorageError;

    write_part!(write_tree, tree, TreeSync);
    write_part!(
        write_interim_transcript_hash,
        transcript,
        InterimTranscriptHash
    );
    write_part!(write_context, context, GroupContext);
    write_part!(write_confirmation_tag, tag, ConfirmationTag);
    read_part!(tree, tree, TreeSync);
    read_part!(group_context, context, GroupContext);
    read_part!(interim_transcript_hash, transcript, InterimTranscriptHash);
    read_part!(confirmation_tag, tag, ConfirmationTag);
    delete_part!(delete_tree, tree);
    delete_part!(delete_confirmation_tag, tag);
    delete_part!(delete_context, context);
    delete_part!(delete_interim_transcript_hash, transcript);

    fn queue_proposal<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
        P: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        _group_id: &G,
        proposal_ref: &R,
        proposal: &P,
    ) -> Result<(), ViewStorageError> {
        let r = to_bytes(proposal_ref)?;
        let p = to_bytes(proposal)?;
        let mut queued = self.proposals.borrow_mut();
        queued.retain(|(old, _)| *old != r);
        queued.push((r, p));
        Ok(())
    }

    fn queued_proposals<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
        P: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        _group_id: &G,
    ) -> Result<Vec<(R, P)>, ViewStorageError> {
        self.proposals
            .borrow()
            .iter()
            .map(|(r, p)| {
                let r = from_bytes(Some(r))?.ok_or(ViewStorageError("decode"))?;
                let p = from_bytes(Some(p))?.ok_or(ViewStorageError("decode"))?;
                Ok((r, p))
            })
            .collect()
    }

    fn remove_proposal<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        _group_id: &G,
        proposal_ref: &R,
    ) -> Result<(), ViewStorageError> {
        let r = to_bytes(proposal_ref)?;
        self.proposals.borrow_mut().retain(|(old, _)| *old != r);
        Ok(())
    }

    fn clear_proposal_queue<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        _group_id: &G,
    ) -> Result<(), ViewStorageError> {
        self.proposals.borrow_mut().clear();
        Ok(())
    }
}
