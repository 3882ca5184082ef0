//! The edge's router: forwards the calls that order a group's log to the group's owner shard
//! and follows the owners' live feeds for the groups local clients subscribe to.
//!
//! It runs on a thread of its own (a current-thread runtime with a `LocalSet`: capnp-rpc is
//! `!Send`), so the edge holds one connection per shard and one upstream subscription per
//! followed group, whatever worker serves the client. Workers reach it through a channel.
//!
//! - **Ring**: every `ring_refresh` the router reads the live shard set and its version from
//!   Postgres; a new version rebuilds the ring, re-homes feeds and forgets suspicions.
//! - **Failover**: a shard whose connection fails is *suspected* for a while: calls and feeds
//!   go to the next shard clockwise, which is exactly where the group lands once the dead
//!   shard's lease expires, so groups move once. A forwarded append that loses its connection
//!   is sent again (to the next owner): its message id makes the repeat harmless.
//! - **Feeds**: one `watch` per group with local subscribers; whenever it is (re)established
//!   local subscribers are told to resync from the log, so an owner change leaves no gap.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use quicproquo_core::IdentityKey;
use quicproquo_proto::errors::{ErrorCode, error};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info, warn};

mod followed;
mod sinks;
mod upstream;

use upstream::{follow_group, follow_inboxes};

use super::link::{Dialer, Link};
use super::ring::Ring;
use crate::model::group::{AppendOutcome, AppendRequest, GroupId};
use crate::obs::Observer;
use crate::obs::calls::InFlight;
use crate::obs::spans::{client_span, record_group, record_outcome, record_server, write_trace};
use crate::ordering::OrderingError;
use crate::ordering::hub::{FeedEvent, Hub};
use crate::ordering::revert::RevertMarker;
use crate::store::AnyStore;
use crate::store::postgres_cluster::{RingSnapshot, ShardRecord};
use crate::wire::codec::{read_outcome, write_request};
use crate::wire::ordering_error_of;

/// Shards tried for one call before giving up.
const ATTEMPTS: usize = 3;

type Reply<T> = oneshot::Sender<Result<T, capnp::Error>>;

/// A forwarded call carries the span of its client side, whose context goes on the wire.
enum Cmd {
    Append(Box<AppendRequest>, Reply<AppendOutcome>, Span),
    /// A new group: its id, creator and the creator's GroupInfo.
    CreateGroup(Box<(GroupId, IdentityKey, Vec<u8>)>, Reply<()>, Span),
    /// A member's commit report: the group, the reporter, the commit's seq and the report.
    Report(
        Box<(GroupId, IdentityKey, u64, Vec<u8>)>,
        Reply<RevertMarker>,
        Span,
    ),
    Watch(GroupId),
}

/// What the router knows of the ring, for operators and readiness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RingStatus {
    /// Whether the shard set has been read at least once.
    pub known: bool,
    /// The ring version last read.
    pub version: u64,
    /// Live shards in that version.
    pub shards: usize,
}

/// How the router reaches and follows shards.
#[derive(Debug)]
pub struct RouterSettings {
    /// How often the shard set is re-read.
    pub ring_refresh: Duration,
    /// Dials shards.
    pub dialer: Dialer,
}

