//! The messenger: MLS groups kept in the client state, driven through the Delivery Service.
//!
//! The server's log is the order everyone follows. Commits (invite, remove, update) go through
//! the one commit driver ([`crate::commit`]): pending until the server appends them, rebuilt
//! after losing their epoch (up to [`COMMIT_ATTEMPTS`] appends), discarded only on a definite
//! refusal. An application message the server refuses because the group moved on more epochs
//! than members keep secrets for is encrypted again after catching up.
//! Whatever arrives while catching up for a commit or a send is handed to the caller's
//! `on_event`, exactly as [`Chat::receive_group`] would hand it: it is read only once. Our own
//! messages come back through the log; we recognise them by message id and skip them.
//! Everything is saved to the state file after each step, so a crash loses at most the step
//! in progress (message ids make a retried send harmless; a commit appended but not yet
//! merged is merged when it comes back through the log).

mod group_log;
#[cfg(test)]
pub(crate) mod tests;

use std::path::Path;

use quicproquo_core::IdentityKey;
use quicproquo_core::group::{CommitOutput, Group};
use quicproquo_core::report::CommitReport;
use quicproquo_proto::errors::ErrorCode;

pub use crate::commit::COMMIT_ATTEMPTS;
use crate::commit::{self, CommitDriver, CommitError, DriveError, Start, is_pending_own_commit};
use crate::delivery::{Envelope, EnvelopeKind, SendOutcome};
use crate::state::{ClientState, GroupMeta};
use crate::{ClientError, Session, short_group_id};
use group_log::{Committer, GroupLog, Processed, process};

/// Welcomes read per inbox fetch.
const FETCH_BATCH: u32 = commit::FETCH_BATCH;

/// Errors of the messenger layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// A client/server error.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// An MLS error.
    #[error(transparent)]
    Group(#[from] quicproquo_core::group::GroupError),
    /// No group has this name or id.
    #[error("no group named {0}")]
    UnknownGroup(String),
    /// No KeyPackage could be had for a user.
    #[error("{0} has no KeyPackage available")]
    NoKeyPackage(String),
    /// Our commit kept losing the epoch race (or our message kept finding a newer epoch).
    #[error("gave up after {0} attempts: other members keep committing")]
    Contended(usize),
    /// The server answered in a way that breaks the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The commit driver gave up.
    #[error(transparent)]
    Commit(CommitError),
    /// Entries handed to [`Chat::apply_batch`] do not continue the group's cursor: the ones in
    /// between must be read from the log first. Nothing of the batch was applied.
    #[error("log entries missing: expected seq {expected}, got {got}")]
    Gap {
        /// The sequence number that should have come next.
        expected: u64,
        /// The one that came instead.
        got: u64,
    },
}

/// Where `entries` stop continuing `cursor` (entries at or below the running cursor are
/// repeats, not gaps): the sequence number expected there and the one found, or `None` when
/// every entry follows on.
pub fn first_gap(cursor: u64, entries: &[Envelope]) -> Option<(u64, u64)> {
    let mut at = cursor;
    for e in entries {
        if e.seq <= at {
            continue;
        }
        if e.seq != at + 1 {
            return Some((at + 1, e.seq));
        }
        at = e.seq;
    }
    None
}

impl From<DriveError<Self>> for ChatError {
    fn from(e: DriveError<Self>) -> Self {
        match e {
            DriveError::Host(e) => e,
            DriveError::Group(e) => Self::Group(e),
            DriveError::Send(e) | DriveError::Fetch(e) => Self::Client(e),
            DriveError::GaveUp(CommitError::Contended(n)) => Self::Contended(n),
            DriveError::GaveUp(CommitError::Protocol(m)) => Self::Protocol(m),
            DriveError::GaveUp(other) => Self::Commit(other),
        }
    }
}

