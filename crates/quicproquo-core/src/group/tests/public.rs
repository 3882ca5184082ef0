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
