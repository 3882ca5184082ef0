//! Group scenarios over a server-ordered log, for both suites where cheap.

use std::error::Error;

use super::*;
use crate::identity::IdentityKeypair;

mod public;
mod refusals;

type R<T = ()> = Result<T, Box<dyn Error>>;

const GID: &[u8] = b"test group";

struct Device {
    mls: MlsIdentity,
    provider: MlsProvider,
}

impl Device {
    fn new() -> R<Self> {
        let keys = IdentityKeypair::generate()?;
        Ok(Self {
            mls: MlsIdentity::new(&keys),
            provider: MlsProvider::default(),
        })
    }

    fn id(&self) -> IdentityKey {
        self.mls.identity()
    }

    fn key_package(&self, suite: Suite) -> R<Vec<u8>> {
        Ok(self.mls.key_packages(&self.provider, suite, 1)?.remove(0))
    }
}

struct Member {
    dev: Device,
    group: Group,
}

impl Member {
    fn id(&self) -> IdentityKey {
        self.dev.id()
    }

    fn send(&mut self, plaintext: &[u8]) -> R<Vec<u8>> {
        Ok(self
            .group
            .encrypt(&self.dev.provider, &self.dev.mls, plaintext)?)
    }

    fn process(&mut self, message: &[u8]) -> Result<Event, GroupError> {
        self.group.process(&self.dev.provider, message)
    }

    fn self_update(&mut self) -> Result<CommitOutput, GroupError> {
        self.group.self_update(&self.dev.provider, &self.dev.mls)
    }

    fn export(&self) -> R<Vec<u8>> {
        Ok(self
            .group
            .export_secret(&self.dev.provider, "quicproquo test", 32)?
            .to_vec())
    }
}

