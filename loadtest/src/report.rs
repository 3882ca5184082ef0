//! The report: per phase, wall time, CPU of generator and server, latency percentiles,
//! counters and errors; memory; threshold verdicts. Printed as a table, written as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::cli::Settings;
use crate::stats::StatsSnapshot;
use crate::sys::CpuUse;
use crate::threshold::Verdict;

/// One phase of the run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PhaseReport {
    /// Phase name.
    pub(crate) name: String,
    /// Wall time, seconds.
    pub(crate) wall_s: f64,
    /// CPU used meanwhile.
    pub(crate) cpu: CpuUse,
    /// Planned message rate (steady-state phases).
    pub(crate) rate: Option<f64>,
    /// Deliveries per second (steady state) or handshakes per second (connect).
    pub(crate) throughput_per_s: Option<f64>,
    /// CPU per join (join phase), per delivery (steady state) or per connection (connect).
    pub(crate) cpu_per_item: Option<CpuPerItem>,
    /// What was measured.
    pub(crate) stats: StatsSnapshot,
    /// The server's verification of the phase's commits and proposals against its public
    /// views (in-process server only).
    pub(crate) verification: Option<Verification>,
}

/// The server's handshake-message verification during one phase.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Verification {
    /// Commits and proposals verified.
    pub(crate) messages: u64,
    /// Their total verification time, seconds.
    pub(crate) total_s: f64,
    /// Mean time per message, ms.
    pub(crate) mean_ms: f64,
}

impl Verification {
    /// The verification between two readings of the server's (count, total seconds); `None`
    /// if nothing was verified or the server's metrics are not readable.
    pub(crate) fn between(before: Option<(u64, f64)>, after: Option<(u64, f64)>) -> Option<Self> {
        let ((n0, s0), (n1, s1)) = (before?, after?);
        let messages = n1.checked_sub(n0).filter(|n| *n > 0)?;
        let total_s = (s1 - s0).max(0.0);
        Some(Self {
            messages,
            total_s,
            mean_ms: total_s * 1e3 / messages as f64,
        })
    }
}

/// CPU time per unit of work of a phase.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct CpuPerItem {
    /// Units of work (joins, deliveries, connections).
    pub(crate) items: u64,
    /// Generator CPU per unit, µs.
    pub(crate) generator_us: f64,
    /// Server CPU per unit, µs (`None` for a remote target).
    pub(crate) server_us: Option<f64>,
}

/// Memory figures (bytes).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Memory {
    /// Peak resident memory of this process (the generator, plus the server when in-process).
    pub(crate) process_peak_bytes: Option<u64>,
    /// Whether the server ran inside this process (then its memory is in the figure above).
    pub(crate) server_in_process: bool,
    /// Peak resident memory of the child server process.
    pub(crate) server_peak_bytes: Option<u64>,
    /// Server resident memory growth per idle authenticated connection (connections scenario,
    /// child server).
    pub(crate) server_bytes_per_idle_connection: Option<f64>,
    /// Generator resident memory growth per idle connection (connections scenario).
    pub(crate) generator_bytes_per_idle_connection: Option<f64>,
}

/// The machine the run happened on.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    /// CPU model.
    pub(crate) cpu: String,
    /// Cores available.
    pub(crate) cores: usize,
    /// Memory, GiB.
    pub(crate) memory_gib: f64,
}

impl Machine {
    /// Reads `/proc/cpuinfo` and `/proc/meminfo` (best effort).
    pub(crate) fn detect() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib,
        }
    }
}

/// Everything the run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// UTC time the run started (RFC 3339).
    pub(crate) date: String,
    /// Where it ran.
    pub(crate) machine: Machine,
    /// The server under test.
    pub(crate) target: String,
    /// The options.
    pub(crate) settings: Settings,
    /// The phases, in order.
    pub(crate) phases: Vec<PhaseReport>,
    /// Memory.
    pub(crate) memory: Memory,
    /// Errors of every kind in the whole run.
    pub(crate) errors: u64,
    /// Verdicts of the `--threshold` rules.
    pub(crate) thresholds: Vec<Verdict>,
    /// Whether every rule held.
    pub(crate) passed: bool,
}

/// UTC date and time of a Unix timestamp, RFC 3339.
pub(crate) fn rfc3339(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1024.0 / 1024.0)
}

