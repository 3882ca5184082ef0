//! The `qpq-server` binary as a user runs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

const BIN: &str = env!("CARGO_BIN_EXE_qpq-server");

fn server_cmd(dir: &std::path::Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir)
        .env_remove("QPQ_CONFIG")
        .env_remove("QPQ_LISTEN")
        .env_remove("QPQ_DATA_DIR")
        .env_remove("QPQ_DATABASE_URL")
        .env("QPQ_OPS_LISTEN", "127.0.0.1:0")
        .env("QPQ_LOG", "warn");
    c
}

/// Runs `qpq-server` with `args` in `dir` and returns its trimmed stdout (failing on error).
fn run_ok(dir: &std::path::Path, args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = server_cmd(dir).args(args).output()?;
    anyhow::ensure!(out.status.success(), "{args:?} failed: {out:?}");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// The operator's steps for one node: its node key (created in `node_dir`), then a
/// certificate for `role` issued with the cluster key in `ops_dir`, written to
/// `node_dir.cert`.
fn certify(
    dir: &std::path::Path,
    ops_dir: &std::path::Path,
    node_dir: &std::path::Path,
    role: &str,
) -> Result<std::path::PathBuf> {
    let key = run_ok(
        dir,
        &[
            "node-key".as_ref(),
            "--data-dir".as_ref(),
            node_dir.as_os_str(),
        ],
    )?;
    let cert = node_dir.with_extension("cert");
    run_ok(
        dir,
        &[
            "node-cert".as_ref(),
            "--data-dir".as_ref(),
            ops_dir.as_os_str(),
            "--role".as_ref(),
            role.as_ref(),
            "--node-key".as_ref(),
            key.as_ref(),
            "--expires".as_ref(),
            "1d".as_ref(),
            "--out".as_ref(),
            cert.as_os_str(),
        ],
    )?;
    Ok(cert)
}

#[test]
fn cluster_key_is_created_once_and_printed() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let run = || -> Result<String> {
        let out = server_cmd(tmp.path())
            .args(["cluster-key", "--data-dir"])
            .arg(&data)
            .output()?;
        anyhow::ensure!(out.status.success(), "cluster-key failed: {out:?}");
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    };
    let first = run()?;
    assert_eq!(first.len(), 64, "hex public key: {first}");
    assert!(quicproquo_core::ClusterPublicKey::from_hex(&first).is_ok());
    assert_eq!(run()?, first, "the key must not change between runs");
    Ok(())
}

#[test]
fn a_bad_config_is_refused_before_binding() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // Hold a port: if the server tried to bind before validating, the error would be
    // "address in use" instead of the config error.
    let held = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = held.local_addr()?.to_string();
    std::fs::write(
        tmp.path().join("qpq-server.toml"),
        format!("listen = \"{addr}\"\nmax_conections = 5\n"),
    )?;
    let out = server_cmd(tmp.path()).arg("standalone").output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_conections"),
        "error must name the key: {err}"
    );
    assert!(!err.contains("in use"), "{err}");

    let out = server_cmd(tmp.path())
        .args(["standalone", "--config", "missing.toml"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));

    let out = server_cmd(tmp.path())
        .args(["edge", "--config", "qpq-server.toml"])
        .env("QPQ_WORKERS", "0")
        .output()?;
    assert!(!out.status.success());
    Ok(())
}

