//! Attack scenarios (`--scenario`, several allowed): what the malicious
//! clients train on, when, and what they send. A scenario is a parsed value
//! with parameters (`mixed:0.3`, `scaling:5`, `adaptive:white`, `sleeper:4`,
//! `sybil:3`, ...); its text form is also its serialised form. The default
//! is the paper's attacker (all-harmful data, everything else honest).
//! What each attacker is assumed to know is stated on its variant.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What the adaptive attacker knows of the server's probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Knowledge {
    /// The round-0 probe only (`adaptive`): it removes that direction every
    /// round, whatever the server refitted since.
    Stale,
    /// White-box (`adaptive:white`): the server's current probe, weights and
    /// τ, every round (after a refresh too); removes its direction.
    White,
    /// Grey-box (`adaptive:surrogate`): the recipe, not the probe; trains
    /// its own probe once on its own benign and harmful runs (its own seed)
    /// and removes that direction (`attack::surrogate_probe`).
    Surrogate,
    /// White-box (`adaptive:just-under`): the current probe and τ; shrinks
    /// its probe component so the score sits [`JUST_UNDER_MARGIN`] below τ
    /// (`attack::just_under`), keeping more harm than removing it.
    JustUnder,
}

/// How far below τ the just-under attacker places its score.
pub const JUST_UNDER_MARGIN: f32 = 0.05;

/// One attack scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scenario {
    /// The paper's attacker (`poison`): all of its data is harmful, its
    /// report honest.
    Poison,
    /// Mixed poisoning (`mixed:P`): a share P ∈ (0, 1] of each malicious
    /// client's data is harmful, held in thousandths.
    Mixed(u16),
    /// Adaptive (`adaptive[:white|surrogate|just-under]`): trains on harmful
    /// data and evades the probe in its update, its step trail and its
    /// shadow report, with what it knows.
    Adaptive(Knowledge),
    /// Lies in its step trail (`lie-trail`): trains on harmful data and
    /// reports a benign run's steps, the last replaced by its real update
    /// (so the server's check, last step == update, passes).
    LieTrail,
    /// Lies in its shadow report (`lie-shadow`): reports the shadow branch
    /// of a benign run (the server cannot recompute it).
    LieShadow,
    /// Lies in both (`lie-both`).
    LieBoth,
    /// Sign flip (`sign-flip`, Damaskinos et al. 2018): trains on benign
    /// data, sends −Δ.
    SignFlip,
    /// Scaling / model replacement (`scaling[:K]`, Bagdasaryan et al.
    /// 2020): trains on harmful data, sends λ·Δ with λ = K, by default the
    /// round's clients / attackers.
    Scaling(Option<u32>),
    /// Gaussian Byzantine worker (`noise`, Blanchard et al. 2017): sends
    /// N(0, σ²), σ = 3 × the RMS of the round's benign updates.
    Noise,
    /// A Little Is Enough (`alie`, Baruch et al. 2019): μ − z_max·σ over
    /// the round's benign updates (omniscient).
    Alie,
    /// Inner-product manipulation (`ipm`, Xie et al. 2020): −0.5 × the
    /// benign mean (omniscient).
    Ipm,
    /// Sleeper (`sleeper:R`): honest (benign data, honest reports) for the
    /// first R rounds, then the paper's attacker.
    Sleeper(u32),
    /// Alternating (`alternate`): the paper's attacker in odd rounds
    /// (1, 3, ...), honest in even ones.
    Alternate,
    /// Sybil (`sybil:K`): up to K of a round's attackers collude, each
    /// sending the mean of their harmful updates rescaled just inside the
    /// server's admission bounds, with the largest uncapped sample count
    /// (`attack::sybil`; omniscient about the round's other updates). The
    /// other attackers of the round send their plain harmful update.
    Sybil(u32),
}

/// Every scenario form, for error messages and `--help`.
pub const FORMS: &str = "poison, mixed:P (P in (0, 1]), adaptive, adaptive:white, \
    adaptive:surrogate, adaptive:just-under, lie-trail, lie-shadow, lie-both, sign-flip, \
    scaling, scaling:K, noise, alie, ipm, sleeper:R, alternate, sybil:K";

