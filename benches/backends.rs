//! CPU backends side by side (issue 18, item 3): burn Flex (our CPU default), burn's ndarray
//! backend (its own `matrixmultiply`, or OpenBLAS with `--features openblas`) and burn-candle,
//! at the shapes of the training-step bench (`benches/model.rs`: d_model 256, 4 blocks, mlp
//! 688, vocab 58 560, batch 4 × 256, f32):
//!
//! * matmul GFLOP/s at the step's five matmul shapes (`m×k×n`): the head forward of a 256-row
//!   chunk (`256×256×58560`), its weight gradient (`256×58560×256`, k = vocab), the MLP up and
//!   down projections over the batch (`1024×256×688`, `1024×688×256`) and a 512-row head chunk;
//! * milliseconds of the element-wise and reduction ops of the profile on one head chunk
//!   `[256, 58560]`: `exp`, `add`, `mul_scalar`, `sum_dim`, `max_dim`, `log_softmax`;
//! * the whole training step (forward + backward + AdamW, the chunked-head pretraining loss of
//!   `benches/model.rs`) on each backend, seconds per step (median of `MMADA_PROBE_STEPS`,
//!   default 3, after one warm-up step).
//!
//! One JSON line per measurement on stdout. A backend that cannot run an op (panics) gets an
//! `"error"` field for it instead of a figure. `scripts/bench_backends.sh` runs this and the
//! same matmuls in PyTorch and numpy (OpenBLAS) back to back and prints one table.
//!
//! Run: `cargo bench --features backends --bench backends` (OpenBLAS: `--features openblas`,
//! which needs the system library, Debian `libopenblas-dev`). Threads: `RAYON_NUM_THREADS`
//! (Flex, ndarray's matrixmultiply), `OPENBLAS_NUM_THREADS` (OpenBLAS); candle uses its own
//! pool (`RAYON_NUM_THREADS` too).

#![allow(deprecated)] // burn-candle is deprecated upstream; measured here as the issue asks

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use burn_candle::Candle;
use burn_ndarray::NdArray;
use mmada_model::FloatDType;
use mmada_model::init::init_model;

#[path = "common/step.rs"]
mod step;

/// The five matmul shapes `(m, k, n)` of the training step.
const SHAPES: [(usize, usize, usize); 5] = [
    (256, 256, 58_560),
    (256, 58_560, 256),
    (1024, 256, 688),
    (1024, 688, 256),
    (512, 256, 58_560),
];

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `f`, turning a panic into its message.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}

/// Median seconds of `reps` calls of `f` after one warm-up call; `f` must force its result.
fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Forces a tensor's computation (a lazy backend computes it; an eager one already has).
fn force<B: Backend, const D: usize>(t: Tensor<B, D>) {
    let _ = t.into_data();
}

fn emit(backend: &str, what: &str, shape: &str, value: Result<(&str, f64), String>) {
    let line = match value {
        Ok((unit, v)) => serde_json::json!({
            "impl": "burn", "backend": backend, "op": what, "shape": shape, unit: v,
        }),
        Err(e) => serde_json::json!({
            "impl": "burn", "backend": backend, "op": what, "shape": shape, "error": e,
        }),
    };
    println!("{line}");
}

/// Matmul GFLOP/s and element-wise / reduction milliseconds on backend `B`.
fn ops<B: Backend>(name: &str, device: &B::Device) {
    for (m, k, n) in SHAPES {
        let r = guarded(|| {
            let a = Tensor::<B, 2>::random([m, k], Distribution::Default, device);
            let b = Tensor::<B, 2>::random([k, n], Distribution::Default, device);
            let s = median_secs(5, || force(a.clone().matmul(b.clone())));
            ("gflops", 2.0 * (m * k * n) as f64 / s / 1e9)
        });
        emit(name, "matmul", &format!("{m}x{k}x{n}"), r);
    }
    let shape = [256, 58_560];
    let x = Tensor::<B, 2>::random(shape, Distribution::Default, device);
    let y = Tensor::<B, 2>::random(shape, Distribution::Default, device);
    type Op<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let list: Vec<Op<'_>> = vec![
        ("exp", Box::new(|| force(x.clone().exp()))),
        ("add", Box::new(|| force(x.clone() + y.clone()))),
        ("mul_scalar", Box::new(|| force(x.clone().mul_scalar(0.5)))),
        ("sum_dim", Box::new(|| force(x.clone().sum_dim(1)))),
        ("max_dim", Box::new(|| force(x.clone().max_dim(1)))),
        ("log_softmax", Box::new(|| force(log_softmax(x.clone(), 1)))),
    ];
    for (op, f) in &list {
        let r = guarded(|| ("ms", median_secs(5, f) * 1e3));
        emit(name, op, "256x58560", r);
    }
}

/// Large tensor buffers (≥ 1 MiB) are kept for reuse instead of being page-faulted in again at
/// every step, without the heap fragmentation of glibc's (issue 18; `mmada_host::alloc`).
#[global_allocator]
static ALLOC: mmada_host::alloc::BlockCache = mmada_host::alloc::BlockCache::new();

/// Seconds per training step (median of `MMADA_PROBE_STEPS` after one warm-up step).
fn train_step<B: AutodiffBackend>(name: &str, device: &B::Device) {
    let r = guarded(|| {
        let cfg = step::bench_config();
        let model = init_model::<B>(&cfg, 0, device, FloatDType::F32);
        let mut trainer = step::Trainer::<B>::from_model(model, step::Path::HeadChunked);
        let s = median_secs(env_or("MMADA_PROBE_STEPS", 3), || trainer.step(&cfg));
        ("seconds", s)
    });
    emit(name, "train_step", "d256_l4_v58560_b4x256_head_chunked", r);
}

fn main() {
    mmada_model::backend::keep_freed_memory(&ALLOC);
    // `cargo test --benches` probes with --list: no measurements then
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let only =
        std::env::var("MMADA_PROBE_BACKENDS").unwrap_or_else(|_| "flex,ndarray,candle".into());
    let ndarray = if cfg!(feature = "openblas") {
        "ndarray+openblas"
    } else {
        "ndarray"
    };
    for b in only.split(',') {
        match b.trim() {
            "flex" => {
                ops::<Flex>("flex", &Default::default());
                train_step::<Autodiff<Flex>>("flex", &Default::default());
            }
            "ndarray" => {
                ops::<NdArray>(ndarray, &Default::default());
                train_step::<Autodiff<NdArray>>(ndarray, &Default::default());
            }
            "candle" => {
                ops::<Candle>("candle", &Default::default());
                train_step::<Autodiff<Candle>>("candle", &Default::default());
            }
            other => eprintln!(
                "unknown backend {other:?} in MMADA_PROBE_BACKENDS (flex, ndarray, candle)"
            ),
        }
    }
}
