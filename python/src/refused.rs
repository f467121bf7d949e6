//! A reply the server could not read as an update, handed to the core's
//! admission so that one code path decides every reply of a round.
//!
//! The Flower strategy (and any caller) may know before the round that a
//! reply is unusable: it failed, its node dropped out, its arrays are not
//! float32 matrices with LoRA names, its sample count is not an integer.
//! Deciding those outside the core would leave them out of the safety gate's
//! mean (rejected clients count 0 there) and out of the round's audit record.
//! Instead such a reply enters the round as a [`Refused`] source: it mirrors
//! the global adapter's keys and shapes, so the structure stage passes it on,
//! and every value read fails with the refusal, so the admission stage
//! records `Rejection::Unreadable` carrying the reason, the client gets
//! factor 0 in the gate, and nothing of it reaches a detector or a rule.

use safe_fedllm::lora::{LoraKey, TensorSource};
use safe_fedllm::{Error, Result};

/// Why a reply was refused: a short code (`"failed"`, `"dropped"`, an
/// exception class name, …) and the detail.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Short machine-readable code.
    pub code: String,
    /// What was wrong.
    pub detail: String,
}

impl Refusal {
    /// The error every read of the refused source returns; its text is the
    /// audit's rejection reason.
    fn error(&self) -> Error {
        Error::InvalidMetadata {
            field: "reply".to_owned(),
            value: self.code.clone(),
            reason: self.detail.clone(),
        }
    }
}

/// A source with the global's keys and shapes whose values cannot be read.
pub struct Refused<'a> {
    entries: Vec<(LoraKey, [usize; 2])>,
    refusal: &'a Refusal,
}

impl<'a> Refused<'a> {
    /// Mirrors `global`'s layout; every read fails with `refusal`.
    pub fn new(global: &dyn TensorSource, refusal: &'a Refusal) -> Self {
        let entries = global
            .lora_keys()
            .filter_map(|k| global.shape_of(k.canonical()).map(|s| (k.clone(), s)))
            .collect();
        Refused { entries, refusal }
    }
}

impl TensorSource for Refused<'_> {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        Box::new(self.entries.iter().map(|(k, _)| k))
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.entries
            .iter()
            .find(|(k, _)| k.canonical() == canonical)
            .map(|(_, s)| *s)
    }

    fn read_range(&self, _canonical: &str, _offset: usize, _out: &mut [f32]) -> Result<()> {
        Err(self.refusal.error())
    }

    fn as_f32(&self, _canonical: &str) -> Option<&[f32]> {
        None
    }
}
