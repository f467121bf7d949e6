//! The `safe-fedllm-probe` command-line tool (feature `cli`): train from a
//! manifest, score files, evaluate — all JSON on stdout.
#![cfg(feature = "cli")]

use std::process::Command;

use safe_fedllm::lora::{LoraAdapter, LoraTensor, StorageDtype};
use safe_fedllm::probe::synthetic::SyntheticConfig;

const KEY: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_safe-fedllm-probe"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn train_score_and_eval_print_json() {
    let dir = std::env::temp_dir().join(format!("safe-fedllm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (x, labels) = SyntheticConfig::new(40, 8)
        .separation(3.0)
        .noise(1.0)
        .rank(2)
        .seed(5)
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
            "{{\"path\": \"a{i}.safetensors\", \"label\": \"{}\"}}\n",
            label.as_str()
        ));
    }
    let manifest_path = dir.join("m.jsonl");
    std::fs::write(&manifest_path, manifest).unwrap();
    let probe_path = dir.join("probe.safetensors");
    let (code, stdout, stderr) = run(&[
        "train",
        "--manifest",
        manifest_path.to_str().unwrap(),
        "--out",
        probe_path.to_str().unwrap(),
        "--c",
        "10",
        "--threshold",
        "0.5",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["dim"], 8);
    assert!(summary["training_roc_auc"].as_f64().unwrap() > 0.95);

    let first = dir.join("a0.safetensors");
    let (code, stdout, stderr) = run(&[
        "score",
        "--probe",
        probe_path.to_str().unwrap(),
        first.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let score = line["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score));
    assert_eq!(line["harmful"].as_bool().unwrap(), score >= 0.5);

    let (code, stdout, _) = run(&[
        "eval",
        "--probe",
        probe_path.to_str().unwrap(),
        "--manifest",
        manifest_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let eval: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(eval["roc_auc"].as_f64().unwrap() > 0.95);

    let (code, _, stderr) = run(&[
        "score",
        "--probe",
        dir.join("absent").to_str().unwrap(),
        "x",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("\"error\""));
    let (code, _, _) = run(&["frobnicate"]);
    assert_eq!(code, 2);
}
