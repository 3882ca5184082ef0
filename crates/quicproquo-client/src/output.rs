//! How `qpq` prints events: readable lines, or one JSON object per line with `--json`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use std::net::SocketAddr;
use std::time::Duration;

use quicproquo_client::chat::{Chat, ChatError, ChatEvent};
use quicproquo_client::delivery::Envelope;
use quicproquo_client::{
    ClientError, ClientState, ConnectOptions, Connection, Session, connect_any_after,
};
use quicproquo_core::IdentityKey;
use serde_json::json;
use tokio::sync::mpsc;

/// Where events go.
pub(crate) struct Output {
    pub(crate) json: bool,
}

impl Output {
    /// Prints `text`, or `value` as JSON.
    pub(crate) fn line(&self, text: &str, value: serde_json::Value) {
        if self.json {
            println!("{value}");
        } else {
            println!("{text}");
        }
    }

    /// Prints a chat event.
    pub(crate) async fn event(&self, names: &mut Names<'_>, e: ChatEvent) -> Result<()> {
        match e {
            ChatEvent::Message {
                group,
                seq,
                sender,
                body,
            } => {
                let who = names.name(&sender).await?;
                let text = String::from_utf8_lossy(&body).into_owned();
                self.line(
                    &format!("[{group} #{seq}] {who}: {text}"),
                    json!({"event": "message", "group": group, "seq": seq, "from": who,
                           "fingerprint": sender.fingerprint(), "text": text}),
                );
            }
            ChatEvent::Epoch {
                group,
                seq,
                epoch,
                added,
                removed,
            } => {
                let added = names.describe(&added).await?;
                let removed = names.describe(&removed).await?;
                let mut what = Vec::new();
                if !added.is_empty() {
                    what.push(format!("added {}", added.join(", ")));
                }
                if !removed.is_empty() {
                    what.push(format!("removed {}", removed.join(", ")));
                }
                if what.is_empty() {
                    what.push("keys updated".to_owned());
                }
                self.line(
                    &format!("[{group} #{seq}] epoch {epoch}: {}", what.join("; ")),
                    json!({"event": "epoch", "group": group, "seq": seq, "epoch": epoch,
                           "added": added, "removed": removed}),
                );
            }
            ChatEvent::Unreadable { group, seq } => self.line(
                &format!("[{group} #{seq}] (a message that could not be decrypted)"),
                json!({"event": "unreadable", "group": group, "seq": seq}),
            ),
            ChatEvent::Removed { group, seq } => self.line(
                &format!("[{group} #{seq}] you were removed from the group"),
                json!({"event": "removed_from_group", "group": group, "seq": seq}),
            ),
            ChatEvent::Joined {
                group,
                epoch,
                members,
            } => {
                let members = names.describe(&members).await?;
                self.line(
                    &format!(
                        "joined group {group} (epoch {epoch}, members: {})",
                        members.join(", ")
                    ),
                    json!({"event": "joined", "group": group, "epoch": epoch, "members": members}),
                );
            }
        }
        Ok(())
    }
}

/// Resolves identities to user names, caching answers for the command's lifetime.
pub(crate) struct Names<'a> {
    session: &'a Session,
    cache: HashMap<IdentityKey, String>,
}

impl<'a> Names<'a> {
    pub(crate) fn new(session: &'a Session) -> Self {
        Self {
            session,
            cache: HashMap::new(),
        }
    }

    /// The user name, or the first fingerprint groups when the identity has none.
    pub(crate) async fn name(&mut self, id: &IdentityKey) -> Result<String> {
        Ok(self.describe(std::slice::from_ref(id)).await?.remove(0))
    }

    /// Names of several identities, in order.
    pub(crate) async fn describe(&mut self, ids: &[IdentityKey]) -> Result<Vec<String>> {
        let missing: Vec<IdentityKey> = ids
            .iter()
            .filter(|i| !self.cache.contains_key(*i))
            .copied()
            .collect();
        if !missing.is_empty() {
            let names = self.session.auth.names_of(&missing).await?;
            for (id, name) in missing.iter().zip(names) {
                let label = name.unwrap_or_else(|| {
                    id.fingerprint()
                        .split(' ')
                        .take(2)
                        .collect::<Vec<_>>()
                        .join("")
                });
                self.cache.insert(*id, label);
            }
        }
        Ok(ids
            .iter()
            .map(|i| self.cache.get(i).cloned().unwrap_or_default())
            .collect())
    }
}

enum Pushed {
    Group(Vec<u8>, Vec<Envelope>),
    Inbox,
    /// A subscription stream ended (the connection broke, or we left that group).
    Ended,
}

/// Why one followed session ended.
enum Ended {
    Interrupted,
    Lost(String),
}

/// Whether `e` means the connection (not the request) failed: then another node may serve us.
fn connection_lost(e: &ChatError) -> bool {
    matches!(e, ChatError::Client(c) if !matches!(c, ClientError::Service { .. }))
}

