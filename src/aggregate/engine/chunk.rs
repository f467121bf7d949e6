//! Cutting a round's flat vector into chunks and reading one chunk's rows.

use crate::aggregate::ClientId;
use crate::aggregate::updates::{Seg, ValidUpdates};
use crate::error::{Error, Result};

use super::CHUNK;

/// One chunk of the flat vector: `len` coordinates of segment `seg` from `start`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub seg: usize,
    pub start: usize,
    pub len: usize,
}

/// What a kernel sees for one chunk.
///
/// Invariant: every row has `global.len()` values ([`chunk_at`] checks it
/// when it builds the chunk, so kernels may zip rows with `global`).
pub(crate) struct ChunkRef<'a> {
    /// One slice per selected client, each `len` long.
    pub rows: Vec<&'a [f32]>,
    /// The global adapter's values for the chunk.
    pub global: &'a [f32],
}

impl<'a> ChunkRef<'a> {
    /// Number of coordinates.
    pub fn len(&self) -> usize {
        self.global.len()
    }
}

/// A failed read from a client's source, naming the client.
pub(crate) fn client_read_error(client: &ClientId, source: Error) -> Error {
    Error::for_client(client.clone(), source)
}

/// The chunks of a round's flat vector.
pub(crate) fn spans(round: &ValidUpdates<'_>) -> Vec<Span> {
    let mut out = Vec::with_capacity(round.dim / CHUNK + round.global.len());
    for (seg, values) in round.global.iter().enumerate() {
        let mut start = 0;
        while start < values.len() {
            let len = CHUNK.min(values.len() - start);
            out.push(Span { seg, start, len });
            start += len;
        }
    }
    out
}

/// The selected clients' values (and the global's) for one chunk: borrowed
/// from `f32` sources, converted into `scratch` for the others.
pub(crate) fn chunk_at<'s>(
    round: &'s ValidUpdates<'_>,
    members: &[usize],
    span: Span,
    scratch: &'s mut Vec<f32>,
) -> Result<ChunkRef<'s>> {
    let range = span.start..span.start.saturating_add(span.len);
    let reads = members
        .iter()
        .filter_map(|&i| round.clients.get(i))
        .filter(|c| matches!(c.segments.get(span.seg), Some(Seg::Read(_))))
        .count();
    let need = reads.checked_mul(span.len).ok_or_else(|| {
        Error::invariant(
            "aggregate::engine::chunk_at",
            "the scratch rows of one chunk fit in memory (clients × chunk length)",
            format!("{reads} rows of {}", span.len),
        )
    })?;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let global = round
        .global
        .get(span.seg)
        .and_then(|s| s.get(range.clone()))
        .ok_or_else(|| span_outside(round, span))?;
    let key = segment_key(round, span.seg)?;
    let mut free: &'s mut [f32] = scratch.as_mut_slice();
    let mut rows: Vec<&'s [f32]> = Vec::with_capacity(members.len());
    for &i in members {
        let client = round.clients.get(i).ok_or_else(|| {
            Error::invariant(
                "aggregate::engine::chunk_at",
                "members are positions of usable clients of the round",
                format!("member {i} of {} clients", round.clients.len()),
            )
        })?;
        match client.segments.get(span.seg) {
            Some(Seg::Slice(values)) => rows.push(
                values
                    .get(range.clone())
                    .ok_or_else(|| span_outside(round, span))?,
            ),
            Some(Seg::Read(source)) => {
                let available = free.len();
                let Some((head, tail)) = std::mem::take(&mut free).split_at_mut_checked(span.len)
                else {
                    return Err(Error::invariant(
                        "aggregate::engine::chunk_at",
                        "the scratch holds one row of the chunk per converted client",
                        format!("{available} values left for a row of {}", span.len),
                    ));
                };
                source
                    .read_range(key, span.start, head)
                    .map_err(|e| client_read_error(&client.id, e))?;
                let head: &'s [f32] = head;
                rows.push(head);
                free = tail;
            }
            None => {
                return Err(Error::invariant(
                    "aggregate::engine::chunk_at",
                    "every usable client has one tensor per segment of the round",
                    format!(
                        "client `{}` has {} segments, segment {} asked",
                        client.id,
                        client.segments.len(),
                        span.seg
                    ),
                ));
            }
        }
    }
    Ok(ChunkRef { rows, global })
}

/// The canonical key of segment `seg` ([`Error::Invariant`] when the round
/// has no such segment: keys and segments are built together).
pub(crate) fn segment_key<'r>(round: &ValidUpdates<'r>, seg: usize) -> Result<&'r str> {
    round.keys.get(seg).copied().ok_or_else(|| {
        Error::invariant(
            "aggregate::engine",
            "the round has one key per segment",
            format!("segment {seg} of {} keys", round.keys.len()),
        )
    })
}

/// A chunk that does not lie inside its segment: spans are cut from the
/// global tensors and every client slice was checked to have their length.
pub(super) fn span_outside(round: &ValidUpdates<'_>, span: Span) -> Error {
    Error::invariant(
        "aggregate::engine::chunk_at",
        "a span lies inside its segment, in the global and in every client slice",
        format!(
            "span {}..+{} of segment {} ({} values in the global)",
            span.start,
            span.len,
            span.seg,
            round.global.get(span.seg).map_or(0, |g| g.len())
        ),
    )
}
