//! One generation layer: the same prompt through `mmada-infer generate` and through a UniGRPO
//! rollout (`mmada_train::unigrpo::rollout::roll_out`), with the same sampler settings and
//! greedy decoding, gives the same completion ids and the same terminated flag.
//!
//! The checkpoint is a tiny model fine-tuned for a few SFT steps on generated addition rows
//! (`<BOS>What is a + b?c<EOS>…`), so its greedy answers end in EOS (terminated) and are not
//! the constant output of a random model.

use std::path::Path;

use mmada_model::backend::{Cpu, CpuAutodiff};
use mmada_model::FloatDType;
use mmada_train::recipe::{Recipe as _, SftRecipe, UniGrpoRecipe};
use mmada_train::sft::Sft;
use mmada_train::trainer::{RunOptions, TrainLoop as _};
use mmada_train::unigrpo::rollout::{RolloutCtx, load_prompts, roll_out};

mod common;

const QUESTIONS: [&str; 6] = [
    "What is 12 + 3?",
    "What is 47 + 8?",
    "What is 90 + 9?",
    "What is 5 + 61?",
    "What is 33 + 33?",
    "What is 70 + 2?",
];

/// SFT for `steps` steps on the generated arithmetic; returns the final checkpoint's `model/`.
fn fine_tuned(dir: &Path, steps: u64) -> std::path::PathBuf {
    let data = dir.join("data");
    mmada_train::synth::write_arithmetic(&data, 200, 5).unwrap();
    let recipe = SftRecipe::parse(
        &format!(
            r#"
run: {{name: sft, output_dir: "{out}", seed: 1}}
model:
  preset: tiny
  overrides: {{d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 2, mlp_hidden_size: 64}}
tokenizer: {{path: "{data}/tokenizer.json"}}
data:
  layout:
    max_seq_length: 20
    max_lm_len: 20
    explicit_prompt: true
    template: {{header: "", turn_end: "", trim: true, cot_instruction: "", cot_answer: "{{answer}}"}}
  lm:
    batch_size: 16
    sources:
      - inline:
          name: arithmetic
          task: chat
          source: {{path: "{data}/arith.jsonl"}}
          format: jsonl
          fields: {{question: question, answer: answer}}
          license: MIT
          split: train
optimizer: {{lr: 3.0e-3}}
schedule: {{kind: constant}}
train: {{max_steps: {steps}, log_every: 10}}
"#,
            out = dir.display(),
            data = data.display(),
        ),
        "sft.yaml",
        &[],
    )
    .unwrap();
    let out = Sft::run::<CpuAutodiff>(
        &recipe,
        &Default::default(),
        &RunOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    out.last_checkpoint.unwrap().join("model")
}

/// A UniGRPO recipe whose prompts are [`QUESTIONS`] (raw, no template), G = 2, with the
/// rollout settings `rollout`.
fn grpo_recipe(dir: &Path, ckpt: &Path, gen: usize, rollout: &str) -> UniGrpoRecipe {
    let prompts = dir.join("prompts.jsonl");
    let rows: Vec<String> = QUESTIONS
        .iter()
        .map(|q| serde_json::json!({"question": q, "answer": "0"}).to_string())
        .collect();
    std::fs::write(&prompts, rows.join("\n")).unwrap();
    UniGrpoRecipe::parse(
        &format!(
            r#"
run: {{name: rl, output_dir: "{out}", seed: 0}}
model: {{checkpoint: "{ckpt}"}}
tokenizer: {{path: "{ckpt}/tokenizer.json"}}
prompts:
  template: none
  cot: false
  inline:
    name: q
    task: chat
    source: {{path: "{prompts}"}}
    format: jsonl
    fields: {{question: question, answer: answer}}
    license: MIT
    split: train
grpo: {{num_generations: 2, generation_batch_size: {n}, max_completion_length: {gen}}}
rollout: {rollout}
reward_funcs: [{{kind: length}}]
optimizer: {{lr: 1.0e-5}}
train: {{max_steps: 1}}
"#,
            out = dir.display(),
            ckpt = ckpt.display(),
            prompts = prompts.display(),
            n = 2 * QUESTIONS.len(),
        ),
        "rl.yaml",
        &[],
    )
    .unwrap()
}

#[test]
fn infer_generate_and_unigrpo_rollout_give_the_same_completions() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = fine_tuned(tmp.path(), 60);
    // (gen_length, steps, block_length): one block; two blocks of low-confidence remasking
    for (gen, steps, block) in [(8usize, 8usize, 8usize), (8, 4, 4)] {
        let out = tmp.path().join(format!("gen-{steps}.jsonl"));
        let mut args = vec![
            "generate".to_string(),
            "--checkpoint".into(),
            ckpt.display().to_string(),
            "--template".into(),
            "none".into(),
            "--gen-length".into(),
            gen.to_string(),
            "--steps".into(),
            steps.to_string(),
            "--block-length".into(),
            block.to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        for q in QUESTIONS {
            args.extend(["--prompt".to_string(), q.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = common::run(&args);
        assert!(r.ok, "{}", r.stderr);
        let infer = common::jsonl(&out);
        assert_eq!(infer.len(), QUESTIONS.len());

        let rollout = format!("{{steps: {steps}, block_length: {block}, temperature: 0.0}}");
        let recipe = grpo_recipe(tmp.path(), &ckpt, gen, &rollout);
        let tok = mmada_train::trainer::load_tokenizer(&recipe.tokenizer, Path::new("/")).unwrap();
        let dev = Default::default();
        let (cfg, model) = mmada_model::load_checkpoint::<Cpu>(&ckpt, &dev, FloatDType::F32).unwrap();
        let gen_cfg = recipe.generate_config(&tok, cfg.embedding_size).unwrap();
        let examples = load_prompts(&recipe.prompts, Path::new("/")).unwrap();
        let ctx = RolloutCtx {
            recipe: &recipe,
            tok: &tok,
            gen_cfg: &gen_cfg,
            examples: &examples,
        };
        let slots: Vec<usize> = (0..QUESTIONS.len()).collect();
        let rollouts = roll_out(&ctx, &model, &slots, 0, 0, &dev).unwrap();
        let eos = tok.layout().eos_id;
        let mut terminated = 0;
        for (i, rec) in infer.iter().enumerate() {
            let ids: Vec<u32> = rec["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let cut = ids
                .iter()
                .position(|&t| t == eos || t == tok.layout().eot_id)
                .unwrap_or(ids.len());
            for g in 0..2 {
                let ro = &rollouts[2 * i + g];
                assert_eq!(ro.input.prompt, QUESTIONS[i]);
                assert_eq!(
                    ro.input.completion_ids,
                    ids[..cut],
                    "prompt {i} ({}), steps {steps}: rollout vs generate",
                    QUESTIONS[i]
                );
                assert_eq!(ro.terminated, cut < ids.len(), "prompt {i}");
                assert_eq!(rec["terminated"].as_bool(), Some(ro.terminated), "prompt {i}");
            }
            terminated += usize::from(cut < ids.len());
            eprintln!("{:?} -> {:?} (terminated {})", QUESTIONS[i], rec["output"], cut < ids.len());
        }
        // the fine-tuned model answers and stops: the test compares real completions
        assert!(terminated > 0, "no completion terminated: the check is vacuous");
    }
}
