//! One simulated member: a device with its own identity, Noise connection, bound session,
//! KeyPackages and MLS state (the client's own `quicproquo-core` groups over an in-memory
//! openmls store), and the setup steps it takes: connect and bind, register, create a group
//! and add members, join from Welcomes.
//!
//! The messenger's state file is left out on purpose: the load generator keeps each member's
//! MLS state in memory so that saving files is not what it measures.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quicproquo_client::commit::{
    COMMIT_ATTEMPTS, CommitDriver, CommitError, CommitHost, DriveError, LogReader, Start, drive,
    is_pending_own_commit, read_log,
};
use quicproquo_client::delivery::{Envelope, EnvelopeKind, Subscription};
use quicproquo_client::{ConnectOptions, Connection, Session, connect_any};
use quicproquo_core::group::{CommitOutput, Event, Group};
use quicproquo_core::mls::{MlsIdentity, MlsProvider, SharedValues, Suite};
use quicproquo_core::{IdentityKey, IdentityKeypair};

use crate::seen::Seen;
use crate::stats::{Stats, counter, error_kind, metric};

/// Most identities per KeyPackage fetch (the Authentication Service's limit).
const FETCH_LIMIT: usize = 1000;

/// Counters the controller prints once a second.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Members (or steps) done in the current phase.
    pub(crate) done: AtomicU64,
    /// Errors so far.
    pub(crate) errors: AtomicU64,
    /// Application messages acknowledged by the server.
    pub(crate) sent: AtomicU64,
    /// Deliveries decrypted.
    pub(crate) delivered: AtomicU64,
    /// When the current phase started, µs after [`Plan::epoch`].
    pub(crate) phase_start_us: AtomicU64,
}

