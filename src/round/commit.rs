//! Unannounced shadow audits by commit–reveal.
//!
//! The evidence level audits a client frozen as benign only now and then. If
//! the client learns *before it trains* whether this round is an audit, it
//! can train an honest shadow branch only when audited and skip it (or send
//! nothing) otherwise. Commit–reveal takes that knowledge away:
//!
//! 1. **Commit.** Every client the level may audit trains its shadow branch
//!    every round and uploads, with its update, a [`ShadowCommitment`]: a
//!    SHA-256 over the canonical bytes of its shadow report, bound to the
//!    round and its id. It keeps the report itself.
//! 2. **Draw.** After the uploads, the server draws which commitments to
//!    open with an [`AuditDraw`]: a keyed hash of (server secret, round,
//!    client) against a rate. The client does not know the secret, so it
//!    cannot predict the draw; the server cannot be accused of choosing after
//!    the fact either, because the draw is a pure function of the secret,
//!    which it can publish after the run.
//! 3. **Reveal.** Opened clients send their shadow report; the server checks
//!    it hashes to the commitment and scores it. A missing commitment, a
//!    missing reveal or a report that does not match is a broken commitment:
//!    a failed audit ([`Opening::Broken`]).
//!
//! Clients the level reads every round (collecting clients, the shadow
//! level) are always opened. The cost: every such client trains its shadow
//! branch every round (as at the shadow level); only the opened fraction is
//! sent and scored.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ClientId;
use crate::detect::{Opening, ShadowNeed};
use crate::error::{Error, Result, check_parameter};
use crate::lora::{TensorSource, element_count};
use crate::round::{ClientReport, StepsReport};

/// Values hashed per read when a source has no `f32` slice.
const CHUNK: usize = 16_384;

/// A SHA-256 commitment to one client's shadow report for one round.
///
/// Serialises as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShadowCommitment([u8; 32]);

impl ShadowCommitment {
    /// The commitment to `shadow` by `client` in `round`: SHA-256 over
    /// `"safe-fedllm/shadow-commitment/v1\0"`, the round (u32 LE), the id's
    /// length (u64 LE) and UTF-8 bytes, then the report: a tag (0 none,
    /// 1 adapters, 2 scores), the step count (u64 LE) and, per step, either
    /// its score (f32 LE bits) or its tensors in canonical key order, each as
    /// key length and bytes, rows and cols (u64 LE) and the values (f32 LE
    /// bits, row-major). A client in another language computes the same
    /// bytes (`docs/threat-model.md`, "Commit–reveal audits").
    pub fn of(round: u32, client: &ClientId, shadow: &StepsReport<'_>) -> Result<Self> {
        let mut h = Sha256::new();
        h.update(b"safe-fedllm/shadow-commitment/v1\0");
        h.update(round.to_le_bytes());
        hash_str(&mut h, client.as_str());
        match shadow {
            StepsReport::None => {
                h.update([0u8]);
                h.update(0u64.to_le_bytes());
            }
            StepsReport::Adapters(steps) => {
                h.update([1u8]);
                h.update((steps.len() as u64).to_le_bytes());
                for step in steps {
                    hash_adapter(&mut h, *step)?;
                }
            }
            StepsReport::Scores(scores) => {
                h.update([2u8]);
                h.update((scores.len() as u64).to_le_bytes());
                for s in scores.iter() {
                    h.update(s.to_bits().to_le_bytes());
                }
            }
        }
        Ok(ShadowCommitment(h.finalize().into()))
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// From 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ShadowCommitment(bytes)
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(text: &str) -> Result<Self> {
        let shown: String = text.chars().take(80).collect();
        let bad = || {
            Error::parameter(
                "shadow commitment",
                "hex",
                &shown,
                "64 hex digits (a SHA-256)",
            )
        };
        hex32(text).map(ShadowCommitment).ok_or_else(bad)
    }
}

/// 32 bytes from 64 hex digits (either case); `None` for anything else.
fn hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = text.get(2 * i..2 * i + 2)?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// Reads the server's audit secret ([`AuditDraw`]) from a file holding 64
/// hex digits (surrounding white space ignored), the form a deployment keeps
/// beside, never inside, its [`DefenseSpec`](crate::round::DefenseSpec).
/// Errors name the file but never echo its contents.
pub fn read_audit_secret(path: impl AsRef<std::path::Path>) -> Result<[u8; 32]> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    hex32(text.trim()).ok_or_else(|| {
        Error::in_file(
            path,
            Error::parameter(
                "audits",
                "secret",
                "<hidden>",
                "64 hex digits (32 bytes from the OS's random source)",
            ),
        )
    })
}

