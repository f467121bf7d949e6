//! [`AggregatorSpec`] and [`AnyAggregator`]: every rule behind one
//! serialisable description and one type, chosen at run time.
//!
//! The spec is the unchecked form (serde, tagged by `rule`); [`AggregatorSpec::check`]
//! validates it through each rule's own constructor and gives the
//! [`AnyAggregator`] that runs. A setting left out takes the rule's own
//! default, so each default is defined once, on the rule.

use serde::{Deserialize, Serialize};

use crate::aggregate::{
    Admit, Aggregation, Aggregator, Bulyan, ClientUpdate, ClipBound, CoordinateMedian, DnC,
    FactorGate, FedAvg, Flame, FoolsGold, GeometricMedian, Krum, KrumVariant, MultiKrum,
    NormClipping, Trim, TrimmedMean, Weighting,
};
use crate::error::{Error, Result};
use crate::lora::LoraAdapter;

/// An aggregation rule and its settings, as written in a
/// [`DefenseSpec`](crate::round::DefenseSpec) (tag `rule`).
///
/// Settings left out take the rule's default. Rules that ignore security
/// factors (median, trimmed mean, Krum, Bulyan) are run behind a
/// [`FactorGate`] that drops factor-0 clients (`drop_zero_factor`, default
/// `true`), so a client the detector zeroed never votes.
///
/// ```
/// use safe_fedllm::aggregate::{AggregatorSpec, Aggregator};
///
/// let spec: AggregatorSpec = serde_json::from_str(r#"{"rule": "multi_krum", "f": 1, "m": 3}"#)?;
/// let rule = spec.check()?;
/// assert_eq!(rule.name(), "multi_krum");
/// // A misspelt setting is an error naming it, never a silent default.
/// let typo = serde_json::from_str::<AggregatorSpec>(r#"{"rule": "krum", "ff": 1}"#);
/// assert!(typo.unwrap_err().to_string().contains("ff"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum AggregatorSpec {
    /// [`FedAvg`] (default weighting nₖ·wₖ). It never gates: the round's
    /// gate is the spec's `gate`.
    #[serde(rename = "fedavg")]
    FedAvg {
        /// Weighting of the mean.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weighting: Option<Weighting>,
    },
    /// [`CoordinateMedian`].
    Median {
        /// Drop factor-0 clients first (default `true`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drop_zero_factor: Option<bool>,
    },
    /// [`TrimmedMean`]: `beta` (fraction per side) or `per_side` (count);
    /// neither means one per side.
    TrimmedMean {
        /// Fraction β ∈ [0, 0.5) trimmed per side.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta: Option<f64>,
        /// Count trimmed per side.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        per_side: Option<usize>,
        /// Drop factor-0 clients first (default `true`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drop_zero_factor: Option<bool>,
    },
    /// [`Krum`].
    Krum {
        /// Byzantine clients tolerated.
        f: usize,
        /// `paper` (default) or `winner_neighbourhood`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        variant: Option<KrumVariantName>,
        /// Drop factor-0 clients first (default `true`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drop_zero_factor: Option<bool>,
    },
    /// [`MultiKrum`].
    MultiKrum {
        /// Byzantine clients tolerated.
        f: usize,
        /// Clients averaged.
        m: usize,
        /// Weighting of the mean.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weighting: Option<Weighting>,
        /// Drop factor-0 clients first (default `true`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drop_zero_factor: Option<bool>,
    },
    /// [`Bulyan`].
    Bulyan {
        /// Byzantine clients tolerated.
        f: usize,
        /// Drop factor-0 clients first (default `true`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drop_zero_factor: Option<bool>,
    },
    /// [`GeometricMedian`].
    GeometricMedian {
        /// Weighting of the Weiszfeld steps.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weighting: Option<Weighting>,
        /// Smoothing ν.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nu: Option<f64>,
        /// Convergence tolerance.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tolerance: Option<f64>,
        /// Iteration cap.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_iterations: Option<usize>,
    },
    /// [`NormClipping`]: `bound` is a number M > 0 or `"median_norm"`.
    NormClipping {
        /// The norm bound.
        bound: ClipBoundSpec,
        /// Weighting of the mean.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weighting: Option<Weighting>,
    },
    /// [`FoolsGold`] (stateful: its history lives in the built rule).
    #[serde(rename = "foolsgold")]
    FoolsGold {
        /// Confidence κ.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kappa: Option<f64>,
        /// Weighting of the mean.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weighting: Option<Weighting>,
    },
    /// [`Flame`].
    Flame {
        /// Noise level λ.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        noise_lambda: Option<f64>,
        /// Noise seed (a server secret).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seed: Option<u64>,
        /// Weighting of the mean.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weighting: Option<Weighting>,
    },
    /// [`DnC`].
    #[serde(rename = "dnc")]
    DnC {
        /// Byzantine clients tolerated.
        f: usize,
        /// Filter fraction c.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filter_fraction: Option<f64>,
        /// Sub-sampled dimension b.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subsample_dim: Option<usize>,
        /// Iterations.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        iterations: Option<usize>,
        /// Sub-sampling seed (a server secret).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seed: Option<u64>,
        /// Weighting of the mean.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weighting: Option<Weighting>,
    },
}