/// Something that happened in a group, for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEvent {
    /// A message from a member.
    Message {
        /// The group's local name.
        group: String,
        /// Log position.
        seq: u64,
        /// The sender's identity.
        sender: IdentityKey,
        /// The decrypted text (bytes; UTF-8 for the CLI).
        body: Vec<u8>,
    },
    /// A commit moved the group to a new epoch.
    Epoch {
        /// The group's local name.
        group: String,
        /// Log position.
        seq: u64,
        /// The new epoch.
        epoch: u64,
        /// Members added.
        added: Vec<IdentityKey>,
        /// Members removed.
        removed: Vec<IdentityKey>,
    },
    /// A log entry we could not process (invalid, or from an epoch we no longer have).
    Unreadable {
        /// The group's local name.
        group: String,
        /// Log position.
        seq: u64,
    },
    /// A member reported a commit nobody could process and the server reverted it
    /// (ADR 0015): the group is back at `epoch`, the epoch before that commit.
    Reverted {
        /// The group's local name.
        group: String,
        /// Log position of the revert marker.
        seq: u64,
        /// Log position of the reverted commit.
        commit_seq: u64,
        /// The group's epoch after the revert.
        epoch: u64,
        /// Whether this device is at that epoch. `false`: it had merged the reverted commit
        /// (it made it, or it could process it and the report was false) and can no longer
        /// follow the group; it must be added again.
        in_step: bool,
    },
    /// We reported a commit we could not process and the server did not revert it (the
    /// reason names the rule): this device stays at the epoch before it and is out of step
    /// with a group that moved on.
    ReportRefused {
        /// The group's local name.
        group: String,
        /// Log position of the commit.
        seq: u64,
        /// The server's reason.
        reason: String,
    },
    /// We were removed from the group.
    Removed {
        /// The group's local name.
        group: String,
        /// Log position.
        seq: u64,
    },
    /// The server deleted entries of the group's log this device had not read yet (its
    /// retention: everyone else had read them, or they were older than the server keeps
    /// anything). The device can no longer follow the group and forgot it; a member can remove
    /// it and invite it again, after which `join` takes it back in.
    HistoryGone {
        /// The group's local name.
        group: String,
        /// The oldest entry the server still keeps.
        retained_from: String,
    },
    /// We joined a group from a Welcome.
    Joined {
        /// The group's local name.
        group: String,
        /// The group's epoch.
        epoch: u64,
        /// Its members.
        members: Vec<IdentityKey>,
    },
}

/// A random 16-byte id (group ids, message ids).
pub fn random_id() -> Result<Vec<u8>, ClientError> {
    let mut id = vec![0u8; 16];
    getrandom::fill(&mut id)
        .map_err(|e| ClientError::Key(quicproquo_core::KeyError::Rng(e.to_string())))?;
    Ok(id)
}

/// The messenger over one bound session and the device state.
pub struct Chat<'a> {
    state: &'a mut ClientState,
    path: &'a Path,
    session: &'a Session,
}

impl<'a> Chat<'a> {
    /// Wraps the state (saved to `path` after each step) and a bound session.
    pub fn new(state: &'a mut ClientState, path: &'a Path, session: &'a Session) -> Self {
        Self {
            state,
            path,
            session,
        }
    }

    fn save(&self) -> Result<(), ChatError> {
        self.state.save(self.path).map_err(ClientError::from)?;
        Ok(())
    }

    /// Finds a group by local name or by a prefix of its hex id.
    pub fn find(&self, name: &str) -> Result<Vec<u8>, ChatError> {
        let lower = name.to_ascii_lowercase();
        self.state
            .groups
            .iter()
            .find(|(id, meta)| meta.name == name || hex::encode(id).starts_with(&lower))
            .map(|(id, _)| id.clone())
            .ok_or_else(|| ChatError::UnknownGroup(name.to_owned()))
    }

    fn load(&self, id: &[u8]) -> Result<Group, ChatError> {
        Group::load(&self.state.mls, id)?.ok_or_else(|| ChatError::UnknownGroup(hex::encode(id)))
    }

