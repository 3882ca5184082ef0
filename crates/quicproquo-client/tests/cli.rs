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

#[test]
fn register_whoami_keys_and_lookup_as_a_user_runs_them() -> Result<()> {
    let (_server, addr, key) = start()?;
    let dir = tempfile::tempdir()?;
    let alice_state = dir.path().join("alice.bin");
    let bob_state = dir.path().join("bob.bin");
    let run = |state: &std::path::Path, args: &[&str]| -> Result<String> {
        let state = state.to_string_lossy().into_owned();
        let mut full = vec!["--server", &addr, "--server-key", &key, "--state", &state];
        full.extend_from_slice(args);
        let out = qpq(&full)?;
        anyhow::ensure!(
            out.status.success(),
            "qpq {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };

    let reg = run(
        &alice_state,
        &["register", "--name", "Alice", "--key-packages", "5"],
    )?;
    assert!(
        reg.starts_with("registered alice (5 KeyPackages on the server, hybrid)"),
        "{reg}"
    );
    let fingerprint = reg
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint "))
        .map(str::to_owned)
        .unwrap_or_default();
    assert_eq!(fingerprint.split(' ').count(), 16, "{reg}");
    // The state file is private.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&alice_state)?.permissions().mode() & 0o777,
        0o600
    );

    let who = run(&alice_state, &["whoami"])?;
    assert_eq!(who, format!("alice\nfingerprint {fingerprint}\n"));

    // 5 is below the low-water mark: `keys` tops the pool up to 12.
    let keys = run(&alice_state, &["keys", "--top-up-to", "12"])?;
    assert_eq!(keys.trim(), "12 KeyPackages on the server (uploaded 7)");
    let keys = run(&alice_state, &["keys", "--top-up-to", "12"])?;
    assert_eq!(
        keys.trim(),
        "12 KeyPackages on the server",
        "12 is not low: no upload"
    );

    // Bob registers with the classical suite and looks Alice up by name.
    run(
        &bob_state,
        &["register", "--name", "bob", "--suite", "classical"],
    )?;
    let found = run(&bob_state, &["lookup", "ALICE"])?;
    assert_eq!(found.trim(), format!("alice fingerprint {fingerprint}"));

    // A taken name is a clear one-line error.
    let carol_state = dir.path().join("carol.bin");
    let carol = carol_state.to_string_lossy().into_owned();
    let out = qpq(&[
        "--server",
        &addr,
        "--server-key",
        &key,
        "--state",
        &carol,
        "register",
        "--name",
        "alice",
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(err.starts_with("qpq: error: name_taken"), "{err}");
    // Re-registering Alice's device under another name is refused locally.
    let out = qpq(&[
        "--server",
        &addr,
        "--server-key",
        &key,
        "--state",
        &alice_state.to_string_lossy(),
        "register",
        "--name",
        "alice2",
    ])?;
    assert!(!out.status.success());
    Ok(())
}

#[test]
fn a_group_conversation_in_separate_invocations() -> Result<()> {
    let (_server, addr, key) = start()?;
    let dir = tempfile::tempdir()?;
    let qpq_as = |user: &str, args: &[&str]| -> Result<String> {
        let state = dir.path().join(format!("{user}.bin"));
        let state = state.to_string_lossy().into_owned();
        let mut full = vec!["--server", &addr, "--server-key", &key, "--state", &state];
        full.extend_from_slice(args);
        let out = qpq(&full)?;
        anyhow::ensure!(
            out.status.success(),
            "{user}: qpq {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    for user in ["alice", "bob", "carol"] {
        qpq_as(user, &["register", "--name", user, "--suite", "classical"])?;
    }
    let created = qpq_as("alice", &["create-group", "friends"])?;
    assert!(created.starts_with("created group friends ("), "{created}");
    let invited = qpq_as("alice", &["invite", "friends", "bob", "carol"])?;
    assert_eq!(invited.trim(), "added bob, carol to friends (epoch 1)");

    let joined = qpq_as("bob", &["join"])?;
    assert!(joined.starts_with("joined group "), "{joined}");
    assert!(
        joined.contains("epoch 1") && joined.contains("alice"),
        "{joined}"
    );
    let group_id = joined
        .split_whitespace()
        .nth(2)
        .map(str::to_owned)
        .unwrap_or_default();

    qpq_as("alice", &["send", "friends", "hello everyone"])?;
    qpq_as("bob", &["send", &group_id, "hi alice"])?;
    let bob_recv = qpq_as("bob", &["recv"])?;
    assert!(bob_recv.contains("alice: hello everyone"), "{bob_recv}");
    assert!(
        !bob_recv.contains("hi alice"),
        "own messages are not echoed: {bob_recv}"
    );
    // Nothing new the second time.
    assert_eq!(qpq_as("bob", &["recv"])?, "");

    // Carol never ran `join`: `recv` joins and catches up in order, as JSON.
    let carol = qpq_as("carol", &["--json", "recv"])?;
    let events: Vec<serde_json::Value> = carol
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(events[0]["event"], "joined");
    let texts: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "message")
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(texts, ["hello everyone", "hi alice"]);

    let groups = qpq_as("alice", &["groups"])?;
    assert!(groups.starts_with("friends ("), "{groups}");
    assert!(groups.contains("epoch 1 members:"), "{groups}");
    for name in ["alice", "bob", "carol"] {
        assert!(groups.contains(name), "{groups}");
    }

    // Alice has not read Bob's message yet: the removal catches up first and prints what it
    // read on the way, as `recv` would have (the log is read once, so nothing is skipped).
    let removed = qpq_as("alice", &["remove", "friends", "carol"])?;
    assert!(removed.contains("bob: hi alice"), "{removed}");
    assert_eq!(
        removed.lines().last(),
        Some("removed carol from friends (epoch 2)"),
        "{removed}"
    );
    assert_eq!(qpq_as("alice", &["recv"])?, "", "already printed");
    let carol = qpq_as("carol", &["recv"])?;
    assert!(carol.contains("you were removed from the group"), "{carol}");
    let bob = qpq_as("bob", &["recv"])?;
    assert!(bob.contains("epoch 2: removed carol"), "{bob}");
    Ok(())
}

/// A second `qpq` on a state file another process holds (as a running `recv --follow` does)
/// stops at once with a clear error and writes nothing, rather than interleaving its saves.
#[test]
fn a_state_file_in_use_is_refused() -> Result<()> {
    let (_server, addr, key) = start()?;
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("alice.bin");
    let state_arg = state.to_string_lossy().into_owned();
    let base = [
        "--server",
        &addr,
        "--server-key",
        &key,
        "--state",
        &state_arg,
    ];
    let out = qpq(&[&base[..], &["register", "--name", "alice"]].concat())?;
    assert!(out.status.success(), "{out:?}");
    let before = std::fs::read(&state)?;
    let held = quicproquo_client::state::StateLock::acquire(&state)?;
    let out = qpq(&[&base[..], &["create-group", "friends"]].concat())?;
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8(out.stderr)?;
    assert!(stderr.contains("in use by another qpq process"), "{stderr}");
    assert_eq!(std::fs::read(&state)?, before, "the state was not written");
    drop(held);
    let out = qpq(&[&base[..], &["create-group", "friends"]].concat())?;
    assert!(out.status.success(), "{out:?}");
    Ok(())
}
