//! The server's public view follows the members' groups, and refuses what they would.

use super::*;
use crate::group::public::{PublicView, StagedView, Verified, ViewError};

fn staged(
    view: &PublicView,
    who: IdentityKey,
    commit: &[u8],
) -> Result<Box<StagedView>, ViewError> {
    match view.stage(&who, commit)? {
        Verified::Commit(s) => Ok(s),
        Verified::Proposal(_) => Err(ViewError::NotHandshake),
    }
}

#[test]
fn the_view_follows_verified_commits_and_reloads() -> R {
    let suite = Suite::Hybrid;
    let (a, b) = (Device::new()?, Device::new()?);
    let group = Group::create(&a.provider, &a.mls, suite, GID)?;
    let mut alice = Member { dev: a, group };
    let info = alice
        .group
        .group_info(&alice.dev.provider, &alice.dev.mls)?;
    let (mut view, state) = PublicView::create(&info, GID, &alice.id())?;
    assert_eq!(view.epoch(), 0);
    assert_eq!(view.members(), vec![alice.id()]);

    // A stranger may not create the view of Alice's group.
    assert_eq!(
        PublicView::create(&info, GID, &b.id()).err(),
        Some(ViewError::NotCaller)
    );

    let out = alice.group.add_members(
        &alice.dev.provider,
        &alice.dev.mls,
        &[b.key_package(suite)?],
    )?;
    // Bob cannot pass Alice's commit off as his.
    assert_eq!(
        staged(&view, b.id(), &out.commit).err(),
        Some(ViewError::NotCaller)
    );
    let s = staged(&view, alice.id(), &out.commit)?;
    assert_eq!(s.added, vec![b.id()]);
    assert!(s.removed.is_empty());
    assert!(view.check_welcome(&s, None).is_err());
    view.check_welcome(&s, out.welcome.as_deref())?;
    // Not a snapshot: the store keeps the commit instead of the state.
    assert!(view.merge(*s, &out.group_info)?.state.is_none());
    assert_eq!(view.since_snapshot(), 1);
    alice.process(&out.commit)?;
    assert_eq!(view.epoch(), 1);
    assert_eq!(sorted(view.members()), sorted(alice.group.members()));

    // The snapshot and the commit after it reload to the same view.
    assert_eq!(PublicView::load(&state, &[])?.epoch(), 0);
    let mut reloaded = PublicView::load(&state, &[])?;
    reloaded.replay(&out.commit)?;
    assert_eq!(reloaded.since_snapshot(), 1);
    assert_eq!(reloaded.epoch(), 1);
    assert_eq!(sorted(reloaded.members()), sorted(alice.group.members()));

    // A replay of the old commit is for a past epoch.
    assert!(matches!(
        staged(&reloaded, alice.id(), &out.commit).err(),
        Some(ViewError::WrongEpoch { current: 1, got: 0 })
    ));

    // The next commit verifies against the reloaded view, but not with the previous GroupInfo.
    let bob = Member {
        group: Group::join(&b.provider, out.welcome.as_deref().ok_or("no welcome")?)?,
        dev: b,
    };
    let mut bob = bob;
    let up = bob.self_update()?;
    let mut view = reloaded;
    let s = staged(&view, bob.id(), &up.commit)?;
    assert!(s.added.is_empty() && s.removed.is_empty());
    assert!(matches!(
        view.merge(*s, &out.group_info),
        Err(ViewError::GroupInfo(_))
    ));
    let at_epoch_1 = || -> R<PublicView> {
        let mut view = PublicView::load(&state, &[])?;
        view.replay(&out.commit)?;
        Ok(view)
    };
    // A GroupInfo altered anywhere (its context, its signature) is refused.
    for at in [up.group_info.len() - 1, up.group_info.len() / 2, 10] {
        let mut altered = up.group_info.clone();
        altered[at] ^= 1;
        let mut view = at_epoch_1()?;
        let s = staged(&view, bob.id(), &up.commit)?;
        assert!(matches!(
            view.merge(*s, &altered),
            Err(ViewError::GroupInfo(_))
        ));
    }
    // The uploaded GroupInfo carries no tree; one that does (signed by the committer for the
    // right epoch) is refused: the server has the tree.
    assert!(up.group_info.len() < 2_000, "{} bytes", up.group_info.len());
    bob.process(&up.commit)?;
    let with_tree = bob.group.group_info(&bob.dev.provider, &bob.dev.mls)?;
    let mut view = at_epoch_1()?;
    let s = staged(&view, bob.id(), &up.commit)?;
    match view.merge(*s, &with_tree) {
        Err(ViewError::GroupInfo(why)) => assert!(why.contains("ratchet tree"), "{why}"),
        other => panic!("expected the tree refused, got {other:?}"),
    }
    let mut view = at_epoch_1()?;
    let s = staged(&view, bob.id(), &up.commit)?;
    view.merge(*s, &up.group_info)?;
    assert_eq!(view.epoch(), 2);
    Ok(())
}

