//! The defenses compared: plain FedAvg, the classic robust aggregators, and
//! the four Safe-FedLLM levels (probe → detector → safety gate → FedAvg),
//! all behind one server type. Everything here calls the library; the
//! example adds only the bookkeeping (who was flagged, how long it took).

use std::time::Instant;

use safe_fedllm::aggregate::{
    Aggregator, AggregatorSpec, AnyAggregator, ClientUpdate, CoordinateMedian, FedAvg, Flame,
    FoolsGold, Krum, MultiKrum, Trim, TrimmedMean,
};
use safe_fedllm::detect::{
    AnyDetector, ClientLevelParams, DefenseLevel, Detector as _, EvidenceLevelParams,
    ShadowLevelParams, StepLevelParams,
};
use safe_fedllm::lora::LoraAdapter;
use safe_fedllm::probe::LinearProbe;
use safe_fedllm::round::{
    Admission, DefendedRound, DefenseSpec, DetectorSpec, NormBound, OverBound, OwnedReport,
    ShadowBranch, borrow_reports,
};
use serde::{Deserialize, Serialize};

/// One defense of the comparison.
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
pub enum Defense {
    /// Plain FedAvg (weights nₖ), no defense.
    None,
    /// Coordinate-wise median (Yin et al. 2018).
    Median,
    /// Coordinate-wise trimmed mean, one per side (the reference's setting).
    TrimmedMean,
    /// Krum (Blanchard et al. 2017), the paper's variant: the winner itself.
    Krum,
    /// Multi-Krum: mean of the m best-scored clients.
    MultiKrum,
    /// FoolsGold (Fung et al. 2020).
    FoolsGold,
    /// FLAME (Nguyen et al. 2022).
    Flame,
    /// Safe-FedLLM step level.
    Step,
    /// Safe-FedLLM client level.
    Client,
    /// Safe-FedLLM shadow level.
    Shadow,
    /// Safe-FedLLM evidence level.
    Evidence,
    /// Evidence level with a tight admission norm bound (updates above
    /// 2 × the round's median norm are excluded): the combination against
    /// update-space attacks.
    EvidenceNormBound,
    /// Step level whose probe is refitted every `--refresh-every` rounds on a
    /// server-held root set replayed from the current global adapter
    /// (`round::ProbeRefresh`).
    StepRefresh,
    /// Client level with the same probe refresh.
    ClientRefresh,
    /// The oracle: plain FedAvg over the benign clients only (the malicious
    /// ones are dropped by a server that knows them). The reference for ASR
    /// and benign loss.
    Oracle,
    /// The i-th `--defense FILE` spec of the command line (a user's own
    /// configuration, run with the experiment's probe unless it names one).
    #[value(skip)]
    #[serde(rename = "spec")]
    Spec(u8),
}

/// How many `--defense FILE` specs one run compares.
pub const MAX_USER_SPECS: usize = 4;

impl Defense {
    /// Every defense, in table order.
    pub const ALL: [Defense; 15] = [
        Defense::Oracle,
        Defense::None,
        Defense::Median,
        Defense::TrimmedMean,
        Defense::Krum,
        Defense::MultiKrum,
        Defense::FoolsGold,
        Defense::Flame,
        Defense::Step,
        Defense::Client,
        Defense::Shadow,
        Defense::Evidence,
        Defense::EvidenceNormBound,
        Defense::StepRefresh,
        Defense::ClientRefresh,
    ];

    /// The defenses of the embedded default: all but the norm-bound
    /// combination, which matters only against update-space attacks (it is
    /// added when such a scenario is selected).
    pub fn defaults() -> Vec<Defense> {
        Defense::ALL
            .iter()
            .copied()
            .filter(|&d| d != Defense::EvidenceNormBound)
            .collect()
    }

