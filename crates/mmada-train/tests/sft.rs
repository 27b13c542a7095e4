//! SFT trainer invariances (accumulation, exact resume, crash during checkpoint) and a short
//! run on real rows from `../shared/data`.

use mmada_train::recipe::Recipe as _;
use mmada_train::trainer::TrainLoop as _;
use std::path::{Path, PathBuf};

mod common;

use mmada_model::backend::{Cpu, CpuAutodiff};
use mmada_model::{FloatDType, load_checkpoint};
use mmada_train::recipe::SftRecipe;
use mmada_train::sft::{Resume, Sft, SftOptions, SftOutcome};

/// [`common::sft_recipe`] with this file's schedule: cosine, 2 warm-up steps, floor 0.1; no
/// periodic checkpoint, keep 2.
fn arith_recipe(dir: &Path, name: &str) -> SftRecipe {
    common::sft_recipe(
        dir,
        name,
        &[
            "schedule.kind=cosine",
            "schedule.warmup_steps=2",
            "schedule.min_lr_scale=0.1",
            "checkpoint.every=0",
            "checkpoint.keep_last=2",
        ],
    )
}

fn with(recipe: &SftRecipe, sets: &[&str]) -> SftRecipe {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    SftRecipe::parse(&recipe.to_yaml(), "recipe", &sets).unwrap()
}

fn run(recipe: &SftRecipe, resume: Option<Resume>, stop_after: Option<u64>) -> SftOutcome {
    let opts = SftOptions {
        resume,
        stop: None,
        stop_after,
        base_dir: PathBuf::from("/"),
        wandb_endpoint: None,
        test_nonfinite_steps: vec![],
    };
    Sft::run::<CpuAutodiff>(recipe, &Default::default(), &opts, &mut |_| {}).unwrap()
}

fn weights(ckpt: &Path) -> Vec<(String, Vec<f32>)> {
    let (_, m) =
        load_checkpoint::<Cpu>(&ckpt.join("model"), &Default::default(), FloatDType::F32).unwrap();
    m.named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_data().to_vec::<f32>().unwrap()))
        .collect()
}

#[test]
fn gradient_accumulation_equals_the_big_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let base = arith_recipe(tmp.path(), "big");
    let big = run(&with(&base, &["train.max_steps=2"]), None, None);
    let acc = run(
        &with(
            &base,
            &[
                "train.max_steps=2",
                "train.grad_accum=2",
                "data.lm.batch_size=2",
                "run.name=acc",
            ],
        ),
        None,
        None,
    );
    assert_eq!(big.losses.len(), 2);
    for (a, b) in big.losses.iter().zip(&acc.losses) {
        assert!(
            ((a - b) / a).abs() < 1e-5,
            "step loss {a} (1×4) vs {b} (2×2)"
        );
    }
    let (wa, wb) = (
        weights(big.last_checkpoint.as_ref().unwrap()),
        weights(acc.last_checkpoint.as_ref().unwrap()),
    );
    let mut worst = 0f32;
    for ((n, a), (_, b)) in wa.iter().zip(&wb) {
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
        assert!(!a.is_empty(), "{n}");
    }
    println!("accumulation: max |Δw| after 2 steps = {worst:e}");
    assert!(worst < 1e-6, "weights differ by {worst}");
    // and the update did something
    let init = run(
        &with(
            &base,
            &["train.max_steps=1", "optimizer.lr=1e-12", "run.name=still"],
        ),
        None,
        None,
    );
    let w0 = weights(init.last_checkpoint.as_ref().unwrap());
    let moved = w0
        .iter()
        .zip(&wa)
        .any(|((_, a), (_, b))| a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-4));
    assert!(moved, "training did not change the weights");
}

