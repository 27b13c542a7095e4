//! Mixed precision (`LladaModel::with_compute_dtype`): bf16 compute over f32 master
//! parameters gives logits and gradients close to the f32 ones, with f32 gradients on the
//! f32 parameters.

use burn::backend::Autodiff;
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};
use mmada_model::backend::Cpu;
use mmada_model::init::init_model;
use mmada_model::{Attention, LladaModel, ModelConfig};

type Ad = Autodiff<Cpu>;

const BATCH: usize = 2;
const SEQ: usize = 24;

fn ids<B: burn::tensor::backend::Backend>(cfg: &ModelConfig) -> Tensor<B, 2, Int> {
    let v: Vec<i32> = (0..BATCH * SEQ)
        .map(|i| ((i * 37 + 11) % cfg.vocab_size) as i32)
        .collect();
    Tensor::from_data(TensorData::new(v, [BATCH, SEQ]), &Default::default())
}

/// Mean cross-entropy of predicting `(id + 1) mod vocab` at every position, in f32.
fn loss<B: burn::tensor::backend::Backend>(
    model: &LladaModel<B>,
    cfg: &ModelConfig,
) -> Tensor<B, 1> {
    let logits = model.forward(ids::<B>(cfg), &Attention::Full);
    assert_eq!(logits.dtype(), DType::F32, "the loss is computed in f32");
    let targets: Vec<i32> = (0..BATCH * SEQ)
        .map(|i| (((i * 37 + 11) % cfg.vocab_size + 1) % cfg.vocab_size) as i32)
        .collect();
    let t = Tensor::<B, 3, Int>::from_data(
        TensorData::new(targets, [BATCH, SEQ, 1]),
        &Default::default(),
    );
    log_softmax(logits, 2).gather(2, t).mean().neg()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn bf16_mixed_logits_are_close_to_f32_and_differ_by_bf16_rounding() {
    let cfg = ModelConfig::tiny();
    let model = init_model::<Cpu>(&cfg, 5, &Default::default(), FloatDType::F32);
    let f32_logits = model.forward(ids::<Cpu>(&cfg), &Attention::Full);
    let mixed = model.with_compute_dtype(Some(FloatDType::BF16));
    assert_eq!(mixed.dtype(), DType::F32, "master parameters stay f32");
    assert_eq!(mixed.effective_compute_dtype(), Some(FloatDType::BF16));
    let mixed_logits = mixed.forward(ids::<Cpu>(&cfg), &Attention::Full);
    assert_eq!(mixed_logits.dtype(), DType::F32);
    let a = f32_logits.into_data().to_vec::<f32>().unwrap();
    let b = mixed_logits.into_data().to_vec::<f32>().unwrap();
    let (scale, diff) = (max_abs(&a), max_abs_diff(&a, &b));
    println!("bf16-mixed logits: max |Δ| = {diff:e}, max |logit| = {scale:e}");
    // bf16 keeps 8 significand bits (unit roundoff 2^-9 ≈ 2e-3); a few roundings per layer
    // stay within 2 % of the logit scale.
    assert!(
        diff <= 2e-2 * scale,
        "bf16-mixed logits differ by {diff} (scale {scale})"
    );
    // and the compute really ran in bf16 (f32 compute would match to ~1e-7)
    assert!(
        diff > 1e-4 * scale,
        "logits identical to f32 ({diff}): bf16 compute not applied"
    );
    // a compute dtype equal to the parameter dtype is no mixed precision
    let same = mixed.with_compute_dtype(Some(FloatDType::F32));
    assert_eq!(same.effective_compute_dtype(), None);
}

#[test]
fn bf16_mixed_gradients_are_f32_and_close_to_f32_gradients() {
    let cfg = ModelConfig::tiny();
    let model = init_model::<Ad>(&cfg, 9, &Default::default(), FloatDType::F32);
    let g32 = model.named_grads(&loss(&model, &cfg).backward());
    let mixed = model.with_compute_dtype(Some(FloatDType::BF16));
    let l = loss(&mixed, &cfg);
    let gmx = mixed.named_grads(&l.backward());
    assert_eq!(g32.len(), gmx.len());
    let mut worst = (0f64, String::new());
    for ((name, a), (_, b)) in g32.iter().zip(&gmx) {
        let a = a
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no f32 gradient"));
        let b = b
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no mixed gradient"));
        assert_eq!(b.dtype, DType::F32, "{name}: gradient is not f32");
        let a = a.to_vec::<f32>().unwrap();
        let b = b.to_vec::<f32>().unwrap();
        let (mut num, mut den) = (0f64, 0f64);
        for (x, y) in a.iter().zip(&b) {
            num += f64::from(x - y).powi(2);
            den += f64::from(*x).powi(2);
        }
        assert!(den > 0.0, "{name}: zero gradient");
        let rel = (num / den).sqrt();
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    println!(
        "bf16-mixed gradients: worst relative L2 error {:.3e} ({})",
        worst.0, worst.1
    );
    // bf16 activations and weights: a few percent relative L2 error per tensor at most
    assert!(
        worst.0 < 5e-2,
        "gradient of {} off by {:e}",
        worst.1,
        worst.0
    );
    assert!(
        worst.0 > 0.0,
        "gradients identical: bf16 compute not applied"
    );
}
