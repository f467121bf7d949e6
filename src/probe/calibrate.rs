//! Calibrated probes: C by group k-fold, Platt scaling folded into the
//! weights, threshold policies (documented on [`CalibratedParams`]).

use std::fmt;
use std::str::FromStr;

use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, check_length, check_parameter};
use crate::probe::eval::{
    Confusion, ECE_BINS, Fold, ThresholdRule, brier_score, expected_calibration_error, roc_auc,
    select_threshold, stratified_group_k_fold,
};
use crate::probe::kernels::{dot, logistic_loss, sigmoid};
use crate::probe::train::{
    LinearModel, LogisticParams, Trainer, TrainerInfo, check_training_set, class_counts,
};
use crate::probe::{DEFAULT_THRESHOLD, Label};

/// How the decision threshold τ is chosen, on calibrated out-of-fold scores.
///
/// Spelled on the command line (and by [`FromStr`] / [`fmt::Display`]) as
/// `fixed:0.8`, `target-fpr:0.05` or `max-f1`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    /// τ fixed in advance. On a calibrated probe, `Fixed(0.8)` flags updates
    /// that are malicious at least 80 % of the time. The default, at the
    /// Safe-FedLLM reference value [`DEFAULT_THRESHOLD`].
    Fixed(f32),
    /// The lowest τ whose OOF false-positive rate is at most the target
    /// (the most recall a budget of wrongly flagged benign clients allows),
    /// placed in the middle of the gap between OOF scores so that it keeps a
    /// margin on both sides. Target in [0, 1].
    TargetFpr(f64),
    /// The τ with the highest OOF F1 (ties: the highest, i.e. fewest flags),
    /// placed in the middle of the gap below it.
    MaxF1,
}

impl Default for Threshold {
    fn default() -> Self {
        Threshold::Fixed(DEFAULT_THRESHOLD)
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threshold::Fixed(t) => write!(f, "fixed:{t}"),
            Threshold::TargetFpr(r) => write!(f, "target-fpr:{r}"),
            Threshold::MaxF1 => f.write_str("max-f1"),
        }
    }
}

impl FromStr for Threshold {
    type Err = Error;

    /// Parses `fixed:T`, `target-fpr:F` or `max-f1` and checks the value.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidParameter {
            component: "calibrated trainer",
            name: "threshold_policy",
            value: s.to_owned(),
            expected: "fixed:T (T in [0, 1]), target-fpr:F (F in [0, 1]) or max-f1",
        };
        let policy = match s.split_once(':') {
            None if s == "max-f1" => Threshold::MaxF1,
            Some(("fixed", t)) => Threshold::Fixed(t.trim().parse().map_err(|_| bad())?),
            Some(("target-fpr", r)) => Threshold::TargetFpr(r.trim().parse().map_err(|_| bad())?),
            _ => return Err(bad()),
        };
        policy.check().map_err(|_| bad())?;
        Ok(policy)
    }
}

impl Threshold {
    fn check(&self) -> Result<()> {
        let ok = match *self {
            Threshold::Fixed(t) => (0.0..=1.0).contains(&t),
            Threshold::TargetFpr(r) => (0.0..=1.0).contains(&r),
            Threshold::MaxF1 => true,
        };
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidParameter {
                component: "calibrated trainer",
                name: "threshold",
                value: self.to_string(),
                expected: "a fixed threshold or target rate in [0, 1]",
            })
        }
    }
}

/// The threshold a policy chose and what it does on the OOF scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThresholdReport {
    /// The policy.
    pub policy: Threshold,
    /// The chosen τ (scores ≥ τ are flagged).
    pub threshold: f32,
    /// Counts at τ on the OOF scores.
    pub confusion: Confusion,
    /// Share of benign OOF samples flagged.
    pub false_positive_rate: f64,
    /// Share of malicious OOF samples flagged.
    pub recall: f64,
    /// Share of flagged OOF samples that are malicious.
    pub precision: f64,
    /// Distance from τ to the nearest OOF score: how far any score may move
    /// before the OOF decisions change. 0 means τ sits on a score.
    pub margin: f64,
}