#[test]
fn env_and_flags_override_the_file_and_sigterm_stops_cleanly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    std::fs::write(
        tmp.path().join("qpq-server.toml"),
        "listen = \"127.0.0.1:1\"\ndata_dir = \"from-file\"\n",
    )?;
    let mut child = server_cmd(tmp.path())
        .args(["standalone", "--listen", "127.0.0.1:0"])
        .env("QPQ_DATA_DIR", tmp.path().join("from-env"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    // "qpq-server standalone listening on ADDR cluster-key HEX"
    let words: Vec<&str> = line.split_whitespace().collect();
    let [_, role, _, _, addr, _, key] = words[..] else {
        let _ = child.kill();
        bail!("unexpected first line: {line:?}");
    };
    assert_eq!(role, "standalone");
    assert_ne!(addr, "127.0.0.1:1", "the flag must beat the file");
    assert!(
        tmp.path().join("from-env/node.key").exists(),
        "env must beat the file"
    );
    assert!(!tmp.path().join("from-file").exists());
    assert_eq!(key.len(), 64);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            assert!(status.success(), "exit after SIGTERM: {status}");
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("server did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_schema_once_and_reports_it() -> Result<()> {
    let db = quicproquo_testkit::postgres::fresh_database().await?;
    let tmp = tempfile::tempdir()?;
    let run = |cmd: &mut Command| -> Result<(bool, String, String)> {
        let out = cmd.output()?;
        Ok((
            out.status.success(),
            String::from_utf8(out.stdout)?,
            String::from_utf8(out.stderr)?,
        ))
    };
    let (ok, out, err) = run(server_cmd(tmp.path()).args(["migrate", "--database-url", db.url()]))?;
    assert!(ok, "{err}");
    assert!(
        out.contains("applied 0001_identities_and_key_packages"),
        "{out}"
    );
    // The second time through the environment variable: nothing left to apply.
    let (ok, out, err) = run(server_cmd(tmp.path())
        .arg("migrate")
        .env("QPQ_DATABASE_URL", db.url()))?;
    assert!(ok, "{err}");
    assert!(out.contains("no migration applied"), "{out}");
    quicproquo_server::store::postgres::PgStore::connect(db.url(), 1).await?;

    // Without a database it says how to name one.
    let (ok, _, err) = run(server_cmd(tmp.path()).arg("migrate"))?;
    assert!(!ok);
    assert!(err.contains("--database-url"), "{err}");
    // An unreachable one fails without echoing the password.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("postgres://qpq:hunter2@127.0.0.1:{port}/qpq");
    let (ok, _, err) = run(server_cmd(tmp.path()).args(["migrate", "--database-url", &url]))?;
    assert!(!ok);
    assert!(
        err.contains("unavailable") && !err.contains("hunter2"),
        "{err}"
    );
    Ok(())
}

#[test]
fn edge_and_shard_without_a_database_are_refused_before_binding() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let held = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = held.local_addr()?.to_string();
    for role in ["edge", "shard"] {
        let out = server_cmd(tmp.path())
            .args([role, "--listen", &addr])
            .output()?;
        assert!(!out.status.success(), "{role} started without a database");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("database_url") && err.contains("standalone"),
            "{role}: {err}"
        );
        assert!(!err.contains("in use"), "{role}: {err}");
    }
    Ok(())
}

/// The documented cluster path: `migrate`, then a node with `--database-url` keeps its
fn first_line(child: &mut std::process::Child) -> Result<String> {
    let stdout = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    Ok(line)
}

