//! CPU time of this process's threads by name (Linux `/proc/self/task`, best effort).

use std::collections::HashMap;
use std::path::Path;

/// Per-thread CPU counters at one moment: tid → (name, CPU ns).
pub(crate) struct Snapshot(HashMap<u32, (String, u64)>);

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

/// Reads every thread's CPU counter now.
pub(crate) fn snapshot() -> Snapshot {
    let mut threads = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let path = entry.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if let Some(ns) = thread_cpu_ns(&path) {
                threads.insert(tid, (comm.trim().to_owned(), ns));
            }
        }
    }
    Snapshot(threads)
}

impl Snapshot {
    /// CPU ns used since `before` by the threads whose name starts with one of `prefixes`.
    pub(crate) fn since(before: &Self, prefixes: &[&str]) -> u64 {
        let now = snapshot();
        now.0
            .iter()
            .filter(|(_, (name, _))| prefixes.iter().any(|p| name.starts_with(p)))
            .map(|(tid, (_, ns))| ns.saturating_sub(before.0.get(tid).map_or(0, |t| t.1)))
            .sum()
    }
}