/// Chooses τ on (calibrated) scores by a [`Threshold`] policy and reports the
/// false-positive rate, recall, precision and margin it achieves there.
///
/// For [`Threshold::TargetFpr`] the achieved false-positive rate never
/// exceeds the target; τ is put midway between the last score it flags and
/// the next lower score, so that it does not sit on a training score.
///
/// ```
/// use safe_fedllm::probe::Label::{Benign, Malicious};
/// use safe_fedllm::probe::{Threshold, choose_threshold};
///
/// let scores = [0.1, 0.2, 0.6, 0.7, 0.9];
/// let labels = [Benign, Benign, Benign, Malicious, Malicious];
/// let choice = choose_threshold(&scores, &labels, Threshold::TargetFpr(0.0))?;
/// assert!((choice.threshold - 0.65).abs() < 1e-6); // between 0.6 (benign) and 0.7
/// assert_eq!(choice.recall, 1.0);
/// assert!((choice.margin - 0.05).abs() < 1e-6);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub fn choose_threshold(
    scores: &[f32],
    labels: &[Label],
    policy: Threshold,
) -> Result<ThresholdReport> {
    policy.check()?;
    let rule = match policy {
        Threshold::Fixed(t) => {
            return threshold_report(scores, labels, policy, t);
        }
        Threshold::TargetFpr(r) => ThresholdRule::TargetFalsePositiveRate(r),
        Threshold::MaxF1 => ThresholdRule::MaxF1,
    };
    let chosen = select_threshold(scores, labels, rule)?.threshold;
    let top = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Any τ in (lower, upper] gives the OOF decisions of `chosen`.
    let (lower, upper) = if chosen > top {
        (top, 1.0f32)
    } else {
        let below = scores
            .iter()
            .copied()
            .filter(|&s| s < chosen)
            .fold(0.0f32, f32::max);
        (below, chosen)
    };
    let middle = (f64::from(lower) + (f64::from(upper) - f64::from(lower)) / 2.0) as f32;
    // f32 rounding, or a top score of exactly 1.0 with nothing to flag, can
    // leave no room; then τ is the chosen score (at most 1).
    let tau = if middle > lower && middle <= upper {
        middle
    } else {
        chosen.min(1.0)
    };
    threshold_report(scores, labels, policy, tau)
}

fn threshold_report(
    scores: &[f32],
    labels: &[Label],
    policy: Threshold,
    tau: f32,
) -> Result<ThresholdReport> {
    let confusion = Confusion::at(scores, labels, tau)?;
    let margin = scores
        .iter()
        .map(|&s| (f64::from(s) - f64::from(tau)).abs())
        .fold(f64::INFINITY, f64::min);
    Ok(ThresholdReport {
        policy,
        threshold: tau,
        confusion,
        false_positive_rate: confusion.false_positive_rate(),
        recall: confusion.recall(),
        precision: confusion.precision(),
        margin,
    })
}

/// A Platt map P(malicious | z) = σ(a·z + b) over decision values z.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Platt {
    /// Slope (> 0 for a probe whose decision values rise with maliciousness).
    pub a: f64,
    /// Offset.
    pub b: f64,
}

