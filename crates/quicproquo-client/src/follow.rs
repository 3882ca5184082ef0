//! Following a device's groups and inbox live, across node failures.
//!
//! A [`Follower`] connects to the first reachable server of a list, binds the identity,
//! catches up from the cursors saved in the state, subscribes to every group and to the
//! inbox, and hands out events as they arrive. When its node goes away — the connection
//! breaks, or the node announces a drain — it reconnects to the next server in the list
//! (retrying with backoff), catches up from the saved cursors again and resubscribes: nothing
//! is missed, and entries delivered twice are skipped by sequence number.
//!
//! Pushes are hints, the log is the truth: a pushed batch that does not continue a group's
//! cursor sends the follower to the log for the entries in between
//! ([`Chat::receive_pushed`]), and a subscription stream that ends while the connection still
//! answers is subscribed again from the cursor (the server refuses that only when we are no
//! longer a member). When the connection breaks right after entries were processed, their
//! events are handed out first, with the session they were read on still available, and the
//! follower moves on at the next call.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::chat::{Chat, ChatError, ChatEvent};
use crate::delivery::Envelope;
use crate::{ClientError, ClientState, ConnectOptions, Connection, Session, connect_any_after};

/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Shortest pause before subscribing again to a stream that ended while the connection lived.
const MIN_RESUBSCRIBE_DELAY: Duration = Duration::from_millis(50);

enum Pushed {
    Group(Vec<u8>, Vec<Envelope>),
    Inbox,
    /// A group's subscription stream ended (the connection broke, or we left that group).
    GroupEnded(Vec<u8>),
    /// The inbox subscription stream ended.
    InboxEnded,
}

struct Live {
    conn: Connection,
    session: Session,
    tx: mpsc::UnboundedSender<Pushed>,
    rx: mpsc::UnboundedReceiver<Pushed>,
    followed: HashSet<Vec<u8>>,
    /// The task forwarding each followed group's stream (it holds the subscription).
    streams: Streams,
    /// Not yet caught up from the saved cursors and subscribed to the inbox.
    fresh: bool,
    /// Streams that ended since the last push: each one waits longer before resubscribing.
    ended_streak: u32,
}

impl Live {
    fn new(conn: Connection, session: Session) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            conn,
            session,
            tx,
            rx,
            followed: HashSet::new(),
            streams: Streams::default(),
            fresh: true,
            ended_streak: 0,
        }
    }

    /// How long to wait before subscribing again after one more stream ended.
    fn resubscribe_delay(&mut self) -> Duration {
        let delay = MIN_RESUBSCRIBE_DELAY.saturating_mul(1 << self.ended_streak.min(7));
        self.ended_streak = self.ended_streak.saturating_add(1);
        delay.min(MAX_BACKOFF)
    }
}

/// The tasks forwarding each followed group's stream; they stop with the connection.
#[derive(Default)]
struct Streams(HashMap<Vec<u8>, tokio::task::AbortHandle>);

impl Drop for Streams {
    fn drop(&mut self) {
        for stream in self.0.values() {
            stream.abort();
        }
    }
}

/// Whether `e` means the connection (not the request) failed: then another node may serve us.
fn connection_lost(e: &ChatError) -> bool {
    matches!(e, ChatError::Client(c) if !matches!(c, ClientError::Service { .. }))
}

/// Follows one device's groups live; see the module documentation.
pub struct Follower<'a> {
    state: &'a mut ClientState,
    path: &'a Path,
    addrs: Vec<SocketAddr>,
    options: ConnectOptions,
    live: Option<Live>,
    /// The connection broke after the events last handed out were processed: why. It is
    /// given up at the next call.
    broken: Option<String>,
    last: Option<SocketAddr>,
    reconnects: u64,
    last_loss: Option<String>,
}

impl<'a> Follower<'a> {
    /// A follower of the device in `state` (saved to `path` after each step), connecting to
    /// `addrs` in order. Nothing happens until [`Follower::next`].
    pub fn new(
        state: &'a mut ClientState,
        path: &'a Path,
        addrs: Vec<SocketAddr>,
        options: ConnectOptions,
    ) -> Self {
        Self {
            state,
            path,
            addrs,
            options,
            live: None,
            broken: None,
            last: None,
            reconnects: 0,
            last_loss: None,
        }
    }

    /// Starts from an already bound connection instead of connecting.
    pub fn with_connection(mut self, conn: Connection, session: Session) -> Self {
        self.last = Some(conn.addr());
        self.live = Some(Live::new(conn, session));
        self
    }

