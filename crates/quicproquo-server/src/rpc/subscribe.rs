//! Live subscriptions: push a group's entries (or an inbox's Welcomes) to the subscriber.
//!
//! Each subscription is a local task that first catches up from the store, then follows the
//! shard's live feed. Each catch-up runs in a span of its own linked to the subscribe call,
//! holding its store reads and pushes; each live push is a span linked to the appends (and,
//! on an edge, the receptions) of the entries it carries. Entries from the feed are delivered
//! directly while they continue the sequence. A commit carries its membership effect (who it
//! removed, derived once by the owner): the others follow on, and a removed member gets the
//! commit and its subscription ends once it has answered that push. A gap, a lagging receiver
//! or a commit whose effect is not known sends the task back to the store, which enforces the
//! subscriber's read window. Pushes are pages by count and bytes, and flow control is a window
//! of pushes in flight per subscriber released by its answers ([`super::push`]): a subscriber
//! that stops answering holds its window and nothing more, and reads the store once it
//! answers again. A frame subscription ([`super::frames`], ADR 0019) follows the same rules
//! with push frames instead of calls: each entry goes as soon as its window (bytes not yet
//! acknowledged) admits it, encoded once per node, and it ends with an `ended` frame.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use quicproquo_core::IdentityKey;
use quicproquo_proto::delivery_capnp::{inbox_stream, message_stream, subscription};
use quicproquo_telemetry::propagation::LinkContext;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, Span, debug};

use super::backend::Backend;
use super::frames::{self, Registration};
use super::push::{EAGER_ENTRIES, Window};
use crate::model::group::{EntryKind, GroupId, LogEntry};
use crate::model::page::{Page, entry_size};
use crate::obs::Observer;
use crate::obs::calls::InFlight;
use crate::obs::spans::{
    PushTarget, StoreOutcome as _, catch_up_span, push_span, record_error, record_group,
    record_outcome,
};
use crate::ordering::hub::{FeedEvent, Published};
use crate::store::StoreError;
use crate::store::log::LogStore;
use crate::wire::codec::{write_envelope, write_welcome};

/// Entries read from the store per catch-up step, and delivered per call at most.
const BATCH: u32 = 256;

/// The capability handed to the subscriber; dropping it (or calling `close`) ends the task.
struct SubscriptionImpl {
    task: AbortOnDropHandle<()>,
    in_flight: Rc<InFlight>,
}

impl subscription::Server for SubscriptionImpl {
    async fn close(
        self: Rc<Self>,
        _: subscription::CloseParams,
        _: subscription::CloseResults,
    ) -> Result<(), capnp::Error> {
        serve!(self.in_flight, "Subscription", "close", async move {
            self.task.abort();
            Ok(())
        })
    }
}

/// Runs `task` as a local task until it ends or the returned capability is dropped or closed
/// (which abort it: the task is woken once per entry pushed, and a cancellation future polled
/// beside it would take a lock at each of those wake-ups); the capability's own calls are
/// accounted on `in_flight` (the connection that subscribed).
pub(super) fn spawn<F>(in_flight: &Rc<InFlight>, task: F) -> subscription::Client
where
    F: Future<Output = ()> + 'static,
{
    // The connection counts as in use while the subscription lives (no idle timeout).
    let held = in_flight.hold_subscription();
    let task = tokio::task::spawn_local(async move {
        let _held = held;
        task.await;
    });
    capnp_rpc::new_client(SubscriptionImpl {
        task: AbortOnDropHandle::new(task),
        in_flight: Rc::clone(in_flight),
    })
}

/// Subscribes `reader` to `group` after `after_seq`, pushing pages of at most `page_bytes`
/// (call it inside the subscribe call's span: the subscription's catch-ups link to it).
pub(super) fn group(
    in_flight: &Rc<InFlight>,
    backend: Backend,
    reader: IdentityKey,
    group: GroupId,
    after_seq: u64,
    stream: message_stream::Client,
    page_bytes: usize,
) -> subscription::Client {
    follow(
        in_flight,
        backend,
        (reader, group, after_seq),
        Sink::Calls(stream),
        page_bytes,
    )
}