impl Platt {
    /// Fits a, b by Newton's method with backtracking (Lin, Lin and Weng
    /// 2007) on Platt's smoothed targets t₊ = (N₊ + 1)/(N₊ + 2) and
    /// t₋ = 1/(N₋ + 2), which keep a perfectly separated set from driving
    /// a to infinity.
    ///
    /// Errors: those of a length or finiteness mismatch, and
    /// [`Error::MissingClass`] when a class is absent.
    ///
    /// ```
    /// use safe_fedllm::probe::Label::{Benign, Malicious};
    /// use safe_fedllm::probe::Platt;
    ///
    /// let z = [-2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 0.2, -0.2];
    /// let labels = [Benign, Benign, Benign, Malicious, Malicious, Malicious, Benign, Malicious];
    /// let platt = Platt::fit(&z, &labels)?;
    /// assert!(platt.a > 0.0);
    /// assert!(platt.probability(2.0) > platt.probability(-2.0));
    /// # Ok::<(), safe_fedllm::Error>(())
    /// ```
    pub fn fit(decision: &[f64], labels: &[Label]) -> Result<Platt> {
        check_length("labels for decision values", decision.len(), labels.len())?;
        if let Some(i) = decision.iter().position(|z| !z.is_finite()) {
            return Err(Error::NonFiniteFeature {
                what: "decision values",
                row: i,
                column: 0,
                value: decision.get(i).map_or(f32::NAN, |&z| z as f32),
            });
        }
        crate::probe::train::check_both_classes(labels)?;
        let (negatives, positives) = class_counts(labels);
        let hi = (positives as f64 + 1.0) / (positives as f64 + 2.0);
        let lo = 1.0 / (negatives as f64 + 2.0);
        let targets: Vec<f64> = labels
            .iter()
            .map(|l| if l.is_malicious() { hi } else { lo })
            .collect();
        let loss = |a: f64, b: f64| -> f64 {
            decision
                .iter()
                .zip(&targets)
                .map(|(&z, &t)| {
                    let u = a * z + b;
                    logistic_loss(-u) - t * u
                })
                .sum()
        };
        let mut a = 0.0;
        let mut b = ((positives as f64 + 1.0) / (negatives as f64 + 1.0)).ln();
        let mut f = loss(a, b);
        for _ in 0..100 {
            let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 1e-12, 0.0, 1e-12);
            for (&z, &t) in decision.iter().zip(&targets) {
                let p = sigmoid(a * z + b);
                let d = p * (1.0 - p);
                ga += (p - t) * z;
                gb += p - t;
                haa += d * z * z;
                hab += d * z;
                hbb += d;
            }
            if ga.abs() < 1e-5 && gb.abs() < 1e-5 {
                break;
            }
            let det = haa * hbb - hab * hab;
            if !(det.is_finite() && det > 0.0) {
                break;
            }
            let da = -(hbb * ga - hab * gb) / det;
            let db = -(haa * gb - hab * ga) / det;
            let slope = ga * da + gb * db;
            let mut step = 1.0;
            let mut moved = false;
            while step >= 1e-10 {
                let (na, nb) = (a + step * da, b + step * db);
                let nf = loss(na, nb);
                if nf.is_finite() && nf <= f + 1e-4 * step * slope {
                    (a, b, f) = (na, nb, nf);
                    moved = true;
                    break;
                }
                step /= 2.0;
            }
            if !moved {
                break;
            }
        }
        if a.is_finite() && b.is_finite() {
            Ok(Platt { a, b })
        } else {
            Err(Error::CalibrationFailed {
                detail: format!("Platt scaling diverged (a = {a}, b = {b})"),
            })
        }
    }

    /// σ(a·z + b).
    pub fn probability(&self, z: f64) -> f64 {
        sigmoid(self.a * z + self.b)
    }

    /// Folds the map into a linear model: σ(a·(wᵀx + b₀) + b) =
    /// σ((a·w)ᵀx + (a·b₀ + b)). Returns the new weights and bias.
    pub fn fold(&self, weights: &[f32], bias: f32) -> (Vec<f32>, f32) {
        let folded = weights
            .iter()
            .map(|&w| (self.a * f64::from(w)) as f32)
            .collect();
        (folded, (self.a * f64::from(bias) + self.b) as f32)
    }
}

/// One C of the grid and how it did out of fold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GridPoint {
    /// Inverse regularisation strength.
    pub c: f64,
    /// Mean OOF log loss of the uncalibrated probabilities σ(z) (the
    /// selection criterion, as scikit-learn's `scoring="neg_log_loss"`).
    pub oof_log_loss: f64,
    /// OOF ROC AUC.
    pub oof_roc_auc: f64,
}

/// What a calibrated fit did; saved with the probe in
/// [`ProbeInfo::calibration`](crate::probe::ProbeInfo::calibration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationReport {
    /// The chosen C.
    pub c: f64,
    /// Every C tried, ascending.
    pub grid: Vec<GridPoint>,
    /// Number of folds.
    pub folds: usize,
    /// Number of distinct groups the folds were built from.
    pub groups: usize,
    /// Seed of the fold assignment.
    pub seed: u64,
    /// The Platt map fitted on the OOF decision values (already folded into
    /// the model's weights and bias).
    pub platt: Platt,
    /// The threshold and what it does on the calibrated OOF scores.
    pub threshold: ThresholdReport,
    /// ROC AUC of the OOF scores at the chosen C.
    pub oof_roc_auc: f64,
    /// ECE ([`ECE_BINS`] equal-width bins) of the calibrated OOF scores.
    pub oof_ece: f64,
    /// ECE of the uncalibrated OOF scores σ(z), for comparison.
    pub oof_ece_uncalibrated: f64,
    /// Brier score of the calibrated OOF scores.
    pub oof_brier: f64,
    /// Number of ECE bins.
    pub ece_bins: usize,
    /// Model fits run (grid × folds + the final refit).
    pub fits: usize,
    /// L-BFGS iterations summed over all fits.
    pub iterations: usize,
}

