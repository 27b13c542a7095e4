//! The optimizer (`mmada_train::optim`): our AdamW against burn's on the same gradients,
//! save / load of its state, bf16 weights that learn (f32 master weights, stochastic
//! rounding), and ZeRO sharding (`train.sharding`) against unsharded data parallelism.

use std::collections::HashMap;
use std::path::Path;

mod common;

use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor};
use mmada_model::backend::{Cpu, CpuAutodiff};
use mmada_model::{Attention, FloatDType, LladaModel, ModelConfig};
use mmada_train::optim::{self, AdamW};
use mmada_train::recipe::{OptimizerSection, Recipe as _, SftRecipe};
use mmada_train::sft::{Resume, Sft, SftOptions};
use mmada_train::trainer::TrainLoop as _;
use mmada_train::unigrpo::{UniGrpo, UniGrpoOptions, UniGrpoRecipe};

type B = CpuAutodiff;

fn section(json: serde_json::Value) -> OptimizerSection {
    serde_json::from_value(json).unwrap()
}

fn tiny_model(dtype: FloatDType) -> LladaModel<B> {
    mmada_model::init::init_model::<B>(&ModelConfig::tiny(), 7, &Default::default(), dtype)
}

/// Gradients of a fixed loss at `model`'s current weights; with `skip` the gradient of
/// `blocks.1.ff_norm.weight` is removed (a parameter that took no part).
fn grads(model: &LladaModel<B>, step: usize, skip: bool) -> GradientsParams {
    let dev = Default::default();
    let ids: Vec<i64> = (0..24)
        .map(|i| ((i * 37 + step * 11) % 280) as i64)
        .collect();
    let ids = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &dev).reshape([2, 12]);
    let logits = model.forward(ids, &Attention::Full);
    let loss = (logits.clone() * logits).mean();
    let mut g = GradientsParams::from_grads(loss.backward(), model);
    if skip {
        let id = model.blocks[1].ff_norm.weight.id;
        g.remove::<Cpu, 1>(id);
    }
    g
}

fn f32_save() -> mmada_model::checkpoint::SaveOptions {
    mmada_model::checkpoint::SaveOptions {
        dtype: mmada_model::checkpoint::DiskDtype::F32,
        ..Default::default()
    }
}

fn values(model: &LladaModel<B>) -> Vec<(String, Vec<f32>)> {
    model
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_data().convert::<f32>().to_vec::<f32>().unwrap()))
        .collect()
}

/// max |a − b| / max |a| over every parameter.
fn rel_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    let (mut d, mut m) = (0f32, 0f32);
    for ((na, x), (nb, y)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        for (p, q) in x.iter().zip(y) {
            d = d.max((p - q).abs());
            m = m.max(p.abs());
        }
    }
    d / m.max(1e-30)
}

