//! Probe features: a ΔLoRA flattened into one fixed-layout vector.
//!
//! A [`FeatureConfig`] says *which* tensors to use ([`Selection`]) and how to
//! scale the result ([`Normalization`]). Fitting it on training deltas gives a
//! [`FeatureSpec`] that freezes the layout (sorted keys, each key's shape and
//! offset), so every later delta maps to exactly the same coordinates the
//! probe was trained on:
//!
//! * a layout key missing from a delta is zero-filled and listed in
//!   [`TransformReport::zero_filled`];
//! * a key the selection would pick but the layout lacks is left out and
//!   listed in [`TransformReport::ignored`];
//! * a key whose shape changed is an [`Error::ShapeMismatch`];
//! * a NaN or infinity is an [`Error::NonFinite`] (there is no policy that
//!   turns them into numbers: a probe fed a sanitised vector would score
//!   something other than what the client sent).
//!
//! ```
//! use safe_fedllm::features::{FeatureConfig, Selection};
//! use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
//!
//! let mut delta = LoraAdapter::new();
//! for (layer, value) in [(0, 3.0), (1, 7.0)] {
//!     let b = format!("base_model.model.model.layers.{layer}.self_attn.q_proj.lora_B.weight");
//!     let a = format!("base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight");
//!     delta.insert(&b, LoraTensor::new("b", [2, 1], vec![value, 4.0])?)?;
//!     delta.insert(&a, LoraTensor::new("a", [1, 2], vec![1.0, 1.0])?)?;
//! }
//! let delta = LoraDelta::from_adapter(delta);
//!
//! // Default: lora_B of the lowest layer, L2-normalised.
//! let spec = FeatureConfig::new(Selection::FirstLayerB).fit(&[&delta])?;
//! assert_eq!(spec.dim(), 2);
//! let features = spec.transform(&delta)?;
//! assert_eq!(features.values, [0.6, 0.8]); // (3, 4) / 5
//! # Ok::<(), safe_fedllm::Error>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lora::tensor::first_non_finite;
use crate::lora::{Factor, LoraKey, TensorSource};
use crate::parallel::{map_parts, part_count};

/// Which LoRA tensors enter the feature vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Selection {
    /// The `lora_B` tensors of the lowest-numbered layer present (all target
    /// modules of that layer). The Safe-FedLLM reference default (`first_B`):
    /// small (40,960 values for Llama-3.1-8B q/v r = 8) and, since `B` starts
    /// at zero, a direct record of what local training wrote. Every other
    /// tensor (lora_A, later layers) is then a channel the probe does not
    /// score; admission's default pull bound limits what a client gains
    /// through it, and [`Selection::AllLayers`] (sketched when large) closes it.
    FirstLayerB,
    /// Every `lora_A` and `lora_B` tensor.
    AllLayers,
    /// Exactly these keys (any accepted PEFT spelling; stored canonically).
    Keys(Vec<String>),
    /// Keys whose canonical name matches a glob where `*` matches any run of
    /// characters, e.g. `*.layers.3.*.lora_B.weight`.
    Glob(String),
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selection::FirstLayerB => f.write_str("first_layer_b"),
            Selection::AllLayers => f.write_str("all_layers"),
            Selection::Keys(keys) => write!(f, "keys({})", keys.join(", ")),
            Selection::Glob(pattern) => write!(f, "glob({pattern})"),
        }
    }
}

/// How the concatenated vector is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Normalization {
    /// Divide by the Euclidean norm, computed in `f64` so that a delta at any
    /// scale (1e-30 as 1e30) keeps its direction; a zero vector stays zero. The reference
    /// default: it makes the probe see the *direction* of an update, not its
    /// size, which depends on learning rate and step count.
    #[default]
    L2,
    /// Leave values as they are.
    None,
}

/// Unfitted feature settings. Defaults: [`Selection::FirstLayerB`], [`Normalization::L2`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureConfig {
    selection: Selection,
    normalization: Normalization,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        FeatureConfig::new(Selection::FirstLayerB)
    }
}

impl FeatureConfig {
    /// Settings with the given selection and L2 normalisation.
    pub fn new(selection: Selection) -> Self {
        FeatureConfig {
            selection,
            normalization: Normalization::L2,
        }
    }

    /// Sets the normalisation.
    pub fn normalization(mut self, normalization: Normalization) -> Self {
        self.normalization = normalization;
        self
    }

