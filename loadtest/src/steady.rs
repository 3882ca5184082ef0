//! The steady state: every member sends application messages on a fixed schedule and receives
//! everyone else's; the group's first `--decrypting` members decrypt them; optionally each
//! group's creator churns members (removes and re-adds them) meanwhile.
//!
//! Message `j` of group `g` is sent by the member at position `j mod group_size`, at the
//! *planned* time `start + j / group_rate`. Its message id names the sender, the phase and `j`,
//! and its plaintext starts with a header carrying the phase and that planned offset, so a
//! recipient computes latency from the planned time to the moment it has the message
//! (decrypted, for a decrypting member): a stalled server, a slow generator or a late send all
//! show up in the figure (no coordinated omission). Every recipient checks the log's order by
//! sequence number and, by message id, that each message comes once and from its planned
//! sender; every member processes every commit. Sends are issued as separate tasks, so one
//! slow acknowledgement does not hold back the next send.

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use quicproquo_client::commit::is_pending_own_commit;
use quicproquo_client::delivery::{Envelope, EnvelopeKind, Subscription, Welcome};
use quicproquo_client::{SendOutcome, Session};
use quicproquo_core::group::{Event, GroupError};
use quicproquo_core::mls::{MlsIdentity, MlsProvider};
use quicproquo_proto::errors::ErrorCode;
use tokio::task::JoinHandle;

use crate::churn;
use crate::cli::HEADER_BYTES;
use crate::member::{
    Counted, GroupSlot, Member, Plan, Progress, app_message_id, fail, is_own, parse_app_message_id,
};
use crate::seen::Refused;
use crate::stats::{Stats, counter, error_kind, metric};

/// How often a member subscribes again after its subscription ended, per group and phase.
const MAX_RESUBSCRIBES: usize = 3;

/// Marks our plaintexts.
const MAGIC: &[u8; 4] = b"QPQL";

/// One steady-state phase.
#[derive(Debug, Clone)]
pub(crate) struct SteadyPlan {
    /// Phase number (in the plaintext header, so late messages of an earlier phase are told
    /// apart).
    pub(crate) phase: u32,
    /// Planned time of message 0.
    pub(crate) start: Instant,
    /// Messages per second, all groups together.
    pub(crate) rate: f64,
    /// How long messages are sent.
    pub(crate) duration: Duration,
    /// How long to wait for outstanding deliveries afterwards.
    pub(crate) drain: Duration,
}

/// The plaintext of one message: magic, phase, planned offset (µs), sender; zero padding.
fn plaintext(phase: u32, offset_us: u64, sender: usize, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(len.max(HEADER_BYTES));
    p.extend_from_slice(MAGIC);
    p.extend_from_slice(&phase.to_be_bytes());
    p.extend_from_slice(&offset_us.to_be_bytes());
    p.extend_from_slice(&(sender as u64).to_be_bytes());
    p.resize(len.max(HEADER_BYTES), 0);
    p
}

/// Phase and planned offset (µs) from a plaintext, if it is one of ours.
fn header(p: &[u8]) -> Option<(u32, u64)> {
    if p.get(..4)? != MAGIC {
        return None;
    }
    let phase = u32::from_be_bytes(p.get(4..8)?.try_into().ok()?);
    let offset = u64::from_be_bytes(p.get(8..16)?.try_into().ok()?);
    Some((phase, offset))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What one member's groups share during the phase.
pub(crate) struct Ctx<'a> {
    pub(crate) index: usize,
    pub(crate) provider: &'a MlsProvider,
    pub(crate) mls: &'a MlsIdentity,
    pub(crate) session: &'a Session,
    pub(crate) inbox_cursor: &'a Cell<u64>,
    pub(crate) plan: &'a Plan,
    pub(crate) steady: &'a SteadyPlan,
    pub(crate) stats: &'a Rc<RefCell<Stats>>,
}