impl Scenario {
    /// Every scenario of the zoo, one of each parameterised family at its
    /// typical setting.
    pub fn zoo() -> Vec<Scenario> {
        use Knowledge::*;
        vec![
            Scenario::Poison,
            Scenario::Mixed(300),
            Scenario::Adaptive(Stale),
            Scenario::Adaptive(White),
            Scenario::Adaptive(Surrogate),
            Scenario::Adaptive(JustUnder),
            Scenario::LieTrail,
            Scenario::LieShadow,
            Scenario::LieBoth,
            Scenario::SignFlip,
            Scenario::Scaling(None),
            Scenario::Noise,
            Scenario::Alie,
            Scenario::Ipm,
            Scenario::Sleeper(4),
            Scenario::Alternate,
            Scenario::Sybil(3),
        ]
    }

    /// Short name for tables, files and progress (the parseable form).
    pub fn name(self) -> String {
        self.to_string()
    }

    /// Share of a malicious client's pool that is harmful.
    pub fn harmful_share(self) -> f64 {
        match self {
            Scenario::Mixed(p) => f64::from(p) / 1000.0,
            // Untargeted update-space attacks start from an honest-looking
            // benign update.
            Scenario::SignFlip | Scenario::Noise | Scenario::Alie | Scenario::Ipm => 0.0,
            _ => 1.0,
        }
    }

    /// Whether the malicious clients attack in `round` (0-based); in the
    /// other rounds they behave exactly as benign clients.
    pub fn attacks_in(self, round: usize) -> bool {
        match self {
            Scenario::Sleeper(r) => round >= r as usize,
            Scenario::Alternate => round % 2 == 1,
            _ => true,
        }
    }

    /// True for the untargeted attacks, whose damage shows in the benign
    /// loss rather than the ASR.
    pub fn untargeted(self) -> bool {
        matches!(
            self,
            Scenario::SignFlip | Scenario::Noise | Scenario::Alie | Scenario::Ipm
        )
    }

    /// True when the attacker reports a benign run's step trail.
    pub fn lies_in_trail(self) -> bool {
        matches!(self, Scenario::LieTrail | Scenario::LieBoth)
    }

    /// True when the attacker reports a benign run's shadow branch.
    pub fn lies_in_shadow(self) -> bool {
        matches!(self, Scenario::LieShadow | Scenario::LieBoth)
    }

    /// What the adaptive attacker knows, `None` for the others.
    pub fn knowledge(self) -> Option<Knowledge> {
        match self {
            Scenario::Adaptive(k) => Some(k),
            _ => None,
        }
    }

