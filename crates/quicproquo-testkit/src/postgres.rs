//! Throwaway Postgres databases for tests.
//!
//! [`fresh_database`] creates a brand-new, empty database (`qpq_test_<hex>`) for each call, so
//! tests never share state and can run in parallel. The server is:
//! - the one named by `QPQ_TEST_DATABASE_URL` (a libpq-style URL or `key=value` string whose
//!   user may create databases), when that variable is set; otherwise
//! - a throwaway server this process starts once, on first use, from the installed PostgreSQL
//!   server binaries: `initdb` into a temporary directory, `postgres` listening on a free port
//!   of 127.0.0.1 only, trust authentication, `fsync=off`. When running as root both run as the
//!   `postgres` OS user (they refuse to run as root). A watchdog shell holds a pipe from this
//!   process: when the process exits, however it exits, the pipe closes and the watchdog stops
//!   the server and deletes its directory.
//!
//! The machine's own Postgres (if any) is never used implicitly. When no database can be had the
//! call fails with a message saying how to get one; tests never skip.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio_postgres::NoTls;

/// The environment variable naming a Postgres server to create test databases on.
pub const DATABASE_URL_ENV: &str = "QPQ_TEST_DATABASE_URL";

/// How long a throwaway server may take to accept connections.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);
/// How long to keep trying to reach a server given by URL.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Attempts at starting the throwaway server (a free port can be taken before postgres binds it).
const START_ATTEMPTS: usize = 3;

/// A fresh, empty database for one test. Dropping it leaves the database in place: throwaway
/// servers vanish with the test process, and databases on a server given by
/// `QPQ_TEST_DATABASE_URL` are named `qpq_test_*` for easy cleanup.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    url: String,
    name: String,
}

impl TestDatabase {
    /// A connection URL for this database (libpq style; usable by `psql` and `pgbench` too).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Creates a new, empty database on the test server (see the module documentation).
pub async fn fresh_database() -> Result<TestDatabase> {
    let admin_url = match std::env::var(DATABASE_URL_ENV) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => tokio::task::spawn_blocking(throwaway_server)
            .await
            .context("starting the throwaway Postgres server")??,
    };
    let client = connect_with_deadline(&admin_url, CONNECT_DEADLINE)
        .await
        .map_err(|e| no_database(&e))?;
    let name = format!("qpq_test_{}", random_hex(8)?);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .with_context(|| format!("creating test database {name}"))?;
    let url = with_database(&admin_url, &name)?;
    Ok(TestDatabase { url, name })
}

fn no_database(cause: &anyhow::Error) -> anyhow::Error {
    anyhow!(
        "no PostgreSQL server for the tests: set {DATABASE_URL_ENV} to a server's URL (e.g. \
         postgres://postgres@127.0.0.1:5432/postgres, a user allowed to create databases), or \
         install the PostgreSQL server binaries (initdb, postgres; Debian: apt-get install \
         postgresql) so the tests can start a throwaway server. Cause: {cause:#}"
    )
}

