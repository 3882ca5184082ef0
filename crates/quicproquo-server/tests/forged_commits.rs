//! Commits the client library never sends, made at the wire level as an attacker would, against
//! the real server on both stores (ADR 0012): a send that still declares whom it adds or removes,
//! and validly signed commits openmls refuses to build (an Add of a KeyPackage of another
//! ciphersuite, a Remove of an empty leaf). Each is refused with `bad_commit`, the group's epoch
//! and membership stay as they were, and the members keep talking.

mod support;

use support::both_stores;

use anyhow::{Result, bail, ensure};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{MlsMessageBodyIn, MlsMessageIn};
use openmls_traits::signatures::Signer as _;
use quicproquo_client::chat::random_id;
use quicproquo_client::delivery::CommitParts;
use quicproquo_core::NodeRole;
use quicproquo_core::mls::Suite;
use quicproquo_proto::errors::{ErrorCode, code_of};
use quicproquo_server::store::AnyStore;
use support::forge::put_vec;
use support::groups::{group_of_two, refused, server_view, still_talking};
use support::{RawClient, TestServer, User, local};

fn server(store: Option<AnyStore>) -> Result<TestServer> {
    TestServer::start_with(NodeRole::Standalone, store, |_| {})
}

/// A send of Alice's valid self-update commit that also declares `added` and `removed` in the
/// obsolete `CommitInfo` fields (the client library no longer writes them): refused as a
/// membership declaration, and nothing moves.
async fn declared_membership_is_refused(store: Option<AnyStore>) -> Result<()> {
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let (mut alice, mut bob, eve, id) = group_of_two(&server, dir.path()).await?;
    let before = server_view(&alice, &id).await?;
    let mut ga = alice.group(&id)?;
    let out = ga.self_update(&alice.state.mls, alice.state.mls_identity())?;
    let raw = RawClient::connect_from([127, 0, 0, 1], &server).await?;
    let delivery = raw.bind_delivery(alice.state.identity()).await?;
    let eve_key = eve.state.identity().public();
    let bob_key = bob.state.identity().public();
    for (added, removed) in [
        (vec![eve_key.as_bytes().to_vec()], vec![]),
        (vec![], vec![bob_key.as_bytes().to_vec()]),
    ] {
        let mut req = delivery.send_request();
        {
            let mut p = req.get();
            p.set_group_id(&id);
            p.set_message_id(&random_id()?);
            p.set_message(&out.commit);
            let mut c = p.init_commit();
            c.set_group_info(&out.group_info);
            let mut list = c.reborrow().init_obsolete_added(added.len() as u32);
            for (i, key) in added.iter().enumerate() {
                list.set(i as u32, key);
            }
            let mut list = c.init_obsolete_removed(removed.len() as u32);
            for (i, key) in removed.iter().enumerate() {
                list.set(i as u32, key);
            }
        }
        match req.send().promise.await {
            Ok(_) => bail!("a commit declaring its membership change was appended"),
            Err(e) => ensure!(
                code_of(&e) == Some(ErrorCode::BadCommit) && e.to_string().contains("membership"),
                "{e}"
            ),
        }
        ensure!(
            server_view(&alice, &id).await? == before,
            "membership moved"
        );
    }
    let fetched = eve.session.delivery.fetch(&id, 0, 10).await;
    ensure!(
        fetched.as_ref().err().and_then(|e| e.code()) == Some(ErrorCode::NotMember),
        "eve reads the group: {fetched:?}"
    );
    ga.discard_pending_commit(&alice.state.mls)?;
    still_talking(&mut alice, &mut bob, &id).await?;
    Ok(())
}