impl Progress {
    pub(crate) fn tick(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` at once, stopping at `u64::MAX` (`n` may come from the server under test).
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        // The closure always returns `Some`, so the update cannot fail.
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
            Some(c.saturating_add(n))
        });
    }
}

/// One group as the whole run knows it.
#[derive(Debug, Clone)]
pub(crate) struct GroupPlan {
    /// The group id.
    pub(crate) id: Vec<u8>,
    /// Member indices; the first is the creator.
    pub(crate) members: Vec<usize>,
}

/// Everything the members of a run share.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) settings: crate::cli::Settings,
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) options: ConnectOptions,
    pub(crate) run_id: String,
    pub(crate) identities: Vec<IdentityKey>,
    pub(crate) groups: Vec<GroupPlan>,
    pub(crate) progress: Arc<Progress>,
    /// The run's time origin, for phase-relative times.
    pub(crate) epoch: Instant,
}

impl Plan {
    /// Application messages each group sends in steady phase `phase` (0 for a phase that is
    /// not one of the run's rates).
    pub(crate) fn messages_per_group(&self, phase: u32) -> u64 {
        let s = &self.settings;
        usize::try_from(phase)
            .ok()
            .and_then(|p| s.rates.get(p))
            .map_or(0, |rate| {
                let group_rate = rate / self.groups.len().max(1) as f64;
                (s.duration.as_secs_f64() * group_rate).ceil().max(1.0) as u64
            })
    }

    /// KeyPackages member `index` uploads: one per group it joins, plus one per time churn
    /// may re-add it.
    fn key_packages_for(&self, joins: usize) -> usize {
        let s = &self.settings;
        let churn = if s.churn > 0 {
            let steps = s.duration.as_secs_f64() / s.churn_every.as_secs_f64().max(1e-3);
            let steps = steps.ceil() as usize * s.rates.len();
            (steps * s.churn).div_ceil(s.group_size.saturating_sub(1).max(1)) + 1
        } else {
            0
        };
        (joins + churn).max(1)
    }
}

/// A member's place in one group.
pub(crate) struct GroupSlot {
    /// Which group (index into [`Plan::groups`]).
    pub(crate) index: usize,
    /// Position in the group; 0 is the creator.
    pub(crate) position: usize,
    /// The group id.
    pub(crate) id: Vec<u8>,
    /// Our MLS state, once created or joined.
    pub(crate) group: Option<Group>,
    /// Last log entry processed.
    pub(crate) cursor: u64,
    /// The epoch we (last) joined at: application messages of earlier epochs were never
    /// meant for us.
    pub(crate) joined_epoch: u64,
    /// Live subscription to the group's log.
    pub(crate) sub: Option<Subscription<Envelope>>,
    /// Application messages received, by phase and message number (a repeat is an error).
    pub(crate) seen: Seen,
}

/// A simulated device.
pub(crate) struct Member {
    pub(crate) index: usize,
    identity: IdentityKeypair,
    pub(crate) mls: MlsIdentity,
    pub(crate) provider: MlsProvider,
    pub(crate) conn: Option<Connection>,
    pub(crate) session: Option<Session>,
    pub(crate) slots: Vec<GroupSlot>,
    pub(crate) inbox_cursor: u64,
}

/// An error already counted in the stats: the member sits out the rest of the run.
#[derive(Debug)]
pub(crate) struct Counted;

/// Records `kind` in `stats` and the progress counter, and returns [`Counted`].
pub(crate) fn fail(stats: &RefCell<Stats>, progress: &Progress, kind: String) -> Counted {
    stats.borrow_mut().error(kind);
    Progress::tick(&progress.errors);
    Counted
}

/// A message id: our index (so we recognise our own entries in the log), then 12 random
/// bytes.
pub(crate) fn message_id(index: usize) -> Result<Vec<u8>, getrandom::Error> {
    let mut id = vec![0u8; 16];
    id[..4].copy_from_slice(&(index as u32).to_be_bytes());
    getrandom::fill(&mut id[4..])?;
    Ok(id)
}

/// The id of application message `j` of a steady phase, sent by member `index`:
/// `index u32 | phase u32 | j u64`, so that a member that does not decrypt it still knows who
/// sent it and when it was planned.
pub(crate) fn app_message_id(index: usize, phase: u32, j: u64) -> Vec<u8> {
    let mut id = Vec::with_capacity(16);
    id.extend_from_slice(&(index as u32).to_be_bytes());
    id.extend_from_slice(&phase.to_be_bytes());
    id.extend_from_slice(&j.to_be_bytes());
    id
}

/// Sender index, phase and message number of an [`app_message_id`].
pub(crate) fn parse_app_message_id(id: &[u8]) -> Option<(usize, u32, u64)> {
    if id.len() != 16 {
        return None;
    }
    let index = u32::from_be_bytes(id[..4].try_into().ok()?) as usize;
    let phase = u32::from_be_bytes(id[4..8].try_into().ok()?);
    let j = u64::from_be_bytes(id[8..].try_into().ok()?);
    Some((index, phase, j))
}

/// Whether a message id is one of member `index`'s.
pub(crate) fn is_own(id: &[u8], index: usize) -> bool {
    id.get(..4) == Some(&(index as u32).to_be_bytes()[..])
}

impl Member {
    /// A member with `identity`, not yet connected; `plan` says which groups it is in. Its
    /// MLS store holds large ratchet trees in `shared`, once for every member given it.
    pub(crate) fn new(
        index: usize,
        identity: IdentityKeypair,
        plan: &Plan,
        shared: SharedValues,
    ) -> Self {
        let mls = MlsIdentity::new(&identity);
        let slots = plan
            .groups
            .iter()
            .enumerate()
            .filter_map(|(g, gp)| {
                let position = gp.members.iter().position(|&m| m == index)?;
                Some(GroupSlot {
                    index: g,
                    position,
                    id: gp.id.clone(),
                    group: None,
                    cursor: 0,
                    joined_epoch: 0,
                    sub: None,
                    seen: Seen::default(),
                })
            })
            .collect();
        Self {
            index,
            identity,
            mls,
            provider: MlsProvider::sharing(shared),
            conn: None,
            session: None,
            slots,
            inbox_cursor: 0,
        }
    }

    fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// Connects (TCP + Noise handshake, certificate checked) to the member's edge, trying the
    /// others in turn, and binds the identity.
    pub(crate) async fn connect(
        &mut self,
        plan: &Plan,
        stats: &RefCell<Stats>,
    ) -> Result<(), Counted> {
        let n = plan.addrs.len();
        let addrs: Vec<SocketAddr> = (0..n).map(|k| plan.addrs[(self.index + k) % n]).collect();
        let t = Instant::now();
        let conn = connect_any(&addrs, &plan.options)
            .await
            .map_err(|e| fail(stats, &plan.progress, error_kind("connect", &e)))?;
        let connected = Instant::now();
        stats.borrow_mut().record(metric::CONNECT, connected - t);
        let session = conn
            .bind(&self.identity)
            .await
            .map_err(|e| fail(stats, &plan.progress, error_kind("bind", &e)))?;
        let mut s = stats.borrow_mut();
        s.record(metric::BIND, connected.elapsed());
        let since_start = u64::try_from(plan.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let phase_start = plan.progress.phase_start_us.load(Ordering::Relaxed);
        s.max(
            counter::LAST_BOUND_US,
            since_start.saturating_sub(phase_start),
        );
        drop(s);
        self.conn = Some(conn);
        self.session = Some(session);
        Ok(())
    }

    /// Pings the server over the (idle) connection.
    pub(crate) async fn ping(&self, plan: &Plan, stats: &RefCell<Stats>) -> Result<(), Counted> {
        let Some(conn) = &self.conn else {
            return Err(Counted);
        };
        let pong = conn
            .ping(b"loadtest")
            .await
            .map_err(|e| fail(stats, &plan.progress, error_kind("ping", &e)))?;
        stats.borrow_mut().record(metric::PING, pong.rtt);
        Ok(())
    }

    /// Claims a user name and uploads KeyPackages (one per group to join, plus churn spares).
    pub(crate) async fn register(
        &mut self,
        plan: &Plan,
        stats: &RefCell<Stats>,
    ) -> Result<(), Counted> {
        let Some(session) = self.session().cloned() else {
            return Err(Counted);
        };
        let progress = &plan.progress;
        let t = Instant::now();
        let name = format!("lt-{}-{}", plan.run_id, self.index);
        session
            .auth
            .claim_name(&name)
            .await
            .map_err(|e| fail(stats, progress, error_kind("claim name", &e)))?;
        let joins = self.slots.iter().filter(|s| s.position > 0).count();
        let count = plan.key_packages_for(joins);
        let g = Instant::now();
        let kps = self
            .mls
            .key_packages(&self.provider, plan.settings.suite, count)
            .map_err(|_| fail(stats, progress, "keypackage generation".into()))?;
        let generated = g.elapsed();
        session
            .auth
            .upload_key_packages(&kps, None)
            .await
            .map_err(|e| fail(stats, progress, error_kind("upload", &e)))?;
        let mut s = stats.borrow_mut();
        s.record(metric::KP_GENERATE, generated);
        s.record(metric::REGISTER, t.elapsed());
        Ok(())
    }

    /// Creates every group this member is the creator of, and adds the other members in
    /// commits of `add_batch` (KeyPackages fetched in batches).
    pub(crate) async fn create_groups(
        &mut self,
        plan: &Plan,
        stats: &RefCell<Stats>,
    ) -> Result<(), Counted> {
        let Some(session) = self.session().cloned() else {
            return Err(Counted);
        };
        let progress = &plan.progress;
        let suite: Suite = plan.settings.suite;
        let Self {
            index,
            mls,
            provider,
            slots,
            ..
        } = self;
        for slot in slots.iter_mut().filter(|s| s.position == 0) {
            let group = Group::create(provider, mls, suite, &slot.id)
                .map_err(|_| fail(stats, progress, "group create".into()))?;
            let info = group
                .group_info(provider, mls)
                .map_err(|_| fail(stats, progress, "group info".into()))?;
            session
                .delivery
                .create_group(&slot.id, &info)
                .await
                .map_err(|e| fail(stats, progress, error_kind("create group", &e)))?;
            slot.group = Some(group);
            let others = &plan.groups[slot.index].members[1..];
            for batch in others.chunks(plan.settings.add_batch) {
                let packages = key_packages(&session, plan, batch, stats).await?;
                if packages.is_empty() {
                    continue;
                }
                let t = Instant::now();
                let build = |g: &mut Group, provider: &MlsProvider| {
                    let t = Instant::now();
                    let out = g
                        .add_members(provider, mls, &packages)
                        .map_err(|_| fail(stats, progress, "commit build (add)".into()))?;
                    let mut s = stats.borrow_mut();
                    s.record(metric::COMMIT_BUILD, t.elapsed());
                    s.max(counter::COMMIT_BYTES, out.commit.len() as u64);
                    s.max(
                        counter::WELCOME_BYTES,
                        out.welcome.as_ref().map_or(0, |w| w.len() as u64),
                    );
                    Ok(out)
                };
                let driver = CommitDriver::new(COMMIT_ATTEMPTS, slot.cursor);
                let mut log = SetupLog {
                    group: slot.group.as_mut().ok_or(Counted)?,
                    provider,
                    index: *index,
                    cursor: &mut slot.cursor,
                    stats,
                    progress,
                    build,
                };
                let committed = drive(&session.delivery, &slot.id, &mut log, driver, Start::Build)
                    .await
                    .map_err(|e| commit_failed(stats, progress, e))?;
                slot.cursor = slot.cursor.max(committed.seq);
                stats.borrow_mut().record(metric::COMMIT, t.elapsed());
            }
        }
        Ok(())
    }

    /// Joins every group this member was added to: fetches each Welcome from the inbox,
    /// processes it, and catches up with the group's log after the commit that added it.
    pub(crate) async fn join(
        &mut self,
        plan: &Plan,
        stats: &RefCell<Stats>,
    ) -> Result<(), Counted> {
        let Some(session) = self.session().cloned() else {
            return Err(Counted);
        };
        let progress = &plan.progress;
        loop {
            if self.slots.iter().all(|s| s.group.is_some()) {
                return Ok(());
            }
            let t = Instant::now();
            let welcomes = session
                .delivery
                .inbox(self.inbox_cursor, 1)
                .await
                .map_err(|e| fail(stats, progress, error_kind("inbox", &e)))?;
            stats
                .borrow_mut()
                .record(metric::WELCOME_FETCH, t.elapsed());
            if welcomes.is_empty() {
                break;
            }
            for w in welcomes {
                self.inbox_cursor = w.seq;
                let Some(slot) = self
                    .slots
                    .iter_mut()
                    .find(|s| s.id == w.group_id && s.group.is_none())
                else {
                    continue;
                };
                let p = Instant::now();
                let group = Group::join(&self.provider, &w.welcome)
                    .map_err(|_| fail(stats, progress, "welcome processing".into()))?;
                stats
                    .borrow_mut()
                    .record(metric::WELCOME_PROCESS, p.elapsed());
                slot.joined_epoch = group.epoch();
                slot.cursor = w.commit_seq;
                let mut log = SetupLog {
                    group: slot.group.insert(group),
                    provider: &self.provider,
                    index: self.index,
                    cursor: &mut slot.cursor,
                    stats,
                    progress,
                    build: (),
                };
                read_log(
                    &session.delivery,
                    &slot.id,
                    w.commit_seq,
                    None,
                    &mut log,
                    |_, _| Ok(None),
                )
                .await
                .map_err(|e| commit_failed(stats, progress, e))?;
                let mut s = stats.borrow_mut();
                s.record(metric::JOIN, t.elapsed());
                s.count(counter::JOINED, 1);
            }
        }
        let missing = self.slots.iter().filter(|s| s.group.is_none()).count();
        for _ in 0..missing {
            fail(stats, progress, "no welcome in the inbox".into());
        }
        if missing > 0 { Err(Counted) } else { Ok(()) }
    }

    /// The group views for the agreement check: (group, epoch, epoch authenticator).
    pub(crate) fn views(&self) -> Vec<(usize, u64, Vec<u8>)> {
        self.slots
            .iter()
            .filter_map(|s| {
                let g = s.group.as_ref()?;
                Some((s.index, g.epoch(), g.epoch_authenticator()))
            })
            .collect()
    }

    /// Subscribes to the log of every group we are in, from our cursor.
    pub(crate) async fn subscribe(
        &mut self,
        plan: &Plan,
        stats: &RefCell<Stats>,
    ) -> Result<(), Counted> {
        let Some(session) = self.session().cloned() else {
            return Err(Counted);
        };
        for slot in self.slots.iter_mut().filter(|s| s.group.is_some()) {
            let sub = session
                .delivery
                .subscribe(&slot.id, slot.cursor)
                .await
                .map_err(|e| fail(stats, &plan.progress, error_kind("subscribe", &e)))?;
            slot.sub = Some(sub);
        }
        Ok(())
    }

    /// Ends subscriptions and closes the connection politely.
    pub(crate) async fn close(&mut self) {
        for slot in &mut self.slots {
            slot.sub = None;
        }
        self.session = None;
        if let Some(conn) = self.conn.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.close()).await;
        }
    }
}

/// Fetches (consuming) a KeyPackage of each member of `batch`, in chunks the Authentication
/// Service accepts; a member without one is counted as an error.
async fn key_packages(
    session: &Session,
    plan: &Plan,
    batch: &[usize],
    stats: &RefCell<Stats>,
) -> Result<Vec<Vec<u8>>, Counted> {
    let progress = &plan.progress;
    let wanted: Vec<IdentityKey> = batch.iter().map(|&m| plan.identities[m]).collect();
    let mut packages = Vec::with_capacity(wanted.len());
    for chunk in wanted.chunks(FETCH_LIMIT) {
        let t = Instant::now();
        let fetched = session
            .auth
            .fetch_key_packages(chunk)
            .await
            .map_err(|e| fail(stats, progress, error_kind("keypackage fetch", &e)))?;
        stats.borrow_mut().record(metric::KP_FETCH, t.elapsed());
        for _ in fetched.len()..chunk.len() {
            fail(stats, progress, "no keypackage available".into());
        }
        packages.extend(fetched.into_iter().map(|k| k.data));
    }
    Ok(packages)
}

/// Records why a commit drive (or a read of the log) failed.
pub(crate) fn commit_failed(
    stats: &RefCell<Stats>,
    progress: &Progress,
    e: DriveError<Counted>,
) -> Counted {
    let kind = match e {
        DriveError::Host(counted) => return counted,
        DriveError::Send(e) => error_kind("commit send", &e),
        DriveError::Fetch(e) => error_kind("fetch", &e),
        DriveError::Group(_) => "commit merge".into(),
        DriveError::GaveUp(CommitError::Contended(_)) => "commit lost the epoch".into(),
        DriveError::GaveUp(reason) => format!("commit: {reason}"),
        _ => "commit".into(),
    };
    fail(stats, progress, kind)
}

/// A member's group during setup: commits are processed (application messages are not sent
/// yet), our own entries skipped, and `build` stages the creator's commits.
struct SetupLog<'m, B> {
    group: &'m mut Group,
    provider: &'m MlsProvider,
    index: usize,
    cursor: &'m mut u64,
    stats: &'m RefCell<Stats>,
    progress: &'m Progress,
    build: B,
}

impl<B> LogReader for SetupLog<'_, B> {
    type Error = Counted;

    fn cursor(&self) -> u64 {
        *self.cursor
    }

    async fn apply(&mut self, entries: &[Envelope]) -> Result<bool, Counted> {
        let (stats, progress) = (self.stats, self.progress);
        for e in entries {
            if e.seq <= *self.cursor {
                continue;
            }
            *self.cursor = e.seq;
            if is_own(&e.message_id, self.index) {
                if is_pending_own_commit(self.group, e, true) {
                    self.group
                        .merge_pending_commit(self.provider)
                        .map_err(|_| fail(stats, progress, "commit merge".into()))?;
                }
                continue;
            }
            if e.kind != EnvelopeKind::Commit {
                continue;
            }
            let t = Instant::now();
            match self.group.process(self.provider, &e.payload) {
                Ok(Event::Commit { .. }) => stats
                    .borrow_mut()
                    .record(metric::COMMIT_PROCESS, t.elapsed()),
                Ok(_) => {}
                Err(err) if err.is_stale() => {}
                Err(_) => {
                    fail(stats, progress, "commit processing".into());
                }
            }
        }
        Ok(true)
    }
}

impl<B> CommitHost for SetupLog<'_, B>
where
    B: FnMut(&mut Group, &MlsProvider) -> Result<CommitOutput, Counted>,
{
    fn group(&mut self) -> Result<(&mut Group, &MlsProvider), Counted> {
        Ok((self.group, self.provider))
    }

    fn is_own(&self, entry: &Envelope) -> bool {
        is_own(&entry.message_id, self.index)
    }

    fn build(&mut self) -> Result<CommitOutput, Counted> {
        (self.build)(self.group, self.provider)
    }

    fn own_message_id(&mut self) -> Result<Vec<u8>, Counted> {
        message_id(self.index).map_err(|_| fail(self.stats, self.progress, "rng".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_adds_at_once_and_stops_at_the_top() {
        let counter = AtomicU64::new(0);
        Progress::tick(&counter);
        Progress::add(&counter, 41);
        assert_eq!(counter.load(Ordering::Relaxed), 42);
        Progress::add(&counter, u64::MAX);
        assert_eq!(counter.load(Ordering::Relaxed), u64::MAX);
    }
}