#[test]
fn adamw_equals_burn_adamw_skips_params_without_grad_and_resumes_exactly() {
    let s = section(serde_json::json!({
        "lr": 1e-3, "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8
    }));
    let mut burn_opt = burn::optim::AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init::<B, LladaModel<B>>();
    let mut ours = AdamW::<B>::new(&s, 0);
    let (mut a, mut b) = (tiny_model(FloatDType::F32), tiny_model(FloatDType::F32));
    let skipped = a.blocks[1].ff_norm.weight.val().into_data();
    let tmp = tempfile::tempdir().unwrap();
    let mut resumed: Option<(AdamW<B>, LladaModel<B>)> = None;
    for step in 0..5 {
        let lr = 1e-3 * (1.0 + step as f64 * 0.1);
        let (ga, gb) = (grads(&a, step, true), grads(&b, step, true));
        a = burn_opt.step(lr, a, ga);
        b = ours.step(b, gb, lr);
        if let Some((o, m)) = resumed.take() {
            let mut o = o;
            let g = grads(&m, step, true);
            let m = o.step(m, g, lr);
            resumed = Some((o, m));
        }
        if step == 2 {
            // save after 3 steps, load into a fresh optimizer and model (new ParamIds)
            let path = tmp.path().join("optimizer.safetensors");
            optim::save_state(&ours, &b, &path).unwrap();
            let dir = tmp.path().join("model");
            mmada_model::save_checkpoint(&b, &ModelConfig::tiny(), &dir, &f32_save()).unwrap();
            let (_, m) =
                mmada_model::load_checkpoint::<B>(&dir, &Default::default(), FloatDType::F32)
                    .unwrap();
            let o = optim::load_state(AdamW::<B>::new(&s, 0), &m, &path).unwrap();
            resumed = Some((o, m));
        }
    }
    let (va, vb) = (values(&a), values(&b));
    let d = rel_diff(&va, &vb);
    println!("own AdamW vs burn AdamW after 5 steps: max relative difference {d:e}");
    assert!(d <= 1e-6, "own AdamW differs from burn's by {d:e}");
    assert_eq!(va, vb, "f32 AdamW is bit-identical to burn's");
    assert_eq!(
        b.blocks[1].ff_norm.weight.val().into_data(),
        skipped,
        "a parameter without gradient changed"
    );
    assert!(ours.state("blocks.1.ff_norm.weight").is_none());
    assert_eq!(ours.state("blocks.1.attn_norm.weight").unwrap().time, 5);
    let (_, m) = resumed.unwrap();
    assert_eq!(
        values(&m),
        vb,
        "save after 3 + load + 2 steps = 5 straight steps"
    );
}

#[test]
fn stochastic_rounding_is_unbiased_and_seeded() {
    let dev = Default::default();
    // 1 + k/4 ulp of bf16 around 1.0 (ulp 2^-7)
    let n = 40_000;
    let x: Vec<f32> = (0..n)
        .map(|i| 1.0 + (i % 4) as f32 * 0.25 / 128.0)
        .collect();
    let t = Tensor::<Cpu, 1>::from_floats(x.as_slice(), &dev);
    let r = optim::stochastic_round(t.clone(), burn::tensor::DType::BF16, 11);
    assert_eq!(r.dtype(), burn::tensor::DType::BF16);
    let again = optim::stochastic_round(t.clone(), burn::tensor::DType::BF16, 11);
    let other = optim::stochastic_round(t, burn::tensor::DType::BF16, 12);
    assert_eq!(r.to_data(), again.to_data(), "same seed, same rounding");
    assert_ne!(
        r.to_data(),
        other.to_data(),
        "another seed, another rounding"
    );
    let v: Vec<f32> = r.into_data().convert::<f32>().to_vec().unwrap();
    for k in 0..4 {
        let vals: Vec<f32> = v.iter().skip(k).step_by(4).copied().collect();
        assert!(
            vals.iter().all(|&y| y == 1.0 || y == 1.0 + 1.0 / 128.0),
            "rounds to a neighbour"
        );
        let mean = vals.iter().map(|&y| f64::from(y)).sum::<f64>() / vals.len() as f64;
        let want = 1.0 + k as f64 * 0.25 / 128.0;
        assert!(
            (mean - want).abs() < 0.02 / 128.0,
            "k={k}: mean {mean} vs {want}"
        );
    }
}

