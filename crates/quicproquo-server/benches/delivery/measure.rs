//! The measured phases: appends per second (pre-encrypted messages sent as fast as the server
//! acknowledges them) and delivery latency (a fixed send rate, every member subscribed).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use quicproquo_client::delivery::{Envelope, SendOutcome, Subscription};
use quicproquo_core::group::{Event, Group};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, spawn_local};
use tokio_util::sync::CancellationToken;

use crate::probe::{CpuUse, DiskProbe, cpu_snapshot};
use crate::setup::Member;
use crate::{Settings, micros, unix_micros};

/// Message-id tag of the append run.
const PHASE_APPENDS: u8 = b'A';
/// Message-id tag of the latency run.
const PHASE_LATENCY: u8 = b'L';
/// Pause between the disk probe's fsyncs during the latency run.
pub(crate) const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Time between subscribing everyone and the first planned send.
const SETTLE: Duration = Duration::from_millis(500);

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

// ---------------------------------------------------------------------------------------------
// Appends per second.

/// What the append run measured.
pub(crate) struct AppendReport {
    pub(crate) senders: usize,
    pub(crate) in_flight: usize,
    pub(crate) pool: usize,
    pub(crate) message_bytes: usize,
    pub(crate) encrypt_us: f64,
    pub(crate) acked: u64,
    pub(crate) window: Duration,
    pub(crate) ack_latency: Vec<u64>,
    pub(crate) sent_total: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) last_seq: u64,
    pub(crate) cpu: CpuUse,
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

/// The append run: acknowledged appends per second, nobody subscribed.
pub(crate) async fn appends(s: &Settings, members: &[Member], id: &[u8]) -> Result<AppendReport> {
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

/// What the latency run measured.
pub(crate) struct LatencyReport {
    pub(crate) senders: usize,
    pub(crate) rate: f64,
    pub(crate) run: Duration,
    pub(crate) messages: u64,
    pub(crate) deliveries: u64,
    pub(crate) expected: u64,
    pub(crate) to_recipient: Vec<u64>,
    pub(crate) to_append: Vec<u64>,
    pub(crate) from_append: Vec<u64>,
    pub(crate) first_recipient: Vec<u64>,
    pub(crate) last_recipient: Vec<u64>,
    pub(crate) disk: Vec<u64>,
    pub(crate) issue_lag: Vec<u64>,
    pub(crate) send_errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) order_errors: u64,
    pub(crate) unexpected: u64,
    pub(crate) encrypt_us: f64,
    pub(crate) decrypt: Vec<u64>,
    pub(crate) decrypt_errors: u64,
    pub(crate) load_us: f64,
    pub(crate) save_us: f64,
    pub(crate) state_bytes: u64,
    pub(crate) cpu: CpuUse,
}

/// What one recipient received: (sender, index, entry), in arrival order.
type Received = Vec<(usize, u64, Envelope)>;

/// When the latency run's messages are planned: message `index` at `start + index × interval`.
#[derive(Clone, Copy)]
struct Schedule {
    start: Instant,
    /// `start` in Unix µs.
    start_unix: u64,
    interval: Duration,
}

impl Schedule {
    /// Message `index`'s planned send time, as an instant and in Unix µs.
    fn planned(&self, index: u64) -> (Instant, u64) {
        let offset = self.interval.mul_f64(index as f64);
        (self.start + offset, self.start_unix + micros(offset))
    }
}

impl Deliveries {
    /// Records the delivery of message `index` (appended at `appended_at`, Unix µs) to one
    /// recipient at `now` (an instant and Unix µs).
    fn record(&self, index: u64, appended_at: u64, now: (Instant, u64), plan: &Schedule) {
        let (now, now_unix) = now;
        let (planned, planned_unix) = plan.planned(index);
        let latency = micros(now.saturating_duration_since(planned));
        self.to_recipient.borrow_mut().push(latency);
        self.spread
            .borrow_mut()
            .entry(index)
            .and_modify(|(first, last)| {
                *first = (*first).min(latency);
                *last = (*last).max(latency);
            })
            .or_insert((latency, latency));
        self.from_append
            .borrow_mut()
            .push(now_unix.saturating_sub(appended_at));
        self.appended_at
            .borrow_mut()
            .entry(index)
            .or_insert(appended_at.saturating_sub(planned_unix));
        self.delivered.set(self.delivered.get() + 1);
        if self.delivered.get() == self.expected {
            self.all_in.notify_one();
        }
    }
}

/// Member `me`'s subscription (entries after `after`) until `stop`: checks the order, records
/// every other member's latency-run message and returns those in arrival order.
async fn receive(
    mut sub: Subscription<Envelope>,
    shared: Rc<Deliveries>,
    stop: CancellationToken,
    me: usize,
    after: u64,
    plan: Schedule,
) -> Received {
    let mut got: Received = Vec::new();
    let mut expect_seq = after + 1;
    loop {
        let batch = tokio::select! {
            () = stop.cancelled() => break,
            b = sub.next() => match b { Some(b) => b, None => break },
        };
        let now = (Instant::now(), unix_micros());
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
            shared.record(index, e.appended_at_micros, now, &plan);
            got.push((sender, index, e));
        }
    }
    got
}

