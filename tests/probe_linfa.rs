//! linfa trainers (feature `linfa`): scores are P(malicious) whichever class
//! linfa calls positive. linfa-logistic makes the *more frequent* label its
//! positive class, so 1:9 and 9:1 exercise both of its conventions.
#![cfg(feature = "linfa")]

use safe_fedllm::Error;
use safe_fedllm::probe::eval::roc_auc;
use safe_fedllm::probe::synthetic::SyntheticConfig;
use safe_fedllm::probe::{Label, LinfaLogistic, LinfaSvm, Trainer};

fn data(malicious_fraction: f64, seed: u64) -> (ndarray::Array2<f32>, Vec<Label>) {
    SyntheticConfig::new(60, 8)
        .separation(3.0)
        .noise(1.0)
        .rank(3)
        .malicious_fraction(malicious_fraction)
        .seed(seed)
        .generate()
        .unwrap()
}

fn check_orientation(trainer: &impl Trainer, malicious_fraction: f64) {
    let (x, y) = data(malicious_fraction, 21);
    let model = trainer.fit(x.view(), &y).unwrap();
    let scores = model.probabilities(x.view()).unwrap();
    let mean = |class: Label| {
        let s: Vec<f32> = scores
            .iter()
            .zip(&y)
            .filter(|(_, l)| **l == class)
            .map(|(s, _)| *s)
            .collect();
        s.iter().sum::<f32>() / s.len() as f32
    };
    assert!(
        mean(Label::Malicious) > mean(Label::Benign),
        "fraction {malicious_fraction}"
    );
    assert!(
        roc_auc(&scores, &y).unwrap() > 0.9,
        "fraction {malicious_fraction}"
    );
}

#[test]
fn linfa_logistic_scores_p_malicious_at_one_to_nine_and_nine_to_one() {
    for fraction in [0.1, 0.9] {
        check_orientation(
            &LinfaLogistic {
                alpha: 0.1,
                ..LinfaLogistic::default()
            },
            fraction,
        );
    }
}

#[test]
fn linfa_svm_scores_p_malicious_at_one_to_nine_and_nine_to_one() {
    for fraction in [0.1, 0.9] {
        check_orientation(&LinfaSvm::default(), fraction);
    }
}

#[test]
fn linfa_settings_are_validated() {
    let (x, y) = data(0.5, 22);
    let err = LinfaLogistic {
        alpha: -1.0,
        ..LinfaLogistic::default()
    }
    .fit(x.view(), &y)
    .unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { name: "alpha", .. }));
    let err = LinfaSvm {
        c: 0.0,
        ..LinfaSvm::default()
    }
    .fit(x.view(), &y)
    .unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { name: "c", .. }));
    let err = LinfaSvm::default()
        .fit(x.view(), &[Label::Benign; 60])
        .unwrap_err();
    assert!(matches!(err, Error::MissingClass { .. }));
}
