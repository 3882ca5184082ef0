//! What an edge accepts from the shards it follows: pushes for the group a feed follows, and
//! nothing else. A shard (or anyone holding a shard's certificate) cannot make an edge publish
//! entries of a group to subscribers who asked for another.

use quicproquo_proto::errors::{ErrorCode, error};

use crate::model::group::GroupId;

/// Refuses a push for `pushed` on the feed that follows `followed`.
pub(super) fn check_followed(followed: &GroupId, pushed: &GroupId) -> Result<(), capnp::Error> {
    if followed != pushed {
        return Err(error(
            ErrorCode::InvalidArgument,
            "this feed follows another group: push refused",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_followed_group_is_accepted() -> Result<(), Box<dyn std::error::Error>> {
        let a = crate::wire::parse::group_id(b"group-a")?;
        let b = crate::wire::parse::group_id(b"group-b")?;
        assert!(check_followed(&a, &a).is_ok());
        let refused = check_followed(&a, &b).err();
        assert_eq!(
            refused.as_ref().and_then(quicproquo_proto::errors::code_of),
            Some(ErrorCode::InvalidArgument)
        );
        Ok(())
    }
}
