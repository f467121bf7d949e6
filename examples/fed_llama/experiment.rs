//! The experiment: probe phase, then one federation per (malicious share,
//! defense), each recording per-round metrics.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rayon::prelude::*;

use safe_fedllm::lora::{LoraAdapter, LoraDelta};
use safe_fedllm::probe::eval::{Confusion, ECE_BINS, expected_calibration_error, roc_auc};
use safe_fedllm::probe::{
    CalibratedParams, CalibrationReport, Label, LinearProbe, Probe, ProbeBuilder,
};
use safe_fedllm::round::{
    LabelledRun, OwnedReport as ClientReport, OwnedSteps as StepsReport, ProbeRefresh, ShadowBranch,
};
use serde::{Deserialize, Serialize};

use crate::attacker::{
    Craft, SybilRound, apply, craft, evade_trail, server_admission, sybil_updates,
};
use crate::clients::pool_tag;
pub use crate::clients::{BENIGN, HARMFUL, Pools, malicious_set, selection};
use crate::config::ExperimentConfig;
use crate::data::{Corpus, TextCodec};
use crate::defense::{Defense, RuleContext, Server};
use crate::model::Llama;
use crate::scenario::{Knowledge, Scenario};
use crate::training::{
    BatchPlan, Capture, ClientData, Devices, EvalSet, LocalRun, Metrics, local_train, round_lr,
};

/// Receives progress: a phase starts with a length, ticks, and finishes.
pub trait Progress: Sync {
    /// A phase of `total` ticks begins.
    fn start(&self, phase: &str, total: u64);
    /// One tick, with a short status message.
    fn tick(&self, message: &str);
    /// The phase is over.
    fn finish(&self);
}

/// Everything the experiment trains and evaluates with.
#[derive(Clone, Copy)]
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
    /// ECE of the (calibrated) scores on the held-out runs.
    pub holdout_ece: f64,
    /// Held-out accuracy at the probe's threshold.
    pub holdout_accuracy: f64,
    /// Held-out recall at τ.
    pub holdout_recall: f64,
    /// Held-out false-positive rate at τ.
    pub holdout_false_positive_rate: f64,
    /// The calibrated trainer's report (chosen C, OOF AUC / ECE, τ, margin).
    pub calibration: CalibrationReport,
    /// Training / held-out delta counts.
    pub train_samples: usize,
    /// Held-out delta count.
    pub holdout_samples: usize,
    /// Seconds the phase took.
    pub seconds: f64,
}

/// One row of the per-round log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Attack scenario.
    pub scenario: Scenario,
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
    #[serde(deserialize_with = "crate::zoo::nan_or")]
    pub malicious_factor: f64,
    /// Mean security factor of the benign participants.
    #[serde(deserialize_with = "crate::zoo::nan_or")]
    pub benign_factor: f64,
    /// True when the global adapter did not change this round.
    pub skipped: bool,
    /// Seconds of the round (client training + server), evaluation excluded.
    pub round_seconds: f64,
    /// Seconds of it spent on the defense (step capture, shadow branch,
    /// probe scoring, detection, robust rule).
    pub defense_seconds: f64,
}

/// The probe's trainer: the library's calibrated trainer ([`CalibratedParams`]):
/// C by group k-fold (one group per labelled run, so no run straddles folds),
/// Platt scaling on out-of-fold scores, τ by the configured [`Threshold`]
/// policy (default `fixed:0.8`: on a calibrated probe, flag an update that is
/// malicious at least 80 % of the time — the reference τ, now meaningful).
pub fn probe_trainer(cfg: &ExperimentConfig, folds: usize) -> CalibratedParams {
    CalibratedParams::default()
        .folds(folds)
        .seed(cfg.seed)
        .threshold(cfg.threshold)
}

