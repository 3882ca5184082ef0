//! Tests of configuration layering and validation.
use super::*;
use quicproquo_core::mls::Suite;

fn file(text: &str) -> Result<FileConfig, ConfigError> {
    FileConfig::parse(text, Path::new("test.toml"))
}

/// A database, which edges need.
const DB: &str = "database_url = \"postgres://qpq@db/qpq\"\n";

#[test]
fn layers_defaults_file_and_overrides() -> Result<(), ConfigError> {
    let f = file("listen = \"127.0.0.1:9100\"\nworkers = 3\nhandshake_timeout = \"2s\"\n")?;
    let o = Overrides {
        workers: Some(5),
        ..Overrides::default()
    };
    let c = ServerConfig::resolve(NodeRole::Standalone, f, o)?;
    assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 9100)));
    assert_eq!(c.workers, 5, "override beats file");
    assert_eq!(
        c.handshake_timeout,
        Duration::from_secs(2),
        "file beats default"
    );
    assert_eq!(c.max_frame_bytes, 16 * 1024 * 1024, "default");
    Ok(())
}

#[test]
fn unknown_keys_and_bad_values_are_rejected() {
    let err = file("listen = \"127.0.0.1:1\"\nlisten_adress = \"x\"\n")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("listen_adress"), "{err}");
    assert!(file("workers = \"two\"").is_err());

    let bad = |o: Overrides| ServerConfig::resolve(NodeRole::Edge, FileConfig::default(), o);
    assert!(matches!(
        bad(Overrides {
            workers: Some(0),
            ..Overrides::default()
        }),
        Err(ConfigError::Invalid { key: "workers", .. })
    ));
    assert!(matches!(
        bad(Overrides {
            max_frame_bytes: Some(1000),
            ..Overrides::default()
        }),
        Err(ConfigError::Invalid {
            key: "max_frame_bytes",
            ..
        })
    ));
    assert!(matches!(
        bad(Overrides {
            handshake_timeout: Some("10".into()),
            ..Overrides::default()
        }),
        Err(ConfigError::Invalid {
            key: "handshake_timeout",
            ..
        })
    ));
    assert!(matches!(
        bad(Overrides {
            listen: Some("not an address".into()),
            ..Overrides::default()
        }),
        Err(ConfigError::Invalid { key: "listen", .. })
    ));
    assert!(matches!(
        bad(Overrides {
            max_connections: Some(10),
            max_handshakes: Some(11),
            ..Overrides::default()
        }),
        Err(ConfigError::Invalid {
            key: "max_handshakes",
            ..
        })
    ));
}

#[test]
fn key_package_settings_layer_and_validate() -> Result<(), ConfigError> {
    let f = file("key_package_suites = [\"hybrid\"]\nkey_package_fetch_limit = 5\n")?;
    let c = ServerConfig::resolve(NodeRole::Standalone, f, Overrides::default())?;
    assert_eq!(c.auth.suites, vec![Suite::Hybrid]);
    assert_eq!(c.auth.fetch_limit_per_minute, 5);
    assert_eq!(c.auth.low_watermark, 10);
    let bad = file("key_package_suites = [\"quantum\"]\n")?;
    assert!(matches!(
        ServerConfig::resolve(NodeRole::Standalone, bad, Overrides::default()),
        Err(ConfigError::Invalid {
            key: "key_package_suites",
            ..
        })
    ));
    Ok(())
}

