//! The Delivery Service end to end: one MLS group of 100 members through the real server.
//!
//! Everything runs in this process: a `standalone` server (its embedded store in a temporary
//! directory, fsync on every commit) on an ephemeral loopback port, and 100 clients, each with
//! its own Noise connection, bound session and MLS state, all on one client thread.
//!
//! 1. **Setup** (timed, but not part of the figures): every user registers (connects, binds,
//!    claims a name, uploads KeyPackages); the first creates the group and adds the other 99 in
//!    one commit (one batch KeyPackage fetch); each of them joins from its Welcome. All members
//!    must then agree on the epoch authenticator.
//! 2. **Appends per second**: a few members send application messages as fast as the server
//!    acknowledges them, each with several sends in flight on its connection. The messages are
//!    real MLS PrivateMessages encrypted *before* the timed run (a pool per sender, replayed
//!    with fresh message ids: the server only reads the public framing, and nobody decrypts
//!    them), so the figure is the server's, not the client's MLS. The encryption cost is
//!    reported on its own line.
//! 3. **Delivery latency**: all members subscribe (live push); other members send at a fixed
//!    rate (pre-encrypted, in order). Latency runs from a message's *planned* send time (so a
//!    stalled sender cannot hide queueing: no coordinated omission) to the moment a
//!    recipient's subscription yields it, for each of the 99 recipients. After the run every
//!    recipient decrypts what it received, checked against what was sent: that MLS cost is
//!    reported separately, as it is client CPU. The latency is also split at the server's
//!    append time (durable), and per message into first and last recipient. Its senders are
//!    other members than the append run's, whose ratchets that run moved further ahead than a
//!    recipient may skip.
//!
//! Client, MLS and server share the machine's cores; the output shows, per phase, the CPU
//! each part used (Linux `/proc`, best effort), how busy the whole machine was, and the CPU
//! per append and per push. A disk probe (small write + fdatasync next to the store, before
//! the appends and every 20 ms during the latency run) tells a slow disk from a slow server.
//!
//! Run: `cargo bench -p quicproquo-server --bench delivery` (add `-- --hybrid`, or set
//! `QPQ_BENCH_SUITE=hybrid`, for the post-quantum hybrid suite). `QPQ_BENCH_MEMBERS` (100),
//! `QPQ_BENCH_SECS` (8, the append run), `QPQ_BENCH_IN_FLIGHT` (16 per sender),
//! `QPQ_BENCH_RATE` (50 messages/s) and `QPQ_BENCH_LATENCY_SECS` (20) change the shape;
//! `QPQ_BENCH_CSV=<file>` writes the latency run's per-message timeline.
//! Without `--bench` (e.g. `cargo test --all-targets`) it runs a small smoke version that
//! fails on any error.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use quicproquo_client::chat::{Chat, ChatEvent};
use quicproquo_client::delivery::{Envelope, SendOutcome};
use quicproquo_client::{ClientState, ConnectOptions, Connection, Session};
use quicproquo_core::NodeRole;
use quicproquo_core::group::{Event, Group};
use quicproquo_core::mls::Suite;
use quicproquo_server::{NodeIdentity, ServerConfig};
use tokio::sync::Notify;
use tokio::task::spawn_local;
use tokio_util::sync::CancellationToken;

/// Message-id tag of the append run.
const PHASE_APPENDS: u8 = b'A';
/// Message-id tag of the latency run.
const PHASE_LATENCY: u8 = b'L';
/// KeyPackages each user uploads.
const KEY_PACKAGES: usize = 2;
/// Pause between the disk probe's fsyncs during the latency run.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Time between subscribing everyone and the first planned send.
const SETTLE: Duration = Duration::from_millis(500);

struct Settings {
    benching: bool,
    members: usize,
    suite: Suite,
    plaintext_bytes: usize,
    append_senders: usize,
    in_flight: usize,
    pool: usize,
    append_warmup: Duration,
    append_run: Duration,
    latency_senders: usize,
    rate: f64,
    latency_run: Duration,
    drain: Duration,
}