/// One labelled local run from `start` on client `id`'s pool of `kind`
/// (a probe run, a root-set run of the refresh or a surrogate attacker's
/// run), every step kept.
pub fn labelled_run(
    setup: &Setup<'_>,
    pools: &Pools,
    start: &LoraAdapter,
    id: u64,
    malicious: bool,
    lr: f64,
    seed: u64,
) -> Result<LocalRun, String> {
    let cfg = setup.config;
    let pool = pools.pool(if malicious { HARMFUL } else { BENIGN }, id, seed);
    let data = ClientData::new(vec![pool], setup.plan(cfg.seed ^ id));
    let batches = data.round_batches(0, 0);
    local_train(
        setup.model,
        start,
        &batches,
        lr,
        cfg.lora,
        Capture::EveryStep,
        &setup.devices.train,
    )
}

/// Runs the probe phase: `probe_runs` benign and as many malicious local runs
/// from the round-0 adapter at the shadow learning rate, every step's delta
/// kept; the last `probe_holdout` of the runs of each class are held out;
/// the calibrated trainer ([`probe_trainer`]) fits the probe on the rest.
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
    // (deltas, labels, groups)
    let mut train = (Vec::new(), Vec::new(), Vec::new());
    let mut test = (Vec::new(), Vec::new());
    let results = parallel_map(&jobs, setup.threads, |&(run, malicious)| {
        // Probe clients are numbered after the federation's clients, so
        // their data orders differ from every federated client's.
        let id = (cfg.clients + run) as u64;
        let result = labelled_run(
            setup,
            pools,
            round0,
            id,
            malicious,
            cfg.shadow_lr,
            cfg.seed ^ 0x0050_524F,
        );
        progress.tick(if malicious { "malicious" } else { "benign" });
        result
    });
    for (group, (&(run, malicious), result)) in jobs.iter().zip(results).enumerate() {
        let result = result?;
        let label = if malicious {
            Label::Malicious
        } else {
            Label::Benign
        };
        for step in &result.steps {
            let delta = LoraDelta::between(step, round0).map_err(|e| e.to_string())?;
            if run < runs - held {
                train.0.push(delta);
                train.1.push(label);
                train.2.push(group);
            } else {
                test.0.push(delta);
                test.1.push(label);
            }
        }
    }
    progress.finish();
    let probe = ProbeBuilder::new(probe_trainer(cfg, cfg.probe_folds))
        .fit_grouped(&train.0, &train.1, Some(&train.2))
        .map_err(|e| format!("probe training: {e}"))?;
    let calibration = probe
        .info()
        .calibration
        .clone()
        .ok_or("probe training: the calibrated trainer returned no calibration report")?;
    let scores = probe.score_batch(&test.0).map_err(|e| e.to_string())?;
    let holdout_auc = roc_auc(&scores, &test.1).map_err(|e| e.to_string())?;
    let holdout_ece =
        expected_calibration_error(&scores, &test.1, ECE_BINS).map_err(|e| e.to_string())?;
    let confusion =
        Confusion::at(&scores, &test.1, probe.threshold()).map_err(|e| e.to_string())?;
    Ok(ProbeReport {
        holdout_auc,
        holdout_ece,
        holdout_accuracy: confusion.accuracy(),
        holdout_recall: confusion.recall(),
        holdout_false_positive_rate: confusion.false_positive_rate(),
        train_samples: train.0.len(),
        holdout_samples: test.0.len(),
        seconds: t0.elapsed().as_secs_f64(),
        calibration,
        probe,
    })
}

/// Work that is identical across federations, done once and replayed (a
/// replayed run's measured time is charged to every federation that uses it).
/// A local run is determined by the client's data (pool tag, client,
/// round), its branch, and the exact adapter it starts from; an evaluation
/// by the exact global adapter. Federations whose globals coincide (every
/// federation at round 0, the shadow branch's fixed base, defenses that
/// exclude exactly the same clients, skipped rounds) share them. Keys carry
/// a hash of the start adapter and a hit is confirmed against the stored
/// adapter, so a hash collision costs a retraining, never a wrong result.
/// Shared by the federations running in parallel.
#[derive(Default)]
pub struct RunCache {
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    runs: HashMap<RunKey, (Arc<LoraAdapter>, Arc<LocalRun>)>,
    /// Evictable keys, oldest first.
    order: VecDeque<RunKey>,
    evals: HashMap<u64, (LoraAdapter, Metrics)>,
}

