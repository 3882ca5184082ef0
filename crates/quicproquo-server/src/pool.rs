//! The bounded CPU pool: a fixed set of threads that run CPU-heavy checks (KeyPackage
//! validation, commit verification) off the connections' worker threads.
//!
//! A worker thread serves every connection it accepted on one single-threaded runtime, so a
//! signature check run there stalls all of them. Such work is handed to this pool instead.
//! Both its threads and its queue are bounded: at most `threads + queue` jobs are admitted at
//! once, and a caller past that waits (asynchronously, holding nothing but its own future)
//! for a slot, so a burst slows the calls that caused it rather than growing a queue. Callers
//! are themselves bounded (each connection has a cap on calls in flight), so the waiters are
//! too.
//!
//! What it is not: a general task executor. Jobs must be short, pure computations; they never
//! block on I/O.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use tokio::sync::{Semaphore, oneshot};

/// Default number of pool threads: one per core, at most 8.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Default number of jobs admitted beyond those running.
pub const DEFAULT_QUEUE: usize = 256;

/// Why a job did not produce its result.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolError {
    /// The pool has shut down (its threads are gone).
    #[error("the CPU pool has shut down")]
    Closed,
    /// The job panicked; the pool thread survived it.
    #[error("a CPU pool job panicked")]
    Panicked,
}

/// What the pool has done, for the metrics.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Jobs admitted and not yet finished (running or queued).
    pub admitted: AtomicU64,
    /// Jobs finished (including those that panicked).
    pub completed: AtomicU64,
    /// Callers that found every slot taken and had to wait.
    pub waited: AtomicU64,
    /// Jobs that panicked.
    pub panicked: AtomicU64,
}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A bounded pool of CPU threads. Cloning shares the pool; the threads stop once every clone
/// is dropped and the queued jobs have run.
#[derive(Clone)]
pub struct CpuPool {
    inner: Arc<Inner>,
}

struct Inner {
    sender: Mutex<Option<SyncSender<Job>>>,
    slots: Arc<Semaphore>,
    stats: Arc<PoolStats>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the threads once it is empty.
        self.sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            // A pool thread never panics (jobs are caught); a join error has nothing to add.
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPool")
            .field("free_slots", &self.inner.slots.available_permits())
            .finish_non_exhaustive()
    }
}

impl CpuPool {
    /// A pool of `threads` threads (at least 1) admitting `queue` jobs beyond those running,
    /// counting into `stats`.
    pub fn new(threads: usize, queue: usize, stats: Arc<PoolStats>) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (sender, receiver) = sync_channel::<Job>(queue + threads);
        let receiver = Arc::new(Mutex::new(receiver));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let receiver = Arc::clone(&receiver);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("qpq-cpu-{i}"))
                    .spawn(move || run_jobs(&receiver))?,
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                sender: Mutex::new(Some(sender)),
                slots: Arc::new(Semaphore::new(threads + queue)),
                stats,
                threads: Mutex::new(handles),
            }),
        })
    }

    /// A pool sized by the defaults, with its own statistics (tests, benches).
    pub fn with_defaults() -> std::io::Result<Self> {
        Self::new(default_threads(), DEFAULT_QUEUE, Arc::default())
    }

    /// The pool's statistics.
    pub fn stats(&self) -> &PoolStats {
        &self.inner.stats
    }

    /// Runs `job` on a pool thread and returns its result. Waits for a slot when the pool is
    /// full; the job does not start if this future is dropped before it is queued.
    pub async fn run<T, F>(&self, job: F) -> Result<T, PoolError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let slots = Arc::clone(&self.inner.slots);
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.inner.stats.waited.fetch_add(1, Ordering::Relaxed);
                slots.acquire_owned().await.map_err(|_| PoolError::Closed)?
            }
        };
        let (tx, rx) = oneshot::channel();
        let stats = Arc::clone(&self.inner.stats);
        stats.admitted.fetch_add(1, Ordering::Relaxed);
        let wrapped: Job = Box::new(move || {
            let out = catch_unwind(AssertUnwindSafe(job));
            if out.is_err() {
                stats.panicked.fetch_add(1, Ordering::Relaxed);
            }
            stats.admitted.fetch_sub(1, Ordering::Relaxed);
            stats.completed.fetch_add(1, Ordering::Relaxed);
            // The slot is free before the caller sees the result.
            drop(permit);
            // The caller may have gone away; its result is then not wanted.
            let _ = tx.send(out);
        });
        let sent = {
            let sender = self
                .inner
                .sender
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match sender.as_ref() {
                // A slot guarantees room in the queue: it never blocks.
                Some(s) => s.try_send(wrapped),
                None => Err(TrySendError::Disconnected(wrapped)),
            }
        };
        if sent.is_err() {
            self.inner.stats.admitted.fetch_sub(1, Ordering::Relaxed);
            return Err(PoolError::Closed);
        }
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(PoolError::Panicked),
            Err(_) => Err(PoolError::Closed),
        }
    }
}

/// One pool thread: runs jobs until the queue is closed and empty.
fn run_jobs(receiver: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let r = receiver.lock().unwrap_or_else(PoisonError::into_inner);
            r.recv()
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }

    #[test]
    fn runs_jobs_off_the_calling_thread_and_returns_results() -> TestResult {
        let pool = CpuPool::new(2, 4, Arc::default())?;
        let caller = std::thread::current().id();
        let (value, thread) =
            runtime()?.block_on(pool.run(move || (6 * 7, std::thread::current().id())))?;
        assert_eq!(value, 42);
        assert_ne!(thread, caller);
        assert_eq!(pool.stats().completed.load(Ordering::Relaxed), 1);
        Ok(())
    }

    #[test]
    fn a_panicking_job_is_an_error_and_the_pool_lives_on() -> TestResult {
        let pool = CpuPool::new(1, 0, Arc::default())?;
        let rt = runtime()?;
        let r: Result<(), _> = rt.block_on(pool.run(|| panic!("job failed")));
        assert_eq!(r, Err(PoolError::Panicked));
        assert_eq!(rt.block_on(pool.run(|| 1))?, 1);
        assert_eq!(pool.stats().panicked.load(Ordering::Relaxed), 1);
        Ok(())
    }

    #[test]
    fn past_threads_plus_queue_callers_wait_for_a_slot() -> TestResult {
        // One thread, one queued job: the third caller must wait until the first finishes.
        let pool = CpuPool::new(1, 1, Arc::default())?;
        let gate = Arc::new(Barrier::new(2));
        let rt = runtime()?;
        rt.block_on(async {
            let g = Arc::clone(&gate);
            let first = tokio::spawn({
                let pool = pool.clone();
                async move { pool.run(move || g.wait()).await }
            });
            let second = tokio::spawn({
                let pool = pool.clone();
                async move { pool.run(|| 2).await }
            });
            // Wait (with a deadline) until both are admitted.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while pool.inner.slots.available_permits() > 0 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "jobs never admitted"
                );
                tokio::task::yield_now().await;
            }
            let third = tokio::spawn({
                let pool = pool.clone();
                async move { pool.run(|| 3).await }
            });
            while pool.stats().waited.load(Ordering::Relaxed) == 0 {
                assert!(tokio::time::Instant::now() < deadline, "third never waited");
                tokio::task::yield_now().await;
            }
            assert!(!third.is_finished());
            gate.wait();
            first.await??;
            assert_eq!(second.await??, 2);
            assert_eq!(third.await??, 3);
            Ok::<_, Box<dyn std::error::Error>>(())
        })?;
        assert_eq!(pool.stats().admitted.load(Ordering::Relaxed), 0);
        Ok(())
    }
}
