//! Aggregators on a Llama-3.1-8B-shaped round: n = 20 clients, LoRA r = 8 on
//! q_proj (4096→4096) and v_proj (4096→1024) of 32 layers, d = 3,407,872.
//!
//! Run: `cargo bench --bench aggregate` (filters: `-- n20`, `-- scaling_n`,
//! `-- scaling_d`, `-- read_once`, `-- many_clients`). Every Gram rule (Krum,
//! Multi-Krum, Bulyan, geometric median, FoolsGold, FLAME) is in `n20`; the
//! `many_clients` group runs the Gram rules that scale to thousands of
//! clients on a 1,024-value adapter in 64 tensors of 16 (n = 1,000, and
//! Krum at n = 10,000, whose Gram matrix alone is 800 MB). The Flower peer on the *same* inputs:
//! `python3 scripts/bench_aggregate_flower.py` (same counter-based generator).
//!
//! Peak memory: a counting global allocator records the largest number of
//! bytes allocated during one call on top of what was live before it (the
//! inputs); printed once per rule as `peak_alloc`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rayon::prelude::*;
use safe_fedllm::aggregate::{
    Aggregator, Bulyan, ClientUpdate, ClipBound, CoordinateMedian, DnC, FedAvg, Flame, FoolsGold,
    GeometricMedian, Krum, MultiKrum, NormClipping, Trim, TrimmedMean,
};
use safe_fedllm::lora::{LoraAdapter, LoraTensor};
use safe_fedllm::rng::mix64;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const HIDDEN: usize = 4096;
const KV: usize = 1024;
const RANK: usize = 8;

/// Value `i` (flat index in sorted key order) of stream `s`: uniform in
/// [-0.01, 0.01). `scripts/bench_aggregate_flower.py` computes the same.
fn value(s: u64, i: u64) -> f32 {
    ((mix64((s << 32) + i) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
}

/// Stream 0 is the global adapter; client c adds stream c + 1 to it.
fn adapter(layers: usize, stream: u64, global: Option<&LoraAdapter>) -> LoraAdapter {
    let mut shapes = Vec::new();
    for layer in 0..layers {
        for (module, out) in [("q_proj", HIDDEN), ("v_proj", KV)] {
            let path = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            shapes.push((format!("{path}.lora_A.weight"), [RANK, HIDDEN]));
            shapes.push((format!("{path}.lora_B.weight"), [out, RANK]));
        }
    }
    shapes.sort();
    let mut out = LoraAdapter::new();
    let mut offset = 0u64;
    for (key, shape) in shapes {
        let len = shape[0] * shape[1];
        let base = global.and_then(|g| g.get(&key)).map(|t| t.as_slice());
        let values: Vec<f32> = (0..len)
            .map(|k| value(stream, offset + k as u64) + base.map_or(0.0, |b| b[k]))
            .collect();
        out.insert(&key, LoraTensor::new(&key, shape, values).unwrap())
            .unwrap();
        offset += len as u64;
    }
    out
}

struct Round {
    global: LoraAdapter,
    clients: Vec<LoraAdapter>,
}

impl Round {
    fn new(n: usize, layers: usize) -> Round {
        let global = adapter(layers, 0, None);
        let clients = (0..n)
            .map(|c| adapter(layers, c as u64 + 1, Some(&global)))
            .collect();
        Round { global, clients }
    }

    fn updates(&self) -> Vec<ClientUpdate<'_>> {
        self.clients
            .iter()
            .enumerate()
            .map(|(i, a)| ClientUpdate::new(format!("c{i}"), a, 100 + i as u64))
            .collect()
    }

    fn bytes(&self) -> u64 {
        (self.clients.len() * self.global.num_params() * 4) as u64
    }
}

fn rules(n: usize) -> Vec<(&'static str, Box<dyn Aggregator>)> {
    let f = (n - 3) / 4; // largest f Bulyan accepts
    vec![
        ("fedavg", Box::new(FedAvg::new())),
        ("median", Box::new(CoordinateMedian::new())),
        (
            "trimmed_mean",
            Box::new(TrimmedMean::new(Trim::Fraction(0.1)).unwrap()),
        ),
        ("krum", Box::new(Krum::new(f).unwrap())),
        ("multi_krum", Box::new(MultiKrum::new(f, n - f).unwrap())),
        ("bulyan", Box::new(Bulyan::new(f).unwrap())),
        ("geometric_median", Box::new(GeometricMedian::new())),
        (
            "norm_clipping",
            Box::new(NormClipping::new(ClipBound::MedianNorm).unwrap()),
        ),
        ("foolsgold", Box::new(FoolsGold::new())),
        ("flame", Box::new(Flame::new())),
        ("dnc", Box::new(DnC::new(f).unwrap())),
    ]
}

/// Bytes allocated at peak during one call, above what was live before it.
fn peak_alloc(rule: &mut dyn Aggregator, round: &Round) -> usize {
    let updates = round.updates();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = rule.aggregate(&round.global, &updates).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    drop(result);
    peak
}

/// Reading every client's values once on the rayon pool: the floor for
/// FedAvg. It runs on the same pool as the rules (rayon's global pool, sized
/// by `RAYON_NUM_THREADS`), so `scripts/bench_threads.sh` scales the floor
/// and the rules together and the ratio rule / floor stays meaningful.
fn read_once(round: &Round) -> f32 {
    let slices: Vec<&[f32]> = round
        .clients
        .iter()
        .flat_map(|a| a.iter().map(|e| e.tensor.as_slice()))
        .collect();
    slices
        .par_iter()
        .map(|sl| {
            let mut acc = [0.0f32; 16];
            for c in sl.chunks_exact(16) {
                for k in 0..16 {
                    acc[k] += c[k];
                }
            }
            acc.iter().sum::<f32>()
        })
        .sum()
}

fn n20(c: &mut Criterion) {
    let round = Round::new(20, 32);
    let mut group = c.benchmark_group("n20_d3407872");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(round.bytes()));
    group.bench_function("read_once", |b| b.iter(|| black_box(read_once(&round))));
    for (name, mut rule) in rules(20) {
        eprintln!(
            "peak_alloc n=20 d=3407872 {name}: {:.1} MB (inputs {:.1} MB)",
            peak_alloc(rule.as_mut(), &round) as f64 / 1e6,
            round.bytes() as f64 / 1e6
        );
        if name == "foolsgold" {
            // Stateful. `foolsgold` below reuses the rule, whose histories
            // exist from the call above: a round of clients the server has
            // seen before. This measures a server's first round, where every
            // history is allocated (and page-faulted in) fresh.
            group.bench_function("foolsgold_first_round", |b| {
                b.iter(|| {
                    let updates = round.updates();
                    black_box(FoolsGold::new().aggregate(&round.global, &updates).unwrap())
                })
            });
        }
        group.bench_function(name, |b| {
            b.iter(|| {
                let updates = round.updates();
                black_box(rule.aggregate(&round.global, &updates).unwrap())
            })
        });
    }
    group.finish();
}

