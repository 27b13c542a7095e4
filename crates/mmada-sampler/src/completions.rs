//! Ids-level batched generation: prompts of any lengths in, one [`Completion`] per prompt out.
//!
//! The one generation layer of `mmada-infer` (`generate`, `eval`) and UniGRPO rollouts
//! (architecture.md, "The next shape"): left padding with a pad id and a key-padding mask,
//! one [`generate`] call, the canvas read back and each answer cut at its first stop id
//! (EOS / EOT), with the counters (NFE, blocks, decoded positions) a caller reports.

use burn::tensor::backend::Backend;
use mmada_model::Denoiser;

use crate::generate::{GenerateConfig, StepEvent, generate_observed};
use crate::rng::UniformSource;
use crate::{SamplerError, host};

/// The answer to one prompt of a [`generate_completions`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The generated ids up to, excluding, the first id of `stop_ids` (all of
    /// [`Completion::generated`] when none occurs).
    pub ids: Vec<u32>,
    /// All `gen_length` generated ids of the canvas (the positions after the prompt), stop ids
    /// included; after an early stop the undecoded blocks hold `mask_id`.
    pub generated: Vec<u32>,
    /// A stop id was found in [`Completion::generated`] (the answer ended on its own rather
    /// than being cut by `gen_length`).
    pub terminated: bool,
    /// Length of this row's own prompt (without the left padding).
    pub prompt_len: usize,
}

/// Result of [`generate_completions`]: one [`Completion`] per prompt, in order, and the
/// counters of the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Completions {
    /// One completion per prompt, in the order of the prompts.
    pub rows: Vec<Completion>,
    /// Denoiser evaluations of the batch ([`crate::GenerateOutput::nfe`]; with CFG each runs a
    /// `2B` batch).
    pub nfe: usize,
    /// Blocks decoded ([`crate::GenerateOutput::blocks`]): `gen_length / block_length` unless
    /// [`GenerateConfig::early_stop`] ended the batch sooner.
    pub blocks: usize,
    /// Generated positions actually decoded per row: `min(blocks · block_length, gen_length)`,
    /// so `gen_length` without an early stop. Throughput (tokens/s) counts `rows · decoded`.
    pub decoded: usize,
    /// Canvas prompt width `Lp`: the longest prompt, to which the others are left-padded.
    pub padded_len: usize,
    /// Wall time of the call (padding, sampling, reading the canvas back), seconds.
    pub seconds: f64,
    /// Forwards that refreshed the key/value cache ([`crate::GenerateOutput::refreshes`]).
    pub refreshes: usize,
    /// Forwards run against the cache ([`crate::GenerateOutput::cache_hits`]).
    pub cache_hits: usize,
    /// Canvas positions per row run through the network over all forwards
    /// ([`crate::GenerateOutput::positions`]).
    pub positions: usize,
    /// Tokens committed over all rows ([`crate::GenerateOutput::committed`]).
    pub committed: usize,
}

impl Completions {
    /// Tokens committed per row per denoiser call ([`crate::GenerateOutput::tokens_per_forward`]).
    pub fn tokens_per_forward(&self) -> f64 {
        if self.nfe == 0 || self.rows.is_empty() {
            0.0
        } else {
            self.committed as f64 / (self.rows.len() * self.nfe) as f64
        }
    }
}

