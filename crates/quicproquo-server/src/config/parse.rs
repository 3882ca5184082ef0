//! Parsers and checks of single settings: durations, the ops listener, suites, and the
//! database URL (checked and redacted without ever quoting its password).

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use quicproquo_core::mls::Suite;

use super::{ConfigError, invalid};

/// Parses `ops_listen`: `host:port`, or `off` / `none` / empty for no ops listener.
pub fn parse_ops_listen(text: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let t = text.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    t.to_socket_addrs()
        .map_err(|e| invalid("ops_listen", format!("`{t}`: {e} (use host:port or off)")))?
        .next()
        .map(Some)
        .ok_or_else(|| invalid("ops_listen", format!("`{t}` resolves to nothing")))
}

pub(super) fn parse_suites(names: &[String]) -> Result<Vec<Suite>, ConfigError> {
    names
        .iter()
        .map(|n| {
            Suite::parse(n.trim()).ok_or_else(|| {
                invalid(
                    "key_package_suites",
                    format!("unknown suite `{n}` (use hybrid, classical)"),
                )
            })
        })
        .collect()
}

/// Checks that `url` is a PostgreSQL connection URL or `key=value` string. The error never
/// quotes it: it may hold a password.
pub fn check_database_url(url: &str) -> Result<(), ConfigError> {
    url.parse::<tokio_postgres::Config>()
        .map(drop)
        .map_err(|_| {
            invalid(
                "database_url",
                "not a PostgreSQL connection string (expected postgres://user@host:port/database)",
            )
        })
}

/// `url` with its password (if any) replaced by `***`, for logs and messages.
pub fn redact_database_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority = rest.find(['/', '?']).map_or(rest, |end| &rest[..end]);
        if let Some(at) = authority.rfind('@')
            && let Some(colon) = authority[..at].find(':')
        {
            let start = scheme_end + 3 + colon + 1;
            let end = scheme_end + 3 + at;
            return format!("{}***{}", &url[..start], &url[end..]);
        }
        return url.to_owned();
    }
    // key=value form: mask the value of `password`.
    url.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some(("password", _)) => "password=***".to_owned(),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses `250ms`, `10s`, `5m` or `1h` (the project's one duration syntax, see
/// [`quicproquo_core::duration`]); the error message names the text and the accepted form.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    quicproquo_core::duration::parse_duration(text).map_err(|e| e.to_string())
}