fn settings() -> Result<Settings> {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|a| a == "--bench");
    let env = |name: &str, default: u64| -> Result<u64> {
        std::env::var(name).ok().map_or(Ok(default), |v| {
            v.parse().with_context(|| format!("{name}={v}"))
        })
    };
    let hybrid = args.iter().any(|a| a == "--hybrid")
        || std::env::var("QPQ_BENCH_SUITE").is_ok_and(|s| s.eq_ignore_ascii_case("hybrid"));
    let suite = if hybrid {
        Suite::Hybrid
    } else {
        Suite::Classical
    };
    let s = if benching {
        Settings {
            benching,
            members: usize::try_from(env("QPQ_BENCH_MEMBERS", 100)?)?,
            suite,
            plaintext_bytes: 128,
            append_senders: 4,
            in_flight: usize::try_from(env("QPQ_BENCH_IN_FLIGHT", 16)?)?,
            pool: 256,
            append_warmup: Duration::from_secs(1),
            append_run: Duration::from_secs(env("QPQ_BENCH_SECS", 8)?),
            latency_senders: 5,
            rate: env("QPQ_BENCH_RATE", 50)? as f64,
            latency_run: Duration::from_secs(env("QPQ_BENCH_LATENCY_SECS", 20)?),
            drain: Duration::from_secs(10),
        }
    } else {
        Settings {
            benching,
            members: 4,
            suite,
            plaintext_bytes: 128,
            append_senders: 1,
            in_flight: 4,
            pool: 8,
            append_warmup: Duration::from_millis(100),
            append_run: Duration::from_millis(300),
            latency_senders: 1,
            rate: 50.0,
            latency_run: Duration::from_millis(400),
            drain: Duration::from_secs(10),
        }
    };
    ensure!(
        s.append_senders + s.latency_senders < s.members,
        "the senders of both runs are distinct members other than the creator: \
         raise QPQ_BENCH_MEMBERS"
    );
    ensure!(
        s.in_flight > 0 && s.rate > 0.0,
        "in-flight and rate must be positive"
    );
    Ok(s)
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Sender-chosen message ids: phase tag, sender index, message index.
fn message_id(phase: u8, sender: usize, index: u64) -> Vec<u8> {
    let mut id = Vec::with_capacity(17);
    id.push(phase);
    id.extend_from_slice(&(sender as u64).to_be_bytes());
    id.extend_from_slice(&index.to_be_bytes());
    id
}

fn parse_id(id: &[u8]) -> Option<(u8, usize, u64)> {
    let (&phase, rest) = id.split_first()?;
    let sender = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let index = u64::from_be_bytes(rest.get(8..16)?.try_into().ok()?);
    Some((phase, usize::try_from(sender).ok()?, index))
}

/// The plaintext of message `index`: recognisable after decryption, padded to `len`.
fn plaintext(phase: u8, index: u64, len: usize) -> Vec<u8> {
    let mut p = format!("{} {index:010} ", char::from(phase)).into_bytes();
    let len = len.max(p.len());
    p.resize(len, b'.');
    p
}

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// p50 / p90 / p99 / max of `samples` (µs), sorting them.
fn spread(samples: &mut [u64]) -> String {
    samples.sort_unstable();
    format!(
        "p50 {}  p90 {}  p99 {}  max {}",
        ms(pct(samples, 50.0)),
        ms(pct(samples, 90.0)),
        ms(pct(samples, 99.0)),
        ms(samples.last().copied().unwrap_or(0))
    )
}

// ---------------------------------------------------------------------------------------------
// CPU accounting (Linux, best effort): per-thread CPU time from /proc/self/task, machine-wide
// busy time from /proc/stat.

/// What a thread of this process is.
const CLASSES: [&str; 5] = [
    "client thread",
    "server conn workers",
    "server appender",
    "server store pool",
    "other",
];

struct CpuSnapshot {
    at: Instant,
    /// tid → (class, CPU ns).
    threads: HashMap<u32, (usize, u64)>,
    /// Machine-wide (busy, total) jiffies over all cores.
    machine: Option<(u64, u64)>,
}

fn classify(tid: u32, comm: &str) -> usize {
    if tid == std::process::id() {
        0
    } else if comm.starts_with("qpq-worker") {
        1
    } else if comm.starts_with("qpq-appender") {
        2
    } else if comm.starts_with("tokio-rt-worker") || comm.starts_with("tokio-runtime-w") {
        // The server's runtimes are single-threaded; they run store calls on tokio's blocking
        // pool, whose threads keep tokio's default name. The client runtime names its own.
        3
    } else {
        4
    }
}

fn thread_cpu_ns(task: &Path) -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string(task.join("schedstat"))
        && let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok())
    {
        return Some(ns);
    }
    // Fallback: utime + stime in clock ticks (assumed 100 Hz).
    let stat = std::fs::read_to_string(task.join("stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000_000)
}

fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Some((total - idle, total))
}

fn cpu_snapshot() -> CpuSnapshot {
    let mut threads = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let path = entry.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if let Some(ns) = thread_cpu_ns(&path) {
                threads.insert(tid, (classify(tid, comm.trim()), ns));
            }
        }
    }
    CpuSnapshot {
        at: Instant::now(),
        threads,
        machine: machine_jiffies(),
    }
}

/// CPU used between two snapshots.
struct CpuUse {
    wall: f64,
    /// CPU ns per class of [`CLASSES`].
    per_class: [u64; CLASSES.len()],
    /// Cores busy machine-wide (all processes), on average.
    machine: Option<f64>,
}

/// Indices into [`CLASSES`] of the server's threads.
const SERVER: [usize; 3] = [1, 2, 3];
/// Index into [`CLASSES`] of the client thread.
const CLIENT: usize = 0;

