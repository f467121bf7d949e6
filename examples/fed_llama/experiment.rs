//! The experiment: probe phase, then one federation per (malicious share,
//! defense), each recording per-round metrics.

use std::collections::HashMap;
use std::time::Instant;

use safe_fedllm::lora::{LoraAdapter, LoraDelta};
use safe_fedllm::probe::eval::{Confusion, roc_auc};
use safe_fedllm::probe::{Label, LinearProbe, LogisticParams, Probe, ProbeBuilder};
use safe_fedllm::round::{OwnedReport as ClientReport, OwnedSteps as StepsReport, ShadowBranch};
use serde::Serialize;

use crate::config::ExperimentConfig;
use crate::data::{Corpus, Encoded, Rng, TextCodec, encode_all};
use crate::defense::{Defense, RuleContext, Server};
use crate::model::Llama;
use crate::training::{
    BatchPlan, Capture, ClientData, Devices, EvalSet, LocalRun, Metrics, local_train, round_lr,
};

/// Receives progress: a phase starts with a length, ticks, and finishes.
pub trait Progress {
    /// A phase of `total` ticks begins.
    fn start(&self, phase: &str, total: u64);
    /// One tick, with a short status message.
    fn tick(&self, message: &str);
    /// The phase is over.
    fn finish(&self);
}

/// Everything the experiment trains and evaluates with.
pub struct Setup<'a> {
    /// The settings.
    pub config: &'a ExperimentConfig,
    /// The (pre-trained, aligned) model with LoRA attached.
    pub model: &'a Llama,
    /// Its tokenizer and chat format.
    pub codec: &'a dyn TextCodec,
    /// The corpus.
    pub corpus: &'a Corpus,
    /// Devices.
    pub devices: &'a Devices,
    /// Longest sequence fed to the model.
    pub max_len: usize,
    /// Clients trained in parallel.
    pub threads: usize,
}

impl Setup<'_> {
    /// The batch plan of a local run, with the data-order seed `seed`.
    pub fn plan(&self, seed: u64) -> BatchPlan {
        BatchPlan {
            steps: self.config.local_steps,
            batch: self.config.batch_size,
            pad: self.codec.pad_id(),
            max_len: self.max_len,
            seed,
        }
    }
}

/// What the probe phase produced.
pub struct ProbeReport {
    /// The trained probe.
    pub probe: LinearProbe,
    /// ROC AUC on the held-out runs' step deltas.
    pub holdout_auc: f64,
    /// Held-out accuracy at the probe's threshold.
    pub holdout_accuracy: f64,
    /// Training / held-out delta counts.
    pub train_samples: usize,
    /// Held-out delta count.
    pub holdout_samples: usize,
    /// Seconds the phase took.
    pub seconds: f64,
}

/// One row of the per-round log.
#[derive(Debug, Clone, Serialize)]
pub struct RoundRecord {
    /// Malicious share, percent.
    pub malicious_percent: u32,
    /// Defense.
    pub defense: Defense,
    /// Round (0 = before federation).
    pub round: usize,
    /// Metrics of the global model after the round.
    pub asr: f64,
    /// ASR on mean per-token log-likelihoods (see [`Metrics`]).
    pub asr_per_token: f64,
    /// Mean compliant − refusal log-likelihood margin (see [`Metrics`]).
    pub margin: f64,
    /// Held-out benign loss after the round.
    pub benign_loss: f64,
    /// Malicious clients the defense suppressed this round.
    pub true_positives: usize,
    /// Benign clients the defense suppressed.
    pub false_positives: usize,
    /// Malicious clients it let through.
    pub false_negatives: usize,
    /// Mean security factor of the malicious participants (1.0 for rules
    /// without factors; NaN when none participated).
    pub malicious_factor: f64,
    /// Mean security factor of the benign participants.
    pub benign_factor: f64,
    /// True when the global adapter did not change this round.
    pub skipped: bool,
    /// Seconds of the round (client training + server), evaluation excluded.
    pub round_seconds: f64,
    /// Seconds of it spent on the defense (step capture, shadow branch,
    /// probe scoring, detection, robust rule).
    pub defense_seconds: f64,
}

