//! Forward parity with the official PyTorch code (`fixtures/forward/*`, spec §1.2–1.3).
//!
//! Every case folder is discovered from the fixture root; the weights folder, tolerance and
//! tensor names come from each case's `meta.json`, the sizes from the weights' `config.json`.
//! Output tensors are matched to an attention kind by name:
//! `logits` → full attention, `logits_pairwise_bias` → [`Attention::Pairwise`] from the case's
//! `attention_mask`, `logits_keypad_bias` → [`Attention::KeyPadding`]. The
//! `logits_attention_mask_kwarg_CAUSAL_QUIRK` output (MMaDA's old `modeling_llada.py` turning
//! `attention_mask=` into causal attention) is deliberately not reproduced: mmada-rs never
//! applies a causal mask.

mod common;

use burn::tensor::{Bool, Tensor, TensorData};
use common::{Fixture, fixture_root, max_abs_diff};
use mmada_model::backend::Cpu;
use mmada_model::{Attention, FloatDType, load_checkpoint};
use serde_json::Value;

struct Outcome {
    case: String,
    output: String,
    max_abs: f32,
}

fn run_case(case_dir: &std::path::Path) -> Vec<Outcome> {
    let root = fixture_root();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(case_dir.join("meta.json")).unwrap())
            .unwrap();
    // "weights/" or "weights_gqa/ (explanation)"
    let weights = meta["weights"]
        .as_str()
        .expect("meta.weights")
        .split_whitespace()
        .next()
        .unwrap();
    let atol = meta["tolerance"]["atol"]
        .as_f64()
        .expect("meta.tolerance.atol") as f32;
    let device = Default::default();
    let (cfg, model) = load_checkpoint::<Cpu>(&root.join(weights), &device, FloatDType::F32)
        .expect("load fixture weights");
    let fx = Fixture::open(&case_dir.join("tensors.safetensors"));
    let ids = fx.int_tensor2("input_ids");
    let [b, l] = ids.dims();
    let mask = fx.names().contains(&"attention_mask".to_string()).then(|| {
        let m: Vec<bool> = fx
            .ints("attention_mask")
            .into_iter()
            .map(|x| x != 0)
            .collect();
        m
    });
    let mut out = Vec::new();
    let mut names = fx.names();
    names.sort();
    for name in names.iter().filter(|n| n.starts_with("logits")) {
        let attention = match name.as_str() {
            "logits" => Attention::Full,
            "logits_pairwise_bias" => {
                let m = mask.as_ref().expect("pairwise case has attention_mask");
                let mut pair = Vec::with_capacity(b * l * l);
                for r in 0..b {
                    for i in 0..l {
                        for j in 0..l {
                            pair.push(m[r * l + i] && m[r * l + j]);
                        }
                    }
                }
                Attention::Pairwise(Tensor::<Cpu, 3, Bool>::from_data(
                    TensorData::new(pair, [b, l, l]),
                    &device,
                ))
            }
            "logits_keypad_bias" => {
                let m = mask
                    .as_ref()
                    .expect("keypad case has attention_mask")
                    .clone();
                Attention::KeyPadding(Tensor::<Cpu, 2, Bool>::from_data(
                    TensorData::new(m, [b, l]),
                    &device,
                ))
            }
            n if n.contains("CAUSAL_QUIRK") => continue,
            other => panic!(
                "unknown output `{other}` in {}: extend this test",
                case_dir.display()
            ),
        };
        let logits = model.forward(ids.clone(), &attention);
        assert_eq!(logits.dims(), [b, l, cfg.embedding_size]);
        assert_eq!(fx.shape(name), vec![b, l, cfg.embedding_size]);
        let got = logits.into_data().to_vec::<f32>().unwrap();
        let want = fx.floats(name);
        let (d, i) = max_abs_diff(&got, &want);
        assert!(
            d <= atol,
            "{}/{name}: max |Δlogits| = {d:e} > {atol:e} at flat index {i} (got {}, want {})",
            case_dir.display(),
            got[i],
            want[i]
        );
        out.push(Outcome {
            case: case_dir.file_name().unwrap().to_string_lossy().into(),
            output: name.clone(),
            max_abs: d,
        });
    }
    out
}

#[test]
fn forward_matches_official_pytorch_logits() {
    let dir = fixture_root().join("forward");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("meta.json").is_file())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 4,
        "expected the forward fixture cases, found {cases:?}"
    );
    let mut all = Vec::new();
    for c in &cases {
        all.extend(run_case(c));
    }
    for o in &all {
        println!(
            "forward/{}/{}: max |Δlogits| = {:.3e}",
            o.case, o.output, o.max_abs
        );
    }
    // basic, gqa, long (full) + padmask (pairwise, keypad)
    assert!(
        all.len() >= 5,
        "expected at least 5 compared outputs, got {}",
        all.len()
    );
}

