//! How `qpq` prints events: readable lines, or one JSON object per line with `--json`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use quicproquo_client::chat::{Chat, ChatEvent};
use quicproquo_client::delivery::Envelope;
use quicproquo_client::{ClientState, Session};
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
}

/// Stays subscribed to every group and to the inbox, printing events until interrupted.
pub(crate) async fn follow_live(
    state: &mut ClientState,
    path: &Path,
    session: &Session,
    out: &Output,
    names: &mut Names<'_>,
) -> Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut followed = std::collections::HashSet::new();
    let mut inbox = session.delivery.subscribe_inbox(state.inbox_cursor).await?;
    let inbox_tx = tx.clone();
    tokio::task::spawn_local(async move {
        while inbox.next().await.is_some() {
            if inbox_tx.send(Pushed::Inbox).is_err() {
                break;
            }
        }
    });
    let mut stop = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        for (id, meta) in &state.groups {
            if followed.insert(id.clone()) {
                let mut sub = session.delivery.subscribe(id, meta.cursor).await?;
                let (tx, id) = (tx.clone(), id.clone());
                tokio::task::spawn_local(async move {
                    while let Some(batch) = sub.next().await {
                        if tx.send(Pushed::Group(id.clone(), batch)).is_err() {
                            break;
                        }
                    }
                });
            }
        }
        let pushed = tokio::select! {
            _ = &mut stop => return Ok(()),
            p = rx.recv() => p,
        };
        let mut events = Vec::new();
        let mut chat = Chat::new(state, path, session);
        match pushed {
            None => return Ok(()),
            Some(Pushed::Inbox) => {
                chat.join(&mut |e| events.push(e)).await?;
            }
            Some(Pushed::Group(id, batch)) => {
                chat.apply_batch(&id, &batch, &mut |e| events.push(e))?;
                state.save(path)?;
                if let Some(meta) = state.groups.get(&id) {
                    session.delivery.acknowledge(&id, meta.cursor).await?;
                }
            }
        }
        for e in events {
            out.event(names, e).await?;
        }
    }
}
