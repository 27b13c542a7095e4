//! The memory planner (issue 15): a hand-computed LLaDA-8B case for every sharding mode, and
//! `mmada-train plan` on the two 8B recipes (their checkpoints are not here: the shape comes
//! from `--model-preset mmada_8b`, no weights are read).

use std::path::PathBuf;
use std::process::Command;

use mmada_model::ModelConfig;
use mmada_train::plan::{
    LogitsPath, MicroBatch, ModelShape, PlanInput, Sharding, lines, parse_size, plan,
};
use mmada_train::recipe::ParamDtype;

/// LLaDA-8B (d_model 4096, 32 layers, 32 heads, mlp 12288, vocab 126464), bf16 weights with
/// f32 master weights and f32 AdamW moments, 8 devices, 4 micro-batches of 4 rows × 1024
/// positions per step, activation checkpointing, the head at the 4096 loss positions in
/// 1024-row chunks.
fn llada_8b(sharding: Sharding) -> PlanInput {
    PlanInput {
        shape: ModelShape::from_config(&ModelConfig::llada_8b()),
        param_dtype: ParamDtype::Bf16,
        compute_dtype: ParamDtype::Bf16,
        master_weights: true,
        moment_dtype: ParamDtype::F32,
        devices_per_node: 8,
        nodes: 1,
        sharding,
        activation_checkpointing: true,
        lora: None,
        accumulation: 4,
        micro: MicroBatch {
            rows: 4,
            seq: 1024,
            loss_positions: 4096,
            attention_bias: false,
            loss_terms: 1,
        },
        logits: LogitsPath::LossPositions { chunk_rows: 1024 },
        rollout: None,
    }
}

// P = 32 blocks × (2·4096² + 2·4096·4096 + 3·4096·12288 + 2·4096 = 218,112,000)
//     + 2·126464·4096 (wte, head) + 4096 (ln_f) = 8,015,581,184.
const P: u64 = 8_015_581_184;

// Step lines (the same in every mode), B = 4, L = 1024, d = 4096, m = 12288, H = 32, r = c = 2:
//   B·L·d = 16,777,216
//   one block's tensors: B·L·d·(4 + 2 + 2 + 3·2 + 2 + 4 + 2 + 2 = 24) + 5·2·B·L·m
//     = 402,653,184 + 503,316,480 = 905,969,664
//   activations (checkpointing, the forward and the loss): block inputs B·L·d·2·32 =
//     1,073,741,824 + final norm B·L·d·(4 + 2 + 2) = 134,217,728 → 1,207,959,552
//   logits / loss (one loss term): ∂L/∂h 4096·4096·4 = 67,108,864 + ∂L/∂W 4096·126464·4 =
//     2,071,986,176 + one chunk 3·1024·126464·4 = 1,553,989,632 → 3,693,084,672
//   step = 4,901,044,224
const STEP: u64 = 4_901_044_224;
// Backward (the blocks recomputed one at a time, peak at block 0): one backward's gradients
// 2P = 16,031,162,368 + block 0's input B·L·d·2 = 33,554,432 and activations 905,969,664 +
// its attention scores B·H·L²·(4 + 4 + 2) = 4·32·1,048,576·10 = 1,342,177,280 + softmax
// gradients 3·B·H·L²·4 = 1,610,612,736 → 19,923,476,480 (> step).
const BACKWARD: u64 = 19_923_476_480;
// collective buckets: 3 × 64 Mi elements × 2 B = 402,653,184
const BUCKETS: u64 = 402_653_184;

