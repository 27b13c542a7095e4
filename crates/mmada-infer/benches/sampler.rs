//! Criterion bench of the LLaDA block sampler on the CPU (issue 5 setting): batch 4, prompt 32,
//! 64 new tokens, 64 steps, block 32, d_model 256, 4 layers, greedy low-confidence remasking —
//! the default per-step schedule and the fast confidence-threshold mode
//! (`GenerateConfig::threshold`, Fast-dLLM) side by side.
//!
//! The vocabulary defaults to LLaDA's 126464 ids (the head dominates the cost); set
//! `MMADA_BENCH_VOCAB` for another width. A randomly initialised model is never confident
//! (p(x0) ≈ 1e-5), so the threshold mode falls back to one token per step there; the
//! "peaked" runs multiply the output head by `MMADA_BENCH_HEAD_SCALE` (default 30) to stand in
//! for a trained model whose predictions are confident, which is where the threshold mode saves
//! model calls. NFE, seconds and new tokens/s of one call of each are printed to stderr.

use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use criterion::{Criterion, criterion_group};
use mmada_model::backend::Cpu;
use mmada_model::{FloatDType, LladaModel, ModelConfig};
use mmada_sampler::{GenerateConfig, SeededRng};

const BATCH: usize = 4;
const PROMPT: usize = 32;
const THRESHOLD: f64 = 0.9;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bench(c: &mut Criterion) {
    let vocab: usize = env_or("MMADA_BENCH_VOCAB", 126_464);
    let head_scale: f64 = env_or("MMADA_BENCH_HEAD_SCALE", 30.0);
    let mut cfg = ModelConfig::tiny();
    cfg.d_model = 256;
    cfg.n_layers = 4;
    cfg.n_heads = 4;
    cfg.n_kv_heads = 4;
    cfg.mlp_hidden_size = 688;
    cfg.vocab_size = vocab;
    cfg.embedding_size = vocab;
    cfg.llm_vocab_size = Some(vocab);
    cfg.mask_token_id = Some((vocab - 1) as u32);
    let device = Default::default();
    let model = mmada_model::init::init_model::<Cpu>(&cfg, 0, &device, FloatDType::F32);
    let mut peaked = model.clone();
    peaked.ff_out.weight = peaked.ff_out.weight.map(|w| w.mul_scalar(head_scale));
    let mut gc = GenerateConfig::new((vocab - 1) as u32);
    gc.gen_length = 64;
    gc.steps = 64;
    gc.block_length = 32;
    let fast = GenerateConfig {
        threshold: Some(THRESHOLD),
        ..gc.clone()
    };
    let ids: Vec<i64> = (0..BATCH * PROMPT)
        .map(|i| (i * 7919 % (vocab - 1)) as i64)
        .collect();
    let prompt =
        || Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids.clone(), [BATCH, PROMPT]), &device);
    let run = |m: &LladaModel<Cpu>, g: &GenerateConfig| {
        mmada_sampler::generate(m, prompt(), None, g, &mut SeededRng::new(0), false)
            .expect("generate")
    };

    for (name, m, g) in [
        ("schedule, random model", &model, &gc),
        ("threshold 0.9, random model", &model, &fast),
        ("schedule, peaked head", &peaked, &gc),
        ("threshold 0.9, peaked head", &peaked, &fast),
    ] {
        let t0 = Instant::now();
        let out = run(m, g);
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "sampler [{name}]: vocab {vocab}, batch {BATCH}, prompt {PROMPT}, gen {} / steps {} / block {}: nfe {}, {:.2} s, {:.1} new tokens/s",
            g.gen_length,
            g.steps,
            g.block_length,
            out.nfe,
            secs,
            (BATCH * g.gen_length) as f64 / secs
        );
    }

    let mut group = c.benchmark_group("sampler");
    group.sample_size(10);
    group.throughput(criterion::Throughput::Elements(
        (BATCH * gc.gen_length) as u64,
    ));
    group.bench_function(
        format!("generate_b4_p32_g64_s64_blk32_d256_l4_v{vocab}"),
        |b| b.iter(|| run(&model, &gc)),
    );
    group.bench_function(
        format!("threshold0.9_peaked_b4_p32_g64_blk32_d256_l4_v{vocab}"),
        |b| b.iter(|| run(&peaked, &fast)),
    );
    group.finish();
}

/// Large tensor buffers (≥ 1 MiB) are kept for reuse instead of being page-faulted in again at
/// every step, without the heap fragmentation of glibc's (issue 18; `mmada_host::alloc`).
#[global_allocator]
static ALLOC: mmada_host::alloc::BlockCache = mmada_host::alloc::BlockCache::new();

criterion_group!(benches, bench);
fn main() {
    // as `mmada-infer` does (`MMADA_KEEP_FREED_MEMORY=0` for glibc's defaults)
    mmada_model::backend::keep_freed_memory(&ALLOC);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