#[test]
fn batch_equals_single_rows() {
    // Invariance: each row of a batch gives the logits it gives alone (no cross-row leakage).
    let root = fixture_root();
    let device = Default::default();
    let (_, model) =
        load_checkpoint::<Cpu>(&root.join("weights"), &device, FloatDType::F32).unwrap();
    let fx = Fixture::open(&root.join("forward/basic/tensors.safetensors"));
    let ids = fx.int_tensor2("input_ids");
    let [b, l] = ids.dims();
    let batch = model
        .forward(ids.clone(), &Attention::Full)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let v = batch.len() / b;
    for r in 0..b {
        let single = model
            .forward(ids.clone().narrow(0, r, 1), &Attention::Full)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let (d, _) = max_abs_diff(&single, &batch[r * v..(r + 1) * v]);
        assert!(
            d <= 1e-5,
            "row {r} of {b}x{l}: batched vs single max diff {d}"
        );
    }
}

#[test]
fn key_padding_ignores_padded_content() {
    // Invariance: with key padding, changing the tokens at padded positions does not change
    // the logits of real positions.
    let root = fixture_root();
    let device = Default::default();
    let (cfg, model) =
        load_checkpoint::<Cpu>(&root.join("weights"), &device, FloatDType::F32).unwrap();
    let fx = Fixture::open(&root.join("forward/padmask/tensors.safetensors"));
    let mut ids = fx.ints("input_ids");
    let mask: Vec<bool> = fx
        .ints("attention_mask")
        .into_iter()
        .map(|x| x != 0)
        .collect();
    let [b, l] = [fx.shape("input_ids")[0], fx.shape("input_ids")[1]];
    let to_t = |v: &Vec<i64>| {
        Tensor::<Cpu, 2, burn::tensor::Int>::from_data(
            TensorData::new(v.iter().map(|&x| x as i32).collect::<Vec<_>>(), [b, l]),
            &device,
        )
    };
    let att = Attention::KeyPadding(Tensor::<Cpu, 2, Bool>::from_data(
        TensorData::new(mask.clone(), [b, l]),
        &device,
    ));
    let a = model
        .forward(to_t(&ids), &att)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let n_pad = mask.iter().filter(|m| !**m).count();
    assert!(n_pad > 0, "fixture has padding");
    for (i, m) in mask.iter().enumerate() {
        if !m {
            ids[i] = (ids[i] + 7) % cfg.vocab_size as i64;
        }
    }
    let c = model
        .forward(to_t(&ids), &att)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let v = cfg.embedding_size;
    let mut worst = 0f32;
    for (pos, m) in mask.iter().enumerate() {
        if *m {
            let (d, _) = max_abs_diff(&a[pos * v..(pos + 1) * v], &c[pos * v..(pos + 1) * v]);
            worst = worst.max(d);
        }
    }
    assert!(
        worst <= 1e-5,
        "padded content leaked into real positions: {worst}"
    );
    // and without the mask it does leak (the test can fail)
    let full = model
        .forward(to_t(&ids), &Attention::Full)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let (d, _) = max_abs_diff(&full, &c);
    assert!(d > 1e-3, "full attention should differ from key padding");
}

#[test]
fn bf16_weights_forward_close_to_f32() {
    // Loading into BF16 runs the whole forward in bf16 (norms, RoPE and softmax in f32 as
    // upstream under autocast). The error is bf16 rounding, far above f32 noise but small
    // relative to the logits' range.
    let root = fixture_root();
    let device = Default::default();
    let (_, m32) = load_checkpoint::<Cpu>(&root.join("weights"), &device, FloatDType::F32).unwrap();
    let (_, m16) =
        load_checkpoint::<Cpu>(&root.join("weights"), &device, FloatDType::BF16).unwrap();
    assert_eq!(m16.dtype(), burn::tensor::DType::BF16);
    let fx = Fixture::open(&root.join("forward/basic/tensors.safetensors"));
    let ids = fx.int_tensor2("input_ids");
    let a = m32
        .forward(ids.clone(), &Attention::Full)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let out16 = m16.forward(ids, &Attention::Full);
    assert_eq!(out16.dtype(), burn::tensor::DType::BF16);
    let b = out16
        .cast(FloatDType::F32)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let (d, _) = max_abs_diff(&a, &b);
    let range = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    println!("bf16 vs f32 max |Δlogits| = {d:.4} (|logits| max {range:.2})");
    assert!(
        d > 0.0 && d < 0.05 * range,
        "bf16 forward diverges: {d} vs range {range}"
    );
}
