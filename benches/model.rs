//! Forward, forward+backward, and forward+backward+AdamW of the benchmark config
//! (d_model 256, 4 layers, 4 heads, mlp 688, vocab 58 560) at batch 4 × 256 on the CPU
//! backend (Flex); the backward benches use the LLaDA pretraining loss with 744 of the
//! 1 024 tokens masked, as training computes it. Throughput is reported in tokens/s (criterion "elements").
//! The training step runs in f32 and in bf16 mixed precision (f32 master weights and AdamW
//! state, bf16 compute: `LladaModel::with_compute_dtype`), side by side, and with the two
//! loss paths: `head_chunked` (the trainers' path: the LM head and cross-entropy only at the
//! masked positions, `MMADA_CE_CHUNK_ROWS` rows at a time — default 512, the recipes' —,
//! `mmada_diffusion::Scores::Hidden`) and
//! `full_logits` (the head at every position, `[batch, seq, vocab]` logits on the graph); and
//! `sft_head_chunked`, the PyTorch peer's step (`../shared/bench/torch_peer/bench.py`: the SFT
//! loss, prompts of seq / 4 tokens, a new noising draw each step), which `scripts/bench_train.sh`
//! compares with the peer.
//!
//! Before the timings, the peak resident memory of the training step is measured in a fresh
//! child process per precision and loss path (model + AdamW, 3 steps): `VmHWM` after vs
//! before the steps.
//!
//! The PyTorch peer at the same shapes: `scripts/bench_train.sh` (benches/README.md).
//!
//! Run: `cargo bench --bench model` (`-- adamw` for the training steps only).

use burn::backend::Autodiff;
use burn::optim::GradientsParams;
use criterion::{Criterion, Throughput, criterion_group};
use mmada_model::backend::Cpu;
use mmada_model::init::init_model;
use mmada_model::{Attention, FloatDType};

#[path = "common/rss.rs"]
mod rss;
#[path = "common/step.rs"]
mod step;

use step::{BATCH, Path, SEQ, Trainer, bench_config, ids, loss};

fn benches(c: &mut Criterion) {
    let cfg = bench_config();
    let mut g = c.benchmark_group("llada_d256_l4_v58560_b4x256");
    g.sample_size(10);
    g.throughput(Throughput::Elements((BATCH * SEQ) as u64));

    let dev = Default::default();
    let model = init_model::<Cpu>(&cfg, 0, &dev, FloatDType::F32);
    let x = ids::<Cpu>(&cfg, &dev);
    g.bench_function("forward", |b| {
        b.iter(|| model.forward(x.clone(), &Attention::Full).into_data());
    });

    let model = init_model::<Ad>(&cfg, 0, &dev, FloatDType::F32);
    for path in [Path::HeadChunked, Path::FullLogits] {
        g.bench_function(format!("forward_backward_{}", path.name()), |b| {
            b.iter(|| {
                let grads = loss(&model, &cfg, path, &dev).backward();
                GradientsParams::from_grads(grads, &model)
            });
        });
    }

    for path in [Path::HeadChunked, Path::FullLogits, Path::SftHeadChunked] {
        for (name, compute) in [
            ("forward_backward_adamw", None),
            ("forward_backward_adamw_bf16_mixed", Some(FloatDType::BF16)),
        ] {
            let mut trainer = Trainer::<Ad>::new(&cfg, compute, path);
            g.bench_function(format!("{name}_{}", path.name()), |b| {
                b.iter(|| trainer.step(&cfg))
            });
        }
    }
    g.finish();
}

type Ad = Autodiff<Cpu>;

/// Child process: build the trainer, run 3 steps, print VmHWM before and after (kB).
fn rss_child(precision: &str, path: &str) {
    let cfg = bench_config();
    let compute = (precision == "bf16-mixed").then_some(FloatDType::BF16);
    let path = [Path::HeadChunked, Path::FullLogits, Path::SftHeadChunked]
        .into_iter()
        .find(|p| p.name() == path)
        .expect("a path name");
    let mut trainer = Trainer::<Ad>::new(&cfg, compute, path);
    let before = rss::vm_hwm_kb();
    for _ in 0..3 {
        trainer.step(&cfg);
    }
    println!("{before} {}", rss::vm_hwm_kb());
}

fn report_peak_rss() {
    for path in [Path::HeadChunked, Path::FullLogits, Path::SftHeadChunked] {
        for precision in ["f32", "bf16-mixed"] {
            let out = rss::run_child("--rss-child", &[precision, path.name()]);
            let (before, after) = rss::parse_before_after(&out);
            println!(
                "training step d256 l4 b4x256 {precision} {}: peak RSS {:.0} MB over 3 steps (model alone before them: {:.0} MB; AdamW state is created by the first step)",
                path.name(),
                after as f64 * 1024.0 / 1e6,
                before as f64 * 1024.0 / 1e6,
            );
        }
    }
}

/// Large tensor buffers (≥ 1 MiB) are kept for reuse instead of being page-faulted in again at
/// every step, without the heap fragmentation of glibc's (issue 18; `mmada_host::alloc`).
#[global_allocator]
static ALLOC: mmada_host::alloc::BlockCache = mmada_host::alloc::BlockCache::new();

criterion_group!(model_benches, benches);

fn main() {
    // as the binaries do (`MMADA_KEEP_FREED_MEMORY=0` for glibc's defaults)
    mmada_model::backend::keep_freed_memory(&ALLOC);
    if let Some(args) = rss::child_args("--rss-child") {
        rss_child(&args[0], &args[1]);
        return;
    }
    // `cargo test --benches` probes with --list: no measurements then
    if !std::env::args().any(|a| a == "--list") {
        report_peak_rss();
    }
    model_benches();
    Criterion::default().configure_from_args().final_summary();
}