/// `loss.ce_chunk_rows > 0` (the default: the LM head only at the masked positions, in
/// chunks, over hidden states) trains like full logits (`loss.ce_chunk_rows: 0`): same losses, same weights up to float
/// rounding, with a chunk that splits the rows.
#[test]
fn chunked_lm_head_trains_like_full_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let base = arith_recipe(tmp.path(), "full");
    let full = run(
        &with(&base, &["train.max_steps=3", "loss.ce_chunk_rows=0"]),
        None,
        None,
    );
    let chunked = run(
        &with(
            &base,
            &[
                "train.max_steps=3",
                "loss.ce_chunk_rows=7",
                "run.name=chunked",
            ],
        ),
        None,
        None,
    );
    assert_eq!(full.losses.len(), 3);
    for (a, b) in full.losses.iter().zip(&chunked.losses) {
        assert!(
            ((a - b) / a).abs() < 1e-5,
            "step loss {a} (full) vs {b} (chunked)"
        );
    }
    let (wa, wb) = (
        weights(full.last_checkpoint.as_ref().unwrap()),
        weights(chunked.last_checkpoint.as_ref().unwrap()),
    );
    let worst = max_abs_diff(&wa, &wb);
    println!("chunked head: max |Δw| after 3 steps = {worst:e}");
    assert!(worst < 1e-5, "weights differ by {worst}");
}

#[test]
fn resume_is_bit_identical_and_survives_a_crash_mid_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let base = arith_recipe(tmp.path(), "straight");
    let straight = run(&base, None, None);
    assert_eq!(straight.losses.len(), 6);

    let split = with(&base, &["run.name=split"]);
    let first = run(&split, None, Some(3));
    assert_eq!(first.final_step, 3);
    let ck3 = first.last_checkpoint.clone().unwrap();
    assert!(ck3.ends_with("step-000003"));

    // Starting fresh in a directory with checkpoints is refused (nothing is overwritten).
    let opts = SftOptions {
        resume: None,
        stop: None,
        stop_after: None,
        base_dir: PathBuf::from("/"),
        wandb_endpoint: None,
        test_nonfinite_steps: vec![],
    };
    let err = Sft::run::<CpuAutodiff>(&split, &Default::default(), &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already holds checkpoints") && err.contains("--resume latest"),
        "{err}"
    );

    // A crash while writing the next checkpoint leaves a partial temporary directory; the
    // previous checkpoint stays the one `latest` names, and it loads.
    let ckdir = ck3.parent().unwrap();
    let partial = ckdir.join(".step-000004.tmp-99999/model");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(
        partial.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":",
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(ckdir.join("latest"))
            .unwrap()
            .trim(),
        "step-000003"
    );

    let second = run(&split, Some(Resume::Latest), None);
    assert_eq!(second.final_step, 6);
    assert_eq!(
        second.losses, straight.losses,
        "resumed loss trajectory differs"
    );
    let (a, b) = (
        weights(straight.last_checkpoint.as_ref().unwrap()),
        weights(second.last_checkpoint.as_ref().unwrap()),
    );
    assert!(a == b, "final weights differ after resume");
    // keep_last: 2
    let mut names: Vec<String> = std::fs::read_dir(ckdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        names.contains(&"step-000006".to_string()) && names.contains(&"step-000003".to_string()),
        "{names:?}"
    );
}

fn shared_data() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if p.is_dir() {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but {} is missing", p.display());
    }
    eprintln!("skipping: {} not found", p.display());
    None
}

