//! # mmada-train
//!
//! Training of LLaDA / MMaDA masked-diffusion models.
//!
//! * [`error`]: the one error type of a run ([`TrainError`]).
//! * [`trainer`]: the trainer core both loops share: run directory, start checks, resume,
//!   checkpoint save and the step skeleton ([`trainer::Session`]).
//! * [`recipe`]: typed YAML recipes with `--set` overrides (one parser; a file per trainer).
//! * [`data`]: the recipe's data / loss sections onto `mmada_data::Streams` (manifests →
//!   samples → seeded mixtures) and `mmada_diffusion::unified_forward_process` (noised
//!   `[t2i | lm | mmu]` batches).
//! * [`guard`]: the non-finite guard (skipped updates, `nonfinite_steps`, stop after
//!   `train.max_nonfinite_steps`, no non-finite checkpoint).
//! * [`optim`]: AdamW (PyTorch semantics), global-norm clipping, accumulation, named state.
//! * [`plan`]: the memory planner (bytes per device, line by line; `mmada-train plan`).
//! * [`plot`]: PNG training curves and sample grids from a run directory (`mmada-train plot`).
//! * [`recompute`]: activation checkpointing per transformer block
//!   (`train.activation_checkpointing`).
//! * [`schedule`]: cosine (upstream, with `min_lr_scale`), linear, constant, warmup-stable-decay.
//! * [`pretok`]: `data pretokenize` over a recipe (the tables: `mmada_data::code_table`).
//! * [`run_dir`]: run directory, atomic checkpoints, `latest`, `keep_last`.
//! * [`sft`]: the SFT loop ([`sft::Sft`]).
//! * [`dist`]: data parallelism (one thread per device, several nodes) over burn-collective.
//! * [`shard`]: batch sharding and loss scaling over ranks (SFT rows, UniGRPO prompt groups).
//! * [`unigrpo`]: the UniGRPO loop ([`unigrpo::UniGrpo`], spec §5; one file per phase).
//! * [`wandb_log`]: the wandb path both trainers share (`logging.wandb`, resume state, preempting).
//! * [`init_checkpoint`]: a freshly initialised model as a Hugging Face checkpoint.

pub mod data;
pub mod dist;
pub mod error;
pub mod guard;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod pretok;
pub mod recipe;
pub mod recompute;
pub mod run_dir;
pub mod schedule;
pub mod sft;
pub mod shard;
pub mod synth;
pub mod trainer;
pub mod unigrpo;
pub mod wandb_log;

pub use error::TrainError;

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

/// `mmada-train merge-lora`: load the Hugging Face checkpoint `base` (in f32 on the CPU),
/// apply the PEFT LoRA adapter `adapter` (an adapter directory, or a LoRA training
/// checkpoint holding `adapter/`), fold it into the weights (`W + (alpha/r)·B·A`, modules to
/// save replacing their base weights) and write a plain Hugging Face checkpoint at `out`
/// (config.json, weights in `opts.dtype`, the base's tokenizer / remote-code files).
/// Returns the adapter's settings.
///
/// # Errors
/// [`TrainError::Checkpoint`] / [`TrainError::Lora`] naming the file or tensor at fault.
pub fn merge_lora_checkpoint(
    base: &Path,
    adapter: &Path,
    out: &Path,
    opts: &SaveOptions,
) -> Result<mmada_model::lora::LoraConfig, error::TrainError> {
    let device = Default::default();
    let (cfg, model) =
        mmada_model::load_checkpoint::<mmada_model::backend::Cpu>(base, &device, FloatDType::F32)?;
    let dir = mmada_model::adapter::resolve_adapter_dir(adapter);
    let (model, lora) = mmada_model::adapter::load_adapter(model, &dir)?;
    let mut opts = opts.clone();
    if opts.copy_sidecars_from.is_none() {
        opts.copy_sidecars_from = Some(base.to_path_buf());
    }
    save_checkpoint(&model.merge_lora(), &cfg, out, &opts)?;
    Ok(lora)
}