    /// The current session, if connected. After [`Follower::next`] returned events, it is the
    /// session they were read on, even when its connection broke just after (the follower moves
    /// on at the next call): use it to describe them, and expect its calls may fail.
    pub fn session(&self) -> Option<&Session> {
        self.live.as_ref().map(|l| &l.session)
    }

    /// The server currently (or last) connected to.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.last
    }

    /// How many times the follower moved to another connection after losing one.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Why the last connection was lost, if one was.
    pub fn last_loss(&self) -> Option<&str> {
        self.last_loss.as_deref()
    }

    /// The device state.
    pub fn state(&self) -> &ClientState {
        self.state
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        if let Some(live) = self.live.take() {
            live.conn.close().await;
        }
    }

    fn lose(&mut self, why: String) {
        self.live = None;
        self.reconnects += 1;
        self.last_loss = Some(why);
    }

    /// Connects (with backoff, to the next server after the last one) and binds. Only a
    /// wrong pinned key ends the attempts: no server of this cluster can fix that.
    async fn connect(&mut self) -> Result<(), ChatError> {
        let mut delay = Duration::from_millis(100);
        loop {
            let attempt = async {
                let c = connect_any_after(&self.addrs, self.last, &self.options).await?;
                let s = c.bind(self.state.identity()).await?;
                Ok::<_, ClientError>((c, s))
            };
            match attempt.await {
                Ok((conn, session)) => {
                    self.last = Some(conn.addr());
                    self.live = Some(Live::new(conn, session));
                    return Ok(());
                }
                Err(e @ ClientError::WrongClusterKey { .. }) => return Err(e.into()),
                Err(ClientError::AllFailed(inner))
                    if matches!(*inner, ClientError::WrongClusterKey { .. }) =>
                {
                    return Err(ClientError::AllFailed(inner).into());
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// The next events (possibly several), connecting or reconnecting as needed. Cancel it
    /// (drop the future) to stop following; the state on disk stays consistent.
    ///
    /// Events are handed out exactly once: an event whose entry was processed (and its cursor
    /// saved) is returned even when the connection breaks right after; the follower then
    /// reconnects on the next call.
    pub async fn next(&mut self) -> Result<Vec<ChatEvent>, ChatError> {
        if let Some(why) = self.broken.take() {
            self.lose(why);
        }
        loop {
            if self.live.is_none() {
                self.connect().await?;
            }
            let mut events = Vec::new();
            let result = if self.live.as_ref().is_some_and(|l| l.fresh) {
                self.catch_up(&mut events).await
            } else {
                self.step(&mut events).await
            };
            match result {
                Ok(()) => {}
                // What was processed is handed out with the session it was read on.
                Err(e) if connection_lost(&e) && !events.is_empty() => {
                    self.broken = Some(e.to_string());
                }
                Err(e) if connection_lost(&e) => self.lose(e.to_string()),
                Err(e) => return Err(e),
            }
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }

    /// Reads everything after the saved cursors, then subscribes to the inbox.
    async fn catch_up(&mut self, events: &mut Vec<ChatEvent>) -> Result<(), ChatError> {
        let Some(live) = self.live.as_ref() else {
            return Ok(());
        };
        Chat::new(self.state, self.path, &live.session)
            .receive_all(&mut |e| events.push(e))
            .await?;
        self.subscribe_inbox().await?;
        if let Some(live) = self.live.as_mut() {
            live.fresh = false;
        }
        Ok(())
    }

    async fn subscribe_inbox(&mut self) -> Result<(), ClientError> {
        let Some(live) = self.live.as_ref() else {
            return Ok(());
        };
        let mut inbox = live
            .session
            .delivery
            .subscribe_inbox(self.state.inbox_cursor)
            .await?;
        let tx = live.tx.clone();
        tokio::task::spawn_local(async move {
            while inbox.next().await.is_some() {
                if tx.send(Pushed::Inbox).is_err() {
                    return;
                }
            }
            let _ = tx.send(Pushed::InboxEnded);
        });
        Ok(())
    }

    /// Subscribes to every group of the state not followed yet on this connection.
    async fn subscribe_groups(&mut self) -> Result<(), ClientError> {
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        for (id, meta) in &self.state.groups {
            if !live.followed.insert(id.clone()) {
                continue;
            }
            let mut sub = match live.session.delivery.subscribe(id, meta.cursor).await {
                Ok(s) => s,
                // Removed from it while we were away: nothing to follow.
                Err(ClientError::Service { .. }) => continue,
                Err(e) => return Err(e),
            };
            let (tx, group) = (live.tx.clone(), id.clone());
            let task = tokio::task::spawn_local(async move {
                while let Some(batch) = sub.next().await {
                    if tx.send(Pushed::Group(group.clone(), batch)).is_err() {
                        return;
                    }
                }
                let _ = tx.send(Pushed::GroupEnded(group));
            });
            if let Some(old) = live.streams.0.insert(id.clone(), task.abort_handle()) {
                old.abort();
            }
        }
        Ok(())
    }

    /// A stream ended: if the connection still answers, follow again from the saved cursor.
    /// A group we were removed from is refused by the server then, and stays unfollowed.
    async fn stream_ended(&mut self, group: Option<Vec<u8>>) -> Result<(), ClientError> {
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        live.conn.ping(b"").await?;
        tokio::time::sleep(live.resubscribe_delay()).await;
        match group {
            Some(id) => {
                live.followed.remove(&id);
                if let Some(task) = live.streams.0.remove(&id) {
                    task.abort();
                }
                Ok(())
            }
            None => self.subscribe_inbox().await,
        }
    }

    /// Subscribes to new groups, waits for one push and processes it.
    async fn step(&mut self, events: &mut Vec<ChatEvent>) -> Result<(), ChatError> {
        self.subscribe_groups().await?;
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        let pushed = tokio::select! {
            p = live.rx.recv() => p,
            () = live.session.draining.wait() => {
                return Err(ChatError::Client(ClientError::Draining(live.conn.addr())));
            }
        };
        match pushed {
            // Every sender is held in `live`, so the channel never closes while we run.
            None => {}
            Some(Pushed::GroupEnded(id)) => self.stream_ended(Some(id)).await?,
            Some(Pushed::InboxEnded) => self.stream_ended(None).await?,
            Some(Pushed::Inbox) => {
                live.ended_streak = 0;
                Chat::new(self.state, self.path, &live.session)
                    .join(&mut |e| events.push(e))
                    .await?;
            }
            Some(Pushed::Group(id, batch)) => {
                live.ended_streak = 0;
                Chat::new(self.state, self.path, &live.session)
                    .receive_pushed(&id, &batch, &mut |e| events.push(e))
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::net::SocketAddr;
    use std::rc::Rc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::{Follower, Pushed};
    use crate::chat::ChatEvent;
    use crate::chat::tests::{TestServer, User, bodies, group_of};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Calls `next` until the events seen satisfy `done` (bounded); returns them all.
    async fn until(
        f: &mut Follower<'_>,
        what: &str,
        done: impl Fn(&[ChatEvent]) -> bool,
    ) -> Result<Vec<ChatEvent>, String> {
        let mut seen = Vec::new();
        while !done(&seen) {
            let next = tokio::time::timeout(Duration::from_secs(20), f.next()).await;
            let events = next
                .map_err(|_| format!("no {what} after {seen:?}"))?
                .map_err(|e| e.to_string())?;
            seen.extend(events);
        }
        Ok(seen)
    }

    /// Calls `next` until a message with `body` comes out; returns every event seen.
    async fn until_message(f: &mut Follower<'_>, body: &str) -> Result<Vec<ChatEvent>, String> {
        until(f, body, |seen| bodies(seen).iter().any(|b| b == body)).await
    }

    /// Takes `f` past its catch-up to following live: `sender` sends two messages to `group`,
    /// the second once the first was read (so it comes as a push).
    async fn go_live(f: &mut Follower<'_>, sender: &mut User, group: &str) -> TestResult {
        sender.chat().send(group, b"caught up", &mut |_| {}).await?;
        until_message(f, "caught up").await?;
        sender.chat().send(group, b"live", &mut |_| {}).await?;
        until_message(f, "live").await?;
        Ok(())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stream_that_ends_while_the_connection_lives_is_followed_again() -> TestResult {
        tokio::task::LocalSet::new()
            .run_until(async {
                let server = TestServer::start()?;
                let mut alice = User::register(&server, server.addr, "alice").await?;
                let mut bob = User::register(&server, server.addr, "bob").await?;
                let id = group_of("g", &mut alice, &mut [&mut bob]).await?;
                let User {
                    path,
                    mut state,
                    conn,
                    session,
                    ..
                } = bob;
                let options = server.options.clone();
                let mut f = Follower::new(&mut state, &path, vec![server.addr], options)
                    .with_connection(conn, session);
                go_live(&mut f, &mut alice, "g").await?;

                // The server ends bob's subscription (its capability is released), and the
                // stream reports its end, as when the server stops pushing.
                let live = f.live.as_mut().ok_or("not live")?;
                live.streams.0.remove(&id).ok_or("no stream")?.abort();
                live.tx.send(Pushed::GroupEnded(id.clone()))?;

                alice.chat().send("g", b"after", &mut |_| {}).await?;
                until_message(&mut f, "after").await?;
                assert_eq!(f.reconnects(), 0, "the connection was fine all along");
                Ok(())
            })
            .await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_group_we_were_removed_from_stays_unfollowed_and_others_go_on() -> TestResult {
        tokio::task::LocalSet::new()
            .run_until(async {
                let server = TestServer::start()?;
                let mut alice = User::register(&server, server.addr, "alice").await?;
                let mut bob = User::register(&server, server.addr, "bob").await?;
                group_of("left", &mut alice, &mut [&mut bob]).await?;
                group_of("kept", &mut alice, &mut [&mut bob]).await?;
                let User {
                    path,
                    mut state,
                    conn,
                    session,
                    ..
                } = bob;
                let options = server.options.clone();
                let mut f = Follower::new(&mut state, &path, vec![server.addr], options)
                    .with_connection(conn, session);
                go_live(&mut f, &mut alice, "kept").await?;

                let bob_name = vec!["bob".to_owned()];
                alice.chat().remove("left", &bob_name, &mut |_| {}).await?;
                alice
                    .chat()
                    .send("kept", b"still here", &mut |_| {})
                    .await?;
                until(&mut f, "the removal and the message", |seen| {
                    seen.iter().any(|e| matches!(e, ChatEvent::Removed { .. }))
                        && bodies(seen).iter().any(|b| b == "still here")
                })
                .await?;
                // The ended stream of "left" was refused again; "kept" goes on.
                alice.chat().send("kept", b"and later", &mut |_| {}).await?;
                until_message(&mut f, "and later").await?;
                assert_eq!(f.reconnects(), 0);
                Ok(())
            })
            .await
    }

    /// A TCP relay to `upstream` that, once armed, lets the next bytes from the server through
    /// and then swallows everything the client sends on that connection (its calls go
    /// unanswered). Later connections are relayed whole.
    async fn relay(upstream: SocketAddr) -> std::io::Result<(SocketAddr, Rc<Cell<bool>>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let armed = Rc::new(Cell::new(false));
        let arm = Rc::clone(&armed);
        tokio::task::spawn_local(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let cut = Rc::new(Cell::new(false));
                let (armed, cut_down) = (Rc::clone(&armed), Rc::clone(&cut));
                tokio::task::spawn_local(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = sr.read(&mut buf).await {
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        if armed.replace(false) {
                            cut_down.set(true);
                        }
                    }
                });
                tokio::task::spawn_local(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        if !cut.get() && sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok((addr, arm))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn events_read_just_before_the_connection_breaks_come_with_their_session() -> TestResult {
        tokio::task::LocalSet::new()
            .run_until(async {
                let mut server = TestServer::start()?;
                // Bob's calls that go unanswered fail quickly.
                server.options.timeout = Duration::from_secs(1);
                let (relay_addr, arm) = relay(server.addr).await?;
                let mut alice = User::register(&server, server.addr, "alice").await?;
                let mut bob = User::register(&server, relay_addr, "bob").await?;
                let id = group_of("g", &mut alice, &mut [&mut bob]).await?;
                let User {
                    path,
                    mut state,
                    conn,
                    session,
                    ..
                } = bob;
                let options = server.options.clone();
                let mut f = Follower::new(&mut state, &path, vec![relay_addr], options)
                    .with_connection(conn, session);
                go_live(&mut f, &mut alice, "g").await?;

                // The push of "cut short" arrives; the acknowledgement after it never does.
                arm.set(true);
                let seq = alice.chat().send("g", b"cut short", &mut |_| {}).await?;
                let events = tokio::time::timeout(Duration::from_secs(20), f.next()).await??;
                assert_eq!(bodies(&events), ["cut short"]);
                assert!(
                    f.session().is_some(),
                    "events are handed out with the session they were read on"
                );
                assert_eq!(f.reconnects(), 0, "the follower moves on at the next call");
                assert_eq!(f.state().groups[&id].cursor, seq, "processed and saved");

                alice.chat().send("g", b"after", &mut |_| {}).await?;
                let seen = until_message(&mut f, "after").await?;
                assert_eq!(bodies(&seen), ["after"], "each message once");
                assert_eq!(f.reconnects(), 1);
                Ok(())
            })
            .await
    }
}
