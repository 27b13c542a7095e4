//! Activation memory of one training step (forward + backward) with and without activation
//! checkpointing, each in a fresh child process (peak RSS = `VmHWM`).
//!
//! Modes:
//! * `plain`: `Autodiff<Flex>` (burn's `NoCheckpointing`), every block's graph kept;
//! * `burn_balanced`: `Autodiff<Flex, BalancedCheckpointing>`, burn 0.21's own strategy
//!   (recomputes memory-bound ops, keeps compute-bound ones such as matmul outputs);
//! * `per_block`: `mmada_train::recompute::Recompute` (`train.activation_checkpointing`):
//!   block inputs only, one block recomputed at a time in the backward.
//!
//! Config: d_model 512, 8 blocks, 8 heads, mlp 1376, 2 rows × 1024 positions, vocab 384 (so
//! the LM head is negligible and the blocks dominate). The step's memory is the child's peak
//! RSS after the step minus its peak before it (weights built); the gradients
//! (params × 4 B) are part of it in every mode, and are subtracted for the activation figure.
//!
//! Run: `cargo bench --bench activation_memory` (or build with `cargo test --workspace
//! --bench activation_memory --no-run` and run the binary from `target/debug/deps`).

use std::time::Instant;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use mmada_model::backend::Cpu;
use mmada_model::model::{Attention, HiddenStates};
use mmada_model::{FloatDType, LladaModel, ModelConfig};
use mmada_train::recompute::Recompute;

#[path = "common/rss.rs"]
#[allow(dead_code)] // parse_before_after: this bench reports three values
mod rss;
use rss::vm_hwm_kb;

const ROWS: usize = 2;
const SEQ: usize = 1024;

fn config() -> ModelConfig {
    ModelConfig {
        d_model: 512,
        n_layers: 8,
        n_heads: 8,
        n_kv_heads: 8,
        mlp_hidden_size: 1376,
        max_sequence_length: SEQ,
        ..ModelConfig::tiny()
    }
}

/// A loss over every position's log-probabilities (as the masked-diffusion losses at t → 1).
fn loss<B: AutodiffBackend, M: HiddenStates<B>>(m: &M) -> Tensor<B, 1> {
    let ids: Vec<i64> = (0..ROWS * SEQ).map(|i| (i * 37 % 300) as i64).collect();
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [ROWS, SEQ]), &Default::default());
    let logits = m.lm_head().logits3(m.hidden(ids, &Attention::Full));
    log_softmax(logits, 2).slice([0..ROWS, 0..SEQ, 0..8]).mean()
}

fn step<B: AutodiffBackend>(per_block: bool) -> (u64, u64, f64, usize) {
    let cfg = config();
    let model: LladaModel<B> =
        mmada_model::init::init_model(&cfg, 0, &Default::default(), FloatDType::F32);
    let before = vm_hwm_kb();
    let t = Instant::now();
    let grads = if per_block {
        let r = Recompute::new(&model);
        let l = loss(&r);
        r.backward(l)
    } else {
        GradientsParams::from_grads(loss(&model).backward(), &model)
    };
    let secs = t.elapsed().as_secs_f64();
    let after = vm_hwm_kb();
    (before, after, secs, grads.len())
}

fn main() {
    if let Some(args) = rss::child_args("--child") {
        let (before, after, secs, n) = match args[0].as_str() {
            "plain" => step::<Autodiff<Cpu>>(false),
            "burn_balanced" => step::<Autodiff<Cpu, BalancedCheckpointing>>(false),
            "per_block" => step::<Autodiff<Cpu>>(true),
            m => panic!("unknown mode {m}"),
        };
        assert_eq!(n, 8 * 9 + 3, "every parameter has a gradient");
        println!("{before} {after} {secs}");
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list
    }
    let cfg = config();
    let grads_mib = cfg.num_params() as f64 * 4.0 / 1048576.0;
    println!(
        "d_model {}, {} blocks, {} heads, mlp {}, {ROWS} × {SEQ} positions, {:.1} M params (gradients {grads_mib:.0} MiB)",
        cfg.d_model,
        cfg.n_layers,
        cfg.n_heads,
        cfg.mlp_hidden_size,
        cfg.num_params() as f64 / 1e6
    );
    println!("| mode | step peak − before (MiB) | activations (− gradients, MiB) | step s |");
    println!("|---|---|---|---|");
    for mode in ["plain", "burn_balanced", "per_block"] {
        let text = rss::run_child("--child", &[mode]);
        let v: Vec<f64> = text
            .split_whitespace()
            .map(|x| x.parse().expect("number"))
            .collect();
        let step = (v[1] - v[0]) / 1024.0;
        println!(
            "| {mode} | {step:.0} | {:.0} | {:.2} |",
            step - grads_mib,
            v[2]
        );
    }
}