/// Where to reconnect.
pub(crate) struct Servers<'a> {
    pub(crate) addrs: &'a [SocketAddr],
    pub(crate) options: &'a ConnectOptions,
}

/// Stays subscribed to every group and to the inbox, printing events until interrupted.
///
/// When the node goes away (its connection breaks, or it announces a drain), reconnects to
/// the next server in the list, binds again, catches up from the saved cursors and
/// resubscribes; nothing is missed and entries seen twice are skipped by sequence number.
pub(crate) async fn follow_live(
    state: &mut ClientState,
    path: &Path,
    servers: &Servers<'_>,
    mut conn: Connection,
    mut session: Session,
    out: &Output,
) -> Result<()> {
    let mut stop = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let ended = tokio::select! {
            r = follow_session(state, path, &conn, &session, out) => r?,
            _ = &mut stop => Ended::Interrupted,
        };
        let why = match ended {
            Ended::Interrupted => {
                conn.close().await;
                return Ok(());
            }
            Ended::Lost(why) => why,
        };
        let old = conn.addr();
        eprintln!("qpq: lost {old} ({why}); reconnecting");
        let mut delay = Duration::from_millis(100);
        let (next_conn, next_session) = loop {
            let attempt = async {
                let c = connect_any_after(servers.addrs, Some(old), servers.options).await?;
                let s = c.bind(state.identity()).await?;
                Ok::<_, ClientError>((c, s))
            };
            let failed = tokio::select! {
                r = attempt => match r {
                    Ok(pair) => break pair,
                    Err(e) => e,
                },
                _ = &mut stop => return Ok(()),
            };
            eprintln!("qpq: reconnecting failed ({failed}); retrying in {delay:?}");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = &mut stop => return Ok(()),
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        };
        // The old connection is gone or going; its in-flight calls finish on their own.
        drop(conn);
        conn = next_conn;
        session = next_session;
        eprintln!("qpq: reconnected to {}", conn.addr());
    }
}

/// Follows one bound session: catches up, subscribes, prints, until it is lost or fails.
async fn follow_session(
    state: &mut ClientState,
    path: &Path,
    conn: &Connection,
    session: &Session,
    out: &Output,
) -> Result<Ended> {
    let mut names = Names::new(session);
    let mut events = Vec::new();
    match Chat::new(state, path, session)
        .receive_all(&mut |e| events.push(e))
        .await
    {
        Ok(()) => {}
        Err(e) if connection_lost(&e) => return Ok(Ended::Lost(e.to_string())),
        Err(e) => return Err(e.into()),
    }
    for e in events.drain(..) {
        out.event(&mut names, e).await?;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut followed = std::collections::HashSet::new();
    let mut inbox = match session.delivery.subscribe_inbox(state.inbox_cursor).await {
        Ok(s) => s,
        Err(e) => return Ok(Ended::Lost(e.to_string())),
    };
    let inbox_tx = tx.clone();
    tokio::task::spawn_local(async move {
        while inbox.next().await.is_some() {
            if inbox_tx.send(Pushed::Inbox).is_err() {
                return;
            }
        }
        let _ = inbox_tx.send(Pushed::Ended);
    });
    loop {
        for (id, meta) in &state.groups {
            if followed.insert(id.clone()) {
                let mut sub = match session.delivery.subscribe(id, meta.cursor).await {
                    Ok(s) => s,
                    Err(ClientError::Service { .. }) => continue,
                    Err(e) => return Ok(Ended::Lost(e.to_string())),
                };
                let (tx, id) = (tx.clone(), id.clone());
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
            p = rx.recv() => p,
            () = session.draining.wait() => {
                return Ok(Ended::Lost("the node is draining".into()));
            }
        };
        let mut events = Vec::new();
        let step = async {
            let mut chat = Chat::new(state, path, session);
            match pushed {
                None => {}
                Some(Pushed::Ended) => {
                    // Our own removal ends a group's stream too; only a dead connection
                    // sends us elsewhere.
                    if let Err(e) = conn.ping(b"").await {
                        return Err(ChatError::Client(e));
                    }
                }
                Some(Pushed::Inbox) => {
                    chat.join(&mut |e| events.push(e)).await?;
                }
                Some(Pushed::Group(id, batch)) => {
                    chat.apply_batch(&id, &batch, &mut |e| events.push(e))?;
                    state.save(path).map_err(ClientError::from)?;
                    if let Some(meta) = state.groups.get(&id) {
                        session.delivery.acknowledge(&id, meta.cursor).await?;
                    }
                }
            }
            Ok(())
        };
        match step.await {
            Ok(()) => {}
            Err(e) if connection_lost(&e) => return Ok(Ended::Lost(e.to_string())),
            Err(e) => return Err(e.into()),
        }
        for e in events {
            out.event(&mut names, e).await?;
        }
    }
}
