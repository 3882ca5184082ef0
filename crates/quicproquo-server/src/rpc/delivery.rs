//! The Delivery Service as served to a bound connection (on an edge or a standalone node),
//! forwarding the calls that order a log to its [`Backend`]: this process's own appender, or
//! the group's owner shard in the cluster.
//!
//! The service never decrypts anything: it reads a message's kind, group and epoch from the
//! public MLS framing, checks the caller's membership through the store, and stores the
//! opaque bytes. Every method acts for the bound identity only.

use std::rc::Rc;

use quicproquo_core::IdentityKey;
use quicproquo_core::group::{MessageKind, inspect};
use quicproquo_proto::delivery_capnp::{delivery_service, subscription};
use quicproquo_proto::errors::{ErrorCode, error};

use super::backend::Backend;
use super::frames::ConnectionFrames;
use super::subscribe;
use crate::model::group::{AppendRequest, CommitChange, EntryKind, GroupId, MAX_MESSAGE_ID};
use crate::model::page::Page;
use crate::obs::calls::InFlight;
use crate::obs::spans::record_group;
use crate::store::log::LogStore;
use crate::store::retention::RetentionStore;
use crate::wire::codec::{write_envelope, write_outcome, write_welcome};
use crate::wire::{model_error, ordering_error, parse, store_error};

/// Most entries or Welcomes returned by one fetch.
pub const MAX_FETCH: u32 = 1000;

/// The Delivery Service of one bound connection.
pub(super) struct DeliveryService {
    identity: IdentityKey,
    backend: Backend,
    in_flight: Rc<InFlight>,
    /// Byte budget of one page of `fetch` or `inbox`.
    reply_bytes: usize,
    /// Most subscriptions (group and inbox) the connection may hold.
    max_subscriptions: usize,
    /// The connection's push frames (`None`: it carries none).
    frames: Option<ConnectionFrames>,
}

impl DeliveryService {
    pub(super) fn new(
        identity: IdentityKey,
        backend: Backend,
        in_flight: Rc<InFlight>,
        (reply_bytes, max_subscriptions): (usize, usize),
        frames: Option<ConnectionFrames>,
    ) -> Self {
        Self {
            identity,
            backend,
            in_flight,
            reply_bytes,
            max_subscriptions,
            frames,
        }
    }

