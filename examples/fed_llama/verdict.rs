//! The strict verdict over seeds: a cell (defense × scenario × malicious
//! share) holds when, in **every** seed, its final ASR is at most the clean
//! run's + [`ASR_TOLERANCE`] and its final benign loss at most the oracle's
//! × [`LOSS_FACTOR`]. The clean run is the same defense at 0 % malicious
//! with the same seed; the oracle is FedAvg over the benign clients at the
//! same share with the same seed. Written as `verdict.csv` and as a heat
//! map, `verdict.svg`.

use std::fmt::Write as _;

use crate::defense::Defense;
use crate::scenario::Scenario;

/// How far above the clean run's final ASR a holding defense may end.
pub const ASR_TOLERANCE: f64 = 0.05;

/// How far above the oracle's final benign loss a holding defense may end
/// (a factor).
pub const LOSS_FACTOR: f64 = 1.05;

/// One finished federation: its cell, seed and final figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CellResult {
    /// Attack scenario.
    pub scenario: Scenario,
    /// Malicious share, percent.
    pub percent: u32,
    /// Defense.
    pub defense: Defense,
    /// The run's seed.
    pub seed: u64,
    /// ASR of the final global model.
    pub final_asr: f64,
    /// Held-out benign loss of the final global model.
    pub final_loss: f64,
}

/// One cell's verdict, worst over its seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Attack scenario.
    pub scenario: Scenario,
    /// Malicious share, percent.
    pub percent: u32,
    /// Defense.
    pub defense: Defense,
    /// Seeds with a clean run and an oracle to compare with.
    pub seeds: usize,
    /// Whether the cell holds in every seed; `None` when no seed had both
    /// references.
    pub holds: Option<bool>,
    /// Highest final ASR over the seeds.
    pub worst_asr: f64,
    /// Highest final ASR − the same seed's clean ASR.
    pub worst_asr_excess: f64,
    /// Highest final benign loss over the seeds.
    pub worst_loss: f64,
    /// Highest final benign loss / the same seed's oracle loss.
    pub worst_loss_ratio: f64,
}

/// Whether one seed of a cell holds, from its figures and its references.
pub fn holds_once(asr: f64, loss: f64, clean_asr: f64, oracle_loss: f64) -> bool {
    asr <= clean_asr + ASR_TOLERANCE && loss <= oracle_loss * LOSS_FACTOR
}

/// The verdict of every cell with a malicious share > 0 (the oracle's own
/// cells included: it holds by construction unless its ASR moves), in the
/// order the cells first appear in `results`.
pub fn verdicts(results: &[CellResult]) -> Vec<Verdict> {
    let clean = |defense: Defense, seed: u64| {
        results
            .iter()
            .find(|r| r.percent == 0 && r.defense == defense && r.seed == seed)
            .map(|r| r.final_asr)
    };
    // The oracle drops the malicious clients, whoever they are: its run at
    // a share is the same for every scenario.
    let oracle = |percent: u32, seed: u64| {
        results
            .iter()
            .find(|r| r.percent == percent && r.defense == Defense::Oracle && r.seed == seed)
            .map(|r| r.final_loss)
    };
    let mut cells: Vec<(Scenario, u32, Defense)> = Vec::new();
    for r in results.iter().filter(|r| r.percent > 0) {
        let key = (r.scenario, r.percent, r.defense);
        if !cells.contains(&key) {
            cells.push(key);
        }
    }
    cells
        .into_iter()
        .map(|(scenario, percent, defense)| {
            let mut v = Verdict {
                scenario,
                percent,
                defense,
                seeds: 0,
                holds: None,
                worst_asr: f64::NEG_INFINITY,
                worst_asr_excess: f64::NEG_INFINITY,
                worst_loss: f64::NEG_INFINITY,
                worst_loss_ratio: f64::NEG_INFINITY,
            };
            let runs = results
                .iter()
                .filter(|r| r.scenario == scenario && r.percent == percent && r.defense == defense);
            for r in runs {
                let (Some(clean_asr), Some(oracle_loss)) =
                    (clean(defense, r.seed), oracle(percent, r.seed))
                else {
                    continue;
                };
                let ok = holds_once(r.final_asr, r.final_loss, clean_asr, oracle_loss);
                v.seeds += 1;
                v.holds = Some(v.holds.unwrap_or(true) && ok);
                v.worst_asr = v.worst_asr.max(r.final_asr);
                v.worst_asr_excess = v.worst_asr_excess.max(r.final_asr - clean_asr);
                v.worst_loss = v.worst_loss.max(r.final_loss);
                v.worst_loss_ratio = v.worst_loss_ratio.max(r.final_loss / oracle_loss);
            }
            v
        })
        .collect()
}

fn word(holds: Option<bool>) -> &'static str {
    match holds {
        Some(true) => "holds",
        Some(false) => "fails",
        None => "n/a",
    }
}

/// The verdicts as CSV (`verdict.csv`).
pub fn verdict_csv(verdicts: &[Verdict]) -> String {
    let mut out = String::from(
        "defense,scenario,malicious_percent,seeds,verdict,worst_final_asr,worst_asr_excess,worst_final_benign_loss,worst_loss_ratio\n",
    );
    for v in verdicts {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{:.6},{:.6},{:.6},{:.6}",
            v.defense.name(),
            v.scenario,
            v.percent,
            v.seeds,
            word(v.holds),
            v.worst_asr,
            v.worst_asr_excess,
            v.worst_loss,
            v.worst_loss_ratio
        );
    }
    out
}

/// The verdicts as text: one line per cell, and a count per defense.
pub fn verdict_table(verdicts: &[Verdict]) -> String {
    let mut out = format!(
        "strict verdict (worst over seeds): holds iff final ASR ≤ clean + {ASR_TOLERANCE} and benign loss ≤ oracle × {LOSS_FACTOR}\n"
    );
    let _ = writeln!(
        out,
        "{:<24} {:<20} {:>5} {:>5}  {:<6} {:>9} {:>10} {:>11} {:>10}",
        "defense",
        "scenario",
        "mal%",
        "seeds",
        "verdict",
        "worst ASR",
        "ASR−clean",
        "worst loss",
        "loss/orac"
    );
    for v in verdicts {
        let _ = writeln!(
            out,
            "{:<24} {:<20} {:>5} {:>5}  {:<6} {:>9.3} {:>+10.3} {:>11.3} {:>10.3}",
            v.defense.name(),
            v.scenario.to_string(),
            v.percent,
            v.seeds,
            word(v.holds),
            v.worst_asr,
            v.worst_asr_excess,
            v.worst_loss,
            v.worst_loss_ratio
        );
    }
    for d in defenses(verdicts) {
        let mine: Vec<&Verdict> = verdicts.iter().filter(|v| v.defense == d).collect();
        let held = mine.iter().filter(|v| v.holds == Some(true)).count();
        let _ = writeln!(out, "{}: holds {held} of {} cells", d.name(), mine.len());
    }
    out
}

pub fn defenses(verdicts: &[Verdict]) -> Vec<Defense> {
    let mut out: Vec<Defense> = Vec::new();
    for v in verdicts {
        if !out.contains(&v.defense) {
            out.push(v.defense);
        }
    }
    out
}
