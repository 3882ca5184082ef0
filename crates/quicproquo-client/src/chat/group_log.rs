//! How the messenger reads a group's log and commits to it: [`GroupLog`] is its
//! [`LogReader`] (entries processed on one loaded group state, events handed out, the state
//! saved and the cursor acknowledged per batch) and [`Committer`] its [`CommitHost`] for the
//! commit driver.

use quicproquo_core::group::{CommitOutput, Event, Group};
use quicproquo_core::mls::MlsProvider;

use super::{Chat, ChatError, ChatEvent, random_id};
use crate::commit::{CommitHost, LogReader};
use crate::delivery::{Envelope, EnvelopeKind};
use crate::state::ClientState;
use quicproquo_core::report::CommitReport;

/// What became of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Processed {
    /// Processed, or skipped with its event handed out.
    Done,
    /// A commit this member refuses with what only members can check: report it (ADR 0015).
    ToReport,
}

/// Processes one entry of someone else's on our group state and reports what it held.
pub(super) fn process(
    g: &mut Group,
    provider: &MlsProvider,
    name: &str,
    entry: &Envelope,
    on_event: &mut dyn FnMut(ChatEvent),
) -> Processed {
    let (group, seq) = (name.to_owned(), entry.seq);
    if entry.kind == EnvelopeKind::Revert {
        // The server's marker: the group is back at the epoch before the reported commit.
        if let Ok(report) = CommitReport::decode(&entry.payload) {
            on_event(ChatEvent::Reverted {
                group,
                seq,
                commit_seq: report.seq,
                epoch: entry.epoch,
                in_step: g.epoch() == entry.epoch,
            });
        } else {
            on_event(ChatEvent::Unreadable { group, seq });
        }
        return Processed::Done;
    }
    match g.process(provider, &entry.payload) {
        Ok(Event::Application { sender, plaintext }) => on_event(ChatEvent::Message {
            group,
            seq,
            sender,
            body: plaintext,
        }),
        Ok(Event::Commit {
            epoch,
            added,
            removed,
            we_were_removed,
            ..
        }) => on_event(if we_were_removed {
            ChatEvent::Removed { group, seq }
        } else {
            ChatEvent::Epoch {
                group,
                seq,
                epoch,
                added,
                removed,
            }
        }),
        Ok(_) => {}
        // Our own commit echoed after we merged it, or an entry from before we joined.
        Err(e) if e.is_stale() => {}
        Err(e) if e.is_invalid_commit() && entry.kind == EnvelopeKind::Commit => {
            return Processed::ToReport;
        }
        // A message we cannot process must not block the log: reported, skipped.
        Err(_) => on_event(ChatEvent::Unreadable { group, seq }),
    }
    Processed::Done
}

/// A group's log as the messenger reads it: entries processed on one loaded group state, what
/// they hold handed to `on_event`, the state saved and the cursor acknowledged per batch.
pub(super) struct GroupLog<'c, 'a> {
    chat: &'c mut Chat<'a>,
    id: &'c [u8],
    group: Option<Group>,
    on_event: &'c mut dyn FnMut(ChatEvent),
}

impl<'c, 'a> GroupLog<'c, 'a> {
    pub(super) fn new(
        chat: &'c mut Chat<'a>,
        id: &'c [u8],
        on_event: &'c mut dyn FnMut(ChatEvent),
    ) -> Self {
        Self {
            chat,
            id,
            group: None,
            on_event,
        }
    }

    fn group(&mut self) -> Result<(&mut Group, &MlsProvider), ChatError> {
        if self.group.is_none() {
            self.group = Some(self.chat.load(self.id)?);
        }
        let group = self
            .group
            .as_mut()
            .ok_or_else(|| ChatError::UnknownGroup(hex::encode(self.id)))?;
        Ok((group, &self.chat.state.mls))
    }
}

impl LogReader for GroupLog<'_, '_> {
    type Error = ChatError;

    fn cursor(&self) -> u64 {
        self.chat.cursor(self.id)
    }

    async fn apply(&mut self, entries: &[Envelope]) -> Result<bool, ChatError> {
        self.chat
            .apply_reporting(self.id, entries, &mut self.group, self.on_event)
            .await?;
        let cursor = self.cursor();
        self.chat
            .session
            .delivery
            .acknowledge(self.id, cursor)
            .await?;
        Ok(true)
    }
}

/// The messenger's side of a commit: its group log, and the commit `build` stages.
pub(super) struct Committer<'c, 'a, B> {
    pub(super) log: GroupLog<'c, 'a>,
    pub(super) build: B,
}

impl<B> LogReader for Committer<'_, '_, B> {
    type Error = ChatError;

    fn cursor(&self) -> u64 {
        self.log.cursor()
    }

    async fn apply(&mut self, entries: &[Envelope]) -> Result<bool, ChatError> {
        self.log.apply(entries).await
    }
}

impl<B> CommitHost for Committer<'_, '_, B>
where
    B: FnMut(&mut Group, &ClientState) -> Result<CommitOutput, ChatError>,
{
    fn group(&mut self) -> Result<(&mut Group, &MlsProvider), ChatError> {
        self.log.group()
    }

    fn is_own(&self, entry: &Envelope) -> bool {
        self.log
            .chat
            .state
            .groups
            .get(self.log.id)
            .is_some_and(|m| m.own_pending.contains(&entry.message_id))
    }

    fn build(&mut self) -> Result<CommitOutput, ChatError> {
        self.log.group()?;
        let group = self
            .log
            .group
            .as_mut()
            .ok_or_else(|| ChatError::UnknownGroup(hex::encode(self.log.id)))?;
        (self.build)(group, self.log.chat.state)
    }

    fn own_message_id(&mut self) -> Result<Vec<u8>, ChatError> {
        let message_id = random_id()?;
        self.log.chat.remember_own(self.log.id, &message_id);
        self.log.chat.save()?;
        Ok(message_id)
    }

    fn merged(&mut self) -> Result<(), ChatError> {
        self.log.chat.save()
    }

    fn discarded(&mut self, message_id: &[u8]) -> Result<(), ChatError> {
        self.log.chat.forget_own(self.log.id, message_id);
        self.log.chat.save()
    }
}