/// Which local run of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Branch {
    /// The client's main-branch run from the current global.
    Main,
    /// Its shadow-branch run from the fixed shadow base.
    Shadow,
    /// A root-set run of the server's probe refresh.
    Refresh,
}

/// (branch, pool tag, client, round, hash of the start adapter)
type RunKey = (Branch, u32, usize, usize, u64);

/// Main-branch runs of round ≥ 1 kept at most (≈ 100 kB each with every
/// step captured): federations that share a trajectory run close together
/// in job order, so an old entry is rarely asked for again. Round-0 and
/// shadow runs, wanted by every federation, are never evicted.
const CACHE_RUNS: usize = 1_000;

/// A 64-bit FNV-1a hash of an adapter's keys and values (bit patterns).
pub fn adapter_hash(adapter: &LoraAdapter) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for entry in adapter.iter() {
        eat(entry.key.canonical().as_bytes());
        for v in entry.tensor.as_slice() {
            eat(&v.to_bits().to_le_bytes());
        }
    }
    hash
}

impl RunCache {
    /// The cached run for (`branch`, `tag`, `client`, `round`) from `start`.
    pub fn get(
        &self,
        branch: Branch,
        tag: u32,
        client: usize,
        round: usize,
        start: &LoraAdapter,
    ) -> Option<Arc<LocalRun>> {
        let key = (branch, tag, client, round, adapter_hash(start));
        let inner = self.lock();
        let (stored, run) = inner.runs.get(&key)?;
        (**stored == *start).then(|| Arc::clone(run))
    }

    /// Stores a run (the first one stored for a key wins: two federations
    /// may train the same run at once, with identical results).
    pub fn put(
        &self,
        branch: Branch,
        tag: u32,
        client: usize,
        round: usize,
        start: &LoraAdapter,
        run: LocalRun,
    ) -> Arc<LocalRun> {
        let key = (branch, tag, client, round, adapter_hash(start));
        let mut inner = self.lock();
        if let Some((stored, existing)) = inner.runs.get(&key)
            && **stored == *start
        {
            return Arc::clone(existing);
        }
        let run = Arc::new(run);
        inner
            .runs
            .insert(key, (Arc::new(start.clone()), Arc::clone(&run)));
        if branch != Branch::Shadow && round > 0 {
            inner.order.push_back(key);
            while inner.order.len() > CACHE_RUNS {
                if let Some(old) = inner.order.pop_front() {
                    inner.runs.remove(&old);
                }
            }
        }
        run
    }

    /// The run for the key, trained by `train` on a miss.
    fn get_or_train(
        &self,
        (branch, tag, client, round): (Branch, u32, usize, usize),
        start: &LoraAdapter,
        train: impl FnOnce() -> Result<LocalRun, String>,
    ) -> Result<Arc<LocalRun>, String> {
        if let Some(run) = self.get(branch, tag, client, round, start) {
            return Ok(run);
        }
        // Trained outside the lock.
        let run = train()?;
        Ok(self.put(branch, tag, client, round, start, run))
    }