/// Every member subscribes to the group after entry `after`; one receiving task each.
async fn subscribe_all(
    members: &[Member],
    id: &[u8],
    after: u64,
    shared: &Rc<Deliveries>,
    stop: &CancellationToken,
    plan: Schedule,
) -> Result<Vec<JoinHandle<Received>>> {
    let mut receivers = Vec::with_capacity(members.len());
    for m in members {
        let sub = m.session.delivery.subscribe(id, after).await?;
        let (shared, stop) = (Rc::clone(shared), stop.clone());
        receivers.push(spawn_local(receive(
            sub, shared, stop, m.index, after, plan,
        )));
    }
    Ok(receivers)
}

/// Pre-encrypts `count` messages, in send order (so each sender's generations stay in order),
/// round-robin over `senders`: (sender, message).
fn encrypt_messages(
    s: &Settings,
    members: &[Member],
    id: &[u8],
    senders: &[usize],
    count: u64,
) -> Result<Vec<(usize, Vec<u8>)>> {
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
    Ok(messages)
}

/// What the scheduled sends gave: how late each was issued (µs), the failed sends and the
/// first failure.
struct Sent {
    issue_lag: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// Sends every message at its planned time, each send its own task so a slow answer does not
/// delay the next, then waits for every answer.
async fn send_on_schedule(
    members: &[Member],
    id: &[u8],
    messages: Vec<(usize, Vec<u8>)>,
    plan: &Schedule,
) -> Result<Sent> {
    let mut sends = Vec::with_capacity(messages.len());
    let mut issue_lag = Vec::with_capacity(messages.len());
    for (i, (sender, message)) in (0u64..).zip(messages) {
        let (planned, _) = plan.planned(i);
        tokio::time::sleep_until(planned.into()).await;
        issue_lag.push(micros(Instant::now().saturating_duration_since(planned)));
        let (delivery, gid) = (members[sender].session.delivery.clone(), id.to_vec());
        let mid = message_id(PHASE_LATENCY, sender, i);
        sends.push(spawn_local(async move {
            delivery.send(&gid, &mid, &message, None).await
        }));
    }
    let (mut errors, mut first_error) = (0u64, None);
    for send in sends {
        match send.await? {
            Ok(SendOutcome::Appended { .. }) => {}
            Ok(other) => {
                errors += 1;
                first_error.get_or_insert(format!("unexpected outcome {other:?}"));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    Ok(Sent {
        issue_lag,
        errors,
        first_error,
    })
}

/// Client MLS, after the run: every recipient decrypts what it received, checked against
/// what was sent. Returns the time of each decryption (µs) and the failures.
fn decrypt_all(
    s: &Settings,
    members: &[Member],
    id: &[u8],
    received: &[Received],
) -> Result<(Vec<u64>, u64)> {
    let mut decrypt = Vec::with_capacity(received.iter().map(Vec::len).sum());
    let mut decrypt_errors = 0u64;
    for (m, got) in members.iter().zip(received) {
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
    Ok((decrypt, decrypt_errors))
}

/// What the messenger (`Chat`) adds per message on top: it loads the group for every entry
/// and saves the whole state file after every send and every batch received. Returns the
/// load and save times (µs) and the state file's size.
fn chat_costs(probe: &Member, id: &[u8]) -> Result<(f64, f64, u64)> {
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
    Ok((load_us, save_us, std::fs::metadata(&probe.path)?.len()))
}

/// The latency run: every member subscribed, a fixed send rate, then every recipient decrypts.
pub(crate) async fn latency(
    s: &Settings,
    members: &[Member],
    id: &[u8],
    after: u64,
    data_dir: &Path,
) -> Result<LatencyReport> {
    let n = members.len();
    let senders: Vec<usize> = (n - s.latency_senders..n).collect();
    let count = (s.rate * s.latency_run.as_secs_f64()).round().max(1.0) as u64;
    let t = Instant::now();
    let messages = encrypt_messages(s, members, id, &senders, count)?;
    let encrypt_us = t.elapsed().as_secs_f64() * 1e6 / count as f64;

    // Everyone subscribes after the append run's last entry.
    let shared = Rc::new(Deliveries {
        expected: count * (n as u64 - 1),
        ..Deliveries::default()
    });
    let stop = CancellationToken::new();
    let plan = Schedule {
        start: Instant::now() + SETTLE,
        start_unix: unix_micros() + micros(SETTLE),
        interval: Duration::from_secs_f64(1.0 / s.rate),
    };
    let receivers = subscribe_all(members, id, after, &shared, &stop, plan).await?;

    // A concurrent disk probe tells a slow disk apart from a slow server.
    let probe = DiskProbe::start(data_dir, PROBE_EVERY)?;
    let cpu0 = cpu_snapshot();
    let sent = send_on_schedule(members, id, messages, &plan).await?;
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
    let (decrypt, decrypt_errors) = decrypt_all(s, members, id, &received)?;
    let (load_us, save_us, state_bytes) = chat_costs(&members[1], id)?;

    let appended_at = shared.appended_at.into_inner();
    let spread = shared.spread.into_inner();
    if let Ok(path) = std::env::var("QPQ_BENCH_CSV") {
        write_timeline(Path::new(&path), &sent.issue_lag, &appended_at, &spread)?;
    }
    let (first_recipient, last_recipient) = spread.into_values().unzip();
    Ok(LatencyReport {
        senders: senders.len(),
        rate: s.rate,
        run: s.latency_run,
        messages: count,
        deliveries: shared.delivered.get(),
        expected: shared.expected,
        to_recipient: shared.to_recipient.into_inner(),
        to_append: appended_at.into_values().collect(),
        from_append: shared.from_append.into_inner(),
        first_recipient,
        last_recipient,
        disk,
        issue_lag: sent.issue_lag,
        send_errors: sent.errors,
        first_error: sent.first_error,
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
