//! One aggregation call on the bench round, for instruction counts and
//! profiles (criterion's many iterations are too slow under valgrind).
//!
//! ```text
//! cargo build --release --example aggregate_once
//! RAYON_NUM_THREADS=1 valgrind --tool=callgrind target/release/examples/aggregate_once krum
//! RAYON_NUM_THREADS=1 valgrind --tool=callgrind target/release/examples/aggregate_once none
//! ```
//!
//! The cost of the call is the difference between the rule's total and
//! `none`'s (which builds the same round and aggregates nothing). Rules:
//! `none`, `fedavg`, `krum`, `multi_krum`, `bulyan`, `flame`, `foolsgold`.
//! Rounds: `n20` (default: n = 20, d = 3,407,872 as in `benches/aggregate.rs`)
//! or `bigN` (N clients of a 1,024-value adapter in 64 tensors of 16).

use safe_fedllm::aggregate::{
    Aggregator, Bulyan, ClientUpdate, FedAvg, Flame, FoolsGold, Krum, MultiKrum,
};
use safe_fedllm::lora::{LoraAdapter, LoraTensor};
use safe_fedllm::rng::mix64;

/// The bench's generator: value `i` of stream `s`, uniform in [-0.01, 0.01).
fn value(s: u64, i: u64) -> f32 {
    ((mix64((s << 32) + i) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
}

fn adapter(
    shapes: &[(String, [usize; 2])],
    stream: u64,
    global: Option<&LoraAdapter>,
) -> LoraAdapter {
    let mut out = LoraAdapter::new();
    let mut offset = 0u64;
    for (key, shape) in shapes {
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
}

fn shapes(round: &str) -> (usize, Vec<(String, [usize; 2])>) {
    let mut shapes = Vec::new();
    let n = if round == "n20" {
        for layer in 0..32 {
            for (module, out) in [("q_proj", 4096), ("v_proj", 1024)] {
                let path = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
                shapes.push((format!("{path}.lora_A.weight"), [8, 4096]));
                shapes.push((format!("{path}.lora_B.weight"), [out, 8]));
            }
        }
        20
    } else {
        for layer in 0..32 {
            for ab in ["lora_A", "lora_B"] {
                let key =
                    format!("base_model.model.model.layers.{layer}.self_attn.q_proj.{ab}.weight");
                shapes.push((key, [2, 8]));
            }
        }
        round
            .trim_start_matches("big")
            .parse()
            .expect("bigN: N clients")
    };
    shapes.sort();
    (n, shapes)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rule = args.get(1).map_or("fedavg", String::as_str);
    let round = args.get(2).map_or("n20", String::as_str);
    let (n, shapes) = shapes(round);
    let global = adapter(&shapes, 0, None);
    let clients: Vec<LoraAdapter> = (0..n)
        .map(|c| adapter(&shapes, c as u64 + 1, Some(&global)))
        .collect();
    let updates: Vec<ClientUpdate> = clients
        .iter()
        .enumerate()
        .map(|(i, a)| ClientUpdate::new(format!("c{i}"), a, 100 + i as u64))
        .collect();
    let f = (n - 3) / 4;
    let mut aggregator: Box<dyn Aggregator> = match rule {
        "none" => return,
        "fedavg" => Box::new(FedAvg::new()),
        "krum" => Box::new(Krum::new(f).unwrap()),
        "multi_krum" => Box::new(MultiKrum::new(f, n - f).unwrap()),
        "bulyan" => Box::new(Bulyan::new(f).unwrap()),
        "flame" => Box::new(Flame::new()),
        "foolsgold" => Box::new(FoolsGold::new()),
        other => panic!("unknown rule `{other}`"),
    };
    let start = std::time::Instant::now();
    let result = aggregator.aggregate(&global, &updates).unwrap();
    std::hint::black_box(result);
    eprintln!(
        "{rule} {round}: {:.3} s (one call, wall clock)",
        start.elapsed().as_secs_f64()
    );
}
