//! Probe refresh: a drift remedy for the step and client levels.
//!
//! # Why
//!
//! The step and client levels score ΔLoRA relative to the *current* global
//! adapter. A probe trained on deltas from the round-0 adapter sees a
//! different distribution once the global adapter has moved: benign and
//! malicious deltas taken from a drifted starting point no longer fall on
//! the sides of the hyperplane the probe learnt, and the levels lose the
//! attackers (issue 11: on the embedded tiny LLaMA at 30 % malicious, step
//! and client level end at ASR 0.88 / 0.92 against FedAvg's 0.87). The
//! shadow level avoids drift by training from a fixed base; a refresh
//! instead moves the probe along with the global adapter.
//!
//! # What
//!
//! The server holds a small labelled **root set** (as FLTrust holds one): a
//! few benign and a few harmful local datasets it can replay itself. Every
//! [`ProbeRefresh::every`] rounds it re-runs those local trainings from the
//! current global adapter, keeps every step's delta from that adapter, and
//! refits the probe with the calibrated trainer ([`CalibratedParams`], group
//! folds with one group per replayed run, Platt scaling, threshold policy)
//! on the new deltas, keeping the old probe's frozen feature layout so that
//! admission and scoring see the same keys. The new probe replaces the old
//! one through [`DefendedRound::set_probe`](crate::round::DefendedRound::set_probe).
//!
//! Everything here is server-side and uses only data the server owns, so no
//! client can poison the refresh. The cost is the replayed runs (a few local
//! trainings every K rounds) and one calibrated fit.
//!
//! ```
//! use safe_fedllm::features::{FeatureConfig, Selection};
//! use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
//! use safe_fedllm::probe::{CalibratedParams, LinearProbe, Label, Probe};
//! use safe_fedllm::round::{LabelledRun, ProbeRefresh};
//!
//! let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
//! let delta = |x: f32, y: f32| -> safe_fedllm::Result<LoraDelta> {
//!     let mut a = LoraAdapter::new();
//!     a.insert(key, LoraTensor::new("b", [2, 1], vec![x, y])?)?;
//!     Ok(LoraDelta::from_adapter(a))
//! };
//! // The old probe thinks +x is malicious; after drift, +y is.
//! let spec = FeatureConfig::new(Selection::FirstLayerB).fit(&[delta(1.0, 0.0)?])?;
//! let old = LinearProbe::new(spec, vec![8.0, 0.0], -4.0)?;
//! let mut runs = Vec::new();
//! for r in 0..8 {
//!     let jitter = 0.05 * r as f32;
//!     runs.push(LabelledRun::new(Label::Benign, vec![delta(1.0, -0.2 + jitter)?, delta(1.0, -0.1 - jitter)?]));
//!     runs.push(LabelledRun::new(Label::Malicious, vec![delta(0.2 + jitter, 1.0)?, delta(0.1, 1.0 - jitter)?]));
//! }
//! let refresh = ProbeRefresh::new(4)?.trainer(CalibratedParams::default().folds(4));
//! assert!(!refresh.is_due(3) && refresh.is_due(4));
//! let refreshed = refresh.refit(4, &old, &runs)?;
//! assert!(refreshed.probe.score(&delta(0.1, 1.0)?)? > refreshed.probe.score(&delta(1.0, 0.0)?)?);
//! # Ok::<(), safe_fedllm::Error>(())
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lora::LoraDelta;
use crate::probe::{CalibratedParams, Label, LinearProbe, Probe, ProbeBuilder};

/// One replayed local run of the server's root set: its label and the delta
/// after every local step, each relative to the adapter the run started from
/// (the current global adapter).
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledRun {
    /// Benign or malicious data.
    pub label: Label,
    /// ΔLoRA after every step (relative to the run's start).
    pub steps: Vec<LoraDelta>,
}

impl LabelledRun {
    /// A run with its step deltas.
    pub fn new(label: Label, steps: Vec<LoraDelta>) -> Self {
        LabelledRun { label, steps }
    }
}

/// When and how the probe is refitted on the root set. See the
/// [`round` module docs](crate::round).
///
/// | setting | default | valid |
/// |---|---|---|
/// | `every` | (given) | ≥ 1 round |
/// | `trainer` | [`CalibratedParams::default`] with 3 folds | as [`CalibratedParams`] |
/// | `min_runs_per_class` | 3 | ≥ 1, and at least the number of folds − 1 in practice |
///
/// Three folds by default because a root set is small by design (a handful
/// of runs per class); each fold must still train on both classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeRefresh {
    every: u32,
    trainer: CalibratedParams,
    min_runs_per_class: usize,
}

/// A refitted probe and what it was fitted on.
#[derive(Debug, Clone)]
pub struct Refreshed {
    /// The new probe (same feature layout as the one it replaces; its
    /// calibration report is in [`LinearProbe::info`]).
    pub probe: LinearProbe,
    /// The round whose global adapter the runs started from.
    pub round: u32,
    /// Replayed runs used.
    pub runs: usize,
    /// Step deltas used.
    pub samples: usize,
}

