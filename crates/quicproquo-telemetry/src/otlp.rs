//! The OTLP/HTTP transport: the OpenTelemetry exporter's standard HTTP client (reqwest's
//! blocking client, which `opentelemetry-otlp` drives), over `http://` or `https://`.
//!
//! TLS is rustls on ring, configured here rather than by a process-wide provider: the
//! collector's certificate and host name are verified against the PEM file named by
//! `OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE` or `OTEL_EXPORTER_OTLP_CERTIFICATE` (the
//! OpenTelemetry variables), or the public web roots without one. The SDK's batch processor
//! calls the client from its own thread, never from a server worker, so a slow collector
//! cannot stall the data path.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::TelemetryError;

/// Deadline for connecting, and for each whole request.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The OpenTelemetry variables naming the collector's CA certificates (traces first).
const CERTIFICATE_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
];

/// The HTTP client for `endpoint`, which must be an `http://` or `https://` URL with a host.
pub fn http_client(endpoint: &str) -> Result<reqwest::blocking::Client, TelemetryError> {
    let invalid = |message: String| TelemetryError::Endpoint {
        endpoint: endpoint.to_owned(),
        message,
    };
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| invalid("not a URL (expected http(s)://host:port)".into()))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(invalid("only http:// and https:// are supported".into()));
    }
    if uri.host().is_none() {
        return Err(invalid("no host".into()));
    }
    let ca_file = CERTIFICATE_VARS
        .iter()
        .find_map(|v| std::env::var_os(v).filter(|p| !p.is_empty()));
    let tls = tls_config(ca_file.as_deref().map(Path::new)).map_err(invalid)?;
    let builder = reqwest::blocking::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT);
    // The blocking client starts a runtime of its own and may not be built from inside an
    // async context (a test's, or any caller's): build it on a thread of its own.
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("qpq-otlp-client".into())
            .spawn_scoped(scope, move || builder.build())
            .map_err(|e| invalid(format!("starting the HTTP client: {e}")))?
            .join()
            .map_err(|_| invalid("building the HTTP client panicked".into()))?
            .map_err(|e| invalid(format!("building the HTTP client: {e}")))
    })
}

/// rustls (ring) trusting the certificates in `ca_file`, or the public web roots.
fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("collector CA file {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "collector CA file {}: no certificate in it",
                    path.display()
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    // rustls deprecates its ring provider for lacking post-quantum key exchange; trace export
    // is metadata over a classical channel like the Noise layer, and the post-quantum provider
    // (aws-lc-rs) would add a C and CMake build to every platform.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_and_https_endpoints_are_accepted_and_others_refused() {
        assert!(http_client("https://collector:4318").is_ok());
        assert!(http_client("http://collector:4318").is_ok());
        assert!(http_client("ftp://collector:4318").is_err());
        assert!(http_client("collector:4318").is_err());
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let tmp = std::env::temp_dir().join(format!("qpq-otlp-ca-{}", std::process::id()));
        std::fs::write(&tmp, "not a certificate\n")?;
        let refused = tls_config(Some(&tmp)).is_err();
        std::fs::remove_file(&tmp)?;
        assert!(refused);
        assert!(tls_config(None).is_ok());
        Ok(())
    }
}
