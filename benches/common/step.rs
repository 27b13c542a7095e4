//! The training step of the CPU benches (`benches/model.rs`, `benches/backends.rs`): the
//! bench config (d_model 256, 4 blocks, 4 heads, mlp 688, vocab 58 560) at batch 4 × 256, the
//! LLaDA pretraining loss on a seeded noising draw (744 of the 1 024 tokens masked), and
//! forward + backward + AdamW, generic over the backend. Shared through `#[path]`.

#![allow(dead_code)] // each bench uses a part

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use mmada_diffusion::noise::DEFAULT_EPS;
use mmada_diffusion::{
    DEFAULT_CE_CHUNK_ROWS, MaskDraw, Noised, Scores, forward_process, pretrain_loss,
};
use mmada_model::init::init_model;
use mmada_model::{Attention, FloatDType, LladaModel, ModelConfig};
use mmada_train::optim::AdamW;
use mmada_train::recipe::OptimizerSection;
use rand::SeedableRng;

pub const BATCH: usize = 4;
pub const SEQ: usize = 256;
/// The prompt lengths of the SFT loss of [`Path::SftHeadChunked`] (the peer's: `SEQ / 4`).
pub const SFT_PROMPTS: [usize; BATCH] = [SEQ / 4; BATCH];

pub fn bench_config() -> ModelConfig {
    ModelConfig {
        d_model: 256,
        n_layers: 4,
        n_heads: 4,
        n_kv_heads: 4,
        mlp_hidden_size: 688,
        vocab_size: 58_560,
        embedding_size: 58_560,
        max_sequence_length: 512,
        mask_token_id: Some(58_000),
        ..ModelConfig::tiny()
    }
}

/// The bench's clean tokens `x0` `[BATCH · SEQ]`: a fixed pattern over the vocabulary.
pub fn tokens(cfg: &ModelConfig) -> Vec<i64> {
    (0..BATCH * SEQ)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as i64)
        .collect()
}

/// `[BATCH, SEQ]` token ids on `device`.
pub fn id_tensor<B: Backend>(ids: &[i64], device: &B::Device) -> Tensor<B, 2, Int> {
    let v: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    Tensor::from_data(TensorData::new(v, [BATCH, SEQ]), device)
}

/// [`tokens`] as a `[BATCH, SEQ]` tensor.
pub fn ids<B: Backend>(cfg: &ModelConfig, device: &B::Device) -> Tensor<B, 2, Int> {
    id_tensor(&tokens(cfg), device)
}

/// The pretraining loss's fixed noising of [`tokens`] (draw seeded with 0; 744 of 1 024
/// tokens masked): `(x0, noised)`.
pub fn pretrain_batch(cfg: &ModelConfig) -> (Vec<i64>, Noised) {
    let x0 = tokens(cfg);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let draw = MaskDraw::sample(&mut rng, BATCH, SEQ);
    let mask_id = cfg.mask_token_id.unwrap() as i64;
    let noised = forward_process(&x0, BATCH, SEQ, &draw, DEFAULT_EPS, mask_id, None).unwrap();
    (x0, noised)
}

/// Where the loss reads its log-probs from, and which loss.
#[derive(Clone, Copy, PartialEq)]
pub enum Path {
    /// Hidden states gathered at the masked positions, head in chunks (the trainers').
    HeadChunked,
    /// Logits at every position.
    FullLogits,
    /// The PyTorch peer's training step (`../shared/bench/torch_peer/bench.py`): the SFT loss
    /// with prompts of `seq / 4` tokens and a new noising draw every step (answer tokens masked
    /// with probability `t ~ U(0, 1)`: 384 masked rows on average), the head in chunks.
    SftHeadChunked,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::HeadChunked => "head_chunked",
            Path::FullLogits => "full_logits",
            Path::SftHeadChunked => "sft_head_chunked",
        }
    }
}

/// The noising of [`tokens`] for the SFT loss of [`Path::SftHeadChunked`] (prompts of
/// `SEQ / 4`, answer tokens masked) on the draw `rng` gives next: `(x0, noised)`.
pub fn sft_batch(cfg: &ModelConfig, rng: &mut rand::rngs::StdRng) -> (Vec<i64>, Noised) {
    let x0 = tokens(cfg);
    let draw = MaskDraw::sample(rng, BATCH, SEQ);
    let mask_id = cfg.mask_token_id.unwrap() as i64;
    let noised = forward_process(
        &x0,
        BATCH,
        SEQ,
        &draw,
        DEFAULT_EPS,
        mask_id,
        Some(&SFT_PROMPTS),
    )
    .unwrap();
    (x0, noised)
}

