//! Keeping a rayon pool's threads awake through a burst of small parallel regions.
//!
//! A decode step runs ~30 parallel regions of 10–100 µs each (the linear layers, attention,
//! sampling). Between two regions an idle rayon worker first spins with `sched_yield`, then
//! sleeps; waking it for the next region costs a futex round trip, and the caller often ends up
//! running the whole region itself before the sleeper arrives. `perf` of the rollout worker at
//! two threads: the second core idle 15 % of the time, another 5 % in `sched_yield`, and the
//! packed kernel's samples split 58:42 between the two threads where the work is split 50:50.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A spinner that has found no work for this long gives up until the next guard. Gaps between
/// a decode step's regions are tens of µs; on an oversubscribed machine (several workers on few
/// cores) this bounds what spinning takes from the others.
const MAX_IDLE: Duration = Duration::from_micros(200);

/// While alive, every other thread of the current rayon pool runs a job that steals and runs
/// the pool's pending work (`rayon::yield_now`) in a busy loop instead of going to sleep.
/// Meant for short bursts (one decode step): it burns those cores while it lives, or until
/// [`MAX_IDLE`] passes without work.
pub struct HotPool {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Spinner jobs started, and running now.
    started: AtomicUsize,
    spinning: AtomicUsize,
}

impl HotPool {
    /// `None` outside a rayon pool's thread or in a one-thread pool (nothing to keep awake).
    pub fn new() -> Option<HotPool> {
        Self::with_max_idle(MAX_IDLE)
    }

    /// [`HotPool::new`] with spinners that give up after `max_idle` without work.
    pub fn with_max_idle(max_idle: Duration) -> Option<HotPool> {
        let owner = rayon::current_thread_index()?;
        let threads = rayon::current_num_threads();
        if threads < 2 {
            return None;
        }
        let shared = Arc::new(Shared::default());
        for _ in 1..threads {
            let sh = shared.clone();
            rayon::spawn(move || {
                // The owner may pick this job up itself while it waits inside a region; spinning
                // there would wait for a flag only the owner can set.
                if rayon::current_thread_index() == Some(owner) {
                    return;
                }
                sh.started.fetch_add(1, Ordering::AcqRel);
                sh.spinning.fetch_add(1, Ordering::AcqRel);
                let mut idle_since = None;
                while !sh.stop.load(Ordering::Acquire) {
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        idle_since = None;
                    } else if idle_since.get_or_insert_with(Instant::now).elapsed() > max_idle {
                        // A long gap: the owner is doing serial work or is descheduled (more
                        // busy threads than cores). Back to rayon's normal sleep.
                        break;
                    } else {
                        std::hint::spin_loop();
                    }
                }
                sh.spinning.fetch_sub(1, Ordering::AcqRel);
            });
        }
        Some(HotPool { shared })
    }
}

impl Drop for HotPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::HotPool;
    use rayon::prelude::*;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let t = Instant::now();
        while !cond() {
            assert!(t.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The other thread starts spinning under a guard, parallel work still gives the right
    /// results, and the spinner returns once the guard is dropped, or by itself after
    /// `MAX_IDLE` without work while the guard lives.
    #[test]
    fn the_other_thread_spins_under_the_guard_and_stops() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            let hot = HotPool::new().expect("a pool thread of a two-thread pool");
            let sh = hot.shared.clone();
            for round in 0..200u64 {
                let sum: u64 = (0..100_000u64).into_par_iter().map(|x| x * round).sum();
                assert_eq!(sum, round * 100_000 * 99_999 / 2);
            }
            wait_for("no spinner started on the other thread", || sh.started.load(Ordering::Acquire) == 1);
            // No more work: it gives up although the guard is alive.
            wait_for("the spinner kept spinning without work", || sh.spinning.load(Ordering::Acquire) == 0);
            drop(hot);

            // Without the idle limit only the dropped guard stops it (work is pushed all the
            // time, so a spinner that ignored the flag would keep running it).
            // 32 pieces of ~20 µs, each its own job: there is always a piece to steal.
            let piece = |i: u64| (0..20_000u64).fold(i, |a, x| std::hint::black_box(a.wrapping_mul(31) ^ x));
            let want: u64 = (0..32).map(piece).fold(0, u64::wrapping_add);
            let work = || assert_eq!((0..32u32).into_par_iter().with_max_len(1).map(|i| piece(i as u64)).reduce(|| 0, u64::wrapping_add), want);
            let hot = HotPool::with_max_idle(Duration::from_secs(3600)).unwrap();
            let sh = hot.shared.clone();
            let t = Instant::now();
            while sh.started.load(Ordering::Acquire) == 0 {
                work();
                assert!(t.elapsed() < Duration::from_secs(10), "no spinner started");
            }
            drop(hot);
            let t = Instant::now();
            while sh.spinning.load(Ordering::Acquire) != 0 {
                work();
                assert!(t.elapsed() < Duration::from_secs(10), "the spinner still runs after its guard was dropped");
            }
        });
        assert!(HotPool::new().is_none(), "outside any pool");
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert!(one.install(HotPool::new).is_none(), "a one-thread pool");
    }
}