    /// Short name for tables and files.
    pub fn name(self) -> &'static str {
        match self {
            Defense::None => "none (FedAvg)",
            Defense::Median => "median",
            Defense::TrimmedMean => "trimmed mean",
            Defense::Krum => "Krum",
            Defense::MultiKrum => "Multi-Krum",
            Defense::FoolsGold => "FoolsGold",
            Defense::Flame => "FLAME",
            Defense::Step => "step level",
            Defense::Client => "client level",
            Defense::Shadow => "shadow level",
            Defense::Evidence => "evidence level",
            Defense::EvidenceNormBound => "evidence + norm bound",
            Defense::StepRefresh => "step level + refresh",
            Defense::ClientRefresh => "client level + refresh",
            Defense::Oracle => "oracle (benign FedAvg)",
            Defense::Spec(i) => ["spec 1", "spec 2", "spec 3", "spec 4"]
                .get(usize::from(i))
                .copied()
                .unwrap_or("spec ?"),
        }
    }

    /// The spec a probe-based defense runs (its τ is the probe's), or the
    /// user's; `None` for the rules, which run outside the defended round.
    pub fn spec(self, ctx: &RuleContext, user: &[DefenseSpec]) -> Option<DefenseSpec> {
        if let Defense::Spec(i) = self {
            return user.get(usize::from(i)).cloned();
        }
        let per_step = ctx.samples_per_step;
        let shadow = || ShadowLevelParams::default().batch_size(per_step);
        let detector = match self.level()? {
            DefenseLevel::Step => {
                DetectorSpec::Step(StepLevelParams::default().batch_size(per_step))
            }
            DefenseLevel::Client => DetectorSpec::Client(ClientLevelParams::default()),
            DefenseLevel::Shadow => DetectorSpec::Shadow(shadow()),
            DefenseLevel::Evidence => {
                DetectorSpec::Evidence(EvidenceLevelParams::default().shadow(shadow()))
            }
        };
        let mut spec = DefenseSpec {
            detector,
            aggregator: AggregatorSpec::default(),
            ..DefenseSpec::safe()
        };
        if self == Defense::EvidenceNormBound {
            spec.admission = Admission::default()
                .norm_bound(NormBound::MedianMultiple(2.0))
                .over_bound(OverBound::Exclude);
        }
        Some(spec)
    }

    /// The Safe-FedLLM level, for the probe-based defenses.
    pub fn level(self) -> Option<DefenseLevel> {
        match self {
            Defense::Spec(_) => Some(DefenseLevel::Client),
            Defense::Step | Defense::StepRefresh => Some(DefenseLevel::Step),
            Defense::Client | Defense::ClientRefresh => Some(DefenseLevel::Client),
            Defense::Shadow => Some(DefenseLevel::Shadow),
            Defense::Evidence | Defense::EvidenceNormBound => Some(DefenseLevel::Evidence),
            _ => None,
        }
    }

    /// True when per-client detection is meaningful (coordinate-wise rules
    /// never single a client out).
    pub fn flags_clients(self) -> bool {
        !matches!(
            self,
            Defense::None | Defense::Median | Defense::TrimmedMean | Defense::Oracle
        )
    }

    /// True when the server refits its probe on its root set every K rounds.
    pub fn refreshes(self) -> bool {
        matches!(self, Defense::StepRefresh | Defense::ClientRefresh)
    }
}

/// Settings the robust rules need from the experiment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RuleContext {
    /// Clients per round.
    pub clients_per_round: usize,
    /// Expected malicious clients per round.
    pub expected_malicious: usize,
    /// Seed (FLAME's noise).
    pub seed: u64,
    /// Samples per local step (the detectors' batch × grad-accum).
    pub samples_per_step: u64,
}

impl RuleContext {
    /// Krum's f: the expected number of attackers, capped so that
    /// n ≥ 2f + 3 holds (the rule's precondition).
    pub fn krum_f(&self) -> usize {
        let cap = self.clients_per_round.saturating_sub(3) / 2;
        self.expected_malicious.min(cap)
    }
}

/// What the server did in one round.
#[derive(Debug, Clone)]
pub struct ServerRound {
    /// The new global adapter, `None` when the round was skipped.
    pub new_global: Option<LoraAdapter>,
    /// Per report (in order): did the defense suppress this client
    /// (excluded by a robust rule, or security factor below ½)?
    pub flagged: Vec<bool>,
    /// Per report: its security factor (1.0 for rules without one).
    pub factors: Vec<f64>,
    /// Server-side defense time (probe scoring, detection, robust rule).
    pub server_seconds: f64,
}

/// A server running one defense across rounds (robust rules and detectors
/// keep state between rounds).
pub enum Server {
    /// Plain FedAvg or a robust aggregator.
    Rule {
        /// The defense.
        defense: Defense,
        /// Its aggregator.
        rule: Box<dyn Aggregator + Send + Sync>,
    },
    /// A Safe-FedLLM level.
    Probe(Box<DefendedRound<LinearProbe, AnyDetector, AnyAggregator>>),
}

