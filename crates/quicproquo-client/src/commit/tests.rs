//! The commit driver against a server and a device played in memory.

use quicproquo_proto::errors::ErrorCode;

use super::machine::{
    Action, Answer, CommitDriver, CommitError, Committed, Event, PendingCommit, ReadReport, Start,
};
use crate::delivery::CommitParts;

/// One entry of the simulated log.
#[derive(Debug, Clone)]
struct Entry {
    seq: u64,
    epoch: u64,
    commit: bool,
    message_id: Vec<u8>,
    mine: bool,
}

/// A server's log and one device's group, with faults to inject.
#[derive(Debug, Default)]
struct Sim {
    log: Vec<Entry>,
    /// The epoch the server has the group at.
    server_epoch: u64,
    /// The device's epoch, pending commit (epoch, message id) and cursor.
    epoch: u64,
    pending: Option<(u64, Vec<u8>)>,
    cursor: u64,
    /// How many of our next appends another member's commit gets in just before.
    rivals_before_append: usize,
    /// Our next appends whose answers are lost (after the server decided).
    lost_answers: usize,
    /// Our next appends lost before reaching the server.
    lost_requests: usize,
    /// Our next appends that reach the server only after our next read (answer lost).
    in_flight: usize,
    delayed: Vec<PendingCommit>,
    answers: Vec<Answer>,
    /// Our next reads that fail.
    failed_reads: usize,
    /// Our next appends the server refuses with this code.
    refusals: Vec<ErrorCode>,
    builds: u64,
    appends: usize,
    merged_at: Vec<u64>,
    discards: usize,
}

impl Sim {
    fn with_history(messages: u64) -> Self {
        let mut sim = Self::default();
        for _ in 0..messages {
            sim.post(false, b"other".to_vec(), false);
        }
        sim
    }

    fn post(&mut self, commit: bool, message_id: Vec<u8>, mine: bool) -> u64 {
        let seq = self.log.len() as u64 + 1;
        self.log.push(Entry {
            seq,
            epoch: self.server_epoch,
            commit,
            message_id,
            mine,
        });
        if commit {
            self.server_epoch += 1;
        }
        seq
    }

    fn last_commit(&self) -> u64 {
        self.log
            .iter()
            .rev()
            .find(|e| e.commit)
            .map_or(0, |e| e.seq)
    }

    /// Processes the log as a device does: stops in front of our pending commit.
    fn read(&mut self, after: u64, up_to: Option<u64>) -> Event {
        if self.failed_reads > 0 {
            self.failed_reads -= 1;
            return Event::ReadFailed;
        }
        assert_eq!(
            after, self.cursor,
            "the driver reads from the device's cursor"
        );
        let last = up_to.unwrap_or(u64::MAX);
        let mut own_commit = None;
        for e in self.log.clone() {
            if e.seq <= self.cursor || e.seq > last {
                continue;
            }
            let pending_epoch = self.pending.as_ref().map(|(epoch, _)| *epoch);
            if e.mine && e.commit && pending_epoch == Some(self.epoch) && e.epoch == self.epoch {
                own_commit = Some(e.seq);
                break;
            }
            if e.commit && !e.mine {
                assert_eq!(e.epoch, self.epoch, "commits are processed in order");
                self.epoch += 1;
                // Processing another commit for our epoch drops our pending one.
                self.pending = None;
            }
            self.cursor = e.seq;
        }
        Event::Read(ReadReport {
            cursor: self.cursor,
            epoch: self.epoch,
            pending: self.pending.is_some(),
            own_commit,
        })
    }

    fn build(&mut self) -> Event {
        assert!(
            self.pending.is_none(),
            "a commit is built only when none is pending"
        );
        self.builds += 1;
        let message_id = format!("commit-{}", self.builds).into_bytes();
        self.pending = Some((self.epoch, message_id.clone()));
        Event::Built(PendingCommit {
            message_id,
            epoch: self.epoch,
            commit: format!("bytes-{}", self.builds).into_bytes(),
            parts: CommitParts::default(),
        })
    }

    /// One of our appends, with the faults asked for.
    fn append(&mut self, p: &PendingCommit) -> Answer {
        self.appends += 1;
        for late in std::mem::take(&mut self.delayed) {
            let _ = self.decide(&late);
        }
        if self.rivals_before_append > 0 {
            self.rivals_before_append -= 1;
            self.post(true, b"rival".to_vec(), false);
        }
        let answer = if self.lost_requests > 0 {
            self.lost_requests -= 1;
            Answer::Lost
        } else if self.in_flight > 0 {
            self.in_flight -= 1;
            self.delayed.push(p.clone());
            Answer::Lost
        } else {
            let decided = self.decide(p);
            if self.lost_answers > 0 {
                self.lost_answers -= 1;
                Answer::Lost
            } else {
                decided
            }
        };
        self.answers.push(answer);
        answer
    }

