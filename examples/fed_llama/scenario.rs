//! Attack scenarios (`--scenario`, several allowed): what the malicious
//! clients train on and what they send. The default is the paper's attacker
//! (all-harmful data, everything else honest); the others are issue 11's
//! attackers beyond it, built with the library's `attack` helpers.

use safe_fedllm::attack::{self, Evasion};
use safe_fedllm::lora::{LoraAdapter, LoraDelta};
use safe_fedllm::probe::LinearProbe;
use serde::{Deserialize, Serialize};

/// One attack scenario.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// The paper's attacker: all of its data is harmful, its report honest.
    Poison,
    /// Mixed poisoning: 10 % of each malicious client's data is harmful.
    Mixed10,
    /// Mixed poisoning: 30 % of each malicious client's data is harmful.
    Mixed30,
    /// Adaptive: knows the (round-0) linear probe and removes the probe
    /// direction from its update, its step trail and its shadow report
    /// (`attack::evade_probe`, `Evasion::Remove`), keeping its harmful training.
    Adaptive,
    /// Lies in its step trail: trains on harmful data and reports a benign
    /// run's steps, with the last step replaced by its real update (so the
    /// server's trail check, last step == update, passes).
    LieTrail,
    /// Lies in its shadow report: trains on harmful data and reports the
    /// shadow branch of a benign run (the server cannot recompute it).
    LieShadow,
    /// Sign flip (Damaskinos et al. 2018): trains on benign data, sends −Δ.
    SignFlip,
    /// Scaling / model replacement (Bagdasaryan et al. 2020): trains on
    /// harmful data, sends λ·Δ with λ = clients per round / attackers.
    Scaling,
    /// Gaussian Byzantine worker (Blanchard et al. 2017): sends N(0, σ²)
    /// with σ = 3 × the RMS of the benign updates of the round.
    Noise,
    /// A Little Is Enough (Baruch et al. 2019): μ − z_max·σ over the
    /// round's benign updates (omniscient attacker).
    Alie,
    /// Inner-product manipulation (Xie et al. 2020): −ε·mean of the benign
    /// updates, ε = 0.5.
    Ipm,
}

impl Scenario {
    /// Short name for tables and files.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Poison => "poison",
            Scenario::Mixed10 => "mixed 10%",
            Scenario::Mixed30 => "mixed 30%",
            Scenario::Adaptive => "adaptive",
            Scenario::LieTrail => "lie trail",
            Scenario::LieShadow => "lie shadow",
            Scenario::SignFlip => "sign flip",
            Scenario::Scaling => "scaling",
            Scenario::Noise => "noise",
            Scenario::Alie => "ALIE",
            Scenario::Ipm => "IPM",
        }
    }

    /// Share of a malicious client's pool that is harmful.
    pub fn harmful_share(self) -> f64 {
        match self {
            Scenario::Mixed10 => 0.1,
            Scenario::Mixed30 => 0.3,
            // Untargeted update-space attacks start from an honest-looking
            // benign update.
            Scenario::SignFlip | Scenario::Noise | Scenario::Alie | Scenario::Ipm => 0.0,
            _ => 1.0,
        }
    }

    /// True for the untargeted attacks, whose damage shows in the benign
    /// loss, not in the ASR: a defense holds when the benign loss stays near
    /// the oracle's.
    pub fn untargeted(self) -> bool {
        matches!(
            self,
            Scenario::SignFlip | Scenario::Noise | Scenario::Alie | Scenario::Ipm
        )
    }

    /// True when the malicious client needs a benign decoy run (its lie).
    pub fn needs_decoy(self) -> bool {
        matches!(self, Scenario::LieTrail | Scenario::LieShadow)
    }

    /// True when the attack rewrites the update after training.
    pub fn crafts_update(self) -> bool {
        matches!(
            self,
            Scenario::Adaptive
                | Scenario::SignFlip
                | Scenario::Scaling
                | Scenario::Noise
                | Scenario::Alie
                | Scenario::Ipm
        )
    }
}

/// What the attacker crafts its update from.
pub struct Craft<'a> {
    /// The round's benign updates (deltas from `global`).
    pub benign: &'a [LoraDelta],
    /// The probe the adaptive attacker knows.
    pub probe: &'a LinearProbe,
    /// Clients per round and attackers among them.
    pub clients: usize,
    /// Attackers among the round's clients.
    pub attackers: usize,
    /// Seed of the noise.
    pub seed: u64,
}

/// The malicious delta the scenario sends, from the client's own trained
/// delta `own`. Unchanged for scenarios that do not craft updates.
pub fn craft(scenario: Scenario, own: &LoraDelta, ctx: &Craft<'_>) -> Result<LoraDelta, String> {
    let e = |e: safe_fedllm::Error| format!("{}: {e}", scenario.name());
    let benign = || {
        if ctx.benign.is_empty() {
            Err(format!(
                "{}: needs at least one benign client per round",
                scenario.name()
            ))
        } else {
            Ok(ctx.benign)
        }
    };
    match scenario {
        Scenario::Adaptive => attack::evade_probe(ctx.probe, own, Evasion::Remove)
            .map(|o| o.delta)
            .map_err(e),
        Scenario::SignFlip => attack::sign_flip(own).map_err(e),
        Scenario::Scaling => {
            let lambda = ctx.clients as f32 / ctx.attackers.max(1) as f32;
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

/// The step trail the adaptive attacker reports: every step's delta with the
/// probe direction removed, the last one being exactly the sent update.
pub fn evade_trail(
    probe: &LinearProbe,
    base: &LoraAdapter,
    steps: &[LoraAdapter],
) -> Result<Vec<LoraAdapter>, String> {
    steps
        .iter()
        .map(|s| {
            let d = LoraDelta::between(s, base).map_err(|e| e.to_string())?;
            let evaded = attack::evade_probe(probe, &d, Evasion::Remove)
                .map_err(|e| format!("adaptive trail: {e}"))?;
            apply(base, &evaded.delta)
        })
        .collect()
}
