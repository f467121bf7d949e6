//! [`ValidUpdates`]: one round's client updates after validation — the global
//! adapter's layout, the usable clients' tensors as borrowed slices, and the
//! exclusions found while validating. What every aggregation rule works on.
//!
//! Rules see every update as one flat `f32` vector in sorted key order. The
//! vector is never materialised: it is the concatenation of the adapter's
//! tensors, and [`engine`](super::engine) walks it in chunks, tensor by tensor,
//! so no update is copied (copying 20 × 3.4 M floats would cost more than
//! FedAvg itself); tensors of sources that do not hold `f32` are converted one
//! chunk at a time. [`flatten`] and [`unflatten`] make the same layout
//! explicit for callers who want the vector.

use std::collections::BTreeSet;

use crate::aggregate::{ClientId, ClientUpdate, Exclusion, ExclusionReason, Weighting};
use crate::error::{Error, Result};
use crate::lora::{LoraAdapter, LoraTensor, TensorSource};

/// The flat vector of an adapter: every LoRA tensor, row-major, concatenated in
/// sorted canonical-key order (the layout every aggregation rule works on).
///
/// ```
/// use safe_fedllm::aggregate::{flatten, unflatten};
/// use safe_fedllm::lora::{LoraAdapter, LoraTensor};
///
/// let mut a = LoraAdapter::new();
/// a.insert("m.layers.0.q.lora_B.weight", LoraTensor::new("b", [2, 1], vec![3.0, 4.0])?)?;
/// a.insert("m.layers.0.q.lora_A.weight", LoraTensor::new("a", [1, 2], vec![1.0, 2.0])?)?;
/// let flat = flatten(&a);
/// assert_eq!(flat, [1.0, 2.0, 3.0, 4.0]); // lora_A sorts before lora_B
/// assert_eq!(unflatten(&a, &flat)?, a);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub fn flatten(adapter: &LoraAdapter) -> Vec<f32> {
    let mut out = Vec::with_capacity(adapter.num_params());
    for entry in adapter.iter() {
        out.extend_from_slice(entry.tensor.as_slice());
    }
    out
}

/// The inverse of [`flatten`]: an adapter with `template`'s keys, shapes,
/// extras and config, holding the values of `flat`.
///
/// Fails with [`Error::DimensionMismatch`] when `flat` does not hold exactly
/// `template.num_params()` values.
pub fn unflatten(template: &LoraAdapter, flat: &[f32]) -> Result<LoraAdapter> {
    let expected = template.num_params();
    if flat.len() != expected {
        return Err(Error::DimensionMismatch {
            what: "flat adapter vector".into(),
            expected,
            found: flat.len(),
        });
    }
    let mut out = empty_like(template);
    let mut rest = flat;
    for entry in template.iter() {
        let Some((values, tail)) = rest.split_at_checked(entry.tensor.len()) else {
            return Err(Error::invariant(
                "aggregate::unflatten",
                "an adapter's tensors hold num_params() values in total",
                format!(
                    "tensor `{}` runs past {expected} values",
                    entry.key.canonical()
                ),
            ));
        };
        let tensor = LoraTensor::new(entry.key.canonical(), entry.tensor.shape(), values.to_vec())?;
        out.insert_parsed(entry.key.clone(), tensor);
        rest = tail;
    }
    Ok(out)
}

/// An adapter with no LoRA tensor but `template`'s extras, config and name.
fn empty_like(template: &LoraAdapter) -> LoraAdapter {
    LoraAdapter {
        entries: Default::default(),
        extras: template.extras.clone(),
        config: template.config.clone(),
        adapter_name: template.adapter_name.clone(),
    }
}

/// Where a client's tensor is read from.
#[derive(Clone, Copy)]
pub(crate) enum Seg<'a> {
    /// Native f32, borrowed in place (checked to have the tensor's length).
    Slice(&'a [f32]),
    /// Any other source: converted per chunk with `read_range`.
    Read(&'a dyn TensorSource),
}

/// A usable (finite, well-formed) client of the round.
pub(crate) struct Client<'a> {
    pub id: ClientId,
    pub samples: u64,
    pub factor: f64,
    /// The client's tensors, one per segment (key) in sorted order.
    pub segments: Vec<Seg<'a>>,
}

