//! In-memory step scoring for a training loop, and the shadow branch.
//!
//! The reference writes every local step's adapter to a `.pt` file and reads
//! them all back to score them. Here a [`StepRecorder`] scores each step as
//! it happens, holding only the base adapter and the scores: nothing is
//! written, and step adapters can be dropped right after scoring.

use crate::error::{Error, Result};
use crate::lora::{LazyDelta, LoraAdapter, TensorSource, element_count};
use crate::probe::Probe;

use crate::detect::DEFAULT_SHADOW_LEARNING_RATE;

/// P(malicious) of a single step: the probe's score of `step − base`.
///
/// Works with any [`Probe`], including `dyn Probe`: the delta is computed
/// lazily, tensor by tensor, and only the tensors the probe's feature layout
/// selects are read.
pub(crate) fn score_step<P: Probe + ?Sized>(
    probe: &P,
    base: &(impl TensorSource + ?Sized),
    step: &(impl TensorSource + ?Sized),
) -> Result<f32> {
    let delta = LazyDelta::new(step, base)?;
    let features = probe.feature_spec().transform(&delta)?;
    let score = probe.score_features(&features.values)?;
    if score.is_finite() {
        Ok(score)
    } else {
        Err(Error::NonFinite {
            tensor: "probe score".to_owned(),
            index: 0,
            value: score,
        })
    }
}

/// Scores a sequence of step adapters against the adapter the steps started
/// from (the round's global adapter, or the shadow base).
///
/// ```
/// # use safe_fedllm::features::{FeatureConfig, Selection};
/// # use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
/// # use safe_fedllm::probe::LinearProbe;
/// use safe_fedllm::round::score_steps;
///
/// let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// let adapter = |v: f32| -> safe_fedllm::Result<LoraAdapter> {
///     let mut a = LoraAdapter::new();
///     a.insert(key, LoraTensor::new("b", [2, 1], vec![v, 0.0])?)?;
///     Ok(a)
/// };
/// let base = adapter(0.0)?;
/// let spec = FeatureConfig::new(Selection::FirstLayerB)
///     .fit(&[LoraDelta::between(&adapter(1.0)?, &base)?])?;
/// // A probe that calls positive first coordinates malicious.
/// let probe = LinearProbe::new(spec, vec![20.0, 0.0], -10.0)?;
/// let steps = [adapter(0.5)?, adapter(-0.5)?];
/// let scores = score_steps(&probe, &base, &steps)?;
/// assert!(scores[0] > 0.99 && scores[1] < 0.01);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub fn score_steps<P: Probe + ?Sized, S: TensorSource>(
    probe: &P,
    base: &(impl TensorSource + ?Sized),
    steps: &[S],
) -> Result<Vec<f32>> {
    steps.iter().map(|s| score_step(probe, base, s)).collect()
}

/// The distance ‖stepᵢ − stepᵢ₋₁‖₂ each step travelled, the first from
/// `base`, accumulated in f64 over every tensor of the step.
///
/// The levels weigh steps by it: a step that does not move (a repeated
/// adapter) adds nothing to the evidence, however many times it is sent.
/// Reads two tensors at a time; a step holding a tensor `base` lacks fails.
pub(crate) fn step_distances(
    base: &dyn TensorSource,
    steps: &[&dyn TensorSource],
) -> Result<Vec<f64>> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut prev = base;
    let mut out = Vec::with_capacity(steps.len());
    for &step in steps {
        out.push(distance(prev, step, &mut a, &mut b)?);
        prev = step;
    }
    Ok(out)
}

fn distance(
    from: &dyn TensorSource,
    to: &dyn TensorSource,
    a: &mut Vec<f32>,
    b: &mut Vec<f32>,
) -> Result<f64> {
    let mut sum = 0.0f64;
    for key in to.lora_keys() {
        let key = key.canonical();
        let n = element_count(to, key)?;
        a.resize(n, 0.0);
        b.resize(n, 0.0);
        from.copy_into(key, a)?;
        to.copy_into(key, b)?;
        sum += a
            .iter()
            .zip(b.iter())
            .map(|(x, y)| {
                let d = f64::from(*y) - f64::from(*x);
                d * d
            })
            .sum::<f64>();
    }
    Ok(sum.sqrt())
}