    /// Freezes the layout from training deltas: the selected keys (union over
    /// the deltas, sorted) with their shapes.
    ///
    /// Errors: [`Error::Empty`] for no deltas, [`Error::EmptySelection`] when
    /// nothing is selected, [`Error::ShapeMismatch`] when deltas disagree on a
    /// key's shape, [`Error::MissingKey`] for a [`Selection::Keys`] entry no
    /// delta has.
    pub fn fit<D: TensorSource>(&self, deltas: &[D]) -> Result<FeatureSpec> {
        if deltas.is_empty() {
            return Err(Error::Empty {
                what: "training deltas",
            });
        }
        let selection = canonical_selection(&self.selection);
        let layer = match selection {
            Selection::FirstLayerB => lowest_b_layer(deltas),
            _ => None,
        };
        let rule = Rule {
            selection: &selection,
            layer,
        };
        let shapes = selected_shapes(deltas, &rule)?;
        if let Selection::Keys(keys) = &selection
            && let Some(absent) = keys.iter().find(|k| !shapes.contains_key(k.as_str()))
        {
            return Err(Error::MissingKey {
                tensor: absent.clone(),
                present_in: "the feature selection",
                missing_from: "the training deltas",
            });
        }
        if shapes.is_empty() {
            return Err(Error::EmptySelection {
                selection: selection.to_string(),
            });
        }
        let mut offset = 0;
        let layout = shapes
            .into_iter()
            .map(|(key, shape)| {
                let block = FeatureBlock { key, shape, offset };
                offset += block.len();
                block
            })
            .collect();
        Ok(FeatureSpec {
            selection,
            normalization: self.normalization,
            layer,
            layout,
            dim: offset,
        })
    }
}

/// One tensor's place in the feature vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureBlock {
    /// Canonical key.
    pub key: String,
    /// `[rows, cols]` frozen at fit time.
    pub shape: [usize; 2],
    /// Start offset in the feature vector.
    pub offset: usize,
}

impl FeatureBlock {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// True for a block with no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a transform had to do to fit a delta into the frozen layout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransformReport {
    /// Layout keys the delta lacked; their coordinates are zero.
    pub zero_filled: Vec<String>,
    /// Keys the selection would pick that are not in the layout; not used.
    pub ignored: Vec<String>,
}

impl TransformReport {
    /// True when the delta matched the layout exactly.
    pub fn is_exact(&self) -> bool {
        self.zero_filled.is_empty() && self.ignored.is_empty()
    }
}

/// One feature vector and what it took to build it.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// The values, `spec.dim()` long.
    pub values: Vec<f32>,
    /// Zero-filled and ignored keys.
    pub report: TransformReport,
}

/// Largest feature dimension a deserialised spec may declare (2²⁸ values,
/// 1 GiB of `f32` per vector): far above any LoRA probe layout, far below
/// what would abort the process on allocation.
pub const MAX_FEATURE_DIM: usize = 1 << 28;

/// A frozen feature layout: the result of [`FeatureConfig::fit`].
///
/// Serialisable, so a trained probe can carry it. Deserialisation re-checks
/// the layout (blocks contiguous from 0, element counts without overflow,
/// `dim` their sum and at most [`MAX_FEATURE_DIM`]): a spec read from a file
/// is outside data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FeatureSpecRepr")]
pub struct FeatureSpec {
    selection: Selection,
    normalization: Normalization,
    /// For [`Selection::FirstLayerB`]: the layer chosen at fit time.
    layer: Option<usize>,
    layout: Vec<FeatureBlock>,
    dim: usize,
}

/// The unchecked serde form of [`FeatureSpec`].
#[derive(Deserialize)]
struct FeatureSpecRepr {
    selection: Selection,
    normalization: Normalization,
    layer: Option<usize>,
    layout: Vec<FeatureBlock>,
    dim: usize,
}

impl TryFrom<FeatureSpecRepr> for FeatureSpec {
    type Error = Error;

    fn try_from(repr: FeatureSpecRepr) -> Result<Self> {
        let invalid = |why: String| Error::InvalidMetadata {
            field: "feature spec".into(),
            value: format!("dim {}", repr.dim),
            reason: why,
        };
        let mut offset = 0usize;
        for block in &repr.layout {
            let [rows, cols] = block.shape;
            let len = rows
                .checked_mul(cols)
                .ok_or_else(|| invalid(format!("block `{}` {rows}×{cols} overflows", block.key)))?;
            if block.offset != offset {
                return Err(invalid(format!(
                    "block `{}` starts at {}, expected {offset}",
                    block.key, block.offset
                )));
            }
            offset = offset
                .checked_add(len)
                .filter(|&o| o <= MAX_FEATURE_DIM)
                .ok_or_else(|| invalid(format!("layout exceeds {MAX_FEATURE_DIM} values")))?;
        }
        if offset != repr.dim {
            return Err(invalid(format!("blocks hold {offset} values")));
        }
        Ok(FeatureSpec {
            selection: repr.selection,
            normalization: repr.normalization,
            layer: repr.layer,
            layout: repr.layout,
            dim: repr.dim,
        })
    }
}

