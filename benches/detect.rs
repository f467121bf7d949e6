//! Detector costs on a Llama-3.1-8B-shaped adapter (32 layers, q_proj
//! 4096→4096 and v_proj 4096→1024, r = 8: 3,407,872 LoRA parameters; the
//! probe reads the first layer's lora_B, 40,960 values).
//!
//! * `detect_step_scoring/10_steps`: one client's round of step-level
//!   evidence — 10 step adapters scored in memory with a `StepRecorder`
//!   (the reference saves every step's delta to a file and reads them back;
//!   `benches/detect_peer.py` times that pipeline on the same shapes).
//! * `detect_assess/<level>`: 20 clients' `assess` calls (10 step scores each).
//! * `detect_round/client_level_fedavg_20`: a whole defended round, 20
//!   clients, client level + weighted FedAvg.
//!
//! Run: `cargo bench --bench detect -- --warm-up-time 1 --measurement-time 5`

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;

use common::{llama8b_adapter, values};
use criterion::{Criterion, criterion_group, criterion_main};
use safe_fedllm::aggregate::FedAvg;
use safe_fedllm::detect::{
    AnyDetector, ClientEvidence, ClientId, ClientLevel, DefenseLevel, Detector,
};
use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{LoraAdapter, LoraDelta};
use safe_fedllm::probe::LinearProbe;
use safe_fedllm::round::{DefendedRound, OwnedReport, StepRecorder, borrow_reports};

const STEPS: usize = 10;
const CLIENTS: usize = 20;

fn probe(base: &LoraAdapter, sample: &LoraAdapter) -> LinearProbe {
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .fit(&[LoraDelta::between(sample, base).unwrap()])
        .unwrap();
    let weights = values(99, spec.dim(), 2.0);
    LinearProbe::new(spec, weights, 0.1).unwrap()
}

fn bench_step_scoring(c: &mut Criterion) {
    let base = llama8b_adapter(1);
    let steps: Vec<LoraAdapter> = (0..STEPS as u64)
        .map(|i| llama8b_adapter(100 + i))
        .collect();
    let probe = probe(&base, &steps[0]);
    let mut group = c.benchmark_group("detect_step_scoring");
    group.sample_size(10);
    group.bench_function("10_steps", |b| {
        b.iter(|| {
            let mut recorder = StepRecorder::new(&probe, &base);
            for step in &steps {
                recorder.record(black_box(step)).unwrap();
            }
            black_box(recorder.finish())
        })
    });
    group.finish();
}

fn bench_assess(c: &mut Criterion) {
    let evidence: Vec<ClientEvidence> = (0..CLIENTS as u64)
        .map(|i| {
            let scores: Vec<f32> = values(i, STEPS, 2.0).iter().map(|v| v.abs()).collect();
            ClientEvidence::new(160)
                .with_steps(scores.clone())
                .with_shadow_steps(scores)
        })
        .collect();
    let ids: Vec<ClientId> = (0..CLIENTS).map(ClientId::from).collect();
    let mut group = c.benchmark_group("detect_assess");
    for level in [
        DefenseLevel::Step,
        DefenseLevel::Client,
        DefenseLevel::Shadow,
        DefenseLevel::Evidence,
    ] {
        let mut detector = AnyDetector::with_defaults(level).unwrap();
        let mut round = 0;
        group.bench_function(format!("{level}_20_clients"), |b| {
            b.iter(|| {
                round = (round + 1) % 10;
                for (id, e) in ids.iter().zip(&evidence) {
                    black_box(detector.assess(round, id, e).unwrap());
                }
            })
        });
    }
    group.finish();
}

fn bench_round(c: &mut Criterion) {
    let global = llama8b_adapter(1);
    let reports: Vec<OwnedReport> = (0..CLIENTS as u64)
        .map(|i| OwnedReport::new(format!("c{i}"), llama8b_adapter(1000 + i), 160))
        .collect();
    let probe = probe(&global, &reports[0].update);
    let detector = ClientLevel::params().build().unwrap();
    let mut round = DefendedRound::new(probe, detector, FedAvg::new());
    let mut group = c.benchmark_group("detect_round");
    group.sample_size(10);
    group.bench_function("client_level_fedavg_20", |b| {
        b.iter(|| black_box(round.run(0, &global, &borrow_reports(&reports)).unwrap()))
    });
    group.finish();
    let out = round.run(0, &global, &borrow_reports(&reports)).unwrap();
    eprintln!(
        "one round: admission {:.4} s, probe {:.4} s, detect {:.6} s, aggregate {:.4} s, total {:.4} s",
        out.timings.admission_s,
        out.timings.probe_s,
        out.timings.detect_s,
        out.timings.aggregate_s,
        out.timings.total_s
    );
}

criterion_group!(benches, bench_step_scoring, bench_assess, bench_round);
criterion_main!(benches);
