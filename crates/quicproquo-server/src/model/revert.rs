//! Reverting a reported commit (ADR 0015): the values a revert speaks of and the decision
//! both stores make, with no I/O.
//!
//! A member that cannot process a commit (a bad confirmation or membership tag, or path
//! secrets: what the server's public view cannot check) reports it with a signed report. The
//! store reverts the group to the epoch before the commit only if, under the group's lock:
//! - the reporter was a member before the commit (it joined before it and had not left), and
//!   the commit does not remove it: a member cannot undo its own removal, so honest members
//!   can always remove one that reports their valid commits as bad;
//! - the commit is the group's latest (nothing committed on top of it) and the view before
//!   it is kept;
//! - the reporter is not its committer;
//! - no member from before the commit other than its committer has acknowledged a cursor at
//!   or past it: an acknowledgement says that member processed the commit, so reverting it
//!   would put that member out of step.
//!
//! A revert appends a marker entry ([`EntryKind::Revert`](super::group::EntryKind::Revert))
//! at the epoch before the commit, moves the group back to that epoch and its previous commit,
//! undoes the commit's membership change (members it added lose access, members it removed
//! regain it), withdraws its Welcome from the inboxes and restores the view before it.

use quicproquo_core::IdentityKey;

use super::decide::GroupHead;
use super::group::GroupId;

/// Length of a revert marker's message id: longer than any member's (at most
/// [`MAX_MESSAGE_ID`](super::group::MAX_MESSAGE_ID) bytes), so no member can take it first.
pub const MARKER_ID_LEN: usize = 72;
const _: () = assert!(MARKER_ID_LEN > super::group::MAX_MESSAGE_ID);

/// The message id of the marker that reverts the commit at `commit_seq`: 64 zero bytes, then
/// the seq (big-endian). A reverted commit has one marker.
pub fn marker_id(commit_seq: u64) -> Vec<u8> {
    let mut id = vec![0u8; MARKER_ID_LEN - 8];
    id.extend_from_slice(&commit_seq.to_be_bytes());
    id
}

/// A member's request to revert the commit at `seq`, its report checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevertRequest {
    /// The group.
    pub group_id: GroupId,
    /// The reporter (the caller's bound identity, who signed the report).
    pub reporter: IdentityKey,
    /// The reported commit's seq.
    pub seq: u64,
    /// The encoded signed report: the marker's payload.
    pub report: Vec<u8>,
}

/// Why a report did not revert its commit. Nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RevertRefusal {
    /// No such group.
    UnknownGroup,
    /// The reporter was not a member when the commit was appended.
    NotMember,
    /// The seq is not the group's latest commit (it is not a commit, or another commit
    /// followed it).
    NotLatest,
    /// The reporter made the commit.
    Committer,
    /// The view before the commit is not kept (a group from before reverts existed).
    NoEarlierView,
    /// A member other than the committer acknowledged the commit: it processed it.
    Processed,
    /// The commit removes the reporter (the other members report it if it is bad).
    Removed,
}

impl RevertRefusal {
    /// The rule's stable name (logs, metrics, error details).
    pub fn rule(self) -> &'static str {
        match self {
            Self::UnknownGroup => "unknown_group",
            Self::NotMember => "not_member",
            Self::NotLatest => "not_latest",
            Self::Committer => "committer",
            Self::NoEarlierView => "no_earlier_view",
            Self::Processed => "processed",
            Self::Removed => "removed",
        }
    }
}

impl std::fmt::Display for RevertRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::UnknownGroup => "no such group",
            Self::NotMember => "the reporter was not a member when the commit was appended",
            Self::NotLatest => "the seq is not the group's latest commit",
            Self::Committer => "the reporter made the commit",
            Self::NoEarlierView => "the group's view before the commit is not kept",
            Self::Processed => "a member other than the committer has processed the commit",
            Self::Removed => "the commit removes the reporter",
        })
    }
}

/// What a report did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevertOutcome {
    /// Reverted: the marker is at `seq`, the group at `epoch`.
    Reverted(Reverted),
    /// Reverted before (by an earlier report): its marker is at `seq`, the group at `epoch`.
    AlreadyReverted {
        /// The marker's seq.
        seq: u64,
        /// The group's epoch now.
        epoch: u64,
    },
    /// Refused; nothing changed.
    Refused(RevertRefusal),
}

/// A revert that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reverted {
    /// The marker's seq.
    pub seq: u64,
    /// The group's epoch after the revert.
    pub epoch: u64,
    /// Who made the reverted commit.
    pub committer: IdentityKey,
}

/// The view's record of the group's latest commit, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatestCommit {
    /// The commit's seq (0: the view is the creator's, no commit to revert).
    pub seq: u64,
    /// Who made it.
    pub committer: Option<IdentityKey>,
    /// The epoch before it and the seq of the commit before it, if the view before it is kept.
    pub before: Option<(u64, u64)>,
}

/// What a store read, under the group's lock, to judge a revert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevertReads {
    /// The group's head (`None`: no such group).
    pub head: Option<GroupHead>,
    /// The seq of the marker of the reported commit, if it was reverted before.
    pub marker: Option<u64>,
    /// The reporter's membership: (joined after seq, left at seq).
    pub reporter: Option<(u64, Option<u64>)>,
    /// The view's latest commit.
    pub latest: Option<LatestCommit>,
    /// Whether a member from before the commit other than its committer has acknowledged a
    /// cursor at or past it.
    pub acknowledged_by_other: bool,
}