#[test]
fn database_url_layers_and_is_checked() -> Result<(), ConfigError> {
    let c = ServerConfig::resolve(
        NodeRole::Shard,
        file("database_url = \"postgres://qpq@db/file\"\n")?,
        Overrides::default(),
    )?;
    assert_eq!(c.database_url.as_deref(), Some("postgres://qpq@db/file"));
    let o = Overrides {
        database_url: Some("postgres://qpq@db/flag".into()),
        ..Overrides::default()
    };
    let c = ServerConfig::resolve(
        NodeRole::Shard,
        file("database_url = \"postgres://qpq@db/file\"\n")?,
        o,
    )?;
    assert_eq!(c.database_url.as_deref(), Some("postgres://qpq@db/flag"));
    assert!(
        ServerConfig::for_role(NodeRole::Edge, PathBuf::new())
            .database_url
            .is_none()
    );

    let bad = ServerConfig::resolve(
        NodeRole::Shard,
        FileConfig::default(),
        Overrides {
            database_url: Some("postgres://u:hunter2@db:notaport/x".into()),
            ..Overrides::default()
        },
    );
    let err = bad.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("database_url"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    Ok(())
}

#[test]
fn edge_and_shard_need_a_database() -> Result<(), ConfigError> {
    for role in [NodeRole::Edge, NodeRole::Shard] {
        let err = ServerConfig::resolve(role, FileConfig::default(), Overrides::default());
        let Err(ConfigError::Invalid {
            key: "database_url",
            message,
        }) = err
        else {
            panic!("{role}: expected a database_url error, got {err:?}");
        };
        assert!(message.contains("standalone"), "{message}");
        let with_db = Overrides {
            database_url: Some("postgres://qpq@db/qpq".into()),
            ..Overrides::default()
        };
        ServerConfig::resolve(role, FileConfig::default(), with_db)?;
    }
    let standalone = ServerConfig::resolve(
        NodeRole::Standalone,
        FileConfig::default(),
        Overrides::default(),
    )?;
    assert!(standalone.database_url.is_none());
    Ok(())
}

#[test]
fn database_passwords_are_masked() {
    assert_eq!(
        redact_database_url("postgres://qpq:s3cret@db:5432/qpq?sslmode=disable"),
        "postgres://qpq:***@db:5432/qpq?sslmode=disable"
    );
    assert_eq!(
        redact_database_url("postgres://qpq@db/qpq"),
        "postgres://qpq@db/qpq"
    );
    assert_eq!(
        redact_database_url("host=db user=qpq password=s3cret"),
        "host=db user=qpq password=***"
    );
    // In the query, and in the key=value form quoted, spaced or as sslpassword.
    assert_eq!(
        redact_database_url("postgres://qpq@db/qpq?sslmode=require&password=s3cret&x=1"),
        "postgres://qpq@db/qpq?sslmode=require&password=***&x=1"
    );
    assert_eq!(
        redact_database_url("postgresql://qpq:a@db?password=s3cret"),
        "postgresql://qpq:***@db?password=***"
    );
    assert_eq!(
        redact_database_url("host=db password = 's3 \\'cret' sslpassword=s3cret user=qpq"),
        "host=db password = *** sslpassword=*** user=qpq"
    );
    let mut c = ServerConfig::for_role(NodeRole::Shard, PathBuf::new());
    c.database_url = Some("postgres://qpq:s3cret@db/qpq".into());
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert!(parse_duration("5 parsecs").is_err());
    assert!(parse_duration("").is_err());
}

#[test]
fn unknown_env_vars_are_found() {
    let vars = ["QPQ_LISTEN", "QPQ_LISTN", "HOME"].map(String::from);
    assert_eq!(unknown_env_vars(vars.into_iter()), vec!["QPQ_LISTN"]);
}

#[test]
fn ops_listener_defaults_to_loopback_and_can_be_turned_off() -> Result<(), ConfigError> {
    let c = ServerConfig::resolve(NodeRole::Standalone, file("")?, Overrides::default())?;
    assert_eq!(c.ops_listen, Some(SocketAddr::from(([127, 0, 0, 1], 9090))));
    let o = Overrides {
        ops_listen: Some("off".into()),
        ..Overrides::default()
    };
    let c = ServerConfig::resolve(NodeRole::Standalone, file("")?, o)?;
    assert_eq!(c.ops_listen, None);
    let c = ServerConfig::resolve(
        NodeRole::Standalone,
        file("ops_listen = \"127.0.0.1:0\"\notlp_endpoint = \"http://c:4318\"\n")?,
        Overrides::default(),
    )?;
    assert_eq!(c.ops_listen, Some(SocketAddr::from(([127, 0, 0, 1], 0))));
    assert_eq!(c.otlp_endpoint.as_deref(), Some("http://c:4318"));
    assert!(parse_ops_listen("not an address").is_err());
    Ok(())
}

#[test]
fn the_client_trace_ratio_layers_and_is_checked() -> Result<(), ConfigError> {
    let c = ServerConfig::resolve(NodeRole::Edge, file(DB)?, Overrides::default())?;
    assert_eq!(c.client_trace_ratio, None, "default: the node's own ratio");
    let from_file = format!("{DB}client_trace_ratio = 0.25\n");
    let c = ServerConfig::resolve(NodeRole::Edge, file(&from_file)?, Overrides::default())?;
    assert_eq!(c.client_trace_ratio, Some(0.25));
    let o = Overrides {
        client_trace_ratio: Some(0.0),
        ..Overrides::default()
    };
    let c = ServerConfig::resolve(NodeRole::Edge, file(&from_file)?, o)?;
    assert_eq!(c.client_trace_ratio, Some(0.0), "the flag wins");
    for bad in [1.5, -0.1, f64::NAN] {
        let o = Overrides {
            client_trace_ratio: Some(bad),
            ..Overrides::default()
        };
        assert!(matches!(
            ServerConfig::resolve(NodeRole::Edge, file(DB)?, o),
            Err(ConfigError::Invalid {
                key: "client_trace_ratio",
                ..
            })
        ));
    }
    Ok(())
}

#[test]
fn limits_layer_and_are_checked() -> Result<(), ConfigError> {
    let f = file("max_connections_per_address = 64\nbind_timeout = \"3s\"\n")?;
    let o = Overrides {
        limits: LimitOverrides {
            max_connections_per_address: Some(128),
            max_unbound_ping_bytes: Some(16),
            ..LimitOverrides::default()
        },
        ..Overrides::default()
    };
    let c = ServerConfig::resolve(NodeRole::Standalone, f, o)?;
    assert_eq!(
        c.limits.max_connections_per_address, 128,
        "override beats file"
    );
    assert_eq!(
        c.limits.bind_timeout,
        Duration::from_secs(3),
        "file beats default"
    );
    assert_eq!(c.limits.max_unbound_ping_bytes, 16);
    assert_eq!(c.limits.max_handshakes_per_address, 32, "default");

    let bad = |text: &str| {
        ServerConfig::resolve(NodeRole::Standalone, file(text)?, Overrides::default())
            .err()
            .map(|e| e.to_string())
            .ok_or_else(|| invalid("test", format!("`{text}` was accepted")))
    };
    assert!(bad("max_connections_per_address = 0")?.contains("max_connections_per_address"));
    assert!(bad("max_handshakes_per_address = 0")?.contains("max_handshakes_per_address"));
    assert!(bad("bind_timeout = \"0s\"")?.contains("bind_timeout"));
    assert!(bad("bind_timeout = \"10m\"")?.contains("bind_timeout"));
    assert!(bad("max_unbound_ping_bytes = 1000000")?.contains("max_unbound_ping_bytes"));
    assert!(bad("idle_timeout = \"500ms\"")?.contains("idle_timeout"));
    assert!(bad("idle_timeout = \"25h\"")?.contains("idle_timeout"));
    for name in [
        "QPQ_MAX_CONNECTIONS_PER_ADDRESS",
        "QPQ_MAX_HANDSHAKES_PER_ADDRESS",
        "QPQ_BIND_TIMEOUT",
        "QPQ_MAX_UNBOUND_PING_BYTES",
        "QPQ_IDLE_TIMEOUT",
    ] {
        assert!(KNOWN_ENV.contains(&name), "{name}");
    }
    Ok(())
}

#[test]
fn the_largest_message_in_its_envelope_must_fit_a_frame_and_replies_fit_it_too()
-> Result<(), ConfigError> {
    let frame = 1024 * 1024;
    let with = |message: usize| {
        let f = file(&format!(
            "max_frame_bytes = {frame}\nmax_message_bytes = {message}\n"
        ))?;
        ServerConfig::resolve(NodeRole::Standalone, f, Overrides::default())
    };
    // The message alone leaves 64 KiB, but not with its reply envelope.
    assert!(with(frame - 64 * 1024).is_err());
    let fits = frame - 64 * 1024 - log_entry_bytes(MAX_MESSAGE_ID, 0);
    let c = with(fits)?;
    // The default reply budget (4 MiB) is capped below this frame.
    assert_eq!(c.reply_budget(), frame - FRAME_HEADROOM);
    // Without an explicit limit, the largest message is the one that fits.
    let f = file(&format!("max_frame_bytes = {frame}\n"))?;
    let c = ServerConfig::resolve(NodeRole::Standalone, f, Overrides::default())?;
    assert_eq!(c.max_message_bytes, fits);
    // New limits are settings with checked ranges.
    let bad =
        |text: &str| ServerConfig::resolve(NodeRole::Standalone, file(text)?, Overrides::default());
    assert!(bad("max_calls_in_flight = 0\n").is_err());
    assert!(bad("max_reply_bytes = 1000\n").is_err());
    assert!(bad("write_stall_timeout = \"0s\"\n").is_err());
    assert!(bad("bind_limit_per_address = 0\n").is_err());
    assert!(bad("rate_limiter_entries = 1\n").is_err());
    assert!(bad("cpu_pool_threads = 0\n").is_err());
    let ok = bad("max_calls_in_flight = 8\nbind_limit_per_address = 5\n")?;
    assert_eq!(ok.limits.max_calls_in_flight, 8);
    assert_eq!(ok.limits.rates.binds_per_address, 5);
    Ok(())
}