/// Connects, retrying until `deadline` passes (a server may still be starting up).
async fn connect_with_deadline(url: &str, deadline: Duration) -> Result<tokio_postgres::Client> {
    let until = Instant::now() + deadline;
    loop {
        match tokio_postgres::connect(url, NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                return Ok(client);
            }
            Err(e) if Instant::now() >= until => {
                return Err(anyhow!(e).context("connecting to the test Postgres server"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `url` with its database replaced by `database`. Accepts `postgres://` / `postgresql://` URLs
/// and `key=value` connection strings.
pub fn with_database(url: &str, database: &str) -> Result<String> {
    let url = url.trim();
    let Some(scheme_end) = url.find("://") else {
        if url.contains('=') {
            // In a key=value string the last `dbname` wins.
            return Ok(format!("{url} dbname={database}"));
        }
        bail!("not a Postgres connection URL or key=value string");
    };
    let (base, query) = match url.find('?') {
        Some(q) => url.split_at(q),
        None => (url, ""),
    };
    let authority_start = scheme_end + 3;
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    Ok(format!("{}/{database}{query}", &base[..authority_end]))
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| anyhow!("random bytes: {e}"))?;
    Ok(hex::encode(buf))
}

/// A running throwaway server; lives in a static until the process exits.
struct Throwaway {
    admin_url: String,
    /// The watchdog's stdin: never written, closed by the kernel when this process exits.
    _lifeline: ChildStdin,
    _watchdog: Child,
}

static THROWAWAY: OnceLock<Result<Throwaway, String>> = OnceLock::new();

/// The admin URL of this process's throwaway server, starting it on first use (blocking).
fn throwaway_server() -> Result<String> {
    THROWAWAY
        .get_or_init(|| start_throwaway().map_err(|e| format!("{:#}", no_database(&e))))
        .as_ref()
        .map(|t| t.admin_url.clone())
        .map_err(|e| anyhow!("{e}"))
}

/// Finds a PostgreSQL program: on `PATH`, then in `pg_config --bindir`, then in the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn pg_binary(name: &str) -> Result<PathBuf> {
    candidate_bin_dirs()
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("`{name}` not found on PATH, in `pg_config --bindir` or in /usr/lib/postgresql/*/bin"))
}

fn candidate_bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        dirs.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let version = e.file_name().to_str()?.parse().ok()?;
                    Some((version, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    versioned.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    dirs.extend(versioned.into_iter().map(|(_, d)| d));
    dirs
}

/// A directory holding both `initdb` and `postgres` (they must come from one installation).
fn server_bin_dir() -> Result<PathBuf> {
    candidate_bin_dirs()
        .into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
        .ok_or_else(|| anyhow!("no directory with both `initdb` and `postgres` found"))
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Creates the cluster and runs the server; when the test process goes away (the pipe on fd 3
/// closes) stops it and deletes the directory. `postgres.exited` tells the test process that
/// initdb failed or the server died.
const WATCHDOG: &str = r#"
dir=$1; bindir=$2; port=$3
exec 3<&0 </dev/null
if "$bindir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync \
    3<&- >"$dir/initdb.log" 2>&1
then
    "$bindir/postgres" -D "$dir/data" -k "$dir" -p "$port" \
        -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off \
        -c max_connections=300 3<&- >"$dir/postgres.log" 2>&1 &
    pg=$!
    # SIGQUIT is an immediate shutdown. A background job starts with SIGQUIT ignored until
    # postgres installs its handler, so repeat until it is gone.
    ( cat <&3 >/dev/null
      while kill -QUIT "$pg" 2>/dev/null; do sleep 1; done ) &
    wait "$pg"
fi
echo "$?" >"$dir/postgres.exited"
cat <&3 >/dev/null
wait
rm -rf "$dir"
"#;

fn start_throwaway() -> Result<Throwaway> {
    let bindir = server_bin_dir()?;
    let as_postgres = running_as_root();
    let mut last_error = None;
    for _ in 0..START_ATTEMPTS {
        match start_once(&bindir, as_postgres) {
            Ok(t) => return Ok(t),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow!("the throwaway server did not start")))
}

/// Starts a server in a new temporary directory, owned by the watchdog from its start.
fn start_once(bindir: &Path, as_postgres: bool) -> Result<Throwaway> {
    let dir = std::env::temp_dir().join(format!("qpq-pg-{}", random_hex(6)?));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let cleanup = |e: anyhow::Error| {
        let _ = std::fs::remove_dir_all(&dir);
        e
    };
    if as_postgres {
        let status = Command::new("chown")
            .arg("postgres")
            .arg(&dir)
            .status()
            .context("running chown")
            .map_err(cleanup)?;
        if !status.success() {
            return Err(cleanup(anyhow!(
                "cannot give {} to the `postgres` OS user (initdb refuses to run as root)",
                dir.display()
            )));
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port")
        .map_err(cleanup)?
        .port();
    let mut command = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]);
        c
    } else {
        Command::new("env")
    };
    let mut watchdog = command
        .args(["sh", "-c", WATCHDOG, "sh"])
        .arg(&dir)
        .arg(bindir)
        .arg(port.to_string())
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting initdb and postgres")
        .map_err(cleanup)?;
    // From here the watchdog owns the directory: once the pipe closes (on error here, or when
    // this process exits) it stops the server and deletes the directory.
    let lifeline = watchdog
        .stdin
        .take()
        .ok_or_else(|| anyhow!("the watchdog has no stdin pipe"))?;
    let admin_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    wait_until_ready(&admin_url, &dir)?;
    Ok(Throwaway {
        admin_url,
        _lifeline: lifeline,
        _watchdog: watchdog,
    })
}

/// Polls a connection until the server answers, it dies, or the deadline passes.
fn wait_until_ready(url: &str, dir: &Path) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a runtime to probe the server")?;
    let until = Instant::now() + STARTUP_DEADLINE;
    runtime.block_on(async {
        loop {
            match tokio_postgres::connect(url, NoTls).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if dir.join("postgres.exited").exists() {
                        bail!(
                            "the throwaway server did not start: {} {}",
                            log_tail(dir, "initdb.log"),
                            log_tail(dir, "postgres.log")
                        );
                    }
                    if Instant::now() >= until {
                        bail!(
                            "postgres did not accept connections within {STARTUP_DEADLINE:?} \
                             ({e}): {}",
                            log_tail(dir, "postgres.log")
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        }
    })
}

/// The last lines of a log in `dir`, for error messages.
fn log_tail(dir: &Path, log: &str) -> String {
    let Ok(file) = std::fs::File::open(dir.join(log)) else {
        return String::new();
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_in_a_url_is_replaced() -> Result<()> {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres", "t1")?,
            "postgres://u:p@h:5432/t1"
        );
        assert_eq!(
            with_database("postgresql://h?sslmode=disable", "t1")?,
            "postgresql://h/t1?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h/db?application_name=x", "t1")?,
            "postgres://h/t1?application_name=x"
        );
        assert_eq!(
            with_database("host=h user=u dbname=postgres", "t1")?,
            "host=h user=u dbname=postgres dbname=t1"
        );
        assert!(with_database("nonsense", "t1").is_err());
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_call_gets_its_own_empty_database() -> Result<()> {
        let (a, b) = (fresh_database().await?, fresh_database().await?);
        assert_ne!(a.name(), b.name());
        let (client, connection) = tokio_postgres::connect(a.url(), NoTls).await?;
        tokio::spawn(connection);
        client.batch_execute("CREATE TABLE t (x int)").await?;
        let (client_b, connection_b) = tokio_postgres::connect(b.url(), NoTls).await?;
        tokio::spawn(connection_b);
        let tables = client_b
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                &[],
            )
            .await?;
        assert_eq!(tables.get::<_, i64>(0), 0, "a fresh database is empty");
        Ok(())
    }
}