impl ProbeRefresh {
    /// A refresh every `every` rounds (rounds `every`, `2·every`, …).
    ///
    /// Errors: [`Error::InvalidParameter`] for `every = 0`.
    pub fn new(every: u32) -> Result<Self> {
        if every == 0 {
            return Err(Error::InvalidParameter {
                component: "probe refresh",
                name: "every",
                value: "0".into(),
                expected: "a refresh period of at least 1 round",
            });
        }
        Ok(ProbeRefresh {
            every,
            trainer: CalibratedParams::default().folds(3),
            min_runs_per_class: 3,
        })
    }

    /// The calibrated trainer's settings (grid, folds, seed, threshold policy).
    pub fn trainer(mut self, trainer: CalibratedParams) -> Self {
        self.trainer = trainer;
        self
    }

    /// The fewest replayed runs of each class a refit accepts.
    ///
    /// Errors: [`Error::InvalidParameter`] for 0.
    pub fn min_runs_per_class(mut self, runs: usize) -> Result<Self> {
        if runs == 0 {
            return Err(Error::InvalidParameter {
                component: "probe refresh",
                name: "min_runs_per_class",
                value: "0".into(),
                expected: "at least 1 run per class",
            });
        }
        self.min_runs_per_class = runs;
        Ok(self)
    }

    /// The refresh period in rounds.
    pub fn every(&self) -> u32 {
        self.every
    }

    /// The trainer's settings.
    pub fn trainer_params(&self) -> &CalibratedParams {
        &self.trainer
    }

    /// Whether the probe is refitted before scoring `round` (0-based): at
    /// rounds `every`, `2·every`, … — never at round 0, where the probe
    /// trained from the round-0 adapter is current by construction.
    pub fn is_due(&self, round: u32) -> bool {
        round > 0 && round.is_multiple_of(self.every)
    }

