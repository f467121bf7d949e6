//! `safe-fedllm-probe`: train a LoRA-Probe from a JSON-lines manifest and
//! score adapter files, printing JSON, so Python federated stacks can use the
//! probe without Rust code. Built with `--features cli`.
//!
//! ```text
//! safe-fedllm-probe train --manifest train.jsonl --out probe.safetensors
//!     [--selection first_layer_b|all_layers] [--c 1.0] [--threshold 0.8]
//!     [--sketch-dim K [--sketch-seed S]] [--early-stopping]
//! safe-fedllm-probe score --probe probe.safetensors [--base round0.safetensors] FILE...
//! safe-fedllm-probe eval  --probe probe.safetensors --manifest test.jsonl
//! ```
//!
//! `train` prints one JSON object (the probe's provenance and training AUC);
//! `score` prints one JSON object per file (`path`, `score` = P(malicious),
//! `harmful`, zero-filled and ignored keys); `eval` prints the metrics at the
//! probe's threshold. Errors go to stderr as `{"error": "..."}`, exit code 1
//! (2 for a usage error).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{AdapterView, LazyDelta, ReadLimits, read_file};
use safe_fedllm::probe::eval::{Evaluation, roc_auc};
use safe_fedllm::probe::{
    EarlyStopping, LinearProbe, LogisticParams, Manifest, Probe, ProbeBuilder, SketchConfig,
};
use serde_json::json;

const USAGE: &str = "usage:
  safe-fedllm-probe train --manifest FILE --out FILE [--selection first_layer_b|all_layers] [--c C]
                          [--threshold T] [--sketch-dim K] [--sketch-seed S] [--early-stopping]
  safe-fedllm-probe score --probe FILE [--base FILE] ADAPTER...
  safe-fedllm-probe eval  --probe FILE --manifest FILE";

enum Failure {
    Usage(String),
    Run(safe_fedllm::Error),
}

impl From<safe_fedllm::Error> for Failure {
    fn from(e: safe_fedllm::Error) -> Self {
        Failure::Run(e)
    }
}

/// `--flag value` options, bare `--switch`es and positional arguments.
struct Args {
    options: HashMap<String, String>,
    switches: Vec<String>,
    positional: Vec<String>,
}

fn parse(args: impl Iterator<Item = String>) -> Result<Args, Failure> {
    const SWITCHES: [&str; 1] = ["--early-stopping"];
    let mut parsed = Args {
        options: HashMap::new(),
        switches: Vec::new(),
        positional: Vec::new(),
    };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        if SWITCHES.contains(&arg.as_str()) {
            parsed.switches.push(arg);
        } else if let Some(name) = arg.strip_prefix("--") {
            let value = args
                .next()
                .ok_or_else(|| Failure::Usage(format!("--{name} needs a value")))?;
            parsed.options.insert(name.to_owned(), value);
        } else {
            parsed.positional.push(arg);
        }
    }
    Ok(parsed)
}

impl Args {
    fn required(&self, name: &str) -> Result<&str, Failure> {
        self.options
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| Failure::Usage(format!("missing --{name}")))
    }

    fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, Failure> {
        self.options
            .get(name)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|_| Failure::Usage(format!("--{name}: `{v}` is not a number")))
            })
            .transpose()
    }
}

