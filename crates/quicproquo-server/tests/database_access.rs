//! The cluster database's access, through real processes and a real Postgres: the runtime
//! role `qpq-server migrate --grant-runtime-role` grants can use the data but not change the
//! schema, and a password in the database URL reaches no log line, even at debug level.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use quicproquo_core::IdentityKeypair;
use quicproquo_server::model::group::{AppendOutcome, GroupId};
use quicproquo_server::store::Store;
use quicproquo_server::store::log::LogStore;
use quicproquo_server::store::postgres::PgStore;
use quicproquo_testkit::log_conformance::app;
use quicproquo_testkit::postgres::{TestDatabase, fresh_database};
use tokio_postgres::NoTls;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;

const BIN: &str = env!("CARGO_BIN_EXE_qpq-server");

/// Host, port, database and user of the test database.
fn parts(db: &TestDatabase) -> Result<(String, u16, String, String)> {
    let config: tokio_postgres::Config = db.url().parse()?;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        _ => bail!("the tests need a TCP host in the database URL"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let dbname = config.get_dbname().context("dbname")?.to_owned();
    let user = config.get_user().unwrap_or("postgres").to_owned();
    Ok((host, port, dbname, user))
}

fn random_suffix() -> Result<String> {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(hex::encode(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_role_uses_the_data_and_cannot_change_the_schema() -> Result<()> {
    let db = fresh_database().await?;
    let (host, port, dbname, _) = parts(&db)?;
    let role = format!("qpq_rt_{}", random_suffix()?);
    let (admin, conn) = tokio_postgres::connect(db.url(), NoTls).await?;
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'rt-pw'"))
        .await?;

    let out = Command::new(BIN)
        .args([
            "migrate",
            "--database-url",
            db.url(),
            "--grant-runtime-role",
            &role,
        ])
        .env_remove("QPQ_CONFIG")
        .output()?;
    ensure!(out.status.success(), "migrate: {out:?}");
    ensure!(String::from_utf8(out.stdout)?.contains(&format!("granted the runtime role {role}")));

    let runtime_url = format!("host={host} port={port} dbname={dbname} user={role} password=rt-pw");
    let result = async {
        // The nodes' store opens as the runtime role and does its work.
        let store = PgStore::connect(&runtime_url, 2).await?;
        let creator = IdentityKeypair::generate()?.public();
        store.register_identity(&creator).await?;
        let group = GroupId::new(b"runtime-role")?;
        store.create_group(&group, &creator).await?;
        // An append copies its log rows in (ADR 0020): `COPY` needs no more than `INSERT`.
        let out = store.append(&[app(&group, creator, 0, "m1")]).await?;
        ensure!(
            out == [AppendOutcome::Appended { seq: 1, epoch: 0 }],
            "{out:?}"
        );
        // A schema change is refused by Postgres itself.
        let (rt, conn) = tokio_postgres::connect(&runtime_url, NoTls).await?;
        tokio::spawn(conn);
        for ddl in [
            "CREATE TABLE evil (x INT)",
            "ALTER TABLE schema_migrations ADD COLUMN evil INT",
            "DROP TABLE schema_migrations",
            "TRUNCATE schema_migrations",
        ] {
            match rt.batch_execute(ddl).await {
                Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {}
                other => bail!("{ddl}: expected insufficient_privilege, got {other:?}"),
            }
        }
        anyhow::Ok(())
    }
    .await;
    // Roles outlive the test's database: drop this one whatever happened.
    admin
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await?;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_reaches_a_log_line_or_an_error() -> Result<()> {
    let db = fresh_database().await?;
    quicproquo_server::store::postgres::migrate(db.url()).await?;
    let (host, port, dbname, user) = parts(&db)?;
    let tmp = tempfile::tempdir()?;
    let (in_userinfo, in_query) = ("pw-userinfo-5ka1", "pw-query-9zq2");
    let url = format!("postgres://{user}:{in_userinfo}@{host}:{port}/{dbname}?password={in_query}");

    // A node at debug level, up and then stopped (the test server trusts local connections:
    // the password is carried, not checked).
    let mut node = Command::new(BIN)
        .args([
            "standalone",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "off",
        ])
        .args(["--database-url", &url])
        .arg("--data-dir")
        .arg(tmp.path().join("node"))
        .env_remove("QPQ_CONFIG")
        .env("QPQ_LOG", "debug")
        .env("QPQ_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(node.stdout.take().context("stdout")?).read_line(&mut line)?;
    ensure!(
        line.contains("listening"),
        "the node did not start: {line:?}"
    );
    // Collect the log as it comes; a peer that leaves mid-handshake makes a debug line.
    let stderr = node.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = line.split_whitespace().nth(4).context("address")?;
    drop(std::net::TcpStream::connect(addr)?);
    let mut logs = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !logs.contains("\"level\":\"DEBUG\"") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .with_context(|| format!("no debug line within 10 s:\n{logs}"))?;
        logs.push_str(&line);
        logs.push('\n');
    }
    let status = Command::new("kill")
        .args(["-TERM", &node.id().to_string()])
        .status()?;
    ensure!(status.success());
    ensure!(node.wait()?.success());
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("log reader panicked"))?;
    logs.extend(rx.try_iter().map(|l| l + "\n"));
    ensure!(logs.contains(":***@"), "the redacted URL is logged: {logs}");

    // Errors: a database that does not answer, and one that refuses the user.
    let unreachable =
        format!("postgres://{user}:{in_userinfo}@127.0.0.1:1/{dbname}?password={in_query}");
    let mut errors = String::new();
    for bad in [&unreachable, &url.replace(&user, "no_such_user_x")] {
        let out = Command::new(BIN)
            .args(["migrate", "--database-url", bad])
            .env_remove("QPQ_CONFIG")
            .env("QPQ_LOG", "debug")
            .output()?;
        ensure!(!out.status.success(), "migrate succeeded against {bad}");
        errors.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    ensure!(errors.contains("***"), "{errors}");
    for secret in [in_userinfo, in_query] {
        ensure!(
            !logs.contains(secret),
            "{secret} in the node's log:\n{logs}"
        );
        ensure!(!errors.contains(secret), "{secret} in an error:\n{errors}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_is_used_as_asked_and_verified() -> Result<()> {
    use quicproquo_server::store::postgres_access::{connection_config, tls_connector};

    let db = fresh_database().await?;
    let (_, port, dbname, user) = parts(&db)?;
    let (admin, conn) = tokio_postgres::connect(db.url(), NoTls).await?;
    tokio::spawn(conn);
    let ssl = admin.query_one("SHOW ssl", &[]).await?.get::<_, String>(0);
    // `localhost`: the name a local server's certificate is usually made out to.
    let url = |mode: &str| format!("postgres://{user}@localhost:{port}/{dbname}?sslmode={mode}");
    let migrate = |url: &str, ca: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args(["migrate", "--database-url", url])
            .env_remove("QPQ_CONFIG");
        if let Some(ca) = ca {
            c.args(["--database-ca-file", ca]);
        }
        c.output()
    };
    if ssl != "on" {
        // A server without TLS: asked for TLS, the node refuses to go on in the clear.
        let out = migrate(&url("require"), None)?;
        ensure!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(err.contains("TLS"), "{err}");
        return Ok(());
    }
    // The server's own (self-signed) certificate is the CA to trust.
    let cert = admin
        .query_one("SHOW ssl_cert_file", &[])
        .await?
        .get::<_, String>(0);
    let out = migrate(&url("verify-full"), Some(&cert))?;
    ensure!(out.status.success(), "verified TLS: {out:?}");
    // The connection really is TLS.
    let (client, conn) = connection_config(&url("require"))?
        .connect(tls_connector(Some(std::path::Path::new(&cert)))?)
        .await?;
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    ensure!(row.get::<_, bool>(0), "the connection is not TLS");
    // Without the server's CA, its certificate is refused, not accepted blindly.
    let out = migrate(&url("require"), None)?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("certificate"), "{err}");
    Ok(())
}
