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
    let state1 = view.merge(*s, &out.group_info)?;
    alice.process(&out.commit)?;
    assert_eq!(view.epoch(), 1);
    assert_eq!(sorted(view.members()), sorted(alice.group.members()));

    // The stored states reload to the same view.
    assert_eq!(PublicView::load(&state, &[])?.epoch(), 0);
    let reloaded = PublicView::load(&state1, &view.proposals())?;
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
    // A GroupInfo altered anywhere (its signature, or the tree it carries) is refused.
    for at in [up.group_info.len() - 1, up.group_info.len() / 2] {
        let mut altered = up.group_info.clone();
        altered[at] ^= 1;
        let mut view = PublicView::load(&state1, &[])?;
        let s = staged(&view, bob.id(), &up.commit)?;
        assert!(matches!(
            view.merge(*s, &altered),
            Err(ViewError::GroupInfo(_))
        ));
    }
    let mut view = PublicView::load(&state1, &[])?;
    let s = staged(&view, bob.id(), &up.commit)?;
    view.merge(*s, &up.group_info)?;
    assert_eq!(view.epoch(), 2);
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

/// An RFC 9420 variable-length vector length.
fn put_vec(out: &mut Vec<u8>, bytes: &[u8]) {
    let n = bytes.len();
    if n < 64 {
        out.push(n as u8);
    } else if n < 16384 {
        out.extend_from_slice(&(0x4000 | n as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&(0x8000_0000 | n as u32).to_be_bytes());
    }
    out.extend_from_slice(bytes);
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