/// The UniGRPO recipe of the bf16 acceptance test: quickstart model size (d64, 2 blocks,
/// 4 heads, MLP 172), lr 1e-5, no weight decay, 2 steps × 2 inner iterations = 4 updates,
/// starting from the checkpoint `init` (so the initial weights are known).
fn grpo_recipe(dir: &Path, name: &str, init: &Path, sets: &[&str]) -> UniGrpoRecipe {
    let data = dir.join("data");
    let text = format!(
        r##"
run: {{name: {name}, output_dir: "{out}", seed: 9}}
model: {{checkpoint: "{init}"}}
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
  generation_batch_size: 8
  num_iterations: 2
  beta: 0.04
  max_completion_length: 8
rollout: {{steps: 4, block_length: 8, temperature: 1.0, sample_vocab: 99}}
reward_funcs:
  - kind: regex
    params: {{pattern: "[0-9]"}}
  - kind: length
    params: {{min: 0, max: 0, margin: 8, unit: chars}}
optimizer: {{lr: 1.0e-5, weight_decay: 0.0, max_grad_norm: 1.0}}
schedule: {{kind: constant}}
train: {{max_steps: 2}}
checkpoint: {{every: 0, keep_last: 3, model_dtype: f32}}
"##,
        out = dir.join("runs").display(),
        init = init.display(),
        tok = data.join("tokenizer.json").display(),
        jsonl = data.join("arith.jsonl").display(),
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    UniGrpoRecipe::parse(&text, name, &sets).unwrap()
}

/// A quickstart-size model checkpoint for the synthetic arithmetic tokenizer in `dir/init`.
fn quickstart_init(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    if !data.join("arith.jsonl").is_file() {
        mmada_train::synth::write_arithmetic(&data, 64, 11).unwrap();
    }
    let section: mmada_train::recipe::ModelSection = serde_json::from_value(serde_json::json!({
        "preset": "tiny",
        "overrides": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 172}
    }))
    .unwrap();
    let toks: mmada_train::recipe::TokenizerSection =
        serde_json::from_value(serde_json::json!({"path": data.join("tokenizer.json")})).unwrap();
    let tok = mmada_train::trainer::load_tokenizer(&toks, dir).unwrap();
    let cfg = mmada_train::trainer::model_config(&section, &toks, &tok, dir).unwrap();
    let m = mmada_model::init::init_model::<Cpu>(&cfg, 5, &Default::default(), FloatDType::F32);
    let out = dir.join("init");
    mmada_model::save_checkpoint(&m, &cfg, &out, &f32_save()).unwrap();
    tok.inner().save(out.join("tokenizer.json"), false).unwrap();
    out
}

fn file_tensors(path: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            let v: Vec<f32> = match t.dtype() {
                safetensors::Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::BF16 => t
                    .data()
                    .chunks_exact(2)
                    .map(|c| {
                        f32::from_bits(u32::from(u16::from_le_bytes(c.try_into().unwrap())) << 16)
                    })
                    .collect(),
                d => panic!("{d:?}"),
            };
            (n.trim_start_matches("model.transformer.").to_string(), v)
        })
        .collect()
}

