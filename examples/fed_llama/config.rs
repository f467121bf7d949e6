//! The experiment's settings, with the defaults of the embedded run. Saved
//! as `config.json` beside the outputs so a run can be reproduced.

use serde::{Deserialize, Serialize};

use safe_fedllm::probe::Threshold;

use crate::defense::Defense;
use crate::model::LlamaConfig;
use crate::scenario::Scenario;
use crate::training::{LoraSettings, PretrainConfig};

/// Every setting of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentConfig {
    /// Seed of everything random (model init, data order, client choice).
    pub seed: u64,
    /// The tiny model's shape (ignored with `--gguf`, whose file decides).
    pub model: LlamaConfig,
    /// Pre-training of the tiny model.
    pub pretrain: PretrainConfig,
    /// LoRA rank and α on q_proj / v_proj.
    pub lora: LoraSettings,
    /// Clients in the federation.
    pub clients: usize,
    /// Clients sampled per round.
    pub clients_per_round: usize,
    /// Federated rounds.
    pub rounds: usize,
    /// Local optimiser steps per client per round.
    pub local_steps: usize,
    /// Rows per local step.
    pub batch_size: usize,
    /// Rows in a client's private pool.
    pub samples_per_client: usize,
    /// Initial local learning rate (cosine-decayed per round).
    pub lr: f64,
    /// Learning rate the cosine decay ends at.
    pub min_lr: f64,
    /// Fixed learning rate of the shadow branch and of the probe's runs.
    pub shadow_lr: f64,
    /// Malicious shares to compare, in percent of the clients.
    pub malicious_percent: Vec<u32>,
    /// Defenses to compare.
    pub defenses: Vec<Defense>,
    /// The `--defense FILE` specs, in order (`Defense::Spec(i)` is the i-th).
    #[serde(default)]
    pub specs: Vec<safe_fedllm::round::DefenseSpec>,
    /// Attack scenarios to compare.
    pub scenarios: Vec<Scenario>,
    /// Labelled local runs per class in the probe phase.
    pub probe_runs: usize,
    /// Folds of the calibrated probe trainer (group k-fold, one group per run).
    pub probe_folds: usize,
    /// The probe's threshold policy (on calibrated out-of-fold scores).
    pub threshold: Threshold,
    /// Rounds between probe refreshes of the `+ refresh` defenses.
    pub refresh_every: usize,
    /// Root-set runs per class the server replays at each refresh.
    pub refresh_runs: usize,
    /// Share of the probe runs held out for the AUC.
    pub probe_holdout: f64,
    /// Evaluate on at most this many held-out unsafe prompts and as many
    /// benign ones (0 = all); a real model's forward passes are costly.
    pub eval_limit: usize,
}

impl ExperimentConfig {
    /// The embedded default: a tiny LLaMA (2 layers, d = 64, 4 query / 2 KV
    /// heads), 10 clients all sampled every round, 12 rounds of 6 local steps.
    ///
    /// Learning rates are the reference's schedule scaled to a 100 k-parameter
    /// model: the reference fine-tunes 8 B-parameter models at 5e-5 with
    /// batch 16; a model this small (LoRA r = 8 on d = 64) needs ≈ 100× more
    /// per step to move as far in a few steps. The shadow branch uses the
    /// initial local rate, as the reference's shadow rate (5e-5) equals its
    /// initial local rate.
    pub fn embedded(vocab_size: usize) -> Self {
        ExperimentConfig {
            seed: 17,
            model: LlamaConfig {
                vocab_size,
                d_model: 64,
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: 2,
                d_ff: 176,
                max_seq_len: 40,
                rope_theta: 10_000.0,
                rms_eps: 1e-5,
                tie_embeddings: true,
            },
            pretrain: PretrainConfig {
                steps: 600,
                batch: 32,
                lr: 4e-3,
            },
            lora: LoraSettings {
                rank: 8,
                alpha: 16.0,
            },
            clients: 10,
            clients_per_round: 10,
            rounds: 12,
            local_steps: 6,
            batch_size: 8,
            samples_per_client: 40,
            lr: 3e-2,
            min_lr: 2e-3,
            shadow_lr: 3e-2,
            malicious_percent: vec![0, 30, 50],
            defenses: Defense::defaults(),
            specs: Vec::new(),
            scenarios: vec![Scenario::Poison],
            probe_runs: 16,
            probe_folds: 5,
            threshold: Threshold::default(),
            refresh_every: 4,
            refresh_runs: 4,
            probe_holdout: 0.25,
            eval_limit: 0,
        }
    }