/// Every `SNAPSHOT_EVERY`th commit's merge encodes the whole state; the others encode nothing,
/// and a view restored from any snapshot and the commits after it is the live one: the next
/// commit's GroupInfo (which names the group context, tree hash included) checks against it.
#[test]
fn snapshots_every_nth_commit_and_replay_restores_the_rest() -> R {
    use crate::group::public::SNAPSHOT_EVERY;
    let suite = Suite::Classical;
    let a = Device::new()?;
    let group = Group::create(&a.provider, &a.mls, suite, GID)?;
    let mut alice = Member { dev: a, group };
    let info = alice
        .group
        .group_info(&alice.dev.provider, &alice.dev.mls)?;
    let (mut view, created) = PublicView::create(&info, GID, &alice.id())?;
    let n = SNAPSHOT_EVERY as usize;
    let (mut commits, mut snapshot) = (Vec::new(), None);
    for i in 1..=n + 2 {
        let up = alice.self_update()?;
        let s = staged(&view, alice.id(), &up.commit)?;
        let merged = view.merge(*s, &up.group_info)?;
        assert_eq!(merged.state.is_some(), i == n, "commit {i}");
        if let Some(state) = merged.state {
            snapshot = Some((i, state));
        }
        alice.process(&up.commit)?;
        commits.push(up.commit);
    }
    assert_eq!(view.since_snapshot(), 2);
    let (at, snapshot) = snapshot.ok_or("no snapshot")?;
    let mut from_creation = PublicView::load(&created, &[])?;
    for c in &commits {
        from_creation.replay(c)?;
    }
    let mut from_snapshot = PublicView::load(&snapshot, &[])?;
    for c in &commits[at..] {
        from_snapshot.replay(c)?;
    }
    let up = alice.self_update()?;
    for mut restored in [from_creation, from_snapshot] {
        assert_eq!(restored.epoch(), view.epoch());
        let s = staged(&restored, alice.id(), &up.commit)?;
        restored.merge(*s, &up.group_info)?;
    }
    // A commit that does not follow the snapshot does not replay.
    let mut wrong = PublicView::load(&snapshot, &[])?;
    assert!(matches!(
        wrong.replay(&commits[0]),
        Err(ViewError::Corrupt(_))
    ));
    Ok(())
}

/// A member's leaf keeps its KeyPackage's lifetime until it updates it; the renewal is due at
/// half of it and no longer after an update.
#[test]
fn a_leaf_lifetime_is_renewed_by_an_update() -> R {
    let suite = Suite::Classical;
    let (a, b) = (Device::new()?, Device::new()?);
    let group = Group::create(&a.provider, &a.mls, suite, GID)?;
    let mut alice = Member { dev: a, group };
    // The joined leaf carries its KeyPackage's lifetime.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let (nb, na) = (now - 10, now + 590);
    let kp = b
        .mls
        .key_package_with_lifetime(&b.provider, suite.ciphersuite(), nb, na)?;
    let out = alice
        .group
        .add_members(&alice.dev.provider, &alice.dev.mls, &[kp])?;
    alice.process(&out.commit)?;
    let mut bob = Member {
        group: Group::join(&b.provider, out.welcome.as_deref().ok_or("no welcome")?)?,
        dev: b,
    };
    assert_eq!(bob.group.own_leaf_lifetime(), Some((nb, na)));
    assert!(!bob.group.leaf_renewal_due(now));
    assert!(bob.group.leaf_renewal_due(nb + 300));
    let up = bob.self_update()?;
    bob.process(&up.commit)?;
    assert_eq!(bob.group.own_leaf_lifetime(), None);
    assert!(!bob.group.leaf_renewal_due(na + 1));
    Ok(())
}

