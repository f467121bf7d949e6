//! Aggregators: combine a round's client updates into the new global adapter.
//!
//! Every rule implements [`Aggregator`]: it takes the global adapter the round
//! started from and the clients' [`ClientUpdate`]s (their local adapters, sample
//! counts and security factors) and returns an [`Aggregation`]: the new global
//! adapter or a skip, which clients contributed with what weight, and which were
//! excluded and why.
//!
//! | rule | paper | hyper-parameters |
//! |---|---|---|
//! | [`FedAvg`] | McMahan et al. 2017; weighting of Safe-FedLLM | weighting, optional [`SafetyGate`] |
//! | [`CoordinateMedian`] | Yin et al. 2018 | — |
//! | [`TrimmedMean`] | Yin et al. 2018 | β (fraction) or a count per side |
//! | [`Krum`], [`MultiKrum`] | Blanchard et al. 2017 | f; m |
//! | [`Bulyan`] | El Mhamdi et al. 2018 | f |
//! | [`GeometricMedian`] | Pillutla et al. 2022 (RFA) | ν, tolerance, iteration cap |
//! | [`NormClipping`] | Sun et al. 2019 | fixed bound or median norm |
//! | [`FoolsGold`] | Fung et al. 2020 | κ, per-client history |
//! | [`Flame`] | Nguyen et al. 2022 | noise λ, seed |
//! | [`DnC`] | Shejwalkar & Houmansadr 2021 | f, c, sub-dimension b, iterations, seed |
//!
//! # Input policy
//!
//! * An empty round is [`Error::Empty`](crate::Error::Empty); a repeated client id
//!   [`Error::DuplicateClient`](crate::Error::DuplicateClient); a security factor
//!   outside [0, 1] [`Error::InvalidSecurityFactor`](crate::Error::InvalidSecurityFactor).
//! * Every client adapter must hold exactly the global adapter's LoRA keys with the
//!   same shapes: otherwise [`Error::Client`](crate::Error::Client) naming the
//!   client, around [`Error::MissingKey`](crate::Error::MissingKey) or
//!   [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) naming the tensor.
//!   The global adapter must be finite.
//! * A client update holding a NaN or infinity is **excluded** with
//!   [`ExclusionReason::NonFinite`] (tensor and index) and never enters any
//!   arithmetic. If no client is left the round is [`Outcome::Skipped`].
//! * A rule's size constraint (Krum n ≥ 2f + 3, Bulyan n ≥ 4f + 3, …) is checked on
//!   the clients left after exclusions and fails with
//!   [`Error::TooFewClients`](crate::Error::TooFewClients): never a silent fallback
//!   to a plain mean.
//!
//! # Updates versus weights
//!
//! Rules that only compare or average clients (FedAvg, median, trimmed mean,
//! Krum, Bulyan, geometric median) give the same result on weights and on
//! updates, because they commute with a shift of all inputs. Rules that look at
//! an update's size or direction (norm clipping, FoolsGold, FLAME, DnC) work on
//! the update Δₖ = xₖ − global and return `global + aggregate(Δ)`. Distances and
//! inner products are always computed on Δ: the global part is shared, and
//! subtracting it first avoids cancellation in `‖a‖² + ‖b‖² − 2⟨a, b⟩`.
//!
//! # Composition with security factors
//!
//! Security factors enter any rule in two ways:
//! * **Weighting**: every rule whose last step is a weighted mean takes a
//!   [`Weighting`]; [`Weighting::SamplesTimesFactor`] weighs client k by nₖ·wₖ
//!   (the Safe-FedLLM rule, [`FedAvg`]'s default). Coordinate-wise rules (median,
//!   trimmed mean, Bulyan's last stage) have no weights and ignore it.
//! * **Gating**: [`FactorGate`] wraps any rule, drops clients whose factor is
//!   below a threshold (for example Krum over clients with a positive factor)
//!   and can skip the whole round when the mean factor is too low.
//!
//! The round-level skip is one type, [`SafetyGate`]: skip iff the mean factor
//! over the round's submitted clients (non-finite ones counted as 0) is below
//! its threshold, so a mean exactly at the threshold is applied and a
//! threshold of 0 never skips. **No rule gates unless asked**: [`FedAvg::new`]
//! weighs nₖ·wₖ but does not skip; the defended round applies its gate once,
//! and a rule used on its own gets one with [`FedAvg::gate`] or
//! [`FactorGate::gate`].
//!
//! # Numerics one client cannot break
//!
//! Norms, dot products, Gram entries and distances are accumulated in `f64`
//! (each block is first tried in `f32` for speed and recomputed in `f64` when
//! the `f32` result is not finite), so an update of 1e20 or `f32::MAX` is just
//! a very distant client: robust rules exclude or out-vote it, clipping bounds
//! it, and a mean that would overflow `f32` is recomputed in `f64` and
//! saturated. NaN and ±∞ are detected before any sorting network runs (SIMD
//! min/max would silently drop a NaN) and exclude the client with
//! [`ExclusionReason::NonFinite`].
//!
//! ```
//! use safe_fedllm::aggregate::{Aggregator, ClientUpdate, FactorGate, Krum, Outcome};
//! use safe_fedllm::lora::{LoraAdapter, LoraTensor};
//!
//! let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
//! let adapter = |v: f32| -> safe_fedllm::Result<LoraAdapter> {
//!     let mut a = LoraAdapter::new();
//!     a.insert(key, LoraTensor::new("b", [1, 2], vec![v, v])?)?;
//!     Ok(a)
//! };
//! let global = adapter(0.0)?;
//! let clients: Vec<LoraAdapter> =
//!     [1.0, 1.3, 0.6, 1.1, 0.9, 50.0].into_iter().map(adapter).collect::<Result<_, _>>()?;
//! let mut updates: Vec<ClientUpdate> = clients
//!     .iter()
//!     .enumerate()
//!     .map(|(i, a)| ClientUpdate::new(format!("c{i}"), a, 100))
//!     .collect();
//! updates[5].security_factor = 0.0; // the detector flagged the outlier
//!
//! // Krum (f = 1) over the clients whose security factor is positive.
//! let mut rule = FactorGate::new(Krum::new(1)?);
//! let round = rule.aggregate(&global, &updates)?;
//! let Outcome::Updated(new_global) = &round.outcome else { panic!("not skipped") };
//! assert_eq!(new_global.get(key).map(|t| t.as_slice()), Some(&[1.0f32, 1.0][..]));
//! assert_eq!(round.exclusions.len(), 5); // c5 gated, four others not selected by Krum
//! # Ok::<(), safe_fedllm::Error>(())
//! ```
//!
//! # Threads
//!
//! Aggregation (like admission, feature extraction and probe training) runs
//! on the [rayon] pool current at the call and never spawns threads of its
//! own: run it inside your pool to cap the threads it uses, or set
//! `RAYON_NUM_THREADS` to size rayon's global pool (used when no pool is
//! installed). Rounds below about 10⁵ values stay on the calling thread.
//! Results are bit-for-bit the same on any number of threads: work is split
//! by size only and partial results are combined in a fixed order.
//!
//! ```
//! use safe_fedllm::aggregate::{Aggregator, ClientUpdate, FedAvg};
//! use safe_fedllm::lora::{LoraAdapter, LoraTensor};
//!
//! let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
//! let adapter = |v: f32| -> safe_fedllm::Result<LoraAdapter> {
//!     let mut a = LoraAdapter::new();
//!     a.insert(key, LoraTensor::new("b", [512, 512], vec![v; 512 * 512])?)?;
//!     Ok(a)
//! };
//! let global = adapter(0.0)?;
//! let clients = [adapter(1.0)?, adapter(2.0)?, adapter(3.0)?];
//! let updates: Vec<ClientUpdate> = clients
//!     .iter()
//!     .enumerate()
//!     .map(|(i, a)| ClientUpdate::new(format!("c{i}"), a, 10))
//!     .collect();
//!
//! // At most 2 threads for this aggregation, whatever the machine has (a
//! // server builds its pool once and reuses it for every round).
//! let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
//! let round = pool.install(|| FedAvg::new().aggregate(&global, &updates))?;
//! let new_global = round.new_global().ok_or("round skipped")?;
//! assert_eq!(new_global.get(key).map(|t| t.as_slice()[0]), Some(2.0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::lora::{LoraAdapter, TensorSource};

