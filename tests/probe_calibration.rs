//! Calibrated probes (issue 11 item 1): group k-fold, Platt scaling folded
//! into the weights, threshold policies, ECE / Brier.

use ndarray::s;
use proptest::prelude::*;
use safe_fedllm::Error;
use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
use safe_fedllm::probe::Label::{Benign, Malicious};
use safe_fedllm::probe::eval::{
    Evaluation, brier_score, expected_calibration_error, roc_auc, stratified_group_k_fold,
};
use safe_fedllm::probe::synthetic::SyntheticConfig;
use safe_fedllm::probe::{
    CalibratedParams, Label, LinearProbe, LogisticParams, Platt, Probe, ProbeBuilder, Threshold,
    Trainer, choose_threshold,
};

/// Deterministic pseudo-random stream for the tests' own data.
fn lcg(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Synthetic features of known separation, in runs of 8 consecutive
/// samples (one group each); the first `train` rows train, the rest are
/// held out.
fn grouped_data(
    rows: usize,
    dim: usize,
    separation: f64,
    seed: u64,
) -> (ndarray::Array2<f32>, Vec<Label>, Vec<usize>) {
    let (x, labels) = SyntheticConfig::new(rows, dim)
        .separation(separation)
        .noise(1.0)
        .rank(4)
        .seed(seed)
        .generate()
        .unwrap();
    let groups = (0..rows).map(|i| i / 8).collect();
    (x, labels, groups)
}

// ------------------------------------------------------------ calibration

#[test]
fn calibrated_probe_has_held_out_ece_at_most_0_05() {
    let (x, labels, groups) = grouped_data(4_000, 48, 1.0, 11);
    let train = 2_400;
    let model = CalibratedParams::default()
        .fit_grouped(
            x.slice(s![..train, ..]),
            &labels[..train],
            Some(&groups[..train]),
        )
        .unwrap();
    let held_out = model.probabilities(x.slice(s![train.., ..])).unwrap();
    let truth = &labels[train..];
    let ece = expected_calibration_error(&held_out, truth, 10).unwrap();
    let auc = roc_auc(&held_out, truth).unwrap();
    let report = model.calibration.as_ref().unwrap();
    eprintln!(
        "held-out ECE {ece:.4}, AUC {auc:.4}; OOF ECE {:.4} (uncalibrated {:.4}), C {}",
        report.oof_ece, report.oof_ece_uncalibrated, report.c
    );
    assert!(
        auc > 0.8 && auc < 0.999,
        "separation not as intended: {auc}"
    );
    assert!(ece <= 0.05, "held-out ECE {ece}");
    assert!(report.oof_ece <= 0.05, "OOF ECE {}", report.oof_ece);
}

#[test]
fn calibration_repairs_an_over_regularised_probe() {
    // One C, far too small: raw scores crowd around 0.5 (the issue's
    // symptom); the Platt map must spread them out.
    let (x, labels, groups) = grouped_data(1_200, 32, 2.0, 3);
    let model = CalibratedParams::default()
        .c_grid(vec![0.001])
        .fit_grouped(x.view(), &labels, Some(&groups))
        .unwrap();
    let report = model.calibration.unwrap();
    assert_eq!(report.c, 0.001);
    assert!(report.platt.a > 1.0, "slope {}", report.platt.a);
    assert!(
        report.oof_ece_uncalibrated > 0.15,
        "{}",
        report.oof_ece_uncalibrated
    );
    assert!(report.oof_ece < 0.05, "{}", report.oof_ece);
}

#[test]
fn platt_recovers_a_known_map() {
    let mut uniform = lcg(5);
    let (a, b) = (2.0, -1.0);
    let z: Vec<f64> = (0..20_000).map(|_| uniform() * 6.0 - 3.0).collect();
    let labels: Vec<Label> = z
        .iter()
        .map(|&z| {
            if uniform() < sigmoid(a * z + b) {
                Malicious
            } else {
                Benign
            }
        })
        .collect();
    let platt = Platt::fit(&z, &labels).unwrap();
    assert!((platt.a - a).abs() < 0.1, "a = {}", platt.a);
    assert!((platt.b - b).abs() < 0.1, "b = {}", platt.b);
}

#[test]
fn platt_folding_scores_as_sigma_of_the_uncalibrated_logit() {
    let (x, labels) = SyntheticConfig::new(300, 16).seed(2).generate().unwrap();
    let plain = LogisticParams::default().fit(x.view(), &labels).unwrap();
    let platt = Platt { a: 3.7, b: -0.9 };
    let (weights, bias) = platt.fold(&plain.weights, plain.bias);
    let folded = safe_fedllm::probe::LinearModel {
        weights,
        bias,
        ..plain.clone()
    };
    let folded_scores = folded.probabilities(x.view()).unwrap();
    for (row, folded) in x.rows().into_iter().zip(folded_scores) {
        let z: f64 = row
            .iter()
            .zip(&plain.weights)
            .map(|(&x, &w)| f64::from(x) * f64::from(w))
            .sum::<f64>()
            + f64::from(plain.bias);
        let expected = platt.probability(z) as f32;
        assert!((folded - expected).abs() < 1e-5, "{folded} vs {expected}");
    }
}

#[test]
fn calibrated_fit_equals_the_refit_model_with_its_platt_map() {
    // The model a calibrated fit returns is the plain refit at the chosen C
    // with the reported Platt map folded in.
    let (x, labels, groups) = grouped_data(400, 16, 1.5, 8);
    // Tight tolerance: the refit is warm-started, the reference is not.
    let tight = LogisticParams::default()
        .tolerance(1e-9)
        .max_iterations(2_000);
    let model = CalibratedParams::default()
        .base(tight.clone())
        .c_grid(vec![0.5])
        .fit_grouped(x.view(), &labels, Some(&groups))
        .unwrap();
    let report = model.calibration.clone().unwrap();
    let plain = tight.c(0.5).fit(x.view(), &labels).unwrap();
    let plain_z: Vec<f64> = plain
        .probabilities(x.view())
        .unwrap()
        .iter()
        .map(|&p| (f64::from(p) / (1.0 - f64::from(p))).ln())
        .collect();
    let calibrated = model.probabilities(x.view()).unwrap();
    for (z, p) in plain_z.iter().zip(calibrated) {
        let expected = report.platt.probability(*z) as f32;
        assert!((p - expected).abs() < 1e-4, "{p} vs {expected}");
    }
}

// ------------------------------------------------------------ group folds

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn group_folds_never_split_a_group(
        rows in prop::collection::vec((0usize..12, any::<bool>()), 6..80),
        k in 2usize..5,
        seed in any::<u64>(),
    ) {
        let groups: Vec<usize> = rows.iter().map(|r| r.0 * 7919).collect();
        let labels: Vec<Label> = rows.iter().map(|r| if r.1 { Malicious } else { Benign }).collect();
        let distinct = {
            let mut g = groups.clone();
            g.sort_unstable();
            g.dedup();
            g.len()
        };
        match stratified_group_k_fold(&labels, &groups, k, seed) {
            Err(Error::InvalidParameter { name: "k", .. }) => prop_assert!(distinct < k),
            Err(other) => prop_assert!(false, "unexpected error {other}"),
            Ok(folds) => {
                prop_assert_eq!(folds.len(), k);
                let mut tested = vec![0usize; labels.len()];
                for fold in &folds {
                    for &i in &fold.test {
                        tested[i] += 1;
                        prop_assert!(!fold.train.contains(&i));
                    }
                    prop_assert_eq!(fold.train.len() + fold.test.len(), labels.len());
                    // No group on both sides of a fold.
                    for &i in &fold.test {
                        prop_assert!(fold.train.iter().all(|&j| groups[j] != groups[i]));
                    }
                    prop_assert!(!fold.test.is_empty());
                }
                prop_assert!(tested.iter().all(|&t| t == 1));
            }
        }
    }

    #[test]
    fn target_fpr_threshold_respects_the_budget(
        scored in prop::collection::vec((0.0f32..1.0, any::<bool>()), 2..200),
        target in 0.0f64..0.5,
    ) {
        let scores: Vec<f32> = scored.iter().map(|s| s.0).collect();
        let labels: Vec<Label> = scored.iter().map(|s| if s.1 { Malicious } else { Benign }).collect();
        let report = choose_threshold(&scores, &labels, Threshold::TargetFpr(target)).unwrap();
        let benign = labels.iter().filter(|l| !l.is_malicious()).count();
        let false_positives = scores.iter().zip(&labels)
            .filter(|(s, l)| !l.is_malicious() && **s >= report.threshold)
            .count();
        prop_assert!(report.false_positive_rate <= target + 1e-12);
        if benign > 0 {
            prop_assert!(false_positives as f64 / benign as f64 <= target + 1e-12);
        }
        // The most recall the budget allows: lowering τ to the next score
        // below it would break the budget (or there is no such score).
        let below = scores.iter().copied().filter(|&s| s < report.threshold).fold(None, |m: Option<f32>, s| Some(m.map_or(s, |m| m.max(s))));
        if let Some(next) = below {
            let fp = scores.iter().zip(&labels).filter(|(s, l)| !l.is_malicious() && **s >= next).count();
            prop_assert!(benign > 0 && fp as f64 / benign as f64 > target);
        }
        // τ sits between scores, at the reported margin.
        let nearest = scores.iter().map(|&s| (f64::from(s) - f64::from(report.threshold)).abs()).fold(f64::INFINITY, f64::min);
        prop_assert!((nearest - report.margin).abs() < 1e-12);
    }
}

