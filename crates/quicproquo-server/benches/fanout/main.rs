//! Fan-out alone: one group, one sender, `subscribers` light receivers on real Noise
//! connections to the real server; beside it, in the same run, a bare Noise fan-out relay
//! with the same crypto backend and the same number of receivers.
//!
//! Each side runs two phases: **paced** (messages at `rate` per second, slow enough that each
//! entry is pushed on its own) and **backlog** (`backlog` messages sent at once, `in_flight`
//! outstanding from a thread of the sender's own, so entries pile up faster than they are
//! pushed and pushes carry many entries). A push can carry at most what the sender has
//! outstanding (the appender commits what is queued), so the bare relay's backlog frames carry
//! as many messages as there are sends outstanding: both sides get the same batches to work
//! with. A delivery is one entry reaching one receiver.
//! The figures per phase: deliveries per second (first send to last delivery), the server's
//! CPU per delivery (its threads only, from `/proc/self/task`: the connection workers, the
//! appender and the store's pool; for the bare side, the relay's thread), and the ratio of
//! the two CPU figures.
//!
//! The real server runs twice, with each way it can push (ADR 0019): `calls` (each batch a
//! `MessageStream.deliver` call the receiver answers) and `frames` (each entry a push frame
//! beside RPC, acknowledged by sequence number every quarter window).
//!
//! The receivers are light: the server's receivers take each pushed batch off the connection
//! (Noise decryption, Cap'n Proto decoding, the RPC's answer or an acknowledgement now and
//! then) and count its entries, checking
//! their order by sequence number; the bare receivers decrypt the frames and count. Nobody
//! decrypts MLS. The sender's messages are real MLS application messages, encrypted before the
//! timed phases. The bare relay forwards each paced message in a frame of its own and the
//! backlog in frames of `batch` messages; its messages have the size of a pushed entry.
//!
//! Run: `cargo bench -p quicproquo-server --bench fanout`. `QPQ_BENCH_SUBSCRIBERS` (1000),
//! `QPQ_BENCH_RATE` (20 messages/s), `QPQ_BENCH_PACED` (100 messages), `QPQ_BENCH_BACKLOG`
//! (1000 messages), `QPQ_BENCH_IN_FLIGHT` (64 sends outstanding in the backlog) and
//! `QPQ_BENCH_BATCH` (messages per frame of the relay's backlog; as many as in flight) change
//! the shape; `QPQ_BENCH_PUSH=frames` runs the frames alone. Without `--bench` (e.g. `cargo
//! test --all-targets`) it runs a small smoke version that fails on any error.

mod bare;
mod cpu;
mod real;

use std::time::Duration;

use anyhow::{Context, Result};
use quicproquo_client::ConnectOptions;

/// The shape of the run.
pub(crate) struct Settings {
    subscribers: usize,
    rate: f64,
    paced_messages: u64,
    backlog_messages: u64,
    in_flight: usize,
    batch: u64,
    payload_bytes: usize,
    deadline: Duration,
}

/// What one phase measured.
#[derive(Default)]
pub(crate) struct Measured {
    deliveries: u64,
    /// Pushes (or frames) that carried them, summed over the receivers.
    pushes: u64,
    wall: Duration,
    server_cpu_ns: u64,
    /// The part of it spent on the connection workers (the relay's thread for the bare side).
    worker_cpu_ns: u64,
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.deliveries as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn cpu_us(&self) -> f64 {
        self.server_cpu_ns as f64 / 1e3 / self.deliveries.max(1) as f64
    }
}

/// The plaintext of message `i`.
pub(crate) fn plaintext(i: u64, len: usize) -> Vec<u8> {
    let mut body = format!("fanout {i} ").into_bytes();
    body.resize(len.max(body.len()), b'.');
    body
}