/// Subscribes `reader` to `group` after `after_seq` with push frames on its connection
/// (`registration`), at most `window_bytes` of them unacknowledged; ends with an `ended`
/// frame (call it inside the subscribe call's span).
pub(super) fn group_frames(
    in_flight: &Rc<InFlight>,
    backend: Backend,
    reader: IdentityKey,
    group: GroupId,
    after_seq: u64,
    registration: Registration,
    window_bytes: usize,
) -> subscription::Client {
    follow(
        in_flight,
        backend,
        (reader, group, after_seq),
        Sink::Frames(registration),
        window_bytes,
    )
}

/// Runs a group subscription (`reader`, `group`, after `after_seq`) into `sink`, pushing pages
/// of at most `page_bytes`; a frame subscription ends with an `ended` frame.
fn follow(
    in_flight: &Rc<InFlight>,
    backend: Backend,
    (reader, group, after_seq): (IdentityKey, GroupId, u64),
    sink: Sink,
    page_bytes: usize,
) -> subscription::Client {
    let subscribed = LinkContext::of(&Span::current());
    spawn(in_flight, async move {
        let sub = Follow {
            backend: &backend,
            reader,
            group: &group,
            sink: &sink,
            subscribed: subscribed.as_ref(),
            page: Page::new(BATCH, page_bytes),
        };
        if let Err(e) = sub.run(after_seq).await {
            debug!(error = %e, "group subscription ended");
        }
        // A frame subscription's registration sends its `ended` frame as it drops.
    })
}

/// Where a group subscription's entries go.
enum Sink {
    /// `MessageStream.deliver` calls, each answered.
    Calls(message_stream::Client),
    /// Push frames beside RPC on the subscriber's connection, acknowledged by sequence number.
    Frames(Registration),
}

impl Sink {
    /// The window of pushes in flight for this sink, of at most `max_bytes`.
    fn window(&self, max_bytes: usize) -> Window {
        match self {
            Self::Calls(_) => Window::new(max_bytes),
            Self::Frames(r) => Window::frames(max_bytes, Rc::clone(&r.acked), r.port.clone()),
        }
    }
}

/// An entry a push carries: read from the store, or taken from the live feed (whose frame is
/// encoded once for every subscriber on the node).
trait Pushed {
    fn entry(&self) -> &LogEntry;
    fn frame(&self, group: &GroupId) -> Arc<[u8]>;
}

impl Pushed for LogEntry {
    fn entry(&self) -> &LogEntry {
        self
    }

    fn frame(&self, group: &GroupId) -> Arc<[u8]> {
        frames::entry_frame(group, self)
    }
}

impl Pushed for Arc<Published> {
    fn entry(&self) -> &LogEntry {
        &self.entry
    }

    fn frame(&self, group: &GroupId) -> Arc<[u8]> {
        self.encoded(|e| frames::entry_frame(group, e))
    }
}

#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("subscriber gone: {0}")]
    Rpc(#[from] capnp::Error),
    #[error("the shard's feed closed")]
    FeedClosed,
    #[error("the subscriber's connection closed")]
    Closed,
}

/// Sends `entries` to the subscriber in one push inside a push span (a child of `parent`, a
/// catch-up, or a trace of its own linked to `links`, the appends and receptions of the
/// entries that were traced), accounted on `window` until the subscriber answers (a call) or
/// acknowledges it (frames).
fn deliver<'a, P: Pushed + 'a>(
    sink: &Sink,
    observer: &Observer,
    group: &GroupId,
    entries: &[P],
    parent: Option<&Span>,
    links: impl Iterator<Item = Option<&'a LinkContext>>,
    window: &mut Window,
) -> Result<(), FollowError> {
    let count = entries.len();
    let target = match sink {
        Sink::Calls(_) => PushTarget::Client,
        Sink::Frames(_) => PushTarget::Frames,
    };
    let span = push_span(target, count, parent, links);
    record_group(&span, observer, group.as_bytes());
    match sink {
        Sink::Calls(stream) => {
            let mut req = stream.deliver_request();
            let mut bytes = 0;
            {
                let mut p = req.get();
                p.set_group_id(group.as_bytes());
                let mut list = p.init_entries(count as u32);
                for (i, e) in entries.iter().enumerate() {
                    bytes += entry_size(e.entry());
                    write_envelope(list.reborrow().get(i as u32), group, e.entry());
                }
            }
            let answer = req.send().promise;
            window.sent(bytes, async move {
                let result = answer.instrument(span.clone()).await;
                record_outcome(&span, &result);
                result.map(drop)
            });
        }
        Sink::Frames(registration) => {
            let mut bytes = 0;
            for e in entries {
                let frame = e.frame(group);
                bytes += frame.len();
                registration
                    .port
                    .push(frame)
                    .map_err(|_| FollowError::Closed)?;
            }
            if let Some(last) = entries.last() {
                window.sent_frames(last.entry().seq, bytes);
            }
        }
    }
    observer.metrics.fanout(count);
    Ok(())
}

