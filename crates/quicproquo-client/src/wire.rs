//! The client's one reader or writer per wire type shared by several calls: identity lists
//! and group ids (the server parses the same types in its own `wire` module).

use capnp::data_list;
use quicproquo_core::IdentityKey;
use quicproquo_proto::errors::ErrorCode;

use crate::{ClientError, call_error};

/// The length of a list to send, refused when the wire cannot carry that many `what`.
pub(crate) fn list_len(len: usize, what: &str) -> Result<u32, ClientError> {
    u32::try_from(len).map_err(|_| ClientError::Service {
        code: ErrorCode::InvalidArgument,
        message: format!("too many {what}"),
    })
}

/// Fills a list initialised with `ids.len()` entries (see [`list_len`]) with identity keys.
pub(crate) fn write_identities(mut list: data_list::Builder<'_>, ids: &[IdentityKey]) {
    for (i, id) in (0u32..).zip(ids) {
        list.set(i, id.as_bytes());
    }
}

/// An identity key from the wire.
pub(crate) fn read_identity(bytes: capnp::Result<&[u8]>) -> Result<IdentityKey, ClientError> {
    Ok(IdentityKey::from_slice(bytes.map_err(call_error)?)?)
}

/// A list of identity keys from the wire.
pub(crate) fn read_identities(
    list: capnp::Result<data_list::Reader<'_>>,
) -> Result<Vec<IdentityKey>, ClientError> {
    list.map_err(call_error)?
        .iter()
        .map(read_identity)
        .collect()
}

/// A group id from the wire.
pub(crate) fn read_group_id(bytes: capnp::Result<&[u8]>) -> Result<Vec<u8>, ClientError> {
    Ok(bytes.map_err(call_error)?.to_vec())
}

/// How a group id is shown to people: its first 4 bytes in hex (a prefix the messenger
/// accepts wherever it asks for a group).
pub fn short_group_id(group_id: &[u8]) -> String {
    hex::encode(&group_id[..group_id.len().min(4)])
}

#[cfg(test)]
mod tests {
    use quicproquo_core::IdentityKeypair;

    use super::*;

    #[test]
    fn identity_lists_round_trip_through_a_message() -> Result<(), ClientError> {
        let ids = [
            IdentityKeypair::generate()?.public(),
            IdentityKeypair::generate()?.public(),
        ];
        let mut message = capnp::message::Builder::new_default();
        let root: data_list::Builder<'_> = message.initn_root(list_len(ids.len(), "ids")?);
        write_identities(root, &ids);
        let reader = message.get_root_as_reader::<data_list::Reader<'_>>();
        assert_eq!(read_identities(reader)?, ids);
        Ok(())
    }

    #[test]
    fn a_malformed_identity_is_refused() {
        assert!(matches!(
            read_identity(Ok(&[1, 2, 3])),
            Err(ClientError::Key(_))
        ));
    }

    #[test]
    fn group_ids_are_shown_by_their_first_four_bytes() {
        assert_eq!(short_group_id(&[0xab, 0xcd, 0xef, 0x01, 0x23]), "abcdef01");
        assert_eq!(short_group_id(&[0xab]), "ab");
        assert_eq!(short_group_id(&[]), "");
    }
}
