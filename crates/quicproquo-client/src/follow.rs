//! Following a device's groups and inbox live, across node failures.
//!
//! A [`Follower`] connects to the first reachable server of a list, binds the identity,
//! catches up from the cursors saved in the state, subscribes to every group and to the
//! inbox, and hands out events as they arrive. When its node goes away — the connection
//! breaks, or the node announces a drain — it reconnects to the next server in the list
//! (retrying with backoff), catches up from the saved cursors again and resubscribes: nothing
//! is missed, and entries delivered twice are skipped by sequence number.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::chat::{Chat, ChatError, ChatEvent};
use crate::delivery::Envelope;
use crate::{ClientError, ClientState, ConnectOptions, Connection, Session, connect_any_after};

/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

enum Pushed {
    Group(Vec<u8>, Vec<Envelope>),
    Inbox,
    /// A subscription stream ended (the connection broke, or we left that group).
    Ended,
}

struct Live {
    conn: Connection,
    session: Session,
    tx: mpsc::UnboundedSender<Pushed>,
    rx: mpsc::UnboundedReceiver<Pushed>,
    followed: HashSet<Vec<u8>>,
    /// Not yet caught up from the saved cursors and subscribed to the inbox.
    fresh: bool,
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
            fresh: true,
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

    /// The current session, if connected.
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
            let _ = tx.send(Pushed::Ended);
        });
        Ok(())
    }

    /// Subscribes to new groups, waits for one push and processes it.
    async fn step(&mut self, events: &mut Vec<ChatEvent>) -> Result<(), ChatError> {
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        for (id, meta) in &self.state.groups {
            if live.followed.insert(id.clone()) {
                let mut sub = match live.session.delivery.subscribe(id, meta.cursor).await {
                    Ok(s) => s,
                    // Removed from it while we were away: nothing to follow.
                    Err(ClientError::Service { .. }) => continue,
                    Err(e) => return Err(e.into()),
                };
                let (tx, id) = (live.tx.clone(), id.clone());
                tokio::task::spawn_local(async move {
                    while let Some(batch) = sub.next().await {
                        if tx.send(Pushed::Group(id.clone(), batch)).is_err() {
                            return;
                        }
                    }
                    let _ = tx.send(Pushed::Ended);
                });
            }
        }
        let pushed = tokio::select! {
            p = live.rx.recv() => p,
            () = live.session.draining.wait() => {
                return Err(ChatError::Client(ClientError::Draining(live.conn.addr())));
            }
        };
        let mut chat = Chat::new(self.state, self.path, &live.session);
        match pushed {
            // Every sender is held in `live`, so the channel never closes while we run.
            None => {}
            Some(Pushed::Ended) => {
                // Our own removal ends a group's stream too; only a dead connection sends us
                // elsewhere.
                live.conn.ping(b"").await?;
            }
            Some(Pushed::Inbox) => {
                chat.join(&mut |e| events.push(e)).await?;
            }
            Some(Pushed::Group(id, batch)) => {
                chat.apply_batch(&id, &batch, &mut |e| events.push(e))?;
                self.state.save(self.path).map_err(ClientError::from)?;
                if let Some(meta) = self.state.groups.get(&id) {
                    live.session.delivery.acknowledge(&id, meta.cursor).await?;
                }
            }
        }
        Ok(())
    }
}
