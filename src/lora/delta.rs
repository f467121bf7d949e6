//! ΔLoRA = update − base, with key and shape checks.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lora::adapter::LoraAdapter;
use crate::lora::key::LoraKey;
use crate::lora::source::{TensorSource, checked_range};
use crate::lora::tensor::LoraTensor;

/// What to do when the update and the base do not hold the same LoRA keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum KeyPolicy {
    /// Any key present on one side only is an [`Error::MissingKey`]. The default:
    /// a client that drops or adds modules is sending something other than what
    /// the server asked for.
    #[default]
    Strict,
    /// Use the keys both sides share; the others are listed in the
    /// [`DeltaReport`].
    Intersection,
}

/// Keys left out of a delta under [`KeyPolicy::Intersection`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaReport {
    /// Keys only the update has.
    pub only_in_update: Vec<String>,
    /// Keys only the base has.
    pub only_in_base: Vec<String>,
}

impl DeltaReport {
    /// True when both sides had the same keys.
    pub fn is_clean(&self) -> bool {
        self.only_in_update.is_empty() && self.only_in_base.is_empty()
    }
}

/// A LoRA update expressed as a difference from the adapter the client
/// started from: the input of probe features.
///
/// ```
/// use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
///
/// let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// let mut base = LoraAdapter::new();
/// base.insert(key, LoraTensor::new("b", [2, 1], vec![1.0, 1.0])?)?;
/// let mut update = LoraAdapter::new();
/// update.insert(key, LoraTensor::new("b", [2, 1], vec![1.5, 0.0])?)?;
///
/// let delta = LoraDelta::between(&update, &base)?;
/// assert_eq!(delta.as_adapter().get(key).map(|t| t.as_slice()), Some(&[0.5, -1.0][..]));
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LoraDelta {
    adapter: LoraAdapter,
}

impl LoraDelta {
    /// `update − base` under [`KeyPolicy::Strict`].
    pub fn between(
        update: &(impl TensorSource + ?Sized),
        base: &(impl TensorSource + ?Sized),
    ) -> Result<Self> {
        Self::between_with(update, base, KeyPolicy::Strict).map(|(delta, _)| delta)
    }

    /// `update − base` under an explicit key policy, with a report of the keys
    /// left out. Shapes must agree on every shared key.
    pub fn between_with(
        update: &(impl TensorSource + ?Sized),
        base: &(impl TensorSource + ?Sized),
        policy: KeyPolicy,
    ) -> Result<(Self, DeltaReport)> {
        let report = match_keys(update, base, policy)?;
        let mut adapter = LoraAdapter::new();
        for key in update.lora_keys() {
            let name = key.canonical();
            let Some(shape) = base.shape_of(name) else {
                continue; // one-sided key, listed in the report
            };
            let mut values = vec![0.0f32; shape[0] * shape[1]];
            update.copy_into(name, &mut values)?;
            base.subtract_from(name, &mut values)?;
            let tensor = LoraTensor::new(name, shape, values)?;
            adapter.insert_parsed(key.clone(), tensor);
        }
        Ok((LoraDelta { adapter }, report))
    }

    /// Treats an adapter as a delta (for clients that upload deltas directly).
    pub fn from_adapter(adapter: LoraAdapter) -> Self {
        LoraDelta { adapter }
    }

    /// The difference, as an adapter of the same keys and shapes.
    pub fn as_adapter(&self) -> &LoraAdapter {
        &self.adapter
    }

    /// Consumes the delta, returning the adapter of differences.
    pub fn into_adapter(self) -> LoraAdapter {
        self.adapter
    }

    /// `base + self`: the update this delta was taken from. Keys and shapes
    /// must match exactly.
    pub fn apply_to(&self, base: &LoraAdapter) -> Result<LoraAdapter> {
        match_keys(&self.adapter, base, KeyPolicy::Strict)?;
        let mut out = base.clone();
        for key in self.adapter.lora_keys() {
            let name = key.canonical();
            if let (Some(d), Some(t)) = (self.adapter.get(name), out.get_mut(name)) {
                t.as_mut_slice()
                    .iter_mut()
                    .zip(d.as_slice())
                    .for_each(|(b, d)| *b += d);
            }
        }
        Ok(out)
    }
}

