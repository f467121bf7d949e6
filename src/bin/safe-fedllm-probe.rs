//! `safe-fedllm-probe`: train a calibrated LoRA-Probe from a JSON-lines
//! manifest, score adapter files, evaluate a probe — JSON on stdout, so
//! Python federated stacks can use the probe without Rust code. Built with
//! `--features cli`.
//!
//! ```text
//! safe-fedllm-probe train --manifest train.jsonl --out probe.safetensors
//!     [--threshold-policy fixed:0.8|target-fpr:0.05|max-f1] [--folds 5]
//!     [--c-grid 0.01,0.1,1,10,100] [--seed 0] [--selection first_layer_b|all_layers]
//!     [--sketch-dim K [--sketch-seed S]] [--early-stopping]
//! safe-fedllm-probe score --probe probe.safetensors [--base round0.safetensors] [--zero-fill] FILE...
//! safe-fedllm-probe eval  --probe probe.safetensors --manifest test.jsonl [--threshold T] [--zero-fill]
//! safe-fedllm-probe round --spec defense.toml --global global.safetensors [--probe P]
//!     [--round N] [--header] [--out new_global.safetensors] CLIENT=FILE:SAMPLES...
//! ```
//!
//! `score` and `eval` refuse a file that lacks a tensor the probe reads, as
//! the defended round does (`Rejection::MissingProbeKeys`): scoring zeros in
//! its place would let an adapter that omits the probed layer read as benign.
//! `--zero-fill` scores such files anyway, with the missing keys listed and
//! `"zero_fill": true` in the output.
//!
//! Output contract: stdout carries JSON only (one object for `train` and
//! `eval`, one object per line for `score`); stderr carries JSON only
//! (`{"error": "...", "kind": "usage" | "run"}`); `--help` and `--version`
//! print text to stdout. Exit codes: 0 success, 1 a run failed (for `score`:
//! at least one file failed), 2 usage error (unknown flag, bad value).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use safe_fedllm::features::{FeatureConfig, Selection, TransformReport};
use safe_fedllm::lora::{AdapterView, LazyDelta, ReadLimits, read_file};
use safe_fedllm::probe::eval::Evaluation;
use safe_fedllm::probe::{
    CalibratedParams, EarlyStopping, Label, LinearProbe, LogisticParams, Manifest, Probe,
    ProbeBuilder, SketchConfig, Threshold,
};
use serde_json::{Value, json};

#[path = "safe-fedllm-probe/round.rs"]
mod round;

