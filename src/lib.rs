//! LoRA-weight probe defenses for federated fine-tuning of large language
//! models, after *Safe-FedLLM* (Tao et al., ACL 2026).
//!
//! In federated LoRA fine-tuning a server averages the adapters its clients
//! return; a client that fine-tunes on harmful data drags the global model
//! toward unsafe behaviour. The update itself carries the signature of the
//! data it was trained on, so a linear *probe* over the flattened ΔLoRA
//! separates benign from malicious updates. This crate turns the probe's
//! verdicts into per-client security factors and aggregates with them, and
//! it assumes more than the paper: a malicious client controls its whole
//! message (values, keys, counts, step trails, shadow reports) and knows the
//! defense.
//!
//! # The data path
//!
//! | stage | module | |
//! |---|---|---|
//! | adapter | [`lora`] | PEFT-named LoRA tensors, safetensors I/O with layered validation, zero-copy views |
//! | delta | [`lora`] | ΔLoRA = upload − global, computed lazily |
//! | features | [`features`] | the frozen, L2-normalised feature layout a probe reads |
//! | probe | [`probe`] | [`Probe`](probe::Probe): P(malicious) and the one threshold τ; trainers |
//! | detector | [`detect`] | [`Detector`](detect::Detector): scores in, security factor out, per-client memory |
//! | aggregator | [`aggregate`] | [`Aggregator`](aggregate::Aggregator): security-weighted FedAvg and the robust rules |
//! | round | [`round`] | admission → probe → detector → safety gate → aggregator, with an audit line |
//!
//! # One front door: the defense spec
//!
//! A whole defense — probe and τ, admission, detector level, aggregation
//! rule, safety gate — is one [`DefenseSpec`](round::DefenseSpec), written as
//! TOML or JSON. [`check`](round::DefenseSpec::check) validates it into a
//! [`ValidDefense`](round::ValidDefense), which builds the
//! [`DefendedRound`](round::DefendedRound); the same file runs through the
//! `safe-fedllm-probe round` command (feature `cli`), the Python package and
//! its Flower strategy. Every audit line records the spec's SHA-256.
//!
//! ```
//! use safe_fedllm::ClientId;
//! use safe_fedllm::detect::Verdict;
//! use safe_fedllm::features::{FeatureConfig, Selection};
//! use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
//! use safe_fedllm::probe::LinearProbe;
//! use safe_fedllm::round::{ClientReport, DefendedRound, DefenseSpec};
//!
//! let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
//! let adapter = |x: f32, y: f32| -> safe_fedllm::Result<LoraAdapter> {
//!     let mut a = LoraAdapter::new();
//!     a.insert(key, LoraTensor::new("b", [2, 1], vec![x, y])?)?;
//!     Ok(a)
//! };
//! let global = adapter(0.0, 0.0)?;
//! // A toy probe (updates along +x are malicious); a real one comes from
//! // `LinearProbe::load` or a trainer in `probe`.
//! let features = FeatureConfig::new(Selection::FirstLayerB)
//!     .fit(&[LoraDelta::between(&adapter(1.0, 0.0)?, &global)?])?;
//! let probe = LinearProbe::new(features, vec![20.0, 0.0], -10.0)?;
//!
//! let spec = DefenseSpec::from_toml(r#"
//!     [detector]
//!     level = "client"
//!     [aggregator]
//!     rule = "fedavg"
//!     [probe]
//!     threshold = 0.9
//! "#)?;
//! let mut round = DefendedRound::from_spec_with_probe(&spec.check()?, probe)?;
//!
//! let ids = [ClientId::from("alice"), ClientId::from("bob"), ClientId::from("mallory")];
//! let updates = [adapter(0.0, 1.0)?, adapter(0.0, 0.5)?, adapter(1.0, 0.0)?];
//! let reports: Vec<ClientReport> =
//!     ids.iter().zip(&updates).map(|(id, u)| ClientReport::new(id, u, 100)).collect();
//! let outcome = round.run(0, &global, &reports)?;
//! let mallory = outcome.client("mallory").unwrap();
//! assert_eq!(mallory.verdict, Verdict::Malicious);
//! assert!(mallory.factor < 0.01); // its update gets no weight
//! assert_eq!(outcome.threshold, 0.9); // the spec's τ decided every verdict
//! let _audit_line = outcome.to_json_line()?;
//! let _new_global = outcome.new_global; // None when the round is skipped
//! # Ok::<(), safe_fedllm::Error>(())
//! ```
//!
//! # Errors and threads
//!
//! Every failure is a typed [`Error`] naming the tensor, shapes, values,
//! client and round; nothing panics on input, and non-finite values are
//! rejected or excluded with a reason, never averaged in. Parallel work runs
//! on the caller's current [rayon](https://docs.rs/rayon) pool, with results
//! identical on any number of threads.
//!
//! # Features
//!
//! | feature | adds |
//! |---|---|
//! | `linfa` | linfa-logistic and linfa-svm probe trainers |
//! | `cli` | the `safe-fedllm-probe` binary: `train`, `score`, `eval`, `round` |
//! | `burn` | [`interop`]: burn 0.22 LoRA modules as a tensor source, and back |
//! | `candle` | [`interop`]: candle tensors as a tensor source, and back |
//!
//! The threat model, what each level can verify and the exact breakdown
//! points of the robust rules are in the repository's `docs/threat-model.md`
//! and `docs/detectors.md`.
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod aggregate;
pub mod attack;
mod client;
pub mod detect;
pub mod error;
pub mod features;
pub mod interop;
pub mod lora;
mod parallel;
pub mod probe;
#[doc(hidden)]
pub mod rng;
pub mod round;

pub use client::ClientId;
pub use error::{Error, Result};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The crate's traits, for `use safe_fedllm::prelude::*`.
pub mod prelude {
    pub use crate::aggregate::Aggregator;
    pub use crate::detect::Detector;
    pub use crate::lora::TensorSource;
    pub use crate::probe::Probe;
}