    /// The metrics of `global`, evaluated by `evaluate` on a miss.
    pub fn evaluate(
        &self,
        global: &LoraAdapter,
        evaluate: impl FnOnce() -> Result<Metrics, String>,
    ) -> Result<Metrics, String> {
        let hash = adapter_hash(global);
        if let Some((stored, metrics)) = self.lock().evals.get(&hash)
            && stored == global
        {
            return Ok(*metrics);
        }
        let metrics = evaluate()?;
        self.lock()
            .evals
            .entry(hash)
            .or_insert_with(|| (global.clone(), metrics));
        Ok(metrics)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Maps `f` over `items` on the current rayon pool, keeping order (`main`
/// runs everything inside a pool of `--threads` workers); `threads <= 1`
/// maps in order on this thread. One item per task, so uneven items (a
/// federation with a shadow branch costs more) are balanced by work stealing.
/// (The tiny model's tensors are far below burn-flex's own parallel
/// thresholds, so clients or whole federations are the unit of parallelism.)
pub fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync + Send,
) -> Vec<R> {
    if threads <= 1 || items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    items.par_iter().with_max_len(1).map(f).collect()
}

/// One federation of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    /// The attack scenario.
    pub scenario: Scenario,
    /// Malicious share, percent.
    pub percent: u32,
    /// The defense.
    pub defense: Defense,
}

/// What every federation shares.
pub struct Shared<'a> {
    /// Settings, model, devices.
    pub setup: &'a Setup<'a>,
    /// Training data.
    pub pools: &'a Pools,
    /// Held-out evaluation data.
    pub eval: &'a EvalSet,
    /// The round-0 adapter.
    pub round0: &'a LoraAdapter,
    /// The probe of the probe phase.
    pub probe: &'a LinearProbe,
    /// The surrogate attacker's own probe (`adaptive:surrogate` only).
    pub surrogate: Option<&'a LinearProbe>,
    /// The shadow branch (fixed base and learning rate).
    pub shadow: &'a ShadowBranch,
    /// Runs identical across federations.
    pub cache: &'a RunCache,
    /// Progress.
    pub progress: &'a dyn Progress,
}

