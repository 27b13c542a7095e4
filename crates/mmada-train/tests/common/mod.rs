//! Helpers shared by the mmada-train integration tests.

use std::path::Path;

use mmada_train::recipe::{Recipe as _, SftRecipe};

/// A tiny SFT recipe on generated arithmetic (no shared data): d_model 32, 2 blocks, lm
/// batch 4, lr 1e-3, clip 1.0, constant schedule, 6 steps, a checkpoint every step; `sets`
/// are `--set` overrides applied in order.
pub fn sft_recipe(dir: &Path, name: &str, sets: &[&str]) -> SftRecipe {
    let data = dir.join("data");
    if !data.join("arith.jsonl").is_file() {
        mmada_train::synth::write_arithmetic(&data, 200, 7).unwrap();
    }
    let text = format!(
        r#"
run: {{name: {name}, output_dir: "{out}", seed: 3}}
model:
  preset: tiny
  overrides: {{d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 2, mlp_hidden_size: 64}}
tokenizer: {{path: "{tok}"}}
data:
  layout: {{max_seq_length: 32, max_lm_len: 40}}
  lm:
    batch_size: 4
    sources:
      - inline:
          name: arithmetic
          task: chat
          source: {{path: "{jsonl}"}}
          format: jsonl
          fields: {{question: question, answer: answer}}
          license: MIT
          split: train
optimizer: {{lr: 1.0e-3, max_grad_norm: 1.0}}
schedule: {{kind: constant}}
train: {{max_steps: 6}}
checkpoint: {{every: 1, keep_last: 0}}
"#,
        out = dir.join("runs").display(),
        tok = data.join("tokenizer.json").display(),
        jsonl = data.join("arith.jsonl").display(),
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    SftRecipe::parse(&text, name, &sets).unwrap()
}