mod any;
mod bulyan;
mod clipping;
mod coordinate;
mod dnc;
mod engine;
mod fedavg;
mod flame;
mod foolsgold;
mod gate;
mod geomed;
mod krum;
mod lanczos;
mod linalg;
mod simd;
mod updates;

pub use any::{AggregatorSpec, AnyAggregator, ClipBoundName, ClipBoundSpec, KrumVariantName};
pub use bulyan::Bulyan;
pub use clipping::{ClipBound, NormClipping};
pub use coordinate::{CoordinateMedian, Trim, TrimmedMean};
pub use dnc::DnC;
pub use fedavg::FedAvg;
pub use flame::Flame;
pub use foolsgold::{FoolsGold, FoolsGoldState};
pub use gate::{Admit, FactorGate, SafetyGate};
pub use geomed::GeometricMedian;
pub use krum::{Krum, KrumVariant, MultiKrum};
pub use updates::{flatten, unflatten};

pub use crate::client::ClientId;

/// One client's contribution to a round: its local adapter (full weights, not
/// a delta), how many samples it trained on, and its security factor.
///
/// The adapter is borrowed through the object-safe [`TensorSource`] trait, so
/// the server keeps uploads wherever it likes — an owned [`LoraAdapter`], a
/// validated [`AdapterView`](crate::lora::AdapterView) over the uploaded
/// safetensors bytes (F32, F16 or BF16), a tensor library's module — and the
/// aggregator never copies them. Sources that hold native `f32` are read in
/// place ([`TensorSource::as_f32`]); any other source is converted one chunk
/// at a time into per-task scratch buffers, so a round of n BF16 uploads
/// needs O(threads × n × chunk) extra memory, independent of the adapter size.
#[derive(Clone)]
pub struct ClientUpdate<'a> {
    /// Who sent it.
    pub client: ClientId,
    /// The client's adapter after local training (PEFT orientation).
    pub adapter: &'a dyn TensorSource,
    /// Number of local training samples nₖ (FedAvg's weight).
    pub samples: u64,
    /// Security factor wₖ in [0, 1] from a detector; 1.0 (fully trusted) by
    /// default. Validated (finite, in [0, 1]) when the round is aggregated.
    pub security_factor: f64,
}

