//! The `qpq` binary against a real server, as a user runs it.

use std::process::Command;

use anyhow::Result;
use quicproquo_core::{ClusterSigningKey, NodeRole};
use quicproquo_server::{NodeIdentity, ServerConfig};

const BIN: &str = env!("CARGO_BIN_EXE_qpq");

struct Server {
    handle: Option<quicproquo_server::ServerHandle>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
            let _ = h.join();
        }
    }
}

fn start() -> Result<(Server, String, String)> {
    let dir = tempfile::tempdir()?;
    let config = ServerConfig::for_role(NodeRole::Standalone, dir.path().join("data"));
    let identity = NodeIdentity::load_or_create(&config.data_dir, NodeRole::Standalone)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let handle = {
        let store = quicproquo_server::open_store(&config)?;
        quicproquo_server::start(config, listener, identity, store)?
    };
    let addr = handle.local_addr().to_string();
    let key = handle.cluster_key().to_hex();
    Ok((
        Server {
            handle: Some(handle),
            _dir: dir,
        },
        addr,
        key,
    ))
}

fn qpq(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(BIN)
        .env_remove("QPQ_SERVER")
        .env_remove("QPQ_SERVER_KEY")
        .args(args)
        .output()?)
}

#[test]
fn ping_prints_the_round_trip_and_exits_zero() -> Result<()> {
    let (_server, addr, key) = start()?;
    let out = qpq(&["--server", &addr, "--server-key", &key, "ping"])?;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout)?;
    assert!(
        stdout.starts_with(&format!("pong from {addr} (standalone) in ")),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with(" ms"), "{stdout}");
    Ok(())
}

#[test]
fn the_next_server_is_tried_when_the_first_is_down() -> Result<()> {
    let (_server, addr, key) = start()?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let list = format!("{dead},{addr}");
    let out = qpq(&["--server", &list, "--server-key", &key, "ping"])?;
    assert!(out.status.success(), "{out:?}");
    Ok(())
}

#[test]
fn errors_are_one_clear_line_with_a_non_zero_exit() -> Result<()> {
    let (_server, addr, _key) = start()?;
    let other = ClusterSigningKey::generate()?.public_key().to_hex();
    let cases: [(Vec<&str>, &str); 3] = [
        (
            vec!["--server", &addr, "--server-key", &other, "ping"],
            "not vouched for by the pinned cluster key",
        ),
        (
            vec!["--server", &addr, "--server-key", "zz", "ping"],
            "--server-key",
        ),
        (
            vec!["--server", "127.0.0.1:1", "--server-key", &other, "ping"],
            "cannot connect to 127.0.0.1:1",
        ),
    ];
    for (args, expected) in cases {
        let out = qpq(&args)?;
        assert!(!out.status.success(), "{args:?} must fail");
        let err = String::from_utf8(out.stderr)?;
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("qpq: error: "), "{err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    Ok(())
}
