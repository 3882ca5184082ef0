//! Who may do what in the cluster database, and how the nodes reach it.
//!
//! **TLS.** Every connection goes through rustls (ring), verifying the server's certificate
//! and host name against `database_ca_file` (PEM) or, without one, the public web roots. The
//! URL's `sslmode` decides whether TLS is used: `disable`, `prefer`, `require`, and
//! `verify-ca`/`verify-full` (both mean `require` here: rustls always verifies the
//! certificate and the host name). Without `sslmode`, TLS is required unless every host is
//! loopback (`localhost`, `127.0.0.0/8`, `::1`) or a Unix socket.
//!
//! **Roles.** The migration role owns the schema; the runtime role the nodes connect as gets
//! only the data operations they need.
//!
//! `qpq-server migrate --grant-runtime-role ROLE` (run as the migration role) grants, after
//! the migrations and in the same transaction, `SELECT, INSERT, UPDATE, DELETE` on every table
//! and `USAGE, SELECT, UPDATE` on every sequence of the schema to `ROLE`, and `USAGE` on the
//! schema. Nothing else: the runtime role cannot create, alter or drop a table (PostgreSQL 15
//! and later grant no `CREATE` on `public` to everyone; on older servers revoke it). Running it
//! again after a new migration covers the new tables. The role itself (a login with its own
//! password) is created by the database's administrator.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;

/// The TLS connector every database connection uses: rustls with ring, trusting the
/// certificates in `ca_file` (PEM), or the public web roots without one.
pub fn tls_connector(ca_file: Option<&Path>) -> Result<MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let unreadable = |e: &dyn std::fmt::Display| {
                StoreError::Unavailable(format!("database_ca_file {}: {e}", path.display()))
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| unreadable(&e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| unreadable(&e))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(unreadable(&"no certificate in it"));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    // rustls 0.23.48 deprecates the ring provider for lacking post-quantum key exchange; the
    // database link is classical like the Noise layer (ADR 0001), and the post-quantum
    // provider (aws-lc-rs) would add a C and CMake build to every platform.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Unavailable(format!("TLS for the database: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Parses a database URL (or `key=value` string) into the connection settings, with the
/// `sslmode` rule of the module documentation applied. Errors never quote the URL (it may
/// hold a password).
pub fn connection_config(database_url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let normalised = database_url
        .replace("sslmode=verify-full", "sslmode=require")
        .replace("sslmode=verify-ca", "sslmode=require");
    let mut config: tokio_postgres::Config = normalised.parse().map_err(|_| {
        StoreError::Unavailable(
            "invalid database URL: expected postgres://user@host:port/database (sslmode: \
             disable, prefer, require, verify-ca or verify-full)"
                .into(),
        )
    })?;
    if !database_url.contains("sslmode") {
        config.ssl_mode(if all_loopback(&config) {
            SslMode::Disable
        } else {
            SslMode::Require
        });
    }
    Ok(config)
}

/// Whether every host of `config` is on this machine.
fn all_loopback(config: &tokio_postgres::Config) -> bool {
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|h| match h {
            Host::Tcp(name) => {
                name.eq_ignore_ascii_case("localhost")
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            #[allow(unreachable_patterns)]
            _ => true,
        })
}

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
    fn tls_is_required_by_default_except_on_loopback() -> Result<(), StoreError> {
        for (url, mode) in [
            ("postgres://qpq@db.internal/qpq", SslMode::Require),
            ("postgres://qpq@10.0.0.7:5432/qpq", SslMode::Require),
            ("host=db user=qpq", SslMode::Require),
            ("postgres://qpq@127.0.0.1/qpq", SslMode::Disable),
            ("postgres://qpq@localhost:5432/qpq", SslMode::Disable),
            ("postgres://qpq@[::1]:5432/qpq", SslMode::Disable),
            ("host=/var/run/postgresql user=qpq", SslMode::Disable),
            (
                "postgres://qpq@db.internal/qpq?sslmode=disable",
                SslMode::Disable,
            ),
            (
                "postgres://qpq@127.0.0.1/qpq?sslmode=require",
                SslMode::Require,
            ),
            (
                "postgres://qpq@db/qpq?sslmode=verify-full",
                SslMode::Require,
            ),
            ("host=db sslmode=verify-ca", SslMode::Require),
        ] {
            assert_eq!(connection_config(url)?.get_ssl_mode(), mode, "{url}");
        }
        let err = connection_config("postgres://u:s3cret@db/q?sslmode=bogus").err();
        assert!(err.is_some_and(|e| !e.to_string().contains("s3cret")));
        Ok(())
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        let empty = tmp.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate\n")?;
        assert!(tls_connector(Some(&empty)).is_err());
        assert!(tls_connector(Some(&tmp.path().join("missing.pem"))).is_err());
        assert!(tls_connector(None).is_ok());
        Ok(())
    }

    #[test]
    fn role_names_are_checked_before_any_sql() {
        for good in ["qpq_runtime", "qpq-runtime", "r1"] {
            assert!(runtime_grants(good).is_ok(), "{good}");
        }
        for bad in ["", "1abc", "a\"; DROP TABLE x; --", "a b", &"r".repeat(64)] {
            assert!(runtime_grants(bad).is_err(), "{bad}");
        }
    }

    /// Every pooled session runs with the store's settings, the caller's own options kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pooled_sessions_never_compile_and_keep_the_url_options() -> anyhow::Result<()> {
        let db = quicproquo_testkit::postgres::fresh_database().await?;
        crate::store::postgres::migrate(db.url()).await?;
        let separator = if db.url().contains('?') { '&' } else { '?' };
        let url = format!(
            "{}{separator}options=-c%20statement_timeout%3D12345",
            db.url()
        );
        let store = crate::store::postgres::PgStore::connect(&url, 2).await?;
        let client = store.client().await?;
        for (setting, expected) in [
            ("jit", "off"),
            ("enable_seqscan", "off"),
            ("statement_timeout", "12345ms"),
        ] {
            let row = client.query_one(&format!("SHOW {setting}"), &[]).await?;
            let value: String = row.try_get(0)?;
            anyhow::ensure!(value == expected, "{setting} = {value}, not {expected}");
        }
        Ok(())
    }
}
