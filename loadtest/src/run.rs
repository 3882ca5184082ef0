//! The controller: starts (or finds) the server, spreads the members over worker threads,
//! drives the phases one after another, prints progress once a second and assembles the
//! report.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use quicproquo_client::ConnectOptions;
use quicproquo_core::IdentityKeypair;
use tokio::sync::oneshot;

use crate::cli::{Args, Scenario, Settings};
use crate::member::{GroupPlan, Plan, Progress};
use crate::report::{CpuPerItem, Machine, Memory, PhaseReport, Report, Verification, rfc3339};
use crate::server::{self, Endpoint, Target};
use crate::stats::{Stats, counter, metric};
use crate::steady::SteadyPlan;
use crate::sys::{CpuUse, cpu_snapshot, peak_rss, peak_rss_self, raise_nofile_limit, rss};
use crate::threshold::Figures;
use crate::worker::{Command, Outcome, Worker};

/// Time between subscribing everyone and the first planned send.
const SETTLE: Duration = Duration::from_millis(500);

/// Runs the whole load test and returns its report.
pub(crate) fn run(args: &Args, settings: Settings) -> Result<Report> {
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    raise_file_limit(&settings);
    let controller = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let Endpoint {
        addrs,
        cluster_key,
        target,
    } = endpoint(args, &settings, &controller)?;
    let target_name = target.describe(&addrs);
    let mut options = ConnectOptions::new(cluster_key);
    options.timeout = settings.timeout;
    let (plan, workers) = start_workers(&settings, addrs, options)?;

    let mut driver = Driver {
        workers: &workers,
        plan: &plan,
        target: &target,
        quiet: args.quiet,
        phases: Vec::new(),
        memory: Memory {
            server_in_process: target.in_process(),
            ..Memory::default()
        },
    };
    let result = controller.block_on(driver.scenario());
    let (phases, mut memory) = (driver.phases, driver.memory);
    for w in workers {
        w.stop()?;
    }
    memory.process_peak_bytes = peak_rss_self();
    memory.server_peak_bytes = target.pid().and_then(peak_rss);
    target.stop()?;
    result?;
    Ok(report(settings, started_unix, target_name, phases, memory))
}

/// Every member holds a connection; an in-process server holds the other end too. Warns when
/// the open-file limit cannot be raised far enough.
fn raise_file_limit(settings: &Settings) {
    let fds = settings.members as u64 * 2 + 4096;
    let limit = raise_nofile_limit(fds);
    if limit < settings.members as u64 + 256 {
        eprintln!(
            "warning: the open-file limit is {limit}, too low for {} connections",
            settings.members
        );
    }
}

/// The server under test: started here (in this process, or as a child process for the
/// connections scenario or when asked), or the remote `--target`.
fn endpoint(
    args: &Args,
    settings: &Settings,
    controller: &tokio::runtime::Runtime,
) -> Result<Endpoint> {
    if args.target.is_empty() {
        let cap = settings.members + 1024;
        if args.server_process || settings.scenario == Scenario::Connections {
            server::child(cap)
        } else {
            server::in_process(cap)
        }
    } else {
        let key = args.server_key.as_deref().unwrap_or_default();
        controller.block_on(server::remote(&args.target, key, &args.metrics))
    }
}

/// Generates every member's identity, plans the groups and spreads the members round-robin
/// over the worker threads.
fn start_workers(
    settings: &Settings,
    addrs: Vec<SocketAddr>,
    options: ConnectOptions,
) -> Result<(Arc<Plan>, Vec<Worker>)> {
    let keys = (0..settings.members)
        .map(|_| IdentityKeypair::generate())
        .collect::<Result<Vec<_>, _>>()?;
    let plan = Arc::new(Plan {
        groups: plan_groups(settings)?,
        identities: keys.iter().map(IdentityKeypair::public).collect(),
        run_id: hex::encode(&quicproquo_client::chat::random_id()?[..4]),
        addrs,
        options,
        settings: settings.clone(),
        progress: Arc::new(Progress::default()),
        epoch: Instant::now(),
    });
    let mut shares: Vec<Vec<(usize, IdentityKeypair)>> =
        (0..settings.threads).map(|_| Vec::new()).collect();
    for (i, k) in keys.into_iter().enumerate() {
        shares[i % settings.threads].push((i, k));
    }
    let workers = shares
        .into_iter()
        .enumerate()
        .map(|(n, share)| Worker::spawn(n, Arc::clone(&plan), share))
        .collect::<Result<Vec<_>>>()?;
    Ok((plan, workers))
}

