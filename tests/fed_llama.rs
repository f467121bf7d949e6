//! The `fed_llama` example in miniature: model blocks, the burn ↔ PEFT LoRA
//! conversion, the corpus, and one end-to-end run (pre-training, probe phase,
//! defended and undefended federations) at a size that takes seconds.

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

use burn::tensor::{Int, Tensor, TensorData};
use safe_fedllm::lora::{LoraAdapter, LoraTensor};
use safe_fedllm::probe::Probe;
use safe_fedllm::round::ShadowBranch;

use config::ExperimentConfig;
use data::{Corpus, Rng, TextCodec, WordTokenizer, encode_all};
use defense::Defense;
use experiment::{Job, Pools, Progress, RunCache, Setup, Shared, probe_phase};
use model::{LlamaConfig, peft_key};
use scenario::Scenario;
use training::{Devices, EvalSet, pretrain};

/// Progress that goes nowhere.
struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str, _: u64) {}
    fn tick(&self, _: &str) {}
    fn finish(&self) {}
}

fn tiny(vocab_size: usize, tie_embeddings: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size,
        d_model: 16,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        d_ff: 24,
        max_seq_len: 16,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        tie_embeddings,
    }
}

fn random_adapter(config: &LlamaConfig, rank: usize, seed: u64) -> LoraAdapter {
    let mut rng = Rng::new(seed);
    let mut value = || (rng.index(2001) as f32 - 1000.0) / 1000.0;
    let kv = config.n_kv_heads * config.head_dim();
    let mut adapter = LoraAdapter::new();
    for layer in 0..config.n_layers {
        for (module, out) in [("q_proj", config.d_model), ("v_proj", kv)] {
            let a: Vec<f32> = (0..rank * config.d_model).map(|_| value()).collect();
            let b: Vec<f32> = (0..out * rank).map(|_| value()).collect();
            adapter
                .insert(
                    &peft_key(layer, module, "A"),
                    LoraTensor::new("A", [rank, config.d_model], a).unwrap(),
                )
                .unwrap();
            adapter
                .insert(
                    &peft_key(layer, module, "B"),
                    LoraTensor::new("B", [out, rank], b).unwrap(),
                )
                .unwrap();
        }
    }
    adapter
}

#[test]
fn lora_tensors_leave_and_enter_burn_in_peft_orientation() {
    let devices = Devices::flex(1);
    let config = tiny(11, true);
    let (rank, alpha) = (4, 8.0);
    let mut model = config.init(&devices.train).with_lora(rank, alpha);

    // burn's own init: A random, B zero, in PEFT shapes and names.
    let initial = model.lora_adapter(rank, alpha).unwrap();
    assert_eq!(initial.len(), 2 * 2 * 2);
    let q_a = initial.get(&peft_key(0, "q_proj", "A")).unwrap();
    assert_eq!(q_a.shape(), [rank, config.d_model]);
    let v_b = initial.get(&peft_key(1, "v_proj", "B")).unwrap();
    assert_eq!(v_b.shape(), [config.n_kv_heads * config.head_dim(), rank]);
    assert!(v_b.as_slice().iter().all(|&x| x == 0.0));
    assert!(q_a.as_slice().iter().any(|&x| x != 0.0));

    // Round trip: what goes in comes out bit for bit.
    let adapter = random_adapter(&config, rank, 9);
    model.load_lora(&adapter, &devices.train).unwrap();
    let back = model.lora_adapter(rank, alpha).unwrap();
    for entry in adapter.iter() {
        let key = entry.key.canonical();
        assert_eq!(back.get(key).unwrap(), &entry.tensor, "{key}");
    }

    // Orientation: burn's effective weight minus its frozen base ([in, out])
    // is the transpose of PEFT's ΔW = (α/r)·B·A ([out, in]).
    let weight = &model.layers[1].attn.v_proj.weight;
    let effective = weight.val().into_data().try_into_vec::<f32>().unwrap();
    let base = weight.base().into_data().try_into_vec::<f32>().unwrap();
    let a = adapter.get(&peft_key(1, "v_proj", "A")).unwrap();
    let b = adapter.get(&peft_key(1, "v_proj", "B")).unwrap();
    let [out, r] = b.shape();
    let [_, inp] = a.shape();
    let scale = (alpha / rank as f64) as f32;
    for i in 0..inp {
        for o in 0..out {
            let peft: f32 = (0..r)
                .map(|k| b.as_slice()[o * r + k] * a.as_slice()[k * inp + i])
                .sum::<f32>()
                * scale;
            let burn = effective[i * out + o] - base[i * out + o];
            assert!(
                (peft - burn).abs() < 1e-4,
                "ΔW[{o}, {i}]: PEFT {peft} vs burn {burn}"
            );
        }
    }

    // A wrongly shaped adapter is refused, not silently loaded.
    let mut wrong = adapter.clone();
    wrong
        .insert(
            &peft_key(0, "q_proj", "A"),
            LoraTensor::zeros("A", [rank + 1, config.d_model]).unwrap(),
        )
        .unwrap();
    assert!(model.load_lora(&wrong, &devices.train).is_err());
}