impl TensorSource for LoraDelta {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        self.adapter.lora_keys()
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.adapter.shape_of(canonical)
    }

    fn read_range(&self, canonical: &str, offset: usize, out: &mut [f32]) -> Result<()> {
        self.adapter.read_range(canonical, offset, out)
    }

    fn as_f32(&self, canonical: &str) -> Option<&[f32]> {
        self.adapter.as_f32(canonical)
    }
}

/// `update − base` computed tensor by tensor on demand, never materialised.
///
/// Feeding this to [`FeatureSpec::transform`](crate::features::FeatureSpec::transform)
/// computes probe features straight from an upload's bytes: only the selected
/// tensors are decoded, and each value is touched once.
pub struct LazyDelta<'a, U: ?Sized, B: ?Sized> {
    update: &'a U,
    base: &'a B,
}

impl<'a, U: TensorSource + ?Sized, B: TensorSource + ?Sized> LazyDelta<'a, U, B> {
    /// Pairs an update with its base, checking keys and shapes strictly
    /// (headers only, no tensor is read).
    pub fn new(update: &'a U, base: &'a B) -> Result<Self> {
        match_keys(update, base, KeyPolicy::Strict)?;
        Ok(LazyDelta { update, base })
    }
}

impl<U: TensorSource + ?Sized, B: TensorSource + ?Sized> TensorSource for LazyDelta<'_, U, B> {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        self.update.lora_keys()
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.update.shape_of(canonical)
    }

    fn read_range(&self, canonical: &str, offset: usize, out: &mut [f32]) -> Result<()> {
        self.update.read_range(canonical, offset, out)?;
        let range = checked_range(self.base, canonical, offset, out.len())?;
        match self.base.as_f32(canonical).and_then(|b| b.get(range)) {
            Some(base) => out.iter_mut().zip(base).for_each(|(o, b)| *o -= b),
            None => {
                let mut base = vec![0.0f32; out.len()];
                self.base.read_range(canonical, offset, &mut base)?;
                out.iter_mut().zip(&base).for_each(|(o, b)| *o -= b);
            }
        }
        Ok(())
    }

    fn copy_into(&self, canonical: &str, out: &mut [f32]) -> Result<()> {
        self.update.copy_into(canonical, out)?;
        self.base.subtract_from(canonical, out)
    }
}

/// Matches the keys of two sources from their headers; fails on a shape
/// mismatch, and on a one-sided key under [`KeyPolicy::Strict`].
fn match_keys(
    update: &(impl TensorSource + ?Sized),
    base: &(impl TensorSource + ?Sized),
    policy: KeyPolicy,
) -> Result<DeltaReport> {
    let mut report = DeltaReport::default();
    for key in update.lora_keys() {
        let name = key.canonical();
        let found = update.shape_of(name).ok_or_else(|| Error::MissingKey {
            tensor: name.to_owned(),
            present_in: "the update's key list",
            missing_from: "the update's shapes",
        })?;
        match base.shape_of(name) {
            Some(expected) if expected == found => {}
            Some(expected) => {
                return Err(Error::ShapeMismatch {
                    tensor: name.to_owned(),
                    expected: expected.to_vec(),
                    found: found.to_vec(),
                });
            }
            None => report.only_in_update.push(name.to_owned()),
        }
    }
    for key in base.lora_keys() {
        if update.shape_of(key.canonical()).is_none() {
            report.only_in_base.push(key.canonical().to_owned());
        }
    }
    if policy == KeyPolicy::Strict {
        if let Some(name) = report.only_in_update.first() {
            return Err(missing(name, "the update", "the base adapter"));
        }
        if let Some(name) = report.only_in_base.first() {
            return Err(missing(name, "the base adapter", "the update"));
        }
    }
    Ok(report)
}

fn missing(name: &str, present_in: &'static str, missing_from: &'static str) -> Error {
    Error::MissingKey {
        tensor: name.to_owned(),
        present_in,
        missing_from,
    }
}
