//! `mmada-infer inspect` on the upstream fixture checkpoint and on a broken copy.

use std::path::PathBuf;
use std::process::Command;

fn fixture_weights() -> PathBuf {
    match std::env::var_os("MMADA_FIXTURES") {
        Some(p) => PathBuf::from(p).join("weights"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/weights"),
    }
}

fn inspect(dir: &std::path::Path, json: bool) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mmada-infer"));
    cmd.args(["inspect", "--checkpoint"]).arg(dir);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn inspect_reports_groups_and_verifies() {
    let (ok, stdout, stderr) = inspect(&fixture_weights(), true);
    assert!(ok, "{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // tiny fixture: d 64, 2 layers, mlp 128, vocab 384, f32
    let expected = 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 2 * 384 * 64 + 64;
    assert_eq!(v["total_params"], expected);
    assert_eq!(v["expected_params"], expected);
    assert_eq!(v["total_bytes"], expected * 4);
    assert_eq!(v["groups"]["embedding"]["params"], 384 * 64);
    assert_eq!(v["groups"]["attention"]["tensors"], 8);
    assert_eq!(v["groups"]["mlp"]["tensors"], 6);
    assert_eq!(v["groups"]["norms"]["tensors"], 5);
    assert_eq!(v["ok"], true);
    let (ok, text, _) = inspect(&fixture_weights(), false);
    assert!(
        ok && text.contains("verified     OK: all 21 tensors"),
        "{text}"
    );
}

#[test]
fn inspect_fails_on_mismatching_config() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::copy(
        fixture_weights().join("model.safetensors"),
        d.join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_weights().join("config.json")).unwrap(),
    )
    .unwrap();
    cfg["mlp_hidden_size"] = 256.into();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let (ok, text, _) = inspect(d, false);
    assert!(!ok, "must exit non-zero");
    assert!(
        text.contains("problem(s)")
            && text.contains("ff_proj.weight")
            && text.contains("[256, 64]"),
        "{text}"
    );
}