#[test]
fn group_folds_keep_class_ratios_close() {
    let labels: Vec<Label> = (0..200)
        .map(|i| if i % 10 < 3 { Malicious } else { Benign })
        .collect();
    let groups: Vec<usize> = (0..200).map(|i| i / 5).collect();
    let folds = stratified_group_k_fold(&labels, &groups, 5, 1).unwrap();
    for fold in folds {
        let malicious = fold
            .test
            .iter()
            .filter(|&&i| labels[i].is_malicious())
            .count();
        let share = malicious as f64 / fold.test.len() as f64;
        assert!((share - 0.3).abs() < 0.1, "fold share {share}");
    }
}

#[test]
fn a_fold_without_a_malicious_training_sample_is_a_typed_error() {
    // All malicious samples in one group: the fold that tests it trains on
    // none.
    let (x, _) = SyntheticConfig::new(40, 8).seed(1).generate().unwrap();
    let labels: Vec<Label> = (0..40)
        .map(|i| if i < 5 { Malicious } else { Benign })
        .collect();
    let groups: Vec<usize> = (0..40).map(|i| if i < 5 { 0 } else { i }).collect();
    let err = CalibratedParams::default()
        .fit_grouped(x.view(), &labels, Some(&groups))
        .unwrap_err();
    assert!(
        matches!(err, Error::CalibrationFailed { ref detail } if detail.contains("0 malicious")),
        "{err}"
    );
}

