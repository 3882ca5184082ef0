//! openmls's [`StorageProvider`] over [`CompactStorage`]: each entity under its label and key.

use super::secret::SecretBytes;
use openmls_traits::storage::{CURRENT_VERSION, StorageProvider, traits};

use super::{CompactStorage, Label, StorageError, encode, key};

macro_rules! group_value {
    ($write:ident, $read:ident, $delete:ident, $label:ident, $bound:ident) => {
        fn $write<G: traits::GroupId<CURRENT_VERSION>, T: traits::$bound<CURRENT_VERSION>>(
            &self,
            group_id: &G,
            value: &T,
        ) -> Result<(), StorageError> {
            self.put(key(Label::$label, group_id)?, value)
        }

        fn $read<G: traits::GroupId<CURRENT_VERSION>, T: traits::$bound<CURRENT_VERSION>>(
            &self,
            group_id: &G,
        ) -> Result<Option<T>, StorageError> {
            self.get(&key(Label::$label, group_id)?)
        }

        fn $delete<G: traits::GroupId<CURRENT_VERSION>>(
            &self,
            group_id: &G,
        ) -> Result<(), StorageError> {
            self.delete(key(Label::$label, group_id)?)
        }
    };
}

impl StorageProvider<CURRENT_VERSION> for CompactStorage {
    type Error = StorageError;

    group_value!(write_tree, tree, delete_tree, Tree, TreeSync);
    group_value!(
        write_interim_transcript_hash,
        interim_transcript_hash,
        delete_interim_transcript_hash,
        InterimTranscriptHash,
        InterimTranscriptHash
    );
    group_value!(
        write_context,
        group_context,
        delete_context,
        Context,
        GroupContext
    );
    group_value!(
        write_confirmation_tag,
        confirmation_tag,
        delete_confirmation_tag,
        ConfirmationTag,
        ConfirmationTag
    );
    group_value!(
        write_message_secrets,
        message_secrets,
        delete_message_secrets,
        MessageSecrets,
        MessageSecrets
    );
    group_value!(
        write_resumption_psk_store,
        resumption_psk_store,
        delete_all_resumption_psk_secrets,
        ResumptionPskStore,
        ResumptionPskStore
    );
    group_value!(
        write_own_leaf_index,
        own_leaf_index,
        delete_own_leaf_index,
        OwnLeafIndex,
        LeafNodeIndex
    );
    group_value!(
        write_group_epoch_secrets,
        group_epoch_secrets,
        delete_group_epoch_secrets,
        EpochSecrets,
        GroupEpochSecrets
    );

