//! Evaluation of probe scores: confusion counts, precision, recall, F1,
//! ROC AUC, calibration (expected calibration error, Brier score), threshold
//! selection, and stratified (group) k-fold cross-validation.
//!
//! Conventions: the positive class is [`Label::Malicious`]; a sample is
//! predicted malicious when its score is ≥ the threshold (as
//! [`Probe::is_harmful`](crate::probe::Probe::is_harmful)). A ratio whose
//! denominator is zero (precision with no positive prediction, recall with no
//! malicious sample, F1 with both zero) is 0.0, as scikit-learn's
//! `zero_division=0`.
//!
//! ```
//! use safe_fedllm::probe::Label::{Benign, Malicious};
//! use safe_fedllm::probe::eval::{roc_auc, select_threshold, ThresholdRule};
//!
//! let scores = [0.1, 0.4, 0.35, 0.8];
//! let labels = [Benign, Benign, Malicious, Malicious];
//! assert_eq!(roc_auc(&scores, &labels)?, 0.75);
//! let choice = select_threshold(&scores, &labels, ThresholdRule::MaxF1)?;
//! assert_eq!(choice.threshold, 0.35);
//! assert_eq!(choice.confusion.true_positives, 2);
//! # Ok::<(), safe_fedllm::Error>(())
//! ```

use ndarray::{ArrayView2, Axis};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, check_length};
use crate::probe::Label;
use crate::probe::train::{Trainer, check_both_classes};
use crate::rng::Rng;

/// Counts of a binary decision against the truth (positive = malicious).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// Malicious, flagged.
    pub true_positives: usize,
    /// Benign, flagged.
    pub false_positives: usize,
    /// Benign, not flagged.
    pub true_negatives: usize,
    /// Malicious, not flagged.
    pub false_negatives: usize,
}

fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

impl Confusion {
    /// Counts at `threshold` (score ≥ threshold ⇒ flagged).
    pub fn at(scores: &[f32], labels: &[Label], threshold: f32) -> Result<Self> {
        check_pairs(scores, labels)?;
        let mut c = Confusion::default();
        for (&s, &l) in scores.iter().zip(labels) {
            match (s >= threshold, l.is_malicious()) {
                (true, true) => c.true_positives += 1,
                (true, false) => c.false_positives += 1,
                (false, false) => c.true_negatives += 1,
                (false, true) => c.false_negatives += 1,
            }
        }
        Ok(c)
    }

    /// TP / (TP + FP).
    pub fn precision(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_positives,
        )
    }

    /// TP / (TP + FN), the true-positive rate.
    pub fn recall(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_negatives,
        )
    }

    /// FP / (FP + TN).
    pub fn false_positive_rate(&self) -> f64 {
        ratio(
            self.false_positives,
            self.false_positives + self.true_negatives,
        )
    }

    /// Harmonic mean of precision and recall: 2TP / (2TP + FP + FN).
    pub fn f1(&self) -> f64 {
        ratio(
            2 * self.true_positives,
            2 * self.true_positives + self.false_positives + self.false_negatives,
        )
    }

    /// (TP + TN) / total.
    pub fn accuracy(&self) -> f64 {
        ratio(
            self.true_positives + self.true_negatives,
            self.true_positives + self.false_positives + self.true_negatives + self.false_negatives,
        )
    }
}

/// Every metric at one threshold, plus the threshold-free ROC AUC and the
/// calibration of the scores (ECE over [`ECE_BINS`] equal-width bins, Brier).
///
/// AUC says whether malicious updates score above benign ones; ECE and
/// Brier say whether a score of 0.8 *means* 80 % — which is what a fixed
/// threshold τ relies on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Number of samples.
    pub samples: usize,
    /// The threshold used.
    pub threshold: f32,
    /// Counts at it.
    pub confusion: Confusion,
    /// Precision at it.
    pub precision: f64,
    /// Recall at it.
    pub recall: f64,
    /// F1 at it.
    pub f1: f64,
    /// Accuracy at it.
    pub accuracy: f64,
    /// False-positive rate at it (benign updates flagged).
    pub false_positive_rate: f64,
    /// Area under the ROC curve.
    pub roc_auc: f64,
    /// Expected calibration error over [`Evaluation::ece_bins`] equal-width
    /// bins (see [`expected_calibration_error`]).
    pub ece: f64,
    /// Number of bins of the ECE.
    pub ece_bins: usize,
    /// Brier score: mean squared difference between score and label.
    pub brier: f64,
}