/// Runs the phase for one member (all its groups at once).
pub(crate) async fn run_member(
    member: &mut Member,
    plan: &Plan,
    steady: &SteadyPlan,
    stats: &Rc<RefCell<Stats>>,
) {
    let Member {
        index,
        mls,
        provider,
        session,
        slots,
        inbox_cursor,
        ..
    } = member;
    let Some(session) = session.as_ref() else {
        return;
    };
    let cursor = Cell::new(*inbox_cursor);
    let ctx = Ctx {
        index: *index,
        provider,
        mls,
        session,
        inbox_cursor: &cursor,
        plan,
        steady,
        stats,
    };
    futures::future::join_all(
        slots
            .iter_mut()
            .filter(|s| s.group.is_some())
            .map(|slot| run_slot(&ctx, slot)),
    )
    .await;
    *inbox_cursor = cursor.get();
}

/// Works off what an earlier phase left behind before the next one starts: processes each
/// group's log up to the end the server reports (decrypting, but not measuring: such messages
/// count as late), at most until `deadline`.
pub(crate) async fn settle_member(
    member: &mut Member,
    plan: &Plan,
    deadline: Instant,
    stats: &Rc<RefCell<Stats>>,
) {
    let Member {
        index,
        mls,
        provider,
        session,
        slots,
        inbox_cursor,
        ..
    } = member;
    let Some(session) = session.as_ref() else {
        return;
    };
    let infos = match session.delivery.groups().await {
        Ok(infos) => infos,
        Err(e) => {
            fail(stats, &plan.progress, error_kind("groups", &e));
            return;
        }
    };
    // No phase has this number: everything processed here is counted as late.
    let none = SteadyPlan {
        phase: u32::MAX,
        start: Instant::now(),
        rate: 1.0,
        duration: Duration::ZERO,
        drain: Duration::ZERO,
    };
    let cursor = Cell::new(*inbox_cursor);
    let ctx = Ctx {
        index: *index,
        provider,
        mls,
        session,
        inbox_cursor: &cursor,
        plan,
        steady: &none,
        stats,
    };
    let infos = &infos;
    let ctx = &ctx;
    futures::future::join_all(slots.iter_mut().filter(|s| s.sub.is_some()).map(
        |slot| async move {
            let Some(last) = infos
                .iter()
                .find(|g| g.group_id == slot.id)
                .map(|g| g.last_seq)
            else {
                return;
            };
            let (mut received, mut standing) = (0, Standing::In);
            while slot.cursor < last && matches!(standing, Standing::In) {
                let batch = tokio::select! {
                    b = next_batch(&mut slot.sub) => b,
                    () = tokio::time::sleep_until(deadline.into()) => break,
                };
                let Some(batch) = batch else { break };
                if handle_batch(ctx, slot, &batch, &mut received, &mut standing)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        },
    ))
    .await;
    *inbox_cursor = cursor.get();
}

/// Where a member stands in a group during the phase.
pub(crate) enum Standing {
    /// A member: sends and receives.
    In,
    /// Removed by churn at this moment; waiting for the Welcome that adds it back.
    Out(Instant, Subscription<Welcome>),
}

#[allow(clippy::too_many_lines)]
async fn run_slot(ctx: &Ctx<'_>, slot: &mut GroupSlot) {
    let s = &ctx.plan.settings;
    let st = ctx.steady;
    let size = ctx.plan.groups[slot.index].members.len() as u64;
    let group_rate = st.rate / ctx.plan.groups.len() as f64;
    let interval = Duration::from_secs_f64(1.0 / group_rate);
    let total = ctx.plan.messages_per_group(st.phase);
    let position = slot.position as u64;
    let own = if position < total {
        (total - position).div_ceil(size)
    } else {
        0
    };
    let expected = total - own;
    let churning = s.churn > 0;
    let end = st.start + st.duration;
    let deadline = end + st.drain;
    let mut next_j = position;
    let mut received = 0u64;
    let mut standing = Standing::In;
    let mut churn_at = (churning && slot.position == 0).then(|| st.start + s.churn_every);
    let mut churn_round = 0usize;
    let mut sends: Vec<JoinHandle<()>> = Vec::new();
    let mut resubscribes = 0;
    let mut drained = false;
    // One timer each, set again only when its time changes: a timer made anew on every turn
    // of the loop (one per delivery) is a registration and a removal in the runtime's timer
    // wheel each time.
    let (mut send_timer, mut churn_timer) = (Timer::default(), Timer::default());
    let deadline_timer = tokio::time::sleep_until(deadline.into());
    tokio::pin!(deadline_timer);

    loop {
        if !churning && received >= expected && next_j >= total {
            break;
        }
        let send_at = (next_j < total).then(|| st.start + interval.mul_f64(next_j as f64));
        let churn_due = churn_at.filter(|t| *t < end);
        send_timer.set(send_at);
        churn_timer.set(churn_due);
        tokio::select! {
            biased;
            batch = next_batch(&mut slot.sub) => match batch {
                Some(batch) => {
                    if handle_batch(ctx, slot, &batch, &mut received, &mut standing).await.is_err() {
                        break;
                    }
                }
                None => {
                    slot.sub = None;
                    if matches!(standing, Standing::In) {
                        resubscribes += 1;
                        if resubscribes > MAX_RESUBSCRIBES
                            || churn::resubscribe(ctx, slot, &mut standing).await.is_err()
                        {
                            break;
                        }
                    }
                }
            },
            welcomes = next_welcomes(&mut standing) => {
                let Some(welcomes) = welcomes else {
                    fail(ctx.stats, &ctx.plan.progress, "inbox subscription ended".into());
                    break;
                };
                if churn::rejoin(ctx, slot, welcomes, &mut standing).await.is_err() {
                    break;
                }
            },
            () = send_timer.fired() => {
                let j = next_j;
                next_j += size;
                if matches!(standing, Standing::In) {
                    if let Some(task) = send(ctx, slot, j, interval) {
                        sends.push(task);
                    }
                } else {
                    ctx.stats.borrow_mut().count(counter::SKIPPED, 1);
                }
            },
            () = churn_timer.fired() => {
                churn_at = churn_at.map(|t| t + s.churn_every);
                if churn::step(ctx, slot, churn_round, &mut received, &mut standing)
                    .await
                    .is_err()
                {
                    churn_at = None;
                }
                churn_round += 1;
            },
            () = &mut deadline_timer => {
                drained = true;
                break;
            }
        }
    }
    for task in sends {
        let _ = task.await;
    }
    if churning && drained {
        check_caught_up(ctx, slot, &standing).await;
    }
    let mut stats = ctx.stats.borrow_mut();
    if !churning {
        stats.count(counter::EXPECTED, expected);
        if received < expected {
            for _ in received..expected {
                stats.error("undelivered within the drain time");
            }
        }
    }
}

/// Under churn, how many messages a member should receive depends on when it was removed and
/// added back, so completeness is checked by the log instead: every entry was checked to follow
/// the one before it, and once the drain is over a member that is in the group must have
/// processed its log to the end. Each entry it has not is an error.
async fn check_caught_up(ctx: &Ctx<'_>, slot: &GroupSlot, standing: &Standing) {
    let (stats, progress) = (ctx.stats, &ctx.plan.progress);
    if matches!(standing, Standing::Out(..)) {
        stats.borrow_mut().count(counter::OUT_AT_END, 1);
        return;
    }
    let infos = match ctx.session.delivery.groups().await {
        Ok(infos) => infos,
        Err(e) => {
            fail(stats, progress, error_kind("groups", &e));
            return;
        }
    };
    let Some(last) = infos
        .iter()
        .find(|g| g.group_id == slot.id)
        .map(|g| g.last_seq)
    else {
        fail(
            stats,
            progress,
            "a group missing from the member's groups".into(),
        );
        return;
    };
    let mut s = stats.borrow_mut();
    match last.checked_sub(slot.cursor) {
        None | Some(0) => s.count(counter::CAUGHT_UP, 1),
        // Counted at once: `last` is the server's number, and must not size a loop here.
        Some(behind) => {
            s.error_times("log entries not processed within the drain time", behind);
            Progress::add(&progress.errors, behind);
        }
    }
}

async fn next_batch(sub: &mut Option<Subscription<Envelope>>) -> Option<Vec<Envelope>> {
    match sub {
        Some(sub) => sub.next().await,
        None => std::future::pending().await,
    }
}

async fn next_welcomes(standing: &mut Standing) -> Option<Vec<Welcome>> {
    match standing {
        Standing::Out(_, sub) => sub.next().await,
        Standing::In => std::future::pending().await,
    }
}

/// A timer that may be unset (then it never fires), kept across turns of a loop.
#[derive(Default)]
struct Timer {
    at: Option<Instant>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Timer {
    /// Sets it to fire at `at` (`None`: never); no change when it is set there already.
    fn set(&mut self, at: Option<Instant>) {
        if self.at == at {
            return;
        }
        self.at = at;
        match (at, &mut self.sleep) {
            (Some(t), Some(sleep)) => sleep.as_mut().reset(t.into()),
            (Some(t), None) => self.sleep = Some(Box::pin(tokio::time::sleep_until(t.into()))),
            (None, _) => self.sleep = None,
        }
    }

    /// Waits until it fires.
    async fn fired(&mut self) {
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().await,
            None => std::future::pending().await,
        }
    }
}

/// Encrypts message `j` and sends it in a task of its own.
fn send(ctx: &Ctx<'_>, slot: &mut GroupSlot, j: u64, interval: Duration) -> Option<JoinHandle<()>> {
    let st = ctx.steady;
    let planned_offset = interval.mul_f64(j as f64);
    let planned = st.start + planned_offset;
    let (stats, progress) = (ctx.stats, &ctx.plan.progress);
    stats.borrow_mut().record(
        metric::SEND_LAG,
        Instant::now().saturating_duration_since(planned),
    );
    let group = slot.group.as_mut()?;
    let body = plaintext(
        st.phase,
        micros(planned_offset),
        ctx.index,
        ctx.plan.settings.payload_bytes,
    );
    let t = Instant::now();
    let Ok(message) = group.encrypt(ctx.provider, ctx.mls, &body) else {
        fail(stats, progress, "encrypt".into());
        return None;
    };
    stats.borrow_mut().record(metric::ENCRYPT, t.elapsed());
    let mid = app_message_id(ctx.index, st.phase, j);
    let churning = ctx.plan.settings.churn > 0;
    let (delivery, id) = (ctx.session.delivery.clone(), slot.id.clone());
    let (stats, progress) = (Rc::clone(stats), std::sync::Arc::clone(progress));
    Some(tokio::task::spawn_local(async move {
        let r = delivery.send(&id, &mid, &message, None).await;
        let mut s = stats.borrow_mut();
        match r {
            Ok(SendOutcome::Appended { .. }) => {
                s.record(metric::SEND_ACK, planned.elapsed());
                s.count(counter::SENT, 1);
                Progress::tick(&progress.sent);
            }
            // Churn's commits moved the group on beyond the epochs members keep secrets for
            // before the sender had processed them: refused rather than unreadable to all.
            Ok(SendOutcome::StaleEpoch { .. }) if churning => {
                s.count(counter::REFUSED_BEHIND, 1);
            }
            Ok(other) => {
                s.error(format!("send: unexpected {}", outcome_name(&other)));
                Progress::tick(&progress.errors);
            }
            // Churn removed the sender before it had processed its removal: the server
            // refuses, as it should.
            Err(e) if churning && e.code() == Some(ErrorCode::NotMember) => {
                s.count(counter::REFUSED_REMOVED, 1);
            }
            Err(e) => {
                s.error(error_kind("send", &e));
                Progress::tick(&progress.errors);
            }
        }
    }))
}

/// A short name for a group error (no message content).
pub(crate) fn group_error_kind(e: &GroupError) -> &'static str {
    match e {
        GroupError::WrongEpoch { expected, got } if got < expected => {
            "older than the kept past epochs"
        }
        GroupError::WrongEpoch { .. } => "from a future epoch",
        GroupError::Undecryptable => "undecryptable (epoch keys gone)",
        GroupError::NotMember => "not a member",
        GroupError::Rejected(_) => "rejected as invalid",
        GroupError::OwnCommitLost => "own commit lost",
        GroupError::Malformed => "malformed",
        GroupError::Storage(_) => "storage",
        _ => "other",
    }
}

