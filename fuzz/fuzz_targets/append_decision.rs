//! The append decision both stores call: a batch of requests (from a small alphabet of groups,
//! senders, kinds, epochs and message ids) decided against a stored state made from the same
//! bytes. The decision must never panic, answer every request, and assign each group
//! gap-free sequence numbers after its stored head.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use quicproquo_core::{IdentityKey, IdentityKeypair};
use quicproquo_server::model::decide::{GroupHead, Membership, Reads, State, decide};
use quicproquo_server::model::group::{
    AppendOutcome, AppendRequest, CommitChange, EntryKind, GroupId,
};

fn people() -> &'static [IdentityKey; 4] {
    static PEOPLE: OnceLock<[IdentityKey; 4]> = OnceLock::new();
    PEOPLE.get_or_init(|| {
        let key = || match IdentityKeypair::generate() {
            Ok(k) => k.public(),
            Err(_) => std::process::abort(),
        };
        [key(), key(), key(), key()]
    })
}

/// Reads one byte at a time, 0 once the input is spent.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> u8 {
        let Some((b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        *b
    }
}

fn group(i: u8) -> GroupId {
    match GroupId::new(&[b'g', i % 3]) {
        Ok(g) => g,
        Err(_) => std::process::abort(),
    }
}

fn request(b: &mut Bytes<'_>) -> AppendRequest {
    let people = people();
    let kind = match b.next() % 3 {
        0 => EntryKind::Application,
        1 => EntryKind::Commit,
        _ => EntryKind::Proposal,
    };
    let flags = b.next();
    let commit = (flags & 1 == 1).then(|| CommitChange {
        added: (0..4usize)
            .filter(|i| flags >> (1 + i) & 1 == 1)
            .map(|i| people[i])
            .collect(),
        removed: (0..3usize)
            .filter(|i| flags >> (5 + i) & 1 == 1)
            .map(|i| people[i])
            .collect(),
        welcome: (flags & 2 == 2).then(|| vec![1, 2, 3]),
        group_info: None,
    });
    AppendRequest {
        group_id: group(b.next()),
        sender: people[usize::from(b.next() % 4)],
        message_id: vec![b.next() % 8],
        kind,
        epoch: u64::from(b.next() % 4),
        payload: vec![0; 4],
        commit,
        view: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let n = usize::from(b.next() % 16) + 1;
    let batch: Vec<AppendRequest> = (0..n).map(|_| request(&mut b)).collect();
    let reads = Reads::of(&batch, true);
    let mut state = State::new(&reads);
    let mut heads = HashMap::new();
    for g in 0..3u8 {
        let flags = b.next();
        if flags & 1 == 0 {
            continue; // no such group
        }
        let head = GroupHead {
            epoch: u64::from(flags >> 1 & 3),
            last_seq: u64::from(b.next()),
            last_commit_seq: 0,
        };
        let id = group(g);
        state.set_group(id.as_bytes(), head);
        heads.insert(id.as_bytes().to_vec(), head.last_seq);
        for p in people() {
            let m = b.next();
            if m & 1 == 1 {
                let membership = Membership {
                    joined: 0,
                    left: (m & 2 == 2).then_some(u64::from(m >> 2)),
                };
                if state
                    .set_member(id.as_bytes(), p.as_bytes(), membership)
                    .is_err()
                {
                    return;
                }
            }
        }
        if b.next() & 1 == 1 {
            state.set_message_id(id.as_bytes(), &[b.next() % 8], 1);
        }
    }
    let Ok(decision) = decide(&batch, state) else {
        return;
    };
    assert_eq!(decision.outcomes.len(), batch.len());
    for (req, outcome) in batch.iter().zip(&decision.outcomes) {
        if let AppendOutcome::Appended { seq, .. } = outcome {
            let last = heads
                .get_mut(req.group_id.as_bytes())
                .unwrap_or_else(|| panic!("appended to an unknown group"));
            assert_eq!(*seq, *last + 1, "sequence numbers are gap-free");
            *last = *seq;
        }
    }
});
