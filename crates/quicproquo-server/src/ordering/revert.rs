//! Members' reports of commits they cannot process, and the revert they may cause (ADR 0015;
//! the rules in [`crate::model::revert`]).
//!
//! A report is checked here (its encoding, that the caller signed it, that it names the bytes
//! logged at its seq) and judged by the store under the group's lock. It is handled with the
//! group's view slot held, like the group's handshake messages, so no commit of this node is
//! verified against a view the revert is replacing; the cached view is dropped after a revert
//! and reloaded from the store when next needed. Subscribers are told to read the log again
//! (the marker is in it), rather than sent the marker, so nothing reaches them out of order.

use quicproquo_core::IdentityKey;
use quicproquo_core::report::{CommitReport, ReportError};
use quicproquo_proto::errors::ErrorCode;
use tracing::{info, warn};

use super::OrderingError;
use super::hub::Hub;
use super::views::Views;
use crate::model::group::{EntryKind, GroupId};
use crate::model::revert::{RevertOutcome, RevertRefusal, RevertRequest};
use crate::obs::Observer;
use crate::store::log::LogStore;
use crate::store::{AnyStore, StoreError};

/// Where a revert was recorded: the marker's seq and the group's epoch after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevertMarker {
    /// The marker's seq in the group's log.
    pub seq: u64,
    /// The group's epoch after the revert.
    pub epoch: u64,
}

/// What handles a report: the node's views, store, live feeds and observer.
pub(crate) struct Reporting<'a> {
    pub(crate) views: &'a Views,
    pub(crate) store: &'a AnyStore,
    pub(crate) hub: &'a Hub,
    pub(crate) observer: &'a Observer,
}

fn refused(rule: &'static str, detail: impl std::fmt::Display) -> OrderingError {
    OrderingError::Refused {
        code: ErrorCode::ReportRefused,
        message: format!("{rule}: {detail}"),
    }
}

impl Reporting<'_> {
    /// Handles `reporter`'s report `bytes` of the commit at `seq` in `group`.
    pub(crate) async fn report(
        &self,
        group: &GroupId,
        reporter: &IdentityKey,
        seq: u64,
        bytes: &[u8],
    ) -> Result<RevertMarker, OrderingError> {
        match self.judge(group, reporter, seq, bytes).await {
            Ok((marker, outcome)) => {
                self.observer.metrics.commit_report(outcome);
                Ok(marker)
            }
            Err((rule, e)) => {
                self.observer.metrics.commit_report(rule);
                Err(e)
            }
        }
    }

    async fn judge(
        &self,
        group: &GroupId,
        reporter: &IdentityKey,
        seq: u64,
        bytes: &[u8],
    ) -> Result<(RevertMarker, &'static str), (&'static str, OrderingError)> {
        let report = CommitReport::decode(bytes)
            .map_err(|e| self.refuse(group, reporter, "malformed", e))?;
        if report.reporter != *reporter || report.seq != seq {
            return Err(self.refuse(
                group,
                reporter,
                "signature",
                "the report is not the caller's report of this seq",
            ));
        }
        let slot = self.views.slot(group);
        let mut slot = slot.lock().await;
        let entry = self
            .store
            .read_log(group, reporter, seq.saturating_sub(1), 1)
            .await
            .map_err(|e| match e {
                StoreError::NotMember => {
                    self.refuse(group, reporter, "not_member", RevertRefusal::NotMember)
                }
                e => ("store", OrderingError::Store(e)),
            })?;
        let commit = match entry.first() {
            Some(e) if e.seq == seq && e.kind == EntryKind::Commit => e,
            Some(e) if e.seq > seq => {
                return Err(self.refuse(group, reporter, "not_member", RevertRefusal::NotMember));
            }
            _ => {
                return Err(self.refuse(
                    group,
                    reporter,
                    "not_latest",
                    "the seq is not a commit in the group's log",
                ));
            }
        };
        report
            .verify(group.as_bytes(), &commit.payload)
            .map_err(|e: ReportError| self.refuse(group, reporter, "signature", e))?;
        let req = RevertRequest {
            group_id: group.clone(),
            reporter: *reporter,
            seq,
            report: bytes.to_vec(),
        };
        match self.store.revert(&req).await {
            Err(e) => Err(("store", OrderingError::Store(e))),
            Ok(RevertOutcome::Refused(RevertRefusal::UnknownGroup)) => Err((
                "unknown_group",
                OrderingError::Refused {
                    code: ErrorCode::UnknownGroup,
                    message: "no such group".into(),
                },
            )),
            Ok(RevertOutcome::Refused(why)) => Err(self.refuse(group, reporter, why.rule(), why)),
            Ok(RevertOutcome::AlreadyReverted { seq, epoch }) => {
                Ok((RevertMarker { seq, epoch }, "already_reverted"))
            }
            Ok(RevertOutcome::Reverted(done)) => {
                // The cached view merged the reverted commit: reload it from the store.
                self.views.forget(&mut slot);
                self.hub.resync(group);
                let redactor = &self.observer.redactor;
                warn!(
                    qpq.group = %redactor.hash(group.as_bytes()),
                    qpq.identity = %redactor.hash(done.committer.as_bytes()),
                    qpq.reporter = %redactor.hash(reporter.as_bytes()),
                    commit_seq = seq,
                    marker_seq = done.seq,
                    epoch = done.epoch,
                    "commit reverted on a member's report: its committer signed a commit \
                     members cannot process"
                );
                let marker = RevertMarker {
                    seq: done.seq,
                    epoch: done.epoch,
                };
                Ok((marker, "reverted"))
            }
        }
    }

    /// Logs a refused report (keyed hashes, the rule, no content) and builds its error.
    fn refuse(
        &self,
        group: &GroupId,
        reporter: &IdentityKey,
        rule: &'static str,
        detail: impl std::fmt::Display,
    ) -> (&'static str, OrderingError) {
        let redactor = &self.observer.redactor;
        info!(
            qpq.group = %redactor.hash(group.as_bytes()),
            qpq.identity = %redactor.hash(reporter.as_bytes()),
            rule,
            "commit report refused"
        );
        (rule, refused(rule, detail))
    }
}