fn scaling(c: &mut Criterion) {
    const SCALED: [&str; 4] = ["fedavg", "median", "krum", "bulyan"];
    let mut group = c.benchmark_group("scaling_n_d851968");
    group.sample_size(10);
    for n in [5, 10, 20, 50, 100] {
        let round = Round::new(n, 8);
        for (name, mut rule) in rules(n).into_iter().filter(|(r, _)| SCALED.contains(r)) {
            group.bench_with_input(BenchmarkId::new(name, n), &round, |b, round| {
                b.iter(|| {
                    let updates = round.updates();
                    black_box(rule.aggregate(&round.global, &updates).unwrap())
                })
            });
        }
    }
    group.finish();
    let mut group = c.benchmark_group("scaling_d_n20");
    group.sample_size(10);
    for layers in [4, 8, 16, 32] {
        let round = Round::new(20, layers);
        let d = round.global.num_params();
        for (name, mut rule) in rules(20).into_iter().filter(|(r, _)| SCALED.contains(r)) {
            group.bench_with_input(BenchmarkId::new(name, d), &round, |b, round| {
                b.iter(|| {
                    let updates = round.updates();
                    black_box(rule.aggregate(&round.global, &updates).unwrap())
                })
            });
        }
    }
    group.finish();
}

/// n clients of a 1,024-value adapter in 64 tensors of 16 values: the Gram
/// rules' many-client shape (tiny tensors, large n × n).
fn many_clients_round(n: usize) -> Round {
    let mut shapes = Vec::new();
    for layer in 0..32 {
        for ab in ["lora_A", "lora_B"] {
            let key = format!("base_model.model.model.layers.{layer}.self_attn.q_proj.{ab}.weight");
            shapes.push((key, [2, 8]));
        }
    }
    shapes.sort();
    let make = |stream: u64, global: Option<&LoraAdapter>| {
        let mut out = LoraAdapter::new();
        let mut offset = 0u64;
        for (key, shape) in &shapes {
            let len = shape[0] * shape[1];
            let base = global.and_then(|g| g.get(key)).map(|t| t.as_slice());
            let values: Vec<f32> = (0..len)
                .map(|k| value(stream, offset + k as u64) + base.map_or(0.0, |b| b[k]))
                .collect();
            out.insert(key, LoraTensor::new(key, *shape, values).unwrap())
                .unwrap();
            offset += len as u64;
        }
        out
    };
    let global = make(0, None);
    let clients = (0..n).map(|c| make(c as u64 + 1, Some(&global))).collect();
    Round { global, clients }
}

fn many_clients(c: &mut Criterion) {
    let mut group = c.benchmark_group("many_clients_d1024");
    group.sample_size(10);
    for n in [1000usize, 10_000] {
        let round = many_clients_round(n);
        let f = (n - 3) / 4;
        let mut rules: Vec<(&str, Box<dyn Aggregator>)> =
            vec![("krum", Box::new(Krum::new(f).unwrap()))];
        if n <= 1000 {
            rules.push(("multi_krum", Box::new(MultiKrum::new(f, n - f).unwrap())));
            rules.push(("foolsgold", Box::new(FoolsGold::new())));
        }
        for (name, mut rule) in rules {
            eprintln!(
                "peak_alloc n={n} d=1024 {name}: {:.1} MB",
                peak_alloc(rule.as_mut(), &round) as f64 / 1e6
            );
            group.bench_with_input(BenchmarkId::new(name, n), &round, |b, round| {
                b.iter(|| {
                    let updates = round.updates();
                    if name == "foolsgold" {
                        return black_box(
                            FoolsGold::new().aggregate(&round.global, &updates).unwrap(),
                        );
                    }
                    black_box(rule.aggregate(&round.global, &updates).unwrap())
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, n20, scaling, many_clients);
criterion_main!(benches);