/// Generates one completion per prompt in a single batch with [`generate`].
///
/// * `prompts`: token ids per row, of any lengths (at least one row, the longest non-empty).
///   Shorter rows are **left**-padded with `pad_id` to the longest length `Lp` and a
///   key-padding mask `[B, Lp]` (`false` on the padding) is passed, as LLaDA's batched
///   evaluation does; when every row has the same length no mask is passed (full attention),
///   so a batch of equal-length rows gives exactly the ids of `generate(prompt, None, …)`.
///   With a key-padding mask a row's answer equals the answer to that prompt alone (batch
///   invariance, up to float rounding of the backend).
/// * `config`: the sampler settings ([`GenerateConfig`], validated by [`generate`]).
/// * `stop_ids`: ids that end an answer (usually `[eos_id, eot_id]`); each row is cut before
///   the first of them ([`Completion::ids`]).
/// * `pad_id`: left padding id; must differ from `config.mask_id` when rows differ in length.
/// * `rng`: the randomness of [`generate`] (Gumbel noise, random remasking), drawn for the
///   whole batch.
/// * `device`: where the prompt tensor is created (the model's device).
///
/// # Errors
/// [`SamplerError::Shape`] for no prompts or only empty ones; every error of [`generate`]
/// ([`SamplerError::PadIsMask`] when padding is needed and `pad_id == mask_id`);
/// [`SamplerError::Data`] when the canvas holds an id that is not a `u32`.
pub fn generate_completions<B, D>(
    model: &D,
    prompts: &[Vec<u32>],
    config: &GenerateConfig,
    stop_ids: &[u32],
    pad_id: u32,
    rng: &mut dyn UniformSource,
    device: &B::Device,
) -> Result<Completions, SamplerError>
where
    B: Backend,
    D: Denoiser<B> + ?Sized,
{
    generate_completions_observed(
        model,
        prompts,
        config,
        stop_ids,
        pad_id,
        rng,
        device,
        &mut |_| {},
    )
}

/// [`generate_completions`] with `observer` called after every denoising step
/// ([`crate::generate_observed`]); row `r` of the canvas is prompt `r`, left-padded to
/// [`StepEvent::prompt_len`].
///
/// # Errors
/// Those of [`generate_completions`].
#[allow(clippy::too_many_arguments)]
pub fn generate_completions_observed<B, D>(
    model: &D,
    prompts: &[Vec<u32>],
    config: &GenerateConfig,
    stop_ids: &[u32],
    pad_id: u32,
    rng: &mut dyn UniformSource,
    device: &B::Device,
    observer: &mut dyn FnMut(&StepEvent<'_>),
) -> Result<Completions, SamplerError>
where
    B: Backend,
    D: Denoiser<B> + ?Sized,
{
    let t0 = std::time::Instant::now();
    let b = prompts.len();
    let lp = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if b == 0 || lp == 0 {
        return Err(SamplerError::Shape {
            input: "prompts",
            got: vec![b, lp],
            expected: "[batch >= 1, prompt_len >= 1] (at least one non-empty prompt)".into(),
        });
    }
    let mut ids = Vec::with_capacity(b * lp);
    let mut keep = Vec::with_capacity(b * lp);
    for p in prompts {
        let k = lp - p.len();
        ids.extend(std::iter::repeat_n(i64::from(pad_id), k));
        ids.extend(p.iter().map(|&t| i64::from(t)));
        keep.extend(std::iter::repeat_n(false, k));
        keep.extend(std::iter::repeat_n(true, p.len()));
    }
    let prompt = host::int_tensor::<B>(&ids, b, lp, device);
    let mask = keep
        .iter()
        .any(|k| !k)
        .then(|| host::bool_tensor2::<B>(keep, [b, lp], device));
    let out = generate_observed(model, prompt, mask, config, rng, false, observer)?;
    let canvas = host::ints(out.ids)?;
    let total = lp + config.gen_length;
    let rows = prompts
        .iter()
        .enumerate()
        .map(|(r, p)| {
            let generated = canvas[r * total + lp..(r + 1) * total]
                .iter()
                .map(|&t| {
                    u32::try_from(t)
                        .map_err(|_| SamplerError::Data(format!("id {t} in the canvas of row {r}")))
                })
                .collect::<Result<Vec<u32>, _>>()?;
            let end = generated.iter().position(|t| stop_ids.contains(t));
            Ok(Completion {
                ids: generated[..end.unwrap_or(generated.len())].to_vec(),
                terminated: end.is_some(),
                generated,
                prompt_len: p.len(),
            })
        })
        .collect::<Result<Vec<_>, SamplerError>>()?;
    Ok(Completions {
        rows,
        nfe: out.nfe,
        blocks: out.blocks,
        decoded: (out.blocks * config.block_length).min(config.gen_length),
        padded_len: lp,
        seconds: t0.elapsed().as_secs_f64(),
        refreshes: out.refreshes,
        cache_hits: out.cache_hits,
        positions: out.positions,
        committed: out.committed,
    })
}
