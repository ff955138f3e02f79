//! A persistent thread pool for the forward pass.
//!
//! Why not rayon: a decode step issues ~150 short parallel regions (a matmul takes 5-50 us), so
//! per-region overhead matters and nothing may allocate per token. Here `run` publishes a pointer
//! to the caller's closure, bumps an epoch, and the workers (which spin briefly, then sleep on a
//! condvar) run it with their thread index; the caller runs index 0 itself and waits for the rest.
//! No allocation, no thread spawn per call.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Workers asleep on `wake` (or about to be): `run` notifies only when some are, since a
    /// notify is a futex system call even with no waiter (~0.8 us on the development VM, and a
    /// decode step runs ~150 regions).
    sleepers: AtomicUsize,
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
    /// Per thread, the part of its share of a [`ThreadPool::run_balanced`] call not yet claimed:
    /// `next << 32 | end` (units).
    shares: Box<[AtomicU64]>,
}

/// Chunks per thread's share in [`ThreadPool::run_balanced`]: few enough that each is a long
/// sequential read, enough that a thread done early can take over a quarter of a slower one's.
const CHUNKS_PER_SHARE: usize = 4;

fn pack(next: usize, end: usize) -> u64 {
    ((next as u64) << 32) | end as u64
}
fn unpack(s: u64) -> (usize, usize) {
    ((s >> 32) as usize, (s & 0xffff_ffff) as usize)
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
            sleepers: AtomicUsize::new(0),
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
        let shares = (0..n_threads).map(|_| AtomicU64::new(0)).collect();
        ThreadPool { shared, workers, run_lock: Mutex::new(()), shares }
    }

    /// Number of threads, the caller included.
    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(tid, n_threads)` on every thread of the pool (the caller is tid 0) and returns when
    /// all have finished. A panic in a worker aborts the process (it would leave the pool wedged).
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        if self.shared.n_threads == 1 {
            f(0, 1);
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.run_locked(&f);
    }

    /// Runs `f(units)` over `0..units` in pieces on the pool's threads and returns when all is
    /// done. Thread `t` works through its own contiguous share (`split_range`) front to back, in
    /// [`CHUNKS_PER_SHARE`] chunks; a thread done with its share then takes chunks from the back
    /// of the others' shares. So each thread keeps contiguous units unless another falls behind
    /// (on a shared VM one vCPU can run a third slower than the other for a while: measured
    /// with `perf`, the faster thread idled 5-13% of a decode step; hybrid CPUs have slow cores
    /// by design), and then the faster one takes over the end of the slower one's share. `f` gets disjoint ranges covering
    /// `0..units` exactly once.
    pub fn run_balanced<F: Fn(Range<usize>) + Sync>(&self, units: usize, f: F) {
        let n = self.shared.n_threads;
        if n == 1 || units <= 1 {
            if units > 0 {
                f(0..units);
            }
            return;
        }
        assert!(units < 1 << 32, "run_balanced: too many units");
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        for (t, s) in self.shares.iter().enumerate() {
            let r = crate::split_range(units, n, t, 1);
            s.store(pack(r.start, r.end), Ordering::Relaxed);
        }
        let chunk = units.div_ceil(n * CHUNKS_PER_SHARE).max(1);
        self.run_locked(&|tid, nt| {
            // own share, front to back
            let own = &self.shares[tid];
            let mut cur = own.load(Ordering::Acquire);
            loop {
                let (next, end) = unpack(cur);
                if next >= end {
                    break;
                }
                let to = (next + chunk).min(end);
                match own.compare_exchange_weak(cur, pack(to, end), Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        f(next..to);
                        cur = own.load(Ordering::Acquire);
                    }
                    Err(now) => cur = now,
                }
            }
            // then the others', back to front
            for k in 1..nt {
                let other = &self.shares[(tid + k) % nt];
                let mut cur = other.load(Ordering::Acquire);
                loop {
                    let (next, end) = unpack(cur);
                    if next >= end {
                        break;
                    }
                    let from = end.saturating_sub(chunk).max(next);
                    match other.compare_exchange_weak(cur, pack(next, from), Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => {
                            f(from..end);
                            cur = other.load(Ordering::Acquire);
                        }
                        Err(now) => cur = now,
                    }
                }
            }
        });
    }

    /// [`ThreadPool::run`]'s body; the caller holds `run_lock` and the pool has 2+ threads.
    fn run_locked(&self, f: &(dyn Fn(usize, usize) + Sync + '_)) {
        let n = self.shared.n_threads;
        let job: &(dyn Fn(usize, usize) + Sync + '_) = f;
        // SAFETY: we erase the lifetime; the pointer is only used until `pending` drops to 0, and we
        // do not return before that.
        let job_ptr: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync + '_), &'static Job>(job) };
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job_ptr);
        self.shared.pending.store(n - 1, Ordering::SeqCst);
        // Publish the epoch, then look for sleepers (both SeqCst): a worker counts itself in
        // `sleepers` before it checks the epoch one last time, so either it sees the new epoch
        // and does not sleep, or we see it counted and wake it (under the lock it waits with).
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        if self.shared.sleepers.load(Ordering::SeqCst) != 0 {
            let _l = self.shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
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
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                if s.epoch.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                    drop(s.wake.wait(l).unwrap_or_else(|e| e.into_inner()));
                } else {
                    drop(l);
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
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

    /// Workers that went to sleep between calls (the caller paused past their spin) are woken
    /// by the next call, also when the pause ends just as they fall asleep.
    #[test]
    fn wakes_sleeping_workers() {
        let pool = ThreadPool::new(3);
        let hits = AtomicU64::new(0);
        for i in 0..200u64 {
            // pauses around the spin time, some longer, some shorter
            std::thread::sleep(std::time::Duration::from_micros((i * 37) % 3000));
            pool.run(|_, _| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(hits.load(Ordering::Relaxed), 600);
    }

    /// Every unit exactly once, whatever the thread count and however the threads race (one
    /// thread is slowed now and then so that the others take over its share).
    #[test]
    fn balanced_runs_cover_every_unit_once() {
        for n in 1..5 {
            let pool = ThreadPool::new(n);
            for units in [0usize, 1, 2, 3, 7, 64, 1000] {
                for round in 0..20 {
                    let hits: Vec<AtomicU64> = (0..units).map(|_| AtomicU64::new(0)).collect();
                    pool.run_balanced(units, |r| {
                        if r.start % 3 == round % 3 {
                            std::thread::sleep(std::time::Duration::from_micros(50));
                        }
                        for u in r {
                            hits[u].fetch_add(1, Ordering::Relaxed);
                        }
                    });
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n {n} units {units}");
                }
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