impl FeatureSpec {
    /// Length of every feature vector.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The frozen blocks, in key order.
    pub fn layout(&self) -> &[FeatureBlock] {
        &self.layout
    }

    /// The selection this spec was fitted with.
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// The normalisation applied.
    pub fn normalization(&self) -> Normalization {
        self.normalization
    }

    /// For [`Selection::FirstLayerB`], the layer frozen at fit time.
    pub fn layer(&self) -> Option<usize> {
        self.layer
    }

    /// Builds one feature vector.
    pub fn transform(&self, delta: &(impl TensorSource + ?Sized)) -> Result<Features> {
        let mut values = vec![0.0f32; self.dim];
        let report = self.transform_into(delta, &mut values)?;
        Ok(Features { values, report })
    }

    /// Builds one feature vector into `out` (length [`FeatureSpec::dim`]).
    pub fn transform_into(
        &self,
        delta: &(impl TensorSource + ?Sized),
        out: &mut [f32],
    ) -> Result<TransformReport> {
        if out.len() != self.dim {
            return Err(Error::DimensionMismatch {
                what: "feature output buffer".into(),
                expected: self.dim,
                found: out.len(),
            });
        }
        let parts = split_for_workers(&self.layout, out);
        let results = map_parts(parts, |(blocks, part)| fill_blocks(delta, blocks, part));
        let mut report = TransformReport::default();
        let mut sum_squares = 0.0f64;
        for result in results {
            let (part_sum, zero_filled) = result?;
            sum_squares += part_sum;
            report.zero_filled.extend(zero_filled);
        }
        report.ignored = self.ignored_keys(delta);
        if self.normalization == Normalization::L2 {
            divide_by_norm(out, sum_squares.sqrt());
        }
        Ok(report)
    }

    /// Builds a `[deltas.len(), dim]` matrix, one row per delta, with one
    /// report per row.
    pub fn transform_batch<D: TensorSource>(
        &self,
        deltas: &[D],
    ) -> Result<(Array2<f32>, Vec<TransformReport>)> {
        let mut matrix = Array2::<f32>::zeros((deltas.len(), self.dim));
        let mut reports = Vec::with_capacity(deltas.len());
        for (mut row, delta) in matrix.rows_mut().into_iter().zip(deltas) {
            let report = match row.as_slice_mut() {
                Some(slice) => self.transform_into(delta, slice)?,
                None => {
                    let features = self.transform(delta)?;
                    row.iter_mut()
                        .zip(features.values)
                        .for_each(|(r, v)| *r = v);
                    features.report
                }
            };
            reports.push(report);
        }
        Ok((matrix, reports))
    }

    fn ignored_keys(&self, delta: &(impl TensorSource + ?Sized)) -> Vec<String> {
        let rule = Rule {
            selection: &self.selection,
            layer: self.layer,
        };
        delta
            .lora_keys()
            .filter(|k| rule.selects(k))
            .filter(|k| {
                self.layout
                    .binary_search_by(|b| b.key.as_str().cmp(k.canonical()))
                    .is_err()
            })
            .map(|k| k.canonical().to_owned())
            .collect()
    }
}

/// Below this many values per part a transform stays on one thread: a
/// pool task would cost more than it saves.
const VALUES_PER_WORKER: usize = 1 << 19;

/// Splits the layout (and the matching output) into contiguous groups of
/// roughly equal size, one per rayon task. The split depends on the layout
/// only, so the L2 norm (summed per part, then in part order) is the same on
/// any number of threads.
fn split_for_workers<'a, 'o>(
    layout: &'a [FeatureBlock],
    out: &'o mut [f32],
) -> Vec<(&'a [FeatureBlock], &'o mut [f32])> {
    let workers = part_count(out.len(), VALUES_PER_WORKER);
    let target = out.len().div_ceil(workers);
    let mut parts = Vec::with_capacity(workers);
    let (mut blocks, mut rest) = (layout, out);
    while !blocks.is_empty() {
        let mut count = 0;
        let mut values = 0;
        for block in blocks {
            values += block.len();
            count += 1;
            if values >= target {
                break;
            }
        }
        let (group, remaining_blocks) = blocks.split_at(count);
        let at = values.min(rest.len());
        let (part, remaining_out) = std::mem::take(&mut rest).split_at_mut(at);
        parts.push((group, part));
        blocks = remaining_blocks;
        rest = remaining_out;
    }
    parts
}

