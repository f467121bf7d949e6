//! `safe-fedllm-probe round`: one defended round from a defense spec and
//! upload files, printing the audit line.

use std::path::PathBuf;

use clap::Args;
use safe_fedllm::ClientId;
use safe_fedllm::lora::{AdapterView, LoraAdapter, ReadLimits, TensorSource, read_file};
use safe_fedllm::probe::LinearProbe;
use safe_fedllm::round::{ClientReport, DefendedRound, DefenseSpec, read_audit_secret};

pub const ROUND_ABOUT: &str = "\
Run one defended round: admission, probe, detector, safety gate and aggregation as the
spec describes them (TOML when the name ends in .toml, JSON otherwise). Prints the
audit line (one JSON object; `spec_sha256` identifies the spec) on stdout; with
--header the run header (the full spec and its hash) comes first. With --out the new
global adapter is written as safetensors (nothing is written when the round is skipped).
Each upload is CLIENT=FILE:SAMPLES (the declared sample count; admission decides what
it is worth). A spec with an [audits] rate needs --audit-secret-file (the server's
secret, 64 hex digits, kept out of the spec).";

#[derive(Args)]
pub struct RoundArgs {
    /// Defense spec file (.toml or .json).
    #[arg(long)]
    spec: PathBuf,
    /// The global adapter the clients started from.
    #[arg(long)]
    global: PathBuf,
    /// Probe file, for a spec that names none (a preset, say).
    #[arg(long)]
    probe: Option<PathBuf>,
    /// Round number (0-based).
    #[arg(long, default_value_t = 0)]
    round: u32,
    /// Print the run header line before the audit line.
    #[arg(long)]
    header: bool,
    /// The server's audit secret (64 hex digits), for a spec with `[audits]`:
    /// kept in its own file, never in the spec.
    #[arg(long)]
    audit_secret_file: Option<PathBuf>,
    /// Write the new global adapter here (f32 safetensors).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Uploads, CLIENT=FILE:SAMPLES.
    #[arg(required = true, value_parser = parse_upload)]
    uploads: Vec<Upload>,
}

#[derive(Clone)]
pub struct Upload {
    client: ClientId,
    path: PathBuf,
    samples: u64,
}

fn parse_upload(s: &str) -> Result<Upload, String> {
    let (client, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not CLIENT=FILE:SAMPLES"))?;
    let (path, samples) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}` lacks :SAMPLES (the declared sample count)"))?;
    let samples = samples
        .parse::<u64>()
        .map_err(|_| format!("`{samples}` in `{s}` is not a sample count"))?;
    if client.is_empty() || path.is_empty() {
        return Err(format!("`{s}` is not CLIENT=FILE:SAMPLES"));
    }
    Ok(Upload {
        client: ClientId::from(client),
        path: PathBuf::from(path),
        samples,
    })
}

/// Runs the round; returns the lines to print.
pub fn round(args: &RoundArgs) -> Result<Vec<String>, safe_fedllm::Error> {
    let spec = DefenseSpec::from_file(&args.spec)?.check()?;
    let mut defended = match &args.probe {
        Some(path) => DefendedRound::from_spec_with_probe(&spec, LinearProbe::load(path)?)?,
        None => DefendedRound::from_spec(&spec)?,
    };
    if let Some(path) = &args.audit_secret_file {
        defended = defended.with_audit_secret(read_audit_secret(path)?)?;
    }
    let global = LoraAdapter::load(&args.global)?;
    let limits = ReadLimits::default();
    let bytes = args
        .uploads
        .iter()
        .map(|u| read_file(&u.path, &limits))
        .collect::<Result<Vec<_>, _>>()?;
    // A file that is not safetensors at all is the operator's input error,
    // named with its client and path; everything a parsed upload holds is
    // judged by admission and recorded in the audit line.
    let views = args
        .uploads
        .iter()
        .zip(&bytes)
        .map(|(u, b)| {
            AdapterView::parse_with(b, &limits).map_err(|e| safe_fedllm::Error::Client {
                client: u.client.clone(),
                source: Box::new(safe_fedllm::Error::InFile {
                    path: u.path.clone(),
                    source: Box::new(e),
                }),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let reports: Vec<ClientReport<'_>> = args
        .uploads
        .iter()
        .zip(&views)
        .map(|(u, v)| ClientReport::new(&u.client, v as &dyn TensorSource, u.samples))
        .collect();
    let outcome = defended.run(args.round, &global, &reports)?;
    if let (Some(out), Some(new_global)) = (&args.out, &outcome.new_global) {
        new_global.save(out, Default::default())?;
    }
    let mut lines = Vec::new();
    if args.header {
        lines.push(spec.header_json()?);
    }
    lines.push(outcome.to_json_line()?);
    Ok(lines)
}