    /// The server's decision, in the real server's order: refusal, duplicate, epoch, append.
    fn decide(&mut self, p: &PendingCommit) -> Answer {
        if !self.refusals.is_empty() {
            Answer::Refused(self.refusals.remove(0))
        } else if let Some(e) = self.log.iter().find(|e| e.message_id == p.message_id) {
            Answer::Duplicate { seq: e.seq }
        } else if p.epoch != self.server_epoch {
            Answer::StaleEpoch {
                current_epoch: self.server_epoch,
                winner_seq: self.last_commit(),
            }
        } else {
            Answer::Appended {
                seq: self.post(true, p.message_id.clone(), true),
            }
        }
    }

    fn merge(&mut self, seq: u64) -> Event {
        let Some((epoch, _)) = self.pending.take() else {
            panic!("merge needs a pending commit");
        };
        assert_eq!(epoch, self.epoch);
        self.epoch += 1;
        self.merged_at.push(seq);
        Event::Merged { epoch: self.epoch }
    }

    fn discard(&mut self, p: &PendingCommit) -> Event {
        let Some((_, id)) = self.pending.take() else {
            panic!("discard needs a pending commit");
        };
        assert_eq!(id, p.message_id);
        self.discards += 1;
        Event::Discarded
    }

    /// Runs a driver to its end, as `drive` does against a real server.
    fn run(&mut self, attempts: usize, start: Start) -> Result<(Committed, bool), CommitError> {
        let mut driver = CommitDriver::new(attempts, self.cursor);
        let mut action = driver.start(start);
        loop {
            let event = match action {
                Action::Read { after, up_to } => self.read(after, up_to),
                Action::Build => self.build(),
                Action::Append(p) => Event::Answered(self.append(p)),
                Action::Merge { seq } => self.merge(seq),
                Action::Discard(p) => self.discard(p),
                Action::Done {
                    committed,
                    read_ahead_failed,
                } => return Ok((committed, read_ahead_failed)),
                Action::GiveUp(reason) => return Err(reason),
            };
            action = driver.handle(event);
        }
    }

    fn our_commits_in_log(&self) -> usize {
        self.log.iter().filter(|e| e.mine).count()
    }
}

#[test]
fn a_commit_reads_what_precedes_it_then_merges() -> Result<(), CommitError> {
    // Three entries arrive that the device has not read when it commits.
    let mut sim = Sim::with_history(3);
    let (committed, read_ahead_failed) = sim.run(8, Start::Build)?;
    assert_eq!(committed, Committed { epoch: 1, seq: 4 });
    assert!(!read_ahead_failed);
    assert_eq!(
        sim.cursor, 3,
        "the entries before the commit were read before the merge"
    );
    assert_eq!(sim.merged_at, [4]);
    assert_eq!((sim.epoch, sim.server_epoch), (1, 1));
    Ok(())
}

#[test]
fn catching_up_first_reads_to_the_end_before_building() {
    let mut sim = Sim::with_history(3);
    let mut d = CommitDriver::new(8, 0);
    assert_eq!(
        d.start(Start::CatchUp),
        Action::Read {
            after: 0,
            up_to: None
        }
    );
    let report = sim.read(0, None);
    assert_eq!(d.handle(report), Action::Build);
    assert_eq!(sim.cursor, 3);
}

#[test]
fn a_failed_read_ahead_still_merges_the_commit_the_log_holds() -> Result<(), CommitError> {
    let mut sim = Sim::with_history(2);
    sim.failed_reads = 1;
    let (committed, read_ahead_failed) = sim.run(8, Start::Build)?;
    assert!(read_ahead_failed, "the read's failure is reported");
    assert_eq!(committed, Committed { epoch: 1, seq: 3 });
    assert_eq!(sim.merged_at, [3]);
    Ok(())
}

#[test]
fn stale_epoch_then_success() -> Result<(), CommitError> {
    let mut sim = Sim::with_history(2);
    sim.rivals_before_append = 1;
    let (committed, _) = sim.run(8, Start::Build)?;
    assert_eq!(sim.builds, 2, "rebuilt after losing the epoch");
    assert_eq!(sim.discards, 1, "the loser was discarded");
    assert_eq!(committed, Committed { epoch: 2, seq: 4 });
    assert_eq!(sim.cursor, 3, "the winner was read before building again");
    assert_eq!((sim.epoch, sim.server_epoch), (2, 2));
    assert_eq!(sim.our_commits_in_log(), 1);
    Ok(())
}

