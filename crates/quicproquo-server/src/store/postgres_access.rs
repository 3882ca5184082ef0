//! Who may do what in the cluster database: the migration role owns the schema; the runtime
//! role the nodes connect as gets only the data operations they need.
//!
//! `qpq-server migrate --grant-runtime-role ROLE` (run as the migration role) grants, after
//! the migrations and in the same transaction, `SELECT, INSERT, UPDATE, DELETE` on every table
//! and `USAGE, SELECT, UPDATE` on every sequence of the schema to `ROLE`, and `USAGE` on the
//! schema. Nothing else: the runtime role cannot create, alter or drop a table (PostgreSQL 15
//! and later grant no `CREATE` on `public` to everyone; on older servers revoke it). Running it
//! again after a new migration covers the new tables. The role itself (a login with its own
//! password) is created by the database's administrator.

use super::StoreError;

/// Longest PostgreSQL identifier.
const MAX_ROLE_LEN: usize = 63;

/// Checks a role name: 1 to 63 ASCII letters, digits, `_` or `-`, not starting with a digit.
pub fn check_role_name(role: &str) -> Result<(), StoreError> {
    let ok = !role.is_empty()
        && role.len() <= MAX_ROLE_LEN
        && !role.starts_with(|c: char| c.is_ascii_digit())
        && role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if !ok {
        return Err(StoreError::Unavailable(
            "invalid runtime role: 1 to 63 letters, digits, '_' or '-', not starting with a digit"
                .into(),
        ));
    }
    Ok(())
}

/// The statements granting `role` the runtime's rights (the name checked and quoted).
pub(super) fn runtime_grants(role: &str) -> Result<String, StoreError> {
    check_role_name(role)?;
    Ok(format!(
        "GRANT USAGE ON SCHEMA public TO \"{role}\";
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO \"{role}\";
         GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO \"{role}\";"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_checked_before_any_sql() {
        for good in ["qpq_runtime", "qpq-runtime", "r1"] {
            assert!(runtime_grants(good).is_ok(), "{good}");
        }
        for bad in ["", "1abc", "a\"; DROP TABLE x; --", "a b", &"r".repeat(64)] {
            assert!(runtime_grants(bad).is_err(), "{bad}");
        }
    }
}
