//! Feature extraction straight from safetensors bytes for a Llama-3.1-8B-shaped
//! adapter (32 layers, q_proj 4096→4096 and v_proj 4096→1024, r = 8:
//! 3,407,872 LoRA parameters), next to the machine's plain memory-read rate.
//!
//! Run: `cargo bench --bench features`
//! Throughput is reported in bytes of the update's safetensors file per second.

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;

use common::llama8b_adapter;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use safe_fedllm::features::{FeatureConfig, FeatureSpec, Selection};
use safe_fedllm::lora::{AdapterView, LazyDelta, LoraAdapter, LoraDelta, StorageDtype};

fn extract(bytes: &[u8], base: &LoraAdapter, spec: &FeatureSpec, out: &mut [f32]) {
    let view = AdapterView::parse(bytes).unwrap();
    let delta = LazyDelta::new(&view, base).unwrap();
    spec.transform_into(&delta, out).unwrap();
}

fn memory_read(c: &mut Criterion, name: &str, len_bytes: usize) {
    let words = vec![1u64; len_bytes / 8];
    let mut group = c.benchmark_group("memory_read");
    group.throughput(Throughput::Bytes((words.len() * 8) as u64));
    group.bench_function(name, |b| {
        b.iter(|| {
            black_box(&words)
                .iter()
                .fold(0u64, |acc, &w| acc.wrapping_add(w))
        })
    });
    group.finish();
}

fn bench(c: &mut Criterion) {
    let base = llama8b_adapter(1);
    let update = llama8b_adapter(2);
    assert_eq!(update.num_params(), 3_407_872);
    let delta = LoraDelta::between(&update, &base).unwrap();
    let specs = [
        (
            "first_layer_b",
            FeatureConfig::new(Selection::FirstLayerB)
                .fit(&[&delta])
                .unwrap(),
        ),
        (
            "all_layers",
            FeatureConfig::new(Selection::AllLayers)
                .fit(&[&delta])
                .unwrap(),
        ),
    ];
    let mut f32_len = 0;
    for (dtype_name, dtype) in [("bf16", StorageDtype::Bf16), ("f32", StorageDtype::F32)] {
        let bytes = update.to_bytes(dtype).unwrap();
        if dtype == StorageDtype::F32 {
            f32_len = bytes.len();
        }
        c.bench_function(&format!("parse_header_only_{dtype_name}"), |b| {
            b.iter(|| AdapterView::parse(black_box(&bytes)).unwrap().len())
        });
        c.bench_function(&format!("safetensors_read_metadata_{dtype_name}"), |b| {
            b.iter(|| {
                safetensors::SafeTensors::read_metadata(black_box(&bytes))
                    .unwrap()
                    .0
            })
        });
        c.bench_function(&format!("parse_and_pair_{dtype_name}"), |b| {
            b.iter(|| {
                let view = AdapterView::parse(black_box(&bytes)).unwrap();
                LazyDelta::new(&view, &base).is_ok()
            })
        });
        let mut group = c.benchmark_group(format!("extract_{dtype_name}"));
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        for (spec_name, spec) in &specs {
            let mut out = vec![0.0f32; spec.dim()];
            group.bench_function(*spec_name, |b| {
                b.iter(|| extract(black_box(&bytes), &base, spec, &mut out))
            });
        }
        group.finish();
    }
    memory_read(c, "same_size_as_f32_file", f32_len);
    memory_read(c, "256MiB", 256 << 20);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