    /// A small configuration for a real GGUF model (`--gguf`): 4 clients,
    /// 2 rounds of 3 steps at batch 4, FedAvg and the shadow level at 0 % and
    /// 50 % malicious, 32 held-out unsafe prompts. Learning rates are those
    /// of LoRA on a 100 M-parameter model (the reference's 5e-5 is for 8 B
    /// parameters).
    pub fn gguf_small(vocab_size: usize) -> Self {
        let mut cfg = Self::embedded(vocab_size);
        cfg.clients = 4;
        cfg.clients_per_round = 4;
        cfg.rounds = 2;
        cfg.local_steps = 3;
        cfg.batch_size = 4;
        cfg.samples_per_client = 24;
        cfg.lr = 5e-4;
        cfg.min_lr = 5e-5;
        cfg.shadow_lr = 5e-4;
        cfg.malicious_percent = vec![0, 50];
        cfg.defenses = vec![Defense::None, Defense::Shadow];
        cfg.probe_runs = 4;
        cfg.probe_holdout = 0.25;
        cfg.eval_limit = 32;
        cfg
    }

    /// `--gguf PATH --preset smollm2`: issue 11's real-model comparison on
    /// SmolLM2-135M-Instruct, sized for ≤ 45 min on 2 cores: FedAvg, the
    /// coordinate median (one classic robust rule), client, shadow and
    /// evidence level at 0, 30 and 50 % malicious plus the oracle, 8 clients
    /// for 4 rounds of 3 steps at batch 4; the probe is fitted by the
    /// calibrated trainer on 10 labelled runs per class (30 deltas each),
    /// 2 runs of each held out. See `BENCHMARKS.md` for the time estimate.
    pub fn smollm2(vocab_size: usize) -> Self {
        let mut cfg = Self::gguf_small(vocab_size);
        cfg.clients = 8;
        cfg.clients_per_round = 8;
        cfg.rounds = 4;
        cfg.local_steps = 3;
        cfg.batch_size = 4;
        cfg.samples_per_client = 24;
        cfg.malicious_percent = vec![0, 30, 50];
        cfg.defenses = vec![
            Defense::Oracle,
            Defense::None,
            Defense::Median,
            Defense::Client,
            Defense::Shadow,
            Defense::Evidence,
        ];
        cfg.probe_runs = 10;
        cfg.probe_holdout = 0.2;
        cfg.probe_folds = 4;
        cfg.eval_limit = 32;
        cfg
    }

    /// A miniature configuration for the end-to-end test (seconds in debug).
    pub fn miniature(vocab_size: usize) -> Self {
        let mut cfg = Self::embedded(vocab_size);
        cfg.model.d_model = 32;
        cfg.model.n_layers = 1;
        cfg.model.n_heads = 2;
        cfg.model.n_kv_heads = 1;
        cfg.model.d_ff = 64;
        cfg.pretrain.steps = 25;
        cfg.pretrain.batch = 16;
        cfg.clients = 6;
        cfg.clients_per_round = 6;
        cfg.rounds = 3;
        cfg.local_steps = 3;
        cfg.batch_size = 4;
        cfg.samples_per_client = 20;
        cfg.lr = 2e-2;
        cfg.min_lr = 2e-3;
        cfg.shadow_lr = 2e-2;
        cfg.malicious_percent = vec![50];
        cfg.probe_runs = 10;
        cfg.probe_holdout = 0.3;
        cfg
    }

    /// Rejects settings the experiment cannot run with.
    pub fn check(&self) -> Result<(), String> {
        self.model.check()?;
        let positive = [
            ("clients", self.clients),
            ("clients_per_round", self.clients_per_round),
            ("rounds", self.rounds),
            ("local_steps", self.local_steps),
            ("batch_size", self.batch_size),
            ("samples_per_client", self.samples_per_client),
            ("probe_runs", self.probe_runs),
            ("probe_folds", self.probe_folds),
            ("refresh_every", self.refresh_every),
            ("refresh_runs", self.refresh_runs),
            ("scenarios", self.scenarios.len()),
            ("lora.rank", self.lora.rank),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} must be > 0"));
            }
        }
        if self.clients_per_round > self.clients {
            return Err(format!(
                "clients_per_round {} > clients {}",
                self.clients_per_round, self.clients
            ));
        }
        for (name, lr) in [
            ("lr", self.lr),
            ("min_lr", self.min_lr),
            ("shadow_lr", self.shadow_lr),
        ] {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(format!("{name} must be finite and > 0, got {lr}"));
            }
        }
        if !(0.0..1.0).contains(&self.probe_holdout) {
            return Err(format!(
                "probe_holdout must be in [0, 1), got {}",
                self.probe_holdout
            ));
        }
        if let Some(p) = self.malicious_percent.iter().find(|&&p| p > 100) {
            return Err(format!("malicious share {p} % > 100 %"));
        }
        if self.defenses.is_empty() || self.malicious_percent.is_empty() {
            return Err("nothing to compare: no defense or no malicious share".into());
        }
        Ok(())
    }

    /// Number of malicious clients at `percent` % (rounded).
    pub fn malicious_clients(&self, percent: u32) -> usize {
        ((self.clients * percent as usize) as f64 / 100.0).round() as usize
    }

    /// Samples one local run trains on (FedAvg's nₖ).
    pub fn samples_per_round(&self) -> u64 {
        (self.local_steps * self.batch_size) as u64
    }
}
