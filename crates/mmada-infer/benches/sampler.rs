//! Criterion bench of the LLaDA block sampler on the CPU (issue 5 setting): batch 4, prompt 32,
//! 64 new tokens, 64 steps, block 32, d_model 256, 4 layers, greedy low-confidence remasking.
//!
//! The vocabulary defaults to LLaDA's 126464 ids (the head dominates the cost); set
//! `MMADA_BENCH_VOCAB` for another width. New tokens/s and NFE of one call are printed to stderr.

use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use mmada_model::backend::Cpu;
use mmada_model::{FloatDType, ModelConfig};
use mmada_sampler::{GenerateConfig, SeededRng};

const BATCH: usize = 4;
const PROMPT: usize = 32;

fn bench(c: &mut Criterion) {
    let vocab: usize = std::env::var("MMADA_BENCH_VOCAB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(126_464);
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
    let mut gc = GenerateConfig::new((vocab - 1) as u32);
    gc.gen_length = 64;
    gc.steps = 64;
    gc.block_length = 32;
    let ids: Vec<i64> = (0..BATCH * PROMPT)
        .map(|i| (i * 7919 % (vocab - 1)) as i64)
        .collect();
    let prompt =
        || Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids.clone(), [BATCH, PROMPT]), &device);

    let t0 = Instant::now();
    let out = mmada_sampler::generate(&model, prompt(), None, &gc, &mut SeededRng::new(0), false)
        .expect("generate");
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "sampler: vocab {vocab}, batch {BATCH}, prompt {PROMPT}, gen {} / steps {} / block {}: nfe {}, {:.2} s, {:.1} new tokens/s",
        gc.gen_length,
        gc.steps,
        gc.block_length,
        out.nfe,
        secs,
        (BATCH * gc.gen_length) as f64 / secs
    );

    let mut g = c.benchmark_group("sampler");
    g.sample_size(10);
    g.throughput(criterion::Throughput::Elements(
        (BATCH * gc.gen_length) as u64,
    ));
    g.bench_function(
        format!("generate_b4_p32_g64_s64_blk32_d256_l4_v{vocab}"),
        |b| {
            b.iter(|| {
                mmada_sampler::generate(&model, prompt(), None, &gc, &mut SeededRng::new(0), false)
                    .expect("generate")
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
