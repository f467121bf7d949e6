//! Minimal fork–join over the machine's cores with `std::thread::scope`.
//!
//! The crate's parallel work is a handful of large, evenly sized parts, so a
//! thread pool dependency would buy nothing: one scoped thread per extra part,
//! the first part on the calling thread.

use std::num::NonZeroUsize;
use std::thread;

/// How many workers to use for `work` units when each should get at least
/// `min_per_worker` units: 1 for small jobs, at most the available cores.
pub(crate) fn worker_count(work: usize, min_per_worker: usize) -> usize {
    let cores = thread::available_parallelism().map_or(1, NonZeroUsize::get);
    (work / min_per_worker.max(1)).clamp(1, cores)
}

/// Runs `f` on every part, the first on this thread and the others on scoped
/// threads, returning results in part order. A panic in a worker (a bug, never
/// an input error) is propagated to the caller.
pub(crate) fn map_parts<T, R, F>(parts: Vec<T>, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
{
    let mut parts = parts.into_iter();
    let Some(first) = parts.next() else {
        return Vec::new();
    };
    let f = &f;
    thread::scope(|scope| {
        let handles: Vec<_> = parts.map(|part| scope.spawn(move || f(part))).collect();
        let mut results = Vec::with_capacity(handles.len() + 1);
        results.push(f(first));
        for handle in handles {
            match handle.join() {
                Ok(r) => results.push(r),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        results
    })
}