    fn name_of(&self, id: &[u8]) -> String {
        self.state
            .groups
            .get(id)
            .map_or_else(|| short_group_id(id), |m| m.name.clone())
    }

    /// Creates a group named `name` with us as its only member.
    pub async fn create_group(&mut self, name: &str) -> Result<Vec<u8>, ChatError> {
        if self.state.groups.values().any(|m| m.name == name) {
            return Err(ChatError::Protocol(format!(
                "a group named {name} exists already"
            )));
        }
        let id = random_id()?;
        let group = Group::create(
            &self.state.mls,
            self.state.mls_identity(),
            self.state.suite,
            &id,
        )?;
        let group_info = group.group_info(&self.state.mls, self.state.mls_identity())?;
        self.state.groups.insert(
            id.clone(),
            GroupMeta {
                name: name.to_owned(),
                ..GroupMeta::default()
            },
        );
        self.save()?;
        self.session.delivery.create_group(&id, &group_info).await?;
        Ok(id)
    }

    /// Adds users (by name) to a group in one commit; returns the new epoch. What arrives while
    /// catching up first goes to `on_event`.
    pub async fn invite(
        &mut self,
        group: &str,
        names: &[String],
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<u64, ChatError> {
        let id = self.find(group)?;
        let targets = self.resolve(names).await?;
        let fetched = self.session.auth.fetch_key_packages(&targets).await?;
        for (n, t) in names.iter().zip(&targets) {
            if !fetched.iter().any(|k| &k.identity == t) {
                return Err(ChatError::NoKeyPackage(n.clone()));
            }
        }
        let packages: Vec<Vec<u8>> = fetched.into_iter().map(|k| k.data).collect();
        self.commit(&id, on_event, |g, state| {
            Ok(g.add_members(&state.mls, state.mls_identity(), &packages)?)
        })
        .await
    }

    /// The identities of `names`, in order.
    async fn resolve(&self, names: &[String]) -> Result<Vec<IdentityKey>, ChatError> {
        let mut targets = Vec::with_capacity(names.len());
        for n in names {
            targets.push(self.session.auth.resolve_name(n).await?);
        }
        Ok(targets)
    }

    /// Removes users (by name) from a group in one commit; returns the new epoch. What arrives
    /// while catching up first goes to `on_event`.
    pub async fn remove(
        &mut self,
        group: &str,
        names: &[String],
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<u64, ChatError> {
        let id = self.find(group)?;
        let targets = self.resolve(names).await?;
        self.commit(&id, on_event, |g, state| {
            Ok(g.remove_members(&state.mls, state.mls_identity(), &targets)?)
        })
        .await
    }

    /// Rotates our own leaf keys; returns the new epoch. What arrives while catching up first
    /// goes to `on_event`.
    pub async fn update(
        &mut self,
        group: &str,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<u64, ChatError> {
        let id = self.find(group)?;
        self.commit(&id, on_event, |g, state| {
            Ok(g.self_update(&state.mls, state.mls_identity())?)
        })
        .await
    }

    /// Drives a commit built by `build` into the log (see [`crate::commit`]); returns the
    /// epoch it began. Catches up first; what arrives meanwhile goes to `on_event`.
    async fn commit(
        &mut self,
        id: &[u8],
        on_event: &mut dyn FnMut(ChatEvent),
        build: impl FnMut(&mut Group, &ClientState) -> Result<CommitOutput, ChatError>,
    ) -> Result<u64, ChatError> {
        let session = self.session;
        let driver = CommitDriver::new(COMMIT_ATTEMPTS, self.cursor(id));
        let mut host = Committer {
            log: GroupLog::new(self, id, on_event),
            build,
        };
        let committed =
            commit::drive(&session.delivery, id, &mut host, driver, Start::CatchUp).await?;
        Ok(committed.epoch)
    }

    /// Renews our leaf with a self-update commit once half of the lifetime it got from our
    /// KeyPackage has passed (see `Group::leaf_renewal_due`): a leaf past its lifetime makes
    /// the group unjoinable for everyone. What arrives while catching up goes to `on_event`.
    async fn renew_leaf_if_due(
        &mut self,
        id: &[u8],
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<(), ChatError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.load(id)?.leaf_renewal_due(now) {
            self.commit(id, on_event, |g, state| {
                Ok(g.self_update(&state.mls, state.mls_identity())?)
            })
            .await?;
        }
        Ok(())
    }

    fn cursor(&self, id: &[u8]) -> u64 {
        self.state.groups.get(id).map_or(0, |m| m.cursor)
    }

    fn remember_own(&mut self, id: &[u8], message_id: &[u8]) {
        if let Some(meta) = self.state.groups.get_mut(id) {
            meta.own_pending.push(message_id.to_vec());
        }
    }

    fn forget_own(&mut self, id: &[u8], message_id: &[u8]) {
        if let Some(meta) = self.state.groups.get_mut(id) {
            meta.own_pending.retain(|m| m != message_id);
        }
    }

    /// Encrypts and sends an application message; returns its sequence number. If the server
    /// refuses it because the group moved on beyond the epochs members keep secrets for, reads
    /// the group's news (handed to `on_event`) and encrypts it again in the current epoch.
    pub async fn send(
        &mut self,
        group: &str,
        body: &[u8],
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<u64, ChatError> {
        let id = self.find(group)?;
        self.renew_leaf_if_due(&id, on_event).await?;
        for _ in 0..COMMIT_ATTEMPTS {
            let mut g = self.load(&id)?;
            let message = g.encrypt(&self.state.mls, self.state.mls_identity(), body)?;
            let message_id = random_id()?;
            self.remember_own(&id, &message_id);
            self.save()?;
            match self
                .session
                .delivery
                .send(&id, &message_id, &message, None)
                .await?
            {
                SendOutcome::Appended { seq, .. } | SendOutcome::Duplicate { seq } => {
                    return Ok(seq);
                }
                SendOutcome::StaleEpoch { current_epoch, .. } => {
                    self.forget_own(&id, &message_id);
                    self.save()?;
                    if current_epoch <= g.epoch() {
                        return Err(ChatError::Protocol(format!(
                            "application message for epoch {} refused by a group at epoch \
                             {current_epoch}",
                            g.epoch()
                        )));
                    }
                    self.receive_group(&id, on_event).await?;
                }
            }
        }
        Err(ChatError::Contended(COMMIT_ATTEMPTS))
    }

    /// Processes pending Welcomes: joins their groups, and acknowledges each joined group at
    /// the commit that added us (so the server knows the Welcome was used and may delete it).
    pub async fn join(&mut self, on_event: &mut dyn FnMut(ChatEvent)) -> Result<usize, ChatError> {
        let mut joined = 0;
        loop {
            let welcomes = self
                .session
                .delivery
                .inbox(self.state.inbox_cursor, FETCH_BATCH)
                .await?;
            if welcomes.is_empty() {
                break;
            }
            let mut used = Vec::new();
            for w in welcomes {
                self.state.inbox_cursor = w.seq;
                if self.state.groups.contains_key(&w.group_id) {
                    continue;
                }
                // A Welcome we cannot use (e.g. for KeyPackages of an older device state) is
                // skipped rather than blocking the inbox.
                let Ok(group) = Group::join(&self.state.mls, &w.welcome) else {
                    continue;
                };
                let name = short_group_id(&w.group_id);
                self.state.groups.insert(
                    w.group_id.clone(),
                    GroupMeta {
                        name: name.clone(),
                        cursor: w.commit_seq,
                        own_pending: Vec::new(),
                    },
                );
                joined += 1;
                used.push((w.group_id.clone(), w.commit_seq));
                on_event(ChatEvent::Joined {
                    group: name,
                    epoch: group.epoch(),
                    members: group.members(),
                });
            }
            self.save()?;
            for (id, commit_seq) in used {
                match self.session.delivery.acknowledge(&id, commit_seq).await {
                    // Removed again since: the group's log says so when read.
                    Err(e) if e.code() == Some(ErrorCode::NotMember) => {}
                    other => other?,
                }
            }
        }
        Ok(joined)
    }

    /// Processes one log entry of group `id` (see [`Chat::apply_batch`]).
    pub fn apply(
        &mut self,
        id: &[u8],
        entry: &Envelope,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<(), ChatError> {
        self.apply_batch(id, std::slice::from_ref(entry), on_event)
    }

    /// Group `id`'s state in `slot`, loaded from the client state on first use.
    fn loaded<'g>(
        &self,
        id: &[u8],
        slot: &'g mut Option<Group>,
    ) -> Result<&'g mut Group, ChatError> {
        match slot {
            Some(g) => Ok(g),
            None => Ok(slot.insert(self.load(id)?)),
        }
    }

    /// Processes log entries of group `id` in order, loading the group state once. Entries at
    /// or below the cursor are skipped (duplicates are harmless); the caller saves the state.
    /// Entries that do not continue the cursor are refused whole with [`ChatError::Gap`]:
    /// nothing is ever skipped silently (read the log first: [`Chat::receive_pushed`]).
    pub fn apply_batch(
        &mut self,
        id: &[u8],
        entries: &[Envelope],
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<(), ChatError> {
        if let Some((expected, got)) = first_gap(self.cursor(id), entries) {
            return Err(ChatError::Gap { expected, got });
        }
        // A commit to report stops the batch before it; it is reported when the log is read
        // ([`Chat::receive_group`], or [`Chat::receive_pushed`] at once).
        self.apply_entries(id, entries, &mut None, on_event)
            .map(drop)
    }

    /// Processes a batch of group `id` pushed by a subscription, saves the state and
    /// acknowledges the cursor. A push is only a hint: when it does not continue the cursor
    /// (entries were lost on the way), the group's log is read from the cursor instead, so the
    /// missing entries come first and the pushed ones after them, each once.
    pub async fn receive_pushed(
        &mut self,
        id: &[u8],
        entries: &[Envelope],
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<(), ChatError> {
        match self.apply_batch(id, entries, on_event) {
            Err(ChatError::Gap { .. }) => return self.receive_group(id, on_event).await,
            other => other?,
        }
        if entries.last().is_some_and(|e| e.seq > self.cursor(id)) {
            // Stopped in front of a commit to report: the log reader reports it.
            self.save()?;
            return self.receive_group(id, on_event).await;
        }
        self.save()?;
        if self.state.groups.contains_key(id) {
            let cursor = self.cursor(id);
            self.session.delivery.acknowledge(id, cursor).await?;
        }
        Ok(())
    }

    /// [`Chat::apply_batch`] on the group state in `group` (loaded there on first use).
    ///
    /// Stops in front of a commit this member refuses with what only members can check (a
    /// commit to report, ADR 0015) and returns it, the cursor left before it.
    fn apply_entries<'e>(
        &mut self,
        id: &[u8],
        entries: &'e [Envelope],
        group: &mut Option<Group>,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<Option<&'e Envelope>, ChatError> {
        let name = self.name_of(id);
        for entry in entries {
            let Some(meta) = self.state.groups.get(id) else {
                return Ok(None);
            };
            if entry.seq <= meta.cursor {
                continue;
            }
            if meta.own_pending.iter().any(|m| m == &entry.message_id) {
                self.forget_own(id, &entry.message_id);
                // Our commit, appended but never merged (this device stopped between the
                // two): the log holds it, so it is ours to merge now.
                if entry.kind == EnvelopeKind::Commit {
                    let g = self.loaded(id, group)?;
                    if is_pending_own_commit(g, entry, true) {
                        g.merge_pending_commit(&self.state.mls)?;
                    }
                }
            } else {
                let g = self.loaded(id, group)?;
                if process(g, &self.state.mls, &name, entry, on_event) == Processed::ToReport {
                    return Ok(Some(entry));
                }
            }
            self.skip(id, entry.seq);
        }
        Ok(None)
    }

    /// Moves group `id`'s cursor to `seq` (the entry there is done with).
    fn skip(&mut self, id: &[u8], seq: u64) {
        if let Some(meta) = self.state.groups.get_mut(id) {
            meta.cursor = meta.cursor.max(seq);
        }
    }

    /// Reports the commit `entry` of group `id`, which this member cannot process, with a
    /// signed report (ADR 0015), and moves the cursor past it: the server reverted it (a
    /// marker follows in the log) or refused the report (this device stays at its epoch).
    async fn report(
        &mut self,
        id: &[u8],
        entry: &Envelope,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<(), ChatError> {
        let report = CommitReport::sign(self.state.identity(), id, entry.seq, &entry.payload);
        let answer = self
            .session
            .delivery
            .report_commit(id, entry.seq, &report.encode())
            .await;
        match answer {
            Ok(_) => {}
            Err(e) if e.code() == Some(ErrorCode::ReportRefused) => {
                on_event(ChatEvent::ReportRefused {
                    group: self.name_of(id),
                    seq: entry.seq,
                    reason: e.to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        self.skip(id, entry.seq);
        self.save()
    }

    /// Processes `entries` of group `id` on the state in `group`, reporting each commit this
    /// member cannot process and going on after it; saves the state.
    async fn apply_reporting(
        &mut self,
        id: &[u8],
        mut entries: &[Envelope],
        group: &mut Option<Group>,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<(), ChatError> {
        while let Some(bad) = self.apply_entries(id, entries, group, on_event)? {
            self.save()?;
            let cursor = self.cursor(id);
            self.session.delivery.acknowledge(id, cursor).await?;
            self.report(id, bad, on_event).await?;
            let at = entries
                .iter()
                .position(|e| e.seq > bad.seq)
                .unwrap_or(entries.len());
            entries = entries.get(at..).unwrap_or(&[]);
        }
        self.save()
    }

    /// Reads and processes everything new in group `id`; acknowledges the cursor. When the
    /// server no longer has the entries after our cursor (`history_gone`), the group is
    /// forgotten and [`ChatEvent::HistoryGone`] says so.
    pub async fn receive_group(
        &mut self,
        id: &[u8],
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<(), ChatError> {
        let session = self.session;
        let after = self.cursor(id);
        let mut log = GroupLog::new(self, id, &mut *on_event);
        let read = commit::read_log(&session.delivery, id, after, None, &mut log, |_, _| {
            Ok(None)
        })
        .await;
        match read.map_err(ChatError::from) {
            Ok(_) => Ok(()),
            Err(ChatError::Client(ClientError::Service {
                code: ErrorCode::HistoryGone,
                message,
            })) => {
                let group = self.name_of(id);
                self.forget_group(id)?;
                on_event(ChatEvent::HistoryGone {
                    group,
                    retained_from: message,
                });
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Drops group `id` from this device: its MLS state and its entry in the client state,
    /// saved. A later Welcome to it is joined as a new group.
    fn forget_group(&mut self, id: &[u8]) -> Result<(), ChatError> {
        if let Some(group) = Group::load(&self.state.mls, id)? {
            group.delete(&self.state.mls)?;
        }
        self.state.groups.remove(id);
        self.save()
    }

    /// Joins pending groups, then reads every group.
    pub async fn receive_all(
        &mut self,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<(), ChatError> {
        self.join(on_event).await?;
        let ids: Vec<Vec<u8>> = self.state.groups.keys().cloned().collect();
        for id in ids {
            self.receive_group(&id, on_event).await?;
        }
        Ok(())
    }
}
