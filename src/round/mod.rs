//! The defended round: the pipeline that strings the crate's stages together.
//!
//! ```text
//!  client message ──► admission ──► probe ──► detector ──► safety gate ──► aggregator
//!  (bytes, counts,    (keys, shapes, (server-   (scores in,   (mean factor    (any rule;
//!   step trail,        finiteness,    computed   factor out)   below the       reads the
//!   shadow report)     norm bound,    scores,                  threshold →     admitted
//!                      sample policy, trail                    skip)           updates)
//!                      probe keys)    check)
//! ```
//!
//! Every client message is hostile until admitted ([`admission`]): it reaches
//! no detector and no rule before its keys, shapes, values, magnitude and
//! sample count have passed the [`Admission`] policy, whose defaults fail
//! closed. The probe scores what the server can compute itself; evidence the
//! client computed is marked [`Provenance::SelfReported`] in the audit record.
//! [`DefendedRound`] runs the whole pipeline and returns one typed, JSON-line
//! [`RoundOutcome`] per round.
//!
//! The stages themselves live in their own modules and know nothing of each
//! other: [`crate::lora`] (reading updates), [`crate::features`] and
//! [`crate::probe`] (scoring), [`crate::detect`] (pure levels: scores in,
//! factor out), [`crate::aggregate`] (pure rules). This module adds what only a
//! round has: admission, the trail check, the step recorder and the shadow
//! branch used on the client side, and the audit record.

pub mod admission;
mod audit;
pub mod commit;
mod defended;
mod params;
mod refresh;
mod report;
mod scoring;
mod spec;
mod steps;
pub mod trail;
mod update_norm;

pub use admission::{
    Admission, AdmissionDecision, Admitted, NormBound, OverBound, Rejection, SamplePolicy,
    ShapeDifference,
};
pub use audit::{ClientOutcome, Disposition, Provenance, RoundOutcome, RoundTimings, TrailSummary};
pub use commit::{AuditDraw, AuditSpec, CommitmentStatus, ShadowCommitment, read_audit_secret};
pub use defended::DefendedRound;
pub use params::RoundParams;
pub use refresh::{LabelledRun, ProbeRefresh, Refreshed};
pub use report::{ClientReport, OwnedReport, OwnedSteps, StepsReport, borrow_reports};
pub use spec::{DefenseSpec, DetectorSpec, InlineProbe, ProbeSpec, ValidDefense};
pub use steps::{ShadowBranch, StepRecorder, score_steps};
pub use trail::{TrailCheck, TrailStatus, check_trail};