impl CpuUse {
    fn between(before: &CpuSnapshot, after: &CpuSnapshot) -> Self {
        let mut per_class = [0u64; CLASSES.len()];
        for (tid, (class, ns)) in &after.threads {
            let was = before.threads.get(tid).map_or(0, |t| t.1);
            per_class[*class] += ns.saturating_sub(was);
        }
        let machine = match (before.machine, after.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                let n = std::thread::available_parallelism().map_or(1, usize::from) as f64;
                Some((b1 - b0) as f64 / (t1 - t0) as f64 * n)
            }
            _ => None,
        };
        Self {
            wall: after.at.duration_since(before.at).as_secs_f64().max(1e-9),
            per_class,
            machine,
        }
    }

    fn since(before: &CpuSnapshot) -> Self {
        Self::between(before, &cpu_snapshot())
    }

    /// CPU µs of `classes` per operation.
    fn us_per(&self, classes: &[usize], ops: u64) -> f64 {
        let ns: u64 = classes.iter().map(|c| self.per_class[*c]).sum();
        ns as f64 / 1e3 / ops.max(1) as f64
    }
}

impl std::fmt::Display for CpuUse {
    /// In cores: 1.00 is one core busy for the whole interval.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cores = |ns: u64| ns as f64 / 1e9 / self.wall;
        let mut parts: Vec<String> = CLASSES
            .iter()
            .zip(self.per_class)
            .filter(|(_, ns)| *ns > 0)
            .map(|(name, ns)| format!("{name} {:.2}", cores(ns)))
            .collect();
        parts.push(format!(
            "= this process {:.2}",
            cores(self.per_class.iter().sum::<u64>())
        ));
        if let Some(m) = self.machine {
            parts.push(format!("| whole machine {m:.2}"));
        }
        write!(f, "{}", parts.join(", "))
    }
}

/// write + fdatasync of a 512-byte record appended to a file next to the store, `samples`
/// times or until `stop`, pausing `every` in between: what the disk alone costs a durable
/// append, measured in the same run.
fn disk_probe(dir: &Path, samples: usize, every: Duration, stop: &AtomicBool) -> Result<Vec<u64>> {
    use std::io::Write as _;
    let path = dir.join(format!("disk-probe-{}", unix_micros()));
    let mut f = std::fs::File::create(&path)?;
    let record = [0x5Au8; 512];
    let mut out = Vec::new();
    while out.len() < samples && !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        f.write_all(&record)?;
        f.sync_data()?;
        out.push(micros(t.elapsed()));
        std::thread::sleep(every);
    }
    drop(f);
    std::fs::remove_file(path)?;
    Ok(out)
}

/// [`disk_probe`] on its own thread until stopped.
struct DiskProbe {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<u64>>>,
}

impl DiskProbe {
    fn start(dir: &Path, every: Duration) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, flag) = (dir.to_owned(), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("bench-disk-probe".into())
            .spawn(move || disk_probe(&dir, usize::MAX, every, &flag))?;
        Ok(Self { stop, thread })
    }

    fn finish(self) -> Result<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the disk probe panicked"))?
    }
}

// ---------------------------------------------------------------------------------------------
// Members.

/// A registered user with its state, connection and bound session.
struct Member {
    index: usize,
    name: String,
    state: ClientState,
    path: PathBuf,
    session: Session,
    _conn: Connection,
}

impl Member {
    async fn register(
        addr: SocketAddr,
        options: &ConnectOptions,
        dir: &Path,
        index: usize,
        suite: Suite,
    ) -> Result<Self> {
        let name = format!("member{index:03}");
        let path = dir.join(format!("{name}.bin"));
        let mut state = ClientState::create(suite)?;
        state.name = Some(name.clone());
        let conn = Connection::connect(addr, options).await?;
        let session = conn.bind(state.identity()).await?;
        session.auth.claim_name(&name).await?;
        let kps = state
            .mls_identity()
            .key_packages(&state.mls, suite, KEY_PACKAGES)?;
        state.save(&path)?;
        session.auth.upload_key_packages(&kps, None).await?;
        Ok(Self {
            index,
            name,
            state,
            path,
            session,
            _conn: conn,
        })
    }

    fn chat(&mut self) -> Chat<'_> {
        Chat::new(&mut self.state, &self.path, &self.session)
    }

    fn group(&self, id: &[u8]) -> Result<Group> {
        Group::load(&self.state.mls, id)?.ok_or_else(|| anyhow::anyhow!("no group"))
    }
}

struct SetupReport {
    register: Duration,
    invite: Duration,
    join: Duration,
    total: Duration,
    cpu: CpuUse,
}