fn outcome_name(o: &SendOutcome) -> &'static str {
    match o {
        SendOutcome::Appended { .. } => "appended",
        SendOutcome::Duplicate { .. } => "duplicate",
        SendOutcome::StaleEpoch { .. } => "stale epoch",
    }
}

/// Checks an application entry by its message id: sent by the member the plan names for its
/// message number, and not seen before. Returns its phase and planned offset.
fn check_app_entry(ctx: &Ctx<'_>, slot: &mut GroupSlot, e: &Envelope) -> Option<(u32, Duration)> {
    let (stats, progress) = (ctx.stats, &ctx.plan.progress);
    let Some((sender, phase, j)) = parse_app_message_id(&e.message_id) else {
        fail(stats, progress, "foreign message id".into());
        return None;
    };
    let members = &ctx.plan.groups[slot.index].members;
    if members.get((j % members.len() as u64) as usize) != Some(&sender) {
        fail(stats, progress, "message id names another sender".into());
        return None;
    }
    match slot
        .seen
        .insert(phase, j, ctx.plan.messages_per_group(phase))
    {
        Ok(()) => {}
        Err(Refused::Twice) => {
            fail(stats, progress, "delivered twice".into());
            return None;
        }
        Err(Refused::BeyondPlan) => {
            fail(stats, progress, "message number beyond the plan".into());
            return None;
        }
    }
    Some((phase, planned_offset(ctx, j)))
}