    /// True when the attack rewrites the update after training.
    pub fn crafts_update(self) -> bool {
        matches!(
            self,
            Scenario::Adaptive(_)
                | Scenario::SignFlip
                | Scenario::Scaling(_)
                | Scenario::Noise
                | Scenario::Alie
                | Scenario::Ipm
                | Scenario::Sybil(_)
        )
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scenario::Poison => f.write_str("poison"),
            Scenario::Mixed(p) => write!(f, "mixed:{}", f64::from(*p) / 1000.0),
            Scenario::Adaptive(Knowledge::Stale) => f.write_str("adaptive"),
            Scenario::Adaptive(Knowledge::White) => f.write_str("adaptive:white"),
            Scenario::Adaptive(Knowledge::Surrogate) => f.write_str("adaptive:surrogate"),
            Scenario::Adaptive(Knowledge::JustUnder) => f.write_str("adaptive:just-under"),
            Scenario::LieTrail => f.write_str("lie-trail"),
            Scenario::LieShadow => f.write_str("lie-shadow"),
            Scenario::LieBoth => f.write_str("lie-both"),
            Scenario::SignFlip => f.write_str("sign-flip"),
            Scenario::Scaling(None) => f.write_str("scaling"),
            Scenario::Scaling(Some(k)) => write!(f, "scaling:{k}"),
            Scenario::Noise => f.write_str("noise"),
            Scenario::Alie => f.write_str("alie"),
            Scenario::Ipm => f.write_str("ipm"),
            Scenario::Sleeper(r) => write!(f, "sleeper:{r}"),
            Scenario::Alternate => f.write_str("alternate"),
            Scenario::Sybil(k) => write!(f, "sybil:{k}"),
        }
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (name, param) = match text.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (text, None),
        };
        let bare = |s: Scenario| match param {
            None => Ok(s),
            Some(p) => Err(format!(
                "scenario \"{name}\" takes no parameter, got \"{p}\""
            )),
        };
        let needs = |what: &str| {
            param.ok_or_else(|| format!("scenario \"{name}\" needs {what}: \"{name}:<value>\""))
        };
        match name {
            "poison" => bare(Scenario::Poison),
            // The names before scenarios took parameters.
            "mixed10" => bare(Scenario::Mixed(100)),
            "mixed30" => bare(Scenario::Mixed(300)),
            "mixed" => mixed_share(needs("a harmful share P in (0, 1]")?).map(Scenario::Mixed),
            "adaptive" => match param {
                None | Some("stale") => Ok(Scenario::Adaptive(Knowledge::Stale)),
                Some("white" | "white-box") => Ok(Scenario::Adaptive(Knowledge::White)),
                Some("surrogate") => Ok(Scenario::Adaptive(Knowledge::Surrogate)),
                Some("just-under") => Ok(Scenario::Adaptive(Knowledge::JustUnder)),
                Some(other) => Err(format!(
                    "adaptive:{other}: unknown attacker knowledge; expected white, surrogate or just-under"
                )),
            },
            "lie-trail" => bare(Scenario::LieTrail),
            "lie-shadow" => bare(Scenario::LieShadow),
            "lie-both" => bare(Scenario::LieBoth),
            "sign-flip" => bare(Scenario::SignFlip),
            "scaling" => match param {
                None => Ok(Scenario::Scaling(None)),
                Some(p) => whole(name, p, 1).map(|k| Scenario::Scaling(Some(k))),
            },
            "noise" => bare(Scenario::Noise),
            "alie" => bare(Scenario::Alie),
            "ipm" => bare(Scenario::Ipm),
            "sleeper" => whole(name, needs("the honest rounds R")?, 1).map(Scenario::Sleeper),
            "alternate" => bare(Scenario::Alternate),
            "sybil" => whole(name, needs("the colluders K")?, 1).map(Scenario::Sybil),
            _ => Err(format!(
                "unknown scenario \"{text}\"{}; expected one of: {FORMS}",
                suggestion(name)
            )),
        }
    }
}

/// `mixed:P`: P in (0, 1], to a thousandth.
fn mixed_share(p: &str) -> Result<u16, String> {
    let value: f64 = p
        .parse()
        .map_err(|_| format!("mixed:{p}: the harmful share must be a number in (0, 1]"))?;
    let permille = (value * 1000.0).round();
    if !(value.is_finite() && value > 0.0 && value <= 1.0) || permille < 1.0 {
        return Err(format!(
            "mixed:{p}: the harmful share must lie in (0, 1] (at least 0.001)"
        ));
    }
    if (permille - value * 1000.0).abs() > 1e-6 {
        return Err(format!("mixed:{p}: give the share to a thousandth"));
    }
    Ok(permille as u16)
}

/// A whole-number parameter ≥ `min`.
fn whole(name: &str, p: &str, min: u32) -> Result<u32, String> {
    match p.parse::<u32>() {
        Ok(v) if v >= min => Ok(v),
        _ => Err(format!("{name}:{p}: expected a whole number ≥ {min}")),
    }
}

/// ", did you mean ...?" for a misspelt scenario name.
fn suggestion(name: &str) -> String {
    const NAMES: [&str; 15] = [
        "poison",
        "mixed",
        "adaptive",
        "lie-trail",
        "lie-shadow",
        "lie-both",
        "sign-flip",
        "scaling",
        "noise",
        "alie",
        "ipm",
        "sleeper",
        "alternate",
        "sybil",
        "mixed30",
    ];
    NAMES
        .iter()
        .map(|n| (strsim::levenshtein(name, n), n))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map_or_else(String::new, |(_, n)| format!(" (did you mean \"{n}\"?)"))
}

impl Serialize for Scenario {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scenario {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