fn settings() -> Result<Settings> {
    let benching = std::env::args().any(|a| a == "--bench");
    let env = |name: &str, default: u64| -> Result<u64> {
        std::env::var(name).ok().map_or(Ok(default), |v| {
            v.parse().with_context(|| format!("{name}={v}"))
        })
    };
    Ok(if benching {
        let in_flight = usize::try_from(env("QPQ_BENCH_IN_FLIGHT", 64)?)?.max(1);
        Settings {
            subscribers: usize::try_from(env("QPQ_BENCH_SUBSCRIBERS", 1000)?)?,
            rate: env("QPQ_BENCH_RATE", 20)? as f64,
            paced_messages: env("QPQ_BENCH_PACED", 100)?,
            backlog_messages: env("QPQ_BENCH_BACKLOG", 1000)?,
            in_flight,
            batch: env("QPQ_BENCH_BATCH", in_flight as u64)?.max(1),
            payload_bytes: 128,
            deadline: Duration::from_secs(120),
        }
    } else {
        Settings {
            subscribers: 8,
            rate: 50.0,
            paced_messages: 5,
            backlog_messages: 20,
            in_flight: 4,
            batch: 4,
            payload_bytes: 128,
            deadline: Duration::from_secs(30),
        }
    })
}

/// One run of the real server (a server of its own), pushing by `push`.
fn run_real(
    s: &Settings,
    rt: &tokio::runtime::Runtime,
    push: real::Push,
) -> Result<([Measured; 2], usize)> {
    let dir = tempfile::tempdir()?;
    let server = real::start_server(dir.path(), s.subscribers + 1, s.in_flight)?;
    let options = ConnectOptions::new(server.cluster_key());
    let local = tokio::task::LocalSet::new();
    let real = local.block_on(rt, real::run(s, server.local_addr(), options, push));
    drop(local);
    server.shutdown();
    server.join()?;
    real
}

fn main() -> Result<()> {
    let s = settings()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("fanout-client")
        .build()?;
    // `QPQ_BENCH_PUSH=frames` skips the calls (e.g. to profile the frames alone).
    let frames_only = std::env::var("QPQ_BENCH_PUSH").is_ok_and(|v| v == "frames");
    let (frames, message_bytes) = run_real(&s, &rt, real::Push::Frames)?;
    let calls = if frames_only {
        [Measured::default(), Measured::default()]
    } else {
        run_real(&s, &rt, real::Push::Calls)?.0
    };
    // The bare entry: the MLS message and the envelope's other fields (ids, seq, epoch, time).
    let entry_bytes = message_bytes + 64;
    let local = tokio::task::LocalSet::new();
    let bare = local.block_on(&rt, bare::run(&s, entry_bytes))?;

    println!(
        "fan-out: {} receivers, MLS message {message_bytes} B; paced {} msg at {}/s, backlog {} msg \
         ({} sends outstanding; bare frames of {})",
        s.subscribers, s.paced_messages, s.rate, s.backlog_messages, s.in_flight, s.batch
    );
    println!(
        "{:<8} {:<6} {:>11} {:>9} {:>12} {:>14} {:>14} {:>16}",
        "phase",
        "side",
        "deliveries",
        "per push",
        "deliv/s",
        "server µs/del",
        "workers µs/del",
        "del/s per core"
    );
    for (i, phase) in ["paced", "backlog"].iter().enumerate() {
        let (c, f, b) = (&calls[i], &frames[i], &bare[i]);
        for (side, m) in [("calls", c), ("frames", f), ("bare", b)] {
            println!(
                "{phase:<8} {side:<6} {:>11} {:>9.1} {:>12.0} {:>14.3} {:>14.3} {:>16.0}",
                m.deliveries,
                m.deliveries as f64 / m.pushes.max(1) as f64,
                m.per_second(),
                m.cpu_us(),
                m.worker_cpu_ns as f64 / 1e3 / m.deliveries.max(1) as f64,
                1e6 / m.cpu_us().max(1e-9)
            );
        }
        println!(
            "{phase:<8} ratio server/bare CPU per delivery: calls {:.1}x, frames {:.1}x",
            c.cpu_us() / b.cpu_us().max(1e-9),
            f.cpu_us() / b.cpu_us().max(1e-9)
        );
    }
    Ok(())
}