/// Share of elements that differ between `a` and `b` (same names).
fn changed(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> f64 {
    let (mut n, mut c) = (0usize, 0usize);
    for (k, x) in a {
        let y = &b[k];
        n += x.len();
        c += x.iter().zip(y).filter(|(p, q)| p != q).count();
    }
    c as f64 / n as f64
}

fn to_bf16(v: &HashMap<String, Vec<f32>>) -> HashMap<String, Vec<f32>> {
    v.iter()
        .map(|(k, x)| {
            let r = x
                .iter()
                .map(|f| burn::tensor::bf16::from_f32(*f).to_f32())
                .collect();
            (k.clone(), r)
        })
        .collect()
}

#[test]
fn bf16_weights_learn_with_master_weights_or_stochastic_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let init = quickstart_init(tmp.path());
    let init_w = file_tensors(&init.join("model.safetensors"));
    let init_bf = to_bf16(&init_w);
    let dev = Default::default();
    let run = |r: &UniGrpoRecipe| {
        UniGrpo::run::<B>(r, &dev, &UniGrpoOptions::default(), &mut |_| {})
            .unwrap()
            .last_checkpoint
            .unwrap()
    };
    let f32_ck = run(&grpo_recipe(tmp.path(), "f32", &init, &[]));
    let f32_w = file_tensors(&f32_ck.join("model/model.safetensors"));
    let f32_changed = changed(&init_w, &f32_w);
    let master_ck = run(&grpo_recipe(
        tmp.path(),
        "master",
        &init,
        &["model.dtype=bf16", "optimizer.master_weights=true"],
    ));
    let master = file_tensors(&master_ck.join(optim::MASTER_FILE));
    let master_model = file_tensors(&master_ck.join("model/model.safetensors"));
    let master_changed = changed(&init_bf, &master);
    let master_visible = changed(&init_bf, &master_model);
    // the bf16 weights are the master weights rounded to nearest (Flex's f32 → bf16 cast
    // rounds a value a few f32 ulps above a bf16 tie down: tolerated, within half a bf16 ulp)
    let rounded = to_bf16(&master);
    assert_eq!(rounded.len(), master_model.len());
    let (mut n, mut off) = (0usize, 0usize);
    for (k, v) in &rounded {
        for ((r, b), m) in v.iter().zip(&master_model[k]).zip(&master[k]) {
            n += 1;
            if r != b {
                off += 1;
                let ulp = f32::from_bits(m.abs().to_bits() & 0x7f80_0000) / 128.0;
                assert!(
                    (m - b).abs() <= 0.5 * ulp * 1.001,
                    "{k}: master {m} → bf16 {b}"
                );
            }
        }
    }
    assert!(
        off * 10_000 <= n,
        "{off} of {n} bf16 weights are not the rounded master"
    );
    let sr_ck = run(&grpo_recipe(
        tmp.path(),
        "stochastic",
        &init,
        &["model.dtype=bf16", "optimizer.bf16_rounding=stochastic"],
    ));
    let sr_w = file_tensors(&sr_ck.join("model/model.safetensors"));
    let sr_changed = changed(&init_bf, &sr_w);
    assert!(!sr_ck.join(optim::MASTER_FILE).exists());
    // the refused setting (bf16, no master, round to nearest), run by bypassing the recipe
    // check, to measure what the issue measured
    let mut nearest = grpo_recipe(
        tmp.path(),
        "nearest",
        &init,
        &["model.dtype=bf16", "optimizer.master_weights=true"],
    );
    nearest.optimizer.master_weights = false;
    let near_w = file_tensors(&run(&nearest).join("model/model.safetensors"));
    let near_changed = changed(&init_bf, &near_w);
    // E[stochastic Δ] = the master's Δ: least-squares slope of Δ_sr on Δ_master
    let (mut xy, mut xx) = (0f64, 0f64);
    for (k, m) in &master {
        for ((i, x), y) in init_bf[k].iter().zip(m).zip(&sr_w[k]) {
            let dm = f64::from(x - i);
            let ds = f64::from(y - i);
            xy += dm * ds;
            xx += dm * dm;
        }
    }
    let slope = xy / xx;
    let mean_abs = |w: &HashMap<String, Vec<f32>>| {
        let (mut s, mut n) = (0f64, 0usize);
        for (k, v) in w {
            for (x, i) in v.iter().zip(&init_bf[k]) {
                s += f64::from((x - i).abs());
                n += 1;
            }
        }
        s / n as f64
    };
    let (d_master, d_sr, d_near) = (mean_abs(&master), mean_abs(&sr_w), mean_abs(&near_w));
    println!(
        "mean |Δw| over all weights: bf16+master (master) {d_master:e}, bf16 stochastic {d_sr:e}, bf16 round-to-nearest {d_near:e}"
    );
    println!(
        "4 UniGRPO updates at lr 1e-5, quickstart size: changed f32 {:.2} %, bf16+master: master {:.2} % (bf16 weights {:.2} %), bf16 stochastic {:.2} % (slope of Δ on the master's Δ {slope:.3}), bf16 round-to-nearest {:.2} %",
        100.0 * f32_changed,
        100.0 * master_changed,
        100.0 * master_visible,
        100.0 * sr_changed,
        100.0 * near_changed
    );
    assert!(f32_changed >= 0.5, "f32 changed {f32_changed}");
    assert!(
        master_changed >= 0.5 && master_changed >= 0.9 * f32_changed,
        "master weights changed {master_changed} (f32 {f32_changed})"
    );
    // stochastic rounding moves the bf16 weights by the master's amount in expectation (the
    // bf16 grid cannot move half the weights by 4e-5 in 4 updates: a few flip by one ulp);
    // round to nearest loses almost all of it
    assert!(
        (0.8..1.2).contains(&(d_sr / d_master)),
        "stochastic mean |Δw| {d_sr:e} vs master {d_master:e}"
    );
    assert!(
        (0.8..1.2).contains(&slope),
        "stochastic updates biased: slope {slope}"
    );
    assert!(
        sr_changed > 2.0 * near_changed,
        "stochastic {sr_changed} vs nearest {near_changed}"
    );
    assert!(
        d_near < 0.1 * d_master,
        "round to nearest kept {d_near:e} of {d_master:e}"
    );
}

