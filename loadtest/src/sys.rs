//! What the machine did, read from Linux `/proc` (best effort: zero elsewhere): CPU time per
//! thread class of this process (load generator or in-process server), CPU time and memory of
//! a child server process, peak memory, and the open-file limit.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// Which part of the program a thread belongs to, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ThreadClass {
    /// The load generator: its member workers and the controller (main thread).
    Generator,
    /// The in-process server: connection workers, appender, store threads.
    Server,
}

/// Names of the generator's member worker threads.
pub(crate) const WORKER_THREAD_PREFIX: &str = "qpq-lt-";

fn classify(tid: u32, comm: &str) -> ThreadClass {
    if tid == std::process::id() || comm.starts_with(WORKER_THREAD_PREFIX) {
        ThreadClass::Generator
    } else {
        ThreadClass::Server
    }
}

/// CPU nanoseconds of one thread or process directory (`/proc/<pid>[/task/<tid>]`).
fn cpu_ns(dir: &Path) -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string(dir.join("schedstat"))
        && let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok())
    {
        return Some(ns);
    }
    // utime + stime in clock ticks (100 Hz on Linux).
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000_000)
}

/// Total CPU time (all threads, including exited ones) of process `pid`, in nanoseconds.
fn process_cpu_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000_000)
}

/// CPU counters at one moment.
#[derive(Debug, Clone)]
pub(crate) struct CpuSnapshot {
    at: Instant,
    /// tid → (class, CPU ns) for the threads of this process.
    threads: HashMap<u32, (ThreadClass, u64)>,
    /// CPU ns of the child server process, if there is one.
    child: Option<u64>,
    /// Machine-wide (busy, total) jiffies over all cores.
    machine: Option<(u64, u64)>,
}

/// Machine-wide busy and total jiffies from `/proc/stat`.
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Some((total.saturating_sub(idle), total))
}

/// Reads the counters now; `child` is the pid of a server process we started, if any.
pub(crate) fn cpu_snapshot(child: Option<u32>) -> CpuSnapshot {
    let mut threads = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if let Some(ns) = cpu_ns(&entry.path()) {
                threads.insert(tid, (classify(tid, comm.trim()), ns));
            }
        }
    }
    CpuSnapshot {
        at: Instant::now(),
        threads,
        child: child.and_then(process_cpu_ns),
        machine: machine_jiffies(),
    }
}

/// CPU used between two snapshots, in cores (1.0 = one core busy all the time).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct CpuUse {
    /// Wall time between the snapshots, seconds.
    pub(crate) wall_s: f64,
    /// Cores used by the load generator.
    pub(crate) generator_cores: f64,
    /// Cores used by the server (in-process threads or the child process); `None` for a
    /// remote target.
    pub(crate) server_cores: Option<f64>,
    /// Cores busy on the whole machine (everything: generator, server, other tenants'
    /// processes), out of `cores`.
    pub(crate) machine_busy_cores: Option<f64>,
}

impl CpuUse {
    /// What was used from `before` until now.
    pub(crate) fn since(before: &CpuSnapshot, child: Option<u32>, in_process: bool) -> Self {
        let now = cpu_snapshot(child);
        let wall = now.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let mut used: HashMap<ThreadClass, u64> = HashMap::new();
        for (tid, (class, ns)) in &now.threads {
            let was = before.threads.get(tid).map_or(0, |(_, ns)| *ns);
            *used.entry(*class).or_default() += ns.saturating_sub(was);
        }
        let cores = |ns: u64| ns as f64 / 1e9 / wall;
        let server = match (now.child, before.child) {
            (Some(n), Some(b)) => Some(cores(n.saturating_sub(b))),
            _ if in_process => Some(cores(used.get(&ThreadClass::Server).copied().unwrap_or(0))),
            _ => None,
        };
        let cores_available = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let machine = match (before.machine, now.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some((b1 - b0) as f64 / (t1 - t0) as f64 * cores_available)
            }
            _ => None,
        };
        Self {
            machine_busy_cores: machine,
            wall_s: wall,
            generator_cores: cores(used.get(&ThreadClass::Generator).copied().unwrap_or(0)),
            server_cores: server,
        }
    }
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn status_bytes(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident memory of this process (VmHWM), bytes.
pub(crate) fn peak_rss_self() -> Option<u64> {
    status_bytes("self", "VmHWM:")
}

/// Peak resident memory of process `pid` (VmHWM), bytes.
pub(crate) fn peak_rss(pid: u32) -> Option<u64> {
    status_bytes(&pid.to_string(), "VmHWM:")
}

/// Current resident memory of process `pid` (VmRSS), bytes.
pub(crate) fn rss(pid: u32) -> Option<u64> {
    status_bytes(&pid.to_string(), "VmRSS:")
}

/// Raises the open-file limit to at least `wanted` (the hard limit too, where allowed).
/// Returns the soft limit in force afterwards.
pub(crate) fn raise_nofile_limit(wanted: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let current = now.current.unwrap_or(u64::MAX);
    if current >= wanted {
        return current;
    }
    let raised = Rlimit {
        current: Some(wanted),
        maximum: Some(now.maximum.map_or(wanted, |m| m.max(wanted))),
    };
    if setrlimit(Resource::Nofile, raised).is_ok() {
        return wanted;
    }
    // Not allowed to raise the hard limit: go as far as it allows.
    let hard = now.maximum.unwrap_or(u64::MAX);
    let capped = Rlimit {
        current: Some(hard.min(wanted)),
        maximum: now.maximum,
    };
    if setrlimit(Resource::Nofile, capped).is_ok() {
        hard.min(wanted)
    } else {
        current
    }
}
