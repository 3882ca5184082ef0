//! What the machine did (Linux, best effort): CPU time per thread class of this process and
//! machine-wide busy time, and a disk probe (write + fdatasync next to the store).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::{micros, unix_micros};

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

/// Per-thread and machine-wide CPU counters at one moment.
pub(crate) struct CpuSnapshot {
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

/// Reads the CPU counters now.
pub(crate) fn cpu_snapshot() -> CpuSnapshot {
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
pub(crate) struct CpuUse {
    wall: f64,
    /// CPU ns per class of [`CLASSES`].
    per_class: [u64; CLASSES.len()],
    /// Cores busy machine-wide (all processes), on average.
    machine: Option<f64>,
}

/// Indices into [`CLASSES`] of the server's threads.
pub(crate) const SERVER: [usize; 3] = [1, 2, 3];
/// Index into [`CLASSES`] of the client thread.
pub(crate) const CLIENT: usize = 0;

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

    pub(crate) fn since(before: &CpuSnapshot) -> Self {
        Self::between(before, &cpu_snapshot())
    }

    /// CPU µs of `classes` per operation.
    pub(crate) fn us_per(&self, classes: &[usize], ops: u64) -> f64 {
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
pub(crate) fn disk_probe(
    dir: &Path,
    samples: usize,
    every: Duration,
    stop: &AtomicBool,
) -> Result<Vec<u64>> {
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
pub(crate) struct DiskProbe {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<u64>>>,
}

impl DiskProbe {
    pub(crate) fn start(dir: &Path, every: Duration) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, flag) = (dir.to_owned(), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("bench-disk-probe".into())
            .spawn(move || disk_probe(&dir, usize::MAX, every, &flag))?;
        Ok(Self { stop, thread })
    }

    pub(crate) fn finish(self) -> Result<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the disk probe panicked"))?
    }
}