#[test]
fn bf16_master_weights_resume_bit_exactly_and_bf16_without_either_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let init = quickstart_init(tmp.path());
    let dev = Default::default();
    let sets = [
        "model.dtype=bf16",
        "optimizer.master_weights=true",
        "train.max_steps=3",
    ];
    let straight = grpo_recipe(tmp.path(), "straight", &init, &sets);
    let a = UniGrpo::run::<B>(&straight, &dev, &UniGrpoOptions::default(), &mut |_| {}).unwrap();
    let split = grpo_recipe(tmp.path(), "split", &init, &sets);
    let o = UniGrpoOptions {
        stop_after: Some(1),
        ..Default::default()
    };
    UniGrpo::run::<B>(&split, &dev, &o, &mut |_| {}).unwrap();
    let o = UniGrpoOptions {
        resume: Some(Resume::Latest),
        ..Default::default()
    };
    let b = UniGrpo::run::<B>(&split, &dev, &o, &mut |_| {}).unwrap();
    assert_eq!(a.losses, b.losses);
    let (ca, cb) = (a.last_checkpoint.unwrap(), b.last_checkpoint.unwrap());
    for f in [
        "model/model.safetensors",
        "optimizer.safetensors",
        optim::MASTER_FILE,
    ] {
        assert_eq!(
            file_tensors(&ca.join(f)),
            file_tensors(&cb.join(f)),
            "{f} after resume"
        );
    }
    let text = std::fs::read_to_string(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../recipes/quickstart_unigrpo.yaml"),
    )
    .unwrap();
    let e = UniGrpoRecipe::parse(&text, "q.yaml", &["model.dtype=bf16".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("optimizer.master_weights") && e.contains("bf16_rounding: stochastic"),
        "{e}"
    );
    let e = UniGrpoRecipe::parse(
        &text,
        "q.yaml",
        &[
            "optimizer.master_weights=true".into(),
            "optimizer.bf16_rounding=stochastic".into(),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("optimizer.bf16_rounding"), "{e}");
    // the 8B UniGRPO recipe parses (bf16 with master weights)
    let text = std::fs::read_to_string(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../recipes/unigrpo_gsm8k.yaml"),
    )
    .unwrap();
    let r = UniGrpoRecipe::parse(&text, "unigrpo_gsm8k.yaml", &[]).unwrap();
    assert!(r.optimizer.master_weights);
}

/// [`common::sft_recipe`] with this file's base: lm batch 6, clip 0.5, cosine schedule with
/// 2 warm-up steps, 5 steps, no periodic checkpoint (keep 5); then `sets`.
fn sft_recipe(dir: &Path, name: &str, sets: &[&str]) -> SftRecipe {
    let mut all = vec![
        "data.lm.batch_size=6",
        "optimizer.max_grad_norm=0.5",
        "schedule.kind=cosine",
        "schedule.warmup_steps=2",
        "schedule.min_lr_scale=0.1",
        "train.max_steps=5",
        "checkpoint.every=0",
        "checkpoint.keep_last=5",
    ];
    all.extend_from_slice(sets);
    common::sft_recipe(dir, name, &all)
}

fn dist() -> mmada_train::dist::DistConfig {
    mmada_train::dist::DistConfig {
        check_every: 1,
        timeout: std::time::Duration::from_secs(120),
        ..Default::default()
    }
}

/// max |a − b| / max |a| over the tensors of two safetensors files (same names).
fn file_rel_diff(a: &Path, b: &Path) -> f32 {
    let (x, y) = (file_tensors(a), file_tensors(b));
    let mut names: Vec<&String> = x.keys().collect();
    names.sort();
    let mut yn: Vec<&String> = y.keys().collect();
    yn.sort();
    assert_eq!(
        names,
        yn,
        "{} vs {}: tensor names",
        a.display(),
        b.display()
    );
    let (mut d, mut m) = (0f32, 0f32);
    for n in names {
        for (p, q) in x[n].iter().zip(&y[n]) {
            d = d.max((p - q).abs());
            m = m.max(p.abs());
        }
    }
    d / m.max(1e-30)
}

#[test]
fn sft_sharded_equals_unsharded_on_2_and_3_ranks_and_resumes_across_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |r: &SftRecipe, ranks: usize, o: SftOptions| {
        Sft::run_dp::<B>(
            r,
            &vec![Default::default(); ranks],
            &dist(),
            &o,
            &mut |_| {},
        )
        .unwrap()
    };
    for ranks in [2, 3] {
        let base = run(
            &sft_recipe(tmp.path(), &format!("none{ranks}"), &[]),
            ranks,
            SftOptions::default(),
        );
        let base_ck = base.last_checkpoint.unwrap();
        for mode in ["optimizer", "optimizer_and_gradients"] {
            let set = format!("train.sharding={mode}");
            let r = sft_recipe(tmp.path(), &format!("{mode}{ranks}"), &[&set]);
            let out = run(&r, ranks, SftOptions::default());
            let ck = out.last_checkpoint.unwrap();
            let dw = file_rel_diff(
                &base_ck.join("model/model.safetensors"),
                &ck.join("model/model.safetensors"),
            );
            let ds = file_rel_diff(
                &base_ck.join("optimizer.safetensors"),
                &ck.join("optimizer.safetensors"),
            );
            println!(
                "SFT cpu:{ranks} sharding {mode} vs none, 5 steps: weights {dw:e}, optimizer state {ds:e} (max relative)"
            );
            assert!(dw <= 1e-6, "{mode} on {ranks}: weights {dw:e}");
            assert!(ds <= 1e-5, "{mode} on {ranks}: optimizer state {ds:e}");
            // with the deterministic reduction order (vendor/PATCHED.md 4) even bit-exact
            for f in ["model/model.safetensors", "optimizer.safetensors"] {
                assert!(
                    file_tensors(&base_ck.join(f)) == file_tensors(&ck.join(f)),
                    "{mode} on {ranks}: {f} differs from the unsharded run's"
                );
            }
        }
    }
    // stop at step 3 with 3 sharded ranks, resume with 2 unsharded = 5 straight steps on 2
    // the same global batch of 6 rows: 2 per rank on 3 ranks, 3 per rank on 2
    let straight = run(
        &sft_recipe(tmp.path(), "straight2", &["data.lm.batch_size=3"]),
        2,
        SftOptions::default(),
    );
    let split = sft_recipe(
        tmp.path(),
        "split",
        &[
            "train.sharding=optimizer_and_gradients",
            "data.lm.batch_size=2",
        ],
    );
    let o = SftOptions {
        stop_after: Some(3),
        ..Default::default()
    };
    let first = run(&split, 3, o);
    assert_eq!(first.final_step, 3);
    let unsharded = sft_recipe(tmp.path(), "split", &["data.lm.batch_size=3"]);
    let o = SftOptions {
        resume: Some(Resume::Latest),
        ..Default::default()
    };
    let second = run(&unsharded, 2, o);
    let (ca, cb) = (
        straight.last_checkpoint.unwrap(),
        second.last_checkpoint.unwrap(),
    );
    let dw = file_rel_diff(
        &ca.join("model/model.safetensors"),
        &cb.join("model/model.safetensors"),
    );
    let ds = file_rel_diff(
        &ca.join("optimizer.safetensors"),
        &cb.join("optimizer.safetensors"),
    );
    println!(
        "SFT 3 sharded ranks → resume on 2 unsharded vs straight on 2: weights {dw:e}, state {ds:e}"
    );
    assert!(
        dw <= 1e-6 && ds <= 1e-5,
        "resume across layouts: {dw:e} {ds:e}"
    );
}

