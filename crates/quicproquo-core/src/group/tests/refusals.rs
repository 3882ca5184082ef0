//! Refusals and edge cases: bad input, stale and foreign messages, policy checks.

use openmls::prelude::{BasicCredential, CredentialWithKey, KeyPackage};

use super::super::*;
use super::{Device, GID, Member, R, trio};
use crate::mls::MlsError;

#[test]
fn join_fails_cleanly() -> R {
    let (a, b, dave) = (Device::new()?, Device::new()?, Device::new()?);
    let mut alice = Member {
        group: Group::create(&a.provider, &a.mls, Suite::Classical, GID)?,
        dev: a,
    };
    let kp = b.key_package(Suite::Classical)?;
    let out = alice
        .group
        .add_members(&alice.dev.provider, &alice.dev.mls, &[kp])?;
    alice.group.merge_pending_commit(&alice.dev.provider)?;
    let welcome = out.welcome.ok_or("no welcome")?;

    // Dave has KeyPackages, but not the one this Welcome is for.
    dave.key_package(Suite::Classical)?;
    let dp = &dave.provider;
    assert!(matches!(
        Group::join(dp, &welcome),
        Err(GroupError::NotForUs)
    ));
    assert!(matches!(
        Group::join(dp, b"garbage"),
        Err(GroupError::Malformed)
    ));
    let cut = &welcome[..welcome.len() - 1];
    assert!(matches!(Group::join(dp, cut), Err(GroupError::Malformed)));
    assert!(matches!(
        Group::join(dp, &out.commit),
        Err(GroupError::UnexpectedKind(MessageKind::Commit))
    ));

    // Bob joins; the KeyPackage is then used up.
    let bob = Group::join(&b.provider, &welcome)?;
    assert_eq!(bob.epoch(), 1);
    assert!(matches!(
        Group::join(&b.provider, &welcome),
        Err(GroupError::NotForUs)
    ));
    // Creating a group that exists.
    assert!(matches!(
        Group::create(&b.provider, &b.mls, Suite::Classical, GID),
        Err(GroupError::GroupExists)
    ));
    Ok(())
}

#[test]
fn inspect_and_process_refuse_bad_input() -> R {
    let (mut alice, mut bob, _carol, out) = trio(Suite::Classical)?;
    let app = alice.send(b"hello")?;
    let welcome = out.welcome.clone().ok_or("no welcome")?;

    for junk in [&b""[..], b"\x00", b"garbage that is not mls", &[0, 1, 0, 1]] {
        assert!(matches!(inspect(junk), Err(GroupError::Malformed)));
        assert!(matches!(bob.process(junk), Err(GroupError::Malformed)));
    }
    for message in [&app, &out.commit, &welcome] {
        for cut in [1, message.len() / 2, message.len() - 1] {
            assert!(matches!(
                inspect(&message[..cut]),
                Err(GroupError::Malformed)
            ));
        }
        let mut longer = message.clone();
        longer.push(0);
        assert!(matches!(inspect(&longer), Err(GroupError::Malformed)));
    }
    assert!(matches!(
        bob.process(&welcome),
        Err(GroupError::UnexpectedKind(MessageKind::Welcome))
    ));

    // A flipped bit in the ciphertext: refused, and Bob's state is unchanged.
    let mut tampered = app.clone();
    if let Some(last) = tampered.last_mut() {
        *last ^= 1;
    }
    assert!(bob.process(&tampered).is_err());
    assert!(matches!(bob.process(&app)?, Event::Application { .. }));

    // Another group's message.
    let other = Device::new()?;
    let mut other = Member {
        group: Group::create(&other.provider, &other.mls, Suite::Classical, b"other")?,
        dev: other,
    };
    let foreign = other.send(b"elsewhere")?;
    assert_eq!(inspect(&foreign)?.group_id, Some(b"other".to_vec()));
    assert!(matches!(bob.process(&foreign), Err(GroupError::WrongGroup)));
    Ok(())
}