#[test]
fn sft_on_real_rows_lowers_the_loss_and_saves_a_loadable_checkpoint() {
    let Some(data) = shared_data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        r#####"
run: {{name: real, output_dir: "{out}", seed: 1}}
model:
  preset: tiny
  overrides: {{d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 4, mlp_hidden_size: 128}}
tokenizer: {{path: "{data}/tokenizers/gpt2/tokenizer.json"}}
data:
  data_root: "{data}"
  filter_overlong: false
  layout: {{max_seq_length: 64, max_lm_len: 96}}
  eval_examples: 4
  lm:
    batch_size: 4
    sources:
      - inline:
          name: gsm8k
          task: cot
          source: {{path: math/gsm8k_test.jsonl}}
          format: jsonl
          fields: {{question: question, answer: answer, answer_marker: "####"}}
          license: MIT
          split: test
        max_examples: 64
        weight: 2.0
      - inline:
          name: skyt1_longcot
          task: cot
          source: {{path: longcot/skyt1_math500_longcot.jsonl}}
          format: jsonl
          fields: {{question: question, reasoning: gt_cot, answer: answer}}
          license: Apache-2.0
          split: train
        max_examples: 16
      - inline:
          name: llava_conversation
          task: chat
          source: {{path: llava/llava_conversations_with_images.json}}
          format: json
          fields: {{conversations: conversations}}
          license: Apache-2.0
          split: train
          image_check: none
        max_examples: 1
optimizer: {{lr: 2.0e-3}}
schedule: {{kind: constant, warmup_steps: 0}}
train: {{max_steps: 24, eval_every: 12}}
checkpoint: {{every: 12, keep_last: 1}}
"#####,
        out = tmp.path().display(),
        data = data.display()
    );
    let recipe = SftRecipe::parse(&text, "real.yaml", &[]).unwrap();
    let out = run(&recipe, None, None);
    assert_eq!(out.losses.len(), 24);
    let head: f32 = out.losses[..4].iter().sum::<f32>() / 4.0;
    let tail: f32 = out.losses[20..].iter().sum::<f32>() / 4.0;
    println!(
        "real rows: mean loss of steps 1-4 {head:.3}, of steps 21-24 {tail:.3}; eval {:?}",
        out.eval_losses
    );
    assert!(tail < 0.8 * head, "loss did not fall: {head} -> {tail}");
    assert_eq!(out.eval_losses.len(), 2);
    let ck = out.last_checkpoint.unwrap();
    let (cfg, model) =
        load_checkpoint::<Cpu>(&ck.join("model"), &Default::default(), FloatDType::F32).unwrap();
    assert_eq!(cfg.embedding_size, model.wte.weight.val().dims()[0]);
    assert!(
        ck.join("model/tokenizer.json").is_file() && ck.join("optimizer.safetensors").is_file()
    );
    // metrics.jsonl has the upstream names
    let metrics = std::fs::read_to_string(out.run_dir.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    for k in [
        "step",
        "step_loss_lm",
        "lr",
        "avg_masking_rate",
        "grad_norm",
        "samples/sec/gpu",
        "eval_loss",
    ] {
        assert!(last.get(k).is_some(), "metrics row lacks `{k}`: {last}");
    }
}

#[test]
fn wandb_offline_mode_spools_the_metric_rows_for_a_later_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let base = arith_recipe(tmp.path(), "wb");
    let recipe = with(
        &base,
        &[
            "train.max_steps=3",
            "logging.wandb.mode=offline",
            "logging.wandb.project=mmada-test",
        ],
    );
    let out = run(&recipe, None, None);
    let spool = std::fs::read_to_string(out.run_dir.join(mmada_wandb::SPOOL_FILE)).unwrap();
    let rows = spool
        .lines()
        .filter(|l| l.contains("\"type\":\"history\"") && l.contains("step_loss_lm"))
        .count();
    assert_eq!(
        rows, 3,
        "expected 3 history rows with step_loss_lm in the spool:\n{spool}"
    );
    // the resume state travels in trainer_state.json, without the API key
    let state =
        std::fs::read_to_string(out.last_checkpoint.unwrap().join("trainer_state.json")).unwrap();
    assert!(
        state.contains("\"wandb\"") && state.contains("mmada-test"),
        "{state}"
    );
}

/// The dtype of every tensor of a saved `model.safetensors`.
fn saved_dtypes(ckpt: &Path) -> Vec<safetensors::Dtype> {
    let bytes = std::fs::read(ckpt.join("model/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(_, t)| t.dtype()).collect()
}

fn max_abs_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max)
}