impl fmt::Debug for ShadowCommitment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShadowCommitment({})", self.to_hex())
    }
}

impl Serialize for ShadowCommitment {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ShadowCommitment {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ShadowCommitment::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

fn hash_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

fn hash_adapter(h: &mut Sha256, step: &dyn TensorSource) -> Result<()> {
    let keys: Vec<&str> = step.lora_keys().map(|k| k.canonical()).collect();
    h.update((keys.len() as u64).to_le_bytes());
    let mut buf = Vec::new();
    for key in keys {
        hash_str(h, key);
        let [rows, cols] = step.shape_of(key).unwrap_or([0, 0]);
        h.update((rows as u64).to_le_bytes());
        h.update((cols as u64).to_le_bytes());
        let n = element_count(step, key)?;
        let mut offset = 0;
        while offset < n {
            let len = CHUNK.min(n - offset);
            buf.resize(len, 0.0f32);
            step.read_range(key, offset, &mut buf)?;
            for v in &buf {
                h.update(v.to_bits().to_le_bytes());
            }
            offset += len;
        }
    }
    Ok(())
}

/// The server's secret draw of which shadow commitments to open.
///
/// `opens(round, client)` is true when the first 8 bytes of
/// SHA-256(`"safe-fedllm/audit-draw/v1\0"` ‖ secret ‖ round ‖ client), read
/// as a little-endian u64, fall below `rate · 2⁶⁴`: each client is opened
/// independently with probability `rate`, and nobody without the secret can
/// tell which. Keep the secret on the server (generate it from the OS's
/// random source); publish it after the run if clients may check the draw.
/// `Debug` never prints it.
#[derive(Clone, PartialEq)]
pub struct AuditDraw {
    secret: [u8; 32],
    rate: f64,
}

impl fmt::Debug for AuditDraw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditDraw")
            .field("secret", &"<hidden>")
            .field("rate", &self.rate)
            .finish()
    }
}

/// The `[audits]` section of a [`DefenseSpec`](crate::round::DefenseSpec):
/// how often commit–reveal opens a commitment. The server secret the draw is
/// keyed with is **not** part of the spec (a spec is shared, diffed and
/// logged; a known secret makes the draw predictable): the server gives it
/// to the round with
/// [`DefendedRound::with_audit_secret`](crate::round::DefendedRound::with_audit_secret),
/// and a round whose spec asks for audits refuses to run without it.
///
/// ```
/// use safe_fedllm::round::DefenseSpec;
///
/// let spec = DefenseSpec::from_toml("[detector]\nlevel = \"evidence\"\n[audits]\nrate = 0.25\n")?;
/// assert_eq!(spec.audits.map(|a| a.rate), Some(0.25));
/// // Out of range: an error naming the key.
/// let bad = DefenseSpec::from_toml("[audits]\nrate = 0.0\n")?.check().unwrap_err();
/// assert!(bad.to_string().contains("audits.rate"), "{bad}");
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSpec {
    /// The probability ∈ (0, 1] with which each audited commitment is opened
    /// (`1 / audit_interval` audits as often, on average, as the reference's
    /// announced schedule).
    pub rate: f64,
}

impl AuditSpec {
    /// Fails unless the rate is a probability in (0, 1].
    pub fn check(&self) -> Result<()> {
        let rate = self.rate;
        check_parameter(
            rate.is_finite() && rate > 0.0 && rate <= 1.0,
            "audits",
            "rate",
            rate,
            "a probability in (0, 1]",
        )
    }

    /// The draw at this rate, keyed with the server's `secret`.
    pub fn draw(&self, secret: [u8; 32]) -> Result<AuditDraw> {
        AuditDraw::new(secret, self.rate)
    }
}

impl AuditDraw {
    /// A draw opening each audited commitment with probability `rate`
    /// ∈ (0, 1] (validated by [`AuditSpec::check`]).
    pub fn new(secret: [u8; 32], rate: f64) -> Result<Self> {
        AuditSpec { rate }.check()?;
        Ok(AuditDraw { secret, rate })
    }

    /// The probability with which a commitment is opened.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Whether `client`'s commitment is opened in `round`.
    pub fn opens(&self, round: u32, client: &ClientId) -> bool {
        if self.rate >= 1.0 {
            return true;
        }
        let mut h = Sha256::new();
        h.update(b"safe-fedllm/audit-draw/v1\0");
        h.update(self.secret);
        h.update(round.to_le_bytes());
        hash_str(&mut h, client.as_str());
        let digest: [u8; 32] = h.finalize().into();
        let mut head = [0u8; 8];
        head.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
        let u = u64::from_le_bytes(head) as f64 / 2f64.powi(64);
        u < self.rate
    }
}

