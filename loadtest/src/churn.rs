//! Churn during the steady state: a group's creator removes members and adds them back
//! (two commits per step), and a removed member joins again from the new Welcome.

use std::time::Instant;

use quicproquo_client::commit::{
    COMMIT_ATTEMPTS, CommitDriver, CommitHost, LogReader, Start, drive,
};
use quicproquo_client::delivery::{Envelope, Welcome};
use quicproquo_core::IdentityKey;
use quicproquo_core::group::{CommitOutput, Group};
use quicproquo_core::mls::MlsProvider;
use quicproquo_proto::errors::ErrorCode;

use crate::member::{Counted, GroupSlot, commit_failed, fail, is_own, message_id};
use crate::stats::{counter, error_kind, metric};
use crate::steady::{Ctx, Standing, handle_batch};

/// Joins again from the Welcome of the commit that re-added us, and resubscribes.
pub(crate) async fn rejoin(
    ctx: &Ctx<'_>,
    slot: &mut GroupSlot,
    welcomes: Vec<Welcome>,
    standing: &mut Standing,
) -> Result<(), Counted> {
    let (stats, progress) = (ctx.stats, &ctx.plan.progress);
    let Standing::Out(removed_at, _) = standing else {
        return Ok(());
    };
    let removed_at = *removed_at;
    for w in welcomes {
        ctx.inbox_cursor.set(ctx.inbox_cursor.get().max(w.seq));
        if w.group_id != slot.id || w.commit_seq <= slot.cursor {
            continue;
        }
        // A removal we never saw (the subscription ended first) leaves the old state active,
        // and joining would refuse to replace it.
        if let Some(old) = slot.group.take_if(|g| g.is_active()) {
            let _ = old.delete(ctx.provider);
        }
        let t = Instant::now();
        let group = Group::join(ctx.provider, &w.welcome)
            .map_err(|_| fail(stats, progress, "welcome processing (rejoin)".into()))?;
        stats
            .borrow_mut()
            .record(metric::WELCOME_PROCESS, t.elapsed());
        // Messages of earlier epochs that reach us after the Welcome are not for us.
        slot.joined_epoch = group.epoch();
        slot.group = Some(group);
        slot.cursor = w.commit_seq;
        let sub = ctx
            .session
            .delivery
            .subscribe(&slot.id, w.commit_seq)
            .await
            .map_err(|e| fail(stats, progress, error_kind("resubscribe", &e)))?;
        slot.sub = Some(sub);
        *standing = Standing::In;
        stats
            .borrow_mut()
            .record(metric::REJOIN, removed_at.elapsed());
        return Ok(());
    }
    Ok(())
}

/// Drives the commit `build` stages into the log (see `quicproquo_client::commit`): what the
/// log holds ahead of it is read first, as in the steady loop (`received`/`standing`).
async fn commit(
    ctx: &Ctx<'_>,
    slot: &mut GroupSlot,
    received: &mut u64,
    standing: &mut Standing,
    build: impl FnMut(&mut Group, &MlsProvider) -> Result<CommitOutput, Counted>,
) -> Result<(), Counted> {
    let driver = CommitDriver::new(COMMIT_ATTEMPTS, slot.cursor);
    let group_id = slot.id.clone();
    let mut host = Committer {
        ctx,
        slot,
        received,
        standing,
        build,
    };
    drive(
        &ctx.session.delivery,
        &group_id,
        &mut host,
        driver,
        Start::Build,
    )
    .await
    .map_err(|e| commit_failed(ctx.stats, &ctx.plan.progress, e))?;
    Ok(())
}

/// The churning creator's side of a commit: its group slot, read as in the steady loop.
struct Committer<'c, 'x, B> {
    ctx: &'c Ctx<'x>,
    slot: &'c mut GroupSlot,
    received: &'c mut u64,
    standing: &'c mut Standing,
    build: B,
}

impl<B> LogReader for Committer<'_, '_, B> {
    type Error = Counted;

    fn cursor(&self) -> u64 {
        self.slot.cursor
    }

    async fn apply(&mut self, entries: &[Envelope]) -> Result<bool, Counted> {
        handle_batch(self.ctx, self.slot, entries, self.received, self.standing).await?;
        Ok(matches!(self.standing, Standing::In))
    }
}