/// How long a subscriber's window may stay full before its subscription stops holding the
/// group's live feed (it reads the store once it answers again).
const STALLED_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// One group subscription: who reads what, and where it goes.
struct Follow<'a> {
    backend: &'a Backend,
    reader: IdentityKey,
    group: &'a GroupId,
    sink: &'a Sink,
    /// The subscribe call, which each catch-up links to.
    subscribed: Option<&'a LinkContext>,
    /// The most one push carries: entries and bytes (one entry always fits).
    page: Page,
}

impl Follow<'_> {
    /// Delivers everything after `after_seq`, then follows the live feed until the subscriber
    /// goes or is removed.
    async fn run(&self, after_seq: u64) -> Result<(), FollowError> {
        // Subscribe to the live feed before reading the store, so nothing falls in between.
        let mut feed = self.backend.group_feed(self.group);
        let mut window = self.sink.window(self.page.bytes);
        let mut next = after_seq.saturating_add(1);
        loop {
            let read_on = match self.catch_up(next, &mut window, &mut feed).await? {
                Some(caught_up) => self.live(&mut feed, caught_up, &mut window).await?,
                None => None,
            };
            let Some(at) = read_on else {
                // Removed: everything it may read is sent; end once it has received it (the
                // answers to the calls; frames are followed by the `ended` frame).
                if let Sink::Calls(_) = self.sink {
                    window.drain().await?;
                }
                return Ok(());
            };
            next = at;
        }
    }

    /// Catches up from the store (which enforces the read window) from `next`, inside a
    /// catch-up span; the next sequence number to deliver, or `None` once the subscriber was
    /// removed (everything it may read has been sent).
    async fn catch_up(
        &self,
        next: u64,
        window: &mut Window,
        feed: &mut tokio::sync::broadcast::Receiver<FeedEvent>,
    ) -> Result<Option<u64>, FollowError> {
        let observer = self.backend.observer();
        let _reading = observer.metrics.catching_up();
        let span = catch_up_span("group", self.subscribed);
        record_group(&span, observer, self.group.as_bytes());
        let result = self
            .read_and_push(next, &span, window, feed)
            .instrument(span.clone())
            .await;
        if let Err(FollowError::Store(e)) = &result
            && e.is_fault()
        {
            record_error(&span, e.outcome());
        }
        result
    }

    async fn read_and_push(
        &self,
        mut next: u64,
        span: &Span,
        window: &mut Window,
        feed: &mut tokio::sync::broadcast::Receiver<FeedEvent>,
    ) -> Result<Option<u64>, FollowError> {
        let store = self.backend.store();
        let observer = self.backend.observer();
        loop {
            // Read no page the window could not send: a subscriber that stopped answering
            // makes this wait, holding nothing but its window (and, once it is stalled,
            // nothing of the feed).
            while window.is_full() {
                self.answer_or_let_go(window, feed).await?;
            }
            let entries = store
                .read_log(self.group, &self.reader, next - 1, self.page)
                .await?;
            let Some(last) = entries.last() else {
                return Ok(Some(next));
            };
            next = last.seq + 1;
            let had_commit = entries.iter().any(|e| e.kind == EntryKind::Commit);
            let bytes = entries.iter().map(entry_size).sum();
            while !window.admits(bytes) {
                self.answer_or_let_go(window, feed).await?;
            }
            let links = std::iter::empty();
            deliver(
                self.sink,
                observer,
                self.group,
                &entries,
                Some(span),
                links,
                window,
            )?;
            if had_commit && store.check_member(self.group, &self.reader).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// Waits for the subscriber's next answer. If none comes within [`STALLED_AFTER`], the
    /// subscription first lets go of the group's feed (a fresh receiver at its tail: the
    /// entries the subscriber has not taken are released for the others) and returns `true`:
    /// what it missed is read from the store.
    async fn answer_or_let_go(
        &self,
        window: &mut Window,
        feed: &mut tokio::sync::broadcast::Receiver<FeedEvent>,
    ) -> Result<bool, FollowError> {
        if let Ok(answered) = tokio::time::timeout(STALLED_AFTER, window.progress()).await {
            answered?;
            return Ok(false);
        }
        *feed = feed.resubscribe();
        let metrics = &self.backend.observer().metrics;
        metrics.feed_releases.fetch_add(1, Ordering::Relaxed);
        window.progress().await?;
        Ok(true)
    }

    /// Follows the live feed from `next` while it continues the sequence; the next sequence
    /// number once the store must be read again (a gap, a lag, a commit whose effect is not
    /// known), or `None` once the commit that removed the subscriber is pushed. While pushes are
    /// unanswered the task waits for an answer only (no wake-up per new entry); new entries
    /// wait in the feed and go together in the next push, so a busy group makes fewer, larger
    /// pushes and an idle subscriber gets each entry at once. A page of [`EAGER_ENTRIES`] goes
    /// without waiting for the answers, within the window. A subscriber whose window stays
    /// full takes nothing more from the feed; after [`STALLED_AFTER`] it lets go of the feed
    /// (holding none of its entries) and reads the store once it answers.
    async fn live(
        &self,
        feed: &mut tokio::sync::broadcast::Receiver<FeedEvent>,
        mut next: u64,
        window: &mut Window,
    ) -> Result<Option<u64>, FollowError> {
        let observer = self.backend.observer();
        let mut pending = Pending::default();
        loop {
            // Take what the feed already holds, without waiting (nothing after a removal).
            while !pending.removed && !pending.is_full(self.page) {
                match feed.try_recv() {
                    Ok(FeedEvent::Entry(e)) => {
                        if !pending.take(e, next, self.page, &self.reader) {
                            return Ok(Some(next));
                        }
                    }
                    // What is pending is read again from the store.
                    Ok(FeedEvent::Resync) | Err(TryRecvError::Lagged(_)) => {
                        return Ok(Some(next));
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => return Err(FollowError::FeedClosed),
                }
            }
            if pending.removed && pending.entries.is_empty() {
                return Ok(None);
            }
            if !pending.entries.is_empty()
                && window.admits(pending.bytes)
                && (matches!(self.sink, Sink::Frames(_))
                    || window.is_idle()
                    || pending.removed
                    || pending.is_full(self.page)
                    || pending.entries.len() >= EAGER_ENTRIES)
            {
                let links = pending.entries.iter().map(|e| e.origin.as_ref());
                deliver(
                    self.sink,
                    observer,
                    self.group,
                    &pending.entries,
                    None,
                    links,
                    window,
                )?;
                next += pending.entries.len() as u64;
                pending.sent();
                continue;
            }
            // A frame subscription waits for acknowledgements only when its window refuses
            // what is pending (its subscriber acknowledges at its own pace).
            let frames = matches!(self.sink, Sink::Frames(_));
            let waits = !(frames && pending.entries.is_empty());
            if waits && !window.is_idle() {
                if self.answer_or_let_go(window, feed).await? {
                    // What is pending is read again from the store.
                    return Ok(Some(next));
                }
                continue;
            }
            match feed.recv().await {
                Ok(FeedEvent::Entry(e)) => {
                    if !pending.take(e, next, self.page, &self.reader) {
                        return Ok(Some(next));
                    }
                }
                Ok(FeedEvent::Resync) | Err(RecvError::Lagged(_)) => return Ok(Some(next)),
                Err(RecvError::Closed) => return Err(FollowError::FeedClosed),
            }
        }
    }
}

/// Entries taken from the live feed, waiting for their push.
#[derive(Default)]
struct Pending {
    entries: Vec<Arc<Published>>,
    bytes: usize,
    /// An entry that did not fit on the page: it starts the next one.
    carry: Option<Arc<Published>>,
    /// The subscriber was removed by a commit taken: nothing after it is taken, and the
    /// subscription ends once what is pending is pushed.
    removed: bool,
}

impl Pending {
    fn is_full(&self, page: Page) -> bool {
        self.carry.is_some() || self.entries.len() >= page.entries as usize
    }

    /// Takes `e` (the subscriber's next entry is `next`); `false` when the store must decide
    /// what follows: a gap, or a commit whose effect on `reader` is not known. A commit that
    /// removed `reader` is taken as its last entry. Entries already taken are skipped.
    fn take(&mut self, e: Arc<Published>, next: u64, page: Page, reader: &IdentityKey) -> bool {
        let expected = next + self.entries.len() as u64 + u64::from(self.carry.is_some());
        if e.seq < expected {
            return true;
        }
        if e.seq > expected {
            return false;
        }
        if e.kind == EntryKind::Commit {
            match &e.removed {
                None => return false,
                Some(removed) => self.removed = removed.contains(reader),
            }
        }
        let size = entry_size(&e);
        if page.admits(self.entries.len(), self.bytes, size) {
            self.bytes += size;
            self.entries.push(e);
        } else {
            self.carry = Some(e);
        }
        true
    }

    /// Forgets the entries just pushed; the carried one starts the next page.
    fn sent(&mut self) {
        self.entries.clear();
        self.bytes = 0;
        if let Some(e) = self.carry.take() {
            self.bytes = entry_size(&e);
            self.entries.push(e);
        }
    }
}

/// Subscribes `identity` to its own inbox after `after_seq`, pushing pages of at most
/// `page_bytes` (call it inside the subscribe call's span: the subscription's catch-ups link
/// to it).
pub(super) fn inbox(
    in_flight: &Rc<InFlight>,
    backend: Backend,
    identity: IdentityKey,
    after_seq: u64,
    stream: inbox_stream::Client,
    page_bytes: usize,
) -> subscription::Client {
    let subscribed = LinkContext::of(&Span::current());
    spawn(in_flight, async move {
        let sub = FollowInbox {
            backend: &backend,
            identity,
            stream: &stream,
            subscribed: subscribed.as_ref(),
            page: Page::new(BATCH, page_bytes),
        };
        if let Err(e) = sub.run(after_seq).await {
            debug!(error = %e, "inbox subscription ended");
        }
    })
}

/// One inbox subscription.
struct FollowInbox<'a> {
    backend: &'a Backend,
    identity: IdentityKey,
    stream: &'a inbox_stream::Client,
    subscribed: Option<&'a LinkContext>,
    page: Page,
}

impl FollowInbox<'_> {
    async fn run(&self, after_seq: u64) -> Result<(), FollowError> {
        let mut feed = self.backend.inbox_feed(&self.identity);
        let mut after = after_seq;
        loop {
            let span = catch_up_span("inbox", self.subscribed);
            let result = self.catch_up(after, &span).instrument(span.clone()).await;
            if let Err(FollowError::Store(e)) = &result
                && e.is_fault()
            {
                record_error(&span, e.outcome());
            }
            after = result?;
            drop(span);
            match feed.recv().await {
                Ok(()) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return Err(FollowError::FeedClosed),
            }
        }
    }

    /// Pushes every Welcome after `after`; the last one pushed.
    async fn catch_up(&self, mut after: u64, span: &Span) -> Result<u64, FollowError> {
        loop {
            let welcomes = self
                .backend
                .store()
                .read_inbox(&self.identity, after, self.page)
                .await?;
            let Some(last) = welcomes.last() else {
                return Ok(after);
            };
            after = last.seq;
            let push = push_span(
                PushTarget::Inbox,
                welcomes.len(),
                Some(span),
                std::iter::empty(),
            );
            let mut req = self.stream.deliver_request();
            {
                let mut list = req.get().init_welcomes(welcomes.len() as u32);
                for (i, w) in welcomes.iter().enumerate() {
                    write_welcome(list.reborrow().get(i as u32), w);
                }
            }
            let result = req.send().promise.instrument(push.clone()).await;
            record_outcome(&push, &result);
            result?;
        }
    }
}