impl Evaluation {
    /// Evaluates scores against labels at `threshold`. Needs both classes
    /// (the AUC is undefined otherwise).
    pub fn new(scores: &[f32], labels: &[Label], threshold: f32) -> Result<Self> {
        let confusion = Confusion::at(scores, labels, threshold)?;
        Ok(Evaluation {
            samples: scores.len(),
            threshold,
            confusion,
            precision: confusion.precision(),
            recall: confusion.recall(),
            f1: confusion.f1(),
            accuracy: confusion.accuracy(),
            false_positive_rate: confusion.false_positive_rate(),
            roc_auc: roc_auc(scores, labels)?,
            ece: expected_calibration_error(scores, labels, ECE_BINS)?,
            ece_bins: ECE_BINS,
            brier: brier_score(scores, labels)?,
        })
    }
}

/// Bins of the ECE reported by [`Evaluation`]: ten equal-width bins, the
/// most common choice (Guo et al. 2017), so figures compare across papers.
pub const ECE_BINS: usize = 10;

/// Expected calibration error: scores are put in `bins` equal-width bins
/// over [0, 1] (bin k holds scores in [k/B, (k+1)/B), the last bin also
/// holds 1.0); ECE = Σₖ (nₖ/n)·|mean score in k − share malicious in k|.
///
/// 0 means a score of s is malicious a share s of the time, in every bin.
/// Scores outside [0, 1] are an [`Error::InvalidParameter`]; `bins` must be
/// ≥ 1.
///
/// ```
/// use safe_fedllm::probe::Label::{Benign, Malicious};
/// use safe_fedllm::probe::eval::expected_calibration_error;
///
/// // Bin [0.2, 0.3): mean 0.25, 1 of 2 malicious → |0.25 − 0.5| = 0.25, weight 2/4.
/// // Bin [0.9, 1.0]: mean 0.95, 2 of 2 malicious → 0.05, weight 2/4.
/// let ece = expected_calibration_error(&[0.2, 0.3 - 1e-6, 0.9, 1.0], &[Benign, Malicious, Malicious, Malicious], 10)?;
/// assert!((ece - 0.15).abs() < 1e-6);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub fn expected_calibration_error(scores: &[f32], labels: &[Label], bins: usize) -> Result<f64> {
    check_pairs(scores, labels)?;
    check_probabilities(scores)?;
    if bins == 0 {
        return Err(Error::parameter("probe evaluation", "bins", 0, ">= 1"));
    }
    let mut count = vec![0usize; bins];
    let mut score_sum = vec![0.0f64; bins];
    let mut positives = vec![0usize; bins];
    for (&s, &l) in scores.iter().zip(labels) {
        let k = ((f64::from(s) * bins as f64) as usize).min(bins - 1);
        if let (Some(c), Some(sum), Some(p)) =
            (count.get_mut(k), score_sum.get_mut(k), positives.get_mut(k))
        {
            *c += 1;
            *sum += f64::from(s);
            *p += usize::from(l.is_malicious());
        }
    }
    let n = scores.len() as f64;
    Ok(count
        .iter()
        .zip(&score_sum)
        .zip(&positives)
        .filter(|((c, _), _)| **c > 0)
        .map(|((&c, &sum), &p)| {
            let c_f = c as f64;
            (c_f / n) * (sum / c_f - p as f64 / c_f).abs()
        })
        .sum())
}

/// Brier score: mean of (score − target)², target 1 for malicious, 0 for
/// benign. Scores outside [0, 1] are an [`Error::InvalidParameter`].
pub fn brier_score(scores: &[f32], labels: &[Label]) -> Result<f64> {
    check_pairs(scores, labels)?;
    check_probabilities(scores)?;
    Ok(scores
        .iter()
        .zip(labels)
        .map(|(&s, l)| (f64::from(s) - l.target()).powi(2))
        .sum::<f64>()
        / scores.len() as f64)
}