impl Default for AggregatorSpec {
    /// FedAvg weighted by nₖ·wₖ: the Safe-FedLLM rule.
    fn default() -> Self {
        AggregatorSpec::FedAvg { weighting: None }
    }
}

/// [`KrumVariant`] as written in a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KrumVariantName {
    /// [`KrumVariant::Paper`].
    Paper,
    /// [`KrumVariant::WinnerNeighbourhood`].
    WinnerNeighbourhood,
}

/// [`ClipBound`] as written in a spec: a number, or `"median_norm"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClipBoundSpec {
    /// [`ClipBound::Fixed`].
    Fixed(f64),
    /// [`ClipBound::MedianNorm`].
    Named(ClipBoundName),
}

/// The named clip bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipBoundName {
    /// [`ClipBound::MedianNorm`].
    MedianNorm,
}

impl AggregatorSpec {
    /// Validates the settings through each rule's constructor and builds it.
    pub fn check(&self) -> Result<AnyAggregator> {
        let w = |w: &Option<Weighting>, default| w.unwrap_or(default);
        let rule = match self {
            AggregatorSpec::FedAvg { weighting } => {
                Rule::FedAvg(FedAvg::new().weighting(w(weighting, Weighting::SamplesTimesFactor)))
            }
            AggregatorSpec::Median { .. } => Rule::Median(CoordinateMedian::new()),
            AggregatorSpec::TrimmedMean { beta, per_side, .. } => {
                let trim = match (beta, per_side) {
                    (Some(b), None) => Trim::Fraction(*b),
                    (None, Some(k)) => Trim::PerSide(*k),
                    (None, None) => Trim::PerSide(1),
                    (Some(b), Some(k)) => {
                        return Err(Error::parameter(
                            "trimmed_mean",
                            "beta/per_side",
                            format!("{b} and {k}"),
                            "one of beta or per_side",
                        ));
                    }
                };
                Rule::TrimmedMean(TrimmedMean::new(trim)?)
            }
            AggregatorSpec::Krum { f, variant, .. } => {
                let variant = match variant {
                    Some(KrumVariantName::WinnerNeighbourhood) => KrumVariant::WinnerNeighbourhood,
                    Some(KrumVariantName::Paper) | None => KrumVariant::Paper,
                };
                Rule::Krum(Krum::new(*f)?.variant(variant))
            }
            AggregatorSpec::MultiKrum {
                f, m, weighting, ..
            } => Rule::MultiKrum(
                MultiKrum::new(*f, *m)?.weighting(w(weighting, Weighting::default())),
            ),
            AggregatorSpec::Bulyan { f, .. } => Rule::Bulyan(Bulyan::new(*f)?),
            AggregatorSpec::GeometricMedian {
                weighting,
                nu,
                tolerance,
                max_iterations,
            } => {
                let r = GeometricMedian::new().weighting(w(weighting, Weighting::default()));
                let r = set(r, nu, GeometricMedian::nu);
                let r = set(r, tolerance, GeometricMedian::tolerance);
                Rule::GeometricMedian(set(r, max_iterations, GeometricMedian::max_iterations))
            }
            AggregatorSpec::NormClipping { bound, weighting } => {
                let bound = match bound {
                    ClipBoundSpec::Fixed(m) => ClipBound::Fixed(*m),
                    ClipBoundSpec::Named(ClipBoundName::MedianNorm) => ClipBound::MedianNorm,
                };
                Rule::NormClipping(
                    NormClipping::new(bound)?.weighting(w(weighting, Weighting::default())),
                )
            }
            AggregatorSpec::FoolsGold { kappa, weighting } => {
                let r = FoolsGold::new().weighting(w(weighting, Weighting::default()));
                Rule::FoolsGold(Box::new(set(r, kappa, FoolsGold::kappa)))
            }
            AggregatorSpec::Flame {
                noise_lambda,
                seed,
                weighting,
            } => {
                let r = Flame::new().weighting(w(weighting, Weighting::default()));
                let r = set(r, noise_lambda, Flame::noise_lambda);
                Rule::Flame(set(r, seed, Flame::seed))
            }
            AggregatorSpec::DnC {
                f,
                filter_fraction,
                subsample_dim,
                iterations,
                seed,
                weighting,
            } => {
                let r = DnC::new(*f)?.weighting(w(weighting, Weighting::default()));
                let r = set(r, filter_fraction, DnC::filter_fraction);
                let r = set(r, subsample_dim, DnC::subsample_dim);
                let r = set(r, iterations, DnC::iterations);
                Rule::DnC(Box::new(set(r, seed, DnC::seed)))
            }
        };
        rule.check()?;
        let drop_zero = self.drop_zero_factor();
        Ok(AnyAggregator {
            spec: self.clone(),
            rule: if drop_zero {
                Gated::Gated(FactorGate::new(rule).admit(Admit::Positive))
            } else {
                Gated::Plain(rule)
            },
        })
    }