/// What became of a client's shadow commitment this round (in the audit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum CommitmentStatus {
    /// Committed and not drawn: the report stays with the client.
    Sealed,
    /// Opened, and the revealed report matches the commitment.
    Opened,
    /// The client sent no commitment although the level may audit it.
    Missing,
    /// Opened, and the client revealed nothing.
    NotRevealed,
    /// Opened, and the revealed report does not hash to the commitment.
    Mismatch,
}

impl CommitmentStatus {
    /// True for a broken commitment (missing, not revealed, mismatched).
    pub fn is_broken(&self) -> bool {
        matches!(
            self,
            CommitmentStatus::Missing | CommitmentStatus::NotRevealed | CommitmentStatus::Mismatch
        )
    }
}

/// How the round treats one client's shadow report.
pub(crate) struct ShadowPlan {
    /// Whether the shadow report is scored this round.
    pub read: bool,
    /// What the detector is told.
    pub opening: Opening,
    /// The commitment's fate, for the audit (`None` without commit–reveal).
    pub status: Option<CommitmentStatus>,
}

/// Decides whether `report`'s shadow is read. Without a draw the level's
/// announced schedule (`scheduled`) decides; with one, every client the
/// level may read must have committed, [`ShadowNeed::EveryRound`] clients
/// are always opened and [`ShadowNeed::Audit`] clients when drawn.
pub(crate) fn plan(
    draw: Option<&AuditDraw>,
    need: ShadowNeed,
    scheduled: bool,
    round: u32,
    report: &ClientReport<'_>,
) -> Result<ShadowPlan> {
    let Some(draw) = draw else {
        return Ok(ShadowPlan {
            read: scheduled,
            opening: Opening::Scheduled,
            status: None,
        });
    };
    let broken = |status| ShadowPlan {
        read: false,
        opening: Opening::Broken,
        status: Some(status),
    };
    let opened = match need {
        ShadowNeed::Never => {
            return Ok(ShadowPlan {
                read: false,
                opening: Opening::Scheduled,
                status: None,
            });
        }
        ShadowNeed::EveryRound => true,
        ShadowNeed::Audit => draw.opens(round, report.client),
    };
    let Some(commitment) = report.shadow_commitment else {
        return Ok(broken(CommitmentStatus::Missing));
    };
    if !opened {
        return Ok(ShadowPlan {
            read: false,
            opening: Opening::Sealed,
            status: Some(CommitmentStatus::Sealed),
        });
    }
    if matches!(report.shadow, StepsReport::None) {
        return Ok(broken(CommitmentStatus::NotRevealed));
    }
    if ShadowCommitment::of(round, report.client, &report.shadow)? != commitment {
        return Ok(broken(CommitmentStatus::Mismatch));
    }
    Ok(ShadowPlan {
        read: true,
        opening: Opening::Opened,
        status: Some(CommitmentStatus::Opened),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commitments_bind_round_client_and_report() {
        let id = ClientId::from("c");
        let scores = [0.1f32, 0.2];
        let a = ShadowCommitment::of(3, &id, &StepsReport::Scores(&scores)).unwrap();
        assert_eq!(
            a,
            ShadowCommitment::of(3, &id, &StepsReport::Scores(&scores)).unwrap()
        );
        let other = [0.1f32, 0.21];
        for b in [
            ShadowCommitment::of(4, &id, &StepsReport::Scores(&scores)),
            ShadowCommitment::of(3, &ClientId::from("d"), &StepsReport::Scores(&scores)),
            ShadowCommitment::of(3, &id, &StepsReport::Scores(&other)),
            ShadowCommitment::of(3, &id, &StepsReport::None),
        ] {
            assert_ne!(a, b.unwrap());
        }
        assert_eq!(ShadowCommitment::from_hex(&a.to_hex()).unwrap(), a);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<ShadowCommitment>(&json).unwrap(), a);
        assert!(ShadowCommitment::from_hex("zz").is_err());
    }

    #[test]
    fn the_draw_opens_about_its_rate_and_depends_on_the_secret() {
        let draw = AuditDraw::new([7; 32], 0.25).unwrap();
        let other = AuditDraw::new([8; 32], 0.25).unwrap();
        let ids: Vec<ClientId> = (0..4000u32).map(ClientId::from).collect();
        let opened = ids.iter().filter(|c| draw.opens(5, c)).count();
        assert!((800..1200).contains(&opened), "{opened}");
        let same = ids
            .iter()
            .filter(|c| draw.opens(5, c) == other.opens(5, c))
            .count();
        assert!(same < 3400, "the secret must matter: {same}");
        assert!(AuditDraw::new([0; 32], 0.0).is_err());
        assert!(!format!("{draw:?}").contains('7'));
    }
}
