//! Loss and gradient parity with the official code (`fixtures/sft_loss/*`, spec §3.1–3.3).

mod common;

use burn::backend::Autodiff;
use common::{Fixture, fixture_root, max_abs_diff};
use mmada_diffusion::noise::DEFAULT_EPS;
use mmada_diffusion::{
    MaskDraw, T2iAttention, UnifiedBatch, forward_process, pretrain_loss, sft_loss, unified_loss,
};
use mmada_model::backend::Cpu;
use mmada_model::{Attention, FloatDType, LladaModel, ModelConfig, load_checkpoint};
use serde_json::Value;

type Ad = Autodiff<Cpu>;

fn meta(case: &str) -> Value {
    let p = fixture_root().join("sft_loss").join(case).join("meta.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn tol(meta: &Value, key: &str) -> f32 {
    meta["tolerance"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("meta.tolerance.{key}")) as f32
}

fn load(meta: &Value) -> (ModelConfig, LladaModel<Ad>) {
    let w = meta["weights"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    load_checkpoint::<Ad>(
        &fixture_root().join(w),
        &Default::default(),
        FloatDType::F32,
    )
    .unwrap()
}

fn ids_tensor(ids: &[i64], b: usize, l: usize) -> burn::tensor::Tensor<Ad, 2, burn::tensor::Int> {
    let v: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    burn::tensor::Tensor::from_data(
        burn::tensor::TensorData::new(v, [b, l]),
        &Default::default(),
    )
}

fn assert_rel(name: &str, got: f32, want: f32, rtol: f32) {
    let rel = ((got - want) / want).abs();
    println!("{name}: ours {got:.7} upstream {want:.7} rel {rel:.2e}");
    assert!(
        rel <= rtol,
        "{name}: {got} vs {want} (rel {rel:e} > {rtol:e})"
    );
}

/// Compare grads (torch layout) against `grad.<hf name>` tensors of `fx`.
fn check_grads(
    model: &LladaModel<Ad>,
    grads: &<Ad as burn::tensor::backend::AutodiffBackend>::Gradients,
    fx: &Fixture,
    meta: &Value,
) -> usize {
    let (atol, rtol) = (tol(meta, "grad_atol"), tol(meta, "grad_rtol"));
    let mut checked = 0;
    let names = fx.names();
    for (name, g) in model.named_grads(grads) {
        let key = format!("grad.model.transformer.{name}");
        if !names.contains(&key) {
            continue;
        }
        let want = fx.floats(&key);
        let got = g
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(got.len(), want.len(), "{key}");
        let mut worst = 0f32;
        for (a, b) in got.iter().zip(&want) {
            let excess = (a - b).abs() - (atol + rtol * b.abs());
            assert!(excess <= 0.0, "{key}: {a} vs {b}");
            worst = worst.max((a - b).abs());
        }
        checked += 1;
        println!("{key}: max |Δgrad| = {worst:.2e}");
    }
    checked
}

#[test]
fn llada_sft_loss_noising_and_all_gradients_match() {
    let m = meta("llada_sft");
    let (cfg, model) = load(&m);
    let dir = fixture_root().join("sft_loss/llada_sft");
    let fx = Fixture::open(&dir.join("tensors.safetensors"));
    let [b, l] = [fx.shape("input_ids")[0], fx.shape("input_ids")[1]];
    let x0 = fx.ints("input_ids");
    let prompt: Vec<usize> = fx
        .ints("prompt_lengths")
        .iter()
        .map(|&x| x as usize)
        .collect();
    let draw = MaskDraw {
        t: fx.floats("t"),
        u: fx.floats("rand_u"),
    };
    let mask_id = cfg.mask_token_id.unwrap() as i64;
    let noised = forward_process(&x0, b, l, &draw, DEFAULT_EPS, mask_id, Some(&prompt)).unwrap();
    // the forward process reproduces upstream exactly
    assert_eq!(noised.noisy, fx.ints("noisy_batch"));
    let masked: Vec<bool> = fx.ints("masked_indices").iter().map(|&x| x != 0).collect();
    assert_eq!(noised.masked, masked);
    let p_fx = fx.floats("p_mask");
    for r in 0..b {
        assert!(
            p_fx[r * l..(r + 1) * l]
                .iter()
                .all(|&p| p == noised.p_mask[r]),
            "p_mask row {r}"
        );
    }
    let ans: Vec<i64> = fx.ints("answer_lengths");
    for r in 0..b {
        assert_eq!(ans[r * l] as usize, l - prompt[r]);
    }

    let logits = model.forward(ids_tensor(&noised.noisy, b, l), &Attention::Full);
    let (d, _) = max_abs_diff(
        &logits.clone().into_data().to_vec::<f32>().unwrap(),
        &fx.floats("logits"),
    );
    assert!(d <= 1e-4, "logits {d}");
    let loss = sft_loss(logits, &x0, &noised, &prompt).unwrap();
    let want = fx.floats("loss")[0];
    assert_rel(
        "llada_sft loss",
        loss.clone().into_scalar(),
        want,
        tol(&m, "loss_rtol"),
    );
    let grads = loss.backward();
    let gfx = Fixture::open(&dir.join("grads.safetensors"));
    let n = check_grads(&model, &grads, &gfx, &m);
    assert_eq!(
        n,
        3 + 9 * cfg.n_layers,
        "every parameter's gradient compared"
    );
}

#[test]
fn llada_pretrain_loss_and_gradients_match() {
    let m = meta("llada_pretrain");
    let (cfg, model) = load(&m);
    let fx = Fixture::open(&fixture_root().join("sft_loss/llada_pretrain/tensors.safetensors"));
    let [b, l] = [fx.shape("input_ids")[0], fx.shape("input_ids")[1]];
    let x0 = fx.ints("input_ids");
    let draw = MaskDraw {
        t: fx.floats("t"),
        u: fx.floats("rand_u"),
    };
    let noised = forward_process(
        &x0,
        b,
        l,
        &draw,
        DEFAULT_EPS,
        cfg.mask_token_id.unwrap() as i64,
        None,
    )
    .unwrap();
    assert_eq!(noised.noisy, fx.ints("noisy_batch"));
    let logits = model.forward(ids_tensor(&noised.noisy, b, l), &Attention::Full);
    let loss = pretrain_loss(logits, &x0, &noised).unwrap();
    assert_rel(
        "llada_pretrain loss",
        loss.clone().into_scalar(),
        fx.floats("loss")[0],
        tol(&m, "loss_rtol"),
    );
    let grads = loss.backward();
    let n = check_grads(&model, &grads, &fx, &m);
    assert_eq!(n, 5, "the fixture's 5 gradients compared");
}

fn unified_fixture() -> (Value, UnifiedBatch, Fixture, ModelConfig, LladaModel<Ad>) {
    let m = meta("mmada_forward_process");
    let (cfg, model) = load(&m);
    let fx =
        Fixture::open(&fixture_root().join("sft_loss/mmada_forward_process/tensors.safetensors"));
    let up = m["upstream"].as_str().unwrap();
    let param = |k: &str| -> usize {
        let s = &up[up
            .find(&format!("{k}="))
            .unwrap_or_else(|| panic!("{k} in meta.upstream"))
            + k.len()
            + 1..];
        // "a=b=c=1" (chained assignment) or "k=16"
        let s = s.trim_start_matches(|c: char| !c.is_ascii_digit());
        s.chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap()
    };
    let l = fx.shape("input_ids")[1];
    let batch = UnifiedBatch {
        ids: fx.ints("input_ids"),
        labels: fx.ints("labels"),
        seq: l,
        n_t2i: param("batch_size_t2i"),
        n_lm: param("batch_size_lm"),
        n_mmu: param("batch_size_mmu"),
        max_seq_length: param("max_seq_length"),
        t2i_masks: fx.ints("t2i_masks").iter().map(|&x| x != 0).collect(),
        p_mask_lm: fx.floats("p_mask_lm"),
        p_mask_mmu: fx.floats("p_mask_mmu"),
        answer_lengths_lm: Some(
            fx.ints("answer_lengths_lm")
                .iter()
                .map(|&x| x as f32)
                .collect(),
        ),
        answer_lengths_mmu: fx
            .ints("answer_lengths")
            .iter()
            .map(|&x| x as f32)
            .collect(),
        mask_id: cfg.mask_token_id.unwrap() as i64,
    };
    (m, batch, fx, cfg, model)
}

#[test]
fn mmada_forward_process_losses_and_gradients_match() {
    let (m, batch, fx, _cfg, model) = unified_fixture();
    let dev = Default::default();
    let losses = unified_loss(&model, &batch, T2iAttention::UpstreamSoftBias, &dev).unwrap();
    let rtol = tol(&m, "loss_rtol");
    assert_rel(
        "loss_t2i",
        losses.t2i.clone().into_scalar(),
        fx.floats("loss_t2i")[0],
        rtol,
    );
    assert_rel(
        "loss_lm",
        losses.lm.clone().into_scalar(),
        fx.floats("loss_lm")[0],
        rtol,
    );
    assert_rel(
        "loss_mmu",
        losses.mmu.clone().into_scalar(),
        fx.floats("loss_mmu")[0],
        rtol,
    );
    let total = losses.total(1.0, 1.0, 1.0);
    assert_rel(
        "loss_total",
        total.clone().into_scalar(),
        fx.floats("loss_total")[0],
        rtol,
    );
    let grads = total.backward();
    assert_eq!(check_grads(&model, &grads, &fx, &m), 5);
}

#[test]
fn mmada_hard_t2i_mask_gives_the_documented_alternative_loss() {
    // The fixture records what a real boolean mask would give (stats.loss_t2i_if_bool_mask_were_used).
    let (m, batch, _fx, _cfg, model) = unified_fixture();
    let want = m["stats"]["loss_t2i_if_bool_mask_were_used"]
        .as_f64()
        .unwrap() as f32;
    let losses = unified_loss(&model, &batch, T2iAttention::Hard, &Default::default()).unwrap();
    assert_rel("loss_t2i (hard mask)", losses.t2i.into_scalar(), want, 1e-5);
}
