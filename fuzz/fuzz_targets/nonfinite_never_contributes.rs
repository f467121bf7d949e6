//! Invariant: a client holding a NaN or ±∞ never contributes. For FedAvg and
//! the coordinate median, the round with such clients equals (bit for bit)
//! the round without them, and they are excluded by name.
#![no_main]

mod common;

use common::{Bytes, adapter, flat};
use libfuzzer_sys::fuzz_target;
use safe_fedllm::aggregate::{
    Aggregation, Aggregator, ClientUpdate, CoordinateMedian, ExclusionReason, FedAvg,
};
use safe_fedllm::lora::LoraAdapter;

fn check(
    rule: &mut dyn Aggregator,
    global: &LoraAdapter,
    all: &[ClientUpdate<'_>],
    finite: &[ClientUpdate<'_>],
) {
    let with = rule.aggregate(global, all);
    let without = if finite.is_empty() {
        None
    } else {
        Some(rule.aggregate(global, finite))
    };
    let Ok(with) = with else {
        // An error must not depend on the non-finite clients either.
        if let Some(without) = without {
            assert!(
                without.is_err(),
                "error only with non-finite clients: {with:?}"
            );
        }
        return;
    };
    for u in all {
        if !finite.iter().any(|f| f.client == u.client) {
            assert!(
                with.contribution(u.client.as_str()).is_none(),
                "{} contributed",
                u.client
            );
            let exclusion = with.exclusion(u.client.as_str()).expect("excluded");
            assert!(matches!(
                exclusion.reason,
                ExclusionReason::NonFinite { .. }
            ));
        }
    }
    let Some(without) = without else {
        assert!(with.is_skipped(), "no finite client, yet {with:?}");
        return;
    };
    let without: Aggregation = without.expect("the finite clients alone aggregate");
    assert_eq!(with.is_skipped(), without.is_skipped());
    if let (Some(a), Some(b)) = (with.new_global(), without.new_global()) {
        let (a, b) = (flat(a), flat(b));
        assert!(a.iter().all(|v| !v.is_nan()), "{a:?}");
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{a:?} != {b:?}"
        );
    }
    assert_eq!(with.contributions, without.contributions);
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let global = adapter([0.0, 0.5, -0.5, 0.25]);
    let n = 1 + usize::from(bytes.u8() % 6);
    let adapters: Vec<LoraAdapter> = (0..n)
        .map(|_| adapter([bytes.f32(), bytes.f32(), bytes.f32(), bytes.f32()]))
        .collect();
    let samples: Vec<u64> = (0..n).map(|_| bytes.count()).collect();
    let factors: Vec<f64> = (0..n).map(|_| f64::from(bytes.u8()) / 255.0).collect();
    let all: Vec<ClientUpdate> = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| {
            ClientUpdate::new(format!("c{i}"), a, samples[i]).with_security_factor(factors[i])
        })
        .collect();
    let finite: Vec<ClientUpdate> = all
        .iter()
        .zip(&adapters)
        .filter(|(_, a)| flat(a).iter().all(|v| v.is_finite()))
        .map(|(u, _)| u.clone())
        .collect();
    check(&mut FedAvg::new(), &global, &all, &finite);
    check(&mut CoordinateMedian::new(), &global, &all, &finite);
});
