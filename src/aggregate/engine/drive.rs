//! Running kernels over a round's chunks on the current rayon pool, in
//! groups whose boundaries depend on the round's size only.

use crate::aggregate::updates::ValidUpdates;
use crate::error::{Error, Result};
use crate::parallel;

use super::chunk::{ChunkRef, Span, chunk_at, spans};
use super::{CHUNK, all_finite};

/// Runs `work` over `items` (engine chunks of at most [`CHUNK`] coordinates)
/// on the current rayon pool; each group of consecutive items folds into its
/// own state made by `init`. Returns the states in group order: group
/// boundaries depend on the number of items only, so reducing the states in
/// order gives the same result on any number of threads.
pub(crate) fn drive<I, S, Init, Work>(items: Vec<I>, init: Init, work: Work) -> Vec<S>
where
    I: Send,
    S: Send,
    Init: Fn() -> S + Sync + Send,
    Work: Fn(&mut S, I) + Sync + Send,
{
    let group = parallel::group_len(items.len(), items.len().saturating_mul(CHUNK));
    parallel::fold_groups(
        items,
        group,
        || (),
        init,
        |_, state, item| work(state, item),
    )
}

/// A group's state for kernels that read chunks: the kernel's own state and
/// the first read error.
pub(super) struct Worker<S> {
    state: S,
    failed: Option<Error>,
}

impl<S> Worker<S> {
    fn new(state: S) -> Self {
        Worker {
            state,
            failed: None,
        }
    }
}

/// Runs `work` over chunk items of a round whose kernels read `members`
/// clients: groups sized by the work (`coordinates × clients`), one
/// [`Worker`] per group. Scratch space — the buffer for converted rows and
/// the kernel's own (`scratch`) — is made once per rayon task and reused
/// across the groups it runs: a fresh buffer per group would be a
/// page-faulting allocation each time (measured 10–30 % on the median and
/// the Gram rules).
pub(super) fn drive_chunks<I, W, S, Scratch, Init, Work>(
    round: &ValidUpdates<'_>,
    members: &[usize],
    items: Vec<I>,
    scratch: Scratch,
    init: Init,
    work: Work,
) -> Vec<Worker<S>>
where
    I: Send,
    S: Send,
    Scratch: Fn() -> W + Sync + Send,
    Init: Fn() -> S + Sync + Send,
    Work: Fn(&mut Vec<f32>, &mut W, &mut S, I) -> Result<()> + Sync + Send,
{
    let values = round.dim.saturating_mul(members.len().max(1));
    let group = parallel::group_len(items.len(), values);
    parallel::fold_groups(
        items,
        group,
        || (Vec::new(), scratch()),
        || Worker::new(init()),
        |(rows, own): &mut (Vec<f32>, W), w: &mut Worker<S>, item| {
            if w.failed.is_some() {
                return;
            }
            if let Err(e) = work(rows, own, &mut w.state, item) {
                w.failed = Some(e);
            }
        },
    )
}

/// The kernel states, or the first read error (in group order, so the same
/// error on any number of threads).
pub(super) fn finish<S>(workers: Vec<Worker<S>>) -> Result<Vec<S>> {
    let mut out = Vec::with_capacity(workers.len());
    for worker in workers {
        if let Some(error) = worker.failed {
            return Err(error);
        }
        out.push(worker.state);
    }
    Ok(out)
}

