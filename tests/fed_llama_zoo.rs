//! The attacker zoo in miniature: the strict verdict against a hand
//! computation, and a two-scenario zoo run (a few rounds) through the
//! resumable store, in which plain FedAvg fails a poisoned cell that the
//! layered defense holds.

// The example's modules are compiled here as they are; items only `main.rs`
// uses are dead in this crate.
#![allow(dead_code)]

#[path = "../examples/fed_llama/attacker.rs"]
mod attacker;
#[path = "../examples/fed_llama/clients.rs"]
mod clients;
#[path = "../examples/fed_llama/config.rs"]
mod config;
#[path = "../examples/fed_llama/data.rs"]
mod data;
#[path = "../examples/fed_llama/defense.rs"]
mod defense;
#[path = "../examples/fed_llama/experiment.rs"]
mod experiment;
#[path = "../examples/fed_llama/model.rs"]
mod model;
#[path = "../examples/fed_llama/report.rs"]
mod report;
#[path = "../examples/fed_llama/scenario.rs"]
mod scenario;
#[path = "../examples/fed_llama/svg.rs"]
mod svg;
#[path = "../examples/fed_llama/training.rs"]
mod training;
#[path = "../examples/fed_llama/verdict.rs"]
mod verdict;
#[path = "../examples/fed_llama/zoo.rs"]
mod zoo;

use config::ExperimentConfig;
use data::{Corpus, TextCodec, WordTokenizer, encode_all};
use defense::Defense;
use experiment::{Progress, Setup};
use scenario::Scenario;
use training::{Devices, EvalSet, pretrain};
use verdict::{CellResult, verdicts};

/// Progress that goes nowhere.
struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str, _: u64) {}
    fn tick(&self, _: &str) {}
    fn finish(&self) {}
}

fn cell(
    scenario: Scenario,
    percent: u32,
    defense: Defense,
    seed: u64,
    asr: f64,
    loss: f64,
) -> CellResult {
    CellResult {
        scenario,
        percent,
        defense,
        seed,
        final_asr: asr,
        final_loss: loss,
    }
}

#[test]
fn the_strict_verdict_matches_a_hand_computation() {
    use Defense::{Client, None as FedAvg, Oracle};
    use Scenario::{Poison, SignFlip};
    let results = [
        // Clean runs (0 %), per defense and seed.
        cell(Poison, 0, FedAvg, 1, 0.10, 2.00),
        cell(Poison, 0, FedAvg, 2, 0.20, 2.10),
        cell(Poison, 0, Client, 1, 0.10, 2.02),
        cell(Poison, 0, Client, 2, 0.15, 2.12),
        // The oracle at 30 %, one run per seed (any scenario).
        cell(Poison, 30, Oracle, 1, 0.10, 2.00),
        cell(Poison, 30, Oracle, 2, 0.18, 2.20),
        // FedAvg under poison: seed 1 ASR 0.60 > 0.10 + 0.05.
        cell(Poison, 30, FedAvg, 1, 0.60, 2.05),
        cell(Poison, 30, FedAvg, 2, 0.22, 2.20),
        // Client level: seed 1 holds (0.15 ≤ 0.15, 2.10 ≤ 2.10); seed 2
        // holds on ASR (0.19 ≤ 0.20) and loss (2.30 ≤ 2.31).
        cell(Poison, 30, Client, 1, 0.15, 2.10),
        cell(Poison, 30, Client, 2, 0.19, 2.30),
        // Sign flip: the ASR holds, the loss does not in seed 2
        // (2.32 > 2.20 × 1.05 = 2.31).
        cell(SignFlip, 30, Client, 1, 0.10, 2.05),
        cell(SignFlip, 30, Client, 2, 0.15, 2.32),
        // No clean run for Krum: no verdict.
        cell(Poison, 30, Defense::Krum, 1, 0.10, 2.00),
    ];
    let v = verdicts(&results);
    let find = |s: Scenario, d: Defense| {
        v.iter()
            .find(|x| x.scenario == s && x.defense == d && x.percent == 30)
            .unwrap()
    };
    let fedavg = find(Poison, FedAvg);
    assert_eq!((fedavg.holds, fedavg.seeds), (Some(false), 2));
    assert!((fedavg.worst_asr - 0.60).abs() < 1e-12);
    assert!((fedavg.worst_asr_excess - 0.50).abs() < 1e-12);
    assert!((fedavg.worst_loss_ratio - 1.025).abs() < 1e-12);

    let client = find(Poison, Client);
    assert_eq!(client.holds, Some(true), "{client:?}");
    assert!((client.worst_asr_excess - 0.05).abs() < 1e-12);
    // Worst ratio over seeds: max(2.10/2.00, 2.30/2.20) = 1.05.
    assert!((client.worst_loss_ratio - 1.05).abs() < 1e-12);

    let flip = find(SignFlip, Client);
    assert_eq!(flip.holds, Some(false), "{flip:?}");
    assert!((flip.worst_loss - 2.32).abs() < 1e-12);

    let krum = find(Poison, Defense::Krum);
    assert_eq!((krum.holds, krum.seeds), (None, 0));
    // Only attacked shares are cells; the oracle without a clean run of
    // its own has no verdict.
    assert!(v.iter().all(|x| x.percent > 0));
    assert_eq!(find(Poison, Oracle).holds, None);
    assert!(verdict::holds_once(0.15, 2.10, 0.10, 2.0));
    assert!(!verdict::holds_once(0.1501, 2.0, 0.10, 2.0));
    assert!(!verdict::holds_once(0.0, 2.1001, 0.10, 2.0));

    let csv = verdict::verdict_csv(&v);
    assert_eq!(csv.lines().count(), v.len() + 1);
    assert!(csv.contains("none (FedAvg),poison,30,2,fails,0.600000,0.500000"));
    let svg = svg::verdict_svg(&v);
    assert_eq!(svg.matches("#f0027f").count(), 2, "two failing cells");
    assert_eq!(svg.matches("#7fc97f").count(), 1, "one holding cell");
}

