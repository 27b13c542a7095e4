//! # mmada-sampler
//!
//! Samplers for LLaDA / MMaDA masked-diffusion models, generic over the burn backend and over
//! the network through [`mmada_model::Denoiser`]. No file or network I/O; errors are typed
//! ([`SamplerError`]) and nothing is printed.
//!
//! * [`generate`](mod@generate): LLaDA semi-autoregressive block sampler (spec §4.1; upstream
//!   ML-GSAI/LLaDA `generate.py::generate`) with low-confidence / random / margin / negative-
//!   entropy rankings, f64 Gumbel temperature, classifier-free guidance, key-padding attention,
//!   the EOS/EOT options, the Fast-dLLM confidence-threshold parallel decoding, the
//!   `mmu_generate_fast` early stop and a restriction of sampled ids to the tokenizer.
//! * [`completions`]: ids-level batched generation on top of it (left padding with a pad id
//!   and a key-padding mask, answers cut at the first EOS / EOT, NFE and decoded counters),
//!   the one generation layer of `mmada-infer` and UniGRPO rollouts.
//! * [`section`]: [`SamplerSection`], the one typed sampler settings section (presets,
//!   optional keys, layering with `or`) of `mmada-infer`'s `sampling:` and UniGRPO's
//!   `rollout:`, turned into a validated [`GenerateConfig`].
//! * [`maskgit`]: MMaDA text-to-image MaskGIT sampler (spec §4.3; upstream
//!   `MMadaModelLM.t2i_generate`) with MUSE-style CFG and injectable randomness.
//! * [`loglik`]: LLaDA Monte-Carlo conditional log-likelihood (spec §4.4; upstream
//!   `get_log_likelihood.py`). architecture.md places the likelihood in `mmada-diffusion`;
//!   it stays here because it draws its masks from the sampler's randomness sources
//!   ([`UniformSource`], the fixtures' stratified draws) and shares its logits checks, and
//!   `mmada-diffusion` must not depend on the sampler (the sampler uses its schedules).
//! * [`schedule`]: `get_num_transfer_tokens` and the MaskGIT mask-ratio schedules.
//! * [`rng`]: randomness sources ([`UniformSource`], [`SeededRng`]).
//!
//! Tensor shapes are written `[batch, seq, vocab]`. Every sampler can return a per-step trace
//! so tests compare each intermediate canvas with the upstream fixtures.

#[cfg(test)]
mod cache_tests;
pub mod completions;
pub mod error;
pub mod generate;
mod host;
pub mod loglik;
pub mod maskgit;
#[cfg(test)]
mod mock_tests;
#[cfg(test)]
mod model_tests;
pub mod rng;
pub mod schedule;
pub mod section;

pub use completions::{
    Completion, Completions, generate_completions, generate_completions_observed,
};
pub use error::SamplerError;
pub use generate::{
    CacheMode, GenerateConfig, GenerateOutput, GenerateTrace, Remasking, StepEvent, generate,
    generate_observed,
};
pub use loglik::{LoglikConfig, LoglikOutput, MaskSource, StratifiedMasks, log_likelihood};
pub use maskgit::{
    MaskGitRandomness, T2iConfig, T2iInputs, T2iOutput, T2iStepEvent, T2iTrace, t2i_generate,
    t2i_generate_observed,
};
pub use rng::{SeededRng, UniformSource};
pub use schedule::{MaskSchedule, get_num_transfer_tokens};
pub use section::{Preset, SamplerSection};