impl std::fmt::Debug for ClientUpdate<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientUpdate")
            .field("client", &self.client)
            .field("tensors", &self.adapter.lora_keys().count())
            .field("samples", &self.samples)
            .field("security_factor", &self.security_factor)
            .finish()
    }
}

impl<'a> ClientUpdate<'a> {
    /// An update with security factor 1.0.
    ///
    /// `adapter` is any [`TensorSource`]: `&LoraAdapter`, `&AdapterView`,
    /// `&dyn TensorSource`, … (the reference coerces to `&dyn TensorSource`).
    pub fn new(client: impl Into<ClientId>, adapter: &'a dyn TensorSource, samples: u64) -> Self {
        ClientUpdate {
            client: client.into(),
            adapter,
            samples,
            security_factor: 1.0,
        }
    }

    /// Sets the security factor (validated when the round is aggregated).
    pub fn with_security_factor(mut self, factor: f64) -> Self {
        self.security_factor = factor;
        self
    }
}

/// How a rule whose last step is a mean weighs the clients it kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// Every kept client counts the same (the robust rules' papers). Default
    /// for every rule except [`FedAvg`].
    #[default]
    Uniform,
    /// Weight nₖ, the client's sample count (plain FedAvg; Flower's Multi-Krum).
    Samples,
    /// Weight nₖ·wₖ: sample count times security factor (Safe-FedLLM).
    SamplesTimesFactor,
}

/// The result of one aggregation round.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregation {
    /// The new global adapter, or why the round was skipped.
    pub outcome: Outcome,
    /// Clients whose update entered the result, with their weight.
    pub contributions: Vec<Contribution>,
    /// Clients left out, with the reason.
    pub exclusions: Vec<Exclusion>,
}

impl Aggregation {
    /// The new global adapter, `None` when the round was skipped.
    pub fn new_global(&self) -> Option<&LoraAdapter> {
        match &self.outcome {
            Outcome::Updated(adapter) => Some(adapter),
            Outcome::Skipped { .. } => None,
        }
    }

    /// True when the global adapter stays unchanged this round.
    pub fn is_skipped(&self) -> bool {
        matches!(self.outcome, Outcome::Skipped { .. })
    }

    /// The contribution of one client, if it contributed.
    pub fn contribution(&self, client: &str) -> Option<&Contribution> {
        self.contributions
            .iter()
            .find(|c| c.client.as_str() == client)
    }

