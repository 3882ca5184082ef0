//! One mapping from each internal error to the typed error a peer receives
//! (`[code] detail`, see `quicproquo_proto::errors`), and back from a shard's answer to an
//! [`OrderingError`] on an edge.
//!
//! Internal failures are logged here (without user data) and reach the peer only as
//! `unavailable` or `internal`, never with their details.

use quicproquo_proto::errors::{ErrorCode, code_of, error};
use tracing::warn;

use crate::auth::AuthError;
use crate::model::ModelError;
use crate::ordering::OrderingError;
use crate::store::StoreError;

/// The typed RPC error for a store error.
pub fn store_error(e: StoreError) -> capnp::Error {
    match e {
        StoreError::NameTaken => error(ErrorCode::NameTaken, e),
        StoreError::AlreadyNamed => error(ErrorCode::AlreadyNamed, e),
        StoreError::InvalidName => error(ErrorCode::InvalidName, e),
        StoreError::UnknownIdentity => error(ErrorCode::UnknownIdentity, e),
        StoreError::NotMember => error(ErrorCode::NotMember, "not a member of this group"),
        StoreError::UnknownGroup => error(ErrorCode::UnknownGroup, "no such group"),
        StoreError::GroupExists => error(ErrorCode::GroupExists, "the group already exists"),
        StoreError::InvalidArgument(m) => error(ErrorCode::InvalidArgument, m),
        StoreError::HistoryGone { .. } => error(ErrorCode::HistoryGone, e),
        StoreError::Unavailable(_) => {
            warn!(error = %e, "store unavailable");
            error(ErrorCode::Unavailable, "store unavailable; retry")
        }
        _ => {
            warn!(error = %e, "store error");
            error(ErrorCode::Internal, "internal error")
        }
    }
}

/// The typed RPC error for a refusal of the Authentication Service.
pub fn auth_error(e: AuthError) -> capnp::Error {
    match e {
        AuthError::BadKeyPackage(_) => error(ErrorCode::BadKeyPackage, e),
        AuthError::WrongIdentity => error(ErrorCode::WrongIdentity, e),
        AuthError::RateLimited | AuthError::BindRateLimited => error(ErrorCode::RateLimited, e),
        AuthError::Pool(_) => {
            warn!(error = %e, "KeyPackage check did not run");
            error(ErrorCode::Internal, "internal error")
        }
    }
}

/// The typed RPC error for a value that breaks a rule of the model.
pub fn model_error(e: ModelError) -> capnp::Error {
    match e {
        ModelError::InvalidArgument(m) => error(ErrorCode::InvalidArgument, m),
        ModelError::InvalidName => error(ErrorCode::InvalidName, e),
        ModelError::TooLarge { .. } => error(ErrorCode::TooLarge, e),
        ModelError::Inconsistent(_) => {
            warn!(error = %e, "inconsistent state");
            error(ErrorCode::Internal, "internal error")
        }
    }
}

/// The typed RPC error for an append or group creation that was not decided.
pub fn ordering_error(e: OrderingError) -> capnp::Error {
    match e {
        OrderingError::Model(e) => model_error(e),
        OrderingError::Store(e) => store_error(e),
        OrderingError::Unavailable(m) => error(ErrorCode::Unavailable, m),
        OrderingError::BadCommit(e) => error(ErrorCode::BadCommit, e),
        OrderingError::Refused { code, message } => error(code, message),
    }
}

/// What an owner shard's failed answer means for the edge that forwarded the call: its typed
/// refusal, passed on as such, or the shard being unavailable.
pub fn ordering_error_of(e: &capnp::Error) -> OrderingError {
    let text = e.extra.as_str();
    let Some(code) = code_of(e) else {
        return OrderingError::Unavailable(text.to_owned());
    };
    let marker = format!("[{code}]");
    let message = text
        .find(&marker)
        .map_or(text, |at| text[at + marker.len()..].trim_start())
        .to_owned();
    match code {
        ErrorCode::Unavailable => OrderingError::Unavailable(message),
        code => OrderingError::Refused { code, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_refusal_keeps_its_code_and_message_across_the_edge() {
        let remote = capnp::Error::failed("remote exception: [not_member] not a member".into());
        let back = ordering_error(ordering_error_of(&remote));
        assert_eq!(code_of(&back), Some(ErrorCode::NotMember));
        assert_eq!(back.extra, "[not_member] not a member");
        let plain = capnp::Error::disconnected("gone".into());
        assert!(matches!(
            ordering_error_of(&plain),
            OrderingError::Unavailable(_)
        ));
        let busy = error(ErrorCode::Unavailable, "no shard is alive");
        assert_eq!(
            ordering_error(ordering_error_of(&busy)).extra,
            "[unavailable] no shard is alive"
        );
    }

    #[test]
    fn store_failures_reach_peers_without_details() {
        let e = store_error(StoreError::Corrupt("row 7 of table x".into()));
        assert_eq!(code_of(&e), Some(ErrorCode::Internal));
        assert!(!e.extra.contains("row 7"));
        let e = store_error(StoreError::Unavailable("10.0.0.1 refused".into()));
        assert_eq!(code_of(&e), Some(ErrorCode::Unavailable));
        assert!(!e.extra.contains("10.0.0.1"));
    }
}
