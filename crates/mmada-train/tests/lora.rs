//! LoRA in the trainers (`lora:`): SFT and UniGRPO freeze the base (no optimizer state for
//! it), write PEFT adapters instead of the model, resume bit-exactly (dropout included);
//! `merge_lora_checkpoint` writes a checkpoint whose logits equal the adapter-on model's;
//! the recipe keys are checked.

mod common;

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use mmada_model::backend::{Cpu, CpuAutodiff};
use mmada_model::checkpoint::SaveOptions;
use mmada_model::{Attention, FloatDType, LladaModel, ModelConfig, load_checkpoint};
use mmada_train::recipe::{Recipe as _, UniGrpoRecipe};
use mmada_train::sft::{Resume, Sft, SftOutcome};
use mmada_train::trainer::{RunOptions, TrainLoop as _};
use mmada_train::unigrpo::UniGrpo;

const LORA: &[&str] = &[
    "lora.r=4",
    "lora.alpha=8",
    "lora.dropout=0.1",
    "optimizer.lr=1.0e-2",
];

/// Flex keeps one RNG slot per process and LoRA dropout seeds it just before each mask:
/// the training tests of this file take turns so that another test's random draws cannot
/// take a dropout seed.
static FLEX_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_sft(
    r: &mmada_train::recipe::SftRecipe,
    resume: Option<Resume>,
    stop: Option<u64>,
) -> SftOutcome {
    let opts = RunOptions {
        resume,
        stop_after: stop,
        ..Default::default()
    };
    Sft::run::<CpuAutodiff>(r, &Default::default(), &opts, &mut |_| {}).unwrap()
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The same tensor names, dtypes, shapes and bytes (the header's metadata map may be
/// serialised in another order).
fn assert_same_tensors(a: &Path, b: &Path) {
    let (ba, bb) = (bytes(a), bytes(b));
    let (sa, sb) = (
        safetensors::SafeTensors::deserialize(&ba).unwrap(),
        safetensors::SafeTensors::deserialize(&bb).unwrap(),
    );
    assert_eq!(tensor_names(a), tensor_names(b));
    for n in sa.names() {
        let (x, y) = (sa.tensor(n).unwrap(), sb.tensor(n).unwrap());
        assert!(
            x.dtype() == y.dtype() && x.shape() == y.shape() && x.data() == y.data(),
            "{}: tensor {n} differs after resume",
            a.display()
        );
    }
}

fn tensor_names(p: &Path) -> Vec<String> {
    let b = bytes(p);
    let st = safetensors::SafeTensors::deserialize(&b).unwrap();
    let mut n: Vec<String> = st.names().into_iter().map(String::from).collect();
    n.sort();
    n
}

#[test]
fn lora_sft_trains_only_adapters_and_resumes_bit_exactly() {
    let _rng = FLEX_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let straight = common::sft_recipe(tmp, "straight", LORA);
    let a = run_sft(&straight, None, None);
    assert_eq!(a.final_step, 6);
    let ckpt = a.last_checkpoint.clone().unwrap();
    // a PEFT adapter, the optimizer state of the adapters only, no model copy
    assert!(ckpt.join("adapter/adapter_config.json").is_file());
    assert!(
        !ckpt.join("model").exists(),
        "a LoRA checkpoint holds no model copy"
    );
    let names = tensor_names(&ckpt.join("optimizer.safetensors"));
    // 7 targets × 2 blocks × (A, B) × (exp_avg, exp_avg_sq)
    assert_eq!(names.len(), 7 * 2 * 2 * 2, "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| n.contains(".lora_A.") || n.contains(".lora_B.")),
        "{names:?}"
    );
    // the preset-initialised base is written once for the adapter
    let base_dir = a.run_dir.join("base_model");
    assert!(base_dir.join("model.safetensors").is_file());
    let json: serde_json::Value =
        serde_json::from_slice(&bytes(&ckpt.join("adapter/adapter_config.json"))).unwrap();
    assert_eq!(
        json["base_model_name_or_path"],
        base_dir.display().to_string()
    );
    assert_eq!(json["lora_dropout"], 0.1);

    // stop after 3 steps, resume: same losses, same adapter and optimizer bytes
    let split = common::sft_recipe(tmp, "split", LORA);
    let first = run_sft(&split, None, Some(3));
    assert_eq!(first.final_step, 3);
    let b = run_sft(&split, Some(Resume::Latest), None);
    assert_eq!(b.losses, a.losses, "resumed loss trajectory differs");
    let bc = b.last_checkpoint.unwrap();
    for f in ["adapter/adapter_model.safetensors", "optimizer.safetensors"] {
        assert_same_tensors(&ckpt.join(f), &bc.join(f));
    }
    // the adapters learned: the loss moved
    assert_ne!(a.losses[0], a.losses[5]);

    // merge-lora: the merged checkpoint gives the adapter-on logits
    let merged = tmp.join("merged");
    let opts = SaveOptions {
        dtype: mmada_model::DiskDtype::F32,
        ..Default::default()
    };
    let lc = mmada_train::merge_lora_checkpoint(&base_dir, &ckpt, &merged, &opts).unwrap();
    assert_eq!((lc.r, lc.alpha), (4, 8.0));
    assert!(
        merged.join("tokenizer.json").is_file(),
        "the base's tokenizer is copied"
    );
    let dev = Default::default();
    let (cfg, base) = load_checkpoint::<Cpu>(&base_dir, &dev, FloatDType::F32).unwrap();
    let (on, _) = mmada_model::adapter::load_adapter(base, &ckpt.join("adapter")).unwrap();
    let (_, m) = load_checkpoint::<Cpu>(&merged, &dev, FloatDType::F32).unwrap();
    let diff = max_diff(&logits(&on, &cfg), &logits(&m, &cfg));
    println!("merged checkpoint vs adapter-on logits: max |Δ| = {diff:e}");
    assert!(diff <= 1e-5, "merged logits differ by {diff}");
    // the command line writes the same checkpoint; it refuses to overwrite without --overwrite
    let cli = tmp.join("merged-cli");
    let merge = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mmada-train"))
            .arg("merge-lora")
            .arg("--checkpoint")
            .arg(&base_dir)
            .arg("--adapter")
            .arg(&ckpt)
            .arg("--out")
            .arg(&cli)
            .args(["--dtype", "f32"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = merge(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tensors(
        &merged.join("model.safetensors"),
        &cli.join("model.safetensors"),
    );
    let again = merge(&[]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && err.contains("--overwrite"),
        "{err}"
    );
    assert!(merge(&["--overwrite"]).status.success());
}

fn logits(m: &LladaModel<Cpu>, cfg: &ModelConfig) -> Vec<f32> {
    let v: Vec<i32> = (0..24)
        .map(|i| ((i * 7 + 3) % cfg.vocab_size) as i32)
        .collect();
    let ids = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(v, [2, 12]), &Default::default());
    m.forward(ids, &Attention::Full)
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn grpo_recipe(dir: &Path, name: &str, sets: &[&str]) -> UniGrpoRecipe {
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
  max_completion_length: 8
rollout: {{steps: 4, block_length: 8, temperature: 1.0}}
reward_funcs:
  - kind: math_correctness
    params: {{completion_format: last_number}}
  - kind: length
    params: {{min: 1, max: 4, margin: 4, unit: tokens}}
optimizer: {{lr: 1.0e-2, weight_decay: 0.01}}
train: {{max_steps: 3}}
checkpoint: {{every: 1, keep_last: 0}}
lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj, ff_out]}}
"##,
        out = dir.join("runs").display(),
        tok = data.join("tokenizer.json").display(),
        jsonl = data.join("arith.jsonl").display(),
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    UniGrpoRecipe::parse(&text, name, &sets).unwrap()
}

#[test]
fn lora_unigrpo_uses_the_base_as_reference_and_resumes_bit_exactly() {
    unigrpo_resumes_bit_exactly(&[], 3 * 2 * 2);
}

/// With modules to save, the reference keeps the base's modules (PEFT's `original_module`):
/// a resumed run rebuilds them from the base, not from the trained copies in the adapter.
#[test]
fn lora_unigrpo_with_modules_to_save_resumes_bit_exactly() {
    unigrpo_resumes_bit_exactly(&["lora.modules_to_save=[ln_f, ff_out]"], 3 * 2 * 2 + 2);
}

fn unigrpo_resumes_bit_exactly(sets: &[&str], adapter_tensors: usize) {
    let _rng = FLEX_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let straight = grpo_recipe(tmp.path(), "straight", sets);
    let a =
        UniGrpo::run::<CpuAutodiff>(&straight, &dev, &RunOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(a.final_step, 3);
    let ca = a.last_checkpoint.unwrap();
    assert!(
        !ca.join("reference").exists(),
        "the reference is the base, not saved"
    );
    assert!(!ca.join("model").exists());
    let names = tensor_names(&ca.join("adapter/adapter_model.safetensors"));
    assert_eq!(names.len(), adapter_tensors, "{names:?}");
    let split = grpo_recipe(tmp.path(), "split", sets);
    let stop = RunOptions {
        stop_after: Some(2),
        ..Default::default()
    };
    UniGrpo::run::<CpuAutodiff>(&split, &dev, &stop, &mut |_| {}).unwrap();
    let resume = RunOptions {
        resume: Some(Resume::Latest),
        ..Default::default()
    };
    let b = UniGrpo::run::<CpuAutodiff>(&split, &dev, &resume, &mut |_| {}).unwrap();
    assert_eq!(b.losses, a.losses, "resumed loss trajectory differs");
    assert_eq!(b.rewards.last(), a.rewards.last());
    let cb = b.last_checkpoint.unwrap();
    for f in ["adapter/adapter_model.safetensors", "optimizer.safetensors"] {
        assert_same_tensors(&ca.join(f), &cb.join(f));
    }
    // the KL term is live: the adapters moved the policy away from the base
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(a.run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        rows.iter().any(|r| r["kl"].as_f64().unwrap() > 0.0),
        "{rows:?}"
    );
}

#[test]
fn lora_recipe_keys_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let sync = ["grpo.ref_model_sync_steps=2".to_string()];
    let base = grpo_recipe(tmp.path(), "x", &[]);
    let yaml = base.to_yaml();
    let e = UniGrpoRecipe::parse(&yaml, "r.yaml", &sync)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("grpo.ref_model_sync_steps") && e.contains("lora"),
        "{e}"
    );
    let bad = ["lora.target_modules=[o_proj]".to_string()];
    let e = UniGrpoRecipe::parse(&yaml, "r.yaml", &bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora.target_modules") && e.contains("attn_out"),
        "{e}"
    );
    let bad = ["lora.rank=4".to_string()];
    let e = UniGrpoRecipe::parse(&yaml, "r.yaml", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank"), "{e}");
    // a bf16 base needs no master weights when only the f32 adapters learn
    let ok = common::sft_recipe(
        tmp.path(),
        "bf16",
        &["lora.r=2", "lora.alpha=2", "model.dtype=bf16"],
    );
    assert!(ok.lora.is_some());
}