/// Scores local steps as a training loop produces them.
///
/// Create one per client and branch at the start of local training with the
/// adapter the steps start from; call [`record`](Self::record) after every
/// optimiser step with the current adapter; [`finish`](Self::finish) returns
/// the scores for [`ClientEvidence`](crate::detect::ClientEvidence).
///
/// ```
/// # use safe_fedllm::features::{FeatureConfig, Selection};
/// # use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
/// # use safe_fedllm::probe::LinearProbe;
/// use safe_fedllm::detect::ClientEvidence;
/// use safe_fedllm::round::StepRecorder;
///
/// # let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// # let adapter = |v: f32| -> safe_fedllm::Result<LoraAdapter> {
/// #     let mut a = LoraAdapter::new();
/// #     a.insert(key, LoraTensor::new("b", [2, 1], vec![v, 0.0])?)?;
/// #     Ok(a)
/// # };
/// # let global = adapter(0.0)?;
/// # let spec = FeatureConfig::new(Selection::FirstLayerB)
/// #     .fit(&[LoraDelta::between(&adapter(1.0)?, &global)?])?;
/// # let probe = LinearProbe::new(spec, vec![20.0, 0.0], -10.0)?;
/// let mut recorder = StepRecorder::new(&probe, &global);
/// let mut local = global.clone();
/// for step in 0..3 {
///     // ... one optimiser step on `local` ...
///     # local = adapter(-0.1 * (step as f32 + 1.0))?;
///     recorder.record(&local)?;
/// }
/// let evidence = ClientEvidence::new(48).with_steps(recorder.finish());
/// assert_eq!(evidence.step_scores.len(), 3);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub struct StepRecorder<'a, P: Probe + ?Sized, B: TensorSource + ?Sized> {
    probe: &'a P,
    base: &'a B,
    scores: Vec<f32>,
}

impl<'a, P: Probe + ?Sized, B: TensorSource + ?Sized> StepRecorder<'a, P, B> {
    /// A recorder scoring steps against `base`.
    pub fn new(probe: &'a P, base: &'a B) -> Self {
        StepRecorder {
            probe,
            base,
            scores: Vec::new(),
        }
    }

    /// Scores the adapter after one local step; returns the score.
    pub fn record(&mut self, step: &(impl TensorSource + ?Sized)) -> Result<f32> {
        let score = score_step(self.probe, self.base, step)?;
        self.scores.push(score);
        Ok(score)
    }

    /// The scores so far, in step order.
    pub fn scores(&self) -> &[f32] {
        &self.scores
    }

    /// Number of harmful steps so far under the probe's own threshold.
    pub fn harmful_steps(&self) -> usize {
        self.scores
            .iter()
            .filter(|&&s| self.probe.is_harmful(s))
            .count()
    }

    /// The scores, in step order.
    pub fn finish(self) -> Vec<f32> {
        self.scores
    }
}

/// The shadow branch's fixed starting point and learning rate.
///
/// The probe was trained on deltas from the *initial* adapter; as the global
/// adapter drifts, deltas from it look less and less like the training data.
/// The shadow branch repeats each client's local steps from this fixed base
/// (the round-0 global adapter) at a fixed learning rate, so its deltas stay
/// in the probe's training distribution. Keep one `ShadowBranch` for the
/// whole run; persist its base with the adapter I/O if the server restarts.
///
/// ```
/// use safe_fedllm::round::ShadowBranch;
/// use safe_fedllm::lora::LoraAdapter;
///
/// let shadow = ShadowBranch::new(LoraAdapter::new())?; // reference lr 5e-5
/// assert_eq!(shadow.learning_rate(), 5e-5);
/// assert!(ShadowBranch::with_learning_rate(LoraAdapter::new(), -1.0).is_err());
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowBranch {
    base: LoraAdapter,
    learning_rate: f64,
}

impl ShadowBranch {
    /// A shadow branch from `base` at the reference learning rate (5e-5).
    pub fn new(base: LoraAdapter) -> Result<Self> {
        Self::with_learning_rate(base, DEFAULT_SHADOW_LEARNING_RATE)
    }

    /// A shadow branch from `base` at a fixed learning rate (finite, > 0).
    /// The base must be finite: every shadow delta is taken from it.
    pub fn with_learning_rate(base: LoraAdapter, learning_rate: f64) -> Result<Self> {
        if !(learning_rate.is_finite() && learning_rate > 0.0) {
            return Err(Error::InvalidParameter {
                component: "shadow branch",
                name: "learning_rate",
                value: learning_rate.to_string(),
                expected: "a finite number > 0",
            });
        }
        base.check_finite()?;
        Ok(ShadowBranch {
            base,
            learning_rate,
        })
    }

    /// The fixed base every shadow run starts from.
    pub fn base(&self) -> &LoraAdapter {
        &self.base
    }

    /// The fixed learning rate of every shadow run (no schedule).
    pub fn learning_rate(&self) -> f64 {
        self.learning_rate
    }

    /// A fresh copy of the base to train a shadow run on.
    pub fn start(&self) -> LoraAdapter {
        self.base.clone()
    }

    /// A recorder scoring shadow steps against the shadow base.
    pub fn recorder<'a, P: Probe + ?Sized>(
        &'a self,
        probe: &'a P,
    ) -> StepRecorder<'a, P, LoraAdapter> {
        StepRecorder::new(probe, &self.base)
    }

    /// Scores finished shadow steps against the shadow base.
    pub fn score_steps<P: Probe + ?Sized, S: TensorSource>(
        &self,
        probe: &P,
        steps: &[S],
    ) -> Result<Vec<f32>> {
        score_steps(probe, &self.base, steps)
    }
}
