//! The one parser of each wire type a peer sends: each checks what it reads (lengths, counts,
//! key validity) and answers a typed `invalid_argument` (or `invalid_name`) error.

use quicproquo_core::IdentityKey;
use quicproquo_proto::errors::{ErrorCode, error};

use super::errors::model_error;
use crate::model::UserName;
use crate::model::group::GroupId;

/// A group id (1 to [`crate::model::group::MAX_GROUP_ID`] bytes).
pub fn group_id(bytes: &[u8]) -> Result<GroupId, capnp::Error> {
    GroupId::new(bytes).map_err(model_error)
}

/// One identity key.
pub fn identity(bytes: &[u8]) -> Result<IdentityKey, capnp::Error> {
    IdentityKey::from_slice(bytes).map_err(|e| error(ErrorCode::InvalidArgument, e))
}

/// A list of at most `max` identity keys.
pub fn identities(
    list: capnp::data_list::Reader<'_>,
    max: usize,
) -> Result<Vec<IdentityKey>, capnp::Error> {
    if list.len() as usize > max {
        return Err(error(
            ErrorCode::InvalidArgument,
            format!("at most {max} identities per call"),
        ));
    }
    list.iter().map(|id| identity(id?)).collect()
}

/// A user name, normalised.
pub fn user_name(text: capnp::text::Reader<'_>) -> Result<UserName, capnp::Error> {
    let raw = text
        .to_str()
        .map_err(|_| error(ErrorCode::InvalidName, "user name is not UTF-8"))?;
    UserName::parse(raw).map_err(model_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicproquo_proto::errors::code_of;

    #[test]
    fn identity_lists_are_bounded_and_checked() -> capnp::Result<()> {
        let mut message = capnp::message::Builder::new_default();
        let mut list = message.initn_root::<capnp::data_list::Builder<'_>>(3);
        list.set(0, &[1u8; 32]);
        list.set(1, &[2u8; 32]);
        list.set(2, &[3u8; 5]);
        let reader = list.into_reader();
        let too_many = identities(reader, 2).err();
        assert_eq!(
            too_many.as_ref().and_then(code_of),
            Some(ErrorCode::InvalidArgument)
        );
        let bad_key = identities(reader, 3).err();
        assert_eq!(
            bad_key.as_ref().and_then(code_of),
            Some(ErrorCode::InvalidArgument)
        );
        Ok(())
    }

    #[test]
    fn group_ids_are_bounded() {
        assert!(group_id(&[]).is_err());
        assert!(group_id(&[0; 257]).is_err());
        assert!(group_id(&[0; 256]).is_ok());
    }
}