fn check_probabilities(scores: &[f32]) -> Result<()> {
    match scores.iter().find(|s| !(0.0..=1.0).contains(*s)) {
        Some(s) => Err(Error::parameter(
            "probe evaluation",
            "scores",
            s,
            "probabilities in [0, 1]",
        )),
        None => Ok(()),
    }
}

fn check_pairs(scores: &[f32], labels: &[Label]) -> Result<()> {
    check_length("labels for scores", scores.len(), labels.len())?;
    if scores.is_empty() {
        return Err(Error::Empty { what: "scores" });
    }
    if let Some((i, &value)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        return Err(Error::NonFiniteFeature {
            what: "scores",
            row: i,
            column: 0,
            value,
        });
    }
    Ok(())
}

/// ROC AUC: the probability that a random malicious sample scores above a
/// random benign one, ties counting one half (the Mann–Whitney statistic with
/// average ranks; equal to scikit-learn's `roc_auc_score`).
///
/// Errors: [`Error::MissingClass`] when a class is absent, plus the checks of
/// [`Confusion::at`].
pub fn roc_auc(scores: &[f32], labels: &[Label]) -> Result<f64> {
    check_pairs(scores, labels)?;
    check_both_classes(labels)?;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| {
        scores
            .get(a)
            .partial_cmp(&scores.get(b))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut rank_sum = 0.0f64;
    let mut start = 0;
    // Runs of equal scores (sorted and finite, so equality is transitive).
    for tied in order.chunk_by(|&a, &b| scores.get(a) == scores.get(b)) {
        let end = start + tied.len();
        let average_rank = (start + end + 1) as f64 / 2.0; // 1-based ranks start+1 ..= end
        let positives = tied
            .iter()
            .filter(|&&i| labels.get(i).is_some_and(|l| l.is_malicious()))
            .count();
        rank_sum += average_rank * positives as f64;
        start = end;
    }
    let n_pos = labels.iter().filter(|l| l.is_malicious()).count() as f64;
    let n_neg = labels.len() as f64 - n_pos;
    Ok((rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg))
}

/// How to pick a decision threshold on held-out scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdRule {
    /// The threshold with the highest F1 (the highest such threshold on ties,
    /// i.e. the fewest flags).
    MaxF1,
    /// The lowest threshold whose false-positive rate is at most the target
    /// (the most recall the benign budget allows). Target in [0, 1].
    TargetFalsePositiveRate(f64),
}

/// A chosen threshold and the counts it gives.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThresholdChoice {
    /// The threshold: one of the observed scores, or just above the highest
    /// score when no observed score meets the rule (flag nothing).
    pub threshold: f32,
    /// Counts at that threshold.
    pub confusion: Confusion,
}

/// Picks a threshold on held-out scores.
///
/// Candidates are the observed scores (a sample is flagged when score ≥
/// threshold) plus "flag nothing". Errors: those of [`Confusion::at`], and
/// [`Error::InvalidParameter`] for a target rate outside [0, 1].
pub fn select_threshold(
    scores: &[f32],
    labels: &[Label],
    rule: ThresholdRule,
) -> Result<ThresholdChoice> {
    check_pairs(scores, labels)?;
    if let ThresholdRule::TargetFalsePositiveRate(target) = rule
        && !(0.0..=1.0).contains(&target)
    {
        return Err(Error::parameter(
            "probe evaluation",
            "target_false_positive_rate",
            target,
            "in [0, 1]",
        ));
    }
    let mut candidates: Vec<f32> = scores.to_vec();
    candidates.sort_by(|a, b| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal));
    candidates.dedup();
    let top = candidates.first().copied().unwrap_or(1.0);
    let nothing = next_up(top);
    let mut best = ThresholdChoice {
        threshold: nothing,
        confusion: Confusion::at(scores, labels, nothing)?,
    };
    for &t in &candidates {
        let confusion = Confusion::at(scores, labels, t)?;
        let better = match rule {
            ThresholdRule::MaxF1 => confusion.f1() > best.confusion.f1(),
            ThresholdRule::TargetFalsePositiveRate(target) => {
                confusion.false_positive_rate() <= target
            }
        };
        if better {
            best = ThresholdChoice {
                threshold: t,
                confusion,
            };
        }
    }
    Ok(best)
}

