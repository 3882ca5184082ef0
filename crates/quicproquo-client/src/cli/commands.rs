//! One function per `qpq` command. Each connects only if it talks to a server, prints its
//! result, and closes the connection politely.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;
use quicproquo_client::chat::Chat;
use quicproquo_client::follow::Follower;
use quicproquo_client::{
    AuthClient, ClientState, ConnectOptions, Connection, Session, connect_any, resolve,
    short_group_id,
};
use quicproquo_core::ClusterPublicKey;
use quicproquo_core::mls::Suite;
use serde_json::json;

use super::Cli;
use super::outcome::{Stop, UsageError};
use super::output::{Names, Output, follow_live};

/// Where the servers are and how to reach them, for the commands that talk to one.
struct Ctx {
    addrs: Vec<SocketAddr>,
    options: ConnectOptions,
}

impl Ctx {
    async fn new(cli: &Cli) -> Result<Self> {
        if cli.server_key.is_empty() {
            return Err(UsageError::MissingServerKey.into());
        }
        // Several keys, comma-separated, during a cluster key rollover.
        let keys = cli
            .server_key
            .split(',')
            .map(ClusterPublicKey::from_hex)
            .collect::<Result<Vec<_>, _>>()
            .map_err(UsageError::BadServerKey)?;
        let mut options = ConnectOptions::with_keys(keys).map_err(UsageError::BadServerKey)?;
        options.timeout = cli.timeout;
        let addrs = resolve(&cli.server).await?;
        Ok(Self { addrs, options })
    }

    async fn connect(&self) -> Result<Connection> {
        Ok(connect_any(&self.addrs, &self.options).await?)
    }
}

/// Loads the state, connects and binds the identity.
async fn bound(cli: &Cli) -> Result<(ClientState, Connection, Session)> {
    let ctx = Ctx::new(cli).await?;
    let state = ClientState::load(&cli.state)?;
    let conn = ctx.connect().await?;
    let session = conn.bind(state.identity()).await?;
    Ok((state, conn, session))
}

/// Loads the state, connects and binds the identity for the Authentication Service only.
async fn bound_auth(cli: &Cli) -> Result<(ClientState, Connection, AuthClient)> {
    let (state, conn, session) = bound(cli).await?;
    Ok((state, conn, session.auth))
}

