//! Running the comparison over seeds, cell by cell, into a resumable
//! output folder: every finished federation is written to
//! `cells/<config fingerprint>/` the moment it ends, and a rerun with the
//! same configuration skips the cells already there.
//!
//! A seed reseeds the federation (malicious set, client data and order,
//! client choice, noise) and the probe phase; the pre-trained model, corpus
//! and evaluation sets are those of the base seed, so seeds differ in what
//! the defense faces, not in the model it defends.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};

use safe_fedllm::lora::LoraAdapter;
use safe_fedllm::round::ShadowBranch;

use crate::attacker::surrogate_phase;
use crate::config::ExperimentConfig;
use crate::defense::Defense;
use crate::experiment::{
    Job, Pools, ProbeReport, Progress, RoundRecord, RunCache, Setup, Shared, federate,
    parallel_map, probe_phase,
};
use crate::scenario::{Knowledge, Scenario};
use crate::training::EvalSet;
use crate::verdict::CellResult;

/// The defenses of `--zoo` besides `--defense FILE` specs and `--defenses`:
/// FedAvg (which should fail), the oracle (the reference) and the
/// strongest built-in layered defense (evidence level behind a norm bound).
pub fn zoo_defenses() -> Vec<Defense> {
    vec![Defense::Oracle, Defense::None, Defense::EvidenceNormBound]
}

/// Seeds of `--zoo` (unless `--seeds` says otherwise).
pub const ZOO_SEEDS: usize = 3;

/// Malicious shares of `--zoo` (0 % is the clean reference).
pub fn zoo_shares() -> Vec<u32> {
    vec![0, 30, 50]
}

/// One seed's federation records.
#[derive(Debug, Clone)]
pub struct SeedRun {
    /// The seed.
    pub seed: u64,
    /// One record per round (round 0 first).
    pub records: Vec<RoundRecord>,
}

impl SeedRun {
    /// The run's final figures for the verdict.
    pub fn result(&self) -> Option<CellResult> {
        let first = self.records.first()?;
        let last = self.records.last()?;
        Some(CellResult {
            scenario: first.scenario,
            percent: first.malicious_percent,
            defense: first.defense,
            seed: self.seed,
            final_asr: last.asr,
            final_loss: last.benign_loss,
        })
    }
}

/// The federations to run for one seed. At 0 % no client is malicious, so
/// every scenario is the same run, done once (under the first scenario),
/// and the oracle there is FedAvg. The oracle drops the malicious clients,
/// whatever they do, so at a share it runs once (under the first scenario)
/// and [`complete`] copies it to the others.
pub fn jobs(config: &ExperimentConfig) -> Vec<Job> {
    let mut jobs = Vec::new();
    let first = config.scenarios.first().copied();
    for &scenario in &config.scenarios {
        for &percent in &config.malicious_percent {
            for &defense in &config.defenses {
                let repeat = Some(scenario) != first;
                if repeat && (percent == 0 || defense == Defense::Oracle) {
                    continue;
                }
                let alias = percent == 0 && defense == Defense::Oracle;
                if alias && config.defenses.contains(&Defense::None) {
                    continue;
                }
                let defense = if alias { Defense::None } else { defense };
                jobs.push(Job {
                    scenario,
                    percent,
                    defense,
                });
            }
        }
    }
    jobs
}

/// The runs [`jobs`] left out, as copies: the oracle at 0 % (FedAvg's run)
/// and the oracle at every share under every scenario.
pub fn complete(config: &ExperimentConfig, runs: Vec<SeedRun>) -> Vec<SeedRun> {
    let mut out = Vec::with_capacity(runs.len());
    let first = config.scenarios.first().copied();
    let relabel = |run: &SeedRun, scenario: Scenario, defense: Defense| {
        let mut copy = run.clone();
        copy.records.iter_mut().for_each(|r| {
            r.scenario = scenario;
            r.defense = defense;
        });
        copy
    };
    for run in runs {
        let Some(head) = run.records.first() else {
            continue;
        };
        let oracle = config.defenses.contains(&Defense::Oracle);
        if oracle && head.malicious_percent == 0 && head.defense == Defense::None {
            out.push(relabel(&run, head.scenario, Defense::Oracle));
        }
        if head.defense == Defense::Oracle && head.malicious_percent > 0 {
            for &s in config.scenarios.iter().filter(|&&s| Some(s) != first) {
                out.push(relabel(&run, s, Defense::Oracle));
            }
        }
        if config.defenses.contains(&head.defense) {
            out.push(run);
        }
    }
    out
}