/// The smallest `f32` above `x` (for finite `x`).
fn next_up(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    let bits = x.to_bits();
    let next = if x == 0.0 {
        1
    } else if x > 0.0 {
        bits + 1
    } else {
        bits - 1
    };
    f32::from_bits(next)
}

/// Row indices of one cross-validation fold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fold {
    /// Rows to train on.
    pub train: Vec<usize>,
    /// Rows to evaluate on.
    pub test: Vec<usize>,
}

/// Stratified k-fold: each class is shuffled (seeded) and dealt round-robin
/// into `k` folds, so every fold has nearly the same class ratio.
///
/// Errors: [`Error::InvalidParameter`] when `k < 2` or a class has fewer
/// than `k` samples (a fold would miss it).
pub fn stratified_k_fold(labels: &[Label], k: usize, seed: u64) -> Result<Vec<Fold>> {
    if k < 2 {
        return Err(Error::parameter("probe evaluation", "k", k, ">= 2"));
    }
    let mut rng = Rng::new(seed);
    let mut fold_of = vec![0usize; labels.len()];
    for class in [Label::Benign, Label::Malicious] {
        let mut rows: Vec<usize> = (0..labels.len())
            .filter(|&i| labels.get(i) == Some(&class))
            .collect();
        if rows.len() < k {
            return Err(Error::parameter(
                "probe evaluation",
                "k",
                k,
                "at most the number of samples of the smaller class",
            ));
        }
        rng.shuffle(&mut rows);
        for (position, row) in rows.into_iter().enumerate() {
            if let Some(slot) = fold_of.get_mut(row) {
                *slot = position % k;
            }
        }
    }
    Ok((0..k)
        .map(|f| Fold {
            train: (0..labels.len())
                .filter(|&i| fold_of.get(i) != Some(&f))
                .collect(),
            test: (0..labels.len())
                .filter(|&i| fold_of.get(i) == Some(&f))
                .collect(),
        })
        .collect())
}

/// Stratified *group* k-fold: every group lands whole in one test fold, and
/// groups are dealt so that each fold's class ratio stays as close to the
/// overall one as the groups allow.
///
/// `groups` holds one group id per sample (any `usize`; ids need not be
/// dense). The steps of one fine-tuning run, or the rounds of one client,
/// are near-copies of each other: letting them straddle folds would let the
/// probe be tested on samples it has, in effect, trained on. With every
/// sample in its own group this is plain stratified k-fold.
///
/// Dealing follows scikit-learn's `StratifiedGroupKFold`: groups are
/// shuffled (seeded), then taken in order of decreasing spread of their
/// class counts, and each goes to the fold where the per-class shares
/// across folds stay most even (ties: the fold with fewer samples).
///
/// Errors: [`Error::InvalidParameter`] when `k < 2` or there are fewer than
/// `k` distinct groups; [`Error::LengthMismatch`] when `groups` and
/// `labels` differ in length.
///
/// ```
/// use safe_fedllm::probe::Label::{Benign, Malicious};
/// use safe_fedllm::probe::eval::stratified_group_k_fold;
///
/// let labels = [Benign, Benign, Malicious, Malicious, Benign, Benign, Malicious, Benign];
/// let groups = [0, 0, 1, 1, 2, 2, 3, 4];
/// let folds = stratified_group_k_fold(&labels, &groups, 2, 0)?;
/// for fold in &folds {
///     // Rows 0 and 1 (group 0) are tested together or not at all.
///     assert_eq!(fold.test.contains(&0), fold.test.contains(&1));
/// }
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub fn stratified_group_k_fold(
    labels: &[Label],
    groups: &[usize],
    k: usize,
    seed: u64,
) -> Result<Vec<Fold>> {
    check_length("group ids for labels", labels.len(), groups.len())?;
    if k < 2 {
        return Err(Error::parameter("probe evaluation", "k", k, ">= 2"));
    }
    // Dense group index and per-group class counts [benign, malicious].
    let mut index: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    let mut counts: Vec<[usize; 2]> = Vec::new();
    let mut group_of = Vec::with_capacity(labels.len());
    for (&g, l) in groups.iter().zip(labels) {
        let next = counts.len();
        let dense = *index.entry(g).or_insert(next);
        if dense == next {
            counts.push([0, 0]);
        }
        if let Some([benign, malicious]) = counts.get_mut(dense) {
            if l.is_malicious() {
                *malicious += 1;
            } else {
                *benign += 1;
            }
        }
        group_of.push(dense);
    }
    if counts.len() < k {
        return Err(Error::parameter(
            "probe evaluation",
            "k",
            k,
            "at most the number of distinct groups",
        ));
    }
    let totals = counts
        .iter()
        .fold([0usize; 2], |t, c| [t[0] + c[0], t[1] + c[1]]);
    let mut order: Vec<usize> = (0..counts.len()).collect();
    Rng::new(seed).shuffle(&mut order);
    let spread = |c: &[usize; 2]| c[0].abs_diff(c[1]);
    order.sort_by_key(|&g| std::cmp::Reverse(counts.get(g).map_or(0, spread)));
    let mut fold_counts = vec![[0usize; 2]; k];
    let mut fold_of_group = vec![0usize; counts.len()];
    for &g in &order {
        let Some(&c) = counts.get(g) else { continue };
        let mut best: Option<(f64, usize, usize)> = None; // (evenness, samples, fold)
        for f in 0..k {
            let evenness = fold_evenness(&fold_counts, f, c, totals);
            let samples = fold_counts.get(f).map_or(0, |x| x[0] + x[1]);
            let better = match best {
                None => true,
                Some((e, s, _)) => {
                    evenness < e - 1e-12 || ((evenness - e).abs() <= 1e-12 && samples < s)
                }
            };
            if better {
                best = Some((evenness, samples, f));
            }
        }
        let f = best.map_or(0, |(_, _, f)| f);
        if let (Some(slot), Some(fc)) = (fold_of_group.get_mut(g), fold_counts.get_mut(f)) {
            *slot = f;
            fc[0] += c[0];
            fc[1] += c[1];
        }
    }
    let fold_of = |i: usize| group_of.get(i).and_then(|&g| fold_of_group.get(g)).copied();
    Ok((0..k)
        .map(|f| Fold {
            train: (0..labels.len())
                .filter(|&i| fold_of(i) != Some(f))
                .collect(),
            test: (0..labels.len())
                .filter(|&i| fold_of(i) == Some(f))
                .collect(),
        })
        .collect())
}