/// Calibrated probes: the regularisation chosen by group cross-validation,
/// probabilities calibrated on out-of-fold scores, and a threshold chosen in
/// the terms a server operator cares about. The default trainer
/// ([`ProbeBuilder::default`](crate::probe::ProbeBuilder::default)).
///
/// # Why
///
/// A logistic probe that separates benign from malicious updates perfectly
/// (ROC AUC 1.0) can still flag only half of the malicious ones at τ = 0.8:
/// with a strong L2 penalty its scores are squeezed towards 0.5, so "0.8"
/// means nothing in particular. [`CalibratedParams`] fixes the meaning of the
/// score instead of asking every user to hand-tune `C` and τ:
///
/// 1. **C by group k-fold.** For each C of a grid, each of `k` folds from
///    [`stratified_group_k_fold`] (no run or client straddles folds) is fitted
///    with the plain L-BFGS trainer ([`LogisticParams`], warm-started along
///    the grid as scikit-learn's `LogisticRegressionCV` does), giving an
///    out-of-fold (OOF) decision value zᵢ for every sample. The C with the
///    lowest OOF log loss wins (ties: the smaller C).
/// 2. **Refit** on all samples at that C.
/// 3. **Platt scaling** (Platt 1999, with the Newton method of Lin, Lin and
///    Weng 2007 and Platt's smoothed targets, as scikit-learn's
///    `CalibratedClassifierCV(method="sigmoid")`): fit a, b so that
///    σ(a·zᵢ + b) matches the labels on the OOF decision values — values of
///    samples the fold model never saw, so the map corrects the
///    over- or under-confidence the refit model will show on new updates.
/// 4. **Fold the map into the model.** σ(a·(wᵀx + b₀) + b) = σ((a·w)ᵀx +
///    (a·b₀ + b)): the result is a plain linear model, so scoring,
///    persistence and every caller of [`LinearProbe`](crate::probe::LinearProbe)
///    are unchanged.
/// 5. **Threshold** by a [`Threshold`] policy on the calibrated OOF scores,
///    reported with the OOF false-positive rate, recall and the margin
///    (distance from τ to the nearest OOF score).
///
/// The [`CalibrationReport`] (saved with the probe) holds the grid, the
/// chosen C, a and b, the threshold report and the OOF ROC AUC, ECE (before
/// and after calibration) and Brier score. The OOF figures are the honest
/// held-out estimate available at training time; the Platt map is fitted on
/// the same OOF scores it is reported on (two parameters, so the optimism is
/// small, but an independent test set remains the real check).
///
/// ```
/// use safe_fedllm::probe::{CalibratedParams, Threshold, Trainer, synthetic::SyntheticConfig};
///
/// let (x, labels) = SyntheticConfig::new(400, 32).separation(2.0).seed(4).generate()?;
/// // Ten consecutive samples form one run: runs never straddle folds.
/// let groups: Vec<usize> = (0..400).map(|i| i / 10).collect();
/// let model = CalibratedParams::default()
///     .threshold(Threshold::TargetFpr(0.05))
///     .fit_grouped(x.view(), &labels, Some(&groups))?;
/// let report = model.calibration.as_ref().expect("calibrated fit");
/// assert!(report.threshold.false_positive_rate <= 0.05);
/// assert!(report.oof_roc_auc > 0.9);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
///
/// # Settings
///
/// | setting | default | valid |
/// |---|---|---|
/// | `base` (inner solver and its settings; its own `c` is ignored) | [`LogisticParams::default`] | as [`LogisticParams`] |
/// | `c_grid` | 0.01, 0.1, 1, 10, 100 | 1 to 64 values, finite, > 0 |
/// | `folds` | 5 | 2 ..= 100, at most the number of groups |
/// | `seed` (fold assignment) | 0 | |
/// | `threshold` | [`Threshold::Fixed`]`(0.8)` | values in [0, 1] |
///
/// Without groups ([`Trainer::fit`]) every sample is its own group. Each
/// fold's training part must hold both classes
/// ([`Error::CalibrationFailed`] otherwise, with the fold named).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibratedParams {
    base: LogisticParams,
    c_grid: Vec<f64>,
    folds: usize,
    seed: u64,
    threshold: Threshold,
}

impl Default for CalibratedParams {
    fn default() -> Self {
        CalibratedParams {
            base: LogisticParams::default(),
            c_grid: vec![0.01, 0.1, 1.0, 10.0, 100.0],
            folds: 5,
            seed: 0,
            threshold: Threshold::default(),
        }
    }
}