    /// The exclusion of one client, if it was excluded.
    pub fn exclusion(&self, client: &str) -> Option<&Exclusion> {
        self.exclusions.iter().find(|e| e.client.as_str() == client)
    }
}

/// What the round produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The new global adapter (same keys and shapes as the old one; the old
    /// one's non-LoRA extras and config are carried over).
    Updated(LoraAdapter),
    /// The global adapter stays as it was.
    Skipped {
        /// Why.
        reason: SkipReason,
    },
}

/// Why a round was skipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SkipReason {
    /// The mean security factor of the round's clients is below the safety
    /// gate's threshold (Safe-FedLLM `skip_avg_weight`).
    LowMeanSecurityFactor {
        /// Mean factor over the round's clients (excluded non-finite updates count as 0).
        mean: f64,
        /// The gate's threshold ([`SafetyGate::threshold`]).
        threshold: f64,
    },
    /// Every client was excluded.
    NoClientLeft,
    /// The kept clients' weights sum to zero.
    ZeroTotalWeight,
    /// Too few clients were left for the rule's size constraint, even after
    /// the removed ones were counted against its Byzantine budget (reported
    /// by the defended round instead of failing the round).
    TooFewClients {
        /// The rule's name.
        rule: String,
        /// The constraint, e.g. `n ≥ 2f + 3 with f = 1`.
        constraint: String,
        /// Clients the constraint needs.
        required: usize,
        /// Clients left.
        found: usize,
    },
}

/// How a contributing client's weight is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Share {
    /// The result is exactly Σ weightₖ·xₖ (weights sum to 1 over contributors),
    /// or for clipping rules Σ weightₖ·clip(Δₖ) added to the global adapter.
    Exact,
    /// A coordinate-wise rule (median, trimmed mean, Bulyan): which client
    /// supplies a coordinate varies; the weight is the nominal 1/m.
    CoordinateWise,
}

/// A client whose update entered the result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    /// The client.
    pub client: ClientId,
    /// Its normalised weight (contributors' weights sum to 1).
    pub weight: f64,
    /// How to read `weight`.
    pub share: Share,
    /// The factor the rule scaled the client's update Δ by before averaging
    /// (norm clipping, FLAME); 1.0 for rules that do not scale.
    pub scale: f64,
}

/// A client left out of the round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exclusion {
    /// The client.
    pub client: ClientId,
    /// Why.
    pub reason: ExclusionReason,
}

/// Why a client was left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ExclusionReason {
    /// The update holds a NaN or infinity.
    NonFinite {
        /// Tensor key.
        tensor: String,
        /// Row-major index of the first offending value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The rule's weight for this client is zero (no samples, or a zero
    /// security factor under [`Weighting::SamplesTimesFactor`]).
    ZeroWeight,
    /// [`FactorGate`] dropped the client for its security factor.
    BelowFactorGate {
        /// The client's factor.
        factor: f64,
    },
    /// Krum, Multi-Krum or Bulyan did not select the client.
    NotSelected {
        /// Its Krum score (sum of squared distances to its n − f − 2 nearest
        /// neighbours; lower is better). For Bulyan, the score in the last
        /// selection step it took part in.
        score: f64,
    },
    /// FLAME's clustering put the client outside the majority cluster.
    OutsideMajorityCluster {
        /// Single-linkage cosine distance at which the client joins the
        /// majority cluster (larger = further away).
        link_distance: f64,
    },
    /// DnC flagged the client as an outlier along the top singular direction.
    DnCOutlier {
        /// Its outlier score (largest over the iterations in which it was flagged).
        score: f64,
    },
    /// FoolsGold gave the client weight zero (its update history is too
    /// similar to another client's: a likely sybil).
    FoolsGoldZeroWeight {
        /// Its largest pardoned cosine similarity to another client's history.
        max_similarity: f64,
    },
}