fn train(args: &Args) -> Result<serde_json::Value, Failure> {
    let manifest = Manifest::load(args.required("manifest")?)?;
    let out = PathBuf::from(args.required("out")?);
    let selection = match args.options.get("selection").map(String::as_str) {
        None | Some("first_layer_b") => Selection::FirstLayerB,
        Some("all_layers") => Selection::AllLayers,
        Some(other) => return Err(Failure::Usage(format!("unknown --selection `{other}`"))),
    };
    let mut params = LogisticParams::default();
    if let Some(c) = args.number("c")? {
        params = params.c(c);
    }
    if args.switches.iter().any(|s| s == "--early-stopping") {
        params = params.early_stopping(EarlyStopping::reference());
    }
    let mut builder = ProbeBuilder::new(params).features(FeatureConfig::new(selection));
    if let Some(threshold) = args.number("threshold")? {
        builder = builder.threshold(threshold);
    }
    if let Some(dim) = args.number("sketch-dim")? {
        builder = builder.sketch(SketchConfig::new(
            dim,
            args.number("sketch-seed")?.unwrap_or(0),
        ));
    }
    let probe = builder.fit_manifest(&manifest)?;
    probe.save(&out)?;
    let (scores, labels) = score_manifest(&probe, &manifest)?;
    Ok(json!({
        "out": out,
        "dim": probe.feature_spec().dim(),
        "threshold": probe.threshold(),
        "training_roc_auc": roc_auc(&scores, &labels)?,
        "info": probe.info(),
    }))
}

fn score_manifest(
    probe: &LinearProbe,
    manifest: &Manifest,
) -> Result<(Vec<f32>, Vec<safe_fedllm::probe::Label>), Failure> {
    let x = manifest.feature_matrix(probe.feature_spec(), None)?;
    Ok((probe.score_matrix(x.view())?, manifest.labels()))
}

fn score(args: &Args) -> Result<Vec<serde_json::Value>, Failure> {
    let probe = LinearProbe::load(args.required("probe")?)?;
    if args.positional.is_empty() {
        return Err(Failure::Usage("no adapter file to score".into()));
    }
    let limits = ReadLimits::default();
    let base_bytes = args
        .options
        .get("base")
        .map(|p| read_file(p.as_ref(), &limits))
        .transpose()?;
    let base = base_bytes.as_deref().map(AdapterView::parse).transpose()?;
    args.positional
        .iter()
        .map(|path| {
            let bytes = read_file(path.as_ref(), &limits)?;
            let update = AdapterView::parse(&bytes).map_err(|e| in_file(path, e))?;
            let features = match &base {
                Some(base) => probe
                    .feature_spec()
                    .transform(&LazyDelta::new(&update, base).map_err(|e| in_file(path, e))?),
                None => probe.feature_spec().transform(&update),
            }
            .map_err(|e| in_file(path, e))?;
            let score = probe.score_features(&features.values)?;
            Ok(json!({
                "path": path,
                "score": score,
                "harmful": probe.is_harmful(score),
                "zero_filled": features.report.zero_filled,
                "ignored": features.report.ignored,
            }))
        })
        .collect()
}

fn in_file(path: &str, e: safe_fedllm::Error) -> safe_fedllm::Error {
    safe_fedllm::Error::InFile {
        path: path.into(),
        source: Box::new(e),
    }
}

fn eval(args: &Args) -> Result<serde_json::Value, Failure> {
    let probe = LinearProbe::load(args.required("probe")?)?;
    let manifest = Manifest::load(args.required("manifest")?)?;
    let (scores, labels) = score_manifest(&probe, &manifest)?;
    let evaluation = Evaluation::new(&scores, &labels, probe.threshold())?;
    Ok(serde_json::to_value(evaluation).unwrap_or_default())
}

fn run() -> Result<(), Failure> {
    let mut argv = std::env::args().skip(1);
    let command = argv
        .next()
        .ok_or_else(|| Failure::Usage("no command".into()))?;
    let args = parse(argv)?;
    match command.as_str() {
        "train" => println!("{}", train(&args)?),
        "score" => score(&args)?.iter().for_each(|line| println!("{line}")),
        "eval" => println!("{}", eval(&args)?),
        "help" | "--help" | "-h" => println!("{USAGE}"),
        other => return Err(Failure::Usage(format!("unknown command `{other}`"))),
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("{}", json!({ "error": message }));
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Run(error)) => {
            eprintln!("{}", json!({ "error": error.to_string() }));
            ExitCode::from(1)
        }
    }
}