#[test]
fn unigrpo_sharded_equals_unsharded_and_state_is_split() {
    let tmp = tempfile::tempdir().unwrap();
    let init = quickstart_init(tmp.path());
    let run = |r: &UniGrpoRecipe, ranks: usize| {
        UniGrpo::run_dp::<B>(
            r,
            &vec![Default::default(); ranks],
            &dist(),
            &UniGrpoOptions::default(),
            &mut |_| {},
        )
        .unwrap()
    };
    let base_sets = ["optimizer.lr=1e-3", "train.max_steps=3"];
    for ranks in [2, 3] {
        let base = run(
            &grpo_recipe(tmp.path(), &format!("gnone{ranks}"), &init, &base_sets),
            ranks,
        );
        let bck = base.last_checkpoint.unwrap();
        for mode in ["optimizer", "optimizer_and_gradients"] {
            let set = format!("train.sharding={mode}");
            let mut sets = base_sets.to_vec();
            sets.push(&set);
            let out = run(
                &grpo_recipe(tmp.path(), &format!("g{mode}{ranks}"), &init, &sets),
                ranks,
            );
            let ck = out.last_checkpoint.unwrap();
            let dw = file_rel_diff(
                &bck.join("model/model.safetensors"),
                &ck.join("model/model.safetensors"),
            );
            let ds = file_rel_diff(
                &bck.join("optimizer.safetensors"),
                &ck.join("optimizer.safetensors"),
            );
            println!(
                "UniGRPO cpu:{ranks} sharding {mode} vs none, 6 updates: weights {dw:e}, state {ds:e}"
            );
            assert!(dw <= 1e-6, "{mode} on {ranks}: weights {dw:e}");
            assert!(ds <= 1e-5, "{mode} on {ranks}: state {ds:e}");
            for f in ["model/model.safetensors", "optimizer.safetensors"] {
                assert!(
                    file_tensors(&bck.join(f)) == file_tensors(&ck.join(f)),
                    "{mode} on {ranks}: {f} differs from the unsharded run's"
                );
            }
        }
    }
}