/// The report of a finished run: error total and threshold verdicts.
fn report(
    settings: Settings,
    started_unix: u64,
    target: String,
    phases: Vec<PhaseReport>,
    memory: Memory,
) -> Report {
    let errors = phases
        .iter()
        .map(|p| p.stats.errors.values().sum::<u64>())
        .sum();
    let figures = headline(&settings, &phases, errors);
    let thresholds: Vec<_> = settings
        .thresholds
        .iter()
        .map(|t| t.check(&figures))
        .collect();
    let passed = thresholds.iter().all(|v| v.passed);
    Report {
        date: rfc3339(started_unix),
        machine: Machine::detect(),
        target,
        settings,
        phases,
        memory,
        errors,
        thresholds,
        passed,
    }
}

/// Members of each group: group `g`, position `p` is member `(g * size + p) mod members`.
fn plan_groups(s: &Settings) -> Result<Vec<GroupPlan>> {
    if s.scenario == Scenario::Connections {
        return Ok(Vec::new());
    }
    (0..s.groups)
        .map(|g| {
            Ok(GroupPlan {
                id: quicproquo_client::chat::random_id()?,
                members: (0..s.group_size)
                    .map(|p| (g * s.group_size + p) % s.members)
                    .collect(),
            })
        })
        .collect()
}

/// The figures thresholds are checked against.
fn headline(s: &Settings, phases: &[PhaseReport], errors: u64) -> Figures {
    let (phase, name) = match s.scenario {
        Scenario::Messages => (phases.iter().find(|p| p.rate.is_some()), metric::DELIVERY),
        Scenario::Connections => (phases.iter().find(|p| p.name == "connect"), metric::CONNECT),
    };
    let mut f = Figures {
        errors: errors as f64,
        ..Figures::default()
    };
    if let Some(p) = phase {
        f.rate = p.throughput_per_s.unwrap_or(0.0);
        if let Some(h) = p.stats.latency_ms.get(name) {
            (f.p50, f.p90, f.p99, f.p999, f.max, f.mean) =
                (h.p50, h.p90, h.p99, h.p999, h.max, h.mean);
        } else {
            // Nothing measured: no latency rule can pass.
            (f.p50, f.p90, f.p99, f.p999, f.max, f.mean) = (
                f64::INFINITY,
                f64::INFINITY,
                f64::INFINITY,
                f64::INFINITY,
                f64::INFINITY,
                f64::INFINITY,
            );
        }
    }
    f
}

/// Deliveries per second of a steady phase, or bound connections per second of the connect
/// phase; `None` for the other phases.
fn throughput(name: &str, steady: bool, measure_from: Instant, stats: &Stats) -> Option<f64> {
    if steady {
        let window = Instant::now().saturating_duration_since(measure_from);
        let delivered = stats.counter(counter::DELIVERED) as f64;
        // From the first planned send until the last member finished (everything
        // delivered, or the drain time over).
        Some(delivered / window.as_secs_f64().max(1e-3))
    } else if name == "connect" {
        // Bound connections per second until the last one was bound (a straggler that
        // ends in a timeout does not stretch the figure).
        let n = stats.counter(counter::LAST_BOUND_US).max(1);
        let bound = stats.summary(metric::BIND).map_or(0, |h| h.count);
        Some(bound as f64 / (n as f64 / 1e6))
    } else {
        None
    }
}