/// Copies each block into its part of the output. Returns the part's sum of
/// squares and the blocks the delta lacked (zero-filled).
fn fill_blocks(
    delta: &(impl TensorSource + ?Sized),
    blocks: &[FeatureBlock],
    part: &mut [f32],
) -> Result<(f64, Vec<String>)> {
    let start = blocks.first().map_or(0, |b| b.offset);
    let end = start + part.len();
    let mut sum_squares = 0.0;
    let mut zero_filled = Vec::new();
    for block in blocks {
        let from = block.offset.saturating_sub(start);
        let slot = part.get_mut(from..from + block.len()).ok_or_else(|| {
            Error::invariant(
                "features::transform",
                "a validated layout's blocks lie inside the feature vector",
                format!(
                    "block `{}` at {}..{} of a part ending at {end}",
                    block.key,
                    block.offset,
                    block.offset + block.len()
                ),
            )
        })?;
        match delta.shape_of(&block.key) {
            None => {
                slot.fill(0.0);
                zero_filled.push(block.key.clone());
            }
            Some(found) if found != block.shape => {
                return Err(Error::ShapeMismatch {
                    tensor: block.key.clone(),
                    expected: block.shape.to_vec(),
                    found: found.to_vec(),
                });
            }
            Some(_) => {
                delta.copy_into(&block.key, slot)?;
                sum_squares +=
                    checked_sum_squares(slot).map_err(|(index, value)| Error::NonFinite {
                        tensor: block.key.clone(),
                        index,
                        value,
                    })?;
            }
        }
    }
    Ok((sum_squares, zero_filled))
}

/// Multiplies every value by `factor`, split over rayon tasks.
fn scale(values: &mut [f32], factor: f32) {
    let workers = part_count(values.len(), VALUES_PER_WORKER);
    let parts: Vec<&mut [f32]> = values
        .chunks_mut(values.len().div_ceil(workers).max(1))
        .collect();
    map_parts(parts, |part| part.iter_mut().for_each(|v| *v *= factor));
}

/// A selection with its fit-time layer resolved.
struct Rule<'a> {
    selection: &'a Selection,
    layer: Option<usize>,
}

impl Rule<'_> {
    fn selects(&self, key: &LoraKey) -> bool {
        match self.selection {
            Selection::FirstLayerB => {
                key.factor() == Factor::B && key.layer().is_some() && key.layer() == self.layer
            }
            Selection::AllLayers => true,
            Selection::Keys(keys) => keys.iter().any(|k| k == key.canonical()),
            Selection::Glob(pattern) => glob_match(pattern, key.canonical()),
        }
    }
}

fn canonical_selection(selection: &Selection) -> Selection {
    match selection {
        Selection::Keys(keys) => {
            let mut canonical: Vec<String> = keys
                .iter()
                .map(|k| LoraKey::parse(k).map_or_else(|| k.clone(), |p| p.canonical().to_owned()))
                .collect();
            canonical.sort();
            canonical.dedup();
            Selection::Keys(canonical)
        }
        other => other.clone(),
    }
}

fn lowest_b_layer<D: TensorSource>(deltas: &[D]) -> Option<usize> {
    deltas
        .iter()
        .flat_map(|d| {
            d.lora_keys()
                .filter(|k| k.factor() == Factor::B)
                .filter_map(LoraKey::layer)
                .collect::<Vec<_>>()
        })
        .min()
}

fn selected_shapes<D: TensorSource>(
    deltas: &[D],
    rule: &Rule<'_>,
) -> Result<BTreeMap<String, [usize; 2]>> {
    let mut shapes: BTreeMap<String, [usize; 2]> = BTreeMap::new();
    for delta in deltas {
        for key in delta.lora_keys().filter(|k| rule.selects(k)) {
            let name = key.canonical();
            let found = delta.shape_of(name).ok_or_else(|| Error::MissingKey {
                tensor: name.to_owned(),
                present_in: "the source's key list",
                missing_from: "the source's shapes",
            })?;
            match shapes.get(name) {
                Some(&expected) if expected != found => {
                    return Err(Error::ShapeMismatch {
                        tensor: name.to_owned(),
                        expected: expected.to_vec(),
                        found: found.to_vec(),
                    });
                }
                Some(_) => {}
                None => {
                    shapes.insert(name.to_owned(), found);
                }
            }
        }
    }
    Ok(shapes)
}

