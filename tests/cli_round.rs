//! `safe-fedllm-probe round`: the shared defense-spec fixture run from the
//! command line gives the same round as the library (`fixtures/spec/expected.json`,
//! also checked by tests/defense_spec.rs and python/tests/test_spec.py).
#![cfg(feature = "cli")]

use std::path::Path;
use std::process::Command;

use safe_fedllm::lora::LoraAdapter;
use serde_json::Value;

mod common;

use common::{projection, spec_fixture as fixture};

fn run(args: &[String]) -> (i32, String, String) {
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

fn uploads() -> Vec<String> {
    [
        ("alice", 100),
        ("bob", 100),
        ("carol", 120),
        ("mallory", 100),
    ]
    .iter()
    .map(|(c, n)| format!("{c}={}:{n}", fixture(&format!("{c}.safetensors")).display()))
    .collect()
}

fn base_args(spec: &Path) -> Vec<String> {
    vec![
        "round".into(),
        "--spec".into(),
        spec.display().to_string(),
        "--global".into(),
        fixture("global.safetensors").display().to_string(),
    ]
}

#[test]
fn the_fixture_spec_gives_the_same_round_as_the_library() {
    let dir = std::env::temp_dir().join(format!("safe-fedllm-cli-round-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("new_global.safetensors");
    let mut args = base_args(&fixture("defense.toml"));
    args.extend(["--header".into(), "--out".into(), out.display().to_string()]);
    args.extend(uploads());
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let (header, audit) = (&lines[0], &lines[1]);
    assert_eq!(header["spec_sha256"], audit["spec_sha256"]);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    assert_eq!(projection(audit), expected);
    // The new global is written, and mallory's pull is not in it.
    let global = LoraAdapter::load(&out).unwrap();
    let values = global
        .get("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
        .unwrap()
        .as_slice();
    assert!(
        values[0].abs() < 0.02,
        "column 0 (mallory's) moved {}",
        values[0]
    );
    assert!(
        values[1] > 0.2,
        "column 1 (the benign clients') {}",
        values[1]
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_misspelt_spec_key_fails_naming_it() {
    let dir = std::env::temp_dir().join(format!("safe-fedllm-cli-typo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = dir.join("typo.toml");
    std::fs::write(&spec, "[gate]\nthreshhold = 0.2\n").unwrap();
    let mut args = base_args(&spec);
    args.extend(uploads());
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    let error: Value = serde_json::from_str(stderr.trim()).unwrap();
    let message = error["error"].as_str().unwrap();
    assert!(
        message.contains("gate.threshhold") && message.contains("did you mean `threshold`"),
        "{message}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_upload_arguments_are_usage_errors() {
    for bad in ["alice", "alice=file", "alice=file:many", "=file:3"] {
        let mut args = base_args(&fixture("defense.toml"));
        args.push(bad.into());
        let (code, _, stderr) = run(&args);
        assert_eq!(code, 2, "{bad}: {stderr}");
    }
}

#[test]
fn an_upload_that_is_not_safetensors_fails_naming_client_and_file() {
    let mut args = base_args(&fixture("defense.toml"));
    args.extend(uploads());
    args.push(format!("eve={}:10", fixture("generate.py").display()));
    let (code, _, stderr) = run(&args);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("eve") && stderr.contains("generate.py"),
        "{stderr}"
    );
}

#[test]
fn an_audited_spec_needs_the_secret_file_and_never_echoes_it() {
    let dir = std::env::temp_dir().join(format!("safe-fedllm-cli-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = dir.join("audited.toml");
    let text = std::fs::read_to_string(fixture("defense.toml")).unwrap();
    std::fs::write(&spec, format!("{text}\n[audits]\nrate = 0.5\n")).unwrap();
    let with_secret = |secret: Option<&str>| {
        let mut args = base_args(&spec);
        if let Some(secret) = secret {
            let file = dir.join("secret.hex");
            std::fs::write(&file, secret).unwrap();
            args.extend(["--audit-secret-file".into(), file.display().to_string()]);
        }
        args.extend(uploads());
        run(&args)
    };
    // No secret: refused, naming the section.
    let (code, stdout, stderr) = with_secret(None);
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.is_empty() && stderr.contains("audits"), "{stderr}");
    // A malformed secret: refused, naming the file, never printing it.
    let leaked = "not-a-secret-but-private-0123456789";
    let (code, _, stderr) = with_secret(Some(leaked));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("secret.hex") && !stderr.contains(leaked),
        "{stderr}"
    );
    // 64 hex digits: the round runs, with the fixture's verdicts (the client
    // level audits nobody) under the audited spec's own hash.
    let (code, stdout, stderr) = with_secret(Some(&format!("{}\n", "ab".repeat(32))));
    assert_eq!(code, 0, "{stderr}");
    let line: Value = serde_json::from_str(stdout.trim()).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    let got = projection(&line);
    assert_eq!(got["clients"], expected["clients"]);
    assert_ne!(got["spec_sha256"], expected["spec_sha256"]);
    std::fs::remove_dir_all(&dir).ok();
}
