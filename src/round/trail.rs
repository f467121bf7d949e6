//! Trail check: does the last reported step equal the submitted update?
//!
//! # What each level can verify
//!
//! The server receives a client's update (its adapter after local training)
//! and, depending on the level, evidence about how it got there:
//!
//! | level | evidence | what the server can check |
//! |---|---|---|
//! | client | none beyond the update | everything: the last step's ΔLoRA *is* `update − global`, scored by the server |
//! | step | adapters (or scores) after every local step | the **last** step: it must equal the update ([`check_trail`]); intermediate steps are unverifiable claims, but faking them cannot hide the last one |
//! | shadow / evidence | adapters (or scores) of the shadow branch | the scores (the server recomputes them from shadow adapters); **not** that the shadow branch was trained on the same data as the update — the client computes it alone |
//!
//! Scores a client computes itself ([`StepsReport::Scores`](super::StepsReport))
//! cannot be checked at all; use them only in simulations or with clients
//! that run trusted code.
//!
//! A failed trail check zeroes the client's factor in the defended round,
//! with the mismatch as the reason.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::lora::TensorSource;

/// How strictly the last reported step must match the submitted update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrailCheck {
    /// Do not check (trust the client's step trail).
    Off,
    /// Every value equal (`==` on `f32`): right when steps and update travel
    /// in the same dtype. The default.
    #[default]
    Exact,
    /// Every value within this absolute tolerance: for trails sent in a
    /// lower precision (f16/bf16) than the update.
    MaxAbs(f32),
}

/// The result of a trail check, as recorded in the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum TrailStatus {
    /// No step adapters were reported, or checking is off.
    NotChecked,
    /// The last reported step equals the update. Nothing is proven about the
    /// steps before it.
    Verified,
    /// The last reported step differs from the update.
    Mismatch {
        /// Where and by how much.
        reason: String,
    },
}

impl TrailStatus {
    /// True for [`TrailStatus::Mismatch`].
    pub fn is_mismatch(&self) -> bool {
        matches!(self, TrailStatus::Mismatch { .. })
    }
}

/// Compares the last reported step with the submitted update: same keys,
/// same shapes, values equal under `check`.
///
/// A difference is a [`TrailStatus::Mismatch`], not an error; errors only
/// come from reading the sources. A NaN never matches.
///
/// ```
/// use safe_fedllm::round::{check_trail, TrailCheck, TrailStatus};
/// use safe_fedllm::lora::{LoraAdapter, LoraTensor};
///
/// let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// let mut update = LoraAdapter::new();
/// update.insert(key, LoraTensor::new("b", [1, 2], vec![1.0, 2.0])?)?;
/// let mut last = update.clone();
/// assert_eq!(check_trail(&last, &update, TrailCheck::Exact)?, TrailStatus::Verified);
/// last.get_mut(key).map(|t| t.as_mut_slice()[1] = 2.001);
/// assert!(check_trail(&last, &update, TrailCheck::Exact)?.is_mismatch());
/// assert_eq!(check_trail(&last, &update, TrailCheck::MaxAbs(0.01))?, TrailStatus::Verified);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub fn check_trail(
    last_step: &(impl TensorSource + ?Sized),
    update: &(impl TensorSource + ?Sized),
    check: TrailCheck,
) -> Result<TrailStatus> {
    let tolerance = match check {
        TrailCheck::Off => return Ok(TrailStatus::NotChecked),
        TrailCheck::Exact => 0.0,
        TrailCheck::MaxAbs(t) => t,
    };
    let last_keys: Vec<&str> = last_step.lora_keys().map(|k| k.canonical()).collect();
    let update_keys: Vec<&str> = update.lora_keys().map(|k| k.canonical()).collect();
    if last_keys != update_keys {
        let missing = update_keys.iter().find(|k| !last_keys.contains(k));
        let extra = last_keys.iter().find(|k| !update_keys.contains(k));
        let reason = match (missing, extra) {
            (Some(k), _) => format!("last step lacks tensor `{k}` of the update"),
            (_, Some(k)) => format!("last step has tensor `{k}` the update lacks"),
            _ => "last step and update list their tensors differently".to_owned(),
        };
        return Ok(TrailStatus::Mismatch { reason });
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for key in last_keys {
        let (sa, sb) = (last_step.shape_of(key), update.shape_of(key));
        if sa != sb {
            let reason = format!("tensor `{key}`: last step has shape {sa:?}, update {sb:?}");
            return Ok(TrailStatus::Mismatch { reason });
        }
        let Some([rows, cols]) = sa else {
            let reason = format!("tensor `{key}` is listed without a shape");
            return Ok(TrailStatus::Mismatch { reason });
        };
        let n = rows.saturating_mul(cols);
        a.resize(n, 0.0);
        b.resize(n, 0.0);
        last_step.copy_into(key, &mut a)?;
        update.copy_into(key, &mut b)?;
        let mismatch = a
            .iter()
            .zip(&b)
            .enumerate()
            .find(|(_, (x, y))| !within(**x, **y, tolerance));
        if let Some((i, (x, y))) = mismatch {
            let reason = format!(
                "tensor `{key}` index {i}: last step {x} vs update {y} (tolerance {tolerance})"
            );
            return Ok(TrailStatus::Mismatch { reason });
        }
    }
    Ok(TrailStatus::Verified)
}

/// `|x − y| ≤ tolerance`; false when either is NaN.
fn within(x: f32, y: f32, tolerance: f32) -> bool {
    (x - y).abs() <= tolerance
}
