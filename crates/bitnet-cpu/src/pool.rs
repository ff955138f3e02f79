//! A persistent thread pool for the forward pass.
//!
//! Why not rayon: a decode step issues ~150 short parallel regions (a matmul takes 5-50 us), so
//! per-region overhead matters and nothing may allocate per token. Here `run` publishes a pointer
//! to the caller's closure, bumps an epoch, and the workers (which spin briefly, then sleep on a
//! condvar) run it with their thread index; the caller runs index 0 itself and waits for the rest.
//! No allocation, no thread spawn per call.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// Incremented once per `run`; workers wait for it to change.
    epoch: AtomicUsize,
    /// Workers still running the current job.
    pending: AtomicUsize,
    /// Fat pointer to the current job, valid while `pending > 0` (set before `epoch` is bumped).
    job: Mutex<Option<*const Job>>,
    sleep_lock: Mutex<()>,
    wake: Condvar,
    shutdown: std::sync::atomic::AtomicBool,
    n_threads: usize,
}

// The raw job pointer is only dereferenced while the `run` call that owns the closure is blocked.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// A fixed set of worker threads; `run(f)` calls `f(thread_index, n_threads)` on every thread.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes concurrent `run` calls from different threads.
    run_lock: Mutex<()>,
}

/// How many times a worker polls for new work before sleeping. Decode issues regions back to back,
/// so a short spin avoids a futex wake-up per matmul.
const SPIN_ITERS: usize = 20_000;

impl ThreadPool {
    /// A pool of `n_threads` (>= 1) including the calling thread.
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            job: Mutex::new(None),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: std::sync::atomic::AtomicBool::new(false),
            n_threads,
        });
        let workers = (1..n_threads)
            .map(|tid| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("bitnet-worker-{tid}"))
                    .spawn(move || worker_loop(&s, tid))
                    .expect("failed to spawn a worker thread")
            })
            .collect();
        ThreadPool { shared, workers, run_lock: Mutex::new(()) }
    }

    /// Number of threads, the caller included.
    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(tid, n_threads)` on every thread of the pool (the caller is tid 0) and returns when
    /// all have finished. A panic in a worker aborts the process (it would leave the pool wedged).
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        let n = self.shared.n_threads;
        if n == 1 {
            f(0, 1);
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let job: &(dyn Fn(usize, usize) + Sync + '_) = &f;
        // SAFETY: we erase the lifetime; the pointer is only used until `pending` drops to 0, and we
        // do not return before that.
        let job_ptr: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync + '_), &'static Job>(job) };
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job_ptr);
        self.shared.pending.store(n - 1, Ordering::SeqCst);
        {
            let _l = self.shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.epoch.fetch_add(1, Ordering::SeqCst);
            self.shared.wake.notify_all();
        }
        f(0, n);
        let mut spins = 0usize;
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

fn worker_loop(s: &Shared, tid: usize) {
    let mut seen = 0usize;
    loop {
        // Wait for a new epoch: spin first, then sleep.
        let mut spins = 0usize;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                let l = s.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
                if s.epoch.load(Ordering::Acquire) == seen && !s.shutdown.load(Ordering::Acquire) {
                    drop(s.wake.wait(l).unwrap_or_else(|e| e.into_inner()));
                }
                spins = 0;
            }
        }
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            // SAFETY: `run` keeps the closure alive until we decrement `pending`.
            let f: &Job = unsafe { &*job };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(tid, s.n_threads)));
            if r.is_err() {
                eprintln!("bitnet-cpu: a worker thread panicked; aborting");
                std::process::abort();
            }
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _l = self.shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A raw pointer that may be shared across the pool's threads; each thread writes a disjoint part.
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    pub fn new(s: &mut [T]) -> Self {
        SyncPtr(s.as_mut_ptr())
    }
    /// # Safety
    /// The caller guarantees `start..start+len` is in bounds and written by this thread only.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn runs_every_thread_once_per_call() {
        for n in 1..5 {
            let pool = ThreadPool::new(n);
            let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
            for _ in 0..1000 {
                pool.run(|tid, nt| {
                    assert_eq!(nt, n);
                    hits[tid].fetch_add(1, Ordering::Relaxed);
                });
            }
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), 1000);
            }
        }
    }

    #[test]
    fn disjoint_writes() {
        let pool = ThreadPool::new(3);
        let mut v = vec![0u32; 1001];
        let p = SyncPtr::new(&mut v);
        pool.run(|tid, nt| {
            let r = crate::split_range(1001, nt, tid, 1);
            let s = unsafe { p.slice(r.start, r.len()) };
            for (i, x) in s.iter_mut().enumerate() {
                *x = (r.start + i) as u32;
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    }
}