/// Sum of squares, failing with `(index, value)` of the first non-finite
/// value. Fused into one pass: a block whose fast `f32` sum is not finite is
/// rescanned to find the NaN/∞, and a finite block goes through
/// [`block_sum_squares`] (exact enough at every scale).
fn checked_sum_squares(values: &[f32]) -> Result<f64, (usize, f32)> {
    let mut total = 0.0f64;
    for (b, block) in values.chunks(SUM_BLOCK).enumerate() {
        if let Some((i, v)) = first_non_finite_if(sum_squares_f32(block), block) {
            return Err((b * SUM_BLOCK + i, v));
        }
        total += block_sum_squares(block);
    }
    Ok(total)
}

/// The first non-finite value of `block`, looked for only when its `f32`
/// sum of squares `fast` is not finite (a NaN or ∞ always makes it so).
fn first_non_finite_if(fast: f32, block: &[f32]) -> Option<(usize, f32)> {
    if fast.is_finite() {
        return None;
    }
    first_non_finite(block)
}

/// Values per block of a sum of squares.
const SUM_BLOCK: usize = 4096;

/// Smallest `f32` block sum of squares trusted as is. Squares below
/// `f32::MIN_POSITIVE` lose bits (subnormal) or vanish (a value of 1e-30
/// squares to 0): each is off by at most 2⁻¹⁵⁰, so a 4,096-value block is off
/// by at most 2⁻¹³⁸ in total, a relative 2⁻⁷⁴ of any sum above 2⁻⁶⁴. Blocks
/// summing below it (tiny deltas) are summed again in `f64`, where the square
/// of every finite `f32` is a normal number.
const TRUSTED_F32_SUM: f32 = 5.421_011e-20; // 2⁻⁶⁴

/// Σ v² of a block of finite values, in `f64`: the vectorised `f32` sum when
/// it is neither tiny nor overflowing, otherwise an `f64` sum (so a delta of
/// 1e-30 or of 1e30 is normalised like one of 1).
fn block_sum_squares(block: &[f32]) -> f64 {
    let fast = sum_squares_f32(block);
    if fast.is_finite() && fast >= TRUSTED_F32_SUM {
        return f64::from(fast);
    }
    block.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
}

/// Sum of squares in sixteen `f32` lanes (vectorises well).
fn sum_squares_f32(block: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let chunks = block.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for chunk in chunks {
        acc.iter_mut().zip(chunk).for_each(|(a, v)| *a += v * v);
    }
    acc.iter().sum::<f32>() + tail
}

/// Divides by the Euclidean norm (computed in `f64`); leaves a zero vector
/// unchanged.
pub fn l2_normalise(values: &mut [f32]) {
    divide_by_norm(values, l2_norm(values));
}

/// Euclidean norm, in `f64` at every scale: a vector of 1e-30s has a norm,
/// not 0. Finite values are assumed (a NaN gives NaN).
pub fn l2_norm(values: &[f32]) -> f64 {
    values
        .chunks(SUM_BLOCK)
        .map(block_sum_squares)
        .sum::<f64>()
        .sqrt()
}

/// Divides every value by `norm` (> 0; otherwise nothing happens). When
/// 1/norm fits `f32` this is one vectorised multiply; for vectors so small
/// that it does not (norms below ~3·10⁻³⁹), each value is divided in `f64`.
fn divide_by_norm(values: &mut [f32], norm: f64) {
    if !(norm > 0.0 && norm.is_finite()) {
        return;
    }
    let inverse = 1.0 / norm;
    if inverse <= f64::from(f32::MAX) {
        scale(values, inverse as f32);
    } else {
        values
            .iter_mut()
            .for_each(|v| *v = (f64::from(*v) * inverse) as f32);
    }
}

/// `*` matches any run of characters (including none); everything else is literal.
fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return text.is_empty();
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.split_once(part) {
            Some((_, after)) => rest = after,
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn glob_matches_literals_and_stars() {
        assert!(glob_match("a.b", "a.b"));
        assert!(!glob_match("a.b", "a.bc"));
        assert!(glob_match("*.lora_B.weight", "x.layers.0.q.lora_B.weight"));
        assert!(glob_match("*layers.1.*", "m.layers.1.q.lora_A.weight"));
        assert!(!glob_match("*layers.1.*", "m.layers.2.q.lora_A.weight"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*a", "aa"));
        assert!(!glob_match("a*a", "a"));
    }
}
