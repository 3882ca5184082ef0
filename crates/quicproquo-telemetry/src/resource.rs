//! The resource every exported span carries: which service, which version, which instance, on
//! which host (OpenTelemetry semantic conventions [`SCHEMA_URL`]).
//!
//! Precedence, lowest first: what this process knows (its service name, its version, its
//! instance id, the host name), then `OTEL_RESOURCE_ATTRIBUTES` (the deployment's pod and
//! container names), then `OTEL_SERVICE_NAME`.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::{EnvResourceDetector, TelemetryResourceDetector};

/// The semantic conventions the spans and resources of this project follow: version 1.42.0,
/// the version the `opentelemetry` 0.33 crates are generated from.
pub const SCHEMA_URL: &str = "https://opentelemetry.io/schemas/1.42.0";

/// Who this process is, beyond its service name.
#[derive(Debug, Clone, Default)]
pub struct Instance {
    /// `service.instance.id`: a server's node id (stable across its restarts when its keys
    /// are); `None`: a random id for this process (a client, a tool).
    pub id: Option<String>,
}

/// A random UUID (version 4) for an instance that has no id of its own.
fn random_instance_id() -> String {
    let half = |salt: u64| {
        RandomState::new().hash_one((salt, std::process::id(), std::time::SystemTime::now()))
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&half(1).to_be_bytes());
    bytes[8..].copy_from_slice(&half(2).to_be_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The host's name: the kernel's (in a container or pod, the container's or pod's name), or
/// `HOSTNAME`.
fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// The attributes this process knows about itself.
fn own_attributes(service_name: &str, instance: &Instance) -> Vec<KeyValue> {
    let mut attrs = vec![
        KeyValue::new("service.name", service_name.to_owned()),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new(
            "service.instance.id",
            instance.id.clone().unwrap_or_else(random_instance_id),
        ),
        KeyValue::new("process.pid", i64::from(std::process::id())),
    ];
    if let Some(host) = host_name() {
        attrs.push(KeyValue::new("host.name", host));
    }
    if let Some(exe) = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
    {
        attrs.push(KeyValue::new("process.executable.name", exe));
    }
    attrs
}

/// The resource of a process named `service_name` (unless `OTEL_SERVICE_NAME` says otherwise).
pub(crate) fn build(service_name: &str, instance: &Instance) -> Resource {
    let mut builder = Resource::builder_empty()
        .with_schema_url(std::iter::empty::<KeyValue>(), SCHEMA_URL)
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_attributes(own_attributes(service_name, instance))
        .with_detector(Box::new(EnvResourceDetector::new()));
    if let Some(name) = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
    {
        builder = builder.with_service_name(name);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use opentelemetry::{Key, Value};

    use super::*;

    #[test]
    fn a_process_names_its_service_version_instance_and_host() {
        let resource = build(
            "qpq-test",
            &Instance {
                id: Some("node-7".into()),
            },
        );
        let get = |k: &'static str| resource.get(&Key::from_static_str(k));
        assert_eq!(get("service.instance.id"), Some(Value::from("node-7")));
        assert_eq!(
            get("service.version"),
            Some(Value::from(env!("CARGO_PKG_VERSION")))
        );
        assert!(matches!(get("process.pid"), Some(Value::I64(_))));
        assert_eq!(resource.schema_url(), Some(SCHEMA_URL));
        assert!(host_name().is_none() || get("host.name").is_some());
    }

    #[test]
    fn random_instance_ids_are_distinct_uuids() {
        let (a, b) = (random_instance_id(), random_instance_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