/// A shard and an edge as separate processes keep the Authentication and Delivery Service
/// state in Postgres; clients are served by the edge only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_and_shard_processes_keep_their_state_in_postgres() -> Result<()> {
    use quicproquo_server::model::UserName;
    use quicproquo_server::model::group::GroupId;
    use quicproquo_server::store::Store;
    use quicproquo_server::store::log::LogStore;

    let db = quicproquo_testkit::postgres::fresh_database().await?;
    let tmp = tempfile::tempdir()?;
    let out = server_cmd(tmp.path())
        .args(["migrate", "--database-url", db.url()])
        .output()?;
    assert!(out.status.success(), "{out:?}");
    // The operator keeps the cluster key; each node gets a certificate.
    let ops = tmp.path().join("ops");
    run_ok(
        tmp.path(),
        &[
            "cluster-key".as_ref(),
            "--data-dir".as_ref(),
            ops.as_os_str(),
        ],
    )?;
    let shard_cert = certify(tmp.path(), &ops, &tmp.path().join("shard"), "shard")?;
    let edge_cert = certify(tmp.path(), &ops, &tmp.path().join("edge"), "edge")?;
    let mut shard = server_cmd(tmp.path())
        .args([
            "shard",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            db.url(),
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("shard"))
        .arg("--node-certificate-file")
        .arg(&shard_cert)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let shard_line = tokio::task::spawn_blocking(move || {
        let line = first_line(&mut shard);
        (shard, line)
    })
    .await?;
    let (mut shard, shard_line) = (shard_line.0, shard_line.1?);
    let mut edge = server_cmd(tmp.path())
        .args([
            "edge",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            db.url(),
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("edge"))
        .arg("--node-certificate-file")
        .arg(&edge_cert)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let edge_line = tokio::task::spawn_blocking(move || {
        let line = first_line(&mut edge);
        (edge, line)
    })
    .await?;
    let (mut edge, edge_line) = (edge_line.0, edge_line.1?);
    let parse = |line: &str, role: &str| -> Result<(std::net::SocketAddr, String)> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            [_, r, _, _, addr, _, key] if r == role => Ok((addr.parse()?, key.to_owned())),
            _ => bail!("unexpected first line: {line:?}"),
        }
    };
    let (shard_addr, shard_key) = parse(&shard_line, "shard")?;
    let (edge_addr, edge_key) = parse(&edge_line, "edge")?;
    assert_eq!(
        shard_key, edge_key,
        "both nodes vouched for by one cluster key"
    );
    for node in ["shard", "edge"] {
        assert!(
            !tmp.path().join(node).join("cluster.key").exists(),
            "the {node} holds no cluster signing key"
        );
    }
    let key = quicproquo_core::ClusterPublicKey::from_hex(&edge_key)?;
    let carol = quicproquo_core::IdentityKeypair::generate()?;
    let used = tokio::task::LocalSet::new()
        .run_until(async {
            let options = quicproquo_client::ConnectOptions::new(key);
            // A shard serves cluster nodes only: a client refuses it at the handshake, and one
            // that connects anyway cannot bind.
            let refused = quicproquo_client::Connection::connect(shard_addr, &options).await;
            anyhow::ensure!(
                matches!(
                    refused,
                    Err(quicproquo_client::ClientError::WrongRole { .. })
                ),
                "a client connected to a shard: {:?}",
                refused.err()
            );
            let mut anyway = options.clone();
            anyway.roles.push(quicproquo_core::NodeRole::Shard);
            let direct = quicproquo_client::Connection::connect(shard_addr, &anyway).await?;
            let refused = direct.bind(&carol).await;
            anyhow::ensure!(
                refused.as_ref().err().and_then(|e| e.code())
                    == Some(quicproquo_proto::errors::ErrorCode::WrongRole),
                "binding on a shard: {:?}",
                refused.err()
            );
            let conn = quicproquo_client::Connection::connect(edge_addr, &options).await?;
            let session = conn.bind(&carol).await?;
            session.auth.claim_name("carol").await?;
            let mls = quicproquo_core::mls::MlsIdentity::new(&carol);
            let provider = quicproquo_core::mls::MlsProvider::default();
            let suite = quicproquo_core::mls::Suite::Hybrid;
            let group = quicproquo_core::group::Group::create(&provider, &mls, suite, b"pg-group")?;
            let info = group.group_info(&provider, &mls)?;
            session.delivery.create_group(b"pg-group", &info).await?;
            anyhow::Ok(())
        })
        .await;
    for child in [&edge, &shard] {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    }
    let edge_status = edge.wait()?;
    let shard_status = shard.wait()?;
    used?;
    assert!(
        edge_status.success(),
        "edge exit after SIGTERM: {edge_status}"
    );
    assert!(
        shard_status.success(),
        "shard exit after SIGTERM: {shard_status}"
    );

    let store = quicproquo_server::store::postgres::PgStore::connect(db.url(), 1).await?;
    assert_eq!(
        store.resolve_name(&UserName::parse("carol")?).await?,
        Some(carol.public())
    );
    assert_eq!(
        store.groups_of(&carol.public()).await?,
        vec![GroupId::new(b"pg-group")?]
    );
    Ok(())
}
