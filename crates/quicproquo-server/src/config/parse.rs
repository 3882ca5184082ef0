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
    crate::store::postgres_access::connection_config(url)
        .map(drop)
        .map_err(|_| {
            invalid(
                "database_url",
                "not a PostgreSQL connection string (expected postgres://user@host:port/database; \
                 sslmode: disable, prefer, require, verify-ca or verify-full)",
            )
        })
}

/// Connection parameters whose value is a secret.
const SECRET_PARAMS: [&str; 2] = ["password", "sslpassword"];

/// `url` with every password in it (the URL's user info, a `password` or `sslpassword` query
/// parameter, a `password=` pair of the `key=value` form) replaced by `***`, for logs and
/// messages.
pub fn redact_database_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        let mut out = String::with_capacity(url.len());
        out.push_str(&url[..scheme_end + 3]);
        match authority.rfind('@') {
            Some(at) => {
                match authority[..at].find(':') {
                    Some(colon) => {
                        out.push_str(&authority[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(&authority[..at]),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        let tail = &rest[authority_end..];
        match tail.split_once('?') {
            Some((path, query)) => {
                out.push_str(path);
                out.push('?');
                let pairs: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((k, _)) if SECRET_PARAMS.contains(&k) => format!("{k}=***"),
                        _ => pair.to_owned(),
                    })
                    .collect();
                out.push_str(&pairs.join("&"));
            }
            None => out.push_str(tail),
        }
        return out;
    }
    redact_key_values(url)
}

/// The `key=value` form with secret values masked; a quoted value (`'a b'`, with `\'` and
/// `\\` escapes) is masked whole.
fn redact_key_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let trimmed = rest.trim_start();
        out.push_str(&rest[..rest.len() - trimmed.len()]);
        rest = trimmed;
        if rest.is_empty() {
            return out;
        }
        let key_end = rest.find(['=', ' ', '\t', '\n']).unwrap_or(rest.len());
        let key = rest[..key_end].trim();
        out.push_str(&rest[..key_end]);
        rest = &rest[key_end..];
        // Spaces may surround the '='.
        let after = rest.trim_start();
        if !after.starts_with('=') {
            continue;
        }
        out.push_str(&rest[..rest.len() - after.len() + 1]);
        let value = &after[1..];
        rest = value.trim_start();
        out.push_str(&value[..value.len() - rest.len()]);
        let value_len = value_len(rest);
        if SECRET_PARAMS.contains(&key) {
            out.push_str("***");
        } else {
            out.push_str(&rest[..value_len]);
        }
        rest = &rest[value_len..];
    }
}

/// Length of the value at the start of `text`: quoted up to the closing quote, else up to
/// whitespace.
fn value_len(text: &str) -> usize {
    if !text.starts_with('\'') {
        return text.find(char::is_whitespace).unwrap_or(text.len());
    }
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '\'' => return i + 1,
            _ => {}
        }
    }
    text.len()
}

/// Parses `250ms`, `10s`, `5m` or `1h` (the project's one duration syntax, see
/// [`quicproquo_core::duration`]); the error message names the text and the accepted form.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    quicproquo_core::duration::parse_duration(text).map_err(|e| e.to_string())
}