    /// Whether factor-0 clients are dropped before the rule runs: the
    /// setting for rules that ignore factors, never for weighted rules
    /// (their weight nₖ·wₖ is already 0).
    fn drop_zero_factor(&self) -> bool {
        match self {
            AggregatorSpec::Median { drop_zero_factor }
            | AggregatorSpec::TrimmedMean {
                drop_zero_factor, ..
            }
            | AggregatorSpec::Krum {
                drop_zero_factor, ..
            }
            | AggregatorSpec::MultiKrum {
                drop_zero_factor, ..
            }
            | AggregatorSpec::Bulyan {
                drop_zero_factor, ..
            } => drop_zero_factor.unwrap_or(true),
            _ => false,
        }
    }
}

/// `rule` with the setting `value` applied by `setter`, or as it is when the
/// spec leaves the setting out (the rule's own default).
fn set<R, V: Copy>(rule: R, value: &Option<V>, setter: fn(R, V) -> R) -> R {
    match value {
        Some(v) => setter(rule, *v),
        None => rule,
    }
}

/// The built rules.
#[derive(Debug, Clone, PartialEq)]
enum Rule {
    FedAvg(FedAvg),
    Median(CoordinateMedian),
    TrimmedMean(TrimmedMean),
    Krum(Krum),
    MultiKrum(MultiKrum),
    Bulyan(Bulyan),
    GeometricMedian(GeometricMedian),
    NormClipping(NormClipping),
    FoolsGold(Box<FoolsGold>),
    Flame(Flame),
    DnC(Box<DnC>),
}

