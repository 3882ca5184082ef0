//! The public views of the groups this node orders (ADR 0012): every commit and proposal is
//! verified against its group's view before it is appended, and the membership change, the
//! Welcome's recipients and the new view are derived from the verified message.
//!
//! A group's view lives in the store as snapshots and the verified handshake messages after
//! them (ADR 0018: written at creation and with each verified handshake message, in the
//! append transaction; a snapshot at every 16th commit) and is cached here, in the owner's
//! memory. Loading it decodes the latest snapshot and replays the messages after it. Handshake
//! messages of one group are verified and appended one at a time (a per-group lock held from
//! verification until the append's outcome), so the cached view is always the one the next
//! message is judged against. A view at another epoch than a message's is reloaded from the
//! store first: another shard may have appended to the group (it took the group over, or both
//! believed they owned it), or reverted a commit (ADR 0015); the store's epoch check still decides which of two verified commits wins, and the
//! loser's view is dropped and reloaded.
//!
//! Verification runs on the bounded CPU pool, never on a connection's worker thread.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use quicproquo_core::IdentityKey;
use quicproquo_core::group::public::{PublicView, Verified, ViewError};
use tracing::warn;

use super::OrderingError;
use crate::model::group::{
    AppendOutcome, AppendRequest, CommitChange, EntryKind, GroupId, MAX_CHANGE, StoredView,
    ViewWrite,
};
use crate::obs::Observer;
use crate::pool::CpuPool;
use crate::store::AnyStore;
use crate::store::log::LogStore;

/// Default of the most group views cached (`max_cached_group_views`); past it, idle ones are
/// dropped (and reloaded when next needed).
pub const DEFAULT_CACHED_VIEWS: usize = 256;

/// One group's cached view; its lock serialises the group's handshake messages on this node.
#[derive(Default)]
pub(crate) struct Slot {
    view: Option<PublicView>,
}

/// The cached views of a node's groups, and the pool they are verified on.
pub struct Views {
    store: AnyStore,
    pool: CpuPool,
    observer: Arc<Observer>,
    max_cached: usize,
    slots: Mutex<HashMap<GroupId, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl std::fmt::Debug for Views {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Views").finish_non_exhaustive()
    }
}

/// What verifying a handshake message decided.
pub(crate) enum Checked {
    /// Hand it to the store unverified and marked so: it is for a past epoch (a retry, or a
    /// loser of a race), which the store recognises as a duplicate or refuses, never appends.
    PassThrough(AppendRequest),
    /// Verified: append it with its derived change and view.
    Verified(AppendRequest),
    /// Decided without appending (the sender is no member).
    Outcome(AppendOutcome),
}