/// Folds a kernel over every chunk of the selected clients: one state per
/// group of chunks (from `init`, returned in group order), and scratch space
/// per rayon task (from `scratch`; it must not carry results). Fails only
/// when a client's source fails to read.
pub(crate) fn fold<W, S, Scratch, Init, Kernel>(
    round: &ValidUpdates<'_>,
    members: &[usize],
    scratch: Scratch,
    init: Init,
    kernel: Kernel,
) -> Result<Vec<S>>
where
    S: Send,
    Scratch: Fn() -> W + Sync + Send,
    Init: Fn() -> S + Sync + Send,
    Kernel: Fn(&mut W, &mut S, &ChunkRef<'_>) + Sync + Send,
{
    let workers = drive_chunks(
        round,
        members,
        spans(round),
        scratch,
        init,
        |rows, own, state, span| {
            let chunk = chunk_at(round, members, span, rows)?;
            kernel(own, state, &chunk);
            Ok(())
        },
    );
    finish(workers)
}

/// The output of [`map`]: one vector per segment (tensor), and whether every
/// value is finite (checked per chunk while it is still in cache).
pub(crate) struct Mapped {
    pub segments: Vec<Vec<f32>>,
    pub finite: bool,
}

/// Maps a kernel over every chunk, writing one output value per coordinate.
/// `init` makes scratch space, once per rayon task (it must not carry results).
pub(crate) fn map<S, Init, Kernel>(
    round: &ValidUpdates<'_>,
    members: &[usize],
    init: Init,
    kernel: Kernel,
) -> Result<Mapped>
where
    S: Send,
    Init: Fn() -> S + Sync + Send,
    Kernel: Fn(&mut S, &ChunkRef<'_>, &mut [f32]) + Sync + Send,
{
    map_in_chunks(round, members, CHUNK, init, kernel)
}

/// [`map`] with an explicit chunk length.
pub(super) fn map_in_chunks<S, Init, Kernel>(
    round: &ValidUpdates<'_>,
    members: &[usize],
    chunk_len: usize,
    init: Init,
    kernel: Kernel,
) -> Result<Mapped>
where
    S: Send,
    Init: Fn() -> S + Sync + Send,
    Kernel: Fn(&mut S, &ChunkRef<'_>, &mut [f32]) + Sync + Send,
{
    // Zeroing reused heap memory is a full write of the output: spread it
    // over the pool rather than doing it on the calling thread.
    let per_segment = round.dim / round.global.len().max(1);
    let mut outputs: Vec<Vec<f32>> =
        crate::parallel::map_items(&round.global, per_segment, |g| vec![0.0; g.len()]);
    let mut items = Vec::with_capacity(round.dim / CHUNK + outputs.len());
    for (seg, out) in outputs.iter_mut().enumerate() {
        let mut start = 0;
        for piece in out.chunks_mut(chunk_len.max(1)) {
            let len = piece.len();
            items.push((Span { seg, start, len }, piece));
            start += len;
        }
    }
    let values = round.dim.saturating_mul(members.len().max(1));
    let group = parallel::group_len(items.len(), values);
    // The kernel's state is scratch (sort buffers, f64 rows): made once per
    // rayon task and reused across the groups it runs, never once per group,
    // since a fresh m × CHUNK buffer per group is a page-faulting allocation
    // each time (measured: the median ran 30 % slower that way).
    let groups = parallel::fold_groups(
        items,
        group,
        || (Vec::new(), init()),
        || Worker::new(true),
        |(scratch, state): &mut (Vec<f32>, S),
         w: &mut Worker<bool>,
         (span, out): (Span, &mut [f32])| {
            if w.failed.is_some() {
                return;
            }
            match chunk_at(round, members, span, scratch) {
                Ok(chunk) => {
                    kernel(state, &chunk, out);
                    w.state &= all_finite(out);
                }
                Err(e) => w.failed = Some(e),
            }
        },
    );
    let finite = finish(groups)?.into_iter().all(|finite| finite);
    Ok(Mapped {
        segments: outputs,
        finite,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn drive_groups_depend_on_the_item_count_only() {
        for items in [3usize, 100, 1000, 5000] {
            let groups = |threads| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| drive((0..items).collect(), Vec::new, |seen, i| seen.push(i)))
            };
            let one = groups(1);
            assert_eq!(one, groups(3), "{items} items");
            assert_eq!(one.concat(), (0..items).collect::<Vec<_>>());
            assert!(one.len() <= crate::parallel::MAX_PARTS);
        }
    }
}