impl Rule {
    /// Runs the built rule's own [`check`](Krum::check): the one definition
    /// of each setting's range.
    fn check(&self) -> Result<()> {
        match self {
            Rule::FedAvg(_) | Rule::Median(_) => Ok(()),
            Rule::TrimmedMean(r) => r.check(),
            Rule::Krum(r) => r.check(),
            Rule::MultiKrum(r) => r.check(),
            Rule::Bulyan(r) => r.check(),
            Rule::GeometricMedian(r) => r.check(),
            Rule::NormClipping(r) => r.check(),
            Rule::FoolsGold(r) => r.check(),
            Rule::Flame(r) => r.check(),
            Rule::DnC(r) => r.check(),
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Aggregator {
        match self {
            Rule::FedAvg(r) => r,
            Rule::Median(r) => r,
            Rule::TrimmedMean(r) => r,
            Rule::Krum(r) => r,
            Rule::MultiKrum(r) => r,
            Rule::Bulyan(r) => r,
            Rule::GeometricMedian(r) => r,
            Rule::NormClipping(r) => r,
            Rule::FoolsGold(r) => r.as_mut(),
            Rule::Flame(r) => r,
            Rule::DnC(r) => r.as_mut(),
        }
    }

    fn inner(&self) -> &dyn Aggregator {
        match self {
            Rule::FedAvg(r) => r,
            Rule::Median(r) => r,
            Rule::TrimmedMean(r) => r,
            Rule::Krum(r) => r,
            Rule::MultiKrum(r) => r,
            Rule::Bulyan(r) => r,
            Rule::GeometricMedian(r) => r,
            Rule::NormClipping(r) => r,
            Rule::FoolsGold(r) => r.as_ref(),
            Rule::Flame(r) => r,
            Rule::DnC(r) => r.as_ref(),
        }
    }
}

impl Aggregator for Rule {
    fn name(&self) -> &'static str {
        self.inner().name()
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        self.inner_mut().aggregate(global, updates)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Gated {
    Plain(Rule),
    Gated(FactorGate<Rule>),
}

/// Any rule of the crate, built from a checked [`AggregatorSpec`]; the
/// aggregator of a [`DefendedRound`](crate::round::DefendedRound) built from
/// a [`DefenseSpec`](crate::round::DefenseSpec).
///
/// ```
/// use safe_fedllm::aggregate::{Aggregator, AggregatorSpec};
///
/// let rule = AggregatorSpec::Krum { f: 1, variant: None, drop_zero_factor: None }.check()?;
/// assert_eq!(rule.name(), "krum");
/// assert_eq!(rule.spec(), &AggregatorSpec::Krum { f: 1, variant: None, drop_zero_factor: None });
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AnyAggregator {
    spec: AggregatorSpec,
    rule: Gated,
}

impl AnyAggregator {
    /// The spec this rule was built from.
    pub fn spec(&self) -> &AggregatorSpec {
        &self.spec
    }
}

impl Aggregator for AnyAggregator {
    fn name(&self) -> &'static str {
        match &self.rule {
            Gated::Plain(r) => r.name(),
            Gated::Gated(g) => g.inner().name(),
        }
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        match &mut self.rule {
            Gated::Plain(r) => r.aggregate(global, updates),
            Gated::Gated(g) => g.aggregate(global, updates),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_round_trips_and_builds() {
        let specs = [
            r#"{"rule":"fedavg"}"#,
            r#"{"rule":"fedavg","weighting":"samples"}"#,
            r#"{"rule":"median"}"#,
            r#"{"rule":"trimmed_mean","beta":0.1}"#,
            r#"{"rule":"krum","f":1,"variant":"winner_neighbourhood"}"#,
            r#"{"rule":"multi_krum","f":1,"m":3}"#,
            r#"{"rule":"bulyan","f":1}"#,
            r#"{"rule":"geometric_median","nu":1e-6}"#,
            r#"{"rule":"norm_clipping","bound":"median_norm"}"#,
            r#"{"rule":"norm_clipping","bound":2.5}"#,
            r#"{"rule":"foolsgold","kappa":1.0}"#,
            r#"{"rule":"flame","seed":7}"#,
            r#"{"rule":"dnc","f":2,"iterations":3}"#,
        ];
        for text in specs {
            let spec: AggregatorSpec = serde_json::from_str(text).expect(text);
            let back: AggregatorSpec =
                serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
            assert_eq!(back, spec, "{text}");
            spec.check().expect(text);
        }
    }

    #[test]
    fn out_of_range_settings_are_typed_errors_naming_the_setting() {
        for (text, name) in [
            (r#"{"rule":"trimmed_mean","beta":0.7}"#, "beta"),
            (
                r#"{"rule":"trimmed_mean","beta":0.1,"per_side":1}"#,
                "beta/per_side",
            ),
            (r#"{"rule":"multi_krum","f":1,"m":0}"#, "m"),
            (r#"{"rule":"norm_clipping","bound":-1.0}"#, "bound"),
            (r#"{"rule":"foolsgold","kappa":-1.0}"#, "kappa"),
        ] {
            let spec: AggregatorSpec = serde_json::from_str(text).unwrap();
            match spec.check() {
                Err(Error::InvalidParameter { name: n, .. }) => {
                    assert!(n.contains(name) || name.contains(n), "{text}: {n}")
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_rules_and_settings_are_rejected() {
        assert!(serde_json::from_str::<AggregatorSpec>(r#"{"rule":"krumm","f":1}"#).is_err());
        let e = serde_json::from_str::<AggregatorSpec>(r#"{"rule":"median","ff":1}"#).unwrap_err();
        assert!(e.to_string().contains("ff"), "{e}");
    }
}