impl<B> CommitHost for Committer<'_, '_, B>
where
    B: FnMut(&mut Group, &MlsProvider) -> Result<CommitOutput, Counted>,
{
    fn group(&mut self) -> Result<(&mut Group, &MlsProvider), Counted> {
        let group = self.slot.group.as_mut().ok_or(Counted)?;
        Ok((group, self.ctx.provider))
    }

    fn is_own(&self, entry: &Envelope) -> bool {
        is_own(&entry.message_id, self.ctx.index)
    }

    fn build(&mut self) -> Result<CommitOutput, Counted> {
        let group = self.slot.group.as_mut().ok_or(Counted)?;
        (self.build)(group, self.ctx.provider)
    }

    fn own_message_id(&mut self) -> Result<Vec<u8>, Counted> {
        let (stats, progress) = (self.ctx.stats, &self.ctx.plan.progress);
        message_id(self.ctx.index).map_err(|_| fail(stats, progress, "rng".into()))
    }
}

/// One churn step by the group's creator: remove `churn` members in one commit, then add
/// them back (fresh KeyPackages, one batch fetch) in another. Before merging each commit it
/// reads what the log holds ahead of it (`received`/`standing` as in the steady loop).
pub(crate) async fn step(
    ctx: &Ctx<'_>,
    slot: &mut GroupSlot,
    round: usize,
    received: &mut u64,
    standing: &mut Standing,
) -> Result<(), Counted> {
    let (stats, progress) = (ctx.stats, &ctx.plan.progress);
    let n = ctx.plan.settings.churn;
    let members = &ctx.plan.groups[slot.index].members;
    let others = members.len() - 1;
    let victims: Vec<IdentityKey> = (0..n)
        .map(|k| members[1 + (round * n + k) % others])
        .map(|m| ctx.plan.identities[m])
        .collect();
    let t = Instant::now();
    commit(ctx, slot, received, standing, |g, provider| {
        g.remove_members(provider, ctx.mls, &victims)
            .map_err(|_| fail(stats, progress, "commit build (remove)".into()))
    })
    .await?;
    {
        let mut s = stats.borrow_mut();
        s.record(metric::COMMIT, t.elapsed());
        s.count(counter::CHURN, 1);
    }
    let t = Instant::now();
    let fetched = ctx
        .session
        .auth
        .fetch_key_packages(&victims)
        .await
        .map_err(|e| fail(stats, progress, error_kind("keypackage fetch", &e)))?;
    stats.borrow_mut().record(metric::KP_FETCH, t.elapsed());
    if fetched.len() < victims.len() {
        return Err(fail(
            stats,
            progress,
            "no keypackage available (churn)".into(),
        ));
    }
    let packages: Vec<Vec<u8>> = fetched.into_iter().map(|k| k.data).collect();
    commit(ctx, slot, received, standing, |g, provider| {
        g.add_members(provider, ctx.mls, &packages)
            .map_err(|_| fail(stats, progress, "commit build (add)".into()))
    })
    .await?;
    let mut s = stats.borrow_mut();
    s.record(metric::COMMIT, t.elapsed());
    s.count(counter::CHURN, 1);
    Ok(())
}

/// After the server ended our subscription without our having seen a removal: subscribe again
/// from our cursor, as a client would. If the server says we are no longer a member, churn
/// removed us (the commit fell outside what we were sent): wait for the Welcome instead.
pub(crate) async fn resubscribe(
    ctx: &Ctx<'_>,
    slot: &mut GroupSlot,
    standing: &mut Standing,
) -> Result<(), Counted> {
    let (stats, progress) = (ctx.stats, &ctx.plan.progress);
    match ctx.session.delivery.subscribe(&slot.id, slot.cursor).await {
        Ok(sub) => {
            slot.sub = Some(sub);
            stats.borrow_mut().count(counter::RESUBSCRIBED, 1);
            Ok(())
        }
        Err(e) if ctx.plan.settings.churn > 0 && e.code() == Some(ErrorCode::NotMember) => {
            let inbox = ctx
                .session
                .delivery
                .subscribe_inbox(ctx.inbox_cursor.get())
                .await
                .map_err(|e| fail(stats, progress, error_kind("subscribe inbox", &e)))?;
            stats.borrow_mut().count(counter::RESUBSCRIBED, 1);
            *standing = Standing::Out(Instant::now(), inbox);
            Ok(())
        }
        Err(e) => Err(fail(
            stats,
            progress,
            error_kind("subscription ended; resubscribe", &e),
        )),
    }
}
