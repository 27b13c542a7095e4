//! # mmada-diffusion
//!
//! The masked-diffusion forward process and training losses of LLaDA and MMaDA — no I/O.
//!
//! * [`noise`]: `t ~ U(0,1)`, `p_mask = (1 − ε)·t + ε`, independent masking with prompt
//!   protection (LLaDA GUIDELINES.md `forward_process`, spec §3.1–3.2), and MaskGIT image
//!   masking (`training/utils.py::mask_or_random_replace_tokens`, spec §3.3).
//! * [`schedule`]: the MaskGIT mask-ratio schedules (cosine, linear, powK, sigmoid) shared by
//!   t2i training and the sampler.
//! * [`loss`]: token cross-entropy with per-token weights, from which every upstream loss is
//!   built: pretraining `Σ CE/p / (B·L)`, SFT `Σ CE/(p·answer_len) / B`, the MaskGIT t2i mean,
//!   and MMaDA's unified `forward_process` over `[t2i | lm | mmu]` rows.
//! * [`unified`]: the unified forward process: plain clean rows (ids, labels, kind, lengths,
//!   seed) → one noised [`UnifiedBatch`], each row from its own seeded RNG.
//!
//! Random draws are explicit values ([`noise::MaskDraw`], [`noise::ImageMaskDraw`]) produced
//! from a seeded RNG or injected by tests, so every loss can be reproduced exactly.

pub mod grpo;
pub mod head;
pub mod loss;
pub mod noise;
pub mod schedule;
pub mod unified;

pub use head::{DEFAULT_CE_CHUNK_ROWS, Scores};
pub use loss::{
    T2iAttention, UnifiedBatch, UnifiedLoss, pretrain_loss, sft_loss, unified_loss,
    unified_loss_chunked, weighted_token_ce,
};
pub use noise::{
    ImageMaskDraw, MaskDraw, Noised, forward_process, image_mask, image_mask_with, p_mask,
};
pub use schedule::MaskSchedule;
pub use unified::{NoiseStats, PlainRow, RowKind, UnifiedNoiseConfig, unified_forward_process};

/// Errors from inconsistent inputs (lengths that do not match the batch shape).
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// A host-side array has the wrong length.
    #[error("`{what}` has {got} elements, expected {expected}")]
    Length {
        /// Which input.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The length the batch shape implies.
        expected: usize,
    },
    /// A value is out of its valid range.
    #[error("`{what}` = {value}: {why}")]
    Range {
        /// Which input.
        what: &'static str,
        /// The value.
        value: String,
        /// Why it is invalid.
        why: &'static str,
    },
}

pub(crate) fn check_len(
    what: &'static str,
    got: usize,
    expected: usize,
) -> Result<(), DiffusionError> {
    if got == expected {
        Ok(())
    } else {
        Err(DiffusionError::Length {
            what,
            got,
            expected,
        })
    }
}