/// openmls refuses to build an Add of a KeyPackage of another ciphersuite or a Remove of an
/// empty leaf (the core crate's tests show it), so Alice signs them by hand with her own leaf
/// key, over the group's current context, as an attacker holding her key could. The server's
/// view checks the signature and then refuses each proposal.
async fn invalid_proposals_are_refused(store: Option<AnyStore>) -> Result<()> {
    let server = server(store)?;
    let dir = tempfile::tempdir()?;
    let (mut alice, mut bob, eve, id) = group_of_two(&server, dir.path()).await?;
    let before = server_view(&alice, &id).await?;
    let ga = alice.group(&id)?;
    let info = ga.group_info(&alice.state.mls, alice.state.mls_identity())?;
    let MlsMessageBodyIn::GroupInfo(gi) = MlsMessageIn::tls_deserialize_exact(&info)?.extract()
    else {
        bail!("not a GroupInfo");
    };
    let context = gi.group_context().tls_serialize_detached()?;
    let epoch = ga.epoch();

    // An Add (proposal type 1) of Eve's KeyPackage in the hybrid suite; the group is classical.
    let foreign = quicproquo_core::mls::MlsIdentity::new(eve.state.identity())
        .key_package_in(&eve.state.mls, Suite::Hybrid.ciphersuite())?;
    let mut add = vec![1]; // ProposalOrRef: proposal
    add.extend_from_slice(&1u16.to_be_bytes());
    add.extend_from_slice(&foreign);
    // A Remove (proposal type 3) of leaf 5: the group has leaves 0 and 1.
    let mut remove = vec![1];
    remove.extend_from_slice(&3u16.to_be_bytes());
    remove.extend_from_slice(&5u32.to_be_bytes());

    for (what, proposals, rule) in [
        ("add of another suite", add, "ciphersuite"),
        ("remove of an empty leaf", remove, "non-existing member"),
    ] {
        let commit = signed_commit(&alice, &id, epoch, &proposals, &context)?;
        let parts = CommitParts {
            welcome: None,
            group_info: info.clone(),
        };
        let sent = alice
            .session
            .delivery
            .send(&id, &random_id()?, &commit, Some(&parts))
            .await;
        let (code, text) = refused(sent)?;
        ensure!(code == ErrorCode::BadCommit, "{what}: {code:?} {text}");
        // Refused by openmls's proposal check, which runs after the signature verified.
        ensure!(text.contains(rule), "{what}: {text}");
        ensure!(server_view(&alice, &id).await? == before, "{what}: moved");
    }
    let fetched = eve.session.delivery.fetch(&id, 0, 10).await;
    ensure!(
        fetched.as_ref().err().and_then(|e| e.code()) == Some(ErrorCode::NotMember),
        "eve reads the group: {fetched:?}"
    );
    still_talking(&mut alice, &mut bob, &id).await?;
    Ok(())
}

/// A PublicMessage commit of group `gid` at `epoch` from leaf 0 (the creator, Alice) holding
/// `proposals` (encoded ProposalOrRefs) and no path, signed with `user`'s leaf key over the
/// group `context` (RFC 9420 §6.1). Its confirmation and membership tags are arbitrary: the
/// server has no key to check them.
fn signed_commit(
    user: &User,
    gid: &[u8],
    epoch: u64,
    proposals: &[u8],
    context: &[u8],
) -> Result<Vec<u8>> {
    let mut content = Vec::new();
    put_vec(&mut content, gid);
    content.extend_from_slice(&epoch.to_be_bytes());
    content.extend_from_slice(&[1, 0, 0, 0, 0]); // sender: member, leaf 0
    put_vec(&mut content, &[]); // authenticated_data
    content.push(3); // content_type: commit
    put_vec(&mut content, proposals);
    content.push(0); // no path
    let mut tbs = vec![0, 1, 0, 1]; // mls10, public message
    tbs.extend_from_slice(&content);
    tbs.extend_from_slice(context);
    let mut sign_content = Vec::new();
    put_vec(&mut sign_content, b"MLS 1.0 FramedContentTBS");
    put_vec(&mut sign_content, &tbs);
    let signature = user
        .state
        .mls_identity()
        .signer()
        .sign(&sign_content)
        .map_err(|e| anyhow::anyhow!("signing: {e:?}"))?;
    let mut m = vec![0, 1, 0, 1];
    m.extend_from_slice(&content);
    put_vec(&mut m, &signature);
    put_vec(&mut m, &[5; 32]); // confirmation tag
    put_vec(&mut m, &[6; 32]); // membership tag
    Ok(m)
}

both_stores!(
    declared_membership_is_refused,
    invalid_proposals_are_refused
);
