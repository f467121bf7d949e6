//! Turning round records into the comparison table, CSV files, an SVG plot
//! of ASR per round, and a summary in words.

use std::fmt::Write as _;

use crate::config::ExperimentConfig;
use crate::defense::Defense;
use crate::experiment::{ProbeReport, RoundRecord};
use crate::scenario::Scenario;
use crate::verdict::{ASR_TOLERANCE, LOSS_FACTOR, holds_once};

/// One row of the comparison table.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Attack scenario.
    pub scenario: Scenario,
    /// Malicious share, percent.
    pub malicious_percent: u32,
    /// Defense.
    pub defense: Defense,
    /// ASR of the final global model.
    pub final_asr: f64,
    /// Highest ASR over the rounds.
    pub peak_asr: f64,
    /// Held-out benign loss of the final global model.
    pub final_benign_loss: f64,
    /// TP / (TP + FP) over all rounds; `None` when nothing was flagged or the
    /// defense does not single clients out.
    pub precision: Option<f64>,
    /// TP / (TP + FN); `None` without malicious participants.
    pub recall: Option<f64>,
    /// Benign participations suppressed / benign participations.
    pub false_flag_rate: Option<f64>,
    /// Rounds skipped by a safety gate.
    pub skipped_rounds: usize,
    /// Mean seconds per round.
    pub seconds_per_round: f64,
    /// Share of round time spent on the defense.
    pub defense_share: f64,
    /// Whether the defense held (see [`with_verdicts`]); `None` for the
    /// references (FedAvg, oracle) and clean runs.
    pub holds: Option<bool>,
}

fn ratio(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// Summarises the records of one (share, defense) run.
pub fn summarise(records: &[RoundRecord]) -> Option<Summary> {
    let first = records.first()?;
    let last = records.last()?;
    let trained: Vec<&RoundRecord> = records.iter().filter(|r| r.round > 0).collect();
    let tp: usize = trained.iter().map(|r| r.true_positives).sum();
    let fp: usize = trained.iter().map(|r| r.false_positives).sum();
    let fneg: usize = trained.iter().map(|r| r.false_negatives).sum();
    let total_round: f64 = trained.iter().map(|r| r.round_seconds).sum();
    let total_defense: f64 = trained.iter().map(|r| r.defense_seconds).sum();
    let flags = first.defense.flags_clients();
    Some(Summary {
        scenario: first.scenario,
        holds: None,
        malicious_percent: first.malicious_percent,
        defense: first.defense,
        final_asr: last.asr,
        peak_asr: records.iter().map(|r| r.asr).fold(0.0, f64::max),
        final_benign_loss: last.benign_loss,
        precision: if flags { ratio(tp, tp + fp) } else { None },
        recall: if flags { ratio(tp, tp + fneg) } else { None },
        // Needs the number of benign participations: see `with_false_flags`.
        false_flag_rate: None,
        skipped_rounds: trained.iter().filter(|r| r.skipped).count(),
        seconds_per_round: total_round / trained.len().max(1) as f64,
        defense_share: if total_round > 0.0 {
            total_defense / total_round
        } else {
            0.0
        },
    })
}

/// Fills in the false-flag rate from the number of benign participations.
pub fn with_false_flags(
    mut summary: Summary,
    records: &[RoundRecord],
    benign_per_round: usize,
) -> Summary {
    if summary.defense.flags_clients() {
        let fp: usize = records
            .iter()
            .filter(|r| r.round > 0)
            .map(|r| r.false_positives)
            .sum();
        let benign = benign_per_round * records.iter().filter(|r| r.round > 0).count();
        summary.false_flag_rate = ratio(fp, benign);
    }
    summary
}

/// The clean run's final ASR and benign loss (0 % malicious, plain FedAvg;
/// the same for every scenario).
fn clean(summaries: &[Summary]) -> Option<&Summary> {
    summaries
        .iter()
        .find(|s| s.malicious_percent == 0 && s.defense == Defense::None)
}

/// Fills in whether each defense held under attack, by the strict rule of
/// [`crate::verdict`] on this run's one seed: final ASR ≤ the clean run's +
/// [`ASR_TOLERANCE`] **and** final benign loss ≤ the oracle's ×
/// [`LOSS_FACTOR`], for every scenario. The clean run is the same defense at
/// 0 % (plain FedAvg's when that defense has no 0 % row); the oracle is the
/// oracle row at the same scenario and share (the clean run's loss without
/// one).
pub fn with_verdicts(mut summaries: Vec<Summary>) -> Vec<Summary> {
    let fallback = clean(&summaries).map(|c| (c.final_asr, c.final_benign_loss));
    let clean_of = |defense: Defense| {
        summaries
            .iter()
            .find(|s| s.malicious_percent == 0 && s.defense == defense)
            .map(|s| (s.final_asr, s.final_benign_loss))
            .or(fallback)
    };
    let oracle_loss = |scenario: Scenario, percent: u32| {
        summaries
            .iter()
            .find(|s| {
                s.scenario == scenario
                    && s.malicious_percent == percent
                    && s.defense == Defense::Oracle
            })
            .map(|s| s.final_benign_loss)
    };
    let verdicts: Vec<Option<bool>> = summaries
        .iter()
        .map(|s| {
            if s.malicious_percent == 0 || matches!(s.defense, Defense::None | Defense::Oracle) {
                return None;
            }
            let (clean_asr, clean_loss) = clean_of(s.defense)?;
            let oracle = oracle_loss(s.scenario, s.malicious_percent).unwrap_or(clean_loss);
            Some(holds_once(
                s.final_asr,
                s.final_benign_loss,
                clean_asr,
                oracle,
            ))
        })
        .collect();
    for (s, v) in summaries.iter_mut().zip(verdicts) {
        s.holds = v;
    }
    summaries
}

fn opt(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.2}"))
}

