//! Property tests of the detectors: factors stay in [0, 1]; more harmful
//! steps never raise a factor; checkpoint / resume gives the same factors.

use proptest::prelude::*;
use safe_fedllm::detect::{
    AnyDetector, ClientEvidence, ClientId, ClientLevel, Detector, EvidenceLevel, MissingEvidence,
    ShadowLevel, StepLevel,
};

/// One assessment: which client, in which round, with what evidence.
#[derive(Debug, Clone)]
struct Call {
    client: u32,
    round: u32,
    evidence: ClientEvidence,
}

fn score() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => 0.0f32..=1.0,
        1 => Just(0.8f32),
        1 => 0.79f32..0.81,
    ]
}

fn evidence() -> impl Strategy<Value = ClientEvidence> {
    (
        0u64..200,
        prop::collection::vec(score(), 0..8),
        prop::collection::vec(score(), 0..8),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(samples, steps, shadow, drop_last, drop_shadow_last)| {
            let mut e = ClientEvidence::new(samples)
                .with_steps(steps)
                .with_shadow_steps(shadow);
            if drop_last {
                e.last_step_score = None;
            }
            if drop_shadow_last {
                e.shadow_last_score = None;
            }
            e
        })
}

/// Calls in non-decreasing round order (rounds may repeat across clients).
fn calls() -> impl Strategy<Value = Vec<Call>> {
    prop::collection::vec((0u32..4, 0u32..2, evidence()), 1..24).prop_map(|raw| {
        let mut round = 0;
        raw.into_iter()
            .map(|(client, advance, evidence)| {
                round += advance;
                Call {
                    client,
                    round,
                    evidence,
                }
            })
            .collect()
    })
}

fn missing() -> impl Strategy<Value = MissingEvidence> {
    prop_oneof![
        Just(MissingEvidence::Benign),
        Just(MissingEvidence::Malicious)
    ]
}

fn detector() -> impl Strategy<Value = AnyDetector> {
    let step = (
        0.0f64..=1.0,
        1u64..20,
        1u64..4,
        prop::option::of(0u32..10),
        0.0f64..0.5,
        missing(),
    )
        .prop_map(|(decay, batch, accum, rounds, min_weight, miss)| {
            StepLevel::params()
                .decay(decay)
                .batch_size(batch)
                .grad_accum(accum)
                .active_rounds(rounds)
                .min_weight(min_weight)
                .missing_steps(miss)
                .build()
                .map(AnyDetector::from)
        });
    let client = (
        0.5f64..20.0,
        0.05f64..0.95,
        prop::option::of(0u32..10),
        0.0f64..0.5,
        missing(),
    )
        .prop_map(|(k, pivot, rounds, min_weight, miss)| {
            ClientLevel::params()
                .steepness(k)
                .pivot(pivot)
                .active_rounds(rounds)
                .min_weight(min_weight)
                .missing_score(miss)
                .build()
                .map(AnyDetector::from)
        });
    let shadow = (0.1f64..12.0, 1u64..20, 0.0f64..0.5, missing()).prop_map(
        |(eta, batch, min_weight, miss)| {
            ShadowLevel::params()
                .eta(eta)
                .batch_size(batch)
                .min_weight(min_weight)
                .missing_steps(miss)
                .build()
                .map(AnyDetector::from)
        },
    );
    let evidence_level = (
        0.1f64..12.0,
        1u64..20,
        1usize..5,
        1u32..6,
        missing(),
        missing(),
    )
        .prop_map(|(eta, batch, min, audit, miss_steps, miss_last)| {
            let shadow = ShadowLevel::params()
                .eta(eta)
                .batch_size(batch)
                .missing_steps(miss_steps);
            EvidenceLevel::params()
                .shadow(shadow)
                .evidence_min(min)
                .audit_interval(audit)
                .missing_last_score(miss_last)
                .build()
                .map(AnyDetector::from)
        });
    prop_oneof![step, client, shadow, evidence_level]
        .prop_map(|d| d.expect("strategies only produce valid settings"))
}

fn run(d: &mut AnyDetector, calls: &[Call]) -> Vec<f64> {
    calls
        .iter()
        .map(|c| {
            d.assess(c.round, &ClientId::from(c.client), &c.evidence)
                .expect("finite evidence is always accepted")
                .factor
        })
        .collect()
}

/// `e` with the steps selected by `mask` (cycled) raised to harmful scores,
/// and the last scores raised when the last step is raised.
fn more_harmful(e: &ClientEvidence, mask: &[bool], tau: f64) -> ClientEvidence {
    let raise = |scores: &[f32]| -> Vec<f32> {
        scores
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                if mask.get(i % mask.len().max(1)).copied().unwrap_or(false) {
                    s.max(tau as f32).max(0.9)
                } else {
                    s
                }
            })
            .collect()
    };
    let mut out = e.clone();
    out.step_scores = raise(&e.step_scores);
    out.shadow_scores = raise(&e.shadow_scores);
    let bump = |last: Option<f32>, steps: &[f32]| last.map(|s| s.max(*steps.last().unwrap_or(&s)));
    out.last_step_score = bump(e.last_step_score, &out.step_scores);
    out.shadow_last_score = bump(e.shadow_last_score, &out.shadow_scores);
    out
}

fn same_verdict_input(a: &ClientEvidence, b: &ClientEvidence, tau: f64) -> bool {
    let verdict = |s: Option<f32>| s.map(|s| f64::from(s) >= tau);
    verdict(a.shadow_last_score) == verdict(b.shadow_last_score)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn factors_stay_in_the_unit_interval(mut d in detector(), calls in calls()) {
        for f in run(&mut d, &calls) {
            prop_assert!((0.0..=1.0).contains(&f), "factor {f}");
        }
    }

    #[test]
    fn more_harmful_steps_never_raise_the_factor(
        d in detector(),
        history in calls(),
        last in evidence(),
        mask in prop::collection::vec(any::<bool>(), 1..8),
    ) {
        let tau = f64::from(last.threshold);
        let harsher = more_harmful(&last, &mask, tau);
        // The evidence level's freeze logic is not monotone across a change
        // of the last-step verdict (documented on `EvidenceLevel`; unit test
        // `a_verdict_flip_can_raise_the_factor`); compare it at an equal verdict.
        if matches!(d, AnyDetector::Evidence(_)) {
            prop_assume!(same_verdict_input(&last, &harsher, tau));
        }
        let (mut a, mut b) = (d.clone(), d);
        run(&mut a, &history);
        run(&mut b, &history);
        let round = history.last().map_or(0, |c| c.round);
        let client = ClientId::from(history.last().map_or(0, |c| c.client));
        let fa = a.assess(round, &client, &last).unwrap().factor;
        let fb = b.assess(round, &client, &harsher).unwrap().factor;
        prop_assert!(fb <= fa, "harsher evidence raised the factor: {fa} -> {fb}");
    }

    #[test]
    fn checkpoint_resume_gives_identical_factors(
        d in detector(),
        calls in calls(),
        cut in any::<prop::sample::Index>(),
    ) {
        let k = cut.index(calls.len() + 1);
        let (head, tail) = calls.split_at(k);
        let mut straight = d.clone();
        let expected = run(&mut straight, &calls);
        let mut first = d;
        let mut got = run(&mut first, head);
        let checkpoint = serde_json::to_string(&first).unwrap();
        let mut resumed: AnyDetector = serde_json::from_str(&checkpoint).unwrap();
        prop_assert_eq!(&resumed, &first);
        got.extend(run(&mut resumed, tail));
        prop_assert_eq!(
            expected.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
            got.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
        );
        prop_assert_eq!(resumed, straight);
    }
}
