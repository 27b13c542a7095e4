//! Where the CPU training step spends its time (issue 18): the bench step of
//! `benches/model.rs` (d_model 256, 4 blocks, vocab 58 560, batch 4 × 256, f32, the
//! pretraining loss with 744 of the 1 024 tokens masked, the head in chunks) split into its
//! phases, each timed with the backend synchronised (Flex runs eagerly):
//!
//! | phase | what runs |
//! |---|---|
//! | `hidden` | embedding + 4 blocks + final norm, on the autodiff graph |
//! | `head_ce` | the chunked head + cross-entropy and its analytic gradient ([`Scores::Hidden`]) |
//! | `backward` | `loss.backward()`: the blocks' and the embedding's gradients |
//! | `grads` | `GradientsParams::from_grads` |
//! | `adamw` | `AdamW::step` over the 33 M parameters |
//!
//! Prints the median of `MMADA_PROFILE_STEPS` steps (default 7) after one warm-up step, in
//! ms and as a share of the step, and the process's peak RSS (`VmHWM`) after each phase of
//! the first two steps (the first creates AdamW's state). Run: `cargo bench --bench
//! step_profile` (`MMADA_CE_CHUNK_ROWS` sets the head's chunk rows).

use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use mmada_diffusion::{Scores, pretrain_loss, sft_loss};
use mmada_model::backend::Cpu;
use mmada_model::init::init_model;
use mmada_model::{Attention, FloatDType};
use rand::SeedableRng;

#[path = "common/rss.rs"]
#[allow(dead_code)] // only vm_hwm_kb: the phases run in this process
mod rss;
#[path = "common/step.rs"]
mod step;

use step::{BATCH, SEQ, SFT_PROMPTS, adamw, bench_config, chunk_rows, id_tensor, pretrain_batch};

/// `MMADA_PROFILE_LOSS=sft`: the peer's step (SFT loss, prompt seq / 4, a new draw each step)
/// instead of the pretraining loss on one draw.
fn sft_mode() -> bool {
    std::env::var("MMADA_PROFILE_LOSS").is_ok_and(|v| v == "sft")
}

type Ad = Autodiff<Cpu>;

/// Large tensor buffers (≥ 1 MiB) are kept for reuse instead of being page-faulted in again at
/// every step, without the heap fragmentation of glibc's (issue 18; `mmada_host::alloc`).
#[global_allocator]
static ALLOC: mmada_host::alloc::BlockCache = mmada_host::alloc::BlockCache::new();

const PHASES: [&str; 5] = ["hidden", "head_ce", "backward", "grads", "adamw"];

fn main() {
    mmada_model::backend::keep_freed_memory(&ALLOC);
    // `cargo test --benches` probes with --list: nothing to measure then
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let steps: usize = std::env::var("MMADA_PROFILE_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let cfg = bench_config();
    let dev = Default::default();
    let mut model = Some(init_model::<Ad>(&cfg, 0, &dev, FloatDType::F32));
    let mut opt = adamw::<Ad>();
    let (x0, noised) = pretrain_batch(&cfg);
    let masked = noised.masked.iter().filter(|&&m| m).count();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let (sft_mode, alloc_stats, chunk_rows) = (
        sft_mode(),
        std::env::var("MMADA_ALLOC_STATS").is_ok(),
        chunk_rows(),
    );

    let mut samples: Vec<[f64; 5]> = Vec::new();
    let start_hwm = rss::vm_hwm_kb();
    let mut hwm: Vec<[u64; 5]> = Vec::new();
    for step in 0..=steps {
        let m = model.take().unwrap();
        let mut t = [0f64; 5];
        let mut h = [0u64; 5];
        let mut clock = Instant::now();
        let mut lap = |i: usize| {
            t[i] = clock.elapsed().as_secs_f64() * 1e3;
            h[i] = rss::vm_hwm_kb();
            if alloc_stats {
                eprintln!("step {step} {}: {:?}", PHASES[i], ALLOC.stats());
            }
            clock = Instant::now();
        };
        // the SFT mode's draw for this step (the pretraining mode keeps its one draw)
        let sft = sft_mode.then(|| step::sft_batch(&cfg, &mut rng));
        let (x0, noised) = sft.as_ref().map_or((&x0, &noised), |(a, b)| (a, b));
        let x = id_tensor::<Ad>(&noised.noisy, &dev);
        let hidden = m.hidden(x, &Attention::Full);
        // synchronise: a one-element read
        let _ = hidden.clone().slice([0..1, 0..1, 0..1]).into_data();
        lap(0);
        let scores = Scores::Hidden {
            hidden,
            head: m.lm_head(),
            chunk_rows,
        };
        let loss = if sft.is_some() {
            sft_loss(scores, x0, noised, &SFT_PROMPTS).unwrap()
        } else {
            pretrain_loss(scores, x0, noised).unwrap()
        };
        let _ = loss.clone().into_data();
        lap(1);
        let g = loss.backward();
        lap(2);
        let grads = GradientsParams::from_grads(g, &m);
        lap(3);
        let m = opt.step(m, grads, 1e-4);
        let _ = m.valid().wte.weight.val().slice([0..1, 0..1]).into_data();
        lap(4);
        model = Some(m);
        hwm.push(h);
        if step > 0 {
            samples.push(t);
        }
    }
    let median = |i: usize| {
        let mut v: Vec<f64> = samples.iter().map(|s| s[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let med: Vec<f64> = (0..5).map(median).collect();
    let total: f64 = med.iter().sum();
    println!(
        "training step d256 l4 v58560 b{BATCH}x{SEQ}, {}, head chunks of {} rows, median of {steps} steps",
        if sft_mode {
            "SFT loss (prompt seq / 4, a new draw each step)".to_string()
        } else {
            format!("pretraining loss, {masked} masked rows")
        },
        chunk_rows
    );
    println!("| phase | ms | share |\n|---|---|---|");
    for (name, ms) in PHASES.iter().zip(&med) {
        println!("| {name} | {ms:.0} | {:.0} % |", 100.0 * ms / total);
    }
    println!("| step (sum of medians) | {total:.0} | 100 % |");
    let mb = |kb: u64| kb as f64 * 1024.0 / 1e6;
    println!(
        "\npeak RSS (VmHWM, MB) after each phase; model and data alone: {:.0} MB",
        mb(start_hwm)
    );
    println!("| phase | step 1 | step 2 |\n|---|---|---|");
    for (i, name) in PHASES.iter().enumerate() {
        println!("| {name} | {:.0} | {:.0} |", mb(hwm[0][i]), mb(hwm[1][i]));
    }
}