#[test]
fn miniature_zoo_fedavg_fails_where_the_layered_defense_holds_and_reruns_resume() {
    let corpus = Corpus::generate(17);
    let tokenizer = WordTokenizer::new(&corpus.words());
    let mut config = ExperimentConfig::miniature(tokenizer.vocab_size());
    // The evidence level behind a tight norm bound: the strongest layered
    // spec on main while the recommended preset is not.
    config.defenses = vec![Defense::Oracle, Defense::None, Defense::EvidenceNormBound];
    config.scenarios = vec![Scenario::Poison, Scenario::Scaling(Some(20))];
    config.malicious_percent = vec![0, 50];
    config.rounds = 2;
    config.check().unwrap();
    let devices = Devices::flex(config.seed);
    let data = encode_all(&tokenizer, &corpus.pretrain);
    let model = pretrain(
        &config.model,
        &config.pretrain,
        &data,
        tokenizer.pad_id(),
        &devices,
        config.seed,
        |_, _| {},
    )
    .with_lora(config.lora.rank, config.lora.alpha);
    let round0 = model
        .lora_adapter(config.lora.rank, config.lora.alpha)
        .unwrap();
    let setup = Setup {
        config: &config,
        model: &model,
        codec: &tokenizer,
        corpus: &corpus,
        devices: &devices,
        max_len: config.model.max_seq_len,
        threads: 2,
    };
    let eval = EvalSet::new(
        &tokenizer,
        &corpus.benign_eval[..8],
        &corpus.attack_eval[..16],
        config.model.max_seq_len,
    );
    let out = std::env::temp_dir().join(format!("fed_llama_zoo_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let store = zoo::Store::open(&out, &config, "tiny").unwrap();
    let bench = zoo::Bench {
        setup: &setup,
        eval: &eval,
        round0: &round0,
        progress: &Silent,
        store: &store,
    };
    let mut probes = 0;
    let runs = zoo::run_seeds(&bench, 1, |_, _| {
        probes += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(probes, 1);
    // Jobs: 0 %: FedAvg, evidence (the oracle aliases FedAvg); 50 %: the
    // oracle once, FedAvg and evidence per scenario. `complete` adds the
    // oracle at 0 % and the oracle under the second scenario.
    assert_eq!(zoo::jobs(&config).len(), 2 + 1 + 2 * 2);
    assert_eq!(runs.len(), zoo::jobs(&config).len() + 2);
    let results: Vec<CellResult> = runs.iter().filter_map(zoo::SeedRun::result).collect();
    let v = verdicts(&results);
    let find = |s: Scenario, d: Defense| {
        v.iter()
            .find(|x| x.scenario == s && x.defense == d && x.percent == 50)
            .unwrap_or_else(|| panic!("no cell {s} {d:?}: {v:?}"))
            .clone()
    };
    let fedavg = find(Scenario::Scaling(Some(20)), Defense::None);
    assert_eq!(
        fedavg.holds,
        Some(false),
        "FedAvg under scaling: {fedavg:?}"
    );
    let layered = find(Scenario::Scaling(Some(20)), Defense::EvidenceNormBound);
    assert_eq!(
        layered.holds,
        Some(true),
        "layered under scaling: {layered:?}"
    );
    let oracle = find(Scenario::Scaling(Some(20)), Defense::Oracle);
    assert_eq!(oracle.holds, Some(true), "{oracle:?}");

    // A rerun with the same configuration finds every cell on disk.
    let mut probes = 0;
    let again = zoo::run_seeds(&bench, 1, |_, _| {
        probes += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(probes, 0, "nothing left to run, no probe phase");
    let again: Vec<CellResult> = again.iter().filter_map(zoo::SeedRun::result).collect();
    assert_eq!(again, results);
    // Another configuration writes elsewhere.
    let mut other = config.clone();
    other.rounds = 3;
    let elsewhere = zoo::Store::open(&out, &other, "tiny").unwrap();
    let job = zoo::jobs(&config)[0];
    assert!(store.load(config.seed, &job).is_some());
    assert!(elsewhere.load(config.seed, &job).is_none());
    let _ = std::fs::remove_dir_all(&out);
}