/// Labels client `k` of `clients` as malicious when it is among the first
/// `malicious` of a seeded permutation (the same for every defense).
pub fn malicious_set(clients: usize, malicious: usize, seed: u64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..clients).collect();
    Rng::derive(seed, &[0x4D41_4C49]).shuffle(&mut order);
    let mut flags = vec![false; clients];
    for &k in order.iter().take(malicious) {
        flags[k] = true;
    }
    flags
}

/// Clients sampled in `round` (the same for every defense and share).
pub fn selection(config: &ExperimentConfig, round: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..config.clients).collect();
    if config.clients_per_round < config.clients {
        Rng::derive(config.seed, &[0x0053_454C, round as u64]).shuffle(&mut order);
        order.truncate(config.clients_per_round);
        order.sort_unstable();
    }
    order
}

/// A private pool per client: benign clients sample from the benign
/// training split, malicious ones from the malicious split. The pool of
/// client `k` depends only on (its kind, k, seed).
fn client_pool(
    malicious: bool,
    index: u64,
    benign: &[Encoded],
    harmful: &[Encoded],
    size: usize,
    seed: u64,
) -> Vec<Encoded> {
    let source = if malicious { harmful } else { benign };
    let mut order: Vec<usize> = (0..source.len()).collect();
    Rng::derive(seed, &[u64::from(malicious), index, 0x504F_4F4C]).shuffle(&mut order);
    order
        .iter()
        .cycle()
        .take(size)
        .map(|&i| source[i].clone())
        .collect()
}

/// The encoded training splits.
pub struct Pools {
    benign: Vec<Encoded>,
    harmful: Vec<Encoded>,
}

impl Pools {
    /// Encodes the benign and malicious training splits.
    pub fn new(setup: &Setup<'_>) -> Self {
        Pools {
            benign: encode_all(setup.codec, &setup.corpus.benign_train),
            harmful: encode_all(setup.codec, &setup.corpus.malicious_train),
        }
    }
}

/// Runs the probe phase: `probe_runs` benign and as many malicious local runs
/// from the round-0 adapter at the shadow learning rate, every step's delta
/// kept; the last `probe_holdout` of the runs of each class are held out;
/// the library's default trainer fits the probe.
pub fn probe_phase(
    setup: &Setup<'_>,
    pools: &Pools,
    round0: &LoraAdapter,
    progress: &dyn Progress,
) -> Result<ProbeReport, String> {
    let cfg = setup.config;
    let t0 = Instant::now();
    let runs = cfg.probe_runs;
    let held = ((runs as f64 * cfg.probe_holdout).round() as usize)
        .clamp(1, runs.saturating_sub(1).max(1));
    progress.start("probe runs", 2 * runs as u64);
    let jobs: Vec<(usize, bool)> = (0..runs)
        .flat_map(|run| [(run, false), (run, true)])
        .collect();
    let mut train = (Vec::new(), Vec::new());
    let mut test = (Vec::new(), Vec::new());
    for wave in jobs.chunks(setup.threads.max(1)) {
        let results = parallel_map(wave, setup.threads, |&(run, malicious)| {
            // Probe clients are numbered after the federation's clients, so
            // their data orders differ from every federated client's.
            let id = (cfg.clients + run) as u64;
            let pool = client_pool(
                malicious,
                id,
                &pools.benign,
                &pools.harmful,
                cfg.samples_per_client,
                cfg.seed ^ 0x0050_524F,
            );
            let data = ClientData::new(vec![pool], setup.plan(cfg.seed ^ id));
            let batches = data.round_batches(0, 0);
            local_train(
                setup.model,
                round0,
                &batches,
                cfg.shadow_lr,
                cfg.lora,
                Capture::EveryStep,
                &setup.devices.train,
            )
        });
        for (&(run, malicious), result) in wave.iter().zip(results) {
            let result = result?;
            let label = if malicious {
                Label::Malicious
            } else {
                Label::Benign
            };
            let target = if run < runs - held {
                &mut train
            } else {
                &mut test
            };
            for step in &result.steps {
                target
                    .0
                    .push(LoraDelta::between(step, round0).map_err(|e| e.to_string())?);
                target.1.push(label);
            }
            progress.tick(label.as_str());
        }
    }
    progress.finish();
    let probe = ProbeBuilder::new(LogisticParams::default())
        .fit(&train.0, &train.1)
        .map_err(|e| format!("probe training: {e}"))?;
    let scores = probe.score_batch(&test.0).map_err(|e| e.to_string())?;
    let holdout_auc = roc_auc(&scores, &test.1).map_err(|e| e.to_string())?;
    let confusion =
        Confusion::at(&scores, &test.1, probe.threshold()).map_err(|e| e.to_string())?;
    Ok(ProbeReport {
        holdout_auc,
        holdout_accuracy: confusion.accuracy(),
        train_samples: train.0.len(),
        holdout_samples: test.0.len(),
        seconds: t0.elapsed().as_secs_f64(),
        probe,
    })
}