/// A rule that turns a round's client updates into the new global adapter.
///
/// `&mut self` because some rules (FoolsGold) keep per-client state across
/// rounds; stateless rules simply ignore it.
///
/// An outside rule reads each client through its [`TensorSource`] (an owned
/// adapter, a zero-copy view of the upload, a burn or candle module) and
/// reports who contributed:
///
/// ```
/// use safe_fedllm::aggregate::{Aggregation, Aggregator, ClientUpdate, Contribution, Outcome, Share, SkipReason};
/// use safe_fedllm::lora::{LoraAdapter, LoraTensor};
///
/// /// An outside rule: the unweighted mean of the clients' adapters.
/// struct PlainMean;
///
/// impl Aggregator for PlainMean {
///     fn name(&self) -> &'static str {
///         "plain_mean"
///     }
///     fn aggregate(
///         &mut self,
///         global: &LoraAdapter,
///         updates: &[ClientUpdate<'_>],
///     ) -> safe_fedllm::Result<Aggregation> {
///         if updates.is_empty() {
///             let outcome = Outcome::Skipped { reason: SkipReason::NoClientLeft };
///             return Ok(Aggregation { outcome, contributions: vec![], exclusions: vec![] });
///         }
///         let mut new = global.clone();
///         let n = updates.len() as f32;
///         for (key, tensor) in new.iter_mut() {
///             let values = tensor.as_mut_slice();
///             values.fill(0.0);
///             let mut buffer = vec![0.0f32; values.len()];
///             for update in updates {
///                 update.adapter.copy_into(key.canonical(), &mut buffer)?;
///                 values.iter_mut().zip(&buffer).for_each(|(v, x)| *v += x / n);
///             }
///         }
///         let contributions = updates
///             .iter()
///             .map(|u| Contribution { client: u.client.clone(), weight: 1.0 / f64::from(n), share: Share::Exact, scale: 1.0 })
///             .collect();
///         Ok(Aggregation { outcome: Outcome::Updated(new), contributions, exclusions: vec![] })
///     }
/// }
///
/// let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// let adapter = |v: f32| -> safe_fedllm::Result<LoraAdapter> {
///     let mut a = LoraAdapter::new();
///     a.insert(key, LoraTensor::new("b", [1, 2], vec![v, -v])?)?;
///     Ok(a)
/// };
/// let (global, a, b) = (adapter(0.0)?, adapter(1.0)?, adapter(3.0)?);
/// let updates = [ClientUpdate::new("a", &a, 10), ClientUpdate::new("b", &b, 30)];
/// let round = PlainMean.aggregate(&global, &updates)?;
/// assert_eq!(round.new_global().unwrap().get(key).unwrap().as_slice(), [2.0, -2.0]);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub trait Aggregator: Send + Sync {
    /// Short rule name for reports and errors (`"fedavg"`, `"krum"`, …).
    fn name(&self) -> &'static str;

    /// Aggregates one round. `global` is the adapter the clients started from.
    ///
    /// See the [module docs](self) for the input policy.
    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation>;

    /// Aggregates a round from which `removed` of its clients were already
    /// taken out as untrustworthy (rejected by admission, a failed trail
    /// check, a factor gate).
    ///
    /// A rule with a Byzantine budget (f of Krum, Multi-Krum, Bulyan and DnC;
    /// the per-side trim k of the trimmed mean) counts them against it: it
    /// runs with f − removed (k − removed; at least 0) over `updates`,
    /// so one liar removed from a round of exactly the minimum size (Krum
    /// n = 2f + 3, Bulyan n = 4f + 3) never makes the rest too few. This
    /// assumes every removed client is one of the f; an honest client
    /// removed by mistake lowers the number of Byzantine clients tolerated
    /// among the rest. Rules without a budget ignore `removed` (the default).
    fn aggregate_after_removal(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
        removed: usize,
    ) -> Result<Aggregation> {
        let _ = removed;
        self.aggregate(global, updates)
    }
}

impl<A: Aggregator + ?Sized> Aggregator for Box<A> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        (**self).aggregate(global, updates)
    }

    fn aggregate_after_removal(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
        removed: usize,
    ) -> Result<Aggregation> {
        (**self).aggregate_after_removal(global, updates, removed)
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<FedAvg>();
    check::<CoordinateMedian>();
    check::<TrimmedMean>();
    check::<Krum>();
    check::<MultiKrum>();
    check::<Bulyan>();
    check::<GeometricMedian>();
    check::<NormClipping>();
    check::<FoolsGold>();
    check::<Flame>();
    check::<DnC>();
    check::<FactorGate<Krum>>();
    check::<Aggregation>();
    check::<ClientUpdate<'static>>();
    check::<Box<dyn Aggregator + Send + Sync>>();
}
