//! The printed report: percentiles, one labelled line per figure, and the error count the
//! smoke run checks.

use crate::measure::{AppendReport, LatencyReport, PROBE_EVERY};
use crate::probe::{CLIENT, SERVER};
use crate::setup::KEY_PACKAGES;
use crate::{Report, Settings};

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

/// One labelled line of the report.
fn row(label: &str, value: impl std::fmt::Display) {
    println!("   {label:<40} {value}");
}

fn first_error(e: Option<&str>) -> String {
    e.map_or(String::new(), |e| format!(" (first: {e})"))
}

/// Acknowledged appends per second of the append run.
fn append_rate(a: &AppendReport) -> f64 {
    a.acked as f64 / a.window.as_secs_f64()
}

/// What was measured on what, and what shares the machine.
fn print_header(s: &Settings, workers: usize) {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
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
}

/// Section 1: setup, and the disk probe taken before the appends.
fn print_setup(s: &Settings, r: &mut Report) {
    let recipients = s.members - 1;
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
}

/// Section 2: the append run.
fn print_appends(s: &Settings, a: &mut AppendReport) {
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
    row("acknowledged appends/s", format!("{:.0}", append_rate(a)));
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
}

/// Section 3: the latency run (sorts its samples, which the summary relies on).
fn print_latency(s: &Settings, l: &mut LatencyReport) {
    let recipients = s.members - 1;
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
}

/// Section 4: client MLS costs, outside every other figure.
fn print_client_mls(s: &Settings, a: &AppendReport, l: &mut LatencyReport) {
    let recipients = s.members - 1;
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
}

/// The summary (after section 3 sorted the latencies); returns the number of errors seen.
fn print_summary(r: &Report) -> u64 {
    let (a, l) = (&r.appends, &r.latency);
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
    row("appends/s (acknowledged)", format!("{:.0}", append_rate(a)));
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

/// Prints the report; returns the number of errors seen.
pub(crate) fn print(s: &Settings, workers: usize, r: &mut Report) -> u64 {
    print_header(s, workers);
    print_setup(s, r);
    print_appends(s, &mut r.appends);
    print_latency(s, &mut r.latency);
    print_client_mls(s, &r.appends, &mut r.latency);
    print_summary(r)
}