/// Shadow runs are identical for every defense (fixed base, fixed learning
/// rate, the client's deterministic data), so each is trained once and
/// replayed; its measured time is charged to every run that uses it.
#[derive(Default)]
pub struct ShadowCache {
    runs: HashMap<(bool, usize, usize), LocalRun>,
}

/// Maps `f` over `items` on up to `threads` scoped threads, keeping order.
/// (The tiny model's tensors are far below burn-flex's own parallel
/// thresholds, so clients are the unit of parallelism.)
pub fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if threads <= 1 || items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// Runs one federation (one malicious share, one defense), returning one
/// record per round (plus round 0, before any training).
#[allow(clippy::too_many_arguments)]
pub fn federate(
    setup: &Setup<'_>,
    pools: &Pools,
    eval: &EvalSet,
    round0: &LoraAdapter,
    probe: &LinearProbe,
    shadow: &ShadowBranch,
    shadow_cache: &mut ShadowCache,
    percent: u32,
    defense: Defense,
    progress: &dyn Progress,
) -> Result<Vec<RoundRecord>, String> {
    let cfg = setup.config;
    let n_mal = cfg.malicious_clients(percent);
    let malicious = malicious_set(cfg.clients, n_mal, cfg.seed);
    let data = ClientData::new(
        (0..cfg.clients)
            .map(|k| {
                client_pool(
                    malicious[k],
                    k as u64,
                    &pools.benign,
                    &pools.harmful,
                    cfg.samples_per_client,
                    cfg.seed,
                )
            })
            .collect(),
        setup.plan(cfg.seed),
    );
    let ctx = RuleContext {
        clients_per_round: cfg.clients_per_round,
        expected_malicious: (cfg.clients_per_round as f64 * f64::from(percent) / 100.0).round()
            as usize,
        seed: cfg.seed,
        samples_per_step: cfg.batch_size as u64,
    };
    let mut server = Server::new(defense, ctx, probe, shadow).map_err(|e| e.to_string())?;
    let mut global = round0.clone();
    let mut model = setup.model.clone();
    let initial = eval.evaluate(&model, &setup.devices.eval);
    let mut records = vec![record(
        percent,
        defense,
        0,
        initial,
        &[],
        &[],
        &[],
        false,
        0.0,
        0.0,
    )];
    for round in 0..cfg.rounds {
        let lr = round_lr(cfg.lr, cfg.min_lr, round, cfg.rounds);
        let chosen = selection(cfg, round);
        let batches_of = |k: usize| data.round_batches(k, round);
        // Shadow branches this round's clients need and the cache lacks.
        let shadow_keys: Vec<(bool, usize, usize)> = chosen
            .iter()
            .filter(|&&k| server.needs_shadow(&k.to_string()))
            .map(|&k| (malicious[k], k, round))
            .collect();
        let missing: Vec<(bool, usize, usize)> = shadow_keys
            .iter()
            .filter(|key| !shadow_cache.runs.contains_key(key))
            .copied()
            .collect();
        let trained = parallel_map(&missing, setup.threads, |&(_, k, _)| {
            local_train(
                setup.model,
                shadow.base(),
                &batches_of(k),
                shadow.learning_rate(),
                cfg.lora,
                Capture::EveryStep,
                &setup.devices.train,
            )
        });
        for (key, run) in missing.into_iter().zip(trained) {
            shadow_cache.runs.insert(key, run?);
        }
        let capture = if defense.captures_steps() {
            Capture::EveryStep
        } else {
            Capture::LastOnly
        };
        let runs = parallel_map(&chosen, setup.threads, |&k| {
            local_train(
                setup.model,
                &global,
                &batches_of(k),
                lr,
                cfg.lora,
                capture,
                &setup.devices.train,
            )
        });
        let mut reports = Vec::with_capacity(chosen.len());
        // Compute seconds, summed over clients (what a sequential simulation
        // takes), so the figures do not depend on --threads.
        let mut round_seconds = 0.0;
        let mut defense_seconds = 0.0;
        for (&k, run) in chosen.iter().zip(runs) {
            let run = run?;
            round_seconds += run.seconds;
            defense_seconds += run.capture_seconds;
            let mut report = ClientReport::new(k.to_string(), run.adapter, cfg.samples_per_round());
            if capture == Capture::EveryStep {
                report = report.with_steps(StepsReport::Adapters(run.steps));
            }
            if let Some(shadow_run) = shadow_keys
                .iter()
                .find(|key| key.1 == k)
                .and_then(|key| shadow_cache.runs.get(key))
            {
                round_seconds += shadow_run.seconds;
                defense_seconds += shadow_run.seconds;
                report = report.with_shadow(StepsReport::Adapters(shadow_run.steps.clone()));
            }
            reports.push(report);
        }
        let t0 = Instant::now();
        let outcome = server
            .run(round as u32, &global, &reports)
            .map_err(|e| e.to_string())?;
        defense_seconds += outcome.server_seconds;
        round_seconds += t0.elapsed().as_secs_f64();
        let skipped = outcome.new_global.is_none();
        if let Some(new_global) = outcome.new_global {
            global = new_global;
        }
        model.load_lora(&global, &setup.devices.train)?;
        let metrics = eval.evaluate(&model, &setup.devices.eval);
        let truth: Vec<bool> = chosen.iter().map(|&k| malicious[k]).collect();
        records.push(record(
            percent,
            defense,
            round + 1,
            metrics,
            &truth,
            &outcome.flagged,
            &outcome.factors,
            skipped,
            round_seconds,
            defense_seconds,
        ));
        progress.tick(&format!("{percent}% {} r{}", defense.name(), round + 1));
    }
    Ok(records)
}