#[test]
fn llada_8b_by_hand_for_every_sharding_mode() {
    // Resident: compute weights 2P = 16,031,162,368 in every mode, buckets 402,653,184.
    // none: master 4P = 32,062,324,736; accumulator 2P = 16,031,162,368; moments 8P =
    //   64,124,649,472 → resident 128,651,952,128, total + BACKWARD = 148,575,428,608
    // optimizer (ZeRO-1): master 4P/8 = 4,007,790,592; accumulator 2P (not sharded); moments
    //   8P/8 = 8,015,581,184 → resident 44,488,349,696, total 64,411,826,176
    // optimizer_and_gradients (ZeRO-2): accumulator 2P/8 = 2,003,895,296
    //   → resident 30,461,082,624, total 50,384,559,104
    let cases = [
        (
            Sharding::None,
            32_062_324_736,
            16_031_162_368,
            64_124_649_472,
            148_575_428_608,
        ),
        (
            Sharding::Optimizer,
            4_007_790_592,
            16_031_162_368,
            8_015_581_184,
            64_411_826_176,
        ),
        (
            Sharding::OptimizerAndGradients,
            4_007_790_592,
            2_003_895_296,
            8_015_581_184,
            50_384_559_104,
        ),
    ];
    for (mode, master, accumulator, moments, total) in cases {
        let p = plan(&llada_8b(mode)).unwrap();
        assert_eq!(p.params, P);
        assert_eq!(p.bytes_of(lines::COMPUTE_WEIGHTS), 2 * P, "{mode}");
        assert_eq!(p.bytes_of(lines::MASTER_WEIGHTS), master, "{mode}");
        assert_eq!(p.bytes_of(lines::GRADIENTS), 2 * P, "{mode}");
        assert_eq!(p.bytes_of(lines::GRAD_ACCUMULATOR), accumulator, "{mode}");
        assert_eq!(p.bytes_of(lines::OPTIMIZER_STATE), moments, "{mode}");
        assert_eq!(p.bytes_of(lines::COLLECTIVE), BUCKETS, "{mode}");
        assert_eq!(p.bytes_of(lines::ACTIVATIONS), 1_207_959_552, "{mode}");
        assert_eq!(p.bytes_of(lines::LAST_BLOCK), 939_524_096, "{mode}");
        assert_eq!(p.bytes_of(lines::SCORES), 1_342_177_280, "{mode}");
        assert_eq!(p.bytes_of(lines::LOGITS), 3_693_084_672, "{mode}");
        assert_eq!(p.bytes_of(lines::BACKWARD), 1_610_612_736, "{mode}");
        assert_eq!(p.step(), STEP, "{mode}");
        assert_eq!(p.backward(), BACKWARD, "{mode}");
        assert_eq!(p.total(), total, "{mode}");
        assert_eq!(p.total(), p.resident() + BACKWARD);
        // 80 GB with 10 % headroom = 72e9 bytes: only the sharded modes fit
        let gpu = parse_size("80GB").unwrap();
        assert_eq!(p.fits(gpu, 0.1), mode != Sharding::None, "{mode}");
    }
    // without checkpointing the 32 blocks' activations and scores are all kept:
    // 32·(905,969,664 + 1,342,177,280) + 134,217,728 = 72,074,919,936
    let mut i = llada_8b(Sharding::OptimizerAndGradients);
    i.activation_checkpointing = false;
    let p = plan(&i).unwrap();
    assert_eq!(p.activations_without_checkpointing, 72_074_919_936);
    assert_eq!(
        p.bytes_of(lines::ACTIVATIONS) + p.bytes_of(lines::SCORES),
        72_074_919_936
    );
    assert!(!p.fits(parse_size("80GB").unwrap(), 0.1));
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn plan_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_mmada-train"))
        .current_dir(repo())
        .arg("plan")
        .args(args)
        .arg("--json")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

const WHAT_IF_8X80: &[&str] = &[
    "--model-preset",
    "mmada_8b",
    "--devices",
    "8",
    "--gpu-mem",
    "80GB",
    "--sharding",
    "optimizer_and_gradients",
    "--activation-checkpointing",
    "--master-weights",
    "--ce-chunk-rows",
    "1024",
];

#[test]
fn cli_plans_both_8b_recipes_on_8x80gb() {
    let gib = |v: &serde_json::Value| v.as_u64().unwrap() as f64 / (1u64 << 30) as f64;
    for recipe in ["recipes/mixed_cot.yaml", "recipes/unigrpo_gsm8k.yaml"] {
        let base = [
            "--recipe",
            recipe,
            "--model-preset",
            "mmada_8b",
            "--devices",
            "8",
            "--gpu-mem",
            "80GB",
        ];
        // the recipe as written (bf16 + sharded f32 master weights and moments, ZeRO-2,
        // per-block checkpointing, chunked head): fits with ≥ 10 % headroom, no what-if
        let p = plan_json(&base);
        assert_eq!(p["params"], 8_082_690_048u64, "MMaDA-8B: vocab 134656");
        assert_eq!(p["world"], 8);
        assert_eq!(p["fits"], true, "{recipe}: {p}");
        let total = gib(&p["total"]);
        assert!(
            total < 0.9 * 80e9 / (1u64 << 30) as f64,
            "{recipe}: {total} GiB"
        );
        assert!(p["what_if"].as_array().unwrap().is_empty(), "{p}");
        // unsharded, every rank holds the f32 master copy and moments: no fit
        let mut args = base.to_vec();
        args.extend_from_slice(&["--sharding", "none"]);
        let unsharded = plan_json(&args);
        assert_eq!(unsharded["fits"], false, "{recipe}: {unsharded}");
        let names: Vec<&str> = p["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap())
            .collect();
        for want in [
            lines::COMPUTE_WEIGHTS,
            lines::MASTER_WEIGHTS,
            lines::GRADIENTS,
            lines::OPTIMIZER_STATE,
            lines::COLLECTIVE,
            lines::ACTIVATIONS,
            lines::SCORES,
            lines::LOGITS,
        ] {
            assert!(
                names.contains(&want),
                "{recipe}: {want} missing in {names:?}"
            );
        }
        assert_eq!(
            names.contains(&lines::ROLLOUT),
            recipe.contains("unigrpo"),
            "{recipe}: a rollout canvas only for UniGRPO"
        );
    }
}

#[test]
fn cli_table_labels_what_ifs_and_names_the_missing_config() {
    let bin = env!("CARGO_BIN_EXE_mmada-train");
    let mut args = vec!["plan", "--recipe", "recipes/mixed_cot.yaml"];
    args.extend_from_slice(WHAT_IF_8X80);
    let out = Command::new(bin)
        .current_dir(repo())
        .args(&args)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("WHAT-IF (overrides of the recipe"), "{text}");
    assert!(
        text.contains("largest micro-batch: 4 rows × 1539 positions"),
        "{text}"
    );
    assert!(text.contains("\nfits "), "{text}");
    // the recipe's Hub checkpoint is not cached (offline) and no preset: the error says what to do
    let out = Command::new(bin)
        .current_dir(repo())
        .env("RUST_BACKTRACE", "0")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tempfile::tempdir().unwrap().path())
        .args(["plan", "unigrpo", "--recipe", "recipes/unigrpo_gsm8k.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Gen-Verse/MMaDA-8B-MixCoT")
            && err.contains("config.json")
            && err.contains("HF_HUB_OFFLINE")
            && err.contains("--model-preset"),
        "{err}"
    );
}