impl Server {
    /// The server for `defense`. The probe-based levels need the probe and the
    /// shadow branch (fixed base and learning rate).
    pub fn new(
        defense: Defense,
        ctx: RuleContext,
        probe: &LinearProbe,
        shadow: &ShadowBranch,
        user_specs: &[DefenseSpec],
    ) -> safe_fedllm::Result<Server> {
        let f = ctx.krum_f();
        let rule: Box<dyn Aggregator + Send + Sync> = match defense {
            Defense::None | Defense::Oracle => Box::new(FedAvg::plain()),
            Defense::Median => Box::new(CoordinateMedian::new()),
            Defense::TrimmedMean => Box::new(TrimmedMean::new(Trim::PerSide(1))?),
            Defense::Krum => Box::new(Krum::new(f)?),
            Defense::MultiKrum => {
                let m = ctx.clients_per_round.saturating_sub(f).max(1);
                Box::new(MultiKrum::new(f, m)?)
            }
            Defense::FoolsGold => Box::new(FoolsGold::new()),
            Defense::Flame => Box::new(Flame::new().seed(ctx.seed)),
            _ => {
                let spec =
                    defense
                        .spec(&ctx, user_specs)
                        .ok_or_else(|| safe_fedllm::Error::Spec {
                            key: "--defense".into(),
                            reason: format!("no spec for {}", defense.name()),
                            suggestion: None,
                        })?;
                let valid = spec.check()?;
                let round = if spec.probe.names_a_probe() {
                    DefendedRound::from_spec(&valid)?
                } else {
                    DefendedRound::from_spec_with_probe(&valid, probe.clone())?
                };
                return Ok(Server::Probe(Box::new(round.with_shadow(shadow.clone()))));
            }
        };
        Ok(Server::Rule { defense, rule })
    }

    /// Replaces the probe of a probe-based server (a refresh); no-op for rules.
    pub fn set_probe(&mut self, probe: LinearProbe) {
        if let Server::Probe(round) = self {
            round.set_probe(probe);
        }
    }

    /// The probe of a probe-based server.
    pub fn probe(&self) -> Option<&LinearProbe> {
        match self {
            Server::Rule { .. } => None,
            Server::Probe(round) => Some(round.probe()),
        }
    }

    /// True when clients must keep every main-branch step's adapter.
    pub fn captures_steps(&self) -> bool {
        match self {
            Server::Rule { .. } => false,
            Server::Probe(round) => round.detector().level().uses_all_steps(),
        }
    }

    /// Whether `client` must train a shadow branch this round.
    pub fn needs_shadow(&self, client: &str) -> bool {
        match self {
            Server::Rule { .. } => false,
            Server::Probe(round) => round.needs_shadow(&client.into()),
        }
    }

    /// Runs one round.
    pub fn run(
        &mut self,
        round: u32,
        global: &LoraAdapter,
        reports: &[OwnedReport],
    ) -> safe_fedllm::Result<ServerRound> {
        match self {
            Server::Rule { defense, rule } => {
                let t0 = Instant::now();
                let updates: Vec<ClientUpdate<'_>> = reports
                    .iter()
                    .map(|r| ClientUpdate::new(r.client.clone(), &r.update, r.samples))
                    .collect();
                let aggregation = rule.aggregate(global, &updates)?;
                let seconds = t0.elapsed().as_secs_f64();
                let flagged = reports
                    .iter()
                    .map(|r| aggregation.exclusion(r.client.as_str()).is_some())
                    .collect();
                Ok(ServerRound {
                    new_global: aggregation.new_global().cloned(),
                    flagged,
                    factors: vec![1.0; reports.len()],
                    // Plain FedAvg is the protocol itself, not a defense.
                    server_seconds: if matches!(*defense, Defense::None | Defense::Oracle) {
                        0.0
                    } else {
                        seconds
                    },
                })
            }
            Server::Probe(defended) => {
                let outcome = defended.run(round, global, &borrow_reports(reports))?;
                let factors: Vec<f64> = outcome.clients.iter().map(|c| c.factor).collect();
                let t = outcome.timings;
                Ok(ServerRound {
                    flagged: factors.iter().map(|&w| w < 0.5).collect(),
                    factors,
                    server_seconds: t.admission_s + t.probe_s + t.detect_s + t.aggregate_s,
                    new_global: outcome.new_global,
                })
            }
        }
    }
}
