//! The server's model: the values every layer speaks of and the rules on them, with no I/O —
//! group and message ids, user names, append requests and outcomes, the epoch rule.
//!
//! [`group`] holds the Delivery Service's values and rules; [`decide`] is the append decision
//! both stores call; [`revert`] decides the revert of a reported commit (ADR 0015); [`page`] cuts the lists a reply carries by count and bytes.
//!
//! What it is not: storage, wire encoding or networking. Every other module may import this
//! one; it imports none of them.

pub mod decide;
pub mod group;
pub mod page;
pub mod revert;

/// A value that breaks a rule of the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A parameter is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// A user name breaks the rules of [`UserName::parse`].
    #[error("invalid user name: use 3-32 characters a-z, 0-9, '_', '-', '.'")]
    InvalidName,
    /// The state a decision was given contradicts itself (stored data is corrupt, or a store
    /// read less than the decision needs): nothing was decided.
    #[error("inconsistent state: {0}")]
    Inconsistent(&'static str),
    /// A message (with its Welcome) is larger than the node accepts.
    #[error("message of {size} bytes exceeds {max}")]
    TooLarge {
        /// Its size in bytes.
        size: usize,
        /// The largest accepted.
        max: usize,
    },
}

/// A user name: 3 to 32 characters of `a-z`, `0-9`, `_`, `-`, `.`, starting with a letter or
/// digit. Names are compared after lower-casing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserName(String);

impl UserName {
    /// Parses and normalises a user name.
    pub fn parse(raw: &str) -> Result<Self, ModelError> {
        let name = raw.trim().to_ascii_lowercase();
        let ok_len = (3..=32).contains(&name.len());
        let ok_first = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
        let ok_chars = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if ok_len && ok_first && ok_chars {
            Ok(Self(name))
        } else {
            Err(ModelError::InvalidName)
        }
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for UserName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_normalised_and_checked() {
        assert_eq!(
            UserName::parse(" Alice ").map(|n| n.to_string()).ok(),
            Some("alice".into())
        );
        for bad in ["al", "-alice", "al ice", "ålice", &"x".repeat(33), ""] {
            assert!(UserName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(UserName::parse("bob.smith_2-x").is_ok());
    }
}
