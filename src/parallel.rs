//! The crate's one parallelism mechanism: [rayon], on the caller's pool.
//!
//! # Why rayon
//!
//! Every parallel loop of the crate (aggregation kernels, admission's reads,
//! feature extraction, the probe trainer's gradient passes) runs as rayon
//! tasks on the rayon pool *current at the call*. It used to spawn
//! `available_parallelism()` scoped OS threads per call instead, which
//!
//! - oversubscribed the machine inside a server that already runs a pool (an
//!   async runtime, a rayon pool of its own, several rounds at once): every
//!   call added one thread per core, with no cap the caller could set;
//! - made small calls slow: spawning and joining threads costs tens of
//!   microseconds, more than a whole tiny round (unit tests, fuzz targets);
//! - nested badly: a parallel call inside another (admission inside a
//!   round) multiplied the thread count.
//!
//! A shared, work-stealing pool fixes all three: threads are created once,
//! idle workers steal the uneven parts, nested calls reuse the same workers,
//! and the *caller* decides how many threads the crate may use. The library
//! never builds a pool of its own, global or local.
//!
//! # Capping threads
//!
//! - Run the call inside your own pool:
//!   `rayon::ThreadPoolBuilder::new().num_threads(2).build()?.install(|| rule.aggregate(..))`
//!   — all of the crate's parallel work then runs on those 2 threads (see the
//!   example in the [`aggregate`](crate::aggregate) module docs).
//! - Or size rayon's global pool, used when no pool is installed: the
//!   `RAYON_NUM_THREADS` environment variable, or
//!   `rayon::ThreadPoolBuilder::new().num_threads(n).build_global()` once at
//!   start-up.
//! - `num_threads(1)` runs everything on one thread, with the same results.
//!
//! # Results never depend on the thread count
//!
//! Work is split into parts whose boundaries depend on the *size of the work
//! only* ([`part_count`], [`group_len`]), never on the number of threads, and
//! per-part results (partial sums, first errors) are combined in part order.
//! So a FedAvg, a Gram matrix or a trained probe is bit-for-bit the same on 1
//! thread or 64 (tested in `tests/parallel.rs`).
//!
//! # Small work stays on the calling thread
//!
//! Work below [`MIN_PART_WORK`] values is one part and runs inline, without
//! touching the pool: a tiny round costs what its arithmetic costs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use rayon::prelude::*;

/// Work (values read or multiply–adds) below which a part is not split
/// further: a rayon task costs a few microseconds, this much work tens.
pub(crate) const MIN_PART_WORK: usize = 1 << 17;

/// The most parts any job is split into. Bounds what a reduction keeps (one
/// accumulator per part: Gram matrices, gradient buffers) while leaving
/// enough parts to balance over 64 cores.
pub(crate) const MAX_PARTS: usize = 64;

/// How many parts `work` units split into when each part should get at least
/// `min_per_part` units: 1 for small jobs, at most [`MAX_PARTS`]. Depends on
/// the work only, so results split this way do not depend on the thread count.
pub(crate) fn part_count(work: usize, min_per_part: usize) -> usize {
    (work / min_per_part.max(1)).clamp(1, MAX_PARTS)
}

/// Items per group when `items` items hold `work` units in total: groups of
/// at least [`MIN_PART_WORK`] units, at most [`MAX_PARTS`] groups. Depends on
/// the sizes only (see [`part_count`]).
pub(crate) fn group_len(items: usize, work: usize) -> usize {
    let per_item = (work / items.max(1)).max(1);
    MIN_PART_WORK
        .div_ceil(per_item)
        .max(items.div_ceil(MAX_PARTS))
        .max(1)
}

/// Splits `0..n` into `parts` contiguous, nearly equal ranges (fewer when
/// `n < parts`; one empty range when `n = 0`).
pub(crate) fn split_ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    let base = n / parts;
    let extra = n % parts;
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