#[test]
fn every_sft_run_logs_its_memory_plan() {
    let bin = env!("CARGO_BIN_EXE_mmada-train");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok = Command::new(bin)
        .args(["synth", "--n", "200", "--out"])
        .arg(d.join("data"))
        .status()
        .unwrap();
    assert!(ok.success());
    let recipe = format!(
        r#"run: {{name: planned, output_dir: {out}, seed: 0}}
model: {{preset: tiny, overrides: {{d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 2, mlp_hidden_size: 64}}}}
tokenizer: {{path: {data}/tokenizer.json}}
data:
  layout: {{max_seq_length: 16, max_lm_len: 24, explicit_prompt: true,
            template: {{header: "", turn_end: "", trim: true, cot_instruction: "", cot_answer: "{{answer}}"}}}}
  lm:
    batch_size: 3
    sources:
      - inline: {{name: arithmetic, task: chat, source: {{path: {data}/arith.jsonl}}, format: jsonl,
                 fields: {{question: question, answer: answer}}, license: MIT, split: train}}
optimizer: {{lr: 1.0e-3}}
train: {{max_steps: 1, device: cpu}}
checkpoint: {{model_dtype: f32}}
"#,
        out = d.join("runs").display(),
        data = d.join("data").display()
    );
    let path = d.join("r.yaml");
    std::fs::write(&path, recipe).unwrap();
    let out = Command::new(bin)
        .args(["sft", "--recipe"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("memory plan per device"), "{log}");
    assert!(
        log.contains("largest micro-batch: 3 rows × 24 positions"),
        "{log}"
    );
    for line in [
        lines::ACTIVATIONS,
        lines::SCORES,
        lines::OPTIMIZER_STATE,
        "total",
    ] {
        assert!(log.contains(line), "{line} missing: {log}");
    }
}

/// The unified recipe: an update's rows are as long as the longest task row, the mmu rows
/// (`<|mmu|> <|soi|>` 1024 image tokens `<|eoi|>` + 512 prompt + 256 completion), and score
/// up to the 1024 image tokens of a t2i row; the rollout canvas is the largest task group,
/// the t2i one with CFG (`maskgit.guidance_scale` 3.5: 2 × `num_generations` rows of 128 + 1
/// text tokens, `<|soi|>` 1024 `<|eoi|>`); without guidance the mmu group is the largest.
/// The recipe fits 8 × 80 GB.
#[test]
fn unified_recipe_plans_each_tasks_rows_and_the_t2i_cfg_rollout() {
    use mmada_train::recipe::Recipe as _;
    let text = std::fs::read_to_string(repo().join("recipes/unigrpo_unified.yaml")).unwrap();
    let cfg = ModelConfig::preset("mmada_8b").unwrap();
    let plan_of = |sets: &[String]| {
        let r = mmada_train::unigrpo::UniGrpoRecipe::parse(&text, "unigrpo_unified.yaml", sets)
            .unwrap();
        let g = r.grpo.num_generations as u64;
        (PlanInput::unigrpo(&r, &cfg, 8, 1), g)
    };
    let (p, g) = plan_of(&[]);
    assert_eq!(p.micro.seq, 1024 + 3 + 512 + 256);
    assert_eq!(p.micro.loss_positions, g * 1024);
    let ro = p.rollout.unwrap();
    assert_eq!((ro.rows, ro.seq), (2 * g, 128 + 1024 + 3), "{ro:?}");
    let m = plan(&p).unwrap();
    let gpu = parse_size("80GB").unwrap();
    assert!(m.fits(gpu, 0.1), "{}", m.table(Some(gpu), 0.1));
    let (p, g) = plan_of(&["tasks[2].maskgit.guidance_scale=0".to_string()]);
    let ro = p.rollout.unwrap();
    assert_eq!((ro.rows, ro.seq), (g, 1024 + 3 + 512 + 256), "{ro:?}");
}
