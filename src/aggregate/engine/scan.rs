//! The non-finite scan: each client's first NaN or infinity.

use crate::aggregate::updates::{Seg, ValidUpdates};
use crate::error::Result;
use crate::lora::tensor::first_non_finite;

use super::CHUNK;
use super::chunk::{Span, client_read_error, segment_key, span_outside};
use super::drive::{drive_chunks, finish};

/// Coordinates per work item of the non-finite scan.
const SCAN_CHUNK: usize = CHUNK * 16;

/// For each of `members`, the first non-finite value as `(tensor, index, value)`.
pub(crate) fn first_non_finite_per_client(
    round: &ValidUpdates<'_>,
    members: &[usize],
) -> Result<Vec<Option<(String, usize, f32)>>> {
    type Found = Vec<Option<(usize, usize, f32)>>;
    let mut items = Vec::new();
    for (k, &i) in members.iter().enumerate() {
        let Some(client) = round.clients.get(i) else {
            continue;
        };
        for (seg, global) in round.global.iter().enumerate() {
            let mut start = 0;
            while start < global.len() {
                let len = SCAN_CHUNK.min(global.len() - start);
                items.push((k, client, seg, start, len));
                start += len;
            }
        }
    }
    let workers = drive_chunks(
        round,
        members,
        items,
        || (),
        || vec![None; members.len()],
        |scratch, _, found: &mut Found, (k, client, seg, start, len)| {
            let span = Span { seg, start, len };
            let values: &[f32] = match client.segments.get(seg) {
                Some(Seg::Slice(values)) => values
                    .get(start..start + len)
                    .ok_or_else(|| span_outside(round, span))?,
                Some(Seg::Read(source)) => {
                    scratch.resize(len, 0.0);
                    source
                        .read_range(segment_key(round, seg)?, start, scratch)
                        .map_err(|e| client_read_error(&client.id, e))?;
                    scratch
                }
                None => return Err(span_outside(round, span)),
            };
            if let Some((i, v)) = first_non_finite(values)
                && let Some(slot) = found.get_mut(k)
                && slot.is_none_or(|(s, idx, _)| (seg, start + i) < (s, idx))
            {
                *slot = Some((seg, start + i, v));
            }
            Ok(())
        },
    );
    let states = finish(workers)?;
    (0..members.len())
        .map(|k| {
            states
                .iter()
                .filter_map(|s| s.get(k).copied().flatten())
                .min_by_key(|&(seg, idx, _)| (seg, idx))
                .map(|(seg, idx, v)| Ok((segment_key(round, seg)?.to_owned(), idx, v)))
                .transpose()
        })
        .collect()
}