/// A round's client updates, validated against the global adapter's layout
/// (not to be confused with the defended [`round`](crate::round), which
/// produces them).
pub(crate) struct ValidUpdates<'a> {
    pub template: &'a LoraAdapter,
    /// The global adapter's canonical keys, one per segment.
    pub keys: Vec<&'a str>,
    /// The global adapter's tensors, one slice per segment.
    pub global: Vec<&'a [f32]>,
    /// Flat offset of each segment.
    pub offsets: Vec<usize>,
    /// Total number of parameters d.
    pub dim: usize,
    pub clients: Vec<Client<'a>>,
    pub exclusions: Vec<Exclusion>,
    /// Σ security factor over every submitted client, non-finite ones counted as 0.
    pub factor_sum: f64,
    /// Number of submitted clients.
    pub submitted: usize,
    /// True when the updates were not scanned for non-finite values yet: the
    /// rule's first pass detects them instead (see [`with_scan`]).
    pub deferred: bool,
}

/// Runs a rule with a deferred non-finite scan.
///
/// Scanning every update for NaN/∞ before aggregating costs a full read of
/// the inputs, as much as FedAvg itself. Instead the rule runs on an unscanned
/// round; its first pass notices non-finite inputs (a non-finite Gram
/// diagonal, output or sorted chunk) and returns `None`; only then are the
/// updates scanned one by one, the offenders excluded, and the rule rerun.
/// Results never contain a value computed from a non-finite input.
pub(crate) fn with_scan<'a, F>(
    global: &'a LoraAdapter,
    updates: &[ClientUpdate<'a>],
    mut run: F,
) -> Result<crate::aggregate::Aggregation>
where
    F: FnMut(ValidUpdates<'a>) -> Result<Option<crate::aggregate::Aggregation>>,
{
    match run(ValidUpdates::prepare_deferred(global, updates)?) {
        Ok(Some(done)) => return Ok(done),
        // Unscanned, non-finite updates still count towards the rule's size
        // constraint; only a scanned round may fail it.
        Ok(None) | Err(Error::TooFewClients { .. }) => {}
        Err(other) => return Err(other),
    }
    scanned(run(ValidUpdates::prepare(global, updates)?)?)
}

/// Checks what can be checked without reading tensor values: a non-empty
/// round, unique ids, finite factors in [0, 1], and every client holding
/// exactly the global adapter's keys and shapes (read through
/// [`TensorSource::lora_keys`] and [`TensorSource::shape_of`] only).
pub(crate) fn validate_headers(global: &LoraAdapter, updates: &[ClientUpdate<'_>]) -> Result<()> {
    if updates.is_empty() {
        return Err(Error::Empty {
            what: "the round's client updates",
        });
    }
    let mut seen = BTreeSet::new();
    for update in updates {
        if !seen.insert(update.client.as_str()) {
            return Err(Error::DuplicateClient {
                client: update.client.clone(),
            });
        }
        let factor = update.security_factor;
        if !(0.0..=1.0).contains(&factor) {
            return Err(Error::InvalidSecurityFactor {
                client: update.client.clone(),
                value: factor,
            });
        }
        check_layout(global, update)?;
    }
    Ok(())
}

fn check_layout(global: &LoraAdapter, update: &ClientUpdate<'_>) -> Result<()> {
    let culprit = |source| Err(Error::for_client(update.client.clone(), source));
    for entry in global.iter() {
        let name = entry.key.canonical();
        let Some(shape) = update.adapter.shape_of(name) else {
            return culprit(Error::MissingKey {
                tensor: name.to_owned(),
                present_in: "the global adapter",
                missing_from: "the client's update",
            });
        };
        if shape != entry.tensor.shape() {
            return culprit(Error::ShapeMismatch {
                tensor: name.to_owned(),
                expected: entry.tensor.shape().to_vec(),
                found: shape.to_vec(),
            });
        }
    }
    if let Some(extra) = update
        .adapter
        .lora_keys()
        .find(|k| global.get(k.canonical()).is_none())
    {
        return culprit(Error::MissingKey {
            tensor: extra.canonical().to_owned(),
            present_in: "the client's update",
            missing_from: "the global adapter",
        });
    }
    Ok(())
}

/// How a client's tensors are read: in place when the source offers native
/// `f32` of the right length, by chunked conversion otherwise. A source whose
/// `f32` slice contradicts its own shape is an error naming client and tensor.
fn segments_of<'a>(global: &'a LoraAdapter, update: &ClientUpdate<'a>) -> Result<Vec<Seg<'a>>> {
    global
        .iter()
        .map(|entry| {
            let key = entry.key.canonical();
            match update.adapter.as_f32(key) {
                Some(values) if values.len() == entry.tensor.len() => Ok(Seg::Slice(values)),
                Some(values) => Err(super::engine::client_read_error(
                    &update.client,
                    Error::DataLength {
                        tensor: key.to_owned(),
                        shape: entry.tensor.shape().to_vec(),
                        expected: entry.tensor.len(),
                        found: values.len(),
                    },
                )),
                None => Ok(Seg::Read(update.adapter)),
            }
        })
        .collect()
}

impl<'a> ValidUpdates<'a> {
    /// Validates the round and sets aside non-finite updates.
    pub fn prepare(global: &'a LoraAdapter, updates: &[ClientUpdate<'a>]) -> Result<Self> {
        Self::build(global, updates, true)
    }

    /// Validates headers only; every client is taken as usable and the rule
    /// must detect non-finite values in its first pass (see [`with_scan`]).
    pub fn prepare_deferred(global: &'a LoraAdapter, updates: &[ClientUpdate<'a>]) -> Result<Self> {
        Self::build(global, updates, false)
    }

    fn build(global: &'a LoraAdapter, updates: &[ClientUpdate<'a>], scan: bool) -> Result<Self> {
        validate_headers(global, updates)?;
        global.check_finite()?;
        let mut offsets = Vec::with_capacity(global.len());
        let mut dim = 0usize;
        for entry in global.iter() {
            offsets.push(dim);
            dim = dim
                .checked_add(entry.tensor.len())
                .ok_or_else(|| Error::Overflow {
                    what: "the global adapter's element count",
                    detail: format!("{dim} + {} > usize::MAX", entry.tensor.len()),
                })?;
        }
        let clients = updates
            .iter()
            .map(|update| {
                Ok(Client {
                    id: update.client.clone(),
                    samples: update.samples,
                    factor: update.security_factor,
                    segments: segments_of(global, update)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut round = ValidUpdates {
            template: global,
            keys: global.keys().collect(),
            global: global.iter().map(|e| e.tensor.as_slice()).collect(),
            offsets,
            dim,
            factor_sum: clients.iter().map(|c| c.factor).sum(),
            clients,
            exclusions: Vec::new(),
            submitted: updates.len(),
            deferred: !scan,
        };
        if scan {
            let all = round.all();
            round.exclude_non_finite(&all)?;
        }
        Ok(round)
    }

    /// Scans `members` for non-finite values and removes the offenders from
    /// the round with [`ExclusionReason::NonFinite`] (their factor leaves the
    /// gate's sum: they count as 0). Returns how many were removed; member
    /// indices are invalidated when any was.
    pub fn exclude_non_finite(&mut self, members: &[usize]) -> Result<usize> {
        let verdicts = super::engine::first_non_finite_per_client(self, members)?;
        let mut bad: Vec<(usize, (String, usize, f32))> = members
            .iter()
            .zip(verdicts)
            .filter_map(|(&i, v)| v.map(|v| (i, v)))
            .collect();
        bad.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        let removed = bad.len();
        let mut found = Vec::with_capacity(removed);
        for (i, (tensor, index, value)) in bad {
            if i < self.clients.len() {
                let client = self.clients.remove(i);
                found.push(Exclusion {
                    client: client.id,
                    reason: ExclusionReason::NonFinite {
                        tensor,
                        index,
                        value,
                    },
                });
            }
        }
        found.reverse();
        self.exclusions.append(&mut found);
        self.factor_sum = self.clients.iter().map(|c| c.factor).sum();
        Ok(removed)
    }

    /// Indices of every usable client.
    pub fn all(&self) -> Vec<usize> {
        (0..self.clients.len()).collect()
    }

    /// Mean security factor over every submitted client (non-finite updates
    /// count as 0: they cannot contribute).
    pub fn mean_factor(&self) -> f64 {
        self.factor_sum / self.submitted.max(1) as f64
    }

    /// Raw (unnormalised) weight of a client under a weighting.
    pub fn raw_weight(&self, client: usize, weighting: Weighting) -> f64 {
        let Some(c) = self.clients.get(client) else {
            return 0.0;
        };
        match weighting {
            Weighting::Uniform => 1.0,
            Weighting::Samples => c.samples as f64,
            Weighting::SamplesTimesFactor => c.samples as f64 * c.factor,
        }
    }

    /// The id of a usable client.
    pub fn id(&self, client: usize) -> ClientId {
        self.clients
            .get(client)
            .map(|c| c.id.clone())
            .unwrap_or_else(|| ClientId(String::new()))
    }

    /// Records an exclusion of a usable client.
    pub fn exclude(&mut self, client: usize, reason: ExclusionReason) {
        let id = self.id(client);
        self.exclusions.push(Exclusion { client: id, reason });
    }

    /// Builds the new global adapter from one value vector per segment.
    ///
    /// `None` when the values are not all finite in deferred mode (the rule
    /// must rerun after a scan); in scanned mode a non-finite result (an f32
    /// overflow of finite inputs) is [`Error::NonFinite`].
    pub fn assemble(&self, mapped: super::engine::Mapped) -> Result<Option<LoraAdapter>> {
        let segments = mapped.segments;
        if !mapped.finite {
            if self.deferred {
                return Ok(None);
            }
            for (entry, values) in self.template.iter().zip(&segments) {
                if let Some((index, value)) = crate::lora::tensor::first_non_finite(values) {
                    return Err(Error::Overflow {
                        what: "the aggregated global adapter",
                        detail: format!(
                            "tensor `{}` holds {value} at flat index {index}: finite updates left f32's range",
                            entry.key.canonical()
                        ),
                    });
                }
            }
        }
        let mut out = empty_like(self.template);
        for (entry, values) in self.template.iter().zip(segments) {
            let tensor = LoraTensor::new(entry.key.canonical(), entry.tensor.shape(), values)?;
            out.insert_parsed(entry.key.clone(), tensor);
        }
        Ok(Some(out))
    }
}

/// Builders for a round's [`Aggregation`].
impl ValidUpdates<'_> {
    /// The round is skipped; the exclusions found so far are kept.
    pub fn skip(self, reason: crate::aggregate::SkipReason) -> crate::aggregate::Aggregation {
        crate::aggregate::Aggregation {
            outcome: crate::aggregate::Outcome::Skipped { reason },
            contributions: Vec::new(),
            exclusions: self.exclusions,
        }
    }

    /// `g + Σ aᵢ·sᵢ·(xᵢ − g)` over `members`, with aᵢ the normalised
    /// `weighting` weights and sᵢ = `scales[i]` (1.0 when `scales` is empty).
    /// Members whose weight is zero are excluded with
    /// [`ExclusionReason::ZeroWeight`]; if all are, the round is skipped.
    pub fn weighted_mean(
        mut self,
        members: &[usize],
        weighting: Weighting,
        scales: &[f64],
    ) -> Result<Option<crate::aggregate::Aggregation>> {
        use crate::aggregate::SkipReason;
        if members.is_empty() {
            return Ok(Some(self.skip(SkipReason::NoClientLeft)));
        }
        if self.deferred {
            // Zero-weight members never reach a kernel, so the deferred
            // detection cannot see them: scan them now, so the report says
            // NonFinite rather than ZeroWeight for a poisoned one.
            let idle: Vec<usize> = members
                .iter()
                .copied()
                .filter(|&i| self.raw_weight(i, weighting) <= 0.0)
                .collect();
            if !idle.is_empty() && self.first_non_finite_any(&idle)? {
                return Ok(None);
            }
        }
        let raw: Vec<f64> = members
            .iter()
            .map(|&i| self.raw_weight(i, weighting))
            .collect();
        let total: f64 = raw.iter().sum();
        let mut kept = Vec::new();
        let mut weights = Vec::new();
        let mut kept_scales = Vec::new();
        for (k, (&i, &w)) in members.iter().zip(&raw).enumerate() {
            if w > 0.0 {
                kept.push(i);
                weights.push(w / total);
                kept_scales.push(scales.get(k).copied().unwrap_or(1.0));
            } else {
                self.exclude(i, ExclusionReason::ZeroWeight);
            }
        }
        if kept.is_empty() || !(total > 0.0 && total.is_finite()) {
            return Ok(Some(self.skip(SkipReason::ZeroTotalWeight)));
        }
        self.combination(&kept, &weights, &kept_scales)
    }

    /// True when any of `members` holds a non-finite value.
    fn first_non_finite_any(&self, members: &[usize]) -> Result<bool> {
        Ok(super::engine::first_non_finite_per_client(self, members)?
            .iter()
            .any(Option::is_some))
    }

    /// `g + Σ wᵢ·sᵢ·(xᵢ − g)` over `members` with normalised weights `weights`
    /// (summing to 1) and scales `scales`; every member is a contributor.
    pub fn combination(
        self,
        members: &[usize],
        weights: &[f64],
        scales: &[f64],
    ) -> Result<Option<crate::aggregate::Aggregation>> {
        use crate::aggregate::{Aggregation, Contribution, Outcome, Share};
        let scale = |k: usize| scales.get(k).copied().unwrap_or(1.0);
        let coefs: Vec<f64> = weights
            .iter()
            .enumerate()
            .map(|(k, a)| a * scale(k))
            .collect();
        let unscaled = (0..members.len()).all(|k| scale(k) == 1.0);
        // Without scaling Σ wᵢ = 1 and the global term vanishes exactly;
        // skipping it saves a read of the global adapter.
        let g_coef = if unscaled {
            0.0
        } else {
            1.0 - coefs.iter().sum::<f64>()
        };
        let values = super::engine::combine(&self, members, &coefs, g_coef)?;
        let Some(adapter) = self.assemble(values)? else {
            return Ok(None);
        };
        let contributions = members
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(k, (&i, &weight))| Contribution {
                client: self.id(i),
                weight,
                share: Share::Exact,
                scale: scale(k),
            })
            .collect();
        Ok(Some(Aggregation {
            outcome: Outcome::Updated(adapter),
            contributions,
            exclusions: self.exclusions,
        }))
    }

    /// Wraps coordinate-wise values computed over `members` into an aggregation
    /// (each member's nominal weight is 1/m).
    pub fn coordinate_wise(
        self,
        members: &[usize],
        values: super::engine::Mapped,
    ) -> Result<Option<crate::aggregate::Aggregation>> {
        use crate::aggregate::{Aggregation, Contribution, Outcome, Share};
        let Some(adapter) = self.assemble(values)? else {
            return Ok(None);
        };
        let weight = 1.0 / members.len().max(1) as f64;
        let contributions = members
            .iter()
            .map(|&i| Contribution {
                client: self.id(i),
                weight,
                share: Share::CoordinateWise,
                scale: 1.0,
            })
            .collect();
        Ok(Some(Aggregation {
            outcome: Outcome::Updated(adapter),
            contributions,
            exclusions: self.exclusions,
        }))
    }

    /// [`require`](Self::require) with a size computed by checked arithmetic:
    /// `None` (the constraint overflowed `usize`) can never be met and fails
    /// with `required = usize::MAX`.
    pub fn require_checked(
        &self,
        rule: &'static str,
        required: Option<usize>,
        constraint: String,
    ) -> Result<()> {
        self.require(rule, required.unwrap_or(usize::MAX), constraint)
    }

    /// Fails with [`Error::TooFewClients`] unless at least `required` clients are usable.
    pub fn require(&self, rule: &'static str, required: usize, constraint: String) -> Result<()> {
        if self.clients.len() < required {
            return Err(Error::TooFewClients {
                rule,
                constraint,
                required,
                found: self.clients.len(),
            });
        }
        Ok(())
    }
}

/// Unwraps the result of a rule run on a scanned round (where `None` cannot
/// occur: [`ValidUpdates::assemble`] reports a non-finite result as an error).
pub(crate) fn scanned(
    result: Option<crate::aggregate::Aggregation>,
) -> Result<crate::aggregate::Aggregation> {
    result.ok_or_else(|| {
        Error::invariant(
            "aggregate::updates::scanned",
            "a rule run on a scanned round returns a result (None means a non-finite input, and there is none)",
            "the rule returned None",
        )
    })
}

/// `a·f + b` with checked arithmetic (a rule's size constraint such as
/// Krum's n ≥ 2f + 3); `None` on overflow.
pub(crate) fn affine(a: usize, f: usize, b: usize) -> Option<usize> {
    a.checked_mul(f)?.checked_add(b)
}

/// Fails with [`Error::InvalidParameter`] when the size constraint
/// `a·f + b` overflows `usize` (no round could ever satisfy it).
pub(crate) fn check_affine(
    rule: &'static str,
    param: &'static str,
    a: usize,
    f: usize,
    b: usize,
    expected: &'static str,
) -> Result<()> {
    match affine(a, f, b) {
        Some(_) => Ok(()),
        None => Err(Error::parameter(rule, param, f, expected)),
    }
}
