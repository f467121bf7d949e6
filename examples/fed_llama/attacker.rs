//! What the malicious clients send: each scenario's update, step trail and
//! shadow report, built with the library's `attack` helpers from the
//! client's own training (and, for the omniscient attacks, the round's
//! other updates).

use safe_fedllm::attack::{self, Evasion, EvasionOutcome};
use safe_fedllm::lora::{LoraAdapter, LoraDelta};
use safe_fedllm::probe::{Label, LinearProbe, ProbeBuilder};
use safe_fedllm::round::{Admission, DefenseSpec, LabelledRun};

use crate::defense::{Defense, RuleContext};
use crate::experiment::{Pools, Setup, labelled_run, parallel_map, probe_trainer};
use crate::scenario::{JUST_UNDER_MARGIN, Knowledge, Scenario};
use crate::training::LocalRun;

/// What the attacker crafts its update from.
pub struct Craft<'a> {
    /// The round's benign updates (deltas from `global`).
    pub benign: &'a [LoraDelta],
    /// The probe the adaptive attacker evades (the round-0 probe, the
    /// server's current one or its own surrogate, per its knowledge).
    pub probe: &'a LinearProbe,
    /// Clients in the round.
    pub clients: usize,
    /// Attackers among the round's clients.
    pub attackers: usize,
    /// Seed of the noise.
    pub seed: u64,
}

/// The adaptive attacker's evasion of `probe` on one delta.
pub fn evade(
    knowledge: Knowledge,
    probe: &LinearProbe,
    delta: &LoraDelta,
) -> safe_fedllm::Result<EvasionOutcome> {
    match knowledge {
        Knowledge::JustUnder => attack::just_under(probe, delta, JUST_UNDER_MARGIN),
        Knowledge::Stale | Knowledge::White | Knowledge::Surrogate => {
            attack::evade_probe(probe, delta, Evasion::Remove)
        }
    }
}

/// The malicious delta the scenario sends, from the client's own trained
/// delta `own`. Unchanged for scenarios that do not craft updates (and for
/// sybils, whose updates are built for the round at once: [`sybils`]).
pub fn craft(scenario: Scenario, own: &LoraDelta, ctx: &Craft<'_>) -> Result<LoraDelta, String> {
    let e = |e: safe_fedllm::Error| format!("{scenario}: {e}");
    let benign = || {
        if ctx.benign.is_empty() {
            Err(format!(
                "{scenario}: needs at least one benign client per round"
            ))
        } else {
            Ok(ctx.benign)
        }
    };
    match scenario {
        Scenario::Adaptive(knowledge) => {
            evade(knowledge, ctx.probe, own).map(|o| o.delta).map_err(e)
        }
        Scenario::SignFlip => attack::sign_flip(own).map_err(e),
        Scenario::Scaling(k) => {
            let lambda = match k {
                Some(k) => k as f32,
                None => ctx.clients as f32 / ctx.attackers.max(1) as f32,
            };
            attack::scale(own, lambda).map_err(e)
        }
        Scenario::Noise => {
            let benign = benign()?;
            let (sum, count) = benign
                .iter()
                .flat_map(|d| d.as_adapter().iter().map(|t| t.tensor.as_slice()))
                .fold((0.0f64, 0usize), |(s, n), v| {
                    (
                        s + v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>(),
                        n + v.len(),
                    )
                });
            let rms = (sum / count.max(1) as f64).sqrt() as f32;
            let zero = attack::scale(own, 0.0).map_err(e)?;
            attack::gaussian_noise(&zero, 3.0 * rms, ctx.seed).map_err(e)
        }
        Scenario::Alie => {
            let z = attack::alie_z_max(ctx.clients, ctx.attackers).unwrap_or(1.0) as f32;
            attack::alie(benign()?, -z.abs()).map_err(e)
        }
        Scenario::Ipm => attack::ipm(benign()?, 0.5).map_err(e),
        _ => Ok(own.clone()),
    }
}

/// The sybil round: the first `k` of the round's attackers (`colluders`,
/// their own deltas) send the mean of their deltas, rescaled just inside
/// `admission` (margin 1 %), given every other client's delta and declared
/// count. Returns (delta, declared samples) per colluder, in order.
pub fn sybils(
    colluders: &[LoraDelta],
    others: &[LoraDelta],
    others_samples: &[u64],
    admission: &Admission,
) -> Result<Vec<(LoraDelta, u64)>, String> {
    let e = |e: safe_fedllm::Error| format!("sybil: {e}");
    let Some(first) = colluders.first() else {
        return Ok(Vec::new());
    };
    let mut mean = first.as_adapter().clone();
    for (key, tensor) in mean.iter_mut() {
        let name = key.canonical().to_owned();
        for (j, v) in tensor.as_mut_slice().iter_mut().enumerate() {
            let sum: f64 = colluders
                .iter()
                .filter_map(|d| d.as_adapter().get(&name).and_then(|t| t.as_slice().get(j)))
                .map(|&x| f64::from(x))
                .sum();
            *v = (sum / colluders.len() as f64) as f32;
        }
    }
    let direction = LoraDelta::from_adapter(mean);
    let out = attack::sybil(
        &direction,
        others,
        others_samples,
        admission,
        colluders.len(),
        0.01,
    )
    .map_err(e)?;
    Ok(out.into_iter().map(|s| (s.delta, s.samples)).collect())
}

