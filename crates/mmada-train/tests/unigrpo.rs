//! UniGRPO trainer: 3 steps on real GSM8K prompts from `../shared/data` with a tiny model on
//! the CPU; rewards and losses logged, the checkpoint reloads and resumes. Recipe errors.

use std::path::PathBuf;

use mmada_model::backend::{Cpu, CpuAutodiff};
use mmada_model::{FloatDType, load_checkpoint};
use mmada_train::sft::Resume;
use mmada_train::unigrpo::{UniGrpoOptions, UniGrpoRecipe, run_unigrpo};

/// `../shared/data`, or `None` (skip). With `CI=true` a missing folder fails the test.
fn shared_data() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if p.is_dir() {
        return Some(p.canonicalize().unwrap());
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "CI=true and the shared data folder {} is missing",
            p.display()
        );
    }
    eprintln!("SKIP: shared data folder {} not found", p.display());
    None
}

fn recipe(data: &std::path::Path, out: &std::path::Path, extra: &[String]) -> UniGrpoRecipe {
    let text = format!(
        r##"
run: {{name: grpo, output_dir: "{out}", seed: 5}}
model:
  preset: tiny
  overrides: {{d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 2, mlp_hidden_size: 64}}
tokenizer: {{path: "{tok}"}}
prompts:
  inline:
    name: gsm8k_test
    task: cot
    source: {{path: "{gsm}"}}
    format: jsonl
    fields: {{question: question, answer: answer, answer_marker: '####'}}
    license: MIT
    split: test
  max_examples: 8
  max_prompt_length: 48
grpo:
  num_generations: 2
  generation_batch_size: 4
  num_iterations: 2
  beta: 0.04
  max_completion_length: 8
rollout: {{steps: 4, block_length: 8, temperature: 1.0}}
reward_funcs:
  - kind: math_correctness
  - kind: think_format
  - kind: length
    params: {{min: 0, max: 10, margin: 40, unit: chars}}
optimizer: {{lr: 1.0e-3}}
train: {{max_steps: 3}}
checkpoint: {{every: 2, keep_last: 3}}
"##,
        out = out.display(),
        tok = data.join("tokenizers/gpt2/tokenizer.json").display(),
        gsm = data.join("math/gsm8k_test.jsonl").display(),
    );
    UniGrpoRecipe::parse(&text, "<test>", extra).unwrap()
}

#[test]
fn three_steps_on_gsm8k_log_rewards_and_losses_and_checkpoint_reloads() {
    let Some(data) = shared_data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(&data, tmp.path(), &[]);
    let dev = Default::default();
    let opts = UniGrpoOptions {
        stop_after: Some(2),
        ..Default::default()
    };
    let mut reports = vec![];
    let first =
        run_unigrpo::<CpuAutodiff>(&r, &dev, &opts, &mut |s| reports.push(s.clone())).unwrap();
    assert_eq!(first.final_step, 2);
    // Resume from the step-2 checkpoint for the third step.
    let opts = UniGrpoOptions {
        resume: Some(Resume::Latest),
        ..Default::default()
    };
    let out =
        run_unigrpo::<CpuAutodiff>(&r, &dev, &opts, &mut |s| reports.push(s.clone())).unwrap();
    assert_eq!(out.final_step, 3);
    assert_eq!(out.losses.len(), 3);
    assert_eq!(reports.len(), 3);

    let text = std::fs::read_to_string(out.run_dir.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["step"], (i + 1) as u64);
        for k in [
            "reward",
            "reward_std",
            "frac_reward_zero_std",
            "loss",
            "policy_loss",
            "kl_loss",
            "kl",
            "clip_ratio/region_mean",
            "completions/mean_length",
            "rewards/math_correctness/mean",
            "rewards/think_format/mean",
            "rewards/length/mean",
            "rewards/length/std",
            "time/rollout_s",
            "time/update_s",
        ] {
            assert!(
                row[k].as_f64().is_some_and(f64::is_finite),
                "step {}: {k} = {}",
                i + 1,
                row[k]
            );
        }
        // total reward = 2·correct + 0.5·format + 1·length (paper default weights)
        let want = 2.0 * row["rewards/math_correctness/mean"].as_f64().unwrap()
            + 0.5 * row["rewards/think_format/mean"].as_f64().unwrap()
            + row["rewards/length/mean"].as_f64().unwrap();
        assert!((row["reward"].as_f64().unwrap() - want).abs() < 1e-4);
        let l = row["loss"].as_f64().unwrap();
        let pk = row["policy_loss"].as_f64().unwrap() + row["kl_loss"].as_f64().unwrap();
        assert!((l - pk).abs() < 1e-5, "loss {l} != policy + kl {pk}");
        assert!(row["completions/max_length"].as_f64().unwrap() <= 8.0);
    }
    // Step 2 of the first invocation: the old policy of its 2nd inner update differs -> KL > 0.
    assert!(rows.iter().any(|r| r["kl"].as_f64().unwrap() > 0.0));

    let ckpt = out.last_checkpoint.unwrap();
    assert!(ckpt.ends_with("step-000003"));
    let (cfg, model) = load_checkpoint::<Cpu>(&ckpt.join("model"), &dev, FloatDType::F32).unwrap();
    assert_eq!(cfg.d_model, 32);
    assert_eq!(model.params().len(), 3 + 9 * 2);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 3);
    assert_eq!(state["extra"]["prompt_cursor"], 6);
}

#[test]
fn recipe_errors_name_key_and_valid_values() {
    let Some(data) = shared_data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../recipes/quickstart_unigrpo.yaml"),
    )
    .unwrap();
    assert!(UniGrpoRecipe::parse(&text, "quickstart_unigrpo.yaml", &[]).is_ok());
    let _ = recipe(&data, tmp.path(), &[]);
    let err = |set: &str| {
        let text = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../recipes/unigrpo_gsm8k.yaml"),
        )
        .unwrap();
        UniGrpoRecipe::parse(&text, "r.yaml", &[set.to_string()])
            .unwrap_err()
            .to_string()
    };
    let e = err("grpo.num_generations=1");
    assert!(
        e.contains("grpo.num_generations") && e.contains("1 is invalid") && e.contains("valid: 2"),
        "{e}"
    );
    let e = err("grpo.generation_batch_size=12");
    assert!(
        e.contains("generation_batch_size") && e.contains("valid values are 8, 16, 24"),
        "{e}"
    );
    let e = err("grpo.scale_rewards=grp");
    assert!(e.contains("group, batch, none"), "{e}");
    let e = err("grpo.epsilonn=0.1");
    assert!(e.contains("epsilon"), "{e}");
}