#[test]
fn stale_epoch_steps_discard_then_read_past_the_winner() {
    let mut d = CommitDriver::new(8, 5);
    assert_eq!(d.start(Start::Build), Action::Build);
    let p = pending(2);
    assert_eq!(d.handle(Event::Built(p.clone())), Action::Append(&p));
    let stale = Answer::StaleEpoch {
        current_epoch: 3,
        winner_seq: 6,
    };
    assert_eq!(d.handle(Event::Answered(stale)), Action::Discard(&p));
    assert_eq!(
        d.handle(Event::Discarded),
        Action::Read {
            after: 5,
            up_to: None
        }
    );
    assert!(d.pending().is_none());
    let read = ReadReport {
        cursor: 7,
        epoch: 3,
        pending: false,
        own_commit: None,
    };
    assert_eq!(d.handle(Event::Read(read)), Action::Build);
}

#[test]
fn a_stale_epoch_behind_our_own_epoch_is_a_protocol_error() {
    let mut d = CommitDriver::new(8, 5);
    assert_eq!(d.start(Start::Build), Action::Build);
    let p = pending(4);
    assert_eq!(d.handle(Event::Built(p.clone())), Action::Append(&p));
    let stale = Answer::StaleEpoch {
        current_epoch: 4,
        winner_seq: 5,
    };
    assert_eq!(d.handle(Event::Answered(stale)), Action::Discard(&p));
    assert!(matches!(
        d.handle(Event::Discarded),
        Action::GiveUp(CommitError::Protocol(_))
    ));
}

#[test]
fn a_duplicate_is_our_earlier_append() -> Result<(), CommitError> {
    // The first append reaches the server only after the device looked for it in the log, so
    // it is sent again under the same id, and the server says it holds it already.
    let mut sim = Sim::with_history(1);
    sim.in_flight = 1;
    let (committed, _) = sim.run(8, Start::Build)?;
    assert_eq!(sim.answers, [Answer::Lost, Answer::Duplicate { seq: 2 }]);
    assert_eq!(committed, Committed { epoch: 1, seq: 2 });
    assert_eq!((sim.builds, sim.discards), (1, 0));
    assert_eq!(sim.our_commits_in_log(), 1);
    Ok(())
}

#[test]
fn a_lost_answer_keeps_the_commit_pending_and_the_log_resolves_it() -> Result<(), CommitError> {
    let mut sim = Sim::with_history(2);
    sim.lost_answers = 1;
    let (committed, _) = sim.run(8, Start::Build)?;
    assert_eq!(sim.discards, 0, "never discarded on a transport error");
    assert_eq!(sim.appends, 1, "the log showed it: no second append");
    assert_eq!(committed, Committed { epoch: 1, seq: 3 });
    assert_eq!(sim.merged_at, [3]);
    assert_eq!(sim.epoch, sim.server_epoch);
    Ok(())
}

#[test]
fn a_lost_request_is_appended_again_under_the_same_id() -> Result<(), CommitError> {
    let mut sim = Sim::with_history(2);
    sim.lost_requests = 1;
    let (committed, _) = sim.run(8, Start::Build)?;
    assert_eq!((sim.appends, sim.builds, sim.discards), (2, 1, 0));
    assert_eq!(committed, Committed { epoch: 1, seq: 3 });
    Ok(())
}

#[test]
fn a_lost_answer_whose_epoch_went_to_another_commit_is_rebuilt() -> Result<(), CommitError> {
    let mut sim = Sim::with_history(1);
    sim.rivals_before_append = 1;
    sim.lost_requests = 1;
    let (committed, _) = sim.run(8, Start::Build)?;
    assert_eq!(sim.discards, 0, "processing the winner dropped it");
    assert_eq!(sim.builds, 2);
    assert_eq!(committed, Committed { epoch: 2, seq: 3 });
    Ok(())
}

#[test]
fn a_transport_error_with_an_unreadable_log_gives_up_with_the_commit_pending() {
    let mut sim = Sim::with_history(1);
    sim.lost_answers = 1;
    sim.failed_reads = 1;
    assert_eq!(sim.run(8, Start::Build), Err(CommitError::Unresolved));
    assert!(sim.pending.is_some(), "kept pending");
    assert_eq!(sim.discards, 0);
}

#[test]
fn an_ambiguous_refusal_is_treated_as_a_lost_answer() -> Result<(), CommitError> {
    let mut sim = Sim::with_history(1);
    sim.refusals = vec![ErrorCode::Unavailable];
    let (committed, _) = sim.run(8, Start::Build)?;
    assert_eq!((sim.appends, sim.discards), (2, 0));
    assert_eq!(committed.seq, 2);
    Ok(())
}

#[test]
fn a_definite_refusal_discards() {
    let mut sim = Sim::with_history(1);
    sim.refusals = vec![ErrorCode::NotMember];
    assert_eq!(
        sim.run(8, Start::Build),
        Err(CommitError::Refused(ErrorCode::NotMember))
    );
    assert_eq!(sim.discards, 1);
    assert!(sim.pending.is_none());
}

