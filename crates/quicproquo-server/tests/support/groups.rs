//! A group of two members and what tests of the Delivery Service's commit checks ask of it.

use anyhow::{Result, bail, ensure};
use quicproquo_client::ClientError;
use quicproquo_client::delivery::SendOutcome;
use quicproquo_core::IdentityKey;
use quicproquo_core::mls::Suite;
use quicproquo_proto::errors::ErrorCode;

use super::{TestServer, User};

/// The error code and text of a refused send; fails if it was not refused.
pub fn refused(r: Result<SendOutcome, ClientError>) -> Result<(ErrorCode, String)> {
    match r {
        Err(e) => match e.code() {
            Some(code) => Ok((code, e.to_string())),
            None => bail!("refused without a code: {e}"),
        },
        Ok(outcome) => bail!("not refused: {outcome:?}"),
    }
}

/// The group's (epoch, sorted members) as the server sees it, asked by `user`.
pub async fn server_view(user: &User, id: &[u8]) -> Result<(u64, Vec<IdentityKey>)> {
    let groups = user.session.delivery.groups().await?;
    let g = groups
        .into_iter()
        .find(|g| g.group_id == id)
        .ok_or_else(|| anyhow::anyhow!("not a member"))?;
    let mut members = g.members;
    members.sort();
    Ok((g.epoch, members))
}

/// Alice creates `g` and adds Bob; Eve is registered but never added.
pub async fn group_of_two(
    server: &TestServer,
    dir: &std::path::Path,
) -> Result<(User, User, User, Vec<u8>)> {
    let mut alice = User::register(server, dir, "alice", Suite::Classical).await?;
    let mut bob = User::register(server, dir, "bob", Suite::Classical).await?;
    let eve = User::register(server, dir, "eve", Suite::Classical).await?;
    let id = alice.chat().create_group("g").await?;
    alice
        .chat()
        .invite("g", &["bob".into()], &mut |_| {})
        .await?;
    bob.recv().await?;
    Ok((alice, bob, eve, id))
}

/// Alice and Bob still exchange a message both ways.
pub async fn still_talking(alice: &mut User, bob: &mut User, id: &[u8]) -> Result<()> {
    let g = hex::encode(&id[..4]);
    alice.chat().send(&g, b"still here", &mut |_| {}).await?;
    let got = User::messages(&bob.recv().await?);
    ensure!(
        got.iter().any(|(_, t)| t == "still here"),
        "bob got {got:?}"
    );
    bob.chat().send(&g, b"me too", &mut |_| {}).await?;
    let got = User::messages(&alice.recv().await?);
    ensure!(got.iter().any(|(_, t)| t == "me too"), "alice got {got:?}");
    Ok(())
}
