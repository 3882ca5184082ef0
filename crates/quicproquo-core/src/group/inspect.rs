//! What the server may learn of an MLS message without any keys.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{ContentType, MlsMessageBodyIn, MlsMessageIn, ProtocolMessage};

use super::GroupError;

/// The kind of an MLS message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// An application message (always a PrivateMessage).
    Application,
    /// A commit.
    Commit,
    /// A standalone proposal.
    Proposal,
    /// A Welcome for new members.
    Welcome,
    /// A GroupInfo.
    GroupInfo,
    /// A KeyPackage wrapped in an MLSMessage.
    KeyPackage,
}

/// The public framing of an MLS message, as [`inspect`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageInfo {
    /// What the message is.
    pub kind: MessageKind,
    /// The group it belongs to: known for application messages, proposals, commits and
    /// GroupInfos; `None` for Welcomes (whose GroupInfo is encrypted) and KeyPackages.
    pub group_id: Option<Vec<u8>>,
    /// The epoch it was sent in (for a commit: the epoch it applies to, i.e. the one it
    /// ends); `None` for Welcomes and KeyPackages.
    pub epoch: Option<u64>,
    /// Whether it uses PrivateMessage framing. Our clients send handshake messages (commits,
    /// proposals) as PublicMessage and application messages as PrivateMessage.
    pub encrypted: bool,
}

/// Reads the kind, group id and epoch of a serialized `MLSMessage` from its public framing,
/// for the server: no keys, no signature or membership-tag verification, no decryption.
///
/// The values are what the sender wrote, unauthenticated towards the server (members
/// authenticate them when they process the message). They suffice to order a group's log: one
/// commit per epoch, first wins.
///
/// Errors with [`GroupError::Malformed`] for anything that is not exactly one well-formed
/// MLSMessage (garbage, truncation, trailing bytes, a protocol version other than MLS 1.0).
pub fn inspect(message: &[u8]) -> Result<MessageInfo, GroupError> {
    let message =
        MlsMessageIn::tls_deserialize_exact(message).map_err(|_| GroupError::Malformed)?;
    let info = match message.extract() {
        MlsMessageBodyIn::PublicMessage(m) => protocol_info(&ProtocolMessage::from(m)),
        MlsMessageBodyIn::PrivateMessage(m) => protocol_info(&ProtocolMessage::from(m)),
        MlsMessageBodyIn::Welcome(_) => keyless(MessageKind::Welcome),
        MlsMessageBodyIn::KeyPackage(_) => keyless(MessageKind::KeyPackage),
        MlsMessageBodyIn::GroupInfo(info) => MessageInfo {
            kind: MessageKind::GroupInfo,
            group_id: Some(info.group_id().as_slice().to_vec()),
            epoch: Some(info.epoch().as_u64()),
            encrypted: false,
        },
    };
    Ok(info)
}

/// The kind of a message body.
pub(super) fn kind_of(body: &MlsMessageBodyIn) -> MessageKind {
    match body {
        MlsMessageBodyIn::PublicMessage(m) => content_kind(m.content_type()),
        MlsMessageBodyIn::PrivateMessage(m) => content_kind(m.content_type()),
        MlsMessageBodyIn::Welcome(_) => MessageKind::Welcome,
        MlsMessageBodyIn::GroupInfo(_) => MessageKind::GroupInfo,
        MlsMessageBodyIn::KeyPackage(_) => MessageKind::KeyPackage,
    }
}

fn content_kind(content_type: ContentType) -> MessageKind {
    match content_type {
        ContentType::Application => MessageKind::Application,
        ContentType::Proposal => MessageKind::Proposal,
        ContentType::Commit => MessageKind::Commit,
    }
}

fn protocol_info(message: &ProtocolMessage) -> MessageInfo {
    MessageInfo {
        kind: content_kind(message.content_type()),
        group_id: Some(message.group_id().as_slice().to_vec()),
        epoch: Some(message.epoch().as_u64()),
        encrypted: matches!(message, ProtocolMessage::PrivateMessage(_)),
    }
}

fn keyless(kind: MessageKind) -> MessageInfo {
    MessageInfo {
        kind,
        group_id: None,
        epoch: None,
        encrypted: false,
    }
}
