//! Writes seed inputs for the targets whose formats have no fixture file
//! (probe files, detector checkpoints, feature specs, manifests) into
//! `corpus/<target>/`: `cargo run --example seeds` from `fuzz/`.

use std::path::Path;

use safe_fedllm::ClientId;
use safe_fedllm::detect::{AnyDetector, ClientEvidence, DefenseLevel, Detector};
use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{LoraAdapter, LoraTensor};
use safe_fedllm::probe::LinearProbe;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("seed written");
}

fn main() -> safe_fedllm::Result<()> {
    let mut delta = LoraAdapter::new();
    for layer in 0..2 {
        for (m, out) in [("q_proj", 4), ("v_proj", 2)] {
            let p = format!("base_model.model.model.layers.{layer}.self_attn.{m}");
            delta.insert(
                &format!("{p}.lora_A.weight"),
                LoraTensor::new("a", [2, 3], vec![0.1; 6])?,
            )?;
            delta.insert(
                &format!("{p}.lora_B.weight"),
                LoraTensor::new("b", [out, 2], vec![-0.2; out * 2])?,
            )?;
        }
    }
    for (i, selection) in [Selection::FirstLayerB, Selection::AllLayers]
        .into_iter()
        .enumerate()
    {
        let spec = FeatureConfig::new(selection).fit(&[&delta])?;
        write(
            "feature_spec",
            &format!("spec{i}.json"),
            serde_json::to_string(&spec).expect("json").as_bytes(),
        );
        let dim = spec.dim();
        let probe = LinearProbe::new(spec, (0..dim).map(|j| j as f32 / 10.0).collect(), -0.5)?;
        write(
            "probe_file",
            &format!("probe{i}.safetensors"),
            &probe.to_bytes()?,
        );
    }
    for (i, level) in [
        DefenseLevel::Step,
        DefenseLevel::Client,
        DefenseLevel::Shadow,
        DefenseLevel::Evidence,
    ]
    .into_iter()
    .enumerate()
    {
        let mut detector = AnyDetector::with_defaults(level)?;
        write(
            "detector_checkpoint",
            &format!("fresh{i}.json"),
            serde_json::to_string(&detector).expect("json").as_bytes(),
        );
        let evidence = ClientEvidence::new(32).with_steps(vec![0.9, 0.2]);
        for round in 0..4 {
            let _ = detector.assess(round, &ClientId::from("c"), &evidence);
        }
        write(
            "detector_checkpoint",
            &format!("used{i}.json"),
            serde_json::to_string(&detector).expect("json").as_bytes(),
        );
    }
    write(
        "manifest",
        "two.jsonl",
        br#"{"path": "a.safetensors", "base": "base.safetensors", "label": "benign", "client": 3, "round": 1, "step": 2, "group": "g1"}
{"path": "b.safetensors", "label": "malicious", "client": "c2", "group": 7}
{"path": "c.safetensors", "label": 1}
"#,
    );
    Ok(())
}