    fn write_group_state<
        S: traits::GroupState<CURRENT_VERSION>,
        G: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
        group_state: &S,
    ) -> Result<(), StorageError> {
        self.put(key(Label::GroupState, group_id)?, group_state)
    }

    fn group_state<S: traits::GroupState<CURRENT_VERSION>, G: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &G,
    ) -> Result<Option<S>, StorageError> {
        self.get(&key(Label::GroupState, group_id)?)
    }

    fn delete_group_state<G: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &G,
    ) -> Result<(), StorageError> {
        self.delete(key(Label::GroupState, group_id)?)
    }

    fn write_mls_join_config<
        G: traits::GroupId<CURRENT_VERSION>,
        C: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
        config: &C,
    ) -> Result<(), StorageError> {
        let json = serde_json::to_vec(config).map_err(|_| StorageError::Encode)?;
        self.put_raw(key(Label::JoinConfig, group_id)?, SecretBytes::from(json))
    }

    fn mls_group_join_config<
        G: traits::GroupId<CURRENT_VERSION>,
        C: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
    ) -> Result<Option<C>, StorageError> {
        let inner = self.read_inner()?;
        inner
            .values
            .get(&key(Label::JoinConfig, group_id)?)
            .map(|v| serde_json::from_slice(v.bytes()).map_err(|_| StorageError::Decode))
            .transpose()
    }

    fn delete_group_config<G: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &G,
    ) -> Result<(), StorageError> {
        self.delete(key(Label::JoinConfig, group_id)?)
    }

    fn append_own_leaf_node<
        G: traits::GroupId<CURRENT_VERSION>,
        L: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
        leaf_node: &L,
    ) -> Result<(), StorageError> {
        self.append(key(Label::OwnLeafNodes, group_id)?, leaf_node)
    }

    fn own_leaf_nodes<G: traits::GroupId<CURRENT_VERSION>, L: traits::LeafNode<CURRENT_VERSION>>(
        &self,
        group_id: &G,
    ) -> Result<Vec<L>, StorageError> {
        self.list(&key(Label::OwnLeafNodes, group_id)?)
    }

    fn delete_own_leaf_nodes<G: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &G,
    ) -> Result<(), StorageError> {
        self.delete(key(Label::OwnLeafNodes, group_id)?)
    }

    fn queue_proposal<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
        P: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
        proposal_ref: &R,
        proposal: &P,
    ) -> Result<(), StorageError> {
        self.put(
            key(Label::QueuedProposal, &(group_id, proposal_ref))?,
            proposal,
        )?;
        self.append(key(Label::ProposalRefs, group_id)?, proposal_ref)
    }

    fn queued_proposal_refs<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
    ) -> Result<Vec<R>, StorageError> {
        self.list(&key(Label::ProposalRefs, group_id)?)
    }

    fn queued_proposals<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
        P: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
    ) -> Result<Vec<(R, P)>, StorageError> {
        let refs: Vec<R> = self.queued_proposal_refs(group_id)?;
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            // A reference whose proposal is gone is skipped, as openmls's own stores do.
            if let Some(p) = self.get(&key(Label::QueuedProposal, &(group_id, &r))?)? {
                out.push((r, p));
            }
        }
        Ok(out)
    }

    fn remove_proposal<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
        proposal_ref: &R,
    ) -> Result<(), StorageError> {
        let encoded = encode(proposal_ref, 64)?;
        self.remove_from_list(key(Label::ProposalRefs, group_id)?, &encoded)?;
        self.delete(key(Label::QueuedProposal, &(group_id, proposal_ref))?)
    }

    fn clear_proposal_queue<
        G: traits::GroupId<CURRENT_VERSION>,
        R: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
    ) -> Result<(), StorageError> {
        let refs: Vec<R> = self.queued_proposal_refs(group_id)?;
        for r in refs {
            self.delete(key(Label::QueuedProposal, &(group_id, &r))?)?;
        }
        self.delete(key(Label::ProposalRefs, group_id)?)
    }

    fn write_signature_key_pair<
        P: traits::SignaturePublicKey<CURRENT_VERSION>,
        K: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &P,
        signature_key_pair: &K,
    ) -> Result<(), StorageError> {
        self.put(
            key(Label::SignatureKeyPair, public_key)?,
            signature_key_pair,
        )
    }

    fn signature_key_pair<
        P: traits::SignaturePublicKey<CURRENT_VERSION>,
        K: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &P,
    ) -> Result<Option<K>, StorageError> {
        self.get(&key(Label::SignatureKeyPair, public_key)?)
    }

    fn delete_signature_key_pair<P: traits::SignaturePublicKey<CURRENT_VERSION>>(
        &self,
        public_key: &P,
    ) -> Result<(), StorageError> {
        self.delete(key(Label::SignatureKeyPair, public_key)?)
    }

    fn write_encryption_key_pair<
        E: traits::EncryptionKey<CURRENT_VERSION>,
        K: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &E,
        key_pair: &K,
    ) -> Result<(), StorageError> {
        self.put(key(Label::EncryptionKeyPair, public_key)?, key_pair)
    }

    fn encryption_key_pair<
        K: traits::HpkeKeyPair<CURRENT_VERSION>,
        E: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &E,
    ) -> Result<Option<K>, StorageError> {
        self.get(&key(Label::EncryptionKeyPair, public_key)?)
    }

    fn delete_encryption_key_pair<E: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &E,
    ) -> Result<(), StorageError> {
        self.delete(key(Label::EncryptionKeyPair, public_key)?)
    }

    fn write_encryption_epoch_key_pairs<
        G: traits::GroupId<CURRENT_VERSION>,
        E: traits::EpochKey<CURRENT_VERSION>,
        K: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
        epoch: &E,
        leaf_index: u32,
        key_pairs: &[K],
    ) -> Result<(), StorageError> {
        let k = key(Label::EpochKeyPairs, &(group_id, epoch, leaf_index))?;
        self.put(k, key_pairs)
    }

    fn encryption_epoch_key_pairs<
        G: traits::GroupId<CURRENT_VERSION>,
        E: traits::EpochKey<CURRENT_VERSION>,
        K: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
        epoch: &E,
        leaf_index: u32,
    ) -> Result<Vec<K>, StorageError> {
        let k = key(Label::EpochKeyPairs, &(group_id, epoch, leaf_index))?;
        Ok(self.get(&k)?.unwrap_or_default())
    }

    fn delete_encryption_epoch_key_pairs<
        G: traits::GroupId<CURRENT_VERSION>,
        E: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &G,
        epoch: &E,
        leaf_index: u32,
    ) -> Result<(), StorageError> {
        self.delete(key(Label::EpochKeyPairs, &(group_id, epoch, leaf_index))?)
    }

    fn write_key_package<
        R: traits::HashReference<CURRENT_VERSION>,
        K: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &R,
        key_package: &K,
    ) -> Result<(), StorageError> {
        self.put(key(Label::KeyPackage, hash_ref)?, key_package)
    }

    fn key_package<
        R: traits::HashReference<CURRENT_VERSION>,
        K: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &R,
    ) -> Result<Option<K>, StorageError> {
        self.get(&key(Label::KeyPackage, hash_ref)?)
    }

    fn delete_key_package<R: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &R,
    ) -> Result<(), StorageError> {
        self.delete(key(Label::KeyPackage, hash_ref)?)
    }

    fn write_psk<I: traits::PskId<CURRENT_VERSION>, B: traits::PskBundle<CURRENT_VERSION>>(
        &self,
        psk_id: &I,
        psk: &B,
    ) -> Result<(), StorageError> {
        self.put(key(Label::Psk, psk_id)?, psk)
    }

    fn psk<B: traits::PskBundle<CURRENT_VERSION>, I: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &I,
    ) -> Result<Option<B>, StorageError> {
        self.get(&key(Label::Psk, psk_id)?)
    }

    fn delete_psk<I: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &I,
    ) -> Result<(), StorageError> {
        self.delete(key(Label::Psk, psk_id)?)
    }
}
