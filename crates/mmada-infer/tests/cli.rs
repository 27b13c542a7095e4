//! `mmada-infer inspect` on the upstream fixture checkpoint and on a broken copy.

use std::path::PathBuf;
use std::process::Command;

fn fixture_weights() -> PathBuf {
    match std::env::var_os("MMADA_FIXTURES") {
        Some(p) => PathBuf::from(p).join("weights"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/weights"),
    }
}

/// The sizes of the fixture checkpoint, from its `config.json` (the tests hold for any
/// fixture set with the upstream layout, not only the tiny one).
struct FixtureConfig {
    d: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    mlp: usize,
    vocab: usize,
}

fn fixture_config() -> FixtureConfig {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_weights().join("config.json")).unwrap(),
    )
    .unwrap();
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("config.json: {k}")) as usize;
    let heads = n("n_heads");
    FixtureConfig {
        d: n("d_model"),
        layers: n("n_layers"),
        heads,
        kv_heads: v["n_kv_heads"].as_u64().map_or(heads, |x| x as usize),
        mlp: n("mlp_hidden_size"),
        vocab: n("embedding_size"),
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
    // every size from the fixture's own config (f32 weights)
    let c = fixture_config();
    let (d, layers, m, vocab) = (c.d, c.layers, c.mlp, c.vocab);
    let kv = c.kv_heads * (d / c.heads);
    let expected = layers * (2 * d * d + 2 * d * kv + 3 * d * m + 2 * d) + 2 * vocab * d + d;
    assert_eq!(v["total_params"], expected);
    assert_eq!(v["expected_params"], expected);
    assert_eq!(v["total_bytes"], expected * 4);
    assert_eq!(v["groups"]["embedding"]["params"], vocab * d);
    assert_eq!(v["groups"]["attention"]["tensors"], 4 * layers);
    assert_eq!(v["groups"]["mlp"]["tensors"], 3 * layers);
    assert_eq!(v["groups"]["norms"]["tensors"], 2 * layers + 1);
    assert_eq!(v["ok"], true);
    let (ok, text, _) = inspect(&fixture_weights(), false);
    let all = format!("verified     OK: all {} tensors", 9 * layers + 3);
    assert!(ok && text.contains(&all), "{text}");
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
    let c = fixture_config();
    cfg["mlp_hidden_size"] = (2 * c.mlp).into();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let (ok, text, _) = inspect(d, false);
    assert!(!ok, "must exit non-zero");
    assert!(
        text.contains("problem(s)")
            && text.contains("ff_proj.weight")
            && text.contains(&format!("[{}, {}]", 2 * c.mlp, c.d)),
        "{text}"
    );
}
