//! Training-step throughput on a CUDA GPU (feature `cuda`): forward + backward + AdamW of the
//! d_model 1024 / 8-layer LLaDA config (16 heads, SwiGLU 2816, LLaDA vocabulary 126 464) at
//! batch 8 × 512 with the LLaDA pretraining loss (about half the tokens masked), in f32 and in
//! bf16 mixed precision (f32 master weights, bf16 compute), side by side. Throughput is in
//! tokens/s (criterion "elements"). Every timed step reads one parameter value back, so the
//! GPU work of the step is included.
//!
//! Run: `cargo bench --features cuda --bench train_cuda` (or `scripts/gpu_check.sh`);
//! `MMADA_BENCH_DEVICE=N` picks `cuda:N` (default 0).

use burn::backend::Autodiff;
use burn::backend::cuda::CudaDevice;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mmada_diffusion::noise::DEFAULT_EPS;
use mmada_diffusion::{MaskDraw, forward_process, pretrain_loss};
use mmada_model::backend::Cuda;
use mmada_model::init::init_model;
use mmada_model::{Attention, FloatDType, LladaModel, ModelConfig};
use rand::SeedableRng;

const BATCH: usize = 8;
const SEQ: usize = 512;

type Ad = Autodiff<Cuda>;

fn bench_config() -> ModelConfig {
    ModelConfig {
        d_model: 1024,
        n_layers: 8,
        n_heads: 16,
        n_kv_heads: 16,
        mlp_hidden_size: 2816,
        vocab_size: 126_464,
        embedding_size: 126_464,
        max_sequence_length: 1024,
        mask_token_id: Some(126_336),
        ..ModelConfig::tiny()
    }
}

fn device() -> CudaDevice {
    let n = std::env::var("MMADA_BENCH_DEVICE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    CudaDevice::new(n)
}

/// A model (f32 master parameters, optional compute dtype), its AdamW state and a fixed
/// noised batch (seeded).
struct Trainer {
    model: Option<LladaModel<Ad>>,
    opt: burn::optim::adaptor::OptimizerAdaptor<burn::optim::AdamW, LladaModel<Ad>, Ad>,
    x0: Vec<i64>,
    noised: mmada_diffusion::Noised,
    dev: CudaDevice,
}

impl Trainer {
    fn new(cfg: &ModelConfig, compute: Option<FloatDType>, dev: CudaDevice) -> Self {
        let model = init_model::<Ad>(cfg, 0, &dev, FloatDType::F32).with_compute_dtype(compute);
        let opt = AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(0.01)
            .init::<Ad, LladaModel<Ad>>();
        let x0: Vec<i64> = (0..BATCH * SEQ)
            .map(|i| ((i * 7919 + 13) % 126_000) as i64)
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let draw = MaskDraw::sample(&mut rng, BATCH, SEQ);
        let mask_id = cfg.mask_token_id.unwrap() as i64;
        let noised = forward_process(&x0, BATCH, SEQ, &draw, DEFAULT_EPS, mask_id, None).unwrap();
        Trainer {
            model: Some(model),
            opt,
            x0,
            noised,
            dev,
        }
    }

    /// One forward + backward + AdamW step, synchronised by reading one value back.
    fn step(&mut self) {
        let m = self.model.take().expect("model");
        let ids: Vec<i32> = self.noised.noisy.iter().map(|&x| x as i32).collect();
        let ids = Tensor::<Ad, 2, Int>::from_data(TensorData::new(ids, [BATCH, SEQ]), &self.dev);
        let logits = m.forward(ids, &Attention::Full);
        let loss = pretrain_loss(logits, &self.x0, &self.noised).unwrap();
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        let m = self.opt.step(1e-4, m, grads);
        let _ = m.valid().wte.weight.val().slice([0..1, 0..1]).into_data();
        self.model = Some(m);
    }
}

fn benches(c: &mut Criterion) {
    let cfg = bench_config();
    let mut g = c.benchmark_group("llada_d1024_l8_v126464_b8x512_cuda");
    g.sample_size(10);
    g.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    for (name, compute) in [
        ("forward_backward_adamw_f32", None),
        ("forward_backward_adamw_bf16_mixed", Some(FloatDType::BF16)),
    ] {
        let mut trainer = Trainer::new(&cfg, compute, device());
        // warm-up: kernel compilation / autotune happen on the first steps
        for _ in 0..3 {
            trainer.step();
        }
        g.bench_function(name, |b| b.iter(|| trainer.step()));
    }
    g.finish();
}

criterion_group!(cuda_benches, benches);
criterion_main!(cuda_benches);
