//! # mmada-model
//!
//! The LLaDA / MMaDA masked-diffusion transformer in burn, generic over the backend, with
//! Hugging Face safetensors checkpoint I/O that keeps the upstream tensor names.
//!
//! * [`config`]: `config.json` (model_type `llada` / `mmada`) and presets.
//! * [`model`]: the network ([`LladaModel`]), attention masks ([`Attention`]), the
//!   [`Denoiser`] trait used by losses and samplers.
//! * [`checkpoint`]: load / save safetensors (single or sharded; BF16 / F16 / F32). The only
//!   module that does file I/O.
//! * [`init`]: mitchell random initialisation.
//! * [`kv`]: the key/value cache of fast decoding ([`KvCache`], Fast-dLLM prefix / dual
//!   cache) and the model's cached forward.
//! * [`lora`]: LoRA adapters on the block projections; [`adapter`]: their PEFT files.
//! * [`backend`]: backend aliases and device strings.
//!
//! Source of the ported semantics: `../shared/docs/mmada-spec.md` §1 and upstream
//! `Gen-Verse/MMaDA/models/modeling_llada.py` at `3cdb870`.

pub mod adapter;
pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod init;
pub mod kv;
pub mod lora;
pub mod model;
pub mod tokens;

pub use burn::tensor::FloatDType;
pub use checkpoint::{
    CheckpointError, DiskDtype, SaveOptions, load_checkpoint, load_weights, load_weights_observed,
    save_checkpoint,
};
pub use config::{ConfigError, ModelConfig, ModelType};
pub use kv::{KvCache, KvCacheError};
pub use model::{Attention, Denoiser, HiddenStates, LladaModel, LmHead, ParamSource};
pub use tokens::TokenLayout;
