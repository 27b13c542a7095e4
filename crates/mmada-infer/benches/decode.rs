//! Fast decoding side by side (issue 17): the LLaDA block sampler on the CPU with
//!
//! * `none, full head`: no cache, the LM head at every canvas position (the upstream loop and
//!   the PyTorch peer's: `logits = model(x).logits`, then the block is kept);
//! * `none, window head`: no cache, the head on the current window only
//!   (`Denoiser::window_logits`);
//! * `prefix`: Fast-dLLM prefix cache (refresh at block start, then the block and the suffix
//!   only);
//! * `dual`: Fast-dLLM dual cache (refresh at block start, then the block only);
//!
//! each with the fixed schedule and with threshold 0.9 decoding. Default shape (the issue's
//! bench config): d_model 256, 4 layers, vocab 126 464, batch 4, prompt 256, gen 256, block 32,
//! 64 steps; override with `MMADA_BENCH_{VOCAB,PROMPT,GEN,STEPS,BLOCK,BATCH}`. A randomly
//! initialised model is never confident, so the output head is multiplied by
//! `MMADA_BENCH_HEAD_SCALE` (default 30) in every run, to stand in for a trained model whose
//! predictions are confident (where threshold decoding saves calls; the fixed schedule costs
//! the same either way).
//!
//! One run of each variant, back to back, prints a JSON line to stdout: NFE, refreshes, cache
//! hits, seconds, new tokens/s and the speed-up over `none, full head` measured in the same
//! run (`MMADA_BENCH_ONLY="name|name"` runs the named variants only, the first as the
//! reference). `scripts/bench_decode.sh` runs this and the PyTorch peer back to back. The criterion
//! group times the three fast variants (window head, prefix, dual with threshold).

use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use criterion::{Criterion, criterion_group};
use mmada_model::backend::Cpu;
use mmada_model::{Attention, Denoiser, FloatDType, LladaModel, ModelConfig};
use mmada_sampler::{CacheMode, GenerateConfig, SeededRng};

/// The model with the trait's default `window_logits`: the head at every position, then the
/// window narrowed (the uncached upstream loop).
struct FullHead<'a>(&'a LladaModel<Cpu>);

impl Denoiser<Cpu> for FullHead<'_> {
    fn logits(&self, ids: Tensor<Cpu, 2, Int>, attention: &Attention<Cpu>) -> Tensor<Cpu, 3> {
        self.0.forward(ids, attention)
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bench(c: &mut Criterion) {
    let vocab: usize = env_or("MMADA_BENCH_VOCAB", 126_464);
    let prompt_len: usize = env_or("MMADA_BENCH_PROMPT", 256);
    let gen_length: usize = env_or("MMADA_BENCH_GEN", 256);
    let steps: usize = env_or("MMADA_BENCH_STEPS", 64);
    let block: usize = env_or("MMADA_BENCH_BLOCK", 32);
    let batch: usize = env_or("MMADA_BENCH_BATCH", 4);
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
    cfg.max_sequence_length = prompt_len + gen_length;
    cfg.mask_token_id = Some((vocab - 1) as u32);
    let device = Default::default();
    let mut model = mmada_model::init::init_model::<Cpu>(&cfg, 0, &device, FloatDType::F32);
    model.ff_out.weight = model.ff_out.weight.map(|w| w.mul_scalar(head_scale));
    let base = GenerateConfig {
        gen_length,
        steps,
        block_length: block,
        ..GenerateConfig::new((vocab - 1) as u32)
    };
    let ids: Vec<i64> = (0..batch * prompt_len)
        .map(|i| (i * 7919 % (vocab - 1)) as i64)
        .collect();
    let prompt = || {
        Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids.clone(), [batch, prompt_len]), &device)
    };
    let run = |d: &dyn Denoiser<Cpu>, g: &GenerateConfig| {
        mmada_sampler::generate(d, prompt(), None, g, &mut SeededRng::new(0), false)
            .expect("generate")
    };
    let with = |cache: CacheMode, threshold: Option<f64>| GenerateConfig {
        cache,
        threshold,
        ..base.clone()
    };
    let full = FullHead(&model);
    let variants: Vec<(&str, &dyn Denoiser<Cpu>, GenerateConfig)> = vec![
        ("none, full head", &full, with(CacheMode::None, None)),
        ("none, window head", &model, with(CacheMode::None, None)),
        ("prefix", &model, with(CacheMode::Prefix, None)),
        ("dual", &model, with(CacheMode::Dual, None)),
        (
            "none, full head, threshold 0.9",
            &full,
            with(CacheMode::None, Some(0.9)),
        ),
        (
            "none, window head, threshold 0.9",
            &model,
            with(CacheMode::None, Some(0.9)),
        ),
        (
            "prefix, threshold 0.9",
            &model,
            with(CacheMode::Prefix, Some(0.9)),
        ),
        (
            "dual, threshold 0.9",
            &model,
            with(CacheMode::Dual, Some(0.9)),
        ),
    ];
    // `MMADA_BENCH_ONLY="none, window head|prefix, threshold 0.9"`: these variants only
    let only: Option<Vec<String>> = std::env::var("MMADA_BENCH_ONLY")
        .ok()
        .map(|o| o.split('|').map(str::to_string).collect());
    // a short warm-up call (thread pool, allocator)
    let _ = run(
        &model,
        &GenerateConfig {
            steps: gen_length / block,
            ..base.clone()
        },
    );
    let mut reference: Option<f64> = None;
    for (name, d, g) in &variants {
        if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == name)) {
            continue;
        }
        let t0 = Instant::now();
        let out = run(*d, g);
        let secs = t0.elapsed().as_secs_f64();
        let tps = (batch * gen_length) as f64 / secs;
        let speedup = reference.map(|r| tps / r);
        if reference.is_none() {
            reference = Some(tps);
        }
        println!(
            "{}",
            serde_json::json!({
                "impl": "mmada-rs",
                "variant": name,
                "vocab": vocab, "batch": batch, "prompt_len": prompt_len,
                "gen_length": gen_length, "steps": steps, "block_length": block,
                "nfe": out.nfe, "refreshes": out.refreshes, "cache_hits": out.cache_hits,
                "tokens_per_forward": out.tokens_per_forward(batch),
                "positions_per_row": out.positions,
                "seconds": secs,
                "gen_tokens_per_s": tps,
                "speedup_vs_first": speedup,
            })
        );
    }

    let mut group = c.benchmark_group("decode");
    group.sample_size(10);
    group.throughput(criterion::Throughput::Elements((batch * gen_length) as u64));
    for (name, d, g) in variants.iter().skip(5) {
        let id = format!(
            "{}_b{batch}_p{prompt_len}_g{gen_length}_blk{block}_v{vocab}",
            name.replace([',', ' ', '.'], "_")
        );
        group.bench_function(id, |b| b.iter(|| run(*d, g)));
    }
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
