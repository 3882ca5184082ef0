//! Worker threads: each runs a single-threaded tokio runtime with a `LocalSet` (capnp-rpc is
//! `!Send`) and owns a share of the members. The controller sends each worker one command per
//! phase; the worker runs it for all its members at once (setup steps at most `concurrency` at
//! a time) and answers with what it measured.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result};
use quicproquo_core::IdentityKeypair;
use quicproquo_core::mls::SharedValues;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::member::{Member, Plan, Progress};
use crate::stats::Stats;
use crate::steady::{SteadyPlan, run_member, settle_member};
use crate::sys::WORKER_THREAD_PREFIX;

/// What a worker is asked to do.
#[derive(Debug, Clone)]
pub(crate) enum Command {
    /// Connect and bind every member.
    Connect,
    /// Ping every connection.
    Ping,
    /// Claim names and upload KeyPackages.
    Register,
    /// Creators create their groups and add the members.
    Create,
    /// Members join from their Welcomes.
    Join,
    /// Members subscribe to their groups' logs.
    Subscribe,
    /// One steady-state phase.
    Steady(SteadyPlan),
    /// Work off the backlog of an earlier phase, until the given deadline at most.
    Settle(Instant),
    /// Close every connection.
    Close,
}

/// A worker's answer.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// What it measured.
    pub(crate) stats: Stats,
    /// (group, epoch, epoch authenticator) per member and group, after `Join`.
    pub(crate) views: Vec<(usize, u64, Vec<u8>)>,
}

type Request = (Command, oneshot::Sender<Outcome>);

/// A running worker thread.
pub(crate) struct Worker {
    tx: mpsc::UnboundedSender<Request>,
    thread: JoinHandle<()>,
}

impl Worker {
    /// Starts worker `n` with these members (index, identity).
    pub(crate) fn spawn(
        n: usize,
        plan: Arc<Plan>,
        members: Vec<(usize, IdentityKeypair)>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a worker runtime")?;
        let thread = std::thread::Builder::new()
            .name(format!("{WORKER_THREAD_PREFIX}{n}"))
            .spawn(move || {
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, serve(plan, members, rx));
            })
            .context("spawning a worker thread")?;
        Ok(Self { tx, thread })
    }

    /// Sends a command; the answer arrives on the returned receiver.
    pub(crate) fn send(&self, cmd: Command) -> Result<oneshot::Receiver<Outcome>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((cmd, reply))
            .map_err(|_| anyhow::anyhow!("a worker thread has stopped"))?;
        Ok(rx)
    }

    /// Stops the worker (after its current command) and waits for its thread.
    pub(crate) fn stop(self) -> Result<()> {
        drop(self.tx);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("a worker thread panicked"))
    }
}

async fn serve(
    plan: Arc<Plan>,
    identities: Vec<(usize, IdentityKeypair)>,
    mut rx: mpsc::UnboundedReceiver<Request>,
) {
    // The members of this thread hold each group's ratchet tree once between them.
    let shared = SharedValues::new();
    let mut members: Vec<Member> = identities
        .into_iter()
        .map(|(i, id)| Member::new(i, id, &plan, shared.clone()))
        .collect();
    let limit = Semaphore::new(plan.settings.concurrency);
    while let Some((cmd, reply)) = rx.recv().await {
        let stats = Rc::new(RefCell::new(Stats::default()));
        let mut views = Vec::new();
        run(&cmd, &mut members, &plan, &stats, &limit).await;
        if matches!(cmd, Command::Join) {
            views = members.iter().flat_map(Member::views).collect();
        }
        let stats = Rc::try_unwrap(stats)
            .map(RefCell::into_inner)
            .unwrap_or_else(|rc| {
                // A send task outlived its phase (it holds a clone): take what was recorded.
                std::mem::take(&mut *rc.borrow_mut())
            });
        let _ = reply.send(Outcome { stats, views });
    }
    for m in &mut members {
        m.close().await;
    }
}

async fn run(
    cmd: &Command,
    members: &mut [Member],
    plan: &Plan,
    stats: &Rc<RefCell<Stats>>,
    limit: &Semaphore,
) {
    let progress: &Progress = &plan.progress;
    let stats_ref: &RefCell<Stats> = stats;
    let each = members.iter_mut().map(|m| async move {
        match cmd {
            Command::Steady(steady) => {
                run_member(m, plan, steady, stats).await;
                return;
            }
            Command::Settle(deadline) => {
                settle_member(m, plan, *deadline, stats).await;
                Progress::tick(&progress.done);
                return;
            }
            _ => {}
        }
        let Ok(_permit) = limit.acquire().await else {
            return;
        };
        let ok = match cmd {
            Command::Connect => m.connect(plan, stats_ref).await,
            Command::Ping => m.ping(plan, stats_ref).await,
            Command::Register => m.register(plan, stats_ref).await,
            Command::Create => {
                if m.slots.iter().any(|s| s.position == 0) {
                    m.create_groups(plan, stats_ref).await
                } else {
                    return;
                }
            }
            Command::Join => m.join(plan, stats_ref).await,
            Command::Subscribe => m.subscribe(plan, stats_ref).await,
            Command::Close => {
                m.close().await;
                Ok(())
            }
            Command::Steady(_) | Command::Settle(_) => Ok(()),
        };
        if ok.is_ok() {
            Progress::tick(&progress.done);
        }
    });
    futures::future::join_all(each).await;
}