/// The report as a human-readable table.
pub(crate) fn table(r: &Report) -> String {
    let mut out = String::new();
    write_header(&mut out, r);
    for p in &r.phases {
        let _ = writeln!(out);
        write_phase(&mut out, p);
    }
    let _ = writeln!(out);
    write_memory(&mut out, &r.memory);
    let _ = writeln!(out, "errors: {}", r.errors);
    for v in &r.thresholds {
        let _ = writeln!(
            out,
            "threshold {}: {} (measured {:.3})",
            v.rule,
            if v.passed { "pass" } else { "FAIL" },
            v.measured
        );
    }
    out
}

/// The table's first lines: date, machine, target and scenario.
fn write_header(out: &mut String, r: &Report) {
    let s = &r.settings;
    let _ = writeln!(out, "qpq-loadtest report, {}", r.date);
    let _ = writeln!(
        out,
        "machine: {} ({} cores, {:.0} GiB); server: {}",
        r.machine.cpu, r.machine.cores, r.machine.memory_gib, r.target
    );
    let _ = writeln!(
        out,
        "scenario {:?}: {} members, {} group(s) of {} ({} decrypting), suite {}, rate(s) {:?}/s, \
         {:.0} s each, {} B payloads, churn {}, {} worker thread(s)",
        s.scenario,
        s.members,
        s.groups,
        s.group_size,
        s.decrypting,
        s.suite,
        s.rates,
        s.duration.as_secs_f64(),
        s.payload_bytes,
        s.churn,
        s.threads
    );
}

/// One phase: its headline, CPU per item, latency percentiles, counters and errors.
fn write_phase(out: &mut String, p: &PhaseReport) {
    let server = p
        .cpu
        .server_cores
        .map_or_else(|| "n/a".into(), |c| format!("{c:.2}"));
    let machine = p
        .cpu
        .machine_busy_cores
        .map_or_else(|| "n/a".into(), |c| format!("{c:.2}"));
    let _ = write!(
        out,
        "== {}: {:.2} s, CPU cores used: generator {:.2}, server {server}, whole machine \
         {machine}",
        p.name, p.wall_s, p.cpu.generator_cores
    );
    if let Some(rate) = p.rate {
        let _ = write!(out, ", planned {rate} msg/s");
    }
    if let Some(t) = p.throughput_per_s {
        let _ = write!(out, ", {t:.0}/s");
    }
    let _ = writeln!(out);
    if let Some(c) = p.cpu_per_item {
        let server = c
            .server_us
            .map_or_else(|| "n/a".into(), |us| format!("{us:.1} µs"));
        let _ = writeln!(
            out,
            "  CPU per item ({} items): generator {:.1} µs, server {server}",
            c.items, c.generator_us
        );
    }
    if !p.stats.latency_ms.is_empty() {
        let _ = writeln!(
            out,
            "  {:<40} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        for (name, h) in &p.stats.latency_ms {
            let _ = writeln!(
                out,
                "  {:<40} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                name, h.count, h.p50, h.p90, h.p99, h.p999, h.max
            );
        }
    }
    if let Some(v) = p.verification {
        let _ = writeln!(
            out,
            "  server commit verification: {} commits/proposals, mean {:.2} ms, total {:.2} s",
            v.messages, v.mean_ms, v.total_s
        );
    }
    for (name, v) in &p.stats.counters {
        let _ = writeln!(out, "  {name}: {v}");
    }
    for (kind, n) in &p.stats.errors {
        let _ = writeln!(out, "  ERROR {kind}: {n}");
    }
}

/// The memory lines, for the figures that were measured.
fn write_memory(out: &mut String, m: &Memory) {
    if let Some(b) = m.process_peak_bytes {
        let who = if m.server_in_process {
            "load generator + in-process server"
        } else {
            "load generator"
        };
        let _ = writeln!(out, "peak memory ({who}): {}", mib(b));
    }
    if let Some(b) = m.server_peak_bytes {
        let _ = writeln!(out, "peak memory (server process): {}", mib(b));
    }
    if let Some(b) = m.server_bytes_per_idle_connection {
        let _ = writeln!(
            out,
            "server memory per idle authenticated connection: {:.1} KiB",
            b / 1024.0
        );
    }
    if let Some(b) = m.generator_bytes_per_idle_connection {
        let _ = writeln!(
            out,
            "generator memory per idle connection: {:.1} KiB",
            b / 1024.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_800_000_000), "2027-01-15T08:00:00Z");
    }
}
