//! `mmada-train data inspect` / `data check` end to end on generated files.

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mmada-train"))
}

/// A character-level tokenizer and a small Q&A jsonl (the quickstart generator).
fn synth(dir: &Path) {
    mmada_train::synth::write_arithmetic(dir, 20, 0).unwrap();
}

#[test]
fn inspect_renders_examples_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path());
    std::fs::write(
        dir.path().join("arith.yaml"),
        "name: arith\ntask: chat\nsource: {path: arith.jsonl}\nformat: jsonl\nfields: {question: question, answer: answer}\nlicense: MIT\nsplit: train\n",
    )
    .unwrap();
    let out = bin()
        .current_dir(dir.path())
        .args(["data", "inspect", "--manifest", "arith.yaml", "--n", "2"])
        .args(["--tokenizer", "tokenizer.json", "--max-lm-len", "64"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("manifest `arith` (task chat): 1 file(s), 20 example(s)"),
        "{text}"
    );
    assert!(
        text.contains("── example 0") && text.contains("── example 1"),
        "{text}"
    );
    assert!(!text.contains("── example 2"), "{text}");
    assert!(text.contains("tokens: 64 laid out"), "{text}");
    assert!(text.contains("⟦ANSWER⟧"), "{text}");
    assert!(
        text.contains("lengths over 20 laid-out example(s)"),
        "{text}"
    );
}

#[test]
fn check_reports_every_source_and_fails_on_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    synth(&dir.path().join("data"));
    let recipe = r#"
run: {name: check}
model: {preset: tiny}
tokenizer: {path: data/tokenizer.json}
data:
  data_root: data
  layout: {max_seq_length: 32, max_lm_len: 64}
  lm:
    batch_size: 2
    sources:
      - inline: {name: arith, task: chat, source: {path: arith.jsonl}, format: jsonl, fields: {question: question, answer: answer}, license: MIT, split: train}
      - inline: {name: missing, task: chat, source: {path: nothing/*.jsonl}, format: jsonl, fields: {question: q, answer: a}, license: MIT, split: train}
optimizer: {lr: 1.0e-3}
train: {max_steps: 1}
"#;
    std::fs::write(dir.path().join("r.yaml"), recipe).unwrap();
    let out = bin()
        .current_dir(dir.path())
        .args(["data", "check", "--recipe", "r.yaml"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains(
            "OK    data.lm.sources[0] `arith` (task chat): 1 file(s), 20 example(s), 0 skipped"
        ),
        "{text}"
    );
    assert!(
        text.contains("FAIL  data.lm.sources[1]: manifest `missing`: source"),
        "{text}"
    );
    assert!(text.contains("1 source(s) OK, 1 failed"), "{text}");
    // Only the good source: exit 0.
    let good: String = recipe
        .lines()
        .filter(|l| !l.contains("name: missing"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("good.yaml"), good).unwrap();
    let out = bin()
        .current_dir(dir.path())
        .args(["data", "check", "--recipe", "good.yaml"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 source(s) OK, 0 failed"), "{text}");
}
