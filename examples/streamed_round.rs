//! A defended round over n BF16 uploads read straight from memory-mapped
//! safetensors files: bytes → validated zero-copy views → admission → probe →
//! client level → gate → FedAvg, without ever converting an upload into an
//! owned `f32` adapter.
//!
//! ```sh
//! cargo run --release --example streamed_round -- --n 100
//! ```
//!
//! Writes n Llama-3.1-8B-shaped BF16 adapters (3,407,872 LoRA values each,
//! 6.8 MB) under `target/streamed-round/` on first use, then runs one round and
//! prints its timings and memory as one JSON line:
//!
//! * `peak_rss_mb`: peak resident set (VmHWM), which counts the pages of the
//!   mapped files the round touched (clean page cache, reclaimable);
//! * `peak_anon_mb`: the peak of resident − file-backed pages, sampled every
//!   millisecond: the memory the round itself allocated. Independent of n·d
//!   when uploads are read through views (the aggregate is d floats, plus
//!   per-thread chunk buffers).
//!
//! `scripts/bench_streamed_round_peers.py` holds the same round in memory in
//! torch and in Flower's numpy FedAvg, for the side-by-side in BENCHMARKS.md.

#[path = "../benches/common/mod.rs"]
mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use safe_fedllm::ClientId;
use safe_fedllm::aggregate::FedAvg;
use safe_fedllm::detect::ClientLevel;
use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{AdapterView, LoraAdapter, LoraDelta, ReadLimits, StorageDtype};
use safe_fedllm::probe::LinearProbe;
use safe_fedllm::round::{ClientReport, DefendedRound};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = flag(&args, "--n").map_or(Ok(100), |v| v.parse())?;
    let dir = flag(&args, "--dir").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/streamed-round"),
        PathBuf::from,
    );
    let paths = ensure_uploads(&dir, n)?;
    let global = common::llama8b_adapter(1);
    let probe = probe(&global)?;

    let maps: Vec<memmap2::Mmap> = paths
        .iter()
        .map(|p| {
            let file = File::open(p)?;
            // SAFETY: the files are written once by this example and not
            // modified while mapped.
            unsafe { memmap2::Mmap::map(&file) }
        })
        .collect::<Result<_, _>>()?;
    let ids: Vec<ClientId> = (0..n).map(|i| ClientId::from(format!("c{i}"))).collect();

    let sampler = AnonSampler::start();
    let start = Instant::now();
    let limits = ReadLimits::default();
    let views: Vec<AdapterView<'_>> = maps
        .iter()
        .map(|m| AdapterView::parse_with(m, &limits))
        .collect::<Result<_, _>>()?;
    let parse_s = start.elapsed().as_secs_f64();
    let reports: Vec<ClientReport<'_>> = ids
        .iter()
        .zip(&views)
        .map(|(id, view)| ClientReport::new(id, view, 160))
        .collect();
    let mut round = DefendedRound::new(probe, ClientLevel::params().build()?, FedAvg::new());
    let outcome = round.run(0, &global, &reports)?;
    let total_s = start.elapsed().as_secs_f64();
    let peak_anon = sampler.stop();

    let t = outcome.timings;
    println!(
        "{{\"n\":{n},\"d\":{},\"parse_s\":{parse_s:.4},\"admission_s\":{:.4},\"probe_s\":{:.4},\
         \"detect_s\":{:.6},\"aggregate_s\":{:.4},\"total_s\":{total_s:.4},\"skipped\":{},\
         \"peak_rss_mb\":{:.1},\"peak_anon_mb\":{:.1},\"inputs_mb\":{:.1}}}",
        global.num_params(),
        t.admission_s,
        t.probe_s,
        t.detect_s,
        t.aggregate_s,
        outcome.skipped,
        peak_rss_mb(),
        peak_anon as f64 / 1e6,
        (n * global.num_params() * 2) as f64 / 1e6,
    );
    Ok(())
}

/// The value after `name`, if given.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
}

/// Writes the uploads once (BF16, as clients would send them).
fn ensure_uploads(dir: &Path, n: usize) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let global = common::llama8b_adapter(1);
    (0..n)
        .map(|i| {
            let path = dir.join(format!("client-{i:03}.safetensors"));
            if !path.exists() {
                let update = client_update(&global, i as u64);
                update.save(&path, StorageDtype::Bf16)?;
            }
            Ok(path)
        })
        .collect()
}

/// global + a small client-specific delta (so norms are alike and every
/// client passes the default admission).
fn client_update(global: &LoraAdapter, seed: u64) -> LoraAdapter {
    let delta = common::llama8b_adapter(1000 + seed);
    let mut out = global.clone();
    for (key, tensor) in out.iter_mut() {
        if let Some(d) = delta.get(key.canonical()) {
            for (o, x) in tensor.as_mut_slice().iter_mut().zip(d.as_slice()) {
                *o += 0.1 * x;
            }
        }
    }
    out
}

fn probe(global: &LoraAdapter) -> safe_fedllm::Result<LinearProbe> {
    let sample = client_update(global, 0);
    let spec =
        FeatureConfig::new(Selection::FirstLayerB).fit(&[LoraDelta::between(&sample, global)?])?;
    let weights = common::values(99, spec.dim(), 2.0);
    LinearProbe::new(spec, weights, 0.1)
}

/// VmHWM of this process in MB.
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Samples resident − file-backed memory every millisecond. A monitor, not
/// compute: it must run beside the round (which uses the rayon pool), so it
/// is its own OS thread.
struct AnonSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<()>,
}

impl AnonSampler {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(anon_bytes()));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(anon_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        AnonSampler { stop, peak, handle }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
        self.peak.fetch_max(anon_bytes(), Ordering::Relaxed);
        self.peak.load(Ordering::Relaxed)
    }
}

/// (resident − shared) pages × page size, from /proc/self/statm.
fn anon_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let fields: Vec<u64> = statm
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    match (fields.get(1), fields.get(2)) {
        (Some(resident), Some(shared)) => resident.saturating_sub(*shared) * 4096,
        _ => 0,
    }
}