/// Commits our client library would never build, made with openmls directly as an attacker
/// could: the view refuses an Add of a KeyPackage of another suite and a Remove of an empty
/// leaf (or openmls refuses to build them at all).
#[test]
fn the_view_refuses_adds_of_another_suite_and_removes_of_empty_leaves() -> R {
    use openmls::prelude::{KeyPackageIn, LeafNodeIndex, ProtocolVersion};
    let suite = Suite::Classical;
    let (a, b) = (Device::new()?, Device::new()?);
    let group = Group::create(&a.provider, &a.mls, suite, GID)?;
    let mut alice = Member { dev: a, group };
    let info = alice
        .group
        .group_info(&alice.dev.provider, &alice.dev.mls)?;
    let (view, _) = PublicView::create(&info, GID, &alice.id())?;

    let foreign = b
        .mls
        .key_package_in(&b.provider, Suite::Hybrid.ciphersuite())?;
    let kp = KeyPackageIn::tls_deserialize_exact(foreign.as_slice())?
        .validate(alice.dev.provider.crypto(), ProtocolVersion::Mls10)?;
    // openmls refuses to build an Add of another suite (its own check, which the view's
    // process_message runs on received commits too).
    let built = alice
        .group
        .mls
        .add_members(&alice.dev.provider, alice.dev.mls.signer(), &[kp]);
    assert!(built.is_err());

    // Nor does it build a Remove of an empty leaf; signed by hand (as an attacker holding
    // Alice's key could), the view refuses it.
    let built = alice.group.mls.remove_members(
        &alice.dev.provider,
        alice.dev.mls.signer(),
        &[LeafNodeIndex::new(5)],
    );
    assert!(built.is_err());
    let MlsMessageBodyIn::GroupInfo(vgi) =
        MlsMessageIn::tls_deserialize_exact(info.as_slice())?.extract()
    else {
        return Err("not a GroupInfo".into());
    };
    let context = vgi.group_context().tls_serialize_detached()?;
    let commit = signed_remove_commit(&alice.dev.mls, GID, 0, 5, &context)?;
    match view.stage(&alice.id(), &commit) {
        Err(ViewError::Invalid(why)) => assert!(why.contains("non-existing"), "{why}"),
        other => panic!("expected a refused Remove, got {other:?}"),
    }
    Ok(())
}

/// `bytes` as an RFC 9420 `opaque<V>` (the framing the client's GroupInfo re-signing uses).
fn put_vec(out: &mut Vec<u8>, bytes: &[u8]) {
    assert_eq!(lifetime::put_vector(out, bytes), Some(()));
}

/// A PublicMessage commit of group `gid` at `epoch` from leaf 0, holding one Remove of leaf
/// `removed` and no path, signed with `me`'s key over the group `context` (RFC 9420 §6.1);
/// its confirmation and membership tags are arbitrary (the server cannot check them).
fn signed_remove_commit(
    me: &MlsIdentity,
    gid: &[u8],
    epoch: u64,
    removed: u32,
    context: &[u8],
) -> R<Vec<u8>> {
    use openmls_traits::signatures::Signer as _;
    let mut content = Vec::new();
    put_vec(&mut content, gid);
    content.extend_from_slice(&epoch.to_be_bytes());
    content.extend_from_slice(&[1, 0, 0, 0, 0]); // sender: member, leaf 0
    put_vec(&mut content, &[]); // authenticated_data
    content.push(3); // content_type: commit
    let mut proposals = vec![1]; // ProposalOrRef: proposal
    proposals.extend_from_slice(&3u16.to_be_bytes()); // remove
    proposals.extend_from_slice(&removed.to_be_bytes());
    put_vec(&mut content, &proposals);
    content.push(0); // no path
    let mut tbs = vec![0, 1, 0, 1]; // mls10, public message
    tbs.extend_from_slice(&content);
    tbs.extend_from_slice(context);
    let mut sign_content = Vec::new();
    put_vec(&mut sign_content, b"MLS 1.0 FramedContentTBS");
    put_vec(&mut sign_content, &tbs);
    let signature = me
        .signer()
        .sign(&sign_content)
        .map_err(|e| format!("{e:?}"))?;
    let mut m = vec![0, 1, 0, 1];
    m.extend_from_slice(&content);
    put_vec(&mut m, &signature);
    put_vec(&mut m, &[5; 32]); // confirmation tag
    put_vec(&mut m, &[6; 32]); // membership tag
    Ok(m)
}