impl CalibratedParams {
    setters! {
        /// The inner trainer's settings (class weights, tolerance, threads, …);
        /// its `c` is replaced by each value of the grid.
        base: LogisticParams;
        /// The values of C to try.
        c_grid: Vec<f64>;
        /// Number of folds.
        folds: usize;
        /// Seed of the fold assignment.
        seed: u64;
        /// Threshold policy.
        threshold: Threshold;
    }

    /// The threshold policy.
    pub fn threshold_policy(&self) -> Threshold {
        self.threshold
    }

    fn check(&self) -> Result<()> {
        const TRAINER: &str = "calibrated trainer";
        let n = self.c_grid.len();
        let ok = (1..=64).contains(&n);
        check_parameter(
            ok,
            TRAINER,
            "c_grid",
            format!("{n} values"),
            "1 to 64 values",
        )?;
        if let Some(c) = self.c_grid.iter().find(|c| !(c.is_finite() && **c > 0.0)) {
            return Err(Error::parameter(TRAINER, "c_grid", c, "finite values > 0"));
        }
        let ok = (2..=100).contains(&self.folds);
        check_parameter(ok, TRAINER, "folds", self.folds, "2 ..= 100")?;
        self.threshold.check()
    }
}

impl Trainer for CalibratedParams {
    fn fit(&self, x: ArrayView2<'_, f32>, labels: &[Label]) -> Result<LinearModel> {
        self.fit_grouped(x, labels, None)
    }

