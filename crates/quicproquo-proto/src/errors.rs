//! Typed errors across Cap'n Proto RPC.
//!
//! A server method fails with a `capnp::Error` whose description starts with a stable code in
//! brackets, `[name_taken] user name is taken`; [`code_of`] recovers the code on the client.
//! Codes are part of the wire contract: add new ones, never rename.

/// Stable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A parameter is malformed (wrong length, too many items, not UTF-8).
    InvalidArgument,
    /// The session is already bound to another identity.
    AlreadyBound,
    /// The identity binding signature does not verify for this session.
    BadBinding,
    /// The user name is taken by another identity.
    NameTaken,
    /// The identity already has a different user name.
    AlreadyNamed,
    /// The user name breaks the naming rules.
    InvalidName,
    /// No identity has this user name.
    UnknownName,
    /// The identity is not registered.
    UnknownIdentity,
    /// A KeyPackage failed validation (signature, lifetime, ciphersuite, encoding).
    BadKeyPackage,
    /// A KeyPackage names another identity than the caller.
    WrongIdentity,
    /// Too many requests of this kind; retry later.
    RateLimited,
    /// The message is larger than allowed.
    TooLarge,
    /// The store is unreachable; the call had no effect and may be retried.
    Unavailable,
    /// A server bug; the call had no effect.
    Internal,
    /// The caller is not (or no longer) a member of the group.
    NotMember,
    /// No such group.
    UnknownGroup,
    /// The group already exists.
    GroupExists,
    /// The message is not an MLS message the Delivery Service accepts (garbage, wrong group,
    /// a commit without its membership change, ...).
    BadMessage,
    /// This node does not serve the call in its role (e.g. a client binding on a shard).
    WrongRole,
    /// The peer is not a cluster node (the call is for cluster nodes only).
    NotANode,
    /// A commit or proposal failed verification against the group's public view; the detail
    /// names the rule. Nothing changed.
    BadCommit,
    /// The connection holds the most of something the server allows (subscriptions); close
    /// one first.
    LimitReached,
    /// The log entries asked for were deleted by the server's retention (the caller fell
    /// behind the kept history); the detail names the oldest entry kept. Rejoin the group by a
    /// fresh invitation.
    HistoryGone,
    /// A commit report did not revert its commit (ADR 0015); the detail names the rule
    /// (`signature`, `not_member`, `not_latest`, `committer`, `processed`, ...). Nothing
    /// changed.
    ReportRefused,
}

impl ErrorCode {
    const ALL: [Self; 24] = [
        Self::InvalidArgument,
        Self::AlreadyBound,
        Self::BadBinding,
        Self::NameTaken,
        Self::AlreadyNamed,
        Self::InvalidName,
        Self::UnknownName,
        Self::UnknownIdentity,
        Self::BadKeyPackage,
        Self::WrongIdentity,
        Self::RateLimited,
        Self::TooLarge,
        Self::Unavailable,
        Self::Internal,
        Self::NotMember,
        Self::UnknownGroup,
        Self::GroupExists,
        Self::BadMessage,
        Self::WrongRole,
        Self::NotANode,
        Self::BadCommit,
        Self::LimitReached,
        Self::HistoryGone,
        Self::ReportRefused,
    ];

    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::AlreadyBound => "already_bound",
            Self::BadBinding => "bad_binding",
            Self::NameTaken => "name_taken",
            Self::AlreadyNamed => "already_named",
            Self::InvalidName => "invalid_name",
            Self::UnknownName => "unknown_name",
            Self::UnknownIdentity => "unknown_identity",
            Self::BadKeyPackage => "bad_key_package",
            Self::WrongIdentity => "wrong_identity",
            Self::RateLimited => "rate_limited",
            Self::TooLarge => "too_large",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::NotMember => "not_member",
            Self::UnknownGroup => "unknown_group",
            Self::GroupExists => "group_exists",
            Self::BadMessage => "bad_message",
            Self::WrongRole => "wrong_role",
            Self::NotANode => "not_a_node",
            Self::BadCommit => "bad_commit",
            Self::LimitReached => "limit_reached",
            Self::HistoryGone => "history_gone",
            Self::ReportRefused => "report_refused",
        }
    }

    /// Parses a wire code.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Builds the error a server method returns.
pub fn error(code: ErrorCode, detail: impl std::fmt::Display) -> capnp::Error {
    capnp::Error::failed(format!("[{code}] {detail}"))
}

/// The code carried by an error returned from a call, if it has one.
pub fn code_of(err: &capnp::Error) -> Option<ErrorCode> {
    let desc = err.extra.as_str();
    let start = desc.find('[')?;
    let end = start + desc[start..].find(']')?;
    ErrorCode::parse(&desc[start + 1..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_errors() {
        for code in ErrorCode::ALL {
            let e = error(code, "detail");
            assert_eq!(code_of(&e), Some(code));
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(code_of(&capnp::Error::failed("plain".into())), None);
        let remote = capnp::Error::failed("remote exception: [rate_limited] slow down".into());
        assert_eq!(code_of(&remote), Some(ErrorCode::RateLimited));
    }
}
