//! Reads an updated adapter and the adapter it started from, and prints the
//! probe features of their difference.
//!
//! ```sh
//! cargo run --release --example probe_features -- [UPDATE.safetensors BASE.safetensors]
//! ```
//! Without arguments it uses the bundled fixtures in `fixtures/lora/`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{AdapterView, LazyDelta, LoraAdapter, ReadLimits, read_file};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The crate's error messages already include their causes.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), safe_fedllm::Error> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/lora");
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let update_path = args
        .next()
        .unwrap_or_else(|| fixtures.join("update_bf16.safetensors"));
    let base_path = args
        .next()
        .unwrap_or_else(|| fixtures.join("base_f32.safetensors"));

    let base = LoraAdapter::load(&base_path)?;
    let bytes = read_file(&update_path, &ReadLimits::default())?;
    let started = Instant::now();
    let view = AdapterView::parse(&bytes).map_err(|e| in_file(&update_path, e))?;
    let delta = LazyDelta::new(&view, &base)?;
    println!(
        "update {} ({} LoRA tensors, rank {:?}), base {}",
        update_path.display(),
        view.len(),
        base.rank()?,
        base_path.display()
    );
    for selection in [Selection::FirstLayerB, Selection::AllLayers] {
        let spec = FeatureConfig::new(selection.clone()).fit(&[&delta])?;
        let features = spec.transform(&delta)?;
        let head: Vec<String> = features
            .values
            .iter()
            .take(4)
            .map(|v| format!("{v:+.4}"))
            .collect();
        println!(
            "{selection:>14}: {:>8} features from {:>3} tensors, first values [{}]",
            spec.dim(),
            spec.layout().len(),
            head.join(", ")
        );
    }
    println!("parsed and extracted in {:.2?}", started.elapsed());
    Ok(())
}

fn in_file(path: &std::path::Path, e: safe_fedllm::Error) -> safe_fedllm::Error {
    // Report which file a content error came from, as LoraAdapter::load does.
    match e {
        safe_fedllm::Error::InFile { .. } => e,
        other => safe_fedllm::Error::InFile {
            path: path.to_owned(),
            source: Box::new(other),
        },
    }
}