#[test]
fn partition_is_balanced_whole_tensors_and_state_bytes_split() {
    let model = tiny_model(FloatDType::F32);
    let infos = optim::param_infos(&model);
    let numels: Vec<usize> = infos.iter().map(optim::ParamInfo::numel).collect();
    let total: usize = numels.iter().sum();
    for world in [2, 3, 4] {
        let owners = optim::partition(&numels, world);
        assert_eq!(owners, optim::partition(&numels, world), "deterministic");
        let mut load = vec![0usize; world];
        for (o, n) in owners.iter().zip(&numels) {
            load[*o] += n;
        }
        let max = *numels.iter().max().unwrap();
        let (lo, hi) = (load.iter().min().unwrap(), load.iter().max().unwrap());
        assert!(hi - lo <= max, "world {world}: loads {load:?}");
        // one optimizer per rank over its shard: state bytes add up to the unsharded ones
        let s = section(serde_json::json!({"lr": 1e-3}));
        let mut full = AdamW::<B>::new(&s, 0);
        let g = grads(&model, 0, false);
        let _ = full.step(model.clone(), g, 1e-3);
        let mut sum = 0;
        for (r, l) in load.iter().enumerate() {
            let mut o = AdamW::<B>::new(&s, 0);
            o.set_owned(Some(
                infos
                    .iter()
                    .zip(&owners)
                    .filter(|(_, w)| **w == r)
                    .map(|(i, _)| i.name.clone())
                    .collect(),
            ));
            let _ = o.step(model.clone(), grads(&model, 0, false), 1e-3);
            assert_eq!(o.state_bytes(), l * 8, "rank {r}: m and v in f32");
            sum += o.state_bytes();
        }
        assert_eq!(sum, full.state_bytes());
        assert_eq!(full.state_bytes(), total * 8);
        println!(
            "tiny model on {world} ranks: optimizer state per rank {:?} bytes of {} unsharded",
            load.iter().map(|l| l * 8).collect::<Vec<_>>(),
            total * 8
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// ZeRO across processes: 2 `mmada-train sft` processes on loopback (one rank each; the
/// node-level reduce / broadcast path of `crate::dist`) with `optimizer` and
/// `optimizer_and_gradients` sharding give the weights and optimizer state of the unsharded
/// 2-rank run, bit for bit. (UniGRPO shares the same `crate::dist` update path; its sharded
/// runs are checked in-process above.)
#[test]
fn sft_sharded_over_two_processes_equals_unsharded() {
    let tmp = tempfile::tempdir().unwrap();
    let base = Sft::run_dp::<B>(
        &sft_recipe(tmp.path(), "none", &[]),
        &[Default::default(), Default::default()],
        &dist(),
        &SftOptions::default(),
        &mut |_| {},
    )
    .unwrap()
    .last_checkpoint
    .unwrap();
    for mode in ["optimizer", "optimizer_and_gradients"] {
        let set = format!("train.sharding={mode}");
        let r = sft_recipe(tmp.path(), mode, &[&set]);
        let path = tmp.path().join(format!("{mode}.yaml"));
        std::fs::write(&path, r.to_yaml()).unwrap();
        let coord = free_port();
        let node = |rank: usize| {
            std::process::Command::new(env!("CARGO_BIN_EXE_mmada-train"))
                .args(["sft", "--recipe"])
                .arg(&path)
                .args(["--nodes", "2", "--node-rank", &rank.to_string()])
                .args(["--coordinator", &format!("127.0.0.1:{coord}")])
                .args(["--data-port", &free_port().to_string()])
                .args(["--collective-timeout", "120", "--check-every", "1"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (n0, n1) = (node(0), node(1));
        for (who, c) in [("node 1", n1), ("node 0", n0)] {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{mode} {who}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let ck = tmp
            .path()
            .join(format!("runs/{mode}/checkpoints/step-000005"));
        let dw = file_rel_diff(
            &base.join("model/model.safetensors"),
            &ck.join("model/model.safetensors"),
        );
        let ds = file_rel_diff(
            &base.join("optimizer.safetensors"),
            &ck.join("optimizer.safetensors"),
        );
        println!(
            "SFT 2 processes sharding {mode} vs cpu:2 unsharded, 5 steps: weights {dw:e}, optimizer state {ds:e} (max relative)"
        );
        assert!(dw <= 1e-6, "{mode}: weights {dw:e}");
        assert!(ds <= 1e-5, "{mode}: optimizer state {ds:e}");
        // the reduction order is deterministic across processes too: bit-exact
        for f in ["model/model.safetensors", "optimizer.safetensors"] {
            assert!(
                file_tensors(&base.join(f)) == file_tensors(&ck.join(f)),
                "{mode}: {f} differs from the unsharded run's"
            );
        }
    }
}