/// The SFT loss of [`Path::SftHeadChunked`] on the draw `rng` gives next.
pub fn sft_loss<B: Backend>(
    model: &LladaModel<B>,
    cfg: &ModelConfig,
    rng: &mut rand::rngs::StdRng,
    device: &B::Device,
) -> Tensor<B, 1> {
    let (x0, noised) = sft_batch(cfg, rng);
    let ids = id_tensor::<B>(&noised.noisy, device);
    let scores = Scores::Hidden {
        hidden: model.hidden(ids, &Attention::Full),
        head: model.lm_head(),
        chunk_rows: chunk_rows(),
    };
    mmada_diffusion::sft_loss(scores, &x0, &noised, &SFT_PROMPTS).unwrap()
}

/// The LLaDA pretraining loss on a fixed noising draw (seeded; 744 of the 1 024 tokens
/// masked), over `path`.
pub fn loss<B: Backend>(
    model: &LladaModel<B>,
    cfg: &ModelConfig,
    path: Path,
    device: &B::Device,
) -> Tensor<B, 1> {
    let (x0, noised) = pretrain_batch(cfg);
    let ids = id_tensor::<B>(&noised.noisy, device);
    let scores = match path {
        Path::FullLogits => Scores::Logits(model.forward(ids, &Attention::Full)),
        Path::HeadChunked | Path::SftHeadChunked => Scores::Hidden {
            hidden: model.hidden(ids, &Attention::Full),
            head: model.lm_head(),
            chunk_rows: chunk_rows(),
        },
    };
    pretrain_loss(scores, &x0, &noised).unwrap()
}

/// Rows per head chunk: `MMADA_CE_CHUNK_ROWS` or the recipes' default.
pub fn chunk_rows() -> usize {
    std::env::var("MMADA_CE_CHUNK_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CE_CHUNK_ROWS)
}

/// The benches' optimizer: the trainers' AdamW (`mmada_train::optim`, PyTorch semantics; on
/// the CPU backend its fused f32 update) with the peer's hyper-parameters: β (0.9, 0.999),
/// ε 1e-8, weight decay 0.01, no clipping.
pub fn adamw<B: AutodiffBackend>() -> AdamW<B> {
    AdamW::new(
        &OptimizerSection {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: 0.0,
            master_weights: false,
            bf16_rounding: Default::default(),
        },
        0,
    )
}

/// A model (f32 master parameters, optional compute dtype) and its AdamW state.
pub struct Trainer<B: AutodiffBackend> {
    model: Option<LladaModel<B>>,
    opt: AdamW<B>,
    path: Path,
    /// The noising draws of [`Path::SftHeadChunked`] (seeded).
    rng: rand::rngs::StdRng,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// The bench model (seed 0, f32 parameters) on the default device, computing in
    /// `compute` (`None`: f32).
    pub fn new(cfg: &ModelConfig, compute: Option<FloatDType>, path: Path) -> Self {
        let model = init_model::<B>(cfg, 0, &Default::default(), FloatDType::F32)
            .with_compute_dtype(compute);
        Self::from_model(model, path)
    }

    /// `model` with a fresh [`adamw`].
    pub fn from_model(model: LladaModel<B>, path: Path) -> Self {
        Trainer {
            model: Some(model),
            opt: adamw(),
            path,
            rng: rand::rngs::StdRng::seed_from_u64(0),
        }
    }

    /// One forward + backward + AdamW step.
    pub fn step(&mut self, cfg: &ModelConfig) {
        let m = self.model.take().expect("model");
        let dev = m.wte.weight.device();
        let loss = match self.path {
            Path::SftHeadChunked => sft_loss(&m, cfg, &mut self.rng, &dev),
            path => loss(&m, cfg, path, &dev),
        };
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        let m = self.opt.step(m, grads, 1e-4);
        // force the update to be computed
        let _ = m.valid().wte.weight.val().slice([0..1, 0..1]).into_data();
        self.model = Some(m);
    }
}