#[allow(clippy::too_many_arguments)]
fn record(
    percent: u32,
    defense: Defense,
    round: usize,
    metrics: Metrics,
    truth: &[bool],
    flagged: &[bool],
    factors: &[f64],
    skipped: bool,
    round_seconds: f64,
    defense_seconds: f64,
) -> RoundRecord {
    let count = |want_truth: bool, want_flag: bool| {
        truth
            .iter()
            .zip(flagged)
            .filter(|&(&t, &f)| t == want_truth && f == want_flag)
            .count()
    };
    let mean_factor = |want: bool| {
        let picked: Vec<f64> = truth
            .iter()
            .zip(factors)
            .filter(|&(&t, _)| t == want)
            .map(|(_, &w)| w)
            .collect();
        if picked.is_empty() {
            f64::NAN
        } else {
            picked.iter().sum::<f64>() / picked.len() as f64
        }
    };
    RoundRecord {
        malicious_factor: mean_factor(true),
        benign_factor: mean_factor(false),
        malicious_percent: percent,
        defense,
        round,
        asr: metrics.asr,
        asr_per_token: metrics.asr_per_token,
        margin: metrics.margin,
        benign_loss: metrics.benign_loss,
        true_positives: count(true, true),
        false_positives: count(false, true),
        false_negatives: count(true, false),
        skipped,
        round_seconds,
        defense_seconds,
    }
}