/// The comparison table as text.
pub fn table(summaries: &[Summary]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:>5}  {:<22} {:>9} {:>8} {:>11} {:>9} {:>7} {:>10} {:>7} {:>8} {:>8}  holds",
        "scenario",
        "mal%",
        "defense",
        "final ASR",
        "peak ASR",
        "benign loss",
        "precision",
        "recall",
        "false flag",
        "skipped",
        "s/round",
        "defense%",
    );
    let mut last_share = None;
    for s in summaries {
        let key = (s.scenario, s.malicious_percent);
        if last_share.is_some() && last_share != Some(key) {
            out.push('\n');
        }
        last_share = Some(key);
        let _ = writeln!(
            out,
            "{:<20} {:>5}  {:<22} {:>9.3} {:>8.3} {:>11.3} {:>9} {:>7} {:>10} {:>7} {:>8.2} {:>7.1}%  {}",
            s.scenario.name(),
            s.malicious_percent,
            s.defense.name(),
            s.final_asr,
            s.peak_asr,
            s.final_benign_loss,
            opt(s.precision),
            opt(s.recall),
            opt(s.false_flag_rate),
            s.skipped_rounds,
            s.seconds_per_round,
            100.0 * s.defense_share,
            holds(s.holds)
        );
    }
    out
}

fn holds(verdict: Option<bool>) -> &'static str {
    match verdict {
        Some(true) => "yes",
        Some(false) => "FAILS",
        None => "–",
    }
}

/// The summary table as CSV.
pub fn summary_csv(summaries: &[Summary]) -> String {
    let mut out = String::from(
        "scenario,malicious_percent,defense,final_asr,peak_asr,final_benign_loss,precision,recall,false_flag_rate,skipped_rounds,seconds_per_round,defense_share,holds\n",
    );
    let cell = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    for s in summaries {
        let _ = writeln!(
            out,
            "{},{},{},{:.6},{:.6},{:.6},{},{},{},{},{:.6},{:.6},{}",
            s.scenario.name(),
            s.malicious_percent,
            s.defense.name(),
            s.final_asr,
            s.peak_asr,
            s.final_benign_loss,
            cell(s.precision),
            cell(s.recall),
            cell(s.false_flag_rate),
            s.skipped_rounds,
            s.seconds_per_round,
            s.defense_share,
            s.holds.map_or("", |h| if h { "yes" } else { "no" })
        );
    }
    out
}