impl Views {
    /// No view cached yet; at most `max_cached` idle ones will be.
    pub fn new(store: AnyStore, pool: CpuPool, observer: Arc<Observer>, max_cached: usize) -> Self {
        Self {
            store,
            pool,
            observer,
            max_cached,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The lock of `group`'s slot (created if needed; idle slots are dropped past
    /// `max_cached`).
    pub(crate) fn slot(&self, group: &GroupId) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get(group) {
            return Arc::clone(slot);
        }
        if slots.len() >= self.max_cached {
            // Only slots nobody holds or waits for (their lock is free) are dropped.
            slots.retain(|_, slot| Arc::strong_count(slot) > 1 || slot.try_lock().is_err());
        }
        let slot = Arc::new(tokio::sync::Mutex::new(Slot::default()));
        slots.insert(group.clone(), Arc::clone(&slot));
        slot
    }

    /// How many group views are cached.
    pub fn cached(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .values()
            .filter(|s| s.try_lock().is_ok_and(|s| s.view.is_some()))
            .count()
    }

    /// Builds the view of a new group from its creator's GroupInfo (on the pool); returns what
    /// the store keeps with the group.
    pub async fn create(
        &self,
        group: &GroupId,
        creator: &IdentityKey,
        group_info: Vec<u8>,
    ) -> Result<StoredView, OrderingError> {
        let (id, who) = (group.as_bytes().to_vec(), *creator);
        let built = self
            .pool
            .run(move || {
                PublicView::create(&group_info, &id, &who).map(|(_, state)| StoredView {
                    epoch: 0,
                    state,
                    proposals: Vec::new(),
                    group_info,
                    tail: Vec::new(),
                })
            })
            .await
            .map_err(pool_error)?;
        built.map_err(|e| {
            self.refused(group, creator, "createGroup", &e);
            OrderingError::BadCommit(e)
        })
    }

    /// Verifies the handshake message `req` against the group's view (loading it if needed),
    /// with the slot's lock held by the caller. On success the slot holds the view as it will
    /// be once the message is appended: the caller must [`settle`](Self::settle) the slot with
    /// the append's outcome.
    pub(crate) async fn check(
        &self,
        slot: &mut Slot,
        mut req: AppendRequest,
    ) -> Result<Checked, OrderingError> {
        // A cached view at another epoch than the message's is reloaded: a later message means
        // another shard appended; an earlier one may mean a revert (ADR 0015) moved the group
        // back since this view was cached (on another shard), so only the stored view says
        // whether the message is for a past epoch.
        let stale = slot.view.as_ref().is_none_or(|v| v.epoch() != req.epoch);
        if stale {
            slot.view = None;
            let Some(stored) = self.store.load_view(&req.group_id).await? else {
                return Err(OrderingError::Refused {
                    code: quicproquo_proto::errors::ErrorCode::UnknownGroup,
                    message: "no such group (or the group has no public view)".into(),
                });
            };
            let metrics = &self.observer.metrics;
            metrics.view_loads.fetch_add(1, Ordering::Relaxed);
            metrics
                .view_replayed
                .fetch_add(stored.tail.len() as u64, Ordering::Relaxed);
            let loaded = self
                .pool
                .run(move || {
                    let mut view = PublicView::load(&stored.state, &stored.proposals)?;
                    for message in &stored.tail {
                        view.replay(message)?;
                    }
                    Ok(view)
                })
                .await
                .map_err(pool_error)?;
            // A stored view that does not restore is the store's fault, not the sender's: an
            // internal error (logged), not a `bad_commit` refusal.
            let loaded = loaded.map_err(|e: ViewError| {
                OrderingError::Store(crate::store::StoreError::Corrupt(format!(
                    "group view: {e}"
                )))
            })?;
            slot.view = Some(loaded);
        }
        let Some(view) = slot.view.take() else {
            return Err(OrderingError::Unavailable("group view missing".into()));
        };
        let epoch = view.epoch();
        if req.epoch < epoch {
            slot.view = Some(view);
            req.view = Some(ViewWrite {
                unverified: true,
                ..ViewWrite::default()
            });
            return Ok(Checked::PassThrough(req));
        }
        let sender = req.sender;
        let payload = std::mem::take(&mut req.payload);
        let change = req.commit.take().unwrap_or_default();
        let kind = req.kind;
        let (view, payload, result) = self
            .pool
            .run(move || {
                let started = Instant::now();
                let mut view = view;
                let result = verify(&mut view, &sender, kind, &payload, change);
                // A view that failed after it started merging is dropped (and reloaded).
                let keep = !matches!(result, Err((_, true)));
                // A refused sender that is no member is told so, as the store would.
                let result = result.map_err(|(e, _)| (e, view.members().contains(&sender)));
                (keep.then_some(view), payload, (result, started.elapsed()))
            })
            .await
            .map_err(pool_error)?;
        let (result, took) = result;
        self.observer.metrics.verify_seconds.observe_duration(took);
        req.payload = payload;
        slot.view = view;
        match result {
            Ok((change, write)) => {
                req.commit = change;
                req.view = Some(write);
                Ok(Checked::Verified(req))
            }
            Err((e, member)) => {
                if !member {
                    return Ok(Checked::Outcome(AppendOutcome::NotMember));
                }
                self.refused(&req.group_id, &req.sender, kind_name(req.kind), &e);
                Err(OrderingError::BadCommit(e))
            }
        }
    }

    /// Keeps the slot's view if the verified message was appended; otherwise drops it, to be
    /// reloaded from the store (which did not move).
    pub(crate) fn settle(slot: &mut Slot, outcome: &Result<AppendOutcome, OrderingError>) {
        if !matches!(outcome, Ok(AppendOutcome::Appended { .. })) {
            slot.view = None;
        }
    }

    /// Drops the slot's cached view (a revert replaced it in the store): it is reloaded when
    /// next needed.
    pub(crate) fn forget(&self, slot: &mut Slot) {
        slot.view = None;
    }

    /// Logs a refusal: the rule, the group and the caller as keyed hashes, never content.
    fn refused(&self, group: &GroupId, who: &IdentityKey, what: &str, e: &ViewError) {
        let redactor = &self.observer.redactor;
        warn!(
            qpq.group = %redactor.hash(group.as_bytes()),
            qpq.identity = %redactor.hash(who.as_bytes()),
            rule = e.rule(),
            message = what,
            error = %e,
            "handshake message refused by the group's public view"
        );
        self.observer.metrics.commit_refused(e.rule());
    }
}

fn kind_name(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::Commit => "commit",
        EntryKind::Proposal => "proposal",
        EntryKind::Application => "application",
        EntryKind::Revert => "revert",
    }
}