    /// Refuses a new subscription when the connection holds the most it may.
    fn check_subscription_room(&self) -> Result<(), capnp::Error> {
        if self.in_flight.subscriptions() >= self.max_subscriptions {
            return Err(error(
                ErrorCode::LimitReached,
                format!(
                    "this connection holds {} subscriptions, the most allowed",
                    self.max_subscriptions
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a subscription to `group` after `after_seq` that could push nothing: only current
    /// members may subscribe (a removed member can still fetch the commit that removed it),
    /// and a subscriber behind what retention kept is told so now (reading its first entry
    /// says whether it is). Refused up front rather than in the background task.
    /// Opens a frame subscription (`subscribeFrames`) to `group` after `after_seq`, named
    /// `tag` by the caller, with a window of at most `asked` bytes (0: the node's reply
    /// budget); the subscription and the window granted.
    async fn open_frames(
        &self,
        group: &[u8],
        after_seq: u64,
        tag: u64,
        asked: u64,
    ) -> Result<(subscription::Client, usize), capnp::Error> {
        let group = self.group(group)?;
        self.check_subscriber(&group, after_seq).await?;
        let frames = self.frames.as_ref().ok_or_else(|| {
            error(
                ErrorCode::InvalidArgument,
                "this connection carries no push frames",
            )
        })?;
        let registration = frames.register(group.clone(), tag).ok_or_else(|| {
            error(
                ErrorCode::InvalidArgument,
                "this connection already holds a frame subscription to the group",
            )
        })?;
        let window = match usize::try_from(asked) {
            Ok(0) => self.reply_bytes,
            Ok(asked) => asked.min(self.reply_bytes),
            Err(_) => self.reply_bytes,
        };
        let subscription = subscribe::group_frames(
            &self.in_flight,
            self.backend.clone(),
            self.identity,
            group,
            after_seq,
            registration,
            window,
        );
        Ok((subscription, window))
    }

    async fn check_subscriber(&self, group: &GroupId, after_seq: u64) -> Result<(), capnp::Error> {
        let store = self.backend.store();
        store
            .check_member(group, &self.identity)
            .await
            .map_err(store_error)?;
        if after_seq < store.pruned_seq(group).await.map_err(store_error)? {
            store
                .read_log(group, &self.identity, after_seq, Page::new(1, 1))
                .await
                .map_err(store_error)?;
        }
        self.check_subscription_room()
    }

    /// Parses the group a call names and records its keyed hash on the call's span.
    fn group(&self, bytes: &[u8]) -> Result<GroupId, capnp::Error> {
        let group = parse::group_id(bytes)?;
        record_group(
            &tracing::Span::current(),
            self.in_flight.observer(),
            group.as_bytes(),
        );
        Ok(group)
    }

    /// Builds the append request for `message`, checking its framing against the call.
    fn request(
        &self,
        params: delivery_service::send_params::Reader<'_>,
    ) -> Result<AppendRequest, capnp::Error> {
        let group = parse::group_id(params.get_group_id()?)?;
        let message_id = params.get_message_id()?;
        if message_id.is_empty() || message_id.len() > MAX_MESSAGE_ID {
            return Err(error(
                ErrorCode::InvalidArgument,
                "message id must be 1 to 64 bytes",
            ));
        }
        let payload = params.get_message()?;
        let welcome_len = if params.has_commit() {
            let c = params.get_commit()?;
            c.get_welcome()?.len() + c.get_group_info()?.len()
        } else {
            0
        };
        // Refused before anything is parsed or copied (the appender applies the same rule).
        let size = payload.len() + welcome_len;
        let max = self.backend.max_message_bytes();
        if size > max {
            return Err(model_error(crate::model::ModelError::TooLarge {
                size,
                max,
            }));
        }
        let info = inspect(payload).map_err(|e| error(ErrorCode::BadMessage, e))?;
        let keyless = matches!(info.kind, MessageKind::Welcome | MessageKind::KeyPackage);
        if !keyless && info.group_id.as_deref() != Some(group.as_bytes()) {
            return Err(error(ErrorCode::BadMessage, "message is for another group"));
        }
        let epoch = info.epoch.unwrap_or(0);
        let (kind, commit) = match info.kind {
            MessageKind::Application if !info.encrypted => {
                return Err(error(
                    ErrorCode::BadMessage,
                    "an application message must be a PrivateMessage (RFC 9420 forbids \
                     unencrypted application messages)",
                ));
            }
            MessageKind::Application => (EntryKind::Application, None),
            MessageKind::Proposal => (EntryKind::Proposal, None),
            MessageKind::Commit => {
                if !params.has_commit() {
                    return Err(error(
                        ErrorCode::BadMessage,
                        "a commit must carry its GroupInfo (and Welcome, if it adds members)",
                    ));
                }
                let c = params.get_commit()?;
                if c.has_obsolete_added() && !c.get_obsolete_added()?.is_empty()
                    || c.has_obsolete_removed() && !c.get_obsolete_removed()?.is_empty()
                {
                    return Err(error(
                        ErrorCode::BadCommit,
                        "membership: a commit no longer declares whom it adds or removes; \
                         the server derives it from the verified commit",
                    ));
                }
                let welcome = c.get_welcome()?;
                let group_info = c.get_group_info()?;
                let change = CommitChange {
                    added: Vec::new(),
                    removed: Vec::new(),
                    welcome: (!welcome.is_empty()).then(|| welcome.to_vec()),
                    group_info: (!group_info.is_empty()).then(|| group_info.to_vec()),
                };
                (EntryKind::Commit, Some(change))
            }
            MessageKind::Welcome => {
                return Err(error(
                    ErrorCode::BadMessage,
                    "a Welcome is not a group message: send it with the commit that adds its \
                     members",
                ));
            }
            MessageKind::KeyPackage => {
                return Err(error(
                    ErrorCode::BadMessage,
                    "a KeyPackage is not a group message: upload it to the Authentication \
                     Service",
                ));
            }
            MessageKind::GroupInfo => {
                return Err(error(
                    ErrorCode::BadMessage,
                    "a GroupInfo is not a group message: send it with the commit it follows",
                ));
            }
        };
        Ok(AppendRequest {
            group_id: group,
            sender: self.identity,
            message_id: message_id.to_vec(),
            kind,
            epoch,
            payload: payload.to_vec(),
            commit,
            view: None,
        })
    }
}

impl delivery_service::Server for DeliveryService {
    async fn create_group(
        self: Rc<Self>,
        params: delivery_service::CreateGroupParams,
        _results: delivery_service::CreateGroupResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "DeliveryService",
            "createGroup",
            params,
            async move {
                let p = params.get()?;
                let group = self.group(p.get_group_id()?)?;
                let group_info = p.get_group_info()?;
                let max = self.backend.max_message_bytes();
                if group_info.len() > max {
                    return Err(model_error(crate::model::ModelError::TooLarge {
                        size: group_info.len(),
                        max,
                    }));
                }
                self.backend
                    .create_group(&group, &self.identity, group_info.to_vec())
                    .await
                    .map_err(ordering_error)
            }
        )
    }

    async fn send(
        self: Rc<Self>,
        params: delivery_service::SendParams,
        mut results: delivery_service::SendResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "DeliveryService",
            "send",
            params,
            async move {
                let req = self.request(params.get()?)?;
                // The server side of a send: messaging attributes without an operation type
                // (none of the conventions' types is a SERVER span).
                let span = tracing::Span::current();
                record_group(&span, self.in_flight.observer(), req.group_id.as_bytes());
                span.record("messaging.system", "quicproquo");
                span.record("messaging.operation.name", "send");
                let size = i64::try_from(req.payload.len()).unwrap_or(i64::MAX);
                span.record("messaging.message.body.size", size);
                let outcome = self.backend.append(req).await.map_err(ordering_error)?;
                write_outcome(results.get().init_result(), outcome)?;
                Ok(())
            }
        )
    }

    async fn fetch(
        self: Rc<Self>,
        params: delivery_service::FetchParams,
        mut results: delivery_service::FetchResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "DeliveryService",
            "fetch",
            params,
            async move {
                let p = params.get()?;
                let group = self.group(p.get_group_id()?)?;
                // One page, by count and by bytes: the client asks again after its last seq.
                let page = Page::new(p.get_limit().clamp(1, MAX_FETCH), self.reply_bytes);
                let entries = self
                    .backend
                    .store()
                    .read_log(&group, &self.identity, p.get_after_seq(), page)
                    .await
                    .map_err(store_error)?;
                let mut list = results.get().init_entries(entries.len() as u32);
                for (i, e) in entries.iter().enumerate() {
                    write_envelope(list.reborrow().get(i as u32), &group, e);
                }
                Ok(())
            }
        )
    }

    async fn subscribe(
        self: Rc<Self>,
        params: delivery_service::SubscribeParams,
        mut results: delivery_service::SubscribeResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "DeliveryService",
            "subscribe",
            params,
            async move {
                let p = params.get()?;
                let group = self.group(p.get_group_id()?)?;
                let after_seq = p.get_after_seq();
                self.check_subscriber(&group, after_seq).await?;
                let subscription = subscribe::group(
                    &self.in_flight,
                    self.backend.clone(),
                    self.identity,
                    group,
                    after_seq,
                    p.get_stream()?,
                    self.reply_bytes,
                );
                results.get().set_subscription(subscription);
                Ok(())
            }
        )
    }

    async fn subscribe_frames(
        self: Rc<Self>,
        params: delivery_service::SubscribeFramesParams,
        mut results: delivery_service::SubscribeFramesResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "DeliveryService",
            "subscribeFrames",
            params,
            async move {
                let p = params.get()?;
                let (group, tag) = (p.get_group_id()?, p.get_tag());
                let asked = p.get_window_bytes();
                match self.open_frames(group, p.get_after_seq(), tag, asked).await {
                    Ok((subscription, window)) => {
                        let mut r = results.get();
                        r.set_subscription(subscription);
                        r.set_window_bytes(window as u64);
                        Ok(())
                    }
                    Err(e) => {
                        // Every call is followed by its `ended` frame, a refused one too.
                        if let Some(frames) = &self.frames {
                            frames.refused(group, tag);
                        }
                        Err(e)
                    }
                }
            }
        )
    }