/// When message `j` of a group was planned, after the phase's start (as [`send`] plans it).
fn planned_offset(ctx: &Ctx<'_>, j: u64) -> Duration {
    let group_rate = ctx.steady.rate / ctx.plan.groups.len() as f64;
    Duration::from_secs_f64(1.0 / group_rate).mul_f64(j as f64)
}

/// Processes log entries (pushed, or read ahead of a commit of ours) in order.
pub(crate) async fn handle_batch(
    ctx: &Ctx<'_>,
    slot: &mut GroupSlot,
    batch: &[Envelope],
    received: &mut u64,
    standing: &mut Standing,
) -> Result<(), Counted> {
    let (stats, progress) = (ctx.stats, &ctx.plan.progress);
    for e in batch {
        if e.seq <= slot.cursor {
            continue;
        }
        if e.seq != slot.cursor + 1 {
            fail(stats, progress, "gap in the log".into());
        }
        slot.cursor = e.seq;
        if is_own(&e.message_id, ctx.index) {
            // Our commit, still pending because its answer was lost: the log holds it.
            if let Some(group) = slot.group.as_mut()
                && is_pending_own_commit(group, e, true)
            {
                group
                    .merge_pending_commit(ctx.provider)
                    .map_err(|_| fail(stats, progress, "commit merge".into()))?;
            }
            continue;
        }
        if e.kind == EnvelopeKind::Application && e.epoch < slot.joined_epoch {
            // Encrypted before churn re-added us: not for us (MLS gives a new member no
            // earlier epoch's keys).
            stats.borrow_mut().count(counter::BEFORE_JOIN, 1);
            continue;
        }
        if slot.group.is_none() {
            continue;
        }
        let mut planned = None;
        if e.kind == EnvelopeKind::Application {
            let Some((phase, offset)) = check_app_entry(ctx, slot, e) else {
                continue;
            };
            if slot.position >= ctx.plan.settings.decrypting {
                // Not one of the group's decrypting members: the entry itself is the delivery.
                let done = Instant::now();
                let mut s = stats.borrow_mut();
                if phase == ctx.steady.phase {
                    let planned = ctx.steady.start + offset;
                    s.record(metric::DELIVERY, done.saturating_duration_since(planned));
                    s.count(counter::DELIVERED, 1);
                    s.count(counter::UNDECRYPTED, 1);
                    *received += 1;
                    Progress::tick(&progress.delivered);
                } else {
                    s.count("late from an earlier phase", 1);
                }
                continue;
            }
            planned = Some(offset);
        }
        let Some(group) = slot.group.as_mut() else {
            continue;
        };
        let t = Instant::now();
        let result = group.process(ctx.provider, &e.payload);
        let done = Instant::now();
        match (e.kind, result) {
            (_, Ok(Event::Application { plaintext, .. })) => {
                stats.borrow_mut().record(metric::DECRYPT, done - t);
                match header(&plaintext) {
                    Some((_, offset)) if planned.map(micros) != Some(offset) => {
                        fail(
                            stats,
                            progress,
                            "plaintext differs from its message id".into(),
                        );
                    }
                    Some((phase, offset)) if phase == ctx.steady.phase => {
                        let planned = ctx.steady.start + Duration::from_micros(offset);
                        let mut s = stats.borrow_mut();
                        let latency = done.saturating_duration_since(planned);
                        s.record(metric::DELIVERY, latency);
                        s.record(metric::DELIVERY_DECRYPTED, latency);
                        s.count(counter::DELIVERED, 1);
                        *received += 1;
                        Progress::tick(&progress.delivered);
                    }
                    Some(_) => stats.borrow_mut().count("late from an earlier phase", 1),
                    None => {
                        fail(stats, progress, "foreign plaintext".into());
                    }
                }
            }
            (
                _,
                Ok(Event::Commit {
                    we_were_removed, ..
                }),
            ) => {
                stats.borrow_mut().record(metric::COMMIT_PROCESS, done - t);
                if we_were_removed {
                    slot.sub = None;
                    let inbox = ctx
                        .session
                        .delivery
                        .subscribe_inbox(ctx.inbox_cursor.get())
                        .await
                        .map_err(|e| fail(stats, progress, error_kind("subscribe inbox", &e)))?;
                    *standing = Standing::Out(Instant::now(), inbox);
                    return Ok(());
                }
            }
            (_, Ok(_)) => {}
            (EnvelopeKind::Application, Err(err)) => {
                fail(
                    stats,
                    progress,
                    format!("decrypt: {}", group_error_kind(&err)),
                );
            }
            (_, Err(err)) => {
                let kind = format!("commit processing: {}", group_error_kind(&err));
                fail(stats, progress, kind);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_pads() {
        let p = plaintext(3, 1_234_567, 42, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(header(&p), Some((3, 1_234_567)));
        assert_eq!(header(b"nope"), None);
        assert_eq!(plaintext(0, 0, 0, 1).len(), HEADER_BYTES);
    }

    #[test]
    fn app_message_ids_name_sender_phase_and_number() {
        let id = app_message_id(7, 2, 1_000_001);
        assert_eq!(parse_app_message_id(&id), Some((7, 2, 1_000_001)));
        assert!(is_own(&id, 7) && !is_own(&id, 8));
        assert_eq!(parse_app_message_id(&id[1..]), None);
    }
}