/// The output folder's cells for one configuration.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// `out/cells/<fingerprint>/`, created if needed. The fingerprint covers
    /// every setting that changes a cell's result (not the lists of
    /// scenarios, shares, defenses and seeds, which only choose cells).
    pub fn open(out: &Path, config: &ExperimentConfig, model: &str) -> Result<Store, String> {
        let mut key = config.clone();
        key.scenarios.clear();
        key.defenses.clear();
        key.malicious_percent.clear();
        key.seed = 0;
        let text = serde_json::to_string(&(key, model)).map_err(|e| e.to_string())?;
        let digest = Sha256::digest(text.as_bytes());
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let dir = out.join("cells").join(hex);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Store { dir })
    }

    fn path(&self, seed: u64, job: &Job) -> PathBuf {
        let name = format!(
            "{}_{}_{:?}_seed{seed}.json",
            job.scenario, job.percent, job.defense
        );
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        self.dir.join(safe)
    }

    /// The finished cell, if a previous run wrote it (an unreadable file
    /// counts as not finished and is recomputed).
    pub fn load(&self, seed: u64, job: &Job) -> Option<Vec<RoundRecord>> {
        let text = std::fs::read_to_string(self.path(seed, job)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes a finished cell (to a temporary name first, so an
    /// interrupted write never leaves a half cell behind).
    pub fn save(&self, seed: u64, job: &Job, records: &[RoundRecord]) -> Result<(), String> {
        let path = self.path(seed, job);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string(records).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// What every seed shares.
pub struct Bench<'a> {
    /// Model, codec, corpus, devices of the base seed.
    pub setup: &'a Setup<'a>,
    /// Held-out evaluation data.
    pub eval: &'a EvalSet,
    /// The round-0 adapter.
    pub round0: &'a LoraAdapter,
    /// Progress.
    pub progress: &'a dyn Progress,
    /// Where finished cells go.
    pub store: &'a Store,
}

/// Runs every job for `seeds` seeds (base, base + 1, ...), skipping the
/// cells the store already holds. Calls `on_probe` with each seed's probe
/// report when a seed needs its probe phase.
pub fn run_seeds(
    bench: &Bench<'_>,
    seeds: usize,
    mut on_probe: impl FnMut(u64, &ProbeReport) -> Result<(), String>,
) -> Result<Vec<SeedRun>, String> {
    let base = bench.setup.config;
    let jobs = jobs(base);
    let mut all = Vec::new();
    for i in 0..seeds.max(1) {
        let seed = base.seed.wrapping_add(i as u64);
        let mut config = base.clone();
        config.seed = seed;
        let setup = Setup {
            config: &config,
            ..*bench.setup
        };
        let mut pending = Vec::new();
        for job in &jobs {
            match bench.store.load(seed, job) {
                Some(records) => all.push(SeedRun { seed, records }),
                None => pending.push(*job),
            }
        }
        if pending.is_empty() {
            println!("seed {seed}: all {} cells already done", jobs.len());
            continue;
        }
        println!(
            "seed {seed} ({}/{}): {} cells to run, {} already done",
            i + 1,
            seeds.max(1),
            pending.len(),
            jobs.len() - pending.len()
        );
        let pools = Pools::new(&setup);
        let probe = probe_phase(&setup, &pools, bench.round0, bench.progress)?;
        on_probe(seed, &probe)?;
        let surrogate = if pending
            .iter()
            .any(|j| j.scenario.knowledge() == Some(Knowledge::Surrogate))
        {
            Some(surrogate_phase(&setup, &pools, bench.round0)?)
        } else {
            None
        };
        let shadow = ShadowBranch::with_learning_rate(bench.round0.clone(), config.shadow_lr)
            .map_err(|e| e.to_string())?;
        let cache = RunCache::default();
        let shared = Shared {
            setup: &setup,
            pools: &pools,
            eval: bench.eval,
            round0: bench.round0,
            probe: &probe.probe,
            surrogate: surrogate.as_ref(),
            shadow: &shadow,
            cache: &cache,
            progress: bench.progress,
        };
        bench.progress.start(
            &format!("seed {}/{}", i + 1, seeds.max(1)),
            (pending.len() * config.rounds) as u64,
        );
        let results = federate_all(&shared, &pending, |job, records| {
            bench.store.save(seed, job, records)
        });
        bench.progress.finish();
        for records in results {
            all.push(SeedRun {
                seed,
                records: records?,
            });
        }
    }
    Ok(complete(base, all))
}

/// Runs the jobs on `setup.threads` workers, one federation per task, its
/// clients as nested tasks: federations keep every worker busy (evaluation
/// and the server run in parallel too, not only client training), and a
/// worker left idle at the end steals the clients of a federation still
/// running. `done` receives each finished federation at once (the store
/// writes it); its error fails that job.
pub fn federate_all(
    shared: &Shared<'_>,
    jobs: &[Job],
    done: impl Fn(&Job, &[RoundRecord]) -> Result<(), String> + Sync,
) -> Vec<Result<Vec<RoundRecord>, String>> {
    parallel_map(jobs, shared.setup.threads, |job| {
        let records = federate(shared, *job)?;
        done(job, &records)?;
        Ok(records)
    })
}

/// Reads a factor that was written as `null` (JSON has no NaN) back as NaN.
pub fn nan_or<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}