    fn fit_grouped(
        &self,
        x: ArrayView2<'_, f32>,
        labels: &[Label],
        groups: Option<&[usize]>,
    ) -> Result<LinearModel> {
        self.check()?;
        let inner = self.base.check()?;
        check_training_set(x, labels)?;
        let own: Vec<usize>;
        let groups = match groups {
            Some(g) => g,
            None => {
                own = (0..labels.len()).collect();
                &own
            }
        };
        let folds = stratified_group_k_fold(labels, groups, self.folds, self.seed)?;
        check_folds(&folds, labels)?;
        let x = x.as_standard_layout();
        let data = x.as_slice().ok_or(Error::Empty {
            what: "contiguous training matrix",
        })?;
        let dim = x.ncols();
        let mut grid = self.c_grid.clone();
        grid.sort_by(f64::total_cmp);
        grid.dedup();

        // OOF decision values per C; fold solutions per C (for the warm start
        // of the refit).
        let n = labels.len();
        let mut oof = vec![vec![0.0f64; n]; grid.len()];
        let mut solutions: Vec<Vec<Vec<f64>>> = vec![Vec::new(); grid.len()];
        let mut fits = 0usize;
        let mut iterations = 0usize;
        for fold in &folds {
            let mut init: Option<Vec<f64>> = None;
            for (ci, &c) in grid.iter().enumerate() {
                let (solution, report) =
                    inner.solve(data, dim, &fold.train, labels, c, init.as_deref())?;
                fits += 1;
                iterations += report.iterations;
                let (weights, bias) = crate::probe::train::split_solution(&solution, dim)?;
                let weights: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
                if let Some(column) = oof.get_mut(ci) {
                    for &i in &fold.test {
                        // `solve` above checked data is [labels, dim] and fold
                        // rows index labels: the range is inside `data`.
                        let row = data.get(i * dim..(i + 1) * dim).unwrap_or(&[]);
                        if let Some(z) = column.get_mut(i) {
                            *z = dot(&weights, row) + bias;
                        }
                    }
                }
                if let Some(slot) = solutions.get_mut(ci) {
                    slot.push(solution.clone());
                }
                init = Some(solution);
            }
        }

        let mut points = Vec::with_capacity(grid.len());
        for (ci, &c) in grid.iter().enumerate() {
            let z = oof.get(ci).map_or(&[][..], Vec::as_slice);
            let log_loss = z
                .iter()
                .zip(labels)
                .map(|(&z, l)| logistic_loss(if l.is_malicious() { z } else { -z }))
                .sum::<f64>()
                / n as f64;
            let as_f32: Vec<f32> = z.iter().map(|&v| v as f32).collect();
            points.push(GridPoint {
                c,
                oof_log_loss: log_loss,
                oof_roc_auc: roc_auc(&as_f32, labels)?,
            });
        }
        let best = points
            .iter()
            .enumerate()
            .fold(None::<(usize, f64)>, |best, (i, p)| match best {
                Some((_, loss)) if p.oof_log_loss >= loss => best,
                _ if p.oof_log_loss.is_finite() => Some((i, p.oof_log_loss)),
                _ => best,
            })
            .map(|(i, _)| i)
            .ok_or_else(|| Error::CalibrationFailed {
                detail: "no C of the grid gave a finite out-of-fold log loss".into(),
            })?;
        let (c, z) = match (grid.get(best), oof.get(best)) {
            (Some(&c), Some(z)) => (c, z),
            _ => {
                return Err(Error::CalibrationFailed {
                    detail: format!("grid index {best} out of range"),
                });
            }
        };

        // Refit on everything, warm-started at the mean of the fold solutions.
        let start = mean_solution(solutions.get(best).map_or(&[][..], Vec::as_slice), dim + 1);
        let all: Vec<usize> = (0..n).collect();
        let (solution, report) = inner.solve(data, dim, &all, labels, c, start.as_deref())?;
        fits += 1;
        iterations += report.iterations;

        let platt = Platt::fit(z, labels)?;
        if platt.a <= 0.0 || platt.a.is_nan() {
            return Err(Error::CalibrationFailed {
                detail: format!(
                    "out-of-fold decision values do not rise with maliciousness (Platt slope a = {:.3e} at C = {c}); \
                     the probe does not separate the classes across groups",
                    platt.a
                ),
            });
        }
        let calibrated: Vec<f32> = z.iter().map(|&v| platt.probability(v) as f32).collect();
        let uncalibrated: Vec<f32> = z.iter().map(|&v| sigmoid(v) as f32).collect();
        let threshold = choose_threshold(&calibrated, labels, self.threshold)?;
        let distinct_groups = {
            let mut g = groups.to_vec();
            g.sort_unstable();
            g.dedup();
            g.len()
        };
        let calibration = CalibrationReport {
            c,
            grid: points,
            folds: folds.len(),
            groups: distinct_groups,
            seed: self.seed,
            platt,
            threshold,
            oof_roc_auc: roc_auc(&calibrated, labels)?,
            oof_ece: expected_calibration_error(&calibrated, labels, ECE_BINS)?,
            oof_ece_uncalibrated: expected_calibration_error(&uncalibrated, labels, ECE_BINS)?,
            oof_brier: brier_score(&calibrated, labels)?,
            ece_bins: ECE_BINS,
            fits,
            iterations,
        };

        let plain = inner.model(solution, report, dim)?;
        let (weights, bias) = platt.fold(&plain.weights, plain.bias);
        if let Some((column, value)) = crate::probe::kernels::first_non_finite(&weights) {
            return Err(Error::NonFiniteFeature {
                what: "calibrated probe weights",
                row: 0,
                column,
                value,
            });
        }
        Ok(LinearModel {
            weights,
            bias,
            trainer: TrainerInfo {
                name: "logistic-lbfgs-calibrated".to_owned(),
                settings: serde_json::to_value(self).map_err(|e| Error::Serialize {
                    what: "calibrated trainer settings",
                    reason: e.to_string(),
                })?,
            },
            report: plain.report,
            calibration: Some(calibration),
        })
    }
}

/// Every fold must train on both classes and test on at least one sample.
fn check_folds(folds: &[Fold], labels: &[Label]) -> Result<()> {
    for (f, fold) in folds.iter().enumerate() {
        let train: Vec<Label> = fold
            .train
            .iter()
            .filter_map(|&i| labels.get(i).copied())
            .collect();
        let (benign, malicious) = class_counts(&train);
        if benign == 0 || malicious == 0 || fold.test.is_empty() {
            return Err(Error::CalibrationFailed {
                detail: format!(
                    "fold {f} of {}: {benign} benign and {malicious} malicious training samples, {} test samples; \
                     every fold must train on both classes (use fewer folds, or more groups of the rarer class)",
                    folds.len(),
                    fold.test.len()
                ),
            });
        }
    }
    Ok(())
}

fn mean_solution(solutions: &[Vec<f64>], len: usize) -> Option<Vec<f64>> {
    if solutions.is_empty() {
        return None;
    }
    let mut mean = vec![0.0; len];
    for s in solutions {
        mean.iter_mut().zip(s).for_each(|(m, v)| *m += v);
    }
    let k = solutions.len() as f64;
    mean.iter_mut().for_each(|m| *m /= k);
    Some(mean)
}