    /// Refits the probe on the replayed `runs` of `round`, keeping the
    /// feature layout (keys, sizes, normalisation) of `current`. Each run is
    /// one group of the calibrated trainer's folds, since the steps of one run
    /// are not independent.
    ///
    /// Errors: [`Error::Empty`] for no runs or a run without steps,
    /// [`Error::CalibrationFailed`] (naming the round) when a class has fewer
    /// than `min_runs_per_class` runs, and those of feature extraction
    /// (a non-finite delta, a key of the wrong shape) and of the trainer.
    pub fn refit(
        &self,
        round: u32,
        current: &LinearProbe,
        runs: &[LabelledRun],
    ) -> Result<Refreshed> {
        if runs.is_empty() {
            return Err(Error::Empty {
                what: "root-set runs for the probe refresh",
            });
        }
        if runs.iter().any(|r| r.steps.is_empty()) {
            return Err(Error::Empty {
                what: "steps of a root-set run",
            });
        }
        let malicious = runs.iter().filter(|r| r.label.is_malicious()).count();
        let benign = runs.len() - malicious;
        if benign < self.min_runs_per_class || malicious < self.min_runs_per_class {
            return Err(Error::CalibrationFailed {
                detail: format!(
                    "probe refresh at round {round}: {benign} benign and {malicious} malicious root-set runs, \
                     at least {} of each needed",
                    self.min_runs_per_class
                ),
            });
        }
        let mut deltas = Vec::new();
        let mut labels = Vec::new();
        let mut groups = Vec::new();
        for (group, run) in runs.iter().enumerate() {
            for step in &run.steps {
                deltas.push(step);
                labels.push(run.label);
                groups.push(group);
            }
        }
        let spec = current.feature_spec().clone();
        let (x, _) = spec.transform_batch(&deltas)?;
        let probe = ProbeBuilder::new(self.trainer.clone()).fit_features_grouped(
            spec,
            x.view(),
            &labels,
            Some(&groups),
        )?;
        Ok(Refreshed {
            probe,
            round,
            runs: runs.len(),
            samples: labels.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{FeatureConfig, Selection};
    use crate::lora::{LoraAdapter, LoraTensor};
    use crate::rng::Rng;

    const KEY: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    const DIM: usize = 16;

    fn delta(values: Vec<f32>) -> LoraDelta {
        let mut a = LoraAdapter::new();
        a.insert(KEY, LoraTensor::new("b", [DIM, 1], values).unwrap())
            .unwrap();
        LoraDelta::from_adapter(a)
    }

    /// A synthetic drifted population: benign steps point along +e₀,
    /// malicious ones along +e₁ (both with noise) — while the stale probe
    /// learnt "+e₂ is malicious" at round 0.
    fn runs(per_class: usize, steps: usize, seed: u64) -> Vec<LabelledRun> {
        let mut rng = Rng::new(seed);
        let mut out = Vec::new();
        for r in 0..2 * per_class {
            let label = if r % 2 == 0 {
                Label::Benign
            } else {
                Label::Malicious
            };
            let axis = usize::from(label.is_malicious());
            let steps = (0..steps)
                .map(|_| {
                    let mut v: Vec<f32> = (0..DIM).map(|_| 0.3 * rng.normal() as f32).collect();
                    v[axis] += 2.0;
                    delta(v)
                })
                .collect();
            out.push(LabelledRun::new(label, steps));
        }
        out
    }

    fn stale_probe() -> LinearProbe {
        let spec = FeatureConfig::new(Selection::FirstLayerB)
            .fit(&[delta(vec![0.0; DIM])])
            .unwrap();
        let mut w = vec![0.0; DIM];
        w[2] = 10.0;
        LinearProbe::new(spec, w, -5.0).unwrap()
    }

    #[test]
    fn is_due_every_k_rounds_never_at_zero() {
        let r = ProbeRefresh::new(3).unwrap();
        let due: Vec<u32> = (0..10).filter(|&k| r.is_due(k)).collect();
        assert_eq!(due, vec![3, 6, 9]);
        assert!(ProbeRefresh::new(1).unwrap().is_due(1));
        assert!(matches!(
            ProbeRefresh::new(0),
            Err(Error::InvalidParameter { name: "every", .. })
        ));
        assert!(matches!(
            ProbeRefresh::new(2).unwrap().min_runs_per_class(0),
            Err(Error::InvalidParameter {
                component: "probe refresh",
                name: "min_runs_per_class",
                ..
            })
        ));
    }

    #[test]
    fn refit_recovers_the_drifted_direction_and_keeps_the_layout() {
        let stale = stale_probe();
        let train = runs(6, 5, 1);
        let test = runs(6, 5, 2);
        // The stale probe cannot tell the drifted classes apart.
        let flagged_by = |probe: &LinearProbe, label: Label| -> usize {
            test.iter()
                .filter(|r| r.label == label)
                .flat_map(|r| &r.steps)
                .filter(|d| probe.score(*d).unwrap() >= probe.threshold())
                .count()
        };
        assert_eq!(flagged_by(&stale, Label::Malicious), 0);

        let refreshed = ProbeRefresh::new(4)
            .unwrap()
            .refit(8, &stale, &train)
            .unwrap();
        assert_eq!(refreshed.round, 8);
        assert_eq!(refreshed.runs, 12);
        assert_eq!(refreshed.samples, 60);
        let probe = &refreshed.probe;
        assert_eq!(probe.feature_spec(), stale.feature_spec());
        let malicious_steps = 6 * 5;
        assert!(
            flagged_by(probe, Label::Malicious) >= malicious_steps * 9 / 10,
            "recall {} of {malicious_steps}",
            flagged_by(probe, Label::Malicious)
        );
        assert!(flagged_by(probe, Label::Benign) <= 1);
        // Calibrated: fitted with one group per run, three folds.
        let calibration = probe.info().calibration.as_ref().unwrap();
        assert_eq!(calibration.groups, 12);
        assert_eq!(calibration.folds, 3);
        assert!(calibration.oof_roc_auc > 0.95);
        assert!((probe.threshold() - calibration.threshold.threshold).abs() < 1e-7);
    }

    #[test]
    fn refit_rejects_thin_or_empty_root_sets() {
        let stale = stale_probe();
        let refresh = ProbeRefresh::new(2).unwrap();
        assert!(matches!(
            refresh.refit(2, &stale, &[]),
            Err(Error::Empty { .. })
        ));
        // Only two malicious runs: fewer than the three per class required.
        let mut thin = runs(2, 3, 3);
        thin.extend(
            runs(2, 3, 4)
                .into_iter()
                .filter(|r| r.label == Label::Benign),
        );
        match refresh.refit(6, &stale, &thin) {
            Err(Error::CalibrationFailed { detail }) => {
                assert!(detail.contains("round 6"), "{detail}")
            }
            other => panic!("expected CalibrationFailed, got {other:?}"),
        }
        let mut empty_run = runs(3, 2, 5);
        empty_run.push(LabelledRun::new(Label::Benign, Vec::new()));
        assert!(matches!(
            refresh.refit(2, &stale, &empty_run),
            Err(Error::Empty { .. })
        ));
    }

    #[test]
    fn refit_rejects_non_finite_and_misshapen_deltas() {
        let stale = stale_probe();
        let refresh = ProbeRefresh::new(2).unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut set = runs(3, 2, 6);
            let mut v = vec![0.1; DIM];
            v[3] = bad;
            set[1].steps[0] = delta(v);
            assert!(refresh.refit(2, &stale, &set).is_err(), "{bad}");
        }
        let mut set = runs(3, 2, 7);
        let mut a = LoraAdapter::new();
        a.insert(
            KEY,
            LoraTensor::new("b", [DIM + 1, 1], vec![0.1; DIM + 1]).unwrap(),
        )
        .unwrap();
        set[0].steps[1] = LoraDelta::from_adapter(a);
        assert!(refresh.refit(2, &stale, &set).is_err());
    }
}