/// Every round record as CSV.
pub fn rounds_csv(records: &[RoundRecord]) -> String {
    let mut out = String::from(
        "scenario,malicious_percent,defense,round,asr,asr_per_token,margin,benign_loss,true_positives,false_positives,false_negatives,malicious_factor,benign_factor,skipped,round_seconds,defense_seconds\n",
    );
    for r in records {
        let _ = writeln!(
            out,
            "{},{},{},{},{:.6},{:.6},{:.6},{:.6},{},{},{},{:.6},{:.6},{},{:.6},{:.6}",
            r.scenario.name(),
            r.malicious_percent,
            r.defense.name(),
            r.round,
            r.asr,
            r.asr_per_token,
            r.margin,
            r.benign_loss,
            r.true_positives,
            r.false_positives,
            r.false_negatives,
            r.malicious_factor,
            r.benign_factor,
            r.skipped,
            r.round_seconds,
            r.defense_seconds
        );
    }
    out
}

/// A sentence per attacked (scenario, share) saying what the table shows.
/// Whether a defense holds is [`with_verdicts`]'s (computed here when the
/// summaries carry none).
pub fn summary_sentences(summaries: &[Summary]) -> Vec<String> {
    let summaries = if summaries.iter().all(|s| s.holds.is_none()) {
        with_verdicts(summaries.to_vec())
    } else {
        summaries.to_vec()
    };
    let clean = clean(&summaries).map(|s| s.final_asr);
    let mut keys: Vec<(Scenario, u32)> = summaries
        .iter()
        .filter(|s| s.malicious_percent > 0)
        .map(|s| (s.scenario, s.malicious_percent))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut out = Vec::new();
    for (scenario, p) in keys {
        let rows: Vec<&Summary> = summaries
            .iter()
            .filter(|s| s.scenario == scenario && s.malicious_percent == p)
            .collect();
        let find = |d: Defense| rows.iter().find(|s| s.defense == d);
        let mut text = String::new();
        let attack = if scenario == Scenario::Poison {
            String::new()
        } else {
            format!(" ({} attack)", scenario.name())
        };
        let reference = match clean {
            Some(c) => c,
            None => {
                let _ = write!(
                    text,
                    "With {p} % malicious clients{attack} (no clean run to compare with):"
                );
                for s in &rows {
                    let _ = write!(
                        text,
                        " {} ends at ASR {:.2};",
                        s.defense.name(),
                        s.final_asr
                    );
                }
                out.push(text);
                continue;
            }
        };
        if let Some(fedavg) = find(Defense::None) {
            let verdict = if scenario.untargeted() {
                match find(Defense::Oracle) {
                    Some(o) => format!(
                        "benign loss {:.3} against the oracle's {:.3} (an untargeted attack: it aims at utility, not ASR)",
                        fedavg.final_benign_loss, o.final_benign_loss
                    ),
                    None => format!(
                        "benign loss {:.3} (an untargeted attack: it aims at utility, not ASR)",
                        fedavg.final_benign_loss
                    ),
                }
            } else if fedavg.final_asr > reference + ASR_TOLERANCE {
                "clearly above".to_owned()
            } else {
                "NOT clearly above (the attack did not take hold at this scale)".to_owned()
            };
            if scenario.untargeted() {
                let _ = write!(
                    text,
                    "With {p} % malicious clients{attack} plain FedAvg ends at ASR {:.2}, {verdict}.",
                    fedavg.final_asr
                );
            } else {
                let _ = write!(
                    text,
                    "With {p} % malicious clients{attack} plain FedAvg ends at ASR {:.2}, {verdict} the clean run's {:.2}.",
                    fedavg.final_asr, reference
                );
            }
        } else {
            let _ = write!(
                text,
                "With {p} % malicious clients{attack} (clean ASR {reference:.2}):"
            );
        }
        let held: Vec<&&Summary> = rows.iter().filter(|s| s.holds == Some(true)).collect();
        let failed: Vec<&&Summary> = rows.iter().filter(|s| s.holds == Some(false)).collect();
        let names = |v: &[&&Summary]| {
            v.iter()
                .map(|s| {
                    if scenario.untargeted() {
                        format!(
                            "{} ({:.2}, loss {:.3})",
                            s.defense.name(),
                            s.final_asr,
                            s.final_benign_loss
                        )
                    } else {
                        format!("{} ({:.2})", s.defense.name(), s.final_asr)
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !held.is_empty() {
            let _ = write!(
                text,
                " Holding (ASR ≤ clean + {ASR_TOLERANCE:.2}, loss ≤ oracle × {LOSS_FACTOR:.2}): {}.",
                names(&held)
            );
        }
        if !failed.is_empty() {
            let _ = write!(text, " Not holding: {}.", names(&failed));
        }
        out.push(text);
    }
    out
}

/// The probe phase in one line: the calibrated trainer's report and the
/// held-out figures.
pub fn probe_text(probe: &ProbeReport) -> String {
    let cal = &probe.calibration;
    format!(
        "probe (calibrated trainer, {} group folds over {} labelled runs, threshold policy {}): \
         {} training deltas; chosen C = {}; out-of-fold AUC {:.3}, ECE {:.3} (uncalibrated {:.3}), Brier {:.3}; \
         τ = {:.3} (OOF recall {:.2}, false-positive rate {:.2}, margin {:.3}); \
         {} held-out deltas: AUC {:.3}, ECE {:.3}, recall {:.2}, false-positive rate {:.2} at τ ({:.1} s)",
        cal.folds,
        cal.groups,
        cal.threshold.policy,
        probe.train_samples,
        cal.c,
        cal.oof_roc_auc,
        cal.oof_ece,
        cal.oof_ece_uncalibrated,
        cal.oof_brier,
        cal.threshold.threshold,
        cal.threshold.recall,
        cal.threshold.false_positive_rate,
        cal.threshold.margin,
        probe.holdout_samples,
        probe.holdout_auc,
        probe.holdout_ece,
        probe.holdout_recall,
        probe.holdout_false_positive_rate,
        probe.seconds
    )
}

/// The probe phase as `probe_calibration.json`.
pub fn probe_json(probe: &ProbeReport) -> Result<String, String> {
    let cal = &probe.calibration;
    serde_json::to_string_pretty(&serde_json::json!({
        "calibration": cal,
        "holdout": {
            "samples": probe.holdout_samples,
            "roc_auc": probe.holdout_auc,
            "ece": probe.holdout_ece,
            "accuracy": probe.holdout_accuracy,
            "recall": probe.holdout_recall,
            "false_positive_rate": probe.holdout_false_positive_rate,
        },
        "train_samples": probe.train_samples,
    }))
    .map_err(|e| e.to_string())
}

/// The comparison's rows from its runs (one record list per federation):
/// every record, in table order (scenario, share, then the configured
/// defense order), and one summary per run.
pub fn summaries(
    config: &ExperimentConfig,
    mut runs: Vec<Vec<RoundRecord>>,
) -> (Vec<RoundRecord>, Vec<Summary>) {
    // Table order: scenario, share, then the defense order of the config.
    let order = |d: Defense| {
        config
            .defenses
            .iter()
            .position(|&x| x == d)
            .unwrap_or(usize::MAX)
    };
    runs.retain(|r| {
        r.first()
            .is_some_and(|f| config.defenses.contains(&f.defense))
    });
    runs.sort_by_key(|r| {
        r.first()
            .map(|f| (f.scenario, f.malicious_percent, order(f.defense)))
    });
    let mut records = Vec::new();
    let mut summaries = Vec::new();
    for run in runs {
        let Some(first) = run.first() else { continue };
        let percent = first.malicious_percent;
        let participants = if first.defense == Defense::Oracle {
            config.clients_per_round
        } else {
            config.clients_per_round
                - (config.clients_per_round as f64 * f64::from(percent) / 100.0).round() as usize
        };
        if let Some(s) = summarise(&run) {
            summaries.push(with_false_flags(s, &run, participants));
        }
        records.extend(run);
    }
    (records, summaries)
}