/// Runs one federation (one scenario, malicious share and defense), returning
/// one record per round (plus round 0, before any training).
pub fn federate(shared: &Shared<'_>, job: Job) -> Result<Vec<RoundRecord>, String> {
    let Shared {
        setup,
        pools,
        eval,
        round0,
        probe,
        surrogate,
        shadow,
        cache,
        progress,
    } = *shared;
    let Job {
        scenario,
        percent,
        defense,
    } = job;
    let cfg = setup.config;
    let n_mal = cfg.malicious_clients(percent);
    let malicious = malicious_set(cfg.clients, n_mal, cfg.seed);
    let tag = |k: usize| pool_tag(scenario, malicious.get(k).copied().unwrap_or(false));
    let pool_of = |t: u32, k: usize| pools.pool(t, k as u64, cfg.seed);
    let data = ClientData::new(
        (0..cfg.clients).map(|k| pool_of(tag(k), k)).collect(),
        setup.plan(cfg.seed),
    );
    // A liar's benign decoy data: the pool it would hold if it were benign.
    let decoy = ClientData::new(
        (0..cfg.clients).map(|k| pool_of(BENIGN, k)).collect(),
        setup.plan(cfg.seed),
    );
    let ctx = RuleContext {
        clients_per_round: cfg.clients_per_round,
        expected_malicious: (cfg.clients_per_round as f64 * f64::from(percent) / 100.0).round()
            as usize,
        seed: cfg.seed,
        samples_per_step: cfg.batch_size as u64,
    };
    let mut server =
        Server::new(defense, ctx, probe, shadow, &cfg.specs).map_err(|e| e.to_string())?;
    let refresh = if defense.refreshes() {
        Some(
            ProbeRefresh::new(cfg.refresh_every.max(1) as u32)
                .map_err(|e| e.to_string())?
                .trainer(probe_trainer(cfg, 3)),
        )
    } else {
        None
    };
    let mut global = (*round0).clone();
    let mut model = setup.model.clone();
    let initial = cache.evaluate(&global, || Ok(eval.evaluate(&model, &setup.devices.eval)))?;
    let mut records = vec![record(job, 0, initial, &[], &[], &[], false, 0.0, 0.0)];
    for round in 0..cfg.rounds {
        let lr = round_lr(cfg.lr, cfg.min_lr, round, cfg.rounds);
        let mut chosen = selection(cfg, round);
        if defense == Defense::Oracle {
            chosen.retain(|&k| !malicious[k]);
        }
        // In a round the scenario spends honest (sleeper, alternate), its
        // clients train and report exactly as benign ones.
        let attacking = scenario.attacks_in(round);
        let is_mal = |k: usize| attacking && malicious.get(k).copied().unwrap_or(false);
        let mut round_seconds = 0.0;
        let mut defense_seconds = 0.0;

        // Probe refresh from the server's root set, before scoring this round.
        if let Some(refresh) = &refresh
            && refresh.is_due(round as u32)
        {
            let t0 = Instant::now();
            let root = cfg.refresh_runs;
            let replays: Vec<usize> = (0..2 * root).collect();
            let runs = parallel_map(&replays, setup.threads, |&i| {
                let bad = i % 2 == 1;
                let id = (cfg.clients + cfg.probe_runs + i / 2) as u64;
                let tag = if bad { HARMFUL } else { BENIGN };
                let run = cache.get_or_train(
                    (Branch::Refresh, tag, id as usize, round),
                    &global,
                    || labelled_run(setup, pools, &global, id, bad, lr, cfg.seed ^ 0x0052_4F4F),
                )?;
                let steps = run
                    .steps
                    .iter()
                    .map(|s| LoraDelta::between(s, &global))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let label = if bad { Label::Malicious } else { Label::Benign };
                Ok::<_, String>(LabelledRun::new(label, steps))
            });
            let runs: Vec<LabelledRun> = runs.into_iter().collect::<Result<_, _>>()?;
            let current = server.probe().cloned();
            if let Some(current) = current {
                match refresh.refit(round as u32, &current, &runs) {
                    Ok(refreshed) => server.set_probe(refreshed.probe),
                    // A root set the calibrated trainer cannot separate keeps
                    // the old probe; the run goes on and the table shows it.
                    Err(e) => eprintln!("{}: refresh kept the old probe: {e}", defense.name()),
                }
            }
            let s = t0.elapsed().as_secs_f64();
            round_seconds += s;
            defense_seconds += s;
        }

        let capture = if server.captures_steps() {
            Capture::EveryStep
        } else {
            Capture::LastOnly
        };
        // Every step is kept, whatever this server needs, so that the run
        // can be replayed to any federation.
        let main_run = |t: u32, k: usize, data: &ClientData| -> Result<Arc<LocalRun>, String> {
            cache.get_or_train((Branch::Main, t, k, round), &global, || {
                local_train(
                    setup.model,
                    &global,
                    &data.round_batches(k, round),
                    lr,
                    cfg.lora,
                    Capture::EveryStep,
                    &setup.devices.train,
                )
            })
        };
        let shadow_run = |t: u32, k: usize, data: &ClientData| {
            cache.get_or_train((Branch::Shadow, t, k, round), shadow.base(), || {
                local_train(
                    setup.model,
                    shadow.base(),
                    &data.round_batches(k, round),
                    shadow.learning_rate(),
                    cfg.lora,
                    Capture::EveryStep,
                    &setup.devices.train,
                )
            })
        };
        let (tag, data) = (
            |k: usize| if is_mal(k) { tag(k) } else { BENIGN },
            |k: usize| if is_mal(k) { &data } else { &decoy },
        );
        let runs = parallel_map(&chosen, setup.threads, |&k| main_run(tag(k), k, data(k)));
        let runs: Vec<Arc<LocalRun>> = runs.into_iter().collect::<Result<_, _>>()?;
        for run in &runs {
            round_seconds += run.seconds;
            defense_seconds += if capture == Capture::EveryStep {
                run.capture_seconds
            } else {
                0.0
            };
        }
        // The round's benign updates (what an omniscient attacker sees).
        let benign_deltas: Vec<LoraDelta> = chosen
            .iter()
            .zip(&runs)
            .filter(|(k, _)| !is_mal(**k))
            .map(|(_, r)| LoraDelta::between(&r.adapter, &global))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let attackers = chosen.iter().filter(|&&k| is_mal(k)).count();
        // The probe the adaptive attacker evades: the round-0 probe (stale),
        // the server's current one (white-box, after any refresh) or its own.
        let knowledge = scenario.knowledge();
        let attack_probe = match knowledge {
            Some(Knowledge::White | Knowledge::JustUnder) => server.probe().unwrap_or(probe),
            Some(Knowledge::Surrogate) => {
                surrogate.ok_or("adaptive:surrogate: no surrogate probe was trained")?
            }
            _ => probe,
        }
        .clone();
        let mut declared = vec![cfg.samples_per_round(); chosen.len()];
        let colluding = sybil_updates(
            scenario,
            &SybilRound {
                chosen: &chosen,
                runs: &runs,
                global: &global,
                is_mal: &is_mal,
                admission: &server_admission(defense, &ctx, &cfg.specs),
                samples: cfg.samples_per_round(),
            },
        )?;
        let mut reports = Vec::with_capacity(chosen.len());
        for (i, (&k, run)) in chosen.iter().zip(&runs).enumerate() {
            let id = k.to_string();
            let mut update = run.adapter.clone();
            let mut steps = run.steps.clone();
            if is_mal(k) && scenario.crafts_update() {
                let own = LoraDelta::between(&run.adapter, &global).map_err(|e| e.to_string())?;
                let crafted = match colluding.iter().find(|c| c.0 == k) {
                    Some((_, delta, samples)) => {
                        if let Some(d) = declared.get_mut(i) {
                            *d = *samples;
                        }
                        delta.clone()
                    }
                    None => craft(
                        scenario,
                        &own,
                        &Craft {
                            benign: &benign_deltas,
                            probe: &attack_probe,
                            clients: chosen.len(),
                            attackers,
                            seed: cfg.seed ^ ((round as u64) << 16) ^ k as u64,
                        },
                    )?,
                };
                update = apply(&global, &crafted)?;
                if capture == Capture::EveryStep {
                    steps = if let Some(knowledge) = knowledge {
                        evade_trail(knowledge, &attack_probe, &global, &run.steps)?
                    } else {
                        // Honest steps, the last one replaced by the sent
                        // update so that the trail check passes.
                        let mut s = run.steps.clone();
                        if let Some(last) = s.last_mut() {
                            *last = update.clone();
                        }
                        s
                    };
                }
            }
            if is_mal(k) && scenario.lies_in_trail() && capture == Capture::EveryStep {
                // A benign run's trail, its last step the real update.
                let fake = main_run(BENIGN, k, &decoy)?;
                round_seconds += fake.seconds;
                steps = fake.steps.clone();
                if let Some(last) = steps.last_mut() {
                    *last = update.clone();
                }
            }
            let samples = declared.get(i).copied().unwrap_or(cfg.samples_per_round());
            let mut report = ClientReport::new(id.clone(), update, samples);
            if capture == Capture::EveryStep {
                report = report.with_steps(StepsReport::Adapters(steps));
            }
            if server.needs_shadow(&id) {
                let lie = is_mal(k) && scenario.lies_in_shadow();
                let shadow_run = if lie {
                    shadow_run(BENIGN, k, &decoy)?
                } else {
                    shadow_run(tag(k), k, data(k))?
                };
                round_seconds += shadow_run.seconds;
                defense_seconds += shadow_run.seconds;
                let shadow_steps = if let Some(knowledge) = knowledge.filter(|_| is_mal(k)) {
                    evade_trail(knowledge, &attack_probe, shadow.base(), &shadow_run.steps)?
                } else {
                    shadow_run.steps.clone()
                };
                report = report.with_shadow(StepsReport::Adapters(shadow_steps));
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
        let metrics = cache.evaluate(&global, || {
            model.load_lora(&global, &setup.devices.train)?;
            Ok(eval.evaluate(&model, &setup.devices.eval))
        })?;
        // Ground truth is who is malicious, honest rounds included.
        let truth: Vec<bool> = chosen.iter().map(|&k| malicious[k]).collect();
        records.push(record(
            job,
            round + 1,
            metrics,
            &truth,
            &outcome.flagged,
            &outcome.factors,
            skipped,
            round_seconds,
            defense_seconds,
        ));
        progress.tick(&format!(
            "{scenario} {percent}% {} r{}",
            defense.name(),
            round + 1
        ));
    }
    Ok(records)
}

#[allow(clippy::too_many_arguments)]
fn record(
    job: Job,
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
        scenario: job.scenario,
        malicious_percent: job.percent,
        defense: job.defense,
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