fn pool_error(e: crate::pool::PoolError) -> OrderingError {
    OrderingError::Unavailable(format!("verification did not run: {e}"))
}

/// A verification error, and whether the view had already started merging (and must be
/// dropped).
type Failed = (ViewError, bool);

/// Verifies one handshake message and moves `view` to its state after it: the derived
/// membership change (commits) and the view to write.
fn verify(
    view: &mut PublicView,
    sender: &IdentityKey,
    kind: EntryKind,
    payload: &[u8],
    uploaded: CommitChange,
) -> Result<(Option<CommitChange>, ViewWrite), Failed> {
    let early = |e| (e, false);
    let verified = view.stage(sender, payload).map_err(early)?;
    match (kind, verified) {
        (EntryKind::Commit, Verified::Commit(staged)) => {
            if staged.added.len() > MAX_CHANGE || staged.removed.len() > MAX_CHANGE {
                return Err(early(ViewError::Policy(format!(
                    "a commit adds or removes at most {MAX_CHANGE} members"
                ))));
            }
            view.check_welcome(&staged, uploaded.welcome.as_deref())
                .map_err(early)?;
            let group_info = uploaded.group_info.ok_or(early(ViewError::GroupInfo(
                "a commit must carry the new GroupInfo",
            )))?;
            let change = CommitChange {
                added: staged.added.clone(),
                removed: staged.removed.clone(),
                welcome: uploaded.welcome,
                group_info: None,
            };
            let merged = view.merge(*staged, &group_info).map_err(|e| (e, true))?;
            Ok((
                Some(change),
                ViewWrite {
                    epoch: view.epoch(),
                    state: merged.state,
                    proposals: view.proposals(),
                    group_info: Some(group_info),
                    unverified: false,
                },
            ))
        }
        (EntryKind::Proposal, Verified::Proposal(proposal)) => {
            if uploaded.welcome.is_some() || uploaded.group_info.is_some() {
                return Err(early(ViewError::Policy(
                    "a proposal carries no Welcome or GroupInfo".into(),
                )));
            }
            view.queue(*proposal).map_err(|e| (e, true))?;
            Ok((
                None,
                ViewWrite {
                    epoch: view.epoch(),
                    state: None,
                    proposals: Vec::new(),
                    group_info: None,
                    unverified: false,
                },
            ))
        }
        _ => Err(early(ViewError::NotHandshake)),
    }
}
