//! The one error type of a training run ([`TrainError`]), wrapping the typed errors of every
//! crate a run touches, each of which names its file, key, tensor or row.

use std::path::PathBuf;

/// Any error of a training run (SFT or UniGRPO), with the context that names its source.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Recipe problem.
    #[error(transparent)]
    Recipe(#[from] crate::recipe::RecipeError),
    /// Data problem.
    #[error(transparent)]
    Data(#[from] crate::data::TrainDataError),
    /// Tokenizer or data-crate problem.
    #[error(transparent)]
    DataCrate(#[from] mmada_data::DataError),
    /// Model checkpoint problem.
    #[error(transparent)]
    Checkpoint(#[from] mmada_model::CheckpointError),
    /// Model config problem.
    #[error(transparent)]
    Config(#[from] mmada_model::ConfigError),
    /// LoRA adapter problem (settings, adapter files).
    #[error(transparent)]
    Lora(#[from] mmada_model::lora::LoraError),
    /// Optimizer state problem.
    #[error(transparent)]
    Optim(#[from] crate::optim::OptimStateError),
    /// Run directory problem.
    #[error(transparent)]
    RunDir(#[from] crate::run_dir::RunDirError),
    /// Loss inputs inconsistent.
    #[error(transparent)]
    Diffusion(#[from] mmada_diffusion::DiffusionError),
    /// The tokenizer does not fit the model.
    #[error("tokenizer {tokenizer} does not fit the model: {message}")]
    Mismatch {
        /// Tokenizer path.
        tokenizer: String,
        /// What differs and how to fix it.
        message: String,
    },
    /// Data-parallel machinery (collective timeout, diverged replicas, bad flags).
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
    /// A file of the run (metrics, tokenizer copy) could not be written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The rollout sampler refused its settings or inputs (`rollout:`).
    #[error("rollout: {0}")]
    Rollout(#[from] mmada_sampler::SamplerError),
    /// A reward function failed or is misconfigured (`reward_funcs`).
    #[error("reward_funcs: {0}")]
    Reward(String),
    /// The non-finite guard stopped the run ([`crate::guard`]).
    #[error(transparent)]
    NonFinite(#[from] crate::guard::NonFiniteError),
    /// Anything else, with its context.
    #[error("{0}")]
    Other(String),
}

impl TrainError {
    /// A [`TrainError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        TrainError::Io {
            path: path.into(),
            message: e.to_string(),
        }
    }
}
