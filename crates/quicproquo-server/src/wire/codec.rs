//! Conversions between model values and Cap'n Proto messages: append requests and outcomes
//! (the internal interface and `SendResult`), log entries (`Envelope`) and Welcomes.

use quicproquo_proto::cluster_capnp::append_request;
use quicproquo_proto::delivery_capnp::{send_result, welcome};
use quicproquo_proto::envelope_capnp::envelope;
use quicproquo_proto::errors::{ErrorCode, error};

use super::parse;
use crate::model::group::{
    AppendOutcome, AppendRequest, CommitChange, EntryKind, GroupId, InboxEntry, LogEntry,
};

fn invalid(e: impl std::fmt::Display) -> capnp::Error {
    error(ErrorCode::InvalidArgument, e)
}

fn kind_to_wire(kind: EntryKind) -> envelope::Kind {
    match kind {
        EntryKind::Application => envelope::Kind::Application,
        EntryKind::Commit => envelope::Kind::Commit,
        EntryKind::Proposal => envelope::Kind::Proposal,
        EntryKind::Revert => envelope::Kind::Revert,
    }
}

fn kind_from_wire(kind: envelope::Kind) -> Result<EntryKind, capnp::Error> {
    match kind {
        envelope::Kind::Application => Ok(EntryKind::Application),
        envelope::Kind::Commit => Ok(EntryKind::Commit),
        envelope::Kind::Proposal => Ok(EntryKind::Proposal),
        envelope::Kind::Revert => Ok(EntryKind::Revert),
        envelope::Kind::Welcome => Err(invalid("a Welcome is not a log entry")),
    }
}

/// Writes `req` into an internal append request.
pub(crate) fn write_request(mut out: append_request::Builder<'_>, req: &AppendRequest) {
    out.set_group_id(req.group_id.as_bytes());
    out.set_sender(req.sender.as_bytes());
    out.set_message_id(&req.message_id);
    out.set_kind(kind_to_wire(req.kind));
    out.set_epoch(req.epoch);
    out.set_payload(&req.payload);
    if let Some(change) = &req.commit {
        out.set_has_commit(true);
        // Only the uploads travel: the owner shard derives the membership change itself.
        let mut c = out.init_commit();
        if let Some(w) = &change.welcome {
            c.set_welcome(w);
        }
        if let Some(info) = &change.group_info {
            c.set_group_info(info);
        }
    }
}

/// Reads an internal append request (sent by a cluster node, which checked the framing).
pub(crate) fn read_request(r: append_request::Reader<'_>) -> Result<AppendRequest, capnp::Error> {
    let commit = if r.get_has_commit() {
        let c = r.get_commit()?;
        let welcome = c.get_welcome()?;
        let group_info = c.get_group_info()?;
        Some(CommitChange {
            added: Vec::new(),
            removed: Vec::new(),
            welcome: (!welcome.is_empty()).then(|| welcome.to_vec()),
            group_info: (!group_info.is_empty()).then(|| group_info.to_vec()),
        })
    } else {
        None
    };
    Ok(AppendRequest {
        group_id: parse::group_id(r.get_group_id()?)?,
        sender: parse::identity(r.get_sender()?)?,
        message_id: r.get_message_id()?.to_vec(),
        kind: match kind_from_wire(r.get_kind()?)? {
            EntryKind::Revert => return Err(invalid("only the server writes a revert marker")),
            kind => kind,
        },
        epoch: r.get_epoch(),
        payload: r.get_payload()?.to_vec(),
        commit,
        view: None,
    })
}

/// Writes an append outcome as the Delivery Service's `SendResult` (membership and group
/// refusals travel as typed errors instead).
pub(crate) fn write_outcome(
    mut out: send_result::Builder<'_>,
    outcome: AppendOutcome,
) -> Result<(), capnp::Error> {
    match outcome {
        AppendOutcome::Appended { seq, epoch } => {
            let mut a = out.init_appended();
            a.set_seq(seq);
            a.set_epoch(epoch);
        }
        AppendOutcome::Duplicate { seq } => out.set_duplicate(seq),
        AppendOutcome::StaleEpoch {
            current_epoch,
            winner_seq,
        } => {
            let mut s = out.init_stale_epoch();
            s.set_current_epoch(current_epoch);
            s.set_winner_seq(winner_seq);
        }
        AppendOutcome::NotMember => {
            return Err(error(ErrorCode::NotMember, "not a member of this group"));
        }
        AppendOutcome::UnknownGroup => return Err(error(ErrorCode::UnknownGroup, "no such group")),
    }
    Ok(())
}

/// Reads a `SendResult` back into an append outcome.
pub(crate) fn read_outcome(r: send_result::Reader<'_>) -> Result<AppendOutcome, capnp::Error> {
    Ok(match r.which()? {
        send_result::Appended(a) => {
            let a = a?;
            AppendOutcome::Appended {
                seq: a.get_seq(),
                epoch: a.get_epoch(),
            }
        }
        send_result::Duplicate(seq) => AppendOutcome::Duplicate { seq },
        send_result::StaleEpoch(s) => {
            let s = s?;
            AppendOutcome::StaleEpoch {
                current_epoch: s.get_current_epoch(),
                winner_seq: s.get_winner_seq(),
            }
        }
    })
}

/// Reads a log entry pushed by a shard.
pub(crate) fn read_entry(r: envelope::Reader<'_>) -> Result<LogEntry, capnp::Error> {
    Ok(LogEntry {
        seq: r.get_seq(),
        epoch: r.get_epoch(),
        kind: kind_from_wire(r.get_kind()?)?,
        message_id: r.get_message_id()?.to_vec(),
        payload: r.get_payload()?.to_vec(),
        appended_at_micros: r.get_appended_at_micros(),
    })
}

/// Writes a log entry of `group` as an `Envelope`.
pub(crate) fn write_envelope(mut out: envelope::Builder<'_>, group: &GroupId, entry: &LogEntry) {
    out.set_group_id(group.as_bytes());
    out.set_seq(entry.seq);
    out.set_epoch(entry.epoch);
    out.set_kind(kind_to_wire(entry.kind));
    out.set_message_id(&entry.message_id);
    out.set_payload(&entry.payload);
    out.set_appended_at_micros(entry.appended_at_micros);
}

/// Writes a Welcome waiting in an inbox.
pub(crate) fn write_welcome(mut out: welcome::Builder<'_>, w: &InboxEntry) {
    out.set_seq(w.seq);
    out.set_group_id(w.group_id.as_bytes());
    out.set_commit_seq(w.commit_seq);
    out.set_welcome(&w.welcome);
}
