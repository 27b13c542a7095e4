//! One generation layer: the same prompt through `mmada-infer generate` and through a UniGRPO
//! rollout (`mmada_train::unigrpo::rollout::roll_out`), with the same sampler settings and
//! greedy decoding, gives the same completion ids and the same terminated flag.
//!
//! The checkpoint is a tiny model fine-tuned for a few SFT steps on generated addition rows
//! (`<BOS>What is a + b?c<EOS>…`), so its greedy answers end in EOS (terminated) and are not
//! the constant output of a random model.

use std::path::Path;

use mmada_model::FloatDType;
use mmada_model::backend::{Cpu, CpuAutodiff};
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

/// SFT for `steps` steps on the generated arithmetic (0: the initialised model); returns the
/// checkpoint folder.
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
train: {{max_steps: {max_steps}, log_every: 10}}
"#,
            out = dir.display(),
            data = data.display(),
            max_steps = steps.max(1),
        ),
        "sft.yaml",
        &[],
    )
    .unwrap();
    if steps == 0 {
        // the initialised model (upstream init, run seed), as SFT would start from
        let tok = mmada_train::trainer::load_tokenizer(&recipe.tokenizer, dir).unwrap();
        let cfg = mmada_train::trainer::model_config(&recipe.model, &recipe.tokenizer, &tok, dir)
            .unwrap();
        let model = dir.join("init");
        let opts = mmada_model::SaveOptions {
            dtype: mmada_model::DiskDtype::F32,
            ..Default::default()
        };
        mmada_train::init_checkpoint(&cfg, 1, &model, &opts).unwrap();
        tok.inner()
            .save(model.join("tokenizer.json"), false)
            .unwrap();
        return model;
    }
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
fn grpo_recipe(dir: &Path, ckpt: &Path, gen_len: usize, rollout: &str) -> UniGrpoRecipe {
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
grpo: {{num_generations: 2, generation_batch_size: {n}, max_completion_length: {gen_len}}}
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
    let (mut ended, mut open) = (0, 0);
    // untrained: a random model that rarely stops; 60 SFT steps: answers that end in EOS
    for trained in [0u64, 60] {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = fine_tuned(tmp.path(), trained);
        // (gen_length, steps, block_length): one block; two blocks of 2 steps
        for (gen_len, steps, block) in [(8usize, 8usize, 8usize), (8, 4, 4)] {
            let (e, o) = compare(tmp.path(), &ckpt, gen_len, steps, block);
            ended += e;
            open += o;
        }
    }
    // both kinds of completion were compared
    assert!(
        ended > 0 && open > 0,
        "terminated {ended}, not terminated {open}"
    );
}

/// Runs `mmada-infer generate` and a rollout on every question; asserts equal completions and
/// terminated flags; returns the numbers of terminated and unterminated completions.
fn compare(dir: &Path, ckpt: &Path, gen_len: usize, steps: usize, block: usize) -> (usize, usize) {
    {
        let tmp = dir;
        let ckpt = ckpt.to_path_buf();
        let out = tmp.join(format!("gen-{steps}.jsonl"));
        let mut args = vec![
            "generate".to_string(),
            "--checkpoint".into(),
            ckpt.display().to_string(),
            "--template".into(),
            "none".into(),
            "--gen-length".into(),
            gen_len.to_string(),
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
        let recipe = grpo_recipe(tmp, &ckpt, gen_len, &rollout);
        let tok = mmada_train::trainer::load_tokenizer(&recipe.tokenizer, Path::new("/")).unwrap();
        let dev = Default::default();
        let (cfg, model) =
            mmada_model::load_checkpoint::<Cpu>(&ckpt, &dev, FloatDType::F32).unwrap();
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
                assert_eq!(ro.input.terminated, cut < ids.len(), "prompt {i}");
                assert_eq!(
                    rec["terminated"].as_bool(),
                    Some(ro.input.terminated),
                    "prompt {i}"
                );
            }
            terminated += usize::from(cut < ids.len());
            eprintln!(
                "{:?} -> {:?} (terminated {})",
                QUESTIONS[i],
                rec["output"],
                cut < ids.len()
            );
        }
        (terminated, QUESTIONS.len() - terminated)
    }
}