fn sorted(mut ids: Vec<IdentityKey>) -> Vec<IdentityKey> {
    ids.sort();
    ids
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Alice creates the group and adds Bob and Carol in one commit, which the log accepts (Alice
/// merges it from its echo); Bob and Carol join from the one Welcome.
fn trio(suite: Suite) -> R<(Member, Member, Member, CommitOutput)> {
    let (a, b, c) = (Device::new()?, Device::new()?, Device::new()?);
    let group = Group::create(&a.provider, &a.mls, suite, GID)?;
    let mut alice = Member { dev: a, group };
    assert_eq!(alice.group.epoch(), 0);
    assert_eq!(alice.group.members(), vec![alice.id()]);

    let kps = vec![b.key_package(suite)?, c.key_package(suite)?];
    let out = alice
        .group
        .add_members(&alice.dev.provider, &alice.dev.mls, &kps)?;
    assert_eq!(out.epoch, 0);
    assert_eq!(sorted(out.added.clone()), sorted(vec![b.id(), c.id()]));
    assert!(out.removed.is_empty());
    assert!(alice.group.has_pending_commit());
    assert_eq!(
        alice.group.epoch(),
        0,
        "a pending commit does not change the epoch"
    );

    let event = alice.process(&out.commit)?;
    let Event::Commit {
        epoch,
        committer,
        added,
        removed,
        we_were_removed,
    } = event
    else {
        return Err(format!("expected a commit, got {event:?}").into());
    };
    assert_eq!((epoch, committer), (1, alice.id()));
    assert_eq!(sorted(added), sorted(out.added.clone()));
    assert!(removed.is_empty() && !we_were_removed);
    assert!(!alice.group.has_pending_commit());

    let welcome = out.welcome.clone().ok_or("no welcome")?;
    let bob = Member {
        group: Group::join(&b.provider, &welcome)?,
        dev: b,
    };
    let carol = Member {
        group: Group::join(&c.provider, &welcome)?,
        dev: c,
    };
    Ok((alice, bob, carol, out))
}

fn three_members_agree_and_talk(suite: Suite) -> R {
    let (mut alice, mut bob, mut carol, out) = trio(suite)?;
    for m in [&bob, &carol] {
        assert_eq!(m.group.epoch(), 1);
        assert_eq!(m.group.group_id(), GID);
        assert_eq!(m.group.suite(), Some(suite));
        assert_eq!(
            m.group.epoch_authenticator(),
            alice.group.epoch_authenticator()
        );
        assert_eq!(sorted(m.group.members()), sorted(alice.group.members()));
        assert_eq!(m.export()?, alice.export()?);
    }
    assert_eq!(alice.group.members().len(), 3);

    let texts: [&[u8]; 3] = [b"hello from alice", b"hello from bob", b"hello from carol"];
    let senders = [alice.id(), bob.id(), carol.id()];
    let log = [
        alice.send(texts[0])?,
        bob.send(texts[1])?,
        carol.send(texts[2])?,
    ];
    for member in [&mut alice, &mut bob, &mut carol] {
        for (i, message) in log.iter().enumerate() {
            let event = member.process(message)?;
            if senders[i] == member.id() {
                assert_eq!(event, Event::Own { epoch: 1 });
            } else {
                let expected = Event::Application {
                    sender: senders[i],
                    plaintext: texts[i].to_vec(),
                };
                assert_eq!(event, expected);
            }
        }
    }

    // What the server sees.
    let info = inspect(&log[0])?;
    assert_eq!(
        info,
        MessageInfo {
            kind: MessageKind::Application,
            group_id: Some(GID.to_vec()),
            epoch: Some(1),
            encrypted: true,
        }
    );
    assert!(
        !contains(&log[0], texts[0]),
        "application data is encrypted"
    );
    let info = inspect(&out.commit)?;
    assert_eq!(
        info,
        MessageInfo {
            kind: MessageKind::Commit,
            group_id: Some(GID.to_vec()),
            epoch: Some(0),
            encrypted: false,
        }
    );
    let welcome = out.welcome.ok_or("no welcome")?;
    assert_eq!(
        inspect(&welcome)?,
        MessageInfo {
            kind: MessageKind::Welcome,
            group_id: None,
            epoch: None,
            encrypted: false,
        }
    );
    Ok(())
}

#[test]
fn three_members_agree_and_talk_in_both_suites() -> R {
    Suite::ALL
        .into_iter()
        .try_for_each(three_members_agree_and_talk)
}

fn removed_member_is_out(suite: Suite) -> R {
    let (mut alice, mut bob, mut carol, _) = trio(suite)?;
    let epoch1_secret = alice.export()?;

    let out = bob
        .group
        .remove_members(&bob.dev.provider, &bob.dev.mls, &[carol.id()])?;
    assert_eq!(out.epoch, 1);
    assert_eq!(out.removed, vec![carol.id()]);
    assert!(out.added.is_empty() && out.welcome.is_none());
    assert_eq!(inspect(&out.commit)?.kind, MessageKind::Commit);

    // The server accepted it: Bob merges at once, so its echo is stale for him.
    assert_eq!(bob.group.merge_pending_commit(&bob.dev.provider)?, 2);
    let echo = bob.process(&out.commit);
    assert!(
        matches!(&echo, Err(e @ GroupError::WrongEpoch { expected: 2, got: 1 }) if e.is_stale()),
        "{echo:?}"
    );

    let expected = Event::Commit {
        epoch: 2,
        committer: bob.id(),
        added: vec![],
        removed: vec![carol.id()],
        we_were_removed: false,
    };
    assert_eq!(alice.process(&out.commit)?, expected);
    let for_carol = carol.process(&out.commit)?;
    assert!(matches!(
        for_carol,
        Event::Commit {
            epoch: 2,
            we_were_removed: true,
            ..
        }
    ));
    assert!(!carol.group.is_active() && alice.group.is_active());

    assert_eq!(
        sorted(alice.group.members()),
        sorted(vec![alice.id(), bob.id()])
    );
    assert_eq!(
        alice.group.epoch_authenticator(),
        bob.group.epoch_authenticator()
    );
    let epoch2_secret = alice.export()?;
    assert_ne!(
        epoch1_secret, epoch2_secret,
        "exporter differs across epochs"
    );
    assert_eq!(bob.export()?, epoch2_secret);

    let secret = alice.send(b"carol must not read this")?;
    assert_eq!(
        bob.process(&secret)?,
        Event::Application {
            sender: alice.id(),
            plaintext: b"carol must not read this".to_vec(),
        }
    );
    assert!(matches!(carol.process(&secret), Err(GroupError::NotMember)));
    assert!(
        matches!(carol.send(b"x"), Err(e) if matches!(e.downcast_ref(), Some(GroupError::NotMember)))
    );
    assert!(
        matches!(carol.export(), Err(e) if matches!(e.downcast_ref(), Some(GroupError::NotMember)))
    );
    Ok(())
}

#[test]
fn removed_member_is_out_in_both_suites() -> R {
    Suite::ALL.into_iter().try_for_each(removed_member_is_out)
}

fn racing_commits(suite: Suite) -> R {
    let (mut alice, mut bob, mut carol, _) = trio(suite)?;
    let dave = Device::new()?;
    let dave_kp = dave.key_package(suite)?;

    // Alice and Bob both commit for epoch 1; the server takes Alice's and refuses Bob's.
    let winner = alice.self_update()?;
    let loser = bob.group.add_members(
        &bob.dev.provider,
        &bob.dev.mls,
        std::slice::from_ref(&dave_kp),
    )?;
    for out in [&winner, &loser] {
        assert_eq!(out.epoch, 1);
        assert_eq!(inspect(&out.commit)?.epoch, Some(1));
    }
    bob.group.discard_pending_commit(&bob.dev.provider)?;
    assert!(!bob.group.has_pending_commit());
    // Carol raced too but does not discard: processing the winner drops her commit.
    let carols = carol.self_update()?;

    let alice_id = alice.id();
    for m in [&mut alice, &mut bob, &mut carol] {
        let event = m.process(&winner.commit)?;
        assert!(
            matches!(event, Event::Commit { epoch: 2, committer, .. } if committer == alice_id),
            "{event:?}"
        );
        assert!(!m.group.has_pending_commit());
        assert_eq!(m.group.epoch(), 2);
    }
    for lost in [&loser.commit, &carols.commit] {
        assert!(matches!(alice.process(lost), Err(e) if e.is_stale()));
    }
    assert_eq!(
        bob.group.epoch_authenticator(),
        alice.group.epoch_authenticator()
    );
    assert_eq!(
        carol.group.epoch_authenticator(),
        alice.group.epoch_authenticator()
    );

    // Bob retries with the same KeyPackage (its Welcome was never delivered).
    let retry = bob
        .group
        .add_members(&bob.dev.provider, &bob.dev.mls, &[dave_kp])?;
    assert_eq!(retry.epoch, 2);
    for m in [&mut alice, &mut bob, &mut carol] {
        let event = m.process(&retry.commit)?;
        assert!(
            matches!(event, Event::Commit { epoch: 3, ref added, .. } if *added == vec![dave.id()])
        );
    }
    let welcome = retry.welcome.ok_or("no welcome")?;
    let mut dave = Member {
        group: Group::join(&dave.provider, &welcome)?,
        dev: dave,
    };
    assert_eq!(
        dave.group.epoch_authenticator(),
        alice.group.epoch_authenticator()
    );
    let hello = dave.send(b"hi all")?;
    for m in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(
            m.process(&hello)?,
            Event::Application {
                sender: dave.id(),
                plaintext: b"hi all".to_vec(),
            }
        );
    }
    Ok(())
}

#[test]
fn racing_commits_in_both_suites() -> R {
    Suite::ALL.into_iter().try_for_each(racing_commits)
}

#[test]
fn state_survives_export_and_import() -> R {
    let (mut alice, bob, _carol, _) = trio(Suite::Classical)?;
    let restart = |member: Member| -> R<Member> {
        let saved = member.dev.provider.export_storage()?;
        let provider = MlsProvider::import_storage(&saved)?;
        let group = Group::load(&provider, GID)?.ok_or("group not in storage")?;
        Ok(Member {
            dev: Device {
                mls: member.dev.mls,
                provider,
            },
            group,
        })
    };
    let auth = bob.group.epoch_authenticator();
    let mut bob = restart(bob)?;
    assert_eq!(bob.group.epoch(), 1);
    assert_eq!(bob.group.epoch_authenticator(), auth);
    assert_eq!(bob.group.members().len(), 3);
    assert!(Group::load(&bob.dev.provider, b"no such group")?.is_none());

    let m = alice.send(b"after the restart")?;
    assert!(matches!(bob.process(&m)?, Event::Application { .. }));
    let m = bob.send(b"back again")?;
    assert!(matches!(alice.process(&m)?, Event::Application { sender, .. } if sender == bob.id()));

    // A pending commit is persisted too, and merges from its echo after the restart.
    let out = bob.self_update()?;
    let mut bob = restart(bob)?;
    assert!(bob.group.has_pending_commit());
    let event = bob.process(&out.commit)?;
    assert!(matches!(event, Event::Commit { epoch: 2, committer, .. } if committer == bob.id()));
    alice.process(&out.commit)?;
    assert_eq!(
        alice.group.epoch_authenticator(),
        bob.group.epoch_authenticator()
    );
    let m = alice.send(b"epoch 2")?;
    assert!(matches!(bob.process(&m)?, Event::Application { .. }));
    Ok(())
}

/// A copy kept up to date from the store's journal of changes alone (what the client's state
/// file appends) equals the store after every step, and the group loads and runs from it; an
/// export of the store's previous (unversioned) format is refused.
#[test]
fn a_copy_fed_by_the_journal_equals_the_store() -> R {
    use std::collections::BTreeMap;
    let (mut alice, mut bob, _carol, _) = trio(Suite::Classical)?;
    let mut copy: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut sync = |bob: &Member| -> R<()> {
        for change in bob.dev.provider.take_changes()? {
            match change.value {
                Some(v) => copy.insert(change.key, v.to_vec()),
                None => copy.remove(&change.key),
            };
        }
        let now: BTreeMap<_, _> = bob
            .dev
            .provider
            .entries()?
            .into_iter()
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        assert!(copy == now, "the journal missed a change");
        Ok(())
    };
    sync(&bob)?;
    for i in 0..3u8 {
        let m = alice.send(&[i; 10])?;
        bob.process(&m)?;
        sync(&bob)?;
        assert!(bob.dev.provider.take_changes()?.is_empty());
    }
    let out = alice.self_update()?;
    alice.process(&out.commit)?;
    bob.process(&out.commit)?;
    let out = bob.self_update()?;
    sync(&bob)?;
    bob.process(&out.commit)?;
    alice.process(&out.commit)?;
    sync(&bob)?;
    let provider = MlsProvider::from_entries(copy.into_iter().map(|(k, v)| (k, Zeroizing::new(v))));
    let mut group = Group::load(&provider, GID)?.ok_or("group not in the copy")?;
    assert_eq!(group.epoch(), 3);
    let m = alice.send(b"to the copy")?;
    assert!(matches!(
        group.process(&provider, &m)?,
        Event::Application { .. }
    ));

    let mut old = bob.dev.provider.export_storage()?.to_vec();
    old[0] = 0;
    assert!(matches!(
        MlsProvider::import_storage(&old),
        Err(crate::mls::MlsError::CorruptState)
    ));
    Ok(())
}