#[test]
fn messages_of_recent_past_epochs_still_decrypt() -> R {
    let (mut alice, mut bob, mut carol, _) = trio(Suite::Classical)?;
    let commit_all = |alice: &mut Member, bob: &mut Member, carol: &mut Member| -> R {
        let out = alice.self_update()?;
        for m in [alice, bob, carol] {
            m.process(&out.commit)?;
        }
        Ok(())
    };
    // Sent in epoch 1, logged after the commit to epoch 2.
    let late = bob.send(b"sent in epoch 1")?;
    commit_all(&mut alice, &mut bob, &mut carol)?;
    let expected = Event::Application {
        sender: bob.id(),
        plaintext: b"sent in epoch 1".to_vec(),
    };
    assert_eq!(alice.process(&late)?, expected);
    assert_eq!(carol.process(&late)?, expected);
    assert_eq!(bob.process(&late)?, Event::Own { epoch: 1 });

    // From epoch 2, MAX_PAST_EPOCHS + 1 commits later: too old. From epoch 3: still fine.
    let too_old = bob.send(b"epoch 2")?;
    commit_all(&mut alice, &mut bob, &mut carol)?;
    let just_in_time = bob.send(b"epoch 3")?;
    for _ in 0..MAX_PAST_EPOCHS {
        commit_all(&mut alice, &mut bob, &mut carol)?;
    }
    assert_eq!(alice.group.epoch(), 5);
    assert!(matches!(
        alice.process(&just_in_time)?,
        Event::Application { .. }
    ));
    let err = alice.process(&too_old);
    assert!(
        matches!(&err, Err(e @ GroupError::WrongEpoch { expected: 5, got: 2 }) if e.is_stale()),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn commits_refuse_bad_requests() -> R {
    let (mut alice, bob, _carol, _) = trio(Suite::Classical)?;
    let dave = Device::new()?;
    let (ap, me) = (&alice.dev.provider, &alice.dev.mls);
    let g = &mut alice.group;

    let kp = dave.key_package(Suite::Classical)?;
    let hybrid_kp = dave.key_package(Suite::Hybrid)?;
    let r = g.add_members(ap, me, &[b"junk".to_vec()]);
    assert!(matches!(
        r,
        Err(GroupError::InvalidKeyPackage {
            index: 0,
            source: MlsError::Malformed
        })
    ));
    let r = g.add_members(ap, me, &[kp.clone(), hybrid_kp]);
    assert!(matches!(
        r,
        Err(GroupError::InvalidKeyPackage {
            index: 1,
            source: MlsError::WrongSuite(_)
        })
    ));
    let bob_kp = bob.dev.key_package(Suite::Classical)?;
    let r = g.add_members(ap, me, &[bob_kp]);
    assert!(matches!(r, Err(GroupError::DuplicateMember(id)) if id == bob.id()));
    let kp2 = dave.key_package(Suite::Classical)?;
    let r = g.add_members(ap, me, &[kp.clone(), kp2]);
    assert!(matches!(r, Err(GroupError::DuplicateMember(id)) if id == dave.id()));
    assert!(matches!(
        g.add_members(ap, me, &[]),
        Err(GroupError::EmptyInput)
    ));
    let r = g.remove_members(ap, me, &[dave.id()]);
    assert!(matches!(r, Err(GroupError::UnknownMember(id)) if id == dave.id()));
    let r = g.remove_members(ap, me, &[me.identity()]);
    assert!(matches!(r, Err(GroupError::CannotRemoveSelf)));
    assert!(matches!(
        g.self_update(ap, &bob.dev.mls),
        Err(GroupError::WrongIdentity)
    ));
    assert!(matches!(
        g.encrypt(ap, &bob.dev.mls, b"x"),
        Err(GroupError::WrongIdentity)
    ));
    assert!(matches!(
        g.merge_pending_commit(ap),
        Err(GroupError::NoPendingCommit)
    ));
    assert!(
        !g.has_pending_commit() && g.epoch() == 1,
        "failures stage nothing"
    );

    g.self_update(ap, me)?;
    assert!(matches!(
        g.self_update(ap, me),
        Err(GroupError::PendingCommit)
    ));
    assert!(matches!(
        g.add_members(ap, me, std::slice::from_ref(&kp)),
        Err(GroupError::PendingCommit)
    ));
    g.discard_pending_commit(ap)?;
    let out = g.add_members(ap, me, &[kp])?;
    assert_eq!(out.added, vec![dave.id()]);
    Ok(())
}

#[test]
fn proposals_are_stored_and_committed() -> R {
    let (mut alice, mut bob, mut carol, _) = trio(Suite::Classical)?;
    // Bob's client proposes removing Carol (our API has no proposals; openmls does).
    let carol_leaf = bob
        .group
        .mls
        .members()
        .find(|m| identity_of(&m.credential).ok() == Some(carol.id()))
        .ok_or("carol not found")?
        .index;
    let (proposal, _) =
        bob.group
            .mls
            .propose_remove_member(&bob.dev.provider, bob.dev.mls.signer(), carol_leaf)?;
    let proposal = serialize(&proposal)?;
    assert_eq!(inspect(&proposal)?.kind, MessageKind::Proposal);

    assert_eq!(
        alice.process(&proposal)?,
        Event::Proposal { sender: bob.id() }
    );
    assert!(matches!(carol.process(&proposal)?, Event::Proposal { .. }));
    assert!(
        matches!(alice.send(b"x"), Err(e) if matches!(e.downcast_ref(), Some(GroupError::PendingProposals)))
    );

    // Alice's next commit covers it.
    let out = alice.self_update()?;
    assert_eq!(out.removed, vec![carol.id()]);
    assert!(
        matches!(alice.process(&out.commit)?, Event::Commit { ref removed, .. } if *removed == vec![carol.id()])
    );
    assert!(matches!(
        bob.process(&out.commit)?,
        Event::Commit { epoch: 2, .. }
    ));
    assert!(matches!(
        carol.process(&out.commit)?,
        Event::Commit {
            we_were_removed: true,
            ..
        }
    ));
    let m = alice.send(b"two of us")?;
    assert!(matches!(bob.process(&m)?, Event::Application { .. }));
    Ok(())
}

#[test]
fn commit_with_a_borrowed_identity_is_refused() -> R {
    let (mut alice, mut bob, carol, _) = trio(Suite::Classical)?;
    // Eve signs a KeyPackage whose credential names Carol's identity key, and Bob's client adds
    // it with plain openmls (our add_members would refuse it).
    let eve = Device::new()?;
    let forged = CredentialWithKey {
        credential: BasicCredential::new(carol.id().as_bytes().to_vec()).into(),
        signature_key: eve.id().as_bytes().to_vec().into(),
    };
    let kp = KeyPackage::builder()
        .leaf_node_capabilities(leaf_capabilities())
        .build(
            Suite::Classical.ciphersuite(),
            &eve.provider,
            eve.mls.signer(),
            forged,
        )?
        .key_package()
        .clone();
    let kp_bytes = kp.tls_serialize_detached()?;
    let r = alice
        .group
        .add_members(&alice.dev.provider, &alice.dev.mls, &[kp_bytes]);
    assert!(matches!(
        r,
        Err(GroupError::InvalidKeyPackage {
            source: MlsError::BadCredential,
            ..
        })
    ));

    let (commit, _, _) =
        bob.group
            .mls
            .add_members(&bob.dev.provider, bob.dev.mls.signer(), &[kp])?;
    let commit = serialize(&commit)?;
    let auth = alice.group.epoch_authenticator();
    assert!(matches!(
        alice.process(&commit),
        Err(GroupError::BadCredential)
    ));
    assert_eq!(alice.group.epoch(), 1);
    assert_eq!(alice.group.epoch_authenticator(), auth);
    Ok(())
}

#[test]
fn removed_member_can_be_added_again() -> R {
    let (mut alice, mut bob, mut carol, _) = trio(Suite::Classical)?;
    let out = alice
        .group
        .remove_members(&alice.dev.provider, &alice.dev.mls, &[carol.id()])?;
    for m in [&mut alice, &mut bob, &mut carol] {
        m.process(&out.commit)?;
    }
    assert!(!carol.group.is_active());

    // Re-added with her last-resort KeyPackage, whose keys outlive a Welcome.
    let kp = carol
        .dev
        .mls
        .last_resort_key_package(&carol.dev.provider, Suite::Classical)?;
    let out = alice
        .group
        .add_members(&alice.dev.provider, &alice.dev.mls, &[kp])?;
    for m in [&mut alice, &mut bob] {
        m.process(&out.commit)?;
    }
    let welcome = out.welcome.ok_or("no welcome")?;
    carol.group = Group::join(&carol.dev.provider, &welcome)?;
    assert!(carol.group.is_active());
    assert_eq!(carol.group.epoch(), 3);
    assert_eq!(
        carol.group.epoch_authenticator(),
        alice.group.epoch_authenticator()
    );
    let m = carol.send(b"I'm back")?;
    assert!(matches!(bob.process(&m)?, Event::Application { sender, .. } if sender == carol.id()));
    // Now active: the same Welcome (its KeyPackage still usable) does not replace the group.
    assert!(matches!(
        Group::join(&carol.dev.provider, &welcome),
        Err(GroupError::GroupExists)
    ));
    assert_eq!(carol.group.epoch(), 3);
    Ok(())
}

#[test]
fn debug_output_hides_plaintext() -> R {
    let (alice, ..) = trio(Suite::Classical)?;
    let event = Event::Application {
        sender: alice.id(),
        plaintext: b"top secret words".to_vec(),
    };
    let shown = format!("{event:?} {:?}", alice.group);
    assert!(!shown.contains("top secret") && !shown.contains("116, 111, 112"));
    assert!(shown.contains("plaintext_len: 16"));
    Ok(())
}