#[test]
fn target_fpr_fit_reports_oof_rates_and_margin() {
    let (x, labels, groups) = grouped_data(800, 24, 1.0, 21);
    let model = CalibratedParams::default()
        .threshold(Threshold::TargetFpr(0.05))
        .fit_grouped(x.view(), &labels, Some(&groups))
        .unwrap();
    let t = model.calibration.unwrap().threshold;
    assert!(t.false_positive_rate <= 0.05);
    assert!(t.recall > 0.0 && t.recall <= 1.0);
    assert!(t.margin > 0.0);
    let negatives = t.confusion.false_positives + t.confusion.true_negatives;
    assert_eq!(
        t.false_positive_rate,
        t.confusion.false_positives as f64 / negatives as f64
    );
}

#[test]
fn max_f1_threshold_leaves_a_margin() {
    let scores = [0.1, 0.3, 0.62, 0.8, 0.9];
    let labels = [Benign, Benign, Malicious, Malicious, Malicious];
    let report = choose_threshold(&scores, &labels, Threshold::MaxF1).unwrap();
    // Same decisions as τ = 0.62, but midway to the benign 0.3.
    assert!((report.threshold - 0.46).abs() < 1e-6);
    assert_eq!(report.recall, 1.0);
    assert_eq!(report.false_positive_rate, 0.0);
    assert!((report.margin - 0.16).abs() < 1e-6);
}

#[test]
fn threshold_policies_parse_and_reject_nonsense() {
    assert_eq!(
        "fixed:0.8".parse::<Threshold>().unwrap(),
        Threshold::Fixed(0.8)
    );
    assert_eq!(
        "target-fpr:0.05".parse::<Threshold>().unwrap(),
        Threshold::TargetFpr(0.05)
    );
    assert_eq!("max-f1".parse::<Threshold>().unwrap(), Threshold::MaxF1);
    for bad in [
        "fixed:1.5",
        "fixed:NaN",
        "target-fpr:-0.1",
        "maxf1",
        "fixed",
        "",
    ] {
        assert!(
            matches!(
                bad.parse::<Threshold>(),
                Err(Error::InvalidParameter {
                    name: "threshold_policy",
                    ..
                })
            ),
            "{bad}"
        );
    }
}

