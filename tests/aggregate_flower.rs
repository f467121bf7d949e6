//! Aggregators against Flower's numpy implementations.
//!
//! Fixtures: `fixtures/aggregate/flower_*.json`, written by
//! `fixtures/aggregate/generate.py`, which calls Flower's own
//! `flwr.server.strategy.aggregate.{aggregate, aggregate_median,
//! aggregate_trimmed_avg, aggregate_krum, aggregate_bulyan}`.
//! Tolerance: |ours − flower| ≤ 1e-5 + 1e-5·|flower| per coordinate (both sides
//! compute in f32, summing in a different order).

use safe_fedllm::aggregate::{
    Aggregation, Aggregator, Bulyan, ClientUpdate, CoordinateMedian, FedAvg, Krum, MultiKrum, Trim,
    TrimmedMean, Weighting, flatten,
};
use safe_fedllm::lora::{LoraAdapter, LoraTensor};
use serde_json::Value;

mod common;

use common::floats;

struct Fixture {
    json: Value,
    global: LoraAdapter,
    clients: Vec<(String, u64, LoraAdapter)>,
}

fn adapter(keys: &[String], shapes: &[[usize; 2]], values: &[f32]) -> LoraAdapter {
    let mut out = LoraAdapter::new();
    let mut offset = 0;
    for (key, shape) in keys.iter().zip(shapes) {
        let len = shape[0] * shape[1];
        let tensor = LoraTensor::new(key, *shape, values[offset..offset + len].to_vec()).unwrap();
        out.insert(key, tensor).unwrap();
        offset += len;
    }
    assert_eq!(offset, values.len());
    out
}

fn load(name: &str) -> Fixture {
    let path = format!(
        "{}/fixtures/aggregate/flower_{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let keys: Vec<String> = json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    let shapes: Vec<[usize; 2]> = json["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            [
                s[0].as_u64().unwrap() as usize,
                s[1].as_u64().unwrap() as usize,
            ]
        })
        .collect();
    let global = adapter(&keys, &shapes, &floats(&json["global"]));
    let clients = json["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_owned(),
                c["samples"].as_u64().unwrap(),
                adapter(&keys, &shapes, &floats(&c["values"])),
            )
        })
        .collect();
    Fixture {
        json,
        global,
        clients,
    }
}

impl Fixture {
    fn run(&self, rule: &mut dyn Aggregator) -> Aggregation {
        let updates: Vec<ClientUpdate> = self
            .clients
            .iter()
            .map(|(id, n, a)| ClientUpdate::new(id.as_str(), a, *n))
            .collect();
        rule.aggregate(&self.global, &updates).unwrap()
    }
}

fn assert_close(result: &Aggregation, expected: &Value, what: &str) {
    let ours = flatten(result.new_global().expect("round not skipped"));
    let theirs = floats(expected);
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 + 1e-5 * b.abs(),
            "{what}: coordinate {i}: ours {a}, flower {b}"
        );
    }
}

const SCENARIOS: [&str; 3] = ["n7_benign", "n8_even", "n11_attack"];

#[test]
fn fedavg_matches_flower_aggregate() {
    for name in SCENARIOS {
        let fx = load(name);
        let result = fx.run(&mut FedAvg::plain());
        assert_close(&result, &fx.json["expected"]["fedavg"], name);
        let total: f64 = result.contributions.iter().map(|c| c.weight).sum();
        assert!((total - 1.0).abs() < 1e-12);
    }
}

#[test]
fn security_weighted_fedavg_with_unit_factors_is_flower_aggregate() {
    let fx = load("n8_even");
    assert_close(
        &fx.run(&mut FedAvg::new()),
        &fx.json["expected"]["fedavg"],
        "fedavg",
    );
}

#[test]
fn median_matches_flower_aggregate_median() {
    for name in SCENARIOS {
        let fx = load(name);
        assert_close(
            &fx.run(&mut CoordinateMedian::new()),
            &fx.json["expected"]["median"],
            name,
        );
    }
}

#[test]
fn trimmed_mean_matches_flower_aggregate_trimmed_avg() {
    for name in SCENARIOS {
        let fx = load(name);
        let case = &fx.json["expected"]["trimmed_mean"];
        let beta = case["proportiontocut"].as_f64().unwrap();
        let mut rule = TrimmedMean::new(Trim::Fraction(beta)).unwrap();
        assert_close(&fx.run(&mut rule), &case["values"], name);
    }
}

#[test]
fn krum_matches_flower_aggregate_krum() {
    for name in SCENARIOS {
        let fx = load(name);
        let case = &fx.json["expected"]["krum"];
        let mut rule = Krum::new(case["f"].as_u64().unwrap() as usize).unwrap();
        let result = fx.run(&mut rule);
        assert_close(&result, &case["values"], name);
        let selected = case["selected"].as_u64().unwrap() as usize;
        assert_eq!(result.contributions.len(), 1);
        assert_eq!(
            result.contributions[0].client.as_str(),
            fx.clients[selected].0
        );
        assert_eq!(result.exclusions.len(), fx.clients.len() - 1);
    }
}

#[test]
fn multi_krum_matches_flower_aggregate_krum_to_keep() {
    for name in SCENARIOS {
        let fx = load(name);
        let case = &fx.json["expected"]["multi_krum"];
        let f = case["f"].as_u64().unwrap() as usize;
        let m = case["m"].as_u64().unwrap() as usize;
        // Flower weights Multi-Krum's average by sample counts.
        let mut rule = MultiKrum::new(f, m).unwrap().weighting(Weighting::Samples);
        let result = fx.run(&mut rule);
        assert_close(&result, &case["values"], name);
        assert_eq!(result.contributions.len(), m);
    }
}

#[test]
fn bulyan_matches_flower_aggregate_bulyan() {
    for name in SCENARIOS {
        let fx = load(name);
        let case = &fx.json["expected"]["bulyan"];
        let f = case["f"].as_u64().unwrap() as usize;
        let result = fx.run(&mut Bulyan::new(f).unwrap());
        assert_close(&result, &case["values"], name);
        assert_eq!(result.contributions.len(), fx.clients.len() - 2 * f);
    }
}

#[test]
fn attackers_are_not_krum_winners() {
    let fx = load("n11_attack");
    let result = fx.run(&mut Krum::new(2).unwrap());
    let winner = result.contributions[0].client.as_str();
    assert!(
        winner != "client-9" && winner != "client-10",
        "winner {winner}"
    );
}