/// Generates `count` KeyPackages, saves the state (their private keys) and only then uploads,
/// so the server never holds a KeyPackage whose secrets this device could lose.
async fn upload_batch(
    state: &ClientState,
    path: &Path,
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

/// `qpq ping`: the round-trip time to the first server that answers.
pub(super) async fn ping(cli: &Cli) -> Result<()> {
    let conn = Ctx::new(cli).await?.connect().await?;
    let pong = conn.ping(b"qpq ping").await?;
    println!(
        "pong from {} ({}) in {:.2} ms",
        conn.addr(),
        conn.server_role(),
        pong.rtt.as_secs_f64() * 1e3
    );
    conn.close().await;
    Ok(())
}

/// `qpq register`: creates the identity if needed, claims `name`, uploads KeyPackages.
pub(super) async fn register(cli: &Cli, name: &str, suite: Suite, key_packages: u32) -> Result<()> {
    let ctx = Ctx::new(cli).await?;
    let mut state = ClientState::load_or_create(&cli.state, suite)?;
    if let Some(existing) = &state.name
        && !existing.eq_ignore_ascii_case(name)
    {
        return Err(UsageError::AlreadyRegistered(existing.clone()).into());
    }
    let conn = ctx.connect().await?;
    let auth = conn.bind(state.identity()).await?.auth;
    auth.claim_name(name).await?;
    state.name = Some(name.to_ascii_lowercase());
    let remaining = upload_batch(&state, &cli.state, &auth, key_packages, true).await?;
    println!(
        "registered {} ({} KeyPackages on the server, {})",
        name.to_ascii_lowercase(),
        remaining,
        state.suite
    );
    println!("fingerprint {}", state.identity().public().fingerprint());
    conn.close().await;
    Ok(())
}

/// `qpq whoami`: this device's name and fingerprint, from the state alone.
pub(super) fn whoami(cli: &Cli) -> Result<()> {
    let state = ClientState::load(&cli.state)?;
    println!("{}", state.name.as_deref().unwrap_or("(no name)"));
    println!("fingerprint {}", state.identity().public().fingerprint());
    Ok(())
}

/// `qpq keys`: the KeyPackages the server holds for us, topped up to `top_up_to` when low.
pub(super) async fn keys(cli: &Cli, top_up_to: u32) -> Result<()> {
    let (state, conn, auth) = bound_auth(cli).await?;
    let (remaining, low) = auth.key_package_count().await?;
    if low && remaining < top_up_to {
        let after = upload_batch(&state, &cli.state, &auth, top_up_to - remaining, false).await?;
        println!(
            "{after} KeyPackages on the server (uploaded {})",
            after.saturating_sub(remaining)
        );
    } else {
        println!("{remaining} KeyPackages on the server");
    }
    conn.close().await;
    Ok(())
}

/// `qpq lookup`: the fingerprint of the identity that owns `name`.
pub(super) async fn lookup(cli: &Cli, name: &str) -> Result<()> {
    let (_, conn, auth) = bound_auth(cli).await?;
    let id = auth.resolve_name(name).await?;
    println!(
        "{} fingerprint {}",
        name.to_ascii_lowercase(),
        id.fingerprint()
    );
    conn.close().await;
    Ok(())
}

/// `qpq create-group`: a group with this device as its only member.
pub(super) async fn create_group(cli: &Cli, out: &Output, name: &str) -> Result<()> {
    let (mut state, conn, session) = bound(cli).await?;
    let id = Chat::new(&mut state, &cli.state, &session)
        .create_group(name)
        .await?;
    out.line(
        &format!("created group {name} ({})", short_group_id(&id)),
        json!({"event": "created", "group": name, "id": hex::encode(&id)}),
    );
    conn.close().await;
    Ok(())
}

/// `qpq invite`: adds `names` to `group` in one commit, after printing what it read first.
pub(super) async fn invite(cli: &Cli, out: &Output, group: &str, names: &[String]) -> Result<()> {
    let (mut state, conn, session) = bound(cli).await?;
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
    Ok(())
}

/// `qpq remove`: removes `names` from `group` in one commit, after printing what it read first.
pub(super) async fn remove(cli: &Cli, out: &Output, group: &str, names: &[String]) -> Result<()> {
    let (mut state, conn, session) = bound(cli).await?;
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
    Ok(())
}

/// `qpq join`: joins the groups of pending Welcomes.
pub(super) async fn join(cli: &Cli, out: &Output) -> Result<()> {
    let (mut state, conn, session) = bound(cli).await?;
    let mut events = Vec::new();
    Chat::new(&mut state, &cli.state, &session)
        .join(&mut |e| events.push(e))
        .await?;
    out.events(&session, events).await?;
    conn.close().await;
    Ok(())
}

/// `qpq send`: sends `text` to `group`, after printing what it read on the way.
pub(super) async fn send(cli: &Cli, out: &Output, group: &str, text: &str) -> Result<()> {
    let (mut state, conn, session) = bound(cli).await?;
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
    Ok(())
}

/// `qpq recv`: prints what arrived (joining pending groups); with `follow` (the stop signal),
/// stays live until a signal arrives, which ends it like a normal exit.
pub(super) async fn recv(cli: &Cli, out: &Output, follow: Option<&Stop>) -> Result<()> {
    let ctx = Ctx::new(cli).await?;
    let mut state = ClientState::load(&cli.state)?;
    let mut names = Names::default();
    let caught_up = async {
        let conn = ctx.connect().await?;
        let session = conn.bind(state.identity()).await?;
        let mut events = Vec::new();
        Chat::new(&mut state, &cli.state, &session)
            .receive_all(&mut |e| events.push(e))
            .await?;
        for e in events.drain(..) {
            out.event(&mut names, Some(&session), e).await?;
        }
        anyhow::Ok((conn, session))
    };
    let Some(stop) = follow else {
        let (conn, _) = caught_up.await?;
        conn.close().await;
        return Ok(());
    };
    let (conn, session) = tokio::select! {
        r = caught_up => r?,
        _ = stop.requested() => return Ok(()),
    };
    let follower = Follower::new(&mut state, &cli.state, ctx.addrs, ctx.options)
        .with_connection(conn, session);
    follow_live(follower, out, &mut names, stop).await
}

/// `qpq groups`: every group we are in, with its epoch and members.
pub(super) async fn groups(cli: &Cli, out: &Output) -> Result<()> {
    let (state, conn, session) = bound(cli).await?;
    let mut names = Names::default();
    for g in session.delivery.groups().await? {
        let label = state
            .groups
            .get(&g.group_id)
            .map_or_else(|| short_group_id(&g.group_id), |m| m.name.clone());
        let members = names.describe(Some(&session), &g.members).await;
        out.line(
            &format!(
                "{label} ({}) epoch {} members: {}",
                short_group_id(&g.group_id),
                g.epoch,
                members.join(", ")
            ),
            json!({"event": "group", "group": label, "id": hex::encode(&g.group_id),
                   "epoch": g.epoch, "members": members, "last_seq": g.last_seq}),
        );
    }
    conn.close().await;
    Ok(())
}
