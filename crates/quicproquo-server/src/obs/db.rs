//! Database spans (OpenTelemetry semantic conventions 1.42.0, database client spans): one per
//! store call, a child of the current span.
//!
//! A store call is one logical operation on one table (a query, or a short transaction
//! around one): `db.operation.name` is that operation (`SELECT`, `INSERT`, `DELETE` on
//! PostgreSQL; a `read` or `write` transaction on redb), `db.collection.name` the table, and
//! the span is named `{db.query.summary}` = `{operation} {table}`. PostgreSQL spans are CLIENT
//! (the database is another process); redb spans are INTERNAL (an in-process store).
//!
//! An answer the caller expects (a name already taken, no such group) is not a failure of the
//! database: it is recorded as `qpq.outcome` and leaves the status unset. Only a fault (the
//! store unreachable, inconsistent data) sets `error.type` and the error status.

use tracing::field::Empty;
use tracing::{Instrument, Span};

use super::spans::record_error;

/// How a store error shows on its span: the store's side of the one error mapping.
pub(crate) trait StoreOutcome {
    /// A low-cardinality name for it (the wire code it becomes, e.g. `name_taken`).
    fn outcome(&self) -> &'static str;
    /// Whether the store failed (unreachable, inconsistent), rather than answered.
    fn is_fault(&self) -> bool;
}

/// The operation and table of a store method, on PostgreSQL and on redb.
struct Operation {
    sql: &'static str,
    table: &'static str,
    writes: bool,
    redb_table: &'static str,
}

/// What each store method does to which table.
fn operation(method: &str) -> Option<Operation> {
    let op = |sql, table, writes, redb_table| {
        Some(Operation {
            sql,
            table,
            writes,
            redb_table,
        })
    };
    match method {
        "register_identity" => op("INSERT", "identities", true, "identities"),
        "claim_name" => op("INSERT", "user_names", true, "names"),
        "resolve_name" => op("SELECT", "user_names", false, "names"),
        "names_of" => op("SELECT", "user_names", false, "name_of"),
        "add_key_packages" => op("INSERT", "key_packages", true, "key_packages"),
        "fetch_key_packages" => op("DELETE", "key_packages", true, "key_packages"),
        "key_package_count" => op("SELECT", "key_packages", false, "key_packages"),
        "create_group" => op("INSERT", "groups", true, "groups"),
        "append" => op("INSERT", "group_log", true, "group_log"),
        "revert" => op("INSERT", "group_log", true, "group_log"),
        "load_view" => op("SELECT", "group_views", false, "group_views"),
        "group_info" => op("SELECT", "group_views", false, "group_views"),
        "read_log" => op("SELECT", "group_log", false, "group_log"),
        "group_summary" => op("SELECT", "groups", false, "groups"),
        "check_member" => op("SELECT", "members", false, "members"),
        "groups_of" => op("SELECT", "members", false, "member_groups"),
        "read_inbox" => op("SELECT", "inbox", false, "inbox"),
        "set_cursor" => op("INSERT", "cursors", true, "cursors"),
        "cursor" => op("SELECT", "cursors", false, "cursors"),
        _ => None,
    }
}

/// The span of store call `method` on `system` (`postgresql` or `redb`).
pub(crate) fn store_span(system: &'static str, method: &'static str) -> Span {
    let postgres = system == "postgresql";
    let (operation, table) = match operation(method) {
        Some(o) if postgres => (o.sql, o.table),
        Some(o) => (if o.writes { "write" } else { "read" }, o.redb_table),
        None => ("", ""),
    };
    let summary = if operation.is_empty() {
        system.to_owned()
    } else {
        format!("{operation} {table}")
    };
    let span = tracing::info_span!(
        "db.client",
        otel.name = %summary,
        otel.kind = if postgres { "client" } else { "internal" },
        otel.status_code = Empty,
        db.system.name = system,
        db.operation.name = Empty,
        db.collection.name = Empty,
        db.query.summary = Empty,
        "error.type" = Empty,
        qpq.outcome = Empty,
    );
    if !operation.is_empty() {
        span.record("db.operation.name", operation);
        span.record("db.collection.name", table);
        span.record("db.query.summary", summary.as_str());
    }
    span
}

/// Runs store call `method` on `system` inside its span.
pub(crate) async fn store_call<T, E: StoreOutcome>(
    system: &'static str,
    method: &'static str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let span = store_span(system, method);
    let result = call.instrument(span.clone()).await;
    if let Err(e) = &result {
        if e.is_fault() {
            record_error(&span, e.outcome());
        } else {
            span.record("qpq.outcome", e.outcome());
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_store_method_names_an_operation_and_a_table() {
        let store = include_str!("../store/mod.rs");
        let methods: Vec<&str> = store
            .split("dispatch!(self, \"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .collect();
        assert!(methods.len() >= 15, "{methods:?}");
        for method in methods {
            let op = operation(method);
            assert!(
                op.is_some_and(|o| ["SELECT", "INSERT", "DELETE"].contains(&o.sql)),
                "{method} has no operation"
            );
        }
        assert!(operation("vacuum").is_none());
    }
}