/// The admission a sybil stays inside: the defense's own, or the library's
/// default (median norm and count) for a rule that admits everything, where
/// it keeps the colluders as long as a typical client.
pub fn server_admission(defense: Defense, ctx: &RuleContext, specs: &[DefenseSpec]) -> Admission {
    defense
        .spec(ctx, specs)
        .map(|s| s.admission)
        .unwrap_or_default()
}

/// One round as the sybils see it.
pub struct SybilRound<'a> {
    /// The round's clients, in order.
    pub chosen: &'a [usize],
    /// Their local runs, in the same order.
    pub runs: &'a [std::sync::Arc<LocalRun>],
    /// The round's global adapter.
    pub global: &'a LoraAdapter,
    /// Whether a client attacks this round.
    pub is_mal: &'a dyn Fn(usize) -> bool,
    /// The server's admission.
    pub admission: &'a Admission,
    /// What every honest client declares.
    pub samples: u64,
}

/// The colluders' messages under `sybil:K`: (client, delta, declared count)
/// for the first K attackers of the round; empty for other scenarios.
pub fn sybil_updates(
    scenario: Scenario,
    round: &SybilRound<'_>,
) -> Result<Vec<(usize, LoraDelta, u64)>, String> {
    let Scenario::Sybil(k) = scenario else {
        return Ok(Vec::new());
    };
    let mut colluders = Vec::new();
    let (mut ids, mut others) = (Vec::new(), Vec::new());
    for (&client, run) in round.chosen.iter().zip(round.runs) {
        let delta = LoraDelta::between(&run.adapter, round.global).map_err(|e| e.to_string())?;
        if (round.is_mal)(client) && colluders.len() < k as usize {
            ids.push(client);
            colluders.push(delta);
        } else {
            others.push(delta);
        }
    }
    let samples = vec![round.samples; others.len()];
    let sent = sybils(&colluders, &others, &samples, round.admission)?;
    Ok(ids
        .into_iter()
        .zip(sent)
        .map(|(id, (delta, n))| (id, delta, n))
        .collect())
}

/// `global + delta` as an adapter (the update a client sends).
pub fn apply(global: &LoraAdapter, delta: &LoraDelta) -> Result<LoraAdapter, String> {
    let mut out = global.clone();
    for (key, tensor) in out.iter_mut() {
        let name = key.canonical().to_owned();
        let d = delta
            .as_adapter()
            .get(&name)
            .ok_or_else(|| format!("crafted delta lacks {name}"))?;
        if d.shape() != tensor.shape() {
            return Err(format!("crafted delta: {name} has another shape"));
        }
        for (v, &x) in tensor.as_mut_slice().iter_mut().zip(d.as_slice()) {
            *v += x;
        }
    }
    Ok(out)
}

/// The step trail (or shadow report) the adaptive attacker reports: every
/// step's delta from `base` evaded as its update is, so the last step is
/// exactly the sent update.
pub fn evade_trail(
    knowledge: Knowledge,
    probe: &LinearProbe,
    base: &LoraAdapter,
    steps: &[LoraAdapter],
) -> Result<Vec<LoraAdapter>, String> {
    steps
        .iter()
        .map(|s| {
            let d = LoraDelta::between(s, base).map_err(|e| e.to_string())?;
            let evaded = evade(knowledge, probe, &d).map_err(|e| format!("adaptive trail: {e}"))?;
            apply(base, &evaded.delta)
        })
        .collect()
}

/// The surrogate attacker's labelled runs as the library takes them: each
/// run's step adapters as deltas from `start`.
pub fn labelled(
    label: Label,
    start: &LoraAdapter,
    steps: &[LoraAdapter],
) -> Result<LabelledRun, String> {
    let deltas = steps
        .iter()
        .map(|s| LoraDelta::between(s, start))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok(LabelledRun::new(label, deltas))
}

/// Labelled runs per class the surrogate attacker trains on: fewer than the
/// server's probe phase (an attacker's own budget), enough for 3 folds.
pub fn surrogate_runs(cfg: &crate::config::ExperimentConfig) -> usize {
    (cfg.probe_runs / 2).max(3)
}

/// The surrogate attacker's probe: the server's recipe ([`probe_trainer`],
/// 3 folds) on its own benign and harmful local runs from the round-0
/// adapter, drawn with its own seed and client ids, so it shares no run
/// with the server's probe phase.
pub fn surrogate_phase(
    setup: &Setup<'_>,
    pools: &Pools,
    round0: &LoraAdapter,
) -> Result<LinearProbe, String> {
    let cfg = setup.config;
    let per_class = surrogate_runs(cfg);
    let jobs: Vec<(usize, bool)> = (0..per_class)
        .flat_map(|run| [(run, false), (run, true)])
        .collect();
    let runs = parallel_map(&jobs, setup.threads, |&(run, harmful)| {
        // Client ids far beyond the federation's, the probe phase's and the
        // refresh root set's.
        let id = (cfg.clients + 10_000 + run) as u64;
        let local = labelled_run(
            setup,
            pools,
            round0,
            id,
            harmful,
            cfg.shadow_lr,
            cfg.seed ^ 0x4154_544B,
        )?;
        let label = if harmful {
            Label::Malicious
        } else {
            Label::Benign
        };
        labelled(label, round0, &local.steps)
    });
    let runs = runs.into_iter().collect::<Result<Vec<_>, _>>()?;
    let builder = ProbeBuilder::new(probe_trainer(cfg, 3));
    attack::surrogate_probe(&builder, &runs).map_err(|e| format!("surrogate probe: {e}"))
}