    async fn acknowledge(
        self: Rc<Self>,
        params: delivery_service::AcknowledgeParams,
        _results: delivery_service::AcknowledgeResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "DeliveryService",
            "acknowledge",
            params,
            async move {
                let p = params.get()?;
                let group = parse::group_id(p.get_group_id()?)?;
                self.backend
                    .store()
                    .set_cursor(&self.identity, &group, p.get_seq())
                    .await
                    .map_err(store_error)
            }
        )
    }

    async fn groups(
        self: Rc<Self>,
        params: delivery_service::GroupsParams,
        mut results: delivery_service::GroupsResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "DeliveryService",
            "groups",
            params,
            async move {
                let store = self.backend.store();
                let ids = store.groups_of(&self.identity).await.map_err(store_error)?;
                let mut summaries = Vec::with_capacity(ids.len());
                for g in &ids {
                    let summary = store
                        .group_summary(g, &self.identity)
                        .await
                        .map_err(store_error)?;
                    let cursor = store.cursor(&self.identity, g).await.map_err(store_error)?;
                    summaries.push((summary, cursor));
                }
                let mut list = results.get().init_groups(summaries.len() as u32);
                for (i, (s, cursor)) in summaries.iter().enumerate() {
                    let mut g = list.reborrow().get(i as u32);
                    g.set_group_id(s.group_id.as_bytes());
                    g.set_epoch(s.epoch);
                    g.set_last_seq(s.last_seq);
                    g.set_cursor(*cursor);
                    let mut members = g.init_members(s.members.len() as u32);
                    for (j, m) in s.members.iter().enumerate() {
                        members.set(j as u32, m.as_bytes());
                    }
                }
                Ok(())
            }
        )
    }

    async fn inbox(
        self: Rc<Self>,
        params: delivery_service::InboxParams,
        mut results: delivery_service::InboxResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "DeliveryService",
            "inbox",
            params,
            async move {
                let p = params.get()?;
                let page = Page::new(p.get_limit().clamp(1, MAX_FETCH), self.reply_bytes);
                let welcomes = self
                    .backend
                    .store()
                    .read_inbox(&self.identity, p.get_after_seq(), page)
                    .await
                    .map_err(store_error)?;
                let mut list = results.get().init_welcomes(welcomes.len() as u32);
                for (i, w) in welcomes.iter().enumerate() {
                    write_welcome(list.reborrow().get(i as u32), w);
                }
                Ok(())
            }
        )
    }

    async fn group_info(
        self: Rc<Self>,
        params: delivery_service::GroupInfoParams,
        mut results: delivery_service::GroupInfoResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "DeliveryService",
            "groupInfo",
            params,
            async move {
                let group = self.group(params.get()?.get_group_id()?)?;
                let store = self.backend.store();
                // Current members only (refused with not_member or unknown_group otherwise).
                store
                    .check_member(&group, &self.identity)
                    .await
                    .map_err(store_error)?;
                let (info, epoch) = store
                    .group_info(&group)
                    .await
                    .map_err(store_error)?
                    .ok_or_else(|| error(ErrorCode::UnknownGroup, "the group has no GroupInfo"))?;
                let mut r = results.get();
                r.set_group_info(&info);
                r.set_epoch(epoch);
                Ok(())
            }
        )
    }

    async fn report_commit(
        self: Rc<Self>,
        params: delivery_service::ReportCommitParams,
        mut results: delivery_service::ReportCommitResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "DeliveryService",
            "reportCommit",
            params,
            async move {
                let p = params.get()?;
                let group = self.group(p.get_group_id()?)?;
                let report = p.get_report()?;
                if report.len() != quicproquo_core::report::REPORT_LEN {
                    return Err(error(
                        ErrorCode::ReportRefused,
                        "malformed: a commit report is 137 bytes",
                    ));
                }
                let marker = self
                    .backend
                    .report_commit(&group, &self.identity, p.get_seq(), report.to_vec())
                    .await
                    .map_err(ordering_error)?;
                let mut r = results.get();
                r.set_revert_seq(marker.seq);
                r.set_epoch(marker.epoch);
                Ok(())
            }
        )
    }

    async fn subscribe_inbox(
        self: Rc<Self>,
        params: delivery_service::SubscribeInboxParams,
        mut results: delivery_service::SubscribeInboxResults,
    ) -> Result<(), capnp::Error> {
        serve!(
            self.in_flight,
            "DeliveryService",
            "subscribeInbox",
            params,
            async move {
                let p = params.get()?;
                self.check_subscription_room()?;
                let subscription = subscribe::inbox(
                    &self.in_flight,
                    self.backend.clone(),
                    self.identity,
                    p.get_after_seq(),
                    p.get_stream()?,
                    self.reply_bytes,
                );
                results.get().set_subscription(subscription);
                Ok(())
            }
        )
    }
}