#[test]
fn bad_calibration_settings_are_typed_errors() {
    let (x, labels) = SyntheticConfig::new(60, 8).seed(1).generate().unwrap();
    for (params, name) in [
        (CalibratedParams::default().c_grid(vec![]), "c_grid"),
        (
            CalibratedParams::default().c_grid(vec![1.0, f64::NAN]),
            "c_grid",
        ),
        (CalibratedParams::default().c_grid(vec![-1.0]), "c_grid"),
        (CalibratedParams::default().folds(1), "folds"),
        (
            CalibratedParams::default().threshold(Threshold::Fixed(2.0)),
            "threshold",
        ),
        (
            CalibratedParams::default().threshold(Threshold::TargetFpr(f64::INFINITY)),
            "threshold",
        ),
    ] {
        let err = params.fit(x.view(), &labels).unwrap_err();
        assert!(
            matches!(err, Error::InvalidParameter { name: n, .. } if n == name),
            "{name}: {err}"
        );
    }
    let mut poisoned = x.clone();
    poisoned[[3, 2]] = f32::NAN;
    assert!(matches!(
        CalibratedParams::default().fit(poisoned.view(), &labels),
        Err(Error::NonFiniteFeature {
            row: 3,
            column: 2,
            ..
        })
    ));
    let err = CalibratedParams::default()
        .fit_grouped(x.view(), &labels, Some(&[0, 1]))
        .unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { .. }), "{err}");
}

// ------------------------------------------------------------ metrics

#[test]
fn ece_and_brier_match_hand_computation() {
    let scores = [0.05, 0.15, 0.55, 0.65, 0.95];
    let labels = [Benign, Malicious, Benign, Malicious, Malicious];
    // Two bins of width 0.5: [0, 0.5) holds 0.05, 0.15 (mean 0.1, 1/2 malicious);
    // [0.5, 1] holds 0.55, 0.65, 0.95 (mean 0.7167, 2/3 malicious).
    let expected = 0.4 * (0.1f64 - 0.5).abs() + 0.6 * (0.716_666_7f64 - 2.0 / 3.0).abs();
    let ece = expected_calibration_error(&scores, &labels, 2).unwrap();
    assert!((ece - expected).abs() < 1e-6, "{ece} vs {expected}");
    let brier_expected =
        (0.05f64.powi(2) + 0.85f64.powi(2) + 0.55f64.powi(2) + 0.35f64.powi(2) + 0.05f64.powi(2))
            / 5.0;
    assert!((brier_score(&scores, &labels).unwrap() - brier_expected).abs() < 1e-6);
    assert!(expected_calibration_error(&[1.5, 0.2], &[Benign, Malicious], 10).is_err());
    assert!(expected_calibration_error(&scores, &labels, 0).is_err());
    let evaluation = Evaluation::new(&scores, &labels, 0.6).unwrap();
    assert_eq!(evaluation.samples, 5);
    assert_eq!(evaluation.ece_bins, 10);
    assert!((evaluation.accuracy - 0.8).abs() < 1e-12);
    assert!((evaluation.brier - brier_expected).abs() < 1e-6);
}

// ------------------------------------------------------------ builder and persistence

fn tiny_deltas(n: usize) -> (Vec<LoraDelta>, Vec<Label>, Vec<usize>) {
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let (x, labels) = SyntheticConfig::new(n, 8)
        .separation(2.0)
        .noise(1.0)
        .rank(2)
        .seed(9)
        .generate()
        .unwrap();
    let deltas = x
        .rows()
        .into_iter()
        .map(|row| {
            let mut adapter = LoraAdapter::new();
            adapter
                .insert(key, LoraTensor::new("b", [8, 1], row.to_vec()).unwrap())
                .unwrap();
            LoraDelta::from_adapter(adapter)
        })
        .collect();
    let groups = (0..n).map(|i| i / 4).collect();
    (deltas, labels, groups)
}

#[test]
fn builder_takes_the_policy_threshold_and_persists_the_report() {
    let (deltas, labels, groups) = tiny_deltas(160);
    let probe = ProbeBuilder::new(CalibratedParams::default().threshold(Threshold::MaxF1))
        .features(FeatureConfig::new(Selection::FirstLayerB))
        .fit_grouped(&deltas, &labels, Some(&groups))
        .unwrap();
    let report = probe.info().calibration.clone().unwrap();
    assert_eq!(probe.threshold(), report.threshold.threshold);
    assert_eq!(report.groups, 40);
    let reloaded = LinearProbe::from_bytes(&probe.to_bytes().unwrap()).unwrap();
    assert_eq!(reloaded, probe);
    // An explicit threshold wins over the policy.
    let fixed = ProbeBuilder::new(CalibratedParams::default())
        .threshold(0.3)
        .fit_grouped(&deltas, &labels, Some(&groups))
        .unwrap();
    assert_eq!(fixed.threshold(), 0.3);
    // A plain trainer keeps the default threshold and has no report.
    let plain = ProbeBuilder::new(LogisticParams::default())
        .fit(&deltas, &labels)
        .unwrap();
    assert_eq!(plain.threshold(), 0.8);
    assert!(plain.info().calibration.is_none());
}