/// A revert decided: what the store writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevertPlan {
    /// The marker's seq.
    pub marker_seq: u64,
    /// The group's head after the revert.
    pub head: GroupHead,
    /// The reverted commit's committer.
    pub committer: IdentityKey,
}

/// Decides a revert of the commit at `req.seq` against what the store read.
pub fn judge(req: &RevertRequest, reads: &RevertReads) -> Result<RevertPlan, RevertOutcome> {
    let refused = |r| Err(RevertOutcome::Refused(r));
    let Some(head) = reads.head else {
        return refused(RevertRefusal::UnknownGroup);
    };
    if let Some(seq) = reads.marker {
        return Err(RevertOutcome::AlreadyReverted {
            seq,
            epoch: head.epoch,
        });
    }
    let member_before = reads
        .reporter
        .is_some_and(|(joined, left)| joined < req.seq && left.is_none_or(|l| l >= req.seq));
    if !member_before {
        return refused(RevertRefusal::NotMember);
    }
    if reads
        .reporter
        .is_some_and(|(_, left)| left == Some(req.seq))
    {
        return refused(RevertRefusal::Removed);
    }
    if req.seq == 0 || head.last_commit_seq != req.seq {
        return refused(RevertRefusal::NotLatest);
    }
    let Some(latest) = reads.latest.filter(|l| l.seq == req.seq) else {
        return refused(RevertRefusal::NoEarlierView);
    };
    let Some(committer) = latest.committer else {
        return refused(RevertRefusal::NoEarlierView);
    };
    if committer == req.reporter {
        return refused(RevertRefusal::Committer);
    }
    let Some((epoch, previous_commit)) = latest.before else {
        return refused(RevertRefusal::NoEarlierView);
    };
    if reads.acknowledged_by_other {
        return refused(RevertRefusal::Processed);
    }
    let marker_seq = head
        .last_seq
        .checked_add(1)
        .ok_or(RevertOutcome::Refused(RevertRefusal::NotLatest))?;
    Ok(RevertPlan {
        marker_seq,
        head: GroupHead {
            epoch,
            last_seq: marker_seq,
            last_commit_seq: previous_commit,
        },
        committer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> IdentityKey {
        quicproquo_core::IdentityKeypair::from_seed(&zeroize::Zeroizing::new([n; 32])).public()
    }

    fn setup() -> (RevertRequest, RevertReads) {
        let req = RevertRequest {
            group_id: GroupId::new(b"g").unwrap_or_else(|e| panic!("{e}")),
            reporter: key(1),
            seq: 5,
            report: vec![1],
        };
        let reads = RevertReads {
            head: Some(GroupHead {
                epoch: 3,
                last_seq: 7,
                last_commit_seq: 5,
            }),
            marker: None,
            reporter: Some((0, None)),
            latest: Some(LatestCommit {
                seq: 5,
                committer: Some(key(2)),
                before: Some((2, 3)),
            }),
            acknowledged_by_other: false,
        };
        (req, reads)
    }

    #[test]
    fn a_report_of_the_latest_commit_by_an_earlier_member_reverts_it() {
        let (req, reads) = setup();
        assert_eq!(
            judge(&req, &reads),
            Ok(RevertPlan {
                marker_seq: 8,
                head: GroupHead {
                    epoch: 2,
                    last_seq: 8,
                    last_commit_seq: 3
                },
                committer: key(2),
            })
        );
        // A member removed later (by a commit after a revert) reported it while a member.
        let left_later = RevertReads {
            reporter: Some((0, Some(9))),
            ..reads
        };
        assert!(judge(&req, &left_later).is_ok());
    }

    #[test]
    fn each_rule_refuses() {
        let (req, reads) = setup();
        let refused = |r: RevertReads| match judge(&req, &r) {
            Err(RevertOutcome::Refused(why)) => Some(why),
            _ => None,
        };
        use RevertRefusal as R;
        assert_eq!(
            refused(RevertReads {
                head: None,
                ..reads
            }),
            Some(R::UnknownGroup)
        );
        for reporter in [None, Some((5, None)), Some((6, None)), Some((0, Some(4)))] {
            assert_eq!(
                refused(RevertReads { reporter, ..reads }),
                Some(R::NotMember)
            );
        }
        // A member cannot undo its own removal.
        assert_eq!(
            refused(RevertReads {
                reporter: Some((0, Some(5))),
                ..reads
            }),
            Some(R::Removed)
        );
        let mut later = reads;
        later.head = later.head.map(|h| GroupHead {
            last_commit_seq: 7,
            ..h
        });
        assert_eq!(refused(later), Some(R::NotLatest));
        let own = RevertReads {
            latest: reads.latest.map(|l| LatestCommit {
                committer: Some(key(1)),
                ..l
            }),
            ..reads
        };
        assert_eq!(refused(own), Some(R::Committer));
        let unkept = RevertReads {
            latest: reads.latest.map(|l| LatestCommit { before: None, ..l }),
            ..reads
        };
        assert_eq!(refused(unkept), Some(R::NoEarlierView));
        assert_eq!(
            refused(RevertReads {
                acknowledged_by_other: true,
                ..reads
            }),
            Some(R::Processed)
        );
        assert_eq!(
            judge(
                &req,
                &RevertReads {
                    marker: Some(9),
                    ..reads
                }
            ),
            Err(RevertOutcome::AlreadyReverted { seq: 9, epoch: 3 })
        );
    }

    #[test]
    fn marker_ids_are_longer_than_any_member_message_id() {
        assert_eq!(marker_id(5).len(), MARKER_ID_LEN);
        assert_ne!(marker_id(5), marker_id(6));
    }
}