const MANIFEST_HELP: &str = "\
MANIFEST FORMAT (JSON lines, one labelled sample per line; blank lines skipped):
  {\"path\": \"runs/c3/step5.safetensors\", \"label\": \"malicious\", \"base\": \"runs/round0.safetensors\", \"group\": \"run-c3\"}

  path    (required) PEFT LoRA safetensors file. RELATIVE PATHS ARE RESOLVED AGAINST THE
          MANIFEST'S OWN FOLDER, not the working directory.
  label   (required) \"benign\" or \"malicious\" (or 0 / 1).
  base    (optional) adapter the run started from; the sample is then path - base.
          Without it the file is taken to hold the delta itself.
  group   (optional, string or integer) the run or client the sample belongs to.
          Cross-validation never splits a group across folds (steps of one run are
          not independent). Defaults to `client`; without either, each sample is its
          own group.
  client, round, step  (optional) ids carried along for reporting.
  Unknown fields are rejected.";

const TRAIN_ABOUT: &str = "\
Train a calibrated probe: C is chosen over --c-grid by stratified group k-fold
(--folds), the model is refitted on all samples, its probabilities are calibrated
(Platt scaling on the out-of-fold scores, folded into the weights) and the threshold
is chosen by --threshold-policy on the calibrated out-of-fold scores. Prints the
chosen C, the threshold with its out-of-fold FPR, recall and margin, and the
out-of-fold AUC, ECE and Brier score. The --out folder is checked before training.";

/// Train, score and evaluate LoRA-Probes (Safe-FedLLM) from the command line.
#[derive(Parser)]
#[command(name = "safe-fedllm-probe", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a calibrated probe from a labelled manifest.
    #[command(long_about = TRAIN_ABOUT, after_long_help = MANIFEST_HELP, after_help = "See --help for the manifest format.")]
    Train(TrainArgs),
    /// Score adapter files with a probe: one JSON line per file.
    Score(ScoreArgs),
    /// Evaluate a probe on a labelled manifest: n, accuracy, precision,
    /// recall at τ, ROC AUC, ECE and Brier score.
    #[command(after_long_help = MANIFEST_HELP)]
    Eval(EvalArgs),
    /// Run one defended round from a defense spec and uploads: prints the audit line.
    #[command(long_about = round::ROUND_ABOUT)]
    Round(round::RoundArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum SelectionArg {
    /// lora_B tensors of the lowest layer (the reference default).
    FirstLayerB,
    /// Every lora_A and lora_B tensor.
    AllLayers,
}

#[derive(Args)]
struct TrainArgs {
    /// JSON-lines manifest of labelled adapters (format below).
    #[arg(long)]
    manifest: PathBuf,
    /// Where to write the probe (.safetensors); its folder must exist.
    #[arg(long)]
    out: PathBuf,
    /// How to choose the threshold τ on calibrated out-of-fold scores:
    /// fixed:T, target-fpr:F (false-positive budget) or max-f1.
    #[arg(long, default_value = "fixed:0.8", value_parser = parse_policy)]
    threshold_policy: Threshold,
    /// Number of group k-fold folds.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Comma-separated values of C (inverse L2 strength) to cross-validate.
    #[arg(long, default_value = "0.01,0.1,1,10,100", value_parser = parse_grid)]
    c_grid: CGrid,
    /// Seed of the fold assignment.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Which LoRA tensors form the features.
    #[arg(long, value_enum, default_value = "first-layer-b")]
    selection: SelectionArg,
    /// Train through a seeded random projection to K dimensions.
    #[arg(long, value_name = "K")]
    sketch_dim: Option<usize>,
    /// Seed of the projection.
    #[arg(long, default_value_t = 0, requires = "sketch_dim")]
    sketch_seed: u64,
    /// Inner fits stop early on a 10 % validation split (reference recipe).
    #[arg(long)]
    early_stopping: bool,
}

#[derive(Args)]
struct ScoreArgs {
    /// Probe file written by `train`.
    #[arg(long)]
    probe: PathBuf,
    /// Adapter the updates started from (scores update − base); without it
    /// each file is taken to hold a delta.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Score files lacking probed tensors with zeros in their place instead
    /// of failing them (marked in each line). Unsafe against evasion.
    #[arg(long)]
    zero_fill: bool,
    /// Adapter files to score.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    /// Probe file written by `train`.
    #[arg(long)]
    probe: PathBuf,
    /// Labelled manifest to evaluate on.
    #[arg(long)]
    manifest: PathBuf,
    /// Evaluate at this τ instead of the probe's own.
    #[arg(long, value_parser = parse_probability)]
    threshold: Option<f32>,
    /// Evaluate samples lacking probed tensors with zeros in their place
    /// instead of failing (listed in the output). Unsafe against evasion.
    #[arg(long)]
    zero_fill: bool,
}

#[derive(Clone)]
struct CGrid(Vec<f64>);

fn parse_policy(s: &str) -> Result<Threshold, String> {
    s.parse().map_err(|e: safe_fedllm::Error| e.to_string())
}

fn parse_grid(s: &str) -> Result<CGrid, String> {
    let values = s
        .split(',')
        .map(|v| match v.trim().parse::<f64>() {
            Ok(c) if c.is_finite() && c > 0.0 => Ok(c),
            _ => Err(format!("`{v}` is not a finite number > 0")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CGrid(values))
}

fn parse_probability(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(t) if (0.0..=1.0).contains(&t) => Ok(t),
        _ => Err(format!("`{s}` is not a probability in [0, 1]")),
    }
}

/// Fails before any training when the probe could not be written.
fn check_out(out: &Path) -> Result<(), safe_fedllm::Error> {
    let folder = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let problem = if out.is_dir() {
        Some("is a directory")
    } else if !folder.is_dir() {
        Some("has no existing parent folder")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(why) => Err(safe_fedllm::Error::Io {
            path: out.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("--out {why} (checked before training)"),
            ),
        }),
    }
}

fn train(args: &TrainArgs) -> Result<Value, safe_fedllm::Error> {
    check_out(&args.out)?;
    let manifest = Manifest::load(&args.manifest)?;
    let selection = match args.selection {
        SelectionArg::FirstLayerB => Selection::FirstLayerB,
        SelectionArg::AllLayers => Selection::AllLayers,
    };
    let mut base = LogisticParams::default();
    if args.early_stopping {
        base = base.early_stopping(EarlyStopping::reference());
    }
    let trainer = CalibratedParams::default()
        .base(base)
        .c_grid(args.c_grid.0.clone())
        .folds(args.folds)
        .seed(args.seed)
        .threshold(args.threshold_policy);
    let mut builder = ProbeBuilder::new(trainer).features(FeatureConfig::new(selection));
    if let Some(dim) = args.sketch_dim {
        builder = builder.sketch(SketchConfig::new(dim, args.sketch_seed));
    }
    let probe = builder.fit_manifest(&manifest)?;
    probe.save(&args.out)?;
    let calibration = probe.info().calibration.as_ref();
    Ok(json!({
        "out": args.out,
        "dim": probe.feature_spec().dim(),
        "samples": manifest.entries().len(),
        "threshold": probe.threshold(),
        "threshold_policy": args.threshold_policy.to_string(),
        "c": calibration.map(|c| c.c),
        "oof": calibration.map(|c| json!({
            "roc_auc": c.oof_roc_auc,
            "ece": c.oof_ece,
            "ece_uncalibrated": c.oof_ece_uncalibrated,
            "ece_bins": c.ece_bins,
            "brier": c.oof_brier,
            "false_positive_rate": c.threshold.false_positive_rate,
            "recall": c.threshold.recall,
            "precision": c.threshold.precision,
            "margin": c.threshold.margin,
            "folds": c.folds,
            "groups": c.groups,
        })),
        "info": probe.info(),
    }))
}

/// Scores every file; a bad file gives an error line, not an abort.
fn score(args: &ScoreArgs) -> Result<(Vec<Value>, usize), safe_fedllm::Error> {
    let probe = LinearProbe::load(&args.probe)?;
    let limits = ReadLimits::default();
    let base_bytes = args
        .base
        .as_ref()
        .map(|p| read_file(p, &limits))
        .transpose()?;
    let base = match (&base_bytes, &args.base) {
        (Some(bytes), Some(path)) => Some(AdapterView::parse(bytes).map_err(|e| in_file(path, e))?),
        _ => None,
    };
    let mut failed = 0;
    let lines = args
        .files
        .iter()
        .map(|path| {
            let line = score_one(&probe, path, base.as_ref(), &limits)
                .and_then(|line| refuse_zero_filled(line, path, args.zero_fill));
            line.unwrap_or_else(|failure| {
                failed += 1;
                failure
            })
        })
        .collect();
    Ok((lines, failed))
}

fn score_one(
    probe: &LinearProbe,
    path: &Path,
    base: Option<&AdapterView<'_>>,
    limits: &ReadLimits,
) -> Result<Value, Value> {
    let failed = |e: safe_fedllm::Error| json!({ "path": path, "error": e.to_string() });
    let bytes = read_file(path, limits).map_err(failed)?;
    let update = AdapterView::parse(&bytes).map_err(|e| failed(in_file(path, e)))?;
    let features = match base {
        Some(base) => probe
            .feature_spec()
            .transform(&LazyDelta::new(&update, base).map_err(|e| failed(in_file(path, e)))?),
        None => probe.feature_spec().transform(&update),
    }
    .map_err(|e| failed(in_file(path, e)))?;
    let score = probe.score_features(&features.values).map_err(failed)?;
    Ok(json!({
        "path": path,
        "score": score,
        "harmful": probe.is_harmful(score),
        "threshold": probe.threshold(),
        "zero_filled": features.report.zero_filled,
        "ignored": features.report.ignored,
    }))
}

/// A scored line whose file lacked probed tensors becomes a failure (with
/// the keys listed) unless `--zero-fill` allows it; allowed lines are marked.
fn refuse_zero_filled(mut line: Value, path: &Path, zero_fill: bool) -> Result<Value, Value> {
    let missing = string_list(&line["zero_filled"]);
    if let Some(first) = missing.first().filter(|_| !zero_fill) {
        let e = in_file(path, missing_probe_key(first, missing.len()));
        return Err(json!({
            "path": path,
            "error": e.to_string(),
            "missing_probe_keys": missing,
        }));
    }
    line["zero_fill"] = json!(zero_fill);
    Ok(line)
}

/// The error for a file lacking `first` (and `count − 1` more) probed keys.
fn missing_probe_key(first: &str, count: usize) -> safe_fedllm::Error {
    let missing_from = if count > 1 {
        "the file (with other probed tensors; pass --zero-fill to score zeros in their place)"
    } else {
        "the file (pass --zero-fill to score zeros in its place)"
    };
    safe_fedllm::Error::MissingKey {
        tensor: first.to_owned(),
        present_in: "the probe's feature layout",
        missing_from,
    }
}

fn string_list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn in_file(path: &Path, e: safe_fedllm::Error) -> safe_fedllm::Error {
    safe_fedllm::Error::InFile {
        path: path.to_owned(),
        source: Box::new(e),
    }
}

fn eval(args: &EvalArgs) -> Result<Value, safe_fedllm::Error> {
    let probe = LinearProbe::load(&args.probe)?;
    let manifest = Manifest::load(&args.manifest)?;
    let (x, reports) = manifest.feature_matrix_with_reports(probe.feature_spec(), None)?;
    let zero_filled = zero_filled_samples(&manifest, &reports, args.zero_fill)?;
    let scores = probe.score_matrix(x.view())?;
    let labels: Vec<Label> = manifest.labels();
    let threshold = args.threshold.unwrap_or(probe.threshold());
    let e = Evaluation::new(&scores, &labels, threshold)?;
    Ok(json!({
        "n": e.samples,
        "threshold": e.threshold,
        "accuracy": e.accuracy,
        "precision": e.precision,
        "recall": e.recall,
        "false_positive_rate": e.false_positive_rate,
        "f1": e.f1,
        "roc_auc": e.roc_auc,
        "ece": e.ece,
        "ece_bins": e.ece_bins,
        "brier": e.brier,
        "confusion": e.confusion,
        "zero_fill": args.zero_fill,
        "zero_filled": zero_filled,
    }))
}

/// The samples whose files lacked probed tensors, as `{line, path, keys}`;
/// the first one is an error unless `zero_fill` allows them.
fn zero_filled_samples(
    manifest: &Manifest,
    reports: &[TransformReport],
    zero_fill: bool,
) -> Result<Vec<Value>, safe_fedllm::Error> {
    let mut samples = Vec::new();
    for (entry, report) in manifest.entries().iter().zip(reports) {
        let Some(first) = report.zero_filled.first() else {
            continue;
        };
        if !zero_fill {
            return Err(safe_fedllm::Error::ManifestSample {
                line: entry.line,
                path: entry.path.clone(),
                root: manifest.root().to_path_buf(),
                source: Box::new(missing_probe_key(first, report.zero_filled.len())),
            });
        }
        samples.push(json!({
            "line": entry.line,
            "path": entry.path,
            "keys": report.zero_filled,
        }));
    }
    Ok(samples)
}

fn fail(kind: &str, message: &str, code: u8) -> ExitCode {
    let line = json!({ "error": message, "kind": kind });
    // A closed stderr leaves nothing to report to.
    let _ = writeln!(std::io::stderr(), "{line}");
    ExitCode::from(code)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error of
/// ours, so a broken pipe ends quietly instead of panicking like `println!`.
fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    emit(&e.to_string());
                    ExitCode::SUCCESS
                }
                _ => fail("usage", e.render().to_string().trim(), 2),
            };
        }
    };
    match cli.command {
        Command::Train(args) => match train(&args) {
            Ok(summary) => {
                emit(&format!("{summary}\n"));
                ExitCode::SUCCESS
            }
            Err(e) => fail("run", &e.to_string(), 1),
        },
        Command::Eval(args) => match eval(&args) {
            Ok(metrics) => {
                emit(&format!("{metrics}\n"));
                ExitCode::SUCCESS
            }
            Err(e) => fail("run", &e.to_string(), 1),
        },
        Command::Round(args) => match round::round(&args) {
            Ok(lines) => {
                lines.iter().for_each(|line| emit(&format!("{line}\n")));
                ExitCode::SUCCESS
            }
            Err(e) => fail("run", &e.to_string(), 1),
        },
        Command::Score(args) => match score(&args) {
            Ok((lines, failed)) => {
                lines.iter().for_each(|line| emit(&format!("{line}\n")));
                if failed == 0 {
                    ExitCode::SUCCESS
                } else {
                    fail(
                        "run",
                        &format!("{failed} of {} files could not be scored", lines.len()),
                        1,
                    )
                }
            }
            Err(e) => fail("run", &e.to_string(), 1),
        },
    }
}
