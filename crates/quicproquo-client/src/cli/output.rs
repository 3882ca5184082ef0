//! How `qpq` prints events: readable lines, or one JSON object per line with `--json`.

use std::collections::HashMap;

use anyhow::Result;
use quicproquo_client::Session;
use quicproquo_client::chat::ChatEvent;
use quicproquo_client::follow::Follower;
use quicproquo_core::IdentityKey;
use serde_json::json;

use super::outcome::Stop;

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

    /// Prints `events` in order (what a command read on its way, as `recv` would print it).
    pub(crate) async fn events(&self, session: &Session, events: Vec<ChatEvent>) -> Result<()> {
        let mut names = Names::default();
        for e in events {
            self.event(&mut names, Some(session), e).await?;
        }
        Ok(())
    }

    /// Prints a chat event; members are named through `session` when it can say (fingerprints
    /// otherwise: an event is never dropped for want of a name).
    pub(crate) async fn event(
        &self,
        names: &mut Names,
        session: Option<&Session>,
        e: ChatEvent,
    ) -> Result<()> {
        match e {
            ChatEvent::Message {
                group,
                seq,
                sender,
                body,
            } => {
                let who = names.name(session, &sender).await;
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
                let added = names.describe(session, &added).await;
                let removed = names.describe(session, &removed).await;
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
            ChatEvent::Reverted {
                group,
                seq,
                commit_seq,
                epoch,
                in_step,
            } => self.line(
                &if in_step {
                    format!(
                        "[{group} #{seq}] the commit at #{commit_seq} was reverted on a \
                         member's report; the group is back at epoch {epoch}"
                    )
                } else {
                    format!(
                        "[{group} #{seq}] the commit at #{commit_seq}, which this device \
                         merged, was reverted: this device is out of step with the group and \
                         must be added again"
                    )
                },
                json!({"event": "reverted", "group": group, "seq": seq,
                       "commit_seq": commit_seq, "epoch": epoch, "in_step": in_step}),
            ),
            ChatEvent::ReportRefused { group, seq, reason } => self.line(
                &format!(
                    "[{group} #{seq}] a commit this device cannot process was reported and \
                     not reverted ({reason}); this device stays at its epoch"
                ),
                json!({"event": "report_refused", "group": group, "seq": seq,
                       "reason": reason}),
            ),
            ChatEvent::Removed { group, seq } => self.line(
                &format!("[{group} #{seq}] you were removed from the group"),
                json!({"event": "removed_from_group", "group": group, "seq": seq}),
            ),
            ChatEvent::HistoryGone {
                group,
                retained_from,
            } => self.line(
                &format!(
                    "[{group}] the server no longer keeps the messages this device had not read \
                     ({retained_from}); this device left the group. Ask a member to remove \
                     you and invite you again, then run `qpq join`."
                ),
                json!({"event": "history_gone", "group": group, "detail": retained_from}),
            ),
            ChatEvent::Joined {
                group,
                epoch,
                members,
            } => {
                let members = names.describe(session, &members).await;
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
#[derive(Default)]
pub(crate) struct Names {
    cache: HashMap<IdentityKey, String>,
}

impl Names {
    /// The user name, or the first fingerprint groups when the identity has none.
    pub(crate) async fn name(&mut self, session: Option<&Session>, id: &IdentityKey) -> String {
        self.describe(session, std::slice::from_ref(id))
            .await
            .remove(0)
    }

    /// Names of several identities, in order. Identities not yet known are asked of the
    /// server through `session`; when there is none, or it cannot answer (the connection just
    /// broke), they are shown by fingerprint for now and asked again next time.
    pub(crate) async fn describe(
        &mut self,
        session: Option<&Session>,
        ids: &[IdentityKey],
    ) -> Vec<String> {
        let missing: Vec<IdentityKey> = ids
            .iter()
            .filter(|i| !self.cache.contains_key(*i))
            .copied()
            .collect();
        if let (false, Some(session)) = (missing.is_empty(), session)
            && let Ok(names) = session.auth.names_of(&missing).await
        {
            for (id, name) in missing.iter().zip(names) {
                let label = name.unwrap_or_else(|| short_fingerprint(id));
                self.cache.insert(*id, label);
            }
        }
        ids.iter()
            .map(|i| {
                self.cache
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| short_fingerprint(i))
            })
            .collect()
    }
}

/// The first two groups of an identity's fingerprint: its label when it has no name.
fn short_fingerprint(id: &IdentityKey) -> String {
    id.fingerprint()
        .split(' ')
        .take(2)
        .collect::<Vec<_>>()
        .join("")
}

/// Follows every group and the inbox, printing events until `stop` (SIGINT or SIGTERM);
/// moves to another server of the list when the node dies or drains (see [`Follower`]).
pub(crate) async fn follow_live(
    mut follower: Follower<'_>,
    out: &Output,
    names: &mut Names,
    stop: &Stop,
) -> Result<()> {
    let mut reconnects = follower.reconnects();
    loop {
        let events = tokio::select! {
            r = follower.next() => r?,
            _ = stop.requested() => break,
        };
        if follower.reconnects() != reconnects {
            reconnects = follower.reconnects();
            if let Some(addr) = follower.addr() {
                eprintln!(
                    "qpq: reconnected to {addr} ({})",
                    follower.last_loss().unwrap_or("connection lost")
                );
            }
        }
        // Printed whether or not the connection still stands: these entries are processed
        // and their cursor saved, so they will not come again.
        for e in events {
            out.event(names, follower.session(), e).await?;
        }
    }
    follower.close().await;
    Ok(())
}