/// CPU per join, per delivery or per connection, over a phase that took `wall`; `None` when
/// the phase did no such unit of work.
fn cpu_per_item(cmd: &Command, stats: &Stats, cpu: &CpuUse, wall: Duration) -> Option<CpuPerItem> {
    let items = match cmd {
        Command::Join => stats.counter(counter::JOINED),
        Command::Steady(_) => stats.counter(counter::DELIVERED),
        Command::Connect => stats.summary(metric::CONNECT).map_or(0, |h| h.count),
        _ => 0,
    };
    let per_item = |cores: f64| cores * wall.as_secs_f64() * 1e6 / items as f64;
    (items > 0).then(|| CpuPerItem {
        items,
        generator_us: per_item(cpu.generator_cores),
        server_us: cpu.server_cores.map(per_item),
    })
}

/// Drives the phases.
struct Driver<'a> {
    workers: &'a [Worker],
    plan: &'a Arc<Plan>,
    target: &'a Target,
    quiet: bool,
    phases: Vec<PhaseReport>,
    memory: Memory,
}

impl Driver<'_> {
    async fn scenario(&mut self) -> Result<()> {
        let s = &self.plan.settings;
        match s.scenario {
            Scenario::Messages => self.messages().await,
            Scenario::Connections => self.connections().await,
        }
    }

    async fn messages(&mut self) -> Result<()> {
        let s = self.plan.settings.clone();
        let joiners = s.groups * (s.group_size - 1);
        self.phase("connect", Command::Connect, s.members).await?;
        self.phase("register", Command::Register, s.members).await?;
        self.phase("create groups + add members", Command::Create, s.groups)
            .await?;
        let views = self
            .phase("join (process Welcomes)", Command::Join, joiners)
            .await?;
        self.check_views(&views);
        self.phase("subscribe", Command::Subscribe, s.members)
            .await?;
        for (n, &rate) in s.rates.iter().enumerate() {
            if n > 0 {
                // Start each further rate from an empty backlog, so that it measures only
                // its own traffic.
                let deadline = Instant::now() + s.drain;
                self.phase("settle backlog", Command::Settle(deadline), s.members)
                    .await?;
            }
            let steady = SteadyPlan {
                phase: u32::try_from(n).unwrap_or(u32::MAX),
                start: Instant::now() + SETTLE,
                rate,
                duration: s.duration,
                drain: s.drain,
            };
            let name = format!("steady state {rate} msg/s");
            self.phase(&name, Command::Steady(steady), 0).await?;
        }
        self.phase("close", Command::Close, s.members).await?;
        Ok(())
    }

    async fn connections(&mut self) -> Result<()> {
        let s = self.plan.settings.clone();
        let pid = self.target.pid();
        let before_server = pid.and_then(rss);
        let before_self = rss(std::process::id());
        self.phase("connect", Command::Connect, s.members).await?;
        let connected = self.plan.progress.done.load(Ordering::Relaxed).max(1) as f64;
        // Hold the connections idle; the server's memory settles meanwhile.
        if !self.quiet {
            eprintln!("holding {connected} idle connections for {:?}", s.duration);
        }
        tokio::time::sleep(s.duration).await;
        if let (Some(b), Some(a)) = (before_server, pid.and_then(rss)) {
            self.memory.server_bytes_per_idle_connection =
                Some(a.saturating_sub(b) as f64 / connected);
        }
        if let (Some(b), Some(a)) = (before_self, rss(std::process::id())) {
            self.memory.generator_bytes_per_idle_connection =
                Some(a.saturating_sub(b) as f64 / connected);
        }
        self.phase("ping idle connections", Command::Ping, s.members)
            .await?;
        self.phase("close", Command::Close, s.members).await?;
        Ok(())
    }

    /// Runs one phase on every worker; `total` is what the progress line counts towards.
    async fn phase(
        &mut self,
        name: &str,
        cmd: Command,
        total: usize,
    ) -> Result<Vec<(usize, u64, Vec<u8>)>> {
        let progress = &self.plan.progress;
        progress.done.store(0, Ordering::Relaxed);
        let counts0 = (
            progress.sent.load(Ordering::Relaxed),
            progress.delivered.load(Ordering::Relaxed),
        );
        let child = self.target.pid();
        let in_process = self.target.in_process();
        let cpu0 = cpu_snapshot(child);
        let verified0 = self.target.verifications();
        let started = Instant::now();
        let since_epoch = started.saturating_duration_since(self.plan.epoch);
        progress.phase_start_us.store(
            u64::try_from(since_epoch.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let (rate, measure_from) = match &cmd {
            Command::Steady(p) => (Some(p.rate), p.start),
            _ => (None, started),
        };
        let replies = self
            .workers
            .iter()
            .map(|w| w.send(cmd.clone()))
            .collect::<Result<Vec<_>>>()?;
        let outcomes = self
            .await_replies(name, total, rate.is_some(), started, counts0, replies)
            .await;
        let wall = started.elapsed();
        let cpu = CpuUse::since(&cpu0, child, in_process);
        let verification = Verification::between(verified0, self.target.verifications());
        let mut stats = Stats::default();
        let mut views = Vec::new();
        for o in outcomes {
            let o = o.context("a worker thread stopped")?;
            stats.merge(o.stats);
            views.extend(o.views);
        }
        let throughput = throughput(name, rate.is_some(), measure_from, &stats);
        let cpu_per_item = cpu_per_item(&cmd, &stats, &cpu, wall);
        if !self.quiet {
            eprintln!(
                "[{:>6.1}s] {name}: finished, errors {}",
                wall.as_secs_f64(),
                stats.error_count()
            );
        }
        self.phases.push(PhaseReport {
            name: name.to_owned(),
            wall_s: wall.as_secs_f64(),
            cpu,
            rate,
            throughput_per_s: throughput,
            cpu_per_item,
            stats: stats.snapshot(),
            verification,
        });
        Ok(views)
    }

    /// Waits for every worker's answer, printing a progress line once a second (unless
    /// quiet): messages sent and delivered since `counts0` (sent, delivered) in a steady
    /// phase, otherwise how much of `total` is done.
    async fn await_replies(
        &self,
        name: &str,
        total: usize,
        steady: bool,
        started: Instant,
        counts0: (u64, u64),
        replies: Vec<oneshot::Receiver<Outcome>>,
    ) -> Vec<Result<Outcome, oneshot::error::RecvError>> {
        let progress = &self.plan.progress;
        let (sent0, delivered0) = counts0;
        let mut all = futures::future::join_all(replies);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut last_delivered = delivered0;
        loop {
            tokio::select! {
                r = &mut all => break r,
                _ = tick.tick() => {
                    if self.quiet { continue; }
                    let d = progress.delivered.load(Ordering::Relaxed);
                    let line = if steady {
                        format!(
                            "sent {} delivered {} ({}/s)",
                            progress.sent.load(Ordering::Relaxed) - sent0,
                            d - delivered0,
                            d - last_delivered
                        )
                    } else {
                        format!("{}/{total} done", progress.done.load(Ordering::Relaxed))
                    };
                    last_delivered = d;
                    eprintln!(
                        "[{:>6.1}s] {name}: {line}, errors {}",
                        started.elapsed().as_secs_f64(),
                        progress.errors.load(Ordering::Relaxed)
                    );
                }
            }
        }
    }

    /// Every member of a group must be at the same epoch with the same epoch authenticator.
    fn check_views(&mut self, views: &[(usize, u64, Vec<u8>)]) {
        let mut first: HashMap<usize, (u64, &[u8])> = HashMap::new();
        let mut split = 0u64;
        for (g, epoch, auth) in views {
            match first.get(g) {
                None => {
                    first.insert(*g, (*epoch, auth.as_slice()));
                }
                Some((e, a)) if *e == *epoch && *a == auth.as_slice() => {}
                Some(_) => split += 1,
            }
        }
        if split > 0
            && let Some(p) = self.phases.last_mut()
        {
            p.stats.errors.insert(
                "members disagree about the group (split view)".into(),
                split,
            );
        }
    }
}