/// Runs `f` on every part, returning results in part order: on the calling
/// thread for a single part, otherwise as one rayon task per part on the
/// current pool. Parts are meant to be large (see [`part_count`]). A panic in
/// `f` (a bug, never an input error) propagates to the caller.
pub(crate) fn map_parts<T, R, F>(parts: Vec<T>, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync + Send,
{
    if parts.len() <= 1 {
        return parts.into_iter().map(f).collect();
    }
    parts.into_par_iter().with_max_len(1).map(f).collect()
}

/// Maps `f` over `items` in order, each item costing about `work_per_item`
/// units: on the calling thread when the whole job is below
/// [`MIN_PART_WORK`], otherwise on the current pool (one item per task at
/// most, so uneven items balance).
pub(crate) fn map_items<T, R, F>(items: &[T], work_per_item: usize, f: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync + Send,
{
    if items.len() <= 1 || items.len().saturating_mul(work_per_item) < MIN_PART_WORK {
        return items.iter().map(f).collect();
    }
    items.par_iter().with_max_len(1).map(f).collect()
}

/// Folds `items` in groups of `group_len` consecutive items (the last may be
/// shorter), each group into a fresh state from `init`, and returns the
/// states in group order.
///
/// Group boundaries depend on `items.len()` and `group_len` only, so a caller
/// that reduces the states in order gets the same result on any number of
/// threads. `scratch` makes scratch space (conversion and sort buffers) once
/// per task, reused across the groups that task claims; it must not carry
/// results. A single group runs on the calling thread.
///
/// The groups are claimed *in order* by one rayon task per pool thread, not
/// split recursively: the threads then stream neighbouring memory, which
/// measured FedAvg 0.73× and Krum 0.93× the time of rayon's split into
/// far-apart halves (BENCHMARKS.md, issue 10).
pub(crate) fn fold_groups<I, W, S, Scratch, Init, Work>(
    items: Vec<I>,
    group_len: usize,
    scratch: Scratch,
    init: Init,
    work: Work,
) -> Vec<S>
where
    I: Send,
    S: Send,
    Scratch: Fn() -> W + Sync + Send,
    Init: Fn() -> S + Sync + Send,
    Work: Fn(&mut W, &mut S, I) + Sync + Send,
{
    let group_len = group_len.max(1);
    let run = |w: &mut W, group: Vec<I>| {
        let mut state = init();
        for item in group {
            work(w, &mut state, item);
        }
        state
    };
    if items.len() <= group_len {
        let mut w = scratch();
        return vec![run(&mut w, items)];
    }
    // One task per pool thread claims groups in order from a shared counter,
    // so the threads work on neighbouring groups (neighbouring memory), as
    // the old per-call queue did, rather than on far-apart halves of the list
    // as rayon's recursive splitting would. Each group index is claimed by
    // exactly one `fetch_add`, so every group runs once; states are put back
    // in group order.
    let mut groups: Vec<Mutex<Option<Vec<I>>>> = Vec::new();
    let mut rest = items.into_iter();
    loop {
        let group: Vec<I> = rest.by_ref().take(group_len).collect();
        if group.is_empty() {
            break;
        }
        groups.push(Mutex::new(Some(group)));
    }
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<(usize, S)>> = Mutex::new(Vec::with_capacity(groups.len()));
    let worker = || {
        let mut w = scratch();
        let mut mine = Vec::new();
        loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = groups.get(k) else {
                break;
            };
            // Claimed once (above), so the group is still there.
            if let Some(group) = lock(slot).take() {
                mine.push((k, run(&mut w, group)));
            }
        }
        lock(&done).append(&mut mine);
    };
    let tasks = rayon::current_num_threads().clamp(1, groups.len());
    rayon::scope(|scope| {
        for _ in 1..tasks {
            scope.spawn(|_| worker());
        }
        worker();
    });
    let mut done = done.into_inner().unwrap_or_else(PoisonError::into_inner);
    done.sort_unstable_by_key(|&(k, _)| k);
    done.into_iter().map(|(_, state)| state).collect()
}

/// Locks a mutex, looking through poisoning: a panic in a worker propagates
/// through `rayon::scope` anyway, and the data is only moved, never left
/// half-written.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_ranges_cover_everything_once() {
        assert_eq!(split_ranges(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(split_ranges(2, 8).len(), 2);
        assert_eq!(split_ranges(0, 4), vec![0..0]);
    }

    #[test]
    fn splits_depend_on_sizes_only() {
        assert_eq!(part_count(10, 100), 1);
        assert_eq!(part_count(1 << 40, 1), MAX_PARTS);
        assert!(group_len(3, 30) >= 3, "tiny work is one group");
        assert_eq!(
            group_len(1000, 1000 * MIN_PART_WORK),
            16,
            "at most 64 groups"
        );
        assert_eq!(group_len(1000, 1000 * (MIN_PART_WORK / 4)), 16);
        assert_eq!(group_len(1000, 1000 * (MIN_PART_WORK / 64)), 64);
    }

    #[test]
    fn fold_groups_returns_states_in_group_order_on_any_pool() {
        let items: Vec<usize> = (0..1000).collect();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let sums = pool.install(|| {
                fold_groups(
                    items.clone(),
                    100,
                    Vec::<u8>::new,
                    || 0usize,
                    |_, s, i| {
                        *s += i;
                    },
                )
            });
            let expected: Vec<usize> = (0..10).map(|g| (g * 100..g * 100 + 100).sum()).collect();
            assert_eq!(sums, expected);
            let mapped = pool.install(|| map_parts(vec![1, 2, 3], |x| x * 2));
            assert_eq!(mapped, vec![2, 4, 6]);
        }
    }
}