#[test]
fn bf16_mixed_precision_trains_f32_master_weights_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let f32_run = arith_recipe(tmp.path(), "f32");
    let mixed = with(
        &f32_run,
        &[
            "train.mixed_precision=bf16",
            "run.name=mixed",
            "checkpoint.every=1",
            "checkpoint.keep_last=0",
        ],
    );
    let straight = run(&mixed, None, None);
    let reference = run(&f32_run, None, None);
    assert_eq!(straight.losses.len(), 6);
    // the same trajectory as f32 up to bf16 rounding, but not the f32 numbers
    let mut worst = 0f32;
    for (a, b) in straight.losses.iter().zip(&reference.losses) {
        worst = worst.max(((a - b) / b).abs());
    }
    println!(
        "bf16-mixed losses {:?} vs f32 {:?}: worst relative difference {worst:e}",
        straight.losses, reference.losses
    );
    assert!(worst < 5e-2, "bf16-mixed loss off the f32 loss by {worst}");
    assert!(
        worst > 0.0,
        "bf16-mixed losses equal the f32 ones: no bf16 compute"
    );

    // one step changes the f32 master weights; checkpoints hold f32 (checkpoint.model_dtype)
    let ckdir = straight.run_dir.join("checkpoints");
    let tok = mmada_train::sft::load_tokenizer(&mixed.tokenizer, Path::new("/")).unwrap();
    let cfg = mmada_train::sft::model_config(&mixed.model, &mixed.tokenizer, &tok, Path::new("/"))
        .unwrap();
    let init = mmada_model::init::init_model::<Cpu>(
        &cfg,
        mmada_train::data::derive_seed(mixed.run.seed, 0, 0, 0),
        &Default::default(),
        FloatDType::F32,
    );
    let w0: Vec<(String, Vec<f32>)> = init
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_data().to_vec::<f32>().unwrap()))
        .collect();
    // (step 1 runs at LR 0: linear warmup from 0 over 2 steps)
    let w1 = weights(&ckdir.join("step-000001"));
    let w2 = weights(&ckdir.join("step-000002"));
    assert_eq!(max_abs_diff(&w0, &w1), 0.0, "LR 0 step changed the weights");
    let moved = max_abs_diff(&w1, &w2);
    println!("bf16-mixed: one step moved the f32 weights by up to {moved:e}");
    assert!(
        moved > 1e-4,
        "one bf16-mixed step did not change the weights"
    );
    assert!(
        saved_dtypes(&ckdir.join("step-000002"))
            .iter()
            .all(|d| *d == safetensors::Dtype::F32)
    );
    // the f32 master weights are not the f32 run's weights (bf16 compute), but close
    let d = max_abs_diff(
        &weights(straight.last_checkpoint.as_ref().unwrap()),
        &weights(reference.last_checkpoint.as_ref().unwrap()),
    );
    println!("bf16-mixed vs f32 weights after 6 steps: max |Δw| = {d:e}");
    assert!(d > 0.0 && d < 5e-2, "max |Δw| = {d}");

    // resume is exact in bf16-mixed too
    let split = with(&mixed, &["run.name=mixed-split"]);
    let first = run(&split, None, Some(3));
    assert_eq!(first.final_step, 3);
    let second = run(&split, Some(Resume::Latest), None);
    assert_eq!(second.losses, straight.losses, "resumed trajectory differs");
    assert!(
        weights(second.last_checkpoint.as_ref().unwrap())
            == weights(straight.last_checkpoint.as_ref().unwrap()),
        "final weights differ after resume"
    );

    // checkpoint.model_dtype: bf16 saves bf16 tensors from the f32 master weights
    let small = run(
        &with(
            &mixed,
            &[
                "run.name=mixed-bf16-ckpt",
                "train.max_steps=1",
                "checkpoint.model_dtype=bf16",
            ],
        ),
        None,
        None,
    );
    assert!(
        saved_dtypes(small.last_checkpoint.as_ref().unwrap())
            .iter()
            .all(|d| *d == safetensors::Dtype::BF16)
    );
}

/// `train.activation_checkpointing: true` (per-block recomputation, `mmada_train::recompute`)
/// trains bit for bit as the plain backward: the same step losses and the same weights, with
/// gradient accumulation and on two data-parallel workers.
#[test]
fn activation_checkpointing_trains_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let base = with(
        &arith_recipe(tmp.path(), "plain"),
        &[
            "train.max_steps=3",
            "train.grad_accum=2",
            "train.device=cpu:2",
        ],
    );
    let plain = run(&base, None, None);
    let ckpt = run(
        &with(
            &base,
            &["train.activation_checkpointing=true", "run.name=ckpt"],
        ),
        None,
        None,
    );
    assert_eq!(plain.losses.len(), 3);
    assert_eq!(plain.losses, ckpt.losses, "step losses");
    let worst = max_abs_diff(
        &weights(plain.last_checkpoint.as_ref().unwrap()),
        &weights(ckpt.last_checkpoint.as_ref().unwrap()),
    );
    assert_eq!(worst, 0.0, "weights differ by {worst}");
}