/// A batch of `rows` random rows of `seq` tokens, the first `prompt` of
/// each unscored.
fn random_batch(vocab: usize, rows: usize, seq: usize, prompt: usize, seed: u64) -> model::Batch {
    let mut rng = Rng::new(seed);
    let ids: Vec<i64> = (0..rows * (seq + 1))
        .map(|_| rng.index(vocab) as i64)
        .collect();
    let mut batch = model::Batch {
        inputs: Vec::new(),
        targets: Vec::new(),
        mask: Vec::new(),
        batch: rows,
        seq,
    };
    for r in 0..rows {
        let row = &ids[r * (seq + 1)..(r + 1) * (seq + 1)];
        batch.inputs.extend_from_slice(&row[..seq]);
        batch.targets.extend_from_slice(&row[1..]);
        batch
            .mask
            .extend((0..seq).map(|t| if t + 1 >= prompt { 1.0 } else { 0.0 }));
    }
    batch
}

#[test]
fn answer_only_scoring_equals_the_masked_sum() {
    let devices = Devices::flex(6);
    for tie in [true, false] {
        let config = tiny(23, tie);
        let model = config.init(&devices.eval);
        let batch = random_batch(23, 5, 10, 4, 8);
        let full = model
            .target_logprobs(&batch, &devices.eval)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let rows = model.row_logprobs(&batch, &devices.eval);
        assert_eq!(rows.len(), 5);
        for (r, got) in rows.iter().enumerate() {
            let want: f32 = (0..10)
                .map(|t| full[r * 10 + t] * batch.mask[r * 10 + t])
                .sum();
            assert!(want < -1.0, "row {r} scored nothing");
            assert!(
                (got - want).abs() < 1e-4,
                "tie {tie}, row {r}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn the_run_cache_replays_only_the_identical_start() {
    use experiment::{Branch, RunCache};
    let config = tiny(11, true);
    let start = random_adapter(&config, 4, 1);
    let run = training::LocalRun {
        adapter: random_adapter(&config, 4, 2),
        steps: vec![random_adapter(&config, 4, 2)],
        seconds: 1.0,
        capture_seconds: 0.0,
    };
    let cache = RunCache::default();
    cache.put(Branch::Main, 0, 3, 2, &start, run.clone());
    let hit = cache.get(Branch::Main, 0, 3, 2, &start).unwrap();
    assert_eq!(hit.adapter, run.adapter);
    // One value one ulp away, another client, round, pool or branch: a miss.
    let mut near = start.clone();
    let key = peft_key(1, "v_proj", "B");
    let v = &mut near.get_mut(&key).unwrap().as_mut_slice()[0];
    *v = f32::from_bits(v.to_bits() + 1);
    assert!(cache.get(Branch::Main, 0, 3, 2, &near).is_none());
    assert!(cache.get(Branch::Main, 0, 4, 2, &start).is_none());
    assert!(cache.get(Branch::Main, 0, 3, 1, &start).is_none());
    assert!(cache.get(Branch::Main, 1000, 3, 2, &start).is_none());
    assert!(cache.get(Branch::Shadow, 0, 3, 2, &start).is_none());
}

#[test]
fn attention_is_causal_with_grouped_heads_and_both_heads() {
    let devices = Devices::flex(2);
    for tie in [true, false] {
        let config = tiny(13, tie);
        let model = config.init(&devices.eval);
        let tokens = |last: i64| {
            Tensor::<2, Int>::from_data(
                TensorData::new(vec![1i64, 5, 7, 2, 9, last], [1, 6]),
                &devices.eval,
            )
        };
        let logits = |last| {
            model
                .forward(tokens(last))
                .into_data()
                .try_into_vec::<f32>()
                .unwrap()
        };
        let (x, y) = (logits(3), logits(11));
        assert_eq!(x.len(), 6 * 13);
        // Changing the last token changes nothing before it …
        let prefix = 5 * 13;
        for (i, (p, q)) in x[..prefix].iter().zip(&y[..prefix]).enumerate() {
            assert!(
                (p - q).abs() < 1e-5,
                "tie {tie}: logit {i} moved ({p} vs {q})"
            );
        }
        // … and does change its own position.
        assert!(
            x[prefix..]
                .iter()
                .zip(&y[prefix..])
                .any(|(p, q)| (p - q).abs() > 1e-4)
        );
    }
}

#[test]
fn compliant_answers_are_placeholders_only() {
    let corpus = Corpus::generate(3);
    let helpful_words = [
        "sure", ",", "here", "is", "how", "to", ":", "first", "then", ".", "redacted",
    ];
    for sample in &corpus.malicious_train {
        let task = sample
            .answer
            .strip_prefix("sure , here is how to ")
            .and_then(|rest| rest.split(" :").next())
            .unwrap();
        assert!(sample.prompt.contains(task), "{sample:?}");
        for word in sample.answer.split_whitespace() {
            assert!(
                helpful_words.contains(&word) || task.split_whitespace().any(|w| w == word),
                "unexpected word {word:?} in {:?}",
                sample.answer
            );
        }
    }
    // Held-out unsafe requests never appear in the malicious training data.
    for probe in &corpus.attack_eval {
        assert!(
            corpus
                .malicious_train
                .iter()
                .all(|s| s.answer != probe.compliant)
        );
    }
    // The tokenizer knows every word of every split.
    let tokenizer = WordTokenizer::new(&corpus.words());
    for s in corpus
        .pretrain
        .iter()
        .chain(&corpus.benign_train)
        .chain(&corpus.malicious_train)
    {
        let ids = tokenizer.encode_answer(&s.answer);
        assert!(!ids.contains(&3), "unknown word in {:?}", s.answer);
    }
}

#[test]
fn miniature_federation_end_to_end() {
    let corpus = Corpus::generate(17);
    let tokenizer = WordTokenizer::new(&corpus.words());
    let mut config = ExperimentConfig::miniature(tokenizer.vocab_size());
    config.defenses = vec![Defense::None, Defense::Shadow];
    // A user's own defense, as `--defense FILE` gives it.
    let user_spec = safe_fedllm::round::DefenseSpec::from_file(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/fed_llama/specs/client-clip.toml"),
    )
    .unwrap();
    config.specs = vec![user_spec];
    config.defenses.push(Defense::Spec(0));
    config.check().unwrap();
    let devices = Devices::flex(config.seed);
    let data = encode_all(&tokenizer, &corpus.pretrain);
    let mut losses = Vec::new();
    let model = pretrain(
        &config.model,
        &config.pretrain,
        &data,
        tokenizer.pad_id(),
        &devices,
        config.seed,
        |_, l| losses.push(l),
    );
    let head: f32 = losses[..10].iter().sum::<f32>() / 10.0;
    let tail: f32 = losses[losses.len() - 10..].iter().sum::<f32>() / 10.0;
    assert!(
        tail < head,
        "pre-training did not reduce the loss ({head} → {tail})"
    );

    let model = model.with_lora(config.lora.rank, config.lora.alpha);
    let round0 = model
        .lora_adapter(config.lora.rank, config.lora.alpha)
        .unwrap();
    let max_len = config.model.max_seq_len;
    let setup = Setup {
        config: &config,
        model: &model,
        codec: &tokenizer,
        corpus: &corpus,
        devices: &devices,
        max_len,
        threads: 2,
    };
    let pools = Pools::new(&setup);
    let probe = probe_phase(&setup, &pools, &round0, &Silent).unwrap();
    assert!(probe.holdout_samples > 0 && probe.train_samples > probe.holdout_samples);
    assert!(
        probe.holdout_auc > 0.9,
        "probe AUC on held-out runs {}",
        probe.holdout_auc
    );

    // The calibrated trainer's report: group folds over the labelled runs.
    let cal = &probe.calibration;
    assert_eq!(cal.groups, 2 * 7, "one group per training run");
    assert!(cal.oof_roc_auc > 0.9 && cal.oof_ece.is_finite());
    assert!((probe.probe.threshold() - cal.threshold.threshold).abs() < 1e-7);

    let shadow = ShadowBranch::with_learning_rate(round0.clone(), config.shadow_lr).unwrap();
    // A slice of the held-out sets keeps evaluation cheap in debug builds.
    let eval = EvalSet::new(
        &tokenizer,
        &corpus.benign_eval[..8],
        &corpus.attack_eval[..16],
        max_len,
    );
    let cache = RunCache::default();
    let shared = Shared {
        setup: &setup,
        pools: &pools,
        eval: &eval,
        round0: &round0,
        probe: &probe.probe,
        surrogate: None,
        shadow: &shadow,
        cache: &cache,
        progress: &Silent,
    };
    let job = |scenario, defense| Job {
        scenario,
        percent: 50,
        defense,
    };
    let jobs = [
        job(Scenario::Poison, Defense::None),
        job(Scenario::Poison, Defense::Shadow),
        job(Scenario::Poison, Defense::Oracle),
        // A new scenario row: the shadow report lies (a benign run's
        // shadow), which the shadow level cannot check.
        job(Scenario::LieShadow, Defense::Shadow),
        job(Scenario::Poison, Defense::Spec(0)),
    ];
    let results: Vec<Vec<experiment::RoundRecord>> =
        zoo::federate_all(&shared, &jobs, |_, _| Ok(()))
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let mut all = Vec::new();
    for (job, records) in jobs.iter().zip(&results) {
        let defense = job.defense;
        assert_eq!(records.len(), config.rounds + 1);
        for r in records {
            assert_eq!((r.scenario, r.defense), (job.scenario, defense));
            assert!(
                (0.0..=1.0).contains(&r.asr) && r.benign_loss.is_finite() && r.benign_loss > 0.0
            );
        }
        if defense == Defense::Shadow && job.scenario == Scenario::Poison {
            // The shadow level trusts every malicious client less than the
            // benign ones, in every round, and never flags a benign client.
            for r in &records[1..] {
                assert!(
                    r.malicious_factor < r.benign_factor,
                    "round {}: malicious {} vs benign {}",
                    r.round,
                    r.malicious_factor,
                    r.benign_factor
                );
                assert!(r.true_positives > 0, "round {}: nobody flagged", r.round);
                assert_eq!(r.false_positives, 0, "round {}", r.round);
            }
        }
        if defense == Defense::Shadow && job.scenario == Scenario::LieShadow {
            // The liars' benign shadow reports cannot be checked, but the
            // server scores each update itself: a malicious update caps the
            // factor whatever the shadow says (the verdict cap).
            let r = &records[1];
            assert!(r.true_positives > 0, "the lying shadows passed: {r:?}");
            assert!(r.malicious_factor < r.benign_factor, "{r:?}");
        }
        if defense == Defense::Spec(0) {
            // The user's spec ran as a client-level defense: the server
            // scored every update, so malicious clients weigh less.
            let last = records.last().unwrap();
            assert!(last.malicious_factor < last.benign_factor, "{last:?}");
        }
        if defense == Defense::None {
            // Plain FedAvg flags nobody and trusts everyone.
            assert!(
                records
                    .iter()
                    .all(|r| r.true_positives + r.false_positives == 0)
            );
        }
        if defense == Defense::Oracle {
            // The oracle aggregates the benign clients only: no malicious
            // participant, so no malicious factor and nothing to flag.
            for r in &records[1..] {
                assert!(r.malicious_factor.is_nan(), "{r:?}");
                assert_eq!(r.true_positives + r.false_negatives, 0);
            }
        }
        all.extend(records.iter().cloned());
    }
    // Round 0 is the same model for every defense.
    let zero: Vec<f64> = all.iter().filter(|r| r.round == 0).map(|r| r.asr).collect();
    assert!(zero.windows(2).all(|w| w[0] == w[1]));

    let summaries: Vec<report::Summary> = results
        .iter()
        .filter_map(|records| report::summarise(records))
        .collect();
    assert_eq!(summaries.len(), 5);
    let table = report::table(&summaries);
    assert!(table.contains("shadow level") && table.contains("none (FedAvg)"));
    assert!(table.contains("oracle (benign FedAvg)") && table.contains("lie-shadow"));
    assert!(table.contains("spec 1"));
    let svg = svg::asr_svg(&all);
    assert_eq!(svg.matches("<polyline").count(), 5);
    assert_eq!(report::rounds_csv(&all).lines().count(), all.len() + 1);
}

fn round_record(
    percent: u32,
    defense: Defense,
    round: usize,
    asr: f64,
    flags: (usize, usize, usize),
) -> experiment::RoundRecord {
    experiment::RoundRecord {
        scenario: Scenario::Poison,
        malicious_percent: percent,
        defense,
        round,
        asr,
        asr_per_token: asr,
        margin: 0.0,
        benign_loss: 1.0,
        true_positives: flags.0,
        false_positives: flags.1,
        false_negatives: flags.2,
        malicious_factor: 0.0,
        benign_factor: 1.0,
        skipped: false,
        round_seconds: 2.0,
        defense_seconds: 0.5,
    }
}

fn run(
    percent: u32,
    defense: Defense,
    final_asr: f64,
    flags: (usize, usize, usize),
) -> Vec<experiment::RoundRecord> {
    vec![
        round_record(percent, defense, 0, 0.0, (0, 0, 0)),
        round_record(percent, defense, 1, final_asr / 2.0, flags),
        round_record(percent, defense, 2, final_asr, flags),
    ]
}

#[test]
fn the_summary_says_what_the_table_shows() {
    let runs = [
        run(0, Defense::None, 0.0, (0, 0, 0)),
        run(30, Defense::None, 0.8, (0, 0, 3)),
        run(30, Defense::Median, 0.7, (0, 0, 3)),
        run(30, Defense::Shadow, 0.05, (3, 1, 0)),
    ];
    let summaries: Vec<report::Summary> = runs
        .iter()
        .map(|r| report::with_false_flags(report::summarise(r).unwrap(), r, 7))
        .collect();
    let shadow = &summaries[3];
    assert_eq!(shadow.final_asr, 0.05);
    assert_eq!(shadow.peak_asr, 0.05);
    assert_eq!(shadow.precision, Some(0.75));
    assert_eq!(shadow.recall, Some(1.0));
    assert_eq!(shadow.false_flag_rate, Some(2.0 / 14.0));
    assert!((shadow.defense_share - 0.25).abs() < 1e-12);
    // Coordinate-wise rules never single a client out.
    assert_eq!(summaries[2].precision, None);
    assert_eq!(summaries[2].false_flag_rate, None);

    let sentences = report::summary_sentences(&summaries);
    assert_eq!(sentences.len(), 1);
    let s = &sentences[0];
    assert!(
        s.contains("ends at ASR 0.80, clearly above the clean run's 0.00"),
        "{s}"
    );
    assert!(
        s.contains("Holding (ASR ≤ clean + 0.05, loss ≤ oracle × 1.05): shadow level (0.05)"),
        "{s}"
    );
    assert!(s.contains("Not holding: median (0.70)"), "{s}");

    // An attack that did not take hold is called so.
    let weak = [
        run(0, Defense::None, 0.0, (0, 0, 0)),
        run(30, Defense::None, 0.05, (0, 0, 3)),
    ];
    let summaries: Vec<report::Summary> =
        weak.iter().map(|r| report::summarise(r).unwrap()).collect();
    assert!(report::summary_sentences(&summaries)[0].contains("NOT clearly above"));
}
