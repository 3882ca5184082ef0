//! `qpq`: the quicproquo command-line client.

use std::process::ExitCode;
use std::time::Duration;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use quicproquo_client::chat::Chat;
use quicproquo_client::state::DEFAULT_STATE_FILE;
use quicproquo_client::{
    AuthClient, ClientState, ConnectOptions, Connection, Session, connect_any, resolve,
};
use serde_json::json;

mod output;
use output::{Names, Output, follow_live};
use quicproquo_client::follow::Follower;
use quicproquo_core::ClusterPublicKey;
use quicproquo_core::duration::parse_duration;
use quicproquo_core::mls::Suite;

#[derive(Parser)]
#[command(
    name = "qpq",
    version,
    about = "quicproquo client: end-to-end encrypted group messaging"
)]
struct Cli {
    /// Server address(es), `host:port[,host:port...]`, tried in order.
    #[arg(
        long,
        env = "QPQ_SERVER",
        value_delimiter = ',',
        default_value = "127.0.0.1:7000"
    )]
    server: Vec<String>,
    /// The cluster public key (hex) printed by `qpq-server cluster-key`.
    #[arg(long, env = "QPQ_SERVER_KEY", default_value = "")]
    server_key: String,
    /// The device state file.
    #[arg(long, env = "QPQ_STATE", default_value = DEFAULT_STATE_FILE)]
    state: PathBuf,
    /// Deadline for connecting, the handshake and each call, e.g. `5s`, `500ms`, `1m`.
    #[arg(long, env = "QPQ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print one JSON object per event instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure the round-trip time to a server over Noise + Cap'n Proto.
    Ping,
    /// Create this device's identity (if the state has none), claim a user name and upload
    /// KeyPackages.
    Register {
        /// The user name to claim (3-32 characters: a-z, 0-9, '_', '-', '.').
        #[arg(long)]
        name: String,
        /// MLS ciphersuite of this device's KeyPackages.
        #[arg(long, default_value = "hybrid", value_parser = parse_suite)]
        suite: Suite,
        /// How many KeyPackages to upload.
        #[arg(long, default_value_t = DEFAULT_BATCH)]
        key_packages: u32,
    },
    /// Print this device's user name and identity fingerprint.
    Whoami,
    /// Show how many KeyPackages the server holds for this device; upload more when low.
    Keys {
        /// Top the pool up to this many when the server says it is low.
        #[arg(long, default_value_t = DEFAULT_BATCH)]
        top_up_to: u32,
    },
    /// Look up a user by name and print the fingerprint of their identity key.
    Lookup {
        /// The user name.
        name: String,
    },
    /// Create a group with this device as its only member.
    CreateGroup {
        /// A local name for the group.
        name: String,
    },
    /// Add users to a group (one commit for all of them).
    Invite {
        /// The group (local name or hex id prefix).
        group: String,
        /// User names to add.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove users from a group.
    Remove {
        /// The group (local name or hex id prefix).
        group: String,
        /// User names to remove.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Process pending Welcomes and print the groups joined.
    Join,
    /// Send a message to a group.
    Send {
        /// The group (local name or hex id prefix).
        group: String,
        /// The text.
        text: String,
    },
    /// Print what arrived since last time (and join pending groups); `--follow` stays live.
    Recv {
        /// Keep receiving as messages arrive, until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// List groups with epoch and members.
    Groups,
}

/// KeyPackages uploaded at registration and kept in the pool.
const DEFAULT_BATCH: u32 = 50;

fn parse_suite(s: &str) -> Result<Suite, String> {
    Suite::parse(s).ok_or_else(|| "use hybrid or classical".to_owned())
}

struct Ctx {
    addrs: Vec<std::net::SocketAddr>,
    options: ConnectOptions,
}

/// Connection settings, resolved only by the commands that talk to a server.
struct LazyCtx;

impl LazyCtx {
    async fn ready(&self, cli: &Cli) -> Result<Ctx> {
        Ctx::new(cli).await
    }

    /// Loads the state, connects and binds the identity.
    async fn bound(&self, cli: &Cli) -> Result<(ClientState, Connection, Session)> {
        let ctx = Ctx::new(cli).await?;
        let state = ClientState::load(&cli.state)?;
        let conn = ctx.connect().await?;
        let session = conn.bind(state.identity()).await?;
        Ok((state, conn, session))
    }
}

impl Ctx {
    fn lazy() -> LazyCtx {
        LazyCtx
    }

    async fn new(cli: &Cli) -> Result<Self> {
        if cli.server_key.is_empty() {
            bail!("--server-key is required (the key `qpq-server cluster-key` prints)");
        }
        let key = ClusterPublicKey::from_hex(&cli.server_key).context("--server-key")?;
        let mut options = ConnectOptions::new(key);
        options.timeout = cli.timeout;
        let addrs = resolve(&cli.server).await?;
        Ok(Self { addrs, options })
    }

    async fn connect(&self) -> Result<Connection> {
        Ok(connect_any(&self.addrs, &self.options).await?)
    }
}

/// Generates `count` KeyPackages, saves the state (their private keys) and only then uploads,
/// so the server never holds a KeyPackage whose secrets this device could lose.
async fn upload_batch(
    state: &ClientState,
    path: &std::path::Path,
    auth: &AuthClient,
    count: u32,
    with_last_resort: bool,
) -> Result<u32> {
    let mls = state.mls_identity();
    let packages = mls.key_packages(&state.mls, state.suite, count as usize)?;
    let last_resort = if with_last_resort {
        Some(mls.last_resort_key_package(&state.mls, state.suite)?)
    } else {
        None
    };
    state.save(path)?;
    Ok(auth
        .upload_key_packages(&packages, last_resort.as_deref())
        .await?)
}

async fn run(cli: Cli) -> Result<()> {
    let out = Output { json: cli.json };
    let ctx = Ctx::lazy();
    match &cli.command {
        Command::Ping => {
            let ctx = ctx.ready(&cli).await?;
            let conn = ctx.connect().await?;
            let pong = conn.ping(b"qpq ping").await?;
            println!(
                "pong from {} ({}) in {:.2} ms",
                conn.addr(),
                conn.server_role(),
                pong.rtt.as_secs_f64() * 1e3
            );
            conn.close().await;
        }
        Command::Register {
            name,
            suite,
            key_packages,
        } => {
            let ctx = ctx.ready(&cli).await?;
            let mut state = ClientState::load_or_create(&cli.state, *suite)?;
            if let Some(existing) = &state.name
                && !existing.eq_ignore_ascii_case(name)
            {
                bail!("this device is already registered as {existing}");
            }
            let conn = ctx.connect().await?;
            let auth = conn.bind(state.identity()).await?.auth;
            auth.claim_name(name).await?;
            state.name = Some(name.to_ascii_lowercase());
            let remaining = upload_batch(&state, &cli.state, &auth, *key_packages, true).await?;
            println!(
                "registered {} ({} KeyPackages on the server, {})",
                name.to_ascii_lowercase(),
                remaining,
                state.suite
            );
            println!("fingerprint {}", state.identity().public().fingerprint());
            conn.close().await;
        }
        Command::Whoami => {
            let state = ClientState::load(&cli.state)?;
            println!("{}", state.name.as_deref().unwrap_or("(no name)"));
            println!("fingerprint {}", state.identity().public().fingerprint());
        }
        Command::Keys { top_up_to } => {
            let ctx = ctx.ready(&cli).await?;
            let state = ClientState::load(&cli.state)?;
            let conn = ctx.connect().await?;
            let auth = conn.bind(state.identity()).await?.auth;
            let (remaining, low) = auth.key_package_count().await?;
            if low && remaining < *top_up_to {
                let after =
                    upload_batch(&state, &cli.state, &auth, top_up_to - remaining, false).await?;
                println!(
                    "{after} KeyPackages on the server (uploaded {})",
                    after.saturating_sub(remaining)
                );
            } else {
                println!("{remaining} KeyPackages on the server");
            }
            conn.close().await;
        }
        Command::CreateGroup { name } => {
            let (mut state, conn, session) = ctx.bound(&cli).await?;
            let id = Chat::new(&mut state, &cli.state, &session)
                .create_group(name)
                .await?;
            out.line(
                &format!("created group {name} ({})", hex::encode(&id[..4])),
                json!({"event": "created", "group": name, "id": hex::encode(&id)}),
            );
            conn.close().await;
        }
        Command::Invite { group, names } => {
            let (mut state, conn, session) = ctx.bound(&cli).await?;
            let mut events = Vec::new();
            let epoch = Chat::new(&mut state, &cli.state, &session)
                .invite(group, names, &mut |e| events.push(e))
                .await?;
            out.events(&session, events).await?;
            out.line(
                &format!("added {} to {group} (epoch {epoch})", names.join(", ")),
                json!({"event": "invited", "group": group, "names": names, "epoch": epoch}),
            );
            conn.close().await;
        }
        Command::Remove { group, names } => {
            let (mut state, conn, session) = ctx.bound(&cli).await?;
            let mut events = Vec::new();
            let epoch = Chat::new(&mut state, &cli.state, &session)
                .remove(group, names, &mut |e| events.push(e))
                .await?;
            out.events(&session, events).await?;
            out.line(
                &format!("removed {} from {group} (epoch {epoch})", names.join(", ")),
                json!({"event": "removed", "group": group, "names": names, "epoch": epoch}),
            );
            conn.close().await;
        }
        Command::Join => {
            let (mut state, conn, session) = ctx.bound(&cli).await?;
            let mut events = Vec::new();
            Chat::new(&mut state, &cli.state, &session)
                .join(&mut |e| events.push(e))
                .await?;
            out.events(&session, events).await?;
            conn.close().await;
        }
        Command::Send { group, text } => {
            let (mut state, conn, session) = ctx.bound(&cli).await?;
            let mut events = Vec::new();
            let seq = Chat::new(&mut state, &cli.state, &session)
                .send(group, text.as_bytes(), &mut |e| events.push(e))
                .await?;
            out.events(&session, events).await?;
            out.line(
                &format!("sent to {group} (#{seq})"),
                json!({"event": "sent", "group": group, "seq": seq}),
            );
            conn.close().await;
        }
        Command::Recv { follow } => {
            let ctx = ctx.ready(&cli).await?;
            let mut state = ClientState::load(&cli.state)?;
            let conn = ctx.connect().await?;
            let session = conn.bind(state.identity()).await?;
            let mut names = Names::default();
            let mut events = Vec::new();
            Chat::new(&mut state, &cli.state, &session)
                .receive_all(&mut |e| events.push(e))
                .await?;
            for e in events.drain(..) {
                out.event(&mut names, &session, e).await?;
            }
            if *follow {
                let follower = Follower::new(
                    &mut state,
                    &cli.state,
                    ctx.addrs.clone(),
                    ctx.options.clone(),
                )
                .with_connection(conn, session);
                follow_live(follower, &out, &mut names).await?;
            } else {
                conn.close().await;
            }
        }
        Command::Groups => {
            let (state, conn, session) = ctx.bound(&cli).await?;
            let mut names = Names::default();
            for g in session.delivery.groups().await? {
                let label = state.groups.get(&g.group_id).map_or_else(
                    || hex::encode(&g.group_id[..4.min(g.group_id.len())]),
                    |m| m.name.clone(),
                );
                let members = names.describe(&session, &g.members).await?;
                out.line(
                    &format!(
                        "{label} ({}) epoch {} members: {}",
                        hex::encode(&g.group_id[..4.min(g.group_id.len())]),
                        g.epoch,
                        members.join(", ")
                    ),
                    json!({"event": "group", "group": label, "id": hex::encode(&g.group_id),
                           "epoch": g.epoch, "members": members, "last_seq": g.last_seq}),
                );
            }
            conn.close().await;
        }
        Command::Lookup { name } => {
            let ctx = ctx.ready(&cli).await?;
            let state = ClientState::load(&cli.state)?;
            let conn = ctx.connect().await?;
            let auth = conn.bind(state.identity()).await?.auth;
            let id = auth.resolve_name(name).await?;
            println!(
                "{} fingerprint {}",
                name.to_ascii_lowercase(),
                id.fingerprint()
            );
            conn.close().await;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qpq: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Logs (`QPQ_LOG`, `QPQ_LOG_FORMAT`, default: warnings) and, with
    // OTEL_EXPORTER_OTLP_ENDPOINT set, the command's trace.
    let telemetry = quicproquo_telemetry::LogFormat::from_env().and_then(|log_format| {
        quicproquo_telemetry::init(&quicproquo_telemetry::Options {
            service_name: "qpq".to_owned(),
            log_format,
            default_log_level: "warn".to_owned(),
            otlp_endpoint: None,
            export_traces: true,
        })
    });
    let telemetry = match telemetry {
        Ok(t) => t,
        Err(e) => {
            eprintln!("qpq: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    let command = tracing::info_span!("qpq.command", otel.name = "qpq command");
    let result = local.block_on(&runtime, tracing::Instrument::instrument(run(cli), command));
    drop(local);
    drop(runtime);
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qpq: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