/// `mmada-train sft` ends by drawing `plots/metrics.png` from its metrics.jsonl: the PNG has
/// the grid size of its panels, and the train-loss curve is the logged losses, step by step.
/// `mmada-train plot RUN_DIR` redraws it, and refuses a folder that is no run.
#[test]
fn a_run_ends_with_its_curves_drawn_from_metrics_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let r = with(
        &arith_recipe(tmp.path(), "plotted"),
        &["train.max_steps=4", "train.log_every=1"],
    );
    let file = tmp.path().join("recipe.yaml");
    std::fs::write(&file, r.to_yaml()).unwrap();
    let bin = env!("CARGO_BIN_EXE_mmada-train");
    let out = std::process::Command::new(bin)
        .args(["sft", "--recipe"])
        .arg(&file)
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run_dir = tmp.path().join("runs/plotted");
    let png = run_dir.join("plots/metrics.png");
    let rows = mmada_train::plot::read_metrics(&run_dir.join("metrics.jsonl")).unwrap();
    let panels = mmada_train::plot::panels(&rows);
    let img = image::open(&png).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        mmada_train::plot::grid_size(panels.len())
    );
    assert_eq!(panels[0].title, "train loss");
    let logged: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (r["step"].as_f64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect();
    assert_eq!(logged.len(), 4);
    assert_eq!(panels[0].series[0].points, logged);
    // the command redraws the same picture
    let before = std::fs::read(&png).unwrap();
    std::fs::remove_file(&png).unwrap();
    let again = std::process::Command::new(bin)
        .arg("plot")
        .arg(&run_dir)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("metrics.png"));
    assert_eq!(std::fs::read(&png).unwrap(), before);
    let none = std::process::Command::new(bin)
        .args(["plot", "/nonexistent/run"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        !none.status.success() && err.contains("not a run directory"),
        "{err}"
    );
}

/// A run from `model.checkpoint` saves checkpoints that carry the source's sidecars: the
/// tokenizer and generation configs and the remote-code modules its `auto_map` names (so
/// transformers' `from_pretrained(trust_remote_code=True)` opens them), while
/// `tokenizer.json` is the run's own.
#[test]
fn checkpoints_carry_the_source_checkpoints_sidecars() {
    let tmp = tempfile::tempdir().unwrap();
    // a first run makes a source checkpoint; give it sidecars and an auto_map
    let first = with(
        &arith_recipe(tmp.path(), "source"),
        &["train.max_steps=1", "checkpoint.every=1"],
    );
    let src = run(&first, None, None)
        .last_checkpoint
        .unwrap()
        .join("model");
    let cfg_path = src.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["auto_map"] = serde_json::json!({
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModel": "modeling_custom.CustomModel",
    });
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let sidecars = [
        ("tokenizer_config.json", "{\"chat_template\": \"{{ x }}\"}"),
        ("generation_config.json", "{\"eos_token_id\": 1}"),
        ("special_tokens_map.json", "{}"),
        ("modeling_custom.py", "class CustomModel: pass\n"),
        ("configuration_custom.py", "class CustomConfig: pass\n"),
    ];
    for (f, text) in sidecars {
        std::fs::write(src.join(f), text).unwrap();
    }
    let yaml = first.to_yaml().replace("name: source", "name: from-source");
    let mut second = SftRecipe::parse(&yaml, "recipe", &[]).unwrap();
    second.model.preset = None;
    second.model.overrides.clear();
    second.model.checkpoint = Some(src.clone());
    let ckpt = run(&second, None, None)
        .last_checkpoint
        .unwrap()
        .join("model");
    for (f, text) in sidecars {
        assert_eq!(
            std::fs::read_to_string(ckpt.join(f)).unwrap(),
            text,
            "{f} not carried over"
        );
    }
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        saved["auto_map"]["AutoModel"],
        "modeling_custom.CustomModel"
    );
    assert!(ckpt.join("tokenizer.json").is_file());
}
