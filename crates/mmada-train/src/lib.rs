//! # mmada-train
//!
//! Training of LLaDA / MMaDA masked-diffusion models. This release provides model creation
//! ([`init_checkpoint`]); SFT, UniGRPO, run checkpoints and data parallelism land here next
//! (see `crates/README.md`).

use std::path::Path;

use mmada_model::checkpoint::SaveOptions;
use mmada_model::{CheckpointError, FloatDType, ModelConfig, save_checkpoint};

/// Create a freshly initialised (upstream "mitchell" init, seeded) model with `cfg` and save
/// it as a Hugging Face checkpoint directory at `out`. The parameters are built on the CPU
/// in f32 and written in `opts.dtype`.
///
/// # Errors
/// The checkpoint writer's errors (destination exists, I/O).
pub fn init_checkpoint(
    cfg: &ModelConfig,
    seed: u64,
    out: &Path,
    opts: &SaveOptions,
) -> Result<(), CheckpointError> {
    let device = Default::default();
    let model = mmada_model::init::init_model::<mmada_model::backend::Cpu>(
        cfg,
        seed,
        &device,
        FloatDType::F32,
    );
    save_checkpoint(&model, cfg, out, opts)
}