/// Handle to the router thread, shared by the edge's workers.
pub struct Router {
    store: AnyStore,
    hub: Arc<Hub>,
    max_message_bytes: usize,
    cmds: mpsc::UnboundedSender<Cmd>,
    status: Arc<Mutex<RingStatus>>,
    observer: Arc<Observer>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

fn unavailable(detail: impl std::fmt::Display) -> capnp::Error {
    error(ErrorCode::Unavailable, detail)
}

impl Router {
    /// Starts the router thread; it stops when `stop` is cancelled.
    pub fn start(
        store: AnyStore,
        settings: RouterSettings,
        max_message_bytes: usize,
        observer: Arc<Observer>,
        stop: CancellationToken,
    ) -> std::io::Result<(Arc<Self>, JoinHandle<()>)> {
        let (cmds, rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::default());
        let status = Arc::new(Mutex::new(RingStatus::default()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Read the ring once before serving, so an edge that says it is listening can route.
        let first = match &store {
            AnyStore::Postgres(pg) => rt
                .block_on(pg.ring())
                .map_err(|e| std::io::Error::other(format!("reading the shard ring: {e}")))?,
            AnyStore::Embedded(_) => RingSnapshot::default(),
        };
        let (thread_store, thread_hub, thread_status, thread_observer) = (
            store.clone(),
            Arc::clone(&hub),
            Arc::clone(&status),
            Arc::clone(&observer),
        );
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("qpq-router".into())
            .spawn(move || {
                let local = tokio::task::LocalSet::new();
                let state = Rc::new(State::new(
                    thread_store,
                    thread_hub,
                    settings,
                    thread_status,
                    Rc::new(InFlight::new(thread_observer)),
                ));
                local.block_on(&rt, async move {
                    state.apply(first);
                    let _ = ready_tx.send(());
                    run(state, rx, stop).await;
                });
            })?;
        // The ring is in place before any worker can forward a call.
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the router thread failed to start"))?;
        let router = Self {
            store,
            hub,
            max_message_bytes,
            cmds,
            status,
            observer,
        };
        Ok((Arc::new(router), thread))
    }

    /// The store holding the logs (reads are served from it directly).
    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// The edge's live feeds.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The largest message (with its Welcome) accepted.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// The metrics and redaction key this edge reports with.
    pub fn observer(&self) -> &Arc<Observer> {
        &self.observer
    }

    /// The client span of a call forwarded for `group` (child of the current span).
    fn forward_span(&self, method: &'static str, group: &GroupId) -> Span {
        self.observer
            .metrics
            .forwarded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let span = client_span("ShardService", method);
        record_group(&span, &self.observer, group.as_bytes());
        span
    }

    /// What the router knows of the ring.
    pub fn status(&self) -> RingStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A live feed of `group`, followed upstream while anyone here listens.
    pub fn group_feed(&self, group: &GroupId) -> broadcast::Receiver<FeedEvent> {
        let (rx, created) = self.hub.group_feed(group);
        if created {
            let _ = self.cmds.send(Cmd::Watch(group.clone()));
        }
        rx
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, OrderingError> {
        let closed = || OrderingError::Unavailable("the edge is shutting down".into());
        let (tx, rx) = oneshot::channel();
        self.cmds.send(make(tx)).map_err(|_| closed())?;
        rx.await
            .map_err(|_| closed())?
            .map_err(|e| ordering_error_of(&e))
    }

    /// Forwards an append to the group's owner shard.
    pub async fn append(&self, req: AppendRequest) -> Result<AppendOutcome, OrderingError> {
        let span = self.forward_span("append", &req.group_id);
        self.call(|tx| Cmd::Append(Box::new(req), tx, span)).await
    }

    /// Forwards a group creation to the group's owner shard.
    pub async fn create_group(
        &self,
        group: GroupId,
        creator: IdentityKey,
        group_info: Vec<u8>,
    ) -> Result<(), OrderingError> {
        let span = self.forward_span("createGroup", &group);
        self.call(|tx| Cmd::CreateGroup(Box::new((group, creator, group_info)), tx, span))
            .await
    }

    /// Forwards a member's commit report to the group's owner shard.
    pub async fn report_commit(
        &self,
        group: GroupId,
        reporter: IdentityKey,
        seq: u64,
        report: Vec<u8>,
    ) -> Result<RevertMarker, OrderingError> {
        let span = self.forward_span("reportCommit", &group);
        self.call(|tx| Cmd::Report(Box::new((group, reporter, seq, report)), tx, span))
            .await
    }
}

/// The ring as last read.
#[derive(Default)]
struct View {
    version: Option<u64>,
    ring: Ring,
    records: HashMap<String, ShardRecord>,
}

struct State {
    store: AnyStore,
    hub: Arc<Hub>,
    settings: RouterSettings,
    status: Arc<Mutex<RingStatus>>,
    view: RefCell<View>,
    links: RefCell<HashMap<String, Rc<tokio::sync::Mutex<Option<Link>>>>>,
    suspects: RefCell<HashMap<String, Instant>>,
    watches: RefCell<HashMap<GroupId, CancellationToken>>,
    inbox_watches: RefCell<HashMap<String, CancellationToken>>,
    ring_changed: watch::Sender<u64>,
    /// Accounts for the calls shards make on the sinks this edge serves them.
    calls: Rc<InFlight>,
}

impl State {
    fn new(
        store: AnyStore,
        hub: Arc<Hub>,
        settings: RouterSettings,
        status: Arc<Mutex<RingStatus>>,
        calls: Rc<InFlight>,
    ) -> Self {
        Self {
            calls,
            store,
            hub,
            settings,
            status,
            view: RefCell::default(),
            links: RefCell::default(),
            suspects: RefCell::default(),
            watches: RefCell::default(),
            inbox_watches: RefCell::default(),
            ring_changed: watch::channel(0).0,
        }
    }

    /// How long a shard whose connection failed is avoided (unless the ring changes first).
    fn suspect_for(&self) -> Duration {
        (self.settings.ring_refresh * 3).clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    /// How long to wait before trying a shard again after a failure.
    fn retry_delay(&self) -> Duration {
        self.settings
            .ring_refresh
            .clamp(Duration::from_millis(50), Duration::from_millis(500))
    }

    fn suspect(&self, node: &str) {
        debug!(node, "suspecting shard");
        self.suspects
            .borrow_mut()
            .insert(node.to_owned(), Instant::now() + self.suspect_for());
    }

    /// The shard to send `group`'s calls to: its owner, or the next live one clockwise.
    fn pick(&self, group: &[u8]) -> Option<ShardRecord> {
        let now = Instant::now();
        let mut suspects = self.suspects.borrow_mut();
        suspects.retain(|_, until| *until > now);
        let excluded: HashSet<String> = suspects.keys().cloned().collect();
        drop(suspects);
        let view = self.view.borrow();
        let node = view
            .ring
            .owner_excluding(group, &excluded)
            .or_else(|| view.ring.owner(group))?;
        view.records.get(node).cloned()
    }

    /// The pooled connection to `rec`, dialing it if needed.
    async fn link(&self, rec: &ShardRecord) -> Result<Link, capnp::Error> {
        let slot = Rc::clone(
            self.links
                .borrow_mut()
                .entry(rec.node_id.clone())
                .or_default(),
        );
        let mut guard = slot.lock().await;
        if let Some(link) = guard.as_ref()
            && !link.is_closed()
        {
            return Ok(link.clone());
        }
        match self
            .settings
            .dialer
            .dial(&rec.node_id, &rec.address, &rec.noise_key)
            .await
        {
            Ok(link) => {
                *guard = Some(link.clone());
                Ok(link)
            }
            Err(e) => {
                self.suspect(&rec.node_id);
                Err(unavailable(e))
            }
        }
    }

    /// Runs `call` against the group's owner, moving to the next shard when one is
    /// unreachable or its connection breaks mid-call.
    async fn forward<T, F, Fut>(&self, group: &GroupId, call: F) -> Result<T, capnp::Error>
    where
        F: Fn(Link) -> Fut,
        Fut: Future<Output = Result<T, capnp::Error>>,
    {
        let mut last = String::from("no Delivery Service shard is alive");
        for _ in 0..ATTEMPTS {
            let Some(rec) = self.pick(group.as_bytes()) else {
                break;
            };
            // The forwarded call's span names the shard last tried.
            record_server(&Span::current(), &rec.address);
            let link = match self.link(&rec).await {
                Ok(link) => link,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            match call(link.clone()).await {
                Err(e) if e.kind == capnp::ErrorKind::Disconnected => {
                    self.suspect(&rec.node_id);
                    link.close();
                    last = e.to_string();
                }
                other => return other,
            }
        }
        Err(unavailable(last))
    }

    fn apply(self: &Rc<Self>, snapshot: RingSnapshot) {
        let mut view = self.view.borrow_mut();
        if view.version == Some(snapshot.version) {
            return;
        }
        let records: HashMap<String, ShardRecord> = snapshot
            .shards
            .into_iter()
            .map(|r| (r.node_id.clone(), r))
            .collect();
        // Links and inbox feeds of shards that left, or moved to another address or key, end.
        let same = |node: &String| {
            records
                .get(node)
                .zip(view.records.get(node))
                .is_some_and(|(new, old)| {
                    old.address == new.address && old.noise_key == new.noise_key
                })
        };
        self.links.borrow_mut().retain(|node, slot| {
            let keep = same(node);
            if !keep
                && let Ok(guard) = slot.try_lock()
                && let Some(link) = guard.as_ref()
            {
                link.close();
            }
            keep
        });
        let mut inbox_watches = self.inbox_watches.borrow_mut();
        inbox_watches.retain(|node, stop| {
            let keep = same(node);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for rec in records.values() {
            if !inbox_watches.contains_key(&rec.node_id) {
                let stop = CancellationToken::new();
                inbox_watches.insert(rec.node_id.clone(), stop.clone());
                tokio::task::spawn_local(follow_inboxes(Rc::clone(self), rec.clone(), stop));
            }
        }
        drop(inbox_watches);
        info!(
            version = snapshot.version,
            shards = records.len(),
            "ring changed"
        );
        view.ring = Ring::new(records.keys());
        view.version = Some(snapshot.version);
        view.records = records;
        let shards = view.records.len();
        drop(view);
        self.suspects.borrow_mut().clear();
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = RingStatus {
            known: true,
            version: snapshot.version,
            shards,
        };
        self.ring_changed.send_replace(snapshot.version);
    }

    /// Stops following groups nobody here subscribes to any more.
    fn sweep(&self) {
        let unused = self.hub.sweep_unused_groups();
        let mut watches = self.watches.borrow_mut();
        for g in unused {
            if let Some(stop) = watches.remove(&g) {
                stop.cancel();
            }
        }
    }
}

async fn run(state: Rc<State>, mut rx: mpsc::UnboundedReceiver<Cmd>, stop: CancellationToken) {
    tokio::task::spawn_local(refresh(Rc::clone(&state), stop.clone()));
    loop {
        let cmd = tokio::select! {
            () = stop.cancelled() => break,
            cmd = rx.recv() => match cmd {
                Some(cmd) => cmd,
                None => break,
            },
        };
        match cmd {
            Cmd::Append(req, reply, span) => {
                let state = Rc::clone(&state);
                spawn_forward(span, reply, async move {
                    let req = &*req;
                    let span = &Span::current();
                    state
                        .forward(&req.group_id, |link| async move {
                            let mut call = link.client.append_request();
                            write_trace(call.get().init_trace(), span);
                            write_request(call.get().init_request(), req);
                            let response = call.send().promise.await?;
                            read_outcome(response.get()?.get_result()?)
                        })
                        .await
                });
            }
            Cmd::CreateGroup(created, reply, span) => {
                let state = Rc::clone(&state);
                spawn_forward(span, reply, async move {
                    let (group, creator, group_info) = &*created;
                    let (g, c, info) = (group, creator, group_info);
                    let span = &Span::current();
                    state
                        .forward(g, |link| async move {
                            let mut call = link.client.create_group_request();
                            write_trace(call.get().init_trace(), span);
                            call.get().set_group_id(g.as_bytes());
                            call.get().set_creator(c.as_bytes());
                            call.get().set_group_info(info);
                            call.send().promise.await.map(drop)
                        })
                        .await
                });
            }
            Cmd::Report(report, reply, span) => {
                let state = Rc::clone(&state);
                spawn_forward(span, reply, async move {
                    let (group, reporter, seq, bytes) = &*report;
                    let (g, who, seq, bytes) = (group, reporter, *seq, bytes);
                    let span = &Span::current();
                    state
                        .forward(g, |link| async move {
                            let mut call = link.client.report_commit_request();
                            write_trace(call.get().init_trace(), span);
                            call.get().set_group_id(g.as_bytes());
                            call.get().set_reporter(who.as_bytes());
                            call.get().set_seq(seq);
                            call.get().set_report(bytes);
                            let response = call.send().promise.await?;
                            let r = response.get()?;
                            Ok(RevertMarker {
                                seq: r.get_revert_seq(),
                                epoch: r.get_epoch(),
                            })
                        })
                        .await
                });
            }
            Cmd::Watch(group) => {
                let mut watches = state.watches.borrow_mut();
                if !watches.contains_key(&group) {
                    let stop = CancellationToken::new();
                    watches.insert(group.clone(), stop.clone());
                    tokio::task::spawn_local(follow_group(Rc::clone(&state), group, stop));
                }
            }
        }
    }
    for stop in state.watches.borrow().values() {
        stop.cancel();
    }
    for stop in state.inbox_watches.borrow().values() {
        stop.cancel();
    }
}

/// Runs a forwarded call on a task of its own inside its client span `span`, and ends the
/// span before the answer goes back: the caller's span, its parent, must end after it.
fn spawn_forward<T: 'static>(
    span: Span,
    reply: Reply<T>,
    call: impl Future<Output = Result<T, capnp::Error>> + 'static,
) {
    tokio::task::spawn_local(async move {
        let result = call.instrument(span.clone()).await;
        record_outcome(&span, &result);
        drop(span);
        let _ = reply.send(result);
    });
}

/// Re-reads the shard set every `ring_refresh` (an edge without Postgres has no shards).
async fn refresh(state: Rc<State>, stop: CancellationToken) {
    loop {
        match &state.store {
            AnyStore::Postgres(pg) => match pg.ring().await {
                Ok(snapshot) => state.apply(snapshot),
                Err(e) => warn!(error = %e, "cannot read the shard ring"),
            },
            AnyStore::Embedded(_) => state.apply(RingSnapshot::default()),
        }
        state.sweep();
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(state.settings.ring_refresh) => {}
        }
    }
}