/// Mean over the classes of the standard deviation, across folds, of each
/// fold's share of that class — after adding `add` to fold `target`.
fn fold_evenness(folds: &[[usize; 2]], target: usize, add: [usize; 2], totals: [usize; 2]) -> f64 {
    let k = folds.len() as f64;
    // The standard deviation of one class's shares; `class` picks its count.
    let spread = |class: fn(&[usize; 2]) -> usize| -> f64 {
        let total = class(&totals).max(1) as f64;
        let shares: Vec<f64> = folds
            .iter()
            .enumerate()
            .map(|(f, c)| {
                let extra = if f == target { class(&add) } else { 0 };
                (class(c) + extra) as f64 / total
            })
            .collect();
        let mean = shares.iter().sum::<f64>() / k;
        (shares.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / k).sqrt()
    };
    let [benign, malicious]: [fn(&[usize; 2]) -> usize; 2] = [|c| c[0], |c| c[1]];
    (spread(benign) + spread(malicious)) / 2.0
}

/// Stratified k-fold cross-validation of a trainer on a feature matrix: one
/// [`Evaluation`] per fold, at `threshold`, on the fold's held-out rows.
pub fn cross_validate<T: Trainer>(
    trainer: &T,
    x: ArrayView2<'_, f32>,
    labels: &[Label],
    k: usize,
    seed: u64,
    threshold: f32,
) -> Result<Vec<Evaluation>> {
    check_length("labels for feature rows", x.nrows(), labels.len())?;
    stratified_k_fold(labels, k, seed)?
        .into_iter()
        .map(|fold| {
            let pick = |rows: &[usize]| -> Vec<Label> {
                rows.iter()
                    .filter_map(|&i| labels.get(i).copied())
                    .collect()
            };
            let train_x = x.select(Axis(0), &fold.train);
            let test_x = x.select(Axis(0), &fold.test);
            let model = trainer.fit(train_x.view(), &pick(&fold.train))?;
            let scores = model.probabilities(test_x.view())?;
            Evaluation::new(&scores, &pick(&fold.test), threshold)
        })
        .collect()
}