async fn setup(
    s: &Settings,
    addr: SocketAddr,
    options: &ConnectOptions,
    dir: &Path,
) -> Result<(Vec<Member>, Vec<u8>, SetupReport)> {
    let cpu0 = cpu_snapshot();
    let started = Instant::now();
    let mut members = futures::future::try_join_all(
        (0..s.members).map(|i| Member::register(addr, options, dir, i, s.suite)),
    )
    .await?;
    let register = started.elapsed();

    let t = Instant::now();
    let (creator, others) = members.split_first_mut().context("no members")?;
    let id = creator.chat().create_group("bench").await?;
    let names: Vec<String> = others.iter().map(|m| m.name.clone()).collect();
    let epoch = creator.chat().invite("bench", &names).await?;
    ensure!(epoch == 1, "one commit adds everyone (epoch {epoch})");
    let invite = t.elapsed();

    let t = Instant::now();
    futures::future::try_join_all(others.iter_mut().map(|m| async move {
        let mut joined = 0;
        m.chat()
            .receive_all(&mut |e| {
                if matches!(e, ChatEvent::Joined { .. }) {
                    joined += 1;
                }
            })
            .await?;
        ensure!(joined == 1, "{} joined {joined} groups", m.name);
        anyhow::Ok(())
    }))
    .await?;
    let join = t.elapsed();
    let total = started.elapsed();

    let reference = members[0].group(&id)?.epoch_authenticator();
    for m in &members {
        let g = m.group(&id)?;
        ensure!(
            g.epoch() == 1 && g.epoch_authenticator() == reference,
            "{} disagrees about the group",
            m.name
        );
        ensure!(
            g.members().len() == s.members,
            "{} sees the wrong roster",
            m.name
        );
    }
    let cpu = CpuUse::since(&cpu0);
    Ok((
        members,
        id,
        SetupReport {
            register,
            invite,
            join,
            total,
            cpu,
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// Appends per second.

struct AppendReport {
    senders: usize,
    in_flight: usize,
    pool: usize,
    message_bytes: usize,
    encrypt_us: f64,
    acked: u64,
    window: Duration,
    ack_latency: Vec<u64>,
    sent_total: u64,
    errors: u64,
    first_error: Option<String>,
    last_seq: u64,
    cpu: CpuUse,
}

#[derive(Default)]
struct AppendCounters {
    acked: Cell<u64>,
    sent_total: Cell<u64>,
    errors: Cell<u64>,
    first_error: RefCell<Option<String>>,
    ack_latency: RefCell<Vec<u64>>,
    last_seq: Cell<u64>,
}

impl AppendCounters {
    fn error(&self, what: String) {
        self.errors.set(self.errors.get() + 1);
        self.first_error.borrow_mut().get_or_insert(what);
    }
}

async fn appends(s: &Settings, members: &[Member], id: &[u8]) -> Result<AppendReport> {
    let senders = &members[1..=s.append_senders];
    // Pre-encrypt a pool per sender: the timed run measures the server, not client MLS.
    let t = Instant::now();
    let mut pools = Vec::with_capacity(senders.len());
    for m in senders {
        let mut g = m.group(id)?;
        let mut pool = Vec::with_capacity(s.pool);
        for i in 0..s.pool as u64 {
            let body = plaintext(PHASE_APPENDS, i, s.plaintext_bytes);
            pool.push(g.encrypt(&m.state.mls, m.state.mls_identity(), &body)?);
        }
        pools.push(Rc::new(pool));
    }
    let encrypt_us = t.elapsed().as_secs_f64() * 1e6 / (senders.len() * s.pool) as f64;
    let message_bytes = pools[0][0].len();

    let counters = Rc::new(AppendCounters::default());
    let cpu0 = cpu_snapshot();
    let start = Instant::now();
    let measure_from = start + s.append_warmup;
    let end = measure_from + s.append_run;
    let mut tasks = Vec::new();
    for (m, pool) in senders.iter().zip(&pools) {
        let next = Rc::new(Cell::new(0u64));
        for _ in 0..s.in_flight {
            let (delivery, pool, next) =
                (m.session.delivery.clone(), Rc::clone(pool), next.clone());
            let (counters, gid, sender) = (Rc::clone(&counters), id.to_vec(), m.index);
            tasks.push(spawn_local(async move {
                while Instant::now() < end {
                    let n = next.get();
                    next.set(n + 1);
                    let message = &pool[usize::try_from(n).unwrap_or(0) % pool.len()];
                    let mid = message_id(PHASE_APPENDS, sender, n);
                    let sent = Instant::now();
                    let r = delivery.send(&gid, &mid, message, None).await;
                    let done = Instant::now();
                    counters.sent_total.set(counters.sent_total.get() + 1);
                    match r {
                        Ok(SendOutcome::Appended { seq, .. }) => {
                            counters.last_seq.set(counters.last_seq.get().max(seq));
                            if done >= measure_from && done <= end {
                                counters.acked.set(counters.acked.get() + 1);
                                counters.ack_latency.borrow_mut().push(micros(done - sent));
                            }
                        }
                        Ok(other) => counters.error(format!("unexpected outcome {other:?}")),
                        Err(e) => counters.error(e.to_string()),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await?;
    }
    let cpu = CpuUse::since(&cpu0);
    let c = Rc::try_unwrap(counters).map_err(|_| anyhow::anyhow!("append tasks still running"))?;
    Ok(AppendReport {
        senders: senders.len(),
        in_flight: s.in_flight,
        pool: s.pool,
        message_bytes,
        encrypt_us,
        acked: c.acked.get(),
        window: s.append_run,
        ack_latency: c.ack_latency.into_inner(),
        sent_total: c.sent_total.get(),
        errors: c.errors.get(),
        first_error: c.first_error.into_inner(),
        last_seq: c.last_seq.get(),
        cpu,
    })
}

// ---------------------------------------------------------------------------------------------
// Delivery latency.

#[derive(Default)]
struct Deliveries {
    /// Planned send → a recipient's subscription yields the entry (µs), per delivery.
    to_recipient: RefCell<Vec<u64>>,
    /// Server append time → recipient (µs, wall clocks of the same process), per delivery.
    from_append: RefCell<Vec<u64>>,
    /// Message index → planned send → server append time (µs).
    appended_at: RefCell<HashMap<u64, u64>>,
    /// Message index → (first, last) recipient's latency (µs).
    spread: RefCell<HashMap<u64, (u64, u64)>>,
    delivered: Cell<u64>,
    expected: u64,
    order_errors: Cell<u64>,
    unexpected: Cell<u64>,
    all_in: Notify,
}

struct LatencyReport {
    senders: usize,
    rate: f64,
    run: Duration,
    messages: u64,
    deliveries: u64,
    expected: u64,
    to_recipient: Vec<u64>,
    to_append: Vec<u64>,
    from_append: Vec<u64>,
    first_recipient: Vec<u64>,
    last_recipient: Vec<u64>,
    disk: Vec<u64>,
    issue_lag: Vec<u64>,
    send_errors: u64,
    first_error: Option<String>,
    order_errors: u64,
    unexpected: u64,
    encrypt_us: f64,
    decrypt: Vec<u64>,
    decrypt_errors: u64,
    load_us: f64,
    save_us: f64,
    state_bytes: u64,
    cpu: CpuUse,
}

/// What one recipient received: (sender, index, entry), in arrival order.
type Received = Vec<(usize, u64, Envelope)>;

#[allow(clippy::too_many_lines)]
async fn latency(
    s: &Settings,
    members: &[Member],
    id: &[u8],
    after: u64,
    data_dir: &Path,
) -> Result<LatencyReport> {
    let n = members.len();
    let senders: Vec<usize> = (n - s.latency_senders..n).collect();
    let count = (s.rate * s.latency_run.as_secs_f64()).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / s.rate);

    // Pre-encrypt every message, in send order (so each sender's generations stay in order).
    let t = Instant::now();
    let mut groups: HashMap<usize, Group> = HashMap::new();
    let mut messages = Vec::with_capacity(usize::try_from(count)?);
    for i in 0..count {
        let sender = senders[usize::try_from(i)? % senders.len()];
        let m = &members[sender];
        let g = match groups.entry(sender) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(m.group(id)?),
        };
        let body = plaintext(PHASE_LATENCY, i, s.plaintext_bytes);
        messages.push((
            sender,
            g.encrypt(&m.state.mls, m.state.mls_identity(), &body)?,
        ));
    }
    drop(groups);
    let encrypt_us = t.elapsed().as_secs_f64() * 1e6 / count as f64;

    // Everyone subscribes after the append run's last entry.
    let shared = Rc::new(Deliveries {
        expected: count * (n as u64 - 1),
        ..Deliveries::default()
    });
    let stop = CancellationToken::new();
    let start = Instant::now() + SETTLE;
    let start_unix = unix_micros() + micros(SETTLE);
    let mut receivers = Vec::with_capacity(n);
    for m in members {
        let mut sub = m.session.delivery.subscribe(id, after).await?;
        let (shared, stop, me) = (Rc::clone(&shared), stop.clone(), m.index);
        receivers.push(spawn_local(async move {
            let mut got: Received = Vec::new();
            let mut expect_seq = after + 1;
            loop {
                let batch = tokio::select! {
                    () = stop.cancelled() => break,
                    b = sub.next() => match b { Some(b) => b, None => break },
                };
                let (now, now_unix) = (Instant::now(), unix_micros());
                for e in batch {
                    if e.seq != expect_seq {
                        shared.order_errors.set(shared.order_errors.get() + 1);
                    }
                    expect_seq = e.seq + 1;
                    let Some((PHASE_LATENCY, sender, index)) = parse_id(&e.message_id) else {
                        shared.unexpected.set(shared.unexpected.get() + 1);
                        continue;
                    };
                    if sender == me {
                        continue; // our own message coming back
                    }
                    let planned = start + interval.mul_f64(index as f64);
                    let planned_unix = start_unix + micros(interval.mul_f64(index as f64));
                    let latency = micros(now.saturating_duration_since(planned));
                    shared.to_recipient.borrow_mut().push(latency);
                    shared
                        .spread
                        .borrow_mut()
                        .entry(index)
                        .and_modify(|(first, last)| {
                            *first = (*first).min(latency);
                            *last = (*last).max(latency);
                        })
                        .or_insert((latency, latency));
                    shared
                        .from_append
                        .borrow_mut()
                        .push(now_unix.saturating_sub(e.appended_at_micros));
                    shared
                        .appended_at
                        .borrow_mut()
                        .entry(index)
                        .or_insert(e.appended_at_micros.saturating_sub(planned_unix));
                    got.push((sender, index, e));
                    shared.delivered.set(shared.delivered.get() + 1);
                    if shared.delivered.get() == shared.expected {
                        shared.all_in.notify_one();
                    }
                }
            }
            got
        }));
    }

    // Send on schedule; each send is its own task so a slow answer does not delay the next.
    // A concurrent disk probe tells a slow disk apart from a slow server.
    let probe = DiskProbe::start(data_dir, PROBE_EVERY)?;
    let cpu0 = cpu_snapshot();
    let mut sends = Vec::with_capacity(messages.len());
    let mut issue_lag = Vec::with_capacity(messages.len());
    for (i, (sender, message)) in (0u64..).zip(messages) {
        let planned = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(planned.into()).await;
        issue_lag.push(micros(Instant::now().saturating_duration_since(planned)));
        let (delivery, gid) = (members[sender].session.delivery.clone(), id.to_vec());
        let mid = message_id(PHASE_LATENCY, sender, i);
        sends.push(spawn_local(async move {
            delivery.send(&gid, &mid, &message, None).await
        }));
    }
    let (mut send_errors, mut first_error) = (0u64, None);
    for send in sends {
        match send.await? {
            Ok(SendOutcome::Appended { .. }) => {}
            Ok(other) => {
                send_errors += 1;
                first_error.get_or_insert(format!("unexpected outcome {other:?}"));
            }
            Err(e) => {
                send_errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    if shared.delivered.get() < shared.expected {
        let _ = tokio::time::timeout(s.drain, shared.all_in.notified()).await;
    }
    let cpu = CpuUse::since(&cpu0);
    let disk = probe.finish()?;
    stop.cancel();
    let mut received = Vec::with_capacity(n);
    for r in receivers {
        received.push(r.await?);
    }
    let shared = Rc::try_unwrap(shared).map_err(|_| anyhow::anyhow!("receivers still running"))?;

    // Client MLS, after the run: every recipient decrypts what it received.
    let mut decrypt = Vec::with_capacity(usize::try_from(shared.expected)?);
    let mut decrypt_errors = 0u64;
    for (m, got) in members.iter().zip(&received) {
        let mut g = m.group(id)?;
        for (_, index, e) in got {
            let t = Instant::now();
            let r = g.process(&m.state.mls, &e.payload);
            decrypt.push(micros(t.elapsed()));
            let want = plaintext(PHASE_LATENCY, *index, s.plaintext_bytes);
            if !matches!(r, Ok(Event::Application { plaintext, .. }) if plaintext == want) {
                decrypt_errors += 1;
            }
        }
    }
    // What the messenger (`Chat`) adds per message on top: it loads the group for every entry
    // and saves the whole state file after every send and every batch received.
    let probe = &members[1];
    let t = Instant::now();
    for _ in 0..10 {
        probe.group(id)?;
    }
    let load_us = t.elapsed().as_secs_f64() * 1e6 / 10.0;
    let t = Instant::now();
    for _ in 0..10 {
        probe.state.save(&probe.path)?;
    }
    let save_us = t.elapsed().as_secs_f64() * 1e6 / 10.0;
    let state_bytes = std::fs::metadata(&probe.path)?.len();

    let appended_at = shared.appended_at.into_inner();
    let spread = shared.spread.into_inner();
    if let Ok(path) = std::env::var("QPQ_BENCH_CSV") {
        write_timeline(Path::new(&path), &issue_lag, &appended_at, &spread)?;
    }
    let to_append = appended_at.into_values().collect();
    let (first_recipient, last_recipient) = spread.into_values().unzip();
    Ok(LatencyReport {
        senders: senders.len(),
        rate: s.rate,
        run: s.latency_run,
        messages: count,
        deliveries: shared.delivered.get(),
        expected: shared.expected,
        to_recipient: shared.to_recipient.into_inner(),
        to_append,
        from_append: shared.from_append.into_inner(),
        first_recipient,
        last_recipient,
        disk,
        issue_lag,
        send_errors,
        first_error,
        order_errors: shared.order_errors.get(),
        unexpected: shared.unexpected.get(),
        encrypt_us,
        decrypt,
        decrypt_errors,
        load_us,
        save_us,
        state_bytes,
        cpu,
    })
}

/// Writes one line per message of the latency run (µs): when it was issued, appended, and
/// reached its first and last recipient, each after its planned send time.
fn write_timeline(
    path: &Path,
    issue_lag: &[u64],
    appended_at: &HashMap<u64, u64>,
    spread: &HashMap<u64, (u64, u64)>,
) -> Result<()> {
    use std::fmt::Write as _;
    let mut csv =
        String::from("index,issued_us,appended_us,first_recipient_us,last_recipient_us\n");
    for (index, lag) in (0u64..).zip(issue_lag) {
        let (first, last) = spread.get(&index).copied().unwrap_or_default();
        let appended = appended_at.get(&index).copied().unwrap_or_default();
        writeln!(csv, "{index},{lag},{appended},{first},{last}")?;
    }
    std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------------------------------------

struct Report {
    setup: SetupReport,
    fsync: Vec<u64>,
    appends: AppendReport,
    latency: LatencyReport,
}

async fn run(
    s: &Settings,
    addr: SocketAddr,
    options: ConnectOptions,
    data_dir: &Path,
) -> Result<Report> {
    let dir = tempfile::tempdir()?;
    let (members, id, setup) = setup(s, addr, &options, dir.path()).await?;
    let samples = if s.benching { 200 } else { 5 };
    let fsync = disk_probe(data_dir, samples, Duration::ZERO, &AtomicBool::new(false))?;
    let appends = appends(s, &members, &id).await?;
    let last_seq = members[0]
        .session
        .delivery
        .groups()
        .await?
        .into_iter()
        .find(|g| g.group_id == id)
        .map(|g| g.last_seq)
        .context("the creator does not see the group")?;
    ensure!(
        last_seq >= appends.last_seq,
        "the log ends at {last_seq} before an acknowledged append {}",
        appends.last_seq
    );
    let latency = latency(s, &members, &id, last_seq, data_dir).await?;
    Ok(Report {
        setup,
        fsync,
        appends,
        latency,
    })
}

/// One labelled line of the report.
fn row(label: &str, value: impl std::fmt::Display) {
    println!("   {label:<40} {value}");
}

fn first_error(e: Option<&str>) -> String {
    e.map_or(String::new(), |e| format!(" (first: {e})"))
}

#[allow(clippy::too_many_lines)]
fn print(s: &Settings, workers: usize, r: &mut Report) -> u64 {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let recipients = s.members - 1;
    let (a, l) = (&mut r.appends, &mut r.latency);
    println!(
        "\nDelivery Service: one MLS group of {} members, {:?} suite ({:?}){}",
        s.members,
        s.suite,
        s.suite.ciphersuite(),
        if s.benching { "" } else { "  [SMOKE RUN]" }
    );
    println!(
        "Everything shares {cores} core(s): the server ({workers} connection workers, the appender \
         thread, the store's blocking pool; redb in a temp dir, fsync per commit), all {} \
         clients on ONE client thread (Noise, Cap'n Proto, MLS), and whatever else runs on the \
         machine (see 'whole machine' in the CPU lines).",
        s.members
    );

    println!("\n1. Setup (not part of the figures below)");
    row(
        &format!("register {} users", s.members),
        format!(
            "{:.2} s  (connect, Noise, bind, name, {KEY_PACKAGES} KeyPackages each)",
            r.setup.register.as_secs_f64()
        ),
    );
    row(
        &format!("create + add {recipients} in ONE commit"),
        format!(
            "{:.2} s  (resolve names, batch KeyPackage fetch, commit + Welcome)",
            r.setup.invite.as_secs_f64()
        ),
    );
    row(
        &format!("{recipients} joins from the Welcome"),
        format!(
            "{:.2} s  (concurrent; MLS join on the client thread)",
            r.setup.join.as_secs_f64()
        ),
    );
    row("total", format!("{:.2} s", r.setup.total.as_secs_f64()));
    row("CPU (cores busy)", &r.setup.cpu);
    r.fsync.sort_unstable();
    row(
        "disk: 512 B append + fdatasync",
        format!(
            "p50 {}  p99 {}  ({} samples, same file system as the store)",
            ms(pct(&r.fsync, 50.0)),
            ms(pct(&r.fsync, 99.0)),
            r.fsync.len()
        ),
    );

    let rate = a.acked as f64 / a.window.as_secs_f64();
    println!(
        "\n2. Appends: {} senders x {} in flight, {:.1} s measured after {:.1} s warm-up, \
         nobody subscribed",
        a.senders,
        a.in_flight,
        a.window.as_secs_f64(),
        s.append_warmup.as_secs_f64()
    );
    row(
        "message",
        format!(
            "{} B plaintext -> {} B MLS PrivateMessage, pre-encrypted ({} per sender, replayed \
             with fresh message ids)",
            s.plaintext_bytes, a.message_bytes, a.pool
        ),
    );
    row("acknowledged appends/s", format!("{rate:.0}"));
    row("ack latency (send -> answer)", spread(&mut a.ack_latency));
    row(
        "server CPU per append",
        format!(
            "{:.1} us (conn workers {:.1}, appender {:.1}, store pool {:.1})",
            a.cpu.us_per(&SERVER, a.sent_total),
            a.cpu.us_per(&[1], a.sent_total),
            a.cpu.us_per(&[2], a.sent_total),
            a.cpu.us_per(&[3], a.sent_total)
        ),
    );
    row(
        "client CPU per append",
        format!(
            "{:.1} us (RPC + Noise only; MLS encrypt below)",
            a.cpu.us_per(&[CLIENT], a.sent_total)
        ),
    );
    row(
        "client MLS encrypt (excluded)",
        format!(
            "{:.1} us/message: one thread encrypting could feed at most {:.0}/s",
            a.encrypt_us,
            1e6 / a.encrypt_us
        ),
    );
    row(
        "sends / errors",
        format!(
            "{} / {}{}",
            a.sent_total,
            a.errors,
            first_error(a.first_error.as_deref())
        ),
    );
    row("CPU (cores busy)", &a.cpu);

    println!(
        "\n3. Delivery latency: {:.0} msg/s for {:.1} s from {} senders, all {} members \
         subscribed (live push), from the PLANNED send time",
        l.rate,
        l.run.as_secs_f64(),
        l.senders,
        s.members
    );
    row(
        "messages / deliveries",
        format!(
            "{} / {} of {} expected ({recipients} recipients each)",
            l.messages, l.deliveries, l.expected
        ),
    );
    row(
        "send -> recipient (every delivery)",
        spread(&mut l.to_recipient),
    );
    row("  send -> first recipient", spread(&mut l.first_recipient));
    row("  send -> last recipient", spread(&mut l.last_recipient));
    row("  send -> durable append", spread(&mut l.to_append));
    row("  durable append -> recipient", spread(&mut l.from_append));
    row(
        "  client send lag (planned->issued)",
        spread(&mut l.issue_lag),
    );
    row(
        "  disk probe meanwhile (fdatasync)",
        format!(
            "{}  ({} samples, one per {} ms)",
            spread(&mut l.disk),
            l.disk.len(),
            PROBE_EVERY.as_millis()
        ),
    );
    let pushes = l.messages * s.members as u64;
    row(
        "CPU per push (an entry to a member)",
        format!(
            "server {:.1} us, client {:.1} us",
            l.cpu.us_per(&SERVER, pushes),
            l.cpu.us_per(&[CLIENT], pushes)
        ),
    );
    row(
        "errors",
        format!(
            "send {}{}, order/gap {}, unexpected entries {}, decrypt {}",
            l.send_errors,
            first_error(l.first_error.as_deref()),
            l.order_errors,
            l.unexpected,
            l.decrypt_errors
        ),
    );
    row("CPU (cores busy)", &l.cpu);

    l.decrypt.sort_unstable();
    let decrypt_mean = if l.decrypt.is_empty() {
        0.0
    } else {
        l.decrypt.iter().sum::<u64>() as f64 / l.decrypt.len() as f64
    };
    println!("\n4. Client MLS (client CPU, outside every figure above)");
    row(
        "encrypt",
        format!(
            "{:.1} us/message ({:.1} for the append run's pool)",
            l.encrypt_us, a.encrypt_us
        ),
    );
    row(
        "decrypt (after the run)",
        format!(
            "{decrypt_mean:.1} us/message mean, p50 {} us, p99 {} us over {} decryptions: \
             {recipients} recipients at {:.0} msg/s need {:.2} core(s)",
            pct(&l.decrypt, 50.0),
            pct(&l.decrypt, 99.0),
            l.decrypt.len(),
            l.rate,
            decrypt_mean * 1e-6 * recipients as f64 * l.rate
        ),
    );
    row(
        "Chat also: Group::load per entry",
        format!("{:.0} us ({} members)", l.load_us, s.members),
    );
    row(
        "Chat also: state file save per step",
        format!(
            "{:.0} us (atomic: write, 2 fsyncs, rename; {} KiB file)",
            l.save_us,
            l.state_bytes / 1024
        ),
    );

    let errors = a.errors
        + l.send_errors
        + l.order_errors
        + l.unexpected
        + l.decrypt_errors
        + (l.expected - l.deliveries.min(l.expected));
    println!("\nSummary");
    row(
        "setup (register, one-commit add, joins)",
        format!("{:.2} s", r.setup.total.as_secs_f64()),
    );
    row("appends/s (acknowledged)", format!("{rate:.0}"));
    for (name, p) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0)] {
        row(&format!("delivery {name}"), ms(pct(&l.to_recipient, p)));
    }
    row(
        "delivery max",
        ms(l.to_recipient.last().copied().unwrap_or(0)),
    );
    row("messages (latency run)", l.messages);
    row("deliveries", l.deliveries);
    row("errors (incl. missing deliveries)", errors);
    errors
}

fn main() -> Result<()> {
    let s = settings()?;
    let dir = tempfile::tempdir()?;
    let mut config = ServerConfig::for_role(NodeRole::Standalone, dir.path().join("data"));
    config.shutdown_grace = Duration::from_secs(2);
    let (workers, data_dir) = (config.workers, config.data_dir.clone());
    let identity = NodeIdentity::load_or_create(&config.data_dir, NodeRole::Standalone)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let store = quicproquo_server::open_store(&config)?;
    let server = quicproquo_server::start(config, listener, identity, store)?;
    let options = ConnectOptions::new(server.cluster_key());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("bench-client")
        .build()?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&rt, run(&s, server.local_addr(), options, &data_dir));
    // Close every client connection before stopping the server.
    drop(local);
    drop(rt);
    server.shutdown();
    server.join()?;
    let errors = print(&s, workers, &mut report?);
    ensure!(
        s.benching || errors == 0,
        "the smoke run saw {errors} error(s)"
    );
    Ok(())
}