#[test]
fn a_refusal_after_a_lost_answer_keeps_the_commit() {
    // The first append is lost, the log does not show it, the second is refused: the first may
    // still be on its way, so nothing is discarded.
    let mut sim = Sim::with_history(1);
    sim.lost_requests = 1;
    sim.refusals = vec![ErrorCode::TooLarge];
    assert_eq!(sim.run(8, Start::Build), Err(CommitError::Unresolved));
    assert_eq!(
        sim.answers,
        [Answer::Lost, Answer::Refused(ErrorCode::TooLarge)]
    );
    assert_eq!(sim.discards, 0);
    assert!(sim.pending.is_some());
}

#[test]
fn gives_up_after_the_attempt_limit() {
    let mut sim = Sim::with_history(1);
    sim.rivals_before_append = usize::MAX;
    assert_eq!(sim.run(3, Start::Build), Err(CommitError::Contended(3)));
    assert_eq!((sim.appends, sim.builds, sim.discards), (3, 3, 3));
    assert!(sim.pending.is_none());
}

#[test]
fn lost_answers_give_up_after_the_attempt_limit_with_the_commit_pending() {
    let mut sim = Sim::with_history(1);
    sim.lost_requests = usize::MAX;
    assert_eq!(sim.run(2, Start::Build), Err(CommitError::Unresolved));
    assert_eq!((sim.appends, sim.builds, sim.discards), (2, 1, 0));
    assert!(sim.pending.is_some());
}

#[test]
fn a_restarted_driver_merges_its_commit_from_the_log() -> Result<(), CommitError> {
    // The commit is appended, then the device stops before merging it: the answer is lost and
    // the log cannot be read (the connection is gone).
    let mut sim = Sim::with_history(2);
    sim.lost_answers = 1;
    sim.failed_reads = 1;
    assert_eq!(sim.run(8, Start::Build), Err(CommitError::Unresolved));
    assert!(sim.pending.is_some());
    sim.post(false, b"after".to_vec(), false);

    // Restarted: a new driver catches up, finds the commit in the log, merges it there, reads
    // on past it and commits anew in the next epoch.
    let (committed, _) = sim.run(8, Start::CatchUp)?;
    assert_eq!(sim.merged_at, [3, 5]);
    assert_eq!(committed, Committed { epoch: 2, seq: 5 });
    assert_eq!(sim.discards, 0);
    assert_eq!((sim.epoch, sim.server_epoch), (2, 2));
    Ok(())
}

#[test]
fn a_restart_steps_merge_the_leftover_then_catch_up_after_it() {
    let mut d = CommitDriver::new(8, 2);
    assert_eq!(
        d.start(Start::CatchUp),
        Action::Read {
            after: 2,
            up_to: None
        }
    );
    let found = ReadReport {
        cursor: 2,
        epoch: 0,
        pending: true,
        own_commit: Some(3),
    };
    assert_eq!(d.handle(Event::Read(found)), Action::Merge { seq: 3 });
    assert_eq!(
        d.handle(Event::Merged { epoch: 1 }),
        Action::Read {
            after: 2,
            up_to: None
        }
    );
}

#[test]
fn a_restart_never_discards_a_commit_the_log_does_not_show() {
    let mut sim = Sim::with_history(1);
    sim.lost_requests = 1;
    sim.failed_reads = 1;
    assert_eq!(sim.run(8, Start::Build), Err(CommitError::Unresolved));
    assert_eq!(sim.run(8, Start::CatchUp), Err(CommitError::Unresolved));
    assert_eq!(sim.discards, 0);
    assert!(sim.pending.is_some());
}

#[test]
fn an_event_out_of_order_is_refused() {
    let mut d = CommitDriver::new(8, 0);
    assert_eq!(d.start(Start::Build), Action::Build);
    assert!(matches!(
        d.handle(Event::Merged { epoch: 1 }),
        Action::GiveUp(CommitError::OutOfOrder { .. })
    ));
}

#[test]
fn answers_come_from_outcomes_and_errors() {
    use crate::ClientError;
    use crate::delivery::SendOutcome;
    assert_eq!(
        Answer::from_outcome(SendOutcome::Appended { seq: 4, epoch: 2 }),
        Answer::Appended { seq: 4 }
    );
    let refused = ClientError::Service {
        code: ErrorCode::NotMember,
        message: "no".into(),
    };
    assert_eq!(
        Answer::from_error(&refused),
        Answer::Refused(ErrorCode::NotMember)
    );
    assert_eq!(Answer::from_error(&ClientError::NoServers), Answer::Lost);
}

fn pending(epoch: u64) -> PendingCommit {
    PendingCommit {
        message_id: b"m".to_vec(),
        epoch,
        commit: b"c".to_vec(),
        parts: CommitParts::default(),
    }
}
