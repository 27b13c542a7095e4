//! UniGRPO trainer: 3 steps on real GSM8K prompts from `../shared/data` with a tiny model on
//! the CPU; rewards and losses logged, the checkpoint reloads and resumes. Recipe errors.

use mmada_train::recipe::Recipe as _;
use mmada_train::trainer::TrainLoop as _;
use std::path::PathBuf;

use mmada_model::backend::{Cpu, CpuAutodiff};
use mmada_model::{FloatDType, load_checkpoint};
use mmada_train::sft::Resume;
use mmada_train::unigrpo::{UniGrpo, UniGrpoOptions, UniGrpoRecipe};

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
        UniGrpo::run::<CpuAutodiff>(&r, &dev, &opts, &mut |s| reports.push(s.clone())).unwrap();
    assert_eq!(first.final_step, 2);
    // Resume from the step-2 checkpoint for the third step.
    let opts = UniGrpoOptions {
        resume: Some(Resume::Latest),
        ..Default::default()
    };
    let out =
        UniGrpo::run::<CpuAutodiff>(&r, &dev, &opts, &mut |s| reports.push(s.clone())).unwrap();
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
    // rollout counters: 2 groups × (1 block of 4 steps), no cache, 8 tokens in 4 calls
    for row in &rows {
        assert_eq!(row["rollout/nfe"], 8);
        assert_eq!(
            (
                row["rollout/refreshes"].as_u64(),
                row["rollout/cache_hits"].as_u64()
            ),
            (Some(0), Some(0))
        );
        assert_eq!(row["rollout/tokens_per_forward"].as_f64(), Some(2.0));
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

/// `rollout.cache: prefix`: each group's block refreshes once and runs its other 3 steps
/// against the cache; the metrics row counts them.
#[test]
fn rollout_cache_is_used_and_counted_in_the_metrics() {
    let Some(data) = shared_data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(&data, tmp.path(), &["rollout.cache=prefix".to_string()]);
    let opts = UniGrpoOptions {
        stop_after: Some(1),
        ..Default::default()
    };
    let out = UniGrpo::run::<CpuAutodiff>(&r, &Default::default(), &opts, &mut |_| {}).unwrap();
    let text = std::fs::read_to_string(out.run_dir.join("metrics.jsonl")).unwrap();
    let row: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(row["rollout/nfe"], 8, "{row}");
    assert_eq!(row["rollout/refreshes"], 2, "{row}");
    assert_eq!(row["rollout/cache_hits"], 6, "{row}");
    assert_eq!(row["rollout/tokens_per_forward"].as_f64(), Some(2.0));
    assert!(row["time/rollout_s"].as_f64().is_some_and(|s| s > 0.0));
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
    assert!(e.contains("`group`, `batch`, `none`"), "{e}");
    let e = err("grpo.epsilonn=0.1");
    assert!(e.contains("epsilon"), "{e}");
}

/// A UniGRPO recipe on generated arithmetic prompts (character tokenizer; no shared data):
/// tiny model, G = 2, 2 prompts per step, μ = 2, reference-model KL with a sync every 3 steps.
pub fn arith_recipe(dir: &std::path::Path, name: &str, sets: &[&str]) -> UniGrpoRecipe {
    let data = dir.join("data");
    if !data.join("arith.jsonl").is_file() {
        mmada_train::synth::write_arithmetic(&data, 64, 11).unwrap();
    }
    let text = format!(
        r##"
run: {{name: {name}, output_dir: "{out}", seed: 9}}
model:
  preset: tiny
  overrides: {{d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 2, mlp_hidden_size: 64}}
tokenizer: {{path: "{tok}"}}
prompts:
  inline:
    name: arithmetic
    task: chat
    source: {{path: "{jsonl}"}}
    format: jsonl
    fields: {{question: question, answer: answer}}
    license: MIT
    split: train
  cot: false
  max_prompt_length: 32
grpo:
  num_generations: 2
  generation_batch_size: 4
  num_iterations: 2
  beta: 0.04
  kl_reference: reference_model
  ref_model_sync_steps: 3
  max_completion_length: 8
rollout: {{steps: 4, block_length: 8, temperature: 1.0}}
reward_funcs:
  - kind: math_correctness
    params: {{completion_format: last_number}}
  - kind: length
    params: {{min: 1, max: 4, margin: 4, unit: tokens}}
optimizer: {{lr: 1.0e-3, weight_decay: 0.01}}
schedule: {{kind: cosine, warmup_steps: 1, min_lr_scale: 0.1}}
train: {{max_steps: 4}}
checkpoint: {{every: 0, keep_last: 3, model_dtype: f32}}
"##,
        out = dir.join("runs").display(),
        tok = data.join("tokenizer.json").display(),
        jsonl = data.join("arith.jsonl").display(),
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    UniGrpoRecipe::parse(&text, name, &sets).unwrap()
}

fn metric_rows(run_dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every tensor of two safetensors files has the same dtype, shape and bytes (bit-identical),
/// and so does the metadata.
fn assert_same_tensors(a: &std::path::Path, b: &std::path::Path) {
    use safetensors::SafeTensors;
    let (ba, bb) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let (ta, tb) = (
        SafeTensors::deserialize(&ba).unwrap(),
        SafeTensors::deserialize(&bb).unwrap(),
    );
    let (ma, mb) = (
        SafeTensors::read_metadata(&ba).unwrap().1,
        SafeTensors::read_metadata(&bb).unwrap().1,
    );
    assert_eq!(ma.metadata(), mb.metadata(), "{}: metadata", a.display());
    let mut names = ta.names();
    names.sort();
    let mut nb = tb.names();
    nb.sort();
    assert_eq!(names, nb, "{}: tensor names", a.display());
    let differ: Vec<&&str> = names
        .iter()
        .filter(|n| {
            let (x, y) = (ta.tensor(n).unwrap(), tb.tensor(n).unwrap());
            x.dtype() != y.dtype() || x.shape() != y.shape() || x.data() != y.data()
        })
        .collect();
    assert!(
        differ.is_empty(),
        "{}: tensors differ: {differ:?}",
        a.display()
    );
}

fn model_bytes(ckpt: &std::path::Path) -> Vec<u8> {
    std::fs::read(ckpt.join("model/model.safetensors")).unwrap()
}

/// 4 steps in one go vs 2 + resume + 2: the same reward / loss / kl / policy loss at every
/// step (exact f32 equality) and bit-identical final parameters, reference model and optimizer
/// state. Exercises the prompt cursor, the seeded rollout / noise streams, AdamW state, the LR
/// schedule and the reference model (saved with the checkpoint, synced at step 3).
#[test]
fn resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let full = arith_recipe(tmp.path(), "full", &[]);
    let a =
        UniGrpo::run::<CpuAutodiff>(&full, &dev, &UniGrpoOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(a.final_step, 4);

    let split = arith_recipe(tmp.path(), "split", &[]);
    let first = UniGrpo::run::<CpuAutodiff>(
        &split,
        &dev,
        &UniGrpoOptions {
            stop_after: Some(2),
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(first.final_step, 2);
    let b = UniGrpo::run::<CpuAutodiff>(
        &split,
        &dev,
        &UniGrpoOptions {
            resume: Some(Resume::Latest),
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(b.final_step, 4);
    assert_eq!(a.losses, b.losses, "loss trajectory");

    let (ra, rb) = (metric_rows(&a.run_dir), metric_rows(&b.run_dir));
    assert_eq!((ra.len(), rb.len()), (4, 4));
    let mut kl_seen = false;
    for (x, y) in ra.iter().zip(&rb) {
        for k in [
            "step",
            "reward",
            "reward_std",
            "loss",
            "policy_loss",
            "kl_loss",
            "kl",
            "grad_norm",
            "learning_rate",
            "clip_ratio/region_mean",
            "completions/mean_length",
            "mask_ratio/mean",
        ] {
            assert!(x[k].is_number(), "{k}: {}", x[k]);
            assert_eq!(x[k], y[k], "step {}: {k}", x["step"]);
        }
        kl_seen |= x["kl"].as_f64().unwrap() > 0.0;
    }
    assert!(kl_seen, "the reference KL must be exercised");

    let (ca, cb) = (a.last_checkpoint.unwrap(), b.last_checkpoint.unwrap());
    assert_same_tensors(
        &ca.join("model/model.safetensors"),
        &cb.join("model/model.safetensors"),
    );
    assert_same_tensors(
        &ca.join("reference/model.safetensors"),
        &cb.join("reference/model.safetensors"),
    );
    assert_same_tensors(
        &ca.join("optimizer.safetensors"),
        &cb.join("optimizer.safetensors"),
    );
    // and the run actually trained: the final policy differs from the step-2 one
    let ck2 = first.last_checkpoint.unwrap();
    assert!(ck2.ends_with("step-000002"));
    assert!(
        model_bytes(&ck2) != model_bytes(&cb),
        "no training after step 2"
    );
}

/// `estimator: d1`: two steps train, log finite metrics with loss = policy + KL, every scored
/// position is a fully-masked completion token (mask ratio 1), and the run is seeded: the
/// same recipe gives the same losses.
#[test]
fn d1_estimator_short_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let sets = [
        "grpo.estimator=d1",
        "grpo.p_mask_prompt=0.15",
        "grpo.loss_type=token",
        "train.max_steps=2",
    ];
    // the length reward in characters of the decoded completion (1 at 0–1 character, 0 at 65
    // and more): a reward that differs between completions of the untrained model, so every
    // group has a non-zero advantage and both steps have a gradient. (The recipe's
    // token-length reward is 0 for every 8-token completion without <EOS>, and the untrained
    // model seldom gets a sum right.)
    let recipe = |name: &str, sets: &[&str]| {
        let mut r = arith_recipe(tmp.path(), name, sets);
        let length = &mut r.reward_funcs[1];
        assert_eq!(length.kind, "length");
        for (k, v) in [
            ("min", serde_json::json!(0)),
            ("max", serde_json::json!(1)),
            ("margin", serde_json::json!(64)),
            ("unit", serde_json::json!("chars")),
        ] {
            length.params.insert(k.into(), v);
        }
        r
    };
    let r = recipe("d1a", &sets);
    let a = UniGrpo::run::<CpuAutodiff>(&r, &dev, &UniGrpoOptions::default(), &mut |_| {}).unwrap();
    let rows = metric_rows(&a.run_dir);
    assert_eq!(rows.len(), 2);
    for row in &rows {
        for k in [
            "reward",
            "loss",
            "policy_loss",
            "kl_loss",
            "kl",
            "grad_norm",
        ] {
            assert!(row[k].as_f64().is_some_and(f64::is_finite), "{k}");
        }
        assert_eq!(row["mask_ratio/mean"], 1.0);
        let l = row["loss"].as_f64().unwrap();
        let pk = row["policy_loss"].as_f64().unwrap() + row["kl_loss"].as_f64().unwrap();
        assert!((l - pk).abs() < 1e-5, "{l} vs {pk}");
        // completion fully masked: every row is trained (no row without scored tokens)
        assert_eq!(row["num_train_rows"], 2 * 4);
        assert!(row["grad_norm"].as_f64().unwrap() > 0.0, "{row}");
    }
    let b = UniGrpo::run::<CpuAutodiff>(
        &recipe("d1b", &sets),
        &dev,
        &UniGrpoOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(a.losses, b.losses);
    // the estimator changes the loss: the structured estimator on the same rollouts differs
    let s = UniGrpo::run::<CpuAutodiff>(
        &recipe("structured", &["train.max_steps=2", "grpo.loss_type=token"]),
        &dev,
        &UniGrpoOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(metric_rows(&s.run_dir)[0]["reward"], rows[0]["reward"]);
    assert_ne!(s.losses, a.losses);
    let e = UniGrpoRecipe::parse(&r.to_yaml(), "r.yaml", &["grpo.estimator=d2".to_string()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("grpo.estimator") && e.contains("`structured` or `d1`"),
        "{e}"
    );
}

/// Largest |Δ| over every tensor of two checkpoints' model.safetensors (same names, shapes).
fn max_weight_diff(a: &std::path::Path, b: &std::path::Path) -> f32 {
    use safetensors::SafeTensors;
    let (ba, bb) = (
        std::fs::read(a.join("model/model.safetensors")).unwrap(),
        std::fs::read(b.join("model/model.safetensors")).unwrap(),
    );
    let (ta, tb) = (
        SafeTensors::deserialize(&ba).unwrap(),
        SafeTensors::deserialize(&bb).unwrap(),
    );
    let f32s = |d: &[u8]| -> Vec<f32> {
        d.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let mut worst = 0f32;
    for name in ta.names() {
        let (x, y) = (ta.tensor(name).unwrap(), tb.tensor(name).unwrap());
        assert_eq!(x.shape(), y.shape(), "{name}");
        for (p, q) in f32s(x.data()).iter().zip(f32s(y.data())) {
            worst = worst.max((p - q).abs());
        }
    }
    worst
}

/// Data parallelism (issue 9): the same recipe on 2 Flex workers (threads, burn-collective's
/// local all-reduce) trains like 1 device. Prompt group k is rolled out on rank k mod 2,
/// rewards are gathered, each rank's loss is scaled by world / non-empty groups, gradients
/// are mean-reduced. Three cases: 4 groups on 2 ranks (μ = 2, reference-model KL), 3 groups
/// on 2 ranks (`scale_rewards: batch`, which needs the gathered rewards of the other rank), and
/// 2 groups on 3 ranks (one rank with no group at all; d1 estimator, token-level loss). Per step: identical rewards and completion statistics, losses within 1e-5 relative;
/// final weights within 1e-5 (atol), while training moved them by far more.
///
/// The rewards (a digit anywhere, shortness in characters) split the groups, so step 1 has a
/// real policy gradient (norm > 1e-3; with the recipe's own rewards a random model gets equal
/// rewards, the gradient is rounding noise of norm ~5e-7, and AdamW's m/√v turned that noise
/// into 8e-6 of difference on one element). A wrong gradient scale would not show in the
/// weights (Adam is scale-invariant), so `grad_norm` (before clipping) is compared at 1e-5
/// relative.
#[test]
fn two_flex_devices_equal_one_device() {
    use mmada_train::dist::DistConfig;
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let rw = r#"reward_funcs=[{kind: regex, params: {pattern: "[0-9]"}}, {kind: length, params: {min: 0, max: 0, margin: 8, unit: chars}}]"#;
    // (case, ranks, overrides)
    let cases: [(&str, usize, Vec<&str>); 3] = [
        (
            "even",
            2,
            vec![
                "grpo.generation_batch_size=8",
                "train.max_steps=3",
                "checkpoint.every=1",
                // sample text characters only (ids 0..99 of the character tokenizer)
                "rollout.sample_vocab=99",
                rw,
            ],
        ),
        (
            "odd",
            2,
            vec![
                "grpo.generation_batch_size=6",
                "grpo.scale_rewards=batch",
                "grpo.num_iterations=1",
                "train.max_steps=3",
                "checkpoint.every=1",
                "rollout.sample_vocab=99",
                rw,
            ],
        ),
        (
            // 2 groups on 3 ranks: rank 2 rolls out nothing; d1 estimator, token loss
            "idle_rank_d1",
            3,
            vec![
                "grpo.generation_batch_size=4",
                "grpo.estimator=d1",
                "grpo.loss_type=token",
                "train.max_steps=3",
                "checkpoint.every=1",
                "rollout.sample_vocab=99",
                rw,
            ],
        ),
    ];
    for (case, ranks, sets) in cases {
        let one = arith_recipe(tmp.path(), &format!("{case}_1"), &sets);
        let a = UniGrpo::run::<CpuAutodiff>(&one, &dev, &UniGrpoOptions::default(), &mut |_| {})
            .unwrap();
        let two = arith_recipe(tmp.path(), &format!("{case}_2"), &sets);
        let dist = DistConfig {
            check_every: 1,
            timeout: std::time::Duration::from_secs(120),
            ..Default::default()
        };
        let mut steps = vec![];
        let b = UniGrpo::run_dp::<CpuAutodiff>(
            &two,
            &vec![Default::default(); ranks],
            &dist,
            &UniGrpoOptions::default(),
            &mut |r| steps.push(r.step),
        )
        .unwrap();
        assert_eq!(
            steps,
            vec![1, 2, 3],
            "{case}: on_step once per step on rank 0"
        );
        assert_eq!(a.rewards, b.rewards, "{case}: rewards per step");
        for (s, (x, y)) in a.losses.iter().zip(&b.losses).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1e-3),
                "{case} step {}: loss {x} (1 device) vs {y} (2 devices)",
                s + 1
            );
        }
        let (ra, rb) = (metric_rows(&a.run_dir), metric_rows(&b.run_dir));
        assert_eq!(ra.len(), 3, "{case}: one metrics row per step");
        assert_eq!(rb.len(), 3, "{case}: rank 0 alone writes metrics.jsonl");
        // a real policy gradient (the regex reward splits groups), not rounding noise
        let g1 = ra[0]["grad_norm"].as_f64().unwrap();
        let zero_std = ra[0]["frac_reward_zero_std"].as_f64().unwrap();
        assert!(
            g1 > 1e-3 && zero_std < 1.0,
            "{case}: step 1 grad_norm {g1}, zero-std groups {zero_std}: {}",
            ra[0]
        );
        for (x, y) in ra.iter().zip(&rb) {
            for k in [
                "reward",
                "reward_std",
                "frac_reward_zero_std",
                "completions/mean_length",
                "completions/clipped_ratio",
                "num_train_rows",
                "mask_ratio/mean",
                "rewards/regex/mean",
                "rewards/length/std",
            ] {
                let (p, q) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
                assert!(
                    (p - q).abs() <= 1e-6 * p.abs().max(1.0),
                    "{case} {k}: {p} vs {q}"
                );
            }
            for k in ["loss", "kl", "policy_loss", "grad_norm"] {
                let (p, q) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
                assert!(
                    (p - q).abs() <= 1e-5 * p.abs().max(1e-3),
                    "{case} {k}: {p} vs {q}"
                );
            }
        }
        let (ca, cb) = (
            a.last_checkpoint.clone().unwrap(),
            b.last_checkpoint.clone().unwrap(),
        );
        let diff = max_weight_diff(&ca, &cb);
        assert!(
            diff <= 1e-5,
            "{case}: max |Δw| {diff} between 1 and 2 devices"
        );
        // the test can fail: training moved the weights far beyond the tolerance
        let moved = max_weight_diff(&ca, &ca.parent().unwrap().join("step-000001"));
        assert!(
            moved > 1e-4,
            "{case}: weights moved only {moved} over 2 steps"
        );
        eprintln!(
            "{case}: max |Δw| 1 vs {ranks} devices {diff:e}, moved {moved:e} from step 1 to 3; step-1 grad_norm {g1}, rewards {:?}",
            a.rewards
        );
    }
}

/// The 2-rank test recipe (rewards that split groups; see above), 4 groups per step.
fn dp_recipe(dir: &std::path::Path, name: &str, extra: &[&str]) -> UniGrpoRecipe {
    let mut sets = vec![
        "grpo.generation_batch_size=8",
        "train.max_steps=3",
        "rollout.sample_vocab=99",
        r#"reward_funcs=[{kind: regex, params: {pattern: "[0-9]"}}, {kind: length, params: {min: 0, max: 0, margin: 8, unit: chars}}]"#,
    ];
    sets.extend_from_slice(extra);
    arith_recipe(dir, name, &sets)
}

/// Data-parallel UniGRPO stopped after 2 steps and resumed on 2 workers continues exactly
/// like a straight 2-worker run (rank 0 writes the checkpoint, every rank loads it).
#[test]
fn data_parallel_stop_and_resume_continue_exactly() {
    use mmada_train::dist::DistConfig;
    let tmp = tempfile::tempdir().unwrap();
    let dist = DistConfig {
        check_every: 1,
        timeout: std::time::Duration::from_secs(120),
        ..Default::default()
    };
    let devices = [Default::default(), Default::default()];
    let dp = |r: &UniGrpoRecipe, o: UniGrpoOptions| {
        UniGrpo::run_dp::<CpuAutodiff>(r, &devices, &dist, &o, &mut |_| {}).unwrap()
    };
    let straight = dp(
        &dp_recipe(tmp.path(), "straight", &["train.max_steps=4"]),
        UniGrpoOptions::default(),
    );
    let split = dp_recipe(tmp.path(), "split", &["train.max_steps=4"]);
    let first = dp(
        &split,
        UniGrpoOptions {
            stop_after: Some(2),
            ..Default::default()
        },
    );
    assert_eq!(first.final_step, 2);
    let second = dp(
        &split,
        UniGrpoOptions {
            resume: Some(Resume::Latest),
            ..Default::default()
        },
    );
    assert_eq!(second.final_step, 4);
    assert_eq!(second.losses, straight.losses, "resumed losses differ");
    assert_eq!(
        &second.rewards[..],
        &straight.rewards[2..],
        "resumed rewards differ"
    );
    assert_same_tensors(
        &straight
            .last_checkpoint
            .unwrap()
            .join("model/model.safetensors"),
        &second
            .last_checkpoint
            .unwrap()
            .join("model/model.safetensors"),
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start `mmada-train unigrpo --recipe R ARGS…`.
fn cli(recipe: &std::path::Path, args: &[String]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_mmada-train"))
        .args(["unigrpo", "--recipe"])
        .arg(recipe)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait (at most 600 s) for a child that must succeed; returns its stdout + stderr.
fn finish(c: std::process::Child, who: &str) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    let id = c.id();
    std::thread::spawn(move || {
        let _ = tx.send(c.wait_with_output());
    });
    let out = match rx.recv_timeout(std::time::Duration::from_secs(600)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &id.to_string()])
                .status();
            panic!("{who} did not exit within 600 s (hang)");
        }
    };
    let mut log = String::from_utf8_lossy(&out.stdout).to_string();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{who} failed:\n{log}");
    log
}

/// The binary: `train.device: cpu:2` (2 worker threads in one process) and two processes on
/// 127.0.0.1 (`--nodes 2`, burn-collective's global orchestrator in node 0, 1 CPU device
/// each) train like 1 device: same rewards in metrics.jsonl (written once), final weights
/// within 1e-5.
#[test]
fn cli_cpu2_and_two_processes_equal_one_device() {
    let tmp = tempfile::tempdir().unwrap();
    let one = UniGrpo::run::<CpuAutodiff>(
        &dp_recipe(tmp.path(), "one", &[]),
        &Default::default(),
        &UniGrpoOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let rewards = |run: &std::path::Path| -> Vec<f32> {
        metric_rows(run)
            .iter()
            .map(|r| r["reward"].as_f64().unwrap() as f32)
            .collect()
    };
    let w1 = one.last_checkpoint.clone().unwrap();

    // one process, two CPU workers
    let r = dp_recipe(tmp.path(), "threads", &["train.device=cpu:2"]);
    let path = tmp.path().join("threads.yaml");
    std::fs::write(&path, r.to_yaml()).unwrap();
    let log = finish(
        cli(&path, &["--check-every".into(), "1".into()]),
        "cpu:2 run",
    );
    assert!(log.contains("over 2 rank(s)"), "{log}");
    let run = tmp.path().join("runs/threads");
    assert_eq!(rewards(&run), one.rewards, "cpu:2 rewards");
    let d = max_weight_diff(&w1, &run.join("checkpoints/step-000003"));
    assert!(d <= 1e-5, "cpu:2 vs 1 device: max |Δw| {d}");

    // two processes
    let r = dp_recipe(tmp.path(), "nodes", &[]);
    let path = tmp.path().join("nodes.yaml");
    std::fs::write(&path, r.to_yaml()).unwrap();
    let coord = free_port();
    let node = |rank: usize| {
        cli(
            &path,
            &[
                "--nodes".into(),
                "2".into(),
                "--node-rank".into(),
                rank.to_string(),
                "--coordinator".into(),
                format!("127.0.0.1:{coord}"),
                "--data-port".into(),
                free_port().to_string(),
                "--collective-timeout".into(),
                "120".into(),
                "--check-every".into(),
                "1".into(),
            ],
        )
    };
    let (n0, n1) = (node(0), node(1));
    finish(n1, "node 1");
    finish(n0, "node 0");
    let run = tmp.path().join("runs/nodes");
    assert_eq!(rewards(&run), one.rewards, "2-node rewards");
    let d2 = max_weight_diff(&w1, &run.join("checkpoints/step-000003"));
    assert!(d2 <= 1e-5, "2 nodes vs 1 device: max |Δw| {d2}");
    eprintln!("cpu:2 vs 1 device max |Δw| {d:e}; 2 processes vs 1 device {d2:e}");
}

/// GPU check (feature `cuda`, needs a CUDA device; `scripts/gpu_check.sh`): UniGRPO on 2
/// workers sharing `cuda:0` = 1 worker on `cuda:0`, 3 steps, weights within 1e-5.
#[cfg(feature = "cuda")]
#[test]
fn cuda0_two_workers_equal_one_device() {
    use mmada_train::dist::DistConfig;
    type G = mmada_model::backend::CudaAutodiff;
    let dev = burn::backend::cuda::CudaDevice::new(0);
    let tmp = tempfile::tempdir().unwrap();
    let a = UniGrpo::run::<G>(
        &dp_recipe(tmp.path(), "one", &[]),
        &dev,
        &UniGrpoOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let dist = DistConfig {
        check_every: 1,
        timeout: std::time::Duration::from_secs(300),
        ..Default::default()
    };
    let b = UniGrpo::run_dp::<G>(
        &dp_recipe(tmp.path(), "two", &[]),
        &[dev.clone(), dev.clone()],
        &dist,
        &UniGrpoOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let diff = max_weight_diff(
        a.last_checkpoint.as_ref().unwrap(),
        b.last_checkpoint.as_ref().unwrap(),
    );
    println!(
        "cuda:0 UniGRPO: 2 workers vs 1, 3 steps: max |Δw| = {diff:e}; rewards {:?} vs {:?}",
        a.rewards, b.rewards
    );
    // rewards are not compared exactly: on a GPU, reductions may round differently between the
    // runs and flip a sampled token; then the weights differ too and the bound below fails
    assert!(
        diff <= 1e-5,
        "weights differ by {diff} (rewards {:?} vs {:?})",
        a.rewards,
        b.rewards
    );
}

/// `train.mixed_precision: bf16`: bf16 compute really runs (the per-step losses differ from
/// f32), stays finite, the checkpoint keeps f32 master weights, and stop + resume continues
/// exactly; `bf16` over `model.dtype: bf16` is a recipe error naming the key.
#[test]
fn bf16_mixed_precision_runs_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let o = UniGrpoOptions::default;
    let f32_run =
        UniGrpo::run::<CpuAutodiff>(&dp_recipe(tmp.path(), "f32", &[]), &dev, &o(), &mut |_| {})
            .unwrap();
    let bf = ["train.mixed_precision=bf16"];
    let straight =
        UniGrpo::run::<CpuAutodiff>(&dp_recipe(tmp.path(), "bf16", &bf), &dev, &o(), &mut |_| {})
            .unwrap();
    assert!(
        straight.losses.iter().all(|l| l.is_finite()),
        "{:?}",
        straight.losses
    );
    assert_ne!(
        straight.losses, f32_run.losses,
        "bf16 compute did not change anything"
    );
    let ckpt = straight.last_checkpoint.clone().unwrap();
    let bytes = std::fs::read(ckpt.join("model/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(
        st.tensors()
            .iter()
            .all(|(_, t)| t.dtype() == safetensors::Dtype::F32),
        "master weights are saved in f32"
    );
    let split = dp_recipe(tmp.path(), "bf16_split", &bf);
    let first = UniGrpo::run::<CpuAutodiff>(
        &split,
        &dev,
        &UniGrpoOptions {
            stop_after: Some(2),
            ..o()
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(first.final_step, 2);
    let second = UniGrpo::run::<CpuAutodiff>(
        &split,
        &dev,
        &UniGrpoOptions {
            resume: Some(Resume::Latest),
            ..o()
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(second.losses, straight.losses, "bf16 resume");
    assert_same_tensors(
        &ckpt.join("model/model.safetensors"),
        &second
            .last_checkpoint
            .unwrap()
            .join("model/model.safetensors"),
    );
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../recipes/quickstart_unigrpo.yaml"),
    )
    .unwrap();
    let e = UniGrpoRecipe::parse(
        &text,
        "q.yaml",
        &[
            "train.mixed_precision=bf16".into(),
            "model.dtype=bf16".into(),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("train.mixed_precision") && e.contains("model.dtype: f32"),
        "{e}"
    );
}

/// `train.activation_checkpointing: true` gives the UniGRPO updates the very gradients of the
/// plain backward: same losses and rewards, bit-identical weights after 3 steps (μ = 2,
/// reference-model KL, plain and chunked LM head).
#[test]
fn activation_checkpointing_updates_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    for (case, head) in [
        ("full", "grpo.ce_chunk_rows=0"),
        ("chunked", "grpo.ce_chunk_rows=5"),
    ] {
        let run = |name: &str, ckpt: &str| {
            let name = format!("{case}-{name}");
            let r = arith_recipe(
                tmp.path(),
                &name,
                &["train.max_steps=3", "checkpoint.every=1", head, ckpt],
            );
            UniGrpo::run::<CpuAutodiff>(&r, &dev, &UniGrpoOptions::default(), &mut |_| {}).unwrap()
        };
        let plain = run("plain", "train.activation_checkpointing=false");
        let ckpt = run("ckpt", "train.activation_checkpointing=true");
        assert_eq!(plain.losses, ckpt.losses, "{case}: losses");
        assert_eq!(plain.rewards, ckpt.rewards, "{case}: rewards");
        let (a, b) = (
            plain.last_checkpoint.unwrap(),
            ckpt.last_checkpoint.unwrap(),
        );
        assert_eq!(max_weight_diff(&a, &b), 0.0, "{case}: weights");
        let moved = max_weight_diff(&a, &a.parent().unwrap().join("step-000001"));
        assert!(moved > 1e-4, "{case}: weights moved only {moved}");
    }
}
