//! The `safe-fedllm-probe` command-line tool (feature `cli`): one test per
//! behaviour of issue 10 item 3 and issue 11's threshold selection.
#![cfg(feature = "cli")]

use std::path::{Path, PathBuf};
use std::process::Command;

use safe_fedllm::lora::{LoraAdapter, LoraTensor, StorageDtype};
use safe_fedllm::probe::synthetic::SyntheticConfig;
use serde_json::Value;

const KEY: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run_in(cwd: Option<&Path>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_safe-fedllm-probe"));
    command.args(args);
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let out = command.output().unwrap();
    let output = Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    };
    // stderr is JSON only, whatever happened.
    for line in output.stderr.lines() {
        let parsed: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line}"));
        assert!(parsed["error"].is_string(), "{line}");
    }
    output
}

fn run(args: &[&str]) -> Output {
    run_in(None, args)
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("stdout not JSON ({e}): {l}")))
        .collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("safe-fedllm-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `n` labelled adapters (runs of 3 share a group) and a manifest
/// with paths relative to `dir`; returns the manifest path.
fn dataset(dir: &Path, n: usize, seed: u64) -> PathBuf {
    let (x, labels) = SyntheticConfig::new(n, 8)
        .separation(3.0)
        .noise(1.0)
        .rank(2)
        .seed(seed)
        .generate()
        .unwrap();
    let mut manifest = String::new();
    for (i, (row, label)) in x.rows().into_iter().zip(&labels).enumerate() {
        let mut adapter = LoraAdapter::new();
        adapter
            .insert(KEY, LoraTensor::new("b", [8, 1], row.to_vec()).unwrap())
            .unwrap();
        adapter
            .save(dir.join(format!("a{i}.safetensors")), StorageDtype::F32)
            .unwrap();
        manifest.push_str(&format!(
            "{{\"path\": \"a{i}.safetensors\", \"label\": \"{}\", \"group\": \"run{}\"}}\n",
            label.as_str(),
            i / 3
        ));
    }
    let path = dir.join("m.jsonl");
    std::fs::write(&path, manifest).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn trained(dir: &Path, policy: &str) -> (PathBuf, PathBuf, Value) {
    let manifest = dataset(dir, 90, 5);
    let probe = dir.join("probe.safetensors");
    let out = run(&[
        "train",
        "--manifest",
        s(&manifest),
        "--out",
        s(&probe),
        "--threshold-policy",
        policy,
        "--folds",
        "3",
        "--c-grid",
        "0.1,1,10",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let summary = json_lines(&out.stdout).remove(0);
    (manifest, probe, summary)
}

#[test]
fn every_subcommand_has_help_and_train_help_states_the_manifest_format() {
    for command in ["train", "score", "eval"] {
        let out = run(&[command, "--help"]);
        assert_eq!(out.code, 0, "{command}: {}", out.stderr);
        assert!(out.stdout.contains("Usage: safe-fedllm-probe"), "{command}");
    }
    let train = run(&["train", "--help"]).stdout;
    for needle in [
        "MANIFEST FORMAT",
        "\"group\"",
        "RESOLVED AGAINST THE",
        "--threshold-policy",
        "--folds",
        "--c-grid",
    ] {
        assert!(train.contains(needle), "train --help lacks {needle}");
    }
    let top = run(&["--help"]);
    assert_eq!(top.code, 0);
    assert!(top.stdout.contains("train") && top.stdout.contains("eval"));
}

#[test]
fn version_flag_prints_the_crate_version() {
    let out = run(&["--version"]);
    assert_eq!(out.code, 0);
    assert_eq!(
        out.stdout.trim(),
        format!("safe-fedllm-probe {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn unknown_flags_and_bad_values_are_usage_errors() {
    for args in [
        vec![
            "train",
            "--manifest",
            "m",
            "--out",
            "o",
            "--treshold",
            "0.5",
        ],
        vec!["train", "--manifest", "m", "--out", "o", "--C", "10"],
        vec!["eval", "--probe", "p", "--manifest", "m", "--thresh", "0.5"],
        vec!["score", "--probe", "p", "--bse", "b", "x"],
        vec![
            "train",
            "--manifest",
            "m",
            "--out",
            "o",
            "--threshold-policy",
            "fixed:1.5",
        ],
        vec!["train", "--manifest", "m", "--out", "o", "--c-grid", "1,-3"],
        vec![
            "eval",
            "--probe",
            "p",
            "--manifest",
            "m",
            "--threshold",
            "2",
        ],
        vec!["frobnicate"],
        vec![],
    ] {
        let out = run(&args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{args:?}");
        let error: Value = serde_json::from_str(out.stderr.trim()).unwrap();
        assert_eq!(error["kind"], "usage", "{args:?}");
    }
}

#[test]
fn train_checks_the_out_folder_before_training() {
    let dir = temp_dir("out-check");
    // The manifest names a file that does not exist: if training ran first,
    // the error would be about it.
    std::fs::write(
        dir.join("m.jsonl"),
        "{\"path\": \"absent.safetensors\", \"label\": \"benign\"}\n",
    )
    .unwrap();
    for out_path in [
        dir.join("no-such-folder").join("probe.safetensors"),
        dir.clone(),
    ] {
        let out = run(&[
            "train",
            "--manifest",
            s(&dir.join("m.jsonl")),
            "--out",
            s(&out_path),
        ]);
        assert_eq!(out.code, 1);
        let error: Value = serde_json::from_str(out.stderr.trim()).unwrap();
        let message = error["error"].as_str().unwrap();
        assert!(
            message.contains("--out") && !message.contains("absent"),
            "{message}"
        );
    }
}

#[test]
fn train_selects_the_threshold_by_policy_and_reports_oof_figures() {
    let dir = temp_dir("policy");
    let (_, probe, summary) = trained(&dir, "target-fpr:0.0");
    let oof = &summary["oof"];
    assert_eq!(oof["false_positive_rate"].as_f64().unwrap(), 0.0);
    assert!(oof["recall"].as_f64().unwrap() > 0.5, "{summary}");
    assert!(oof["margin"].as_f64().unwrap() > 0.0);
    assert!(oof["ece"].as_f64().unwrap() >= 0.0);
    assert_eq!(oof["folds"], 3);
    assert_eq!(oof["groups"], 30);
    assert_eq!(summary["threshold_policy"], "target-fpr:0");
    let c = summary["c"].as_f64().unwrap();
    assert!([0.1, 1.0, 10.0].contains(&c), "{c}");
    // The saved probe carries the chosen threshold.
    let saved = safe_fedllm::probe::LinearProbe::load(&probe).unwrap();
    assert_eq!(
        f64::from(safe_fedllm::probe::Probe::threshold(&saved)),
        summary["threshold"].as_f64().unwrap()
    );

    let dir = temp_dir("policy-fixed");
    let (_, _, fixed) = trained(&dir, "fixed:0.65");
    assert_eq!(fixed["threshold"].as_f64().unwrap() as f32, 0.65);
}

#[test]
fn score_prints_one_result_per_file_and_fails_if_any_failed() {
    let dir = temp_dir("score");
    let (_, probe, summary) = trained(&dir, "fixed:0.5");
    let good = dir.join("a0.safetensors");
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file at all").unwrap();
    let missing = dir.join("missing.safetensors");
    let out = run(&[
        "score",
        "--probe",
        s(&probe),
        s(&good),
        s(&garbage),
        s(&missing),
        s(&dir.join("a1.safetensors")),
    ]);
    assert_eq!(out.code, 1);
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 4);
    let score = lines[0]["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score));
    let tau = summary["threshold"].as_f64().unwrap();
    assert_eq!(lines[0]["harmful"].as_bool().unwrap(), score >= tau);
    assert!(lines[1]["error"].as_str().unwrap().contains("garbage"));
    assert!(lines[2]["error"].as_str().unwrap().contains("missing"));
    assert!(
        lines[3]["score"].is_number(),
        "a bad file must not suppress later ones"
    );
    let error: Value = serde_json::from_str(out.stderr.trim()).unwrap();
    assert!(error["error"].as_str().unwrap().contains("2 of 4"));

    let all_good = run(&["score", "--probe", s(&probe), s(&good)]);
    assert_eq!(all_good.code, 0, "{}", all_good.stderr);
    assert!(all_good.stderr.is_empty());
}

#[test]
fn manifest_paths_resolve_against_the_manifest_folder_and_errors_say_so() {
    let dir = temp_dir("relative");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let manifest = dataset(&data, 60, 7);
    let elsewhere = temp_dir("relative-cwd");
    // Run from another folder: the relative paths still resolve.
    let out = run_in(
        Some(&elsewhere),
        &[
            "train",
            "--manifest",
            s(&manifest),
            "--out",
            "probe.safetensors",
            "--folds",
            "3",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(elsewhere.join("probe.safetensors").exists());

    let broken = data.join("broken.jsonl");
    std::fs::write(
        &broken,
        "{\"path\": \"a0.safetensors\", \"label\": \"benign\"}\n{\"path\": \"nope/a1.safetensors\", \"label\": \"malicious\"}\n",
    )
    .unwrap();
    let out = run_in(
        Some(&elsewhere),
        &[
            "eval",
            "--probe",
            "probe.safetensors",
            "--manifest",
            s(&broken),
        ],
    );
    assert_eq!(out.code, 1);
    let error: Value = serde_json::from_str(out.stderr.trim()).unwrap();
    let message = error["error"].as_str().unwrap();
    assert!(message.contains("manifest line 2"), "{message}");
    assert!(
        message.contains("resolve against its folder") && message.contains(s(&data)),
        "{message}"
    );
}

#[test]
fn eval_prints_n_accuracy_precision_recall_auc_ece_and_brier() {
    let dir = temp_dir("eval");
    let (manifest, probe, summary) = trained(&dir, "fixed:0.8");
    let out = run(&["eval", "--probe", s(&probe), "--manifest", s(&manifest)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let metrics = json_lines(&out.stdout).remove(0);
    for key in [
        "n",
        "accuracy",
        "precision",
        "recall",
        "roc_auc",
        "ece",
        "brier",
        "threshold",
    ] {
        assert!(metrics[key].is_number(), "missing {key}: {metrics}");
    }
    assert_eq!(metrics["n"], 90);
    assert_eq!(metrics["threshold"], summary["threshold"]);
    assert!(metrics["roc_auc"].as_f64().unwrap() > 0.9);
    // --threshold evaluates at another τ (it used to be ignored).
    let out = run(&[
        "eval",
        "--probe",
        s(&probe),
        "--manifest",
        s(&manifest),
        "--threshold",
        "0.01",
    ]);
    let low = json_lines(&out.stdout).remove(0);
    assert_eq!(low["threshold"].as_f64().unwrap() as f32, 0.01);
    assert!(low["recall"].as_f64().unwrap() >= metrics["recall"].as_f64().unwrap());
}

/// A malicious-looking adapter that omits the probed tensor (layer-0
/// lora_B) and carries its update in layer 1 instead.
fn evasive(dir: &Path) -> PathBuf {
    let mut adapter = LoraAdapter::new();
    let other = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight";
    adapter
        .insert(other, LoraTensor::new("b", [8, 1], vec![5.0; 8]).unwrap())
        .unwrap();
    let path = dir.join("evasive.safetensors");
    adapter.save(&path, StorageDtype::F32).unwrap();
    path
}

#[test]
fn the_cli_zero_fills_only_behind_the_flag_when_score_lacks_probed_keys() {
    let dir = temp_dir("score-missing");
    let (_, probe, _) = trained(&dir, "fixed:0.5");
    let evasive = evasive(&dir);
    let good = dir.join("a0.safetensors");

    let out = run(&["score", "--probe", s(&probe), s(&good), s(&evasive)]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    let lines = json_lines(&out.stdout);
    assert_eq!(lines[0]["zero_fill"], false);
    assert!(lines[0]["score"].is_number());
    let refused = &lines[1];
    assert!(
        refused["score"].is_null() && refused["harmful"].is_null(),
        "{refused}"
    );
    assert_eq!(refused["missing_probe_keys"], serde_json::json!([KEY]));
    let message = refused["error"].as_str().unwrap();
    assert!(
        message.contains(KEY) && message.contains("evasive") && message.contains("--zero-fill"),
        "{message}"
    );
    let error: Value = serde_json::from_str(out.stderr.trim()).unwrap();
    assert!(error["error"].as_str().unwrap().contains("1 of 2"));

    let out = run(&["score", "--probe", s(&probe), "--zero-fill", s(&evasive)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let line = json_lines(&out.stdout).remove(0);
    assert_eq!(line["zero_fill"], true);
    assert_eq!(line["zero_filled"], serde_json::json!([KEY]));
    assert!(line["score"].is_number());
}

#[test]
fn the_cli_zero_fills_only_behind_the_flag_when_eval_lacks_probed_keys() {
    let dir = temp_dir("eval-missing");
    let (_, probe, _) = trained(&dir, "fixed:0.5");
    evasive(&dir);
    let manifest = dir.join("evasive.jsonl");
    std::fs::write(
        &manifest,
        "{\"path\": \"a0.safetensors\", \"label\": \"benign\"}\n\
         {\"path\": \"evasive.safetensors\", \"label\": \"malicious\"}\n",
    )
    .unwrap();

    let out = run(&["eval", "--probe", s(&probe), "--manifest", s(&manifest)]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.is_empty(), "no metrics without every probed key");
    let error: Value = serde_json::from_str(out.stderr.trim()).unwrap();
    let message = error["error"].as_str().unwrap();
    assert!(
        message.contains("manifest line 2")
            && message.contains(KEY)
            && message.contains("--zero-fill"),
        "{message}"
    );

    let out = run(&[
        "eval",
        "--probe",
        s(&probe),
        "--manifest",
        s(&manifest),
        "--zero-fill",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let metrics = json_lines(&out.stdout).remove(0);
    assert_eq!(metrics["zero_fill"], true);
    let filled = metrics["zero_filled"].as_array().unwrap();
    assert_eq!(filled.len(), 1, "{metrics}");
    assert_eq!(filled[0]["line"], 2);
    assert_eq!(filled[0]["keys"], serde_json::json!([KEY]));
}
