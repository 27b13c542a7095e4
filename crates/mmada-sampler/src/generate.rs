//! LLaDA semi-autoregressive block sampler (spec §4.1).
//!
//! Port of ML-GSAI/LLaDA `generate.py::generate` (commit `b7e6c35`), identical in logic to
//! MMaDA `generate.py` and `MMadaModelLM.mmu_generate` (the latter computes the confidence
//! softmax in float64: [`GenerateConfig::confidence_f64`]).
//!
//! The canvas `x` (`[batch, prompt_len + gen_length]`) lives on the host; each step sends it to
//! the device, runs the denoiser on the **full** canvas (no KV cache, as upstream; or, with
//! [`GenerateConfig::cache`], only the current block — and the suffix for the prefix cache —
//! against keys and values refreshed at the block start, Fast-dLLM) and reads back
//! only `[batch, window]` reductions (argmax ids and confidences) of the window of positions
//! that can be unmasked in this step — the current block, extended to the left when earlier
//! positions are still masked (a prompt that contains the mask id). Positions outside that window
//! have confidence `-inf` upstream and can never be selected, so the results are identical.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, FloatDType, Int, Tensor, TensorData};
use mmada_model::{Attention, Denoiser, KvCache, TokenLayout};
use serde::{Deserialize, Serialize};

use crate::SamplerError;
use crate::host;
use crate::rng::UniformSource;
use crate::schedule::get_num_transfer_tokens;

/// How the positions to unmask at a step are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Remasking {
    /// Confidence = `softmax(logits)[x0]`; the most confident predictions are committed, the
    /// low-confidence ones stay masked (upstream `'low_confidence'`).
    #[default]
    LowConfidence,
    /// Confidence ~ `U(0, 1)` per position (upstream `'random'`).
    Random,
    /// Confidence = `p₁ − p₂`, the gap between the two largest probabilities of
    /// `softmax(logits)` at the position (independent of the sampled `x0`). Upstream:
    /// Gen-Verse/dLLM-RL `sample/llada_rl_rollout.py::get_transfer_index` (`target =
    /// 'margin_confidence'`) and Dream / Fast-dLLM `dream/model/generation_utils_block.py::
    /// sample_tokens` (`margin_confidence`).
    Margin,
    /// Confidence = negative entropy `Σ_v p_v · ln(p_v + 1e-10)` of `softmax(logits)` (≤ 0; a
    /// peaked distribution is the most confident). Upstream: Dream / Fast-dLLM
    /// `dream/model/generation_utils_block.py::sample_tokens` (`neg_entropy`). dLLM-RL's
    /// `'neg_entropy'` target computes `−Σ p ln(p + 1e-10)` (the entropy itself, despite its
    /// comment), which would commit the *least* certain positions first; the Dream sign is used.
    Entropy,
}

/// Which keys and values a decoding step reuses (NVlabs/Fast-dLLM `llada/generate.py`:
/// `generate_with_prefix_cache`, `generate_with_dual_cache`). Every block starts with a
/// refresh: one uncached forward of the whole canvas that also fills the cache
/// ([`Denoiser::window_logits_caching`]); the other steps of the block run only their query
/// positions against it ([`Denoiser::window_logits_cached`]). LLaDA attends bidirectionally,
/// so a cached step is an approximation (the cached positions do not see the tokens unmasked
/// since the refresh); [`GenerateConfig::refresh_every`] `= 1` is the uncached sampler exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Every step runs the whole canvas (upstream LLaDA `generate.py`).
    #[default]
    None,
    /// Queries = the current window and every position after it; the prefix (prompt and
    /// decoded blocks) comes from the cache.
    Prefix,
    /// Queries = the current window only; the prefix and the masked suffix come from the cache.
    Dual,
}

fn default_128() -> usize {
    128
}

/// Parameters of [`generate`]. Deserialisable from a recipe (unknown fields are rejected,
/// omitted fields take the upstream defaults of `generate.py::generate`). All token ids are
/// fields: nothing is hard-coded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    /// Total number of denoising steps over all blocks (default 128). Must be a multiple of the
    /// number of blocks `gen_length / block_length`.
    #[serde(default = "default_128")]
    pub steps: usize,
    /// Number of generated positions `G` appended to the prompt (default 128).
    #[serde(default = "default_128")]
    pub gen_length: usize,
    /// Block length for semi-autoregressive decoding (default 128; `== gen_length` is pure
    /// diffusion). Must divide `gen_length`.
    #[serde(default = "default_128")]
    pub block_length: usize,
    /// Gumbel temperature (default 0 = greedy argmax). `> 0` samples from `softmax(logits/T)`
    /// with the float64 Gumbel trick of upstream `add_gumbel_noise`.
    #[serde(default)]
    pub temperature: f64,
    /// Classifier-free guidance scale (default 0 = off). Unconditional branch = the canvas with
    /// every original prompt position replaced by `mask_id`; `logits = un + (cfg + 1)(cond − un)`.
    #[serde(default)]
    pub cfg_scale: f64,
    /// Ranking of the positions to unmask (default `low_confidence`).
    #[serde(default)]
    pub remasking: Remasking,
    /// The mask token id (`<|mdm_mask|>`, 126336 in the released checkpoints). Required.
    pub mask_id: u32,
    /// Set the logit of `eos_id` to `-inf` everywhere before sampling (upstream
    /// `logits_eos_inf`, which hard-codes 126081). Requires `eos_id`.
    #[serde(default)]
    pub logits_eos_inf: bool,
    /// Upstream `confidence_eos_eot_inf`, ported exactly: the chained assignment
    /// `logits_with_noise[:, :, eos] = logits[:, :, eot] = -inf` only affects the confidence
    /// softmax through `eot_id` (its probability becomes 0, so a predicted EOT gets confidence 0);
    /// the EOS assignment to the already-used noisy logits has no effect. Requires `eot_id`.
    #[serde(default)]
    pub confidence_eos_eot_inf: bool,
    /// End-of-sequence id (`<|endoftext|>`, 126081 upstream). Needed by `logits_eos_inf`.
    #[serde(default)]
    pub eos_id: Option<u32>,
    /// End-of-turn id (`<|eot_id|>`, 126348 upstream). Needed by `confidence_eos_eot_inf`.
    #[serde(default)]
    pub eot_id: Option<u32>,
    /// Compute the confidence softmax in float64 (MMaDA `mmu_generate`, `app.py`, dLLM-RL)
    /// instead of the logits dtype (LLaDA `generate.py` since 2025-06; default `false`).
    #[serde(default)]
    pub confidence_f64: bool,
    /// Ids that may be sampled: the logits are cut to the first `sample_vocab` entries and the
    /// logit of `mask_id` is set to `-inf` before sampling and before the confidence softmax, so
    /// no generated id lies outside the tokenizer (LLaDA's head has 126464 rows for 126349
    /// tokenizer ids; MMaDA's head also covers the image codes) or equals the mask id. Set it
    /// to the tokenizer's length. `None` (default) = the whole head, as upstream (which can
    /// sample the mask id or an id without a token). Must be `<=` the logits width and
    /// `>= 1`; prompt ids are not restricted by it (an mmu prompt holds image codes above the
    /// text vocabulary).
    #[serde(default)]
    pub sample_vocab: Option<usize>,
    /// Confidence-threshold parallel decoding (Fast-dLLM `llada/generate.py::
    /// get_transfer_index` with `threshold`; dLLM-RL `remasking_strategy:
    /// low_confidence_dynamic` with `dynamic_threshold`, upstream value 0.9 / 0.95): at every
    /// step each row commits **every** masked position of the current window whose confidence
    /// (per [`GenerateConfig::remasking`]) is `>= threshold`, and at least the most confident
    /// one. A block is decoded until it has no mask left, so `steps` is ignored (it is still
    /// validated) and the number of model calls adapts to the model's certainty: a threshold
    /// above every possible confidence (`> 1` for `low_confidence`) commits one token per step
    /// (`gen_length` calls), a low one many per step. Confidences are computed in f64 in this
    /// mode (as Fast-dLLM), whatever [`GenerateConfig::confidence_f64`] says. `None` (default) =
    /// the upstream `get_num_transfer_tokens` schedule.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Stop after a block once **every** row's block ends (its last position) in `eos_id` or
    /// `eot_id` (MMaDA `models/modeling_mmada.py::mmu_generate_fast`, spec §4.2, which checks
    /// its `eot_token` only; both ids are checked here, LLaDA pads answers with EOS after the
    /// EOT). The blocks after it are not decoded: they stay `mask_id`, as upstream, and cost no
    /// model call ([`GenerateOutput::nfe`], [`GenerateOutput::blocks`]). Needs `eos_id` or
    /// `eot_id`. Default `false` (every block is decoded, as `generate.py`).
    #[serde(default)]
    pub early_stop: bool,
    /// Key/value cache of the decoding steps ([`CacheMode`]; default `none`). Combines with
    /// every other option (threshold decoding, CFG, key padding, early stop). A denoiser
    /// without a cache ([`Denoiser::window_logits_caching`] returns `None`) runs uncached
    /// and reports no cache hit ([`GenerateOutput::cache_hits`]).
    #[serde(default)]
    pub cache: CacheMode,
    /// With a cache: also refresh it every `refresh_every` steps of a block (step `j` of a
    /// block refreshes when `j % refresh_every == 0`; the block's first step always does).
    /// `0` (default) = at block starts only; `1` = every step, which is the uncached sampler
    /// bit for bit. Fast-dLLM refreshes at block starts only.
    #[serde(default)]
    pub refresh_every: usize,
    /// With a cache: a vicinity refresh (dInfer) — the query range of a cached step is widened
    /// by this many positions before the window (and, with the dual cache, after it), so that
    /// the positions next to the block are recomputed at every step instead of read from the
    /// cache. Default 0.
    #[serde(default)]
    pub vicinity: usize,
}

impl GenerateConfig {
    /// The upstream defaults (`steps = gen_length = block_length = 128`, greedy, no CFG,
    /// low-confidence remasking) with the given mask id.
    pub fn new(mask_id: u32) -> Self {
        GenerateConfig {
            steps: 128,
            gen_length: 128,
            block_length: 128,
            temperature: 0.0,
            cfg_scale: 0.0,
            remasking: Remasking::LowConfidence,
            mask_id,
            logits_eos_inf: false,
            confidence_eos_eot_inf: false,
            eos_id: None,
            eot_id: None,
            confidence_f64: false,
            sample_vocab: None,
            threshold: None,
            early_stop: false,
            cache: CacheMode::None,
            refresh_every: 0,
            vicinity: 0,
        }
    }

    /// Upstream defaults with the ids (`mask_id`, `eos_id`, `eot_id`) of a token layout, so the
    /// EOS/EOT options can be switched on without looking ids up.
    pub fn from_layout(layout: &TokenLayout) -> Self {
        GenerateConfig {
            eos_id: Some(layout.eos_id),
            eot_id: Some(layout.eot_id),
            ..Self::new(layout.mask_id)
        }
    }

    /// Checks the invariants upstream asserts (`gen_length % block_length == 0`,
    /// `steps % num_blocks == 0`) and the ones it assumes. The error names the field.
    pub fn validate(&self) -> Result<(), SamplerError> {
        if self.gen_length == 0 {
            return Err(SamplerError::config("gen_length", "must be > 0"));
        }
        if self.block_length == 0 {
            return Err(SamplerError::config("block_length", "must be > 0"));
        }
        if !self.gen_length.is_multiple_of(self.block_length) {
            return Err(SamplerError::config(
                "gen_length",
                format!(
                    "gen_length {} is not divisible by block_length {}",
                    self.gen_length, self.block_length
                ),
            ));
        }
        let nb = self.gen_length / self.block_length;
        if self.steps == 0 {
            return Err(SamplerError::config("steps", "must be > 0"));
        }
        if !self.steps.is_multiple_of(nb) {
            return Err(SamplerError::config(
                "steps",
                format!(
                    "steps {} is not divisible by the number of blocks {nb} (= gen_length {} / block_length {})",
                    self.steps, self.gen_length, self.block_length
                ),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplerError::config(
                "temperature",
                format!("must be finite and >= 0, got {}", self.temperature),
            ));
        }
        if !(self.cfg_scale.is_finite() && self.cfg_scale >= 0.0) {
            return Err(SamplerError::config(
                "cfg_scale",
                format!("must be finite and >= 0, got {}", self.cfg_scale),
            ));
        }
        if self.logits_eos_inf && self.eos_id.is_none() {
            return Err(SamplerError::config(
                "eos_id",
                "logits_eos_inf = true needs eos_id",
            ));
        }
        if self.confidence_eos_eot_inf && self.eot_id.is_none() {
            return Err(SamplerError::config(
                "eot_id",
                "confidence_eos_eot_inf = true needs eot_id",
            ));
        }
        if self.early_stop && self.eos_id.is_none() && self.eot_id.is_none() {
            return Err(SamplerError::config(
                "early_stop",
                "early_stop = true needs eos_id or eot_id (the ids a finished block ends in)",
            ));
        }
        if self.sample_vocab == Some(0) {
            return Err(SamplerError::config(
                "sample_vocab",
                "must be >= 1 (the tokenizer's length), or unset for the whole head",
            ));
        }
        if let Some(t) = self.threshold
            && !t.is_finite()
        {
            return Err(SamplerError::config(
                "threshold",
                format!("must be finite, got {t}"),
            ));
        }
        Ok(())
    }

    /// `gen_length / block_length`.
    pub fn num_blocks(&self) -> usize {
        self.gen_length / self.block_length.max(1)
    }

    /// `steps / num_blocks`: denoising steps per block.
    pub fn steps_per_block(&self) -> usize {
        self.steps / self.num_blocks().max(1)
    }
}

/// Every intermediate state of a [`generate`] call, for step-by-step comparison with upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateTrace {
    /// Batch size `B`.
    pub batch: usize,
    /// Canvas length `Lp + G`.
    pub seq_len: usize,
    /// `nfe + 1` canvases (`steps + 1` with the default schedule and no early stop), each
    /// `[B, Lp + G]` row-major: the canvas fed to the model at step `s`, then the final output
    /// (the fixture's `x_per_step`).
    pub canvases: Vec<Vec<i64>>,
    /// `[B, Lp + G]` row-major: the global step (`0..nfe`) at which each position was
    /// unmasked, `-1` for positions never unmasked by the sampler (the prompt, and the blocks
    /// skipped by an early stop).
    pub unmask_step: Vec<i64>,
    /// `[nfe][B]`: the number of tokens committed per row at each step.
    pub transfers: Vec<Vec<usize>>,
}

/// Result of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOutput<B: Backend> {
    /// The full canvas `[B, Lp + G]` (prompt followed by the generated ids), as upstream returns
    /// it; decode `ids[:, Lp..]`. After an early stop the undecoded blocks hold `mask_id`.
    pub ids: Tensor<B, 2, Int>,
    /// Number of function (denoiser) evaluations. With CFG each evaluation runs a `2B` batch.
    pub nfe: usize,
    /// Number of blocks decoded (`gen_length / block_length` unless
    /// [`GenerateConfig::early_stop`] ended the call sooner).
    pub blocks: usize,
    /// Wall time of the call, seconds.
    pub seconds: f64,
    /// Per-step trace when requested.
    pub trace: Option<GenerateTrace>,
    /// Forwards that refreshed the key/value cache (whole canvas; `0` without a cache).
    pub refreshes: usize,
    /// Forwards that ran only their query positions against the cache (`nfe = refreshes +
    /// cache_hits` with a cache; `0` without one, or when the denoiser has no cache).
    pub cache_hits: usize,
    /// Canvas positions per row run through the network, summed over the forwards (the
    /// work: `nfe · (Lp + G)` without a cache).
    pub positions: usize,
    /// Tokens committed per row, summed over the rows (`B · G` without an early stop).
    pub committed: usize,
}

impl<B: Backend> GenerateOutput<B> {
    /// Tokens per forward (dInfer's TPF): tokens committed per row per denoiser call,
    /// `committed / (B · nfe)` (`G / steps` with the fixed schedule; higher with threshold
    /// decoding). `0` when no call ran.
    pub fn tokens_per_forward(&self, batch: usize) -> f64 {
        if self.nfe == 0 || batch == 0 {
            0.0
        } else {
            self.committed as f64 / (batch * self.nfe) as f64
        }
    }
}

/// LLaDA `generate` (spec §4.1; upstream ML-GSAI/LLaDA `generate.py::generate`).
///
/// * `prompt`: `[B, Lp]` token ids (left-padded when rows differ in length).
/// * `attention_mask`: optional `[B, Lp]`, `true` = real token. It is extended with `true` for
///   the `G` generated positions and used as key padding ([`Attention::KeyPadding`], the fixed
///   HF LLaDA semantics; spec §4.1 step 1). `None` = full attention.
/// * `rng`: uniform draws for the Gumbel noise (`temperature > 0`, `[B, window, vocab]` f64 per
///   step, only for the positions that can be unmasked) and for `random` remasking
///   (`[B, window]`). Unused when greedy with a deterministic ranking.
/// * `record_trace`: also return every intermediate canvas ([`GenerateTrace`]).
///
/// The denoiser returns logits `[B', Lp + G, vocab]` (`B' = 2B` with CFG). Returns the final
/// canvas `[B, Lp + G]`. Ties in the top-k selection go to the lower position (torch's order for
/// ties is unspecified).
///
/// # Errors
/// [`SamplerError::InvalidConfig`] ([`GenerateConfig::validate`]);
/// [`SamplerError::Shape`] for an empty batch or a mask of another shape than the prompt;
/// [`SamplerError::PadIsMask`] when a padded prompt position (mask `false`) holds `mask_id`
/// (upstream asserts `pad_token_id != mask_id`: such padding would be decoded);
/// [`SamplerError::PromptId`] for a negative prompt id or one outside the logits width;
/// [`SamplerError::IdOutOfVocab`] for `mask_id`, `eos_id`, `eot_id` outside the logits
/// ([`SamplerError::InvalidConfig`] for a `sample_vocab` wider than them);
/// [`SamplerError::LogitsShape`], [`SamplerError::RandomnessLength`], [`SamplerError::Data`].
pub fn generate<B, D>(
    model: &D,
    prompt: Tensor<B, 2, Int>,
    attention_mask: Option<Tensor<B, 2, Bool>>,
    config: &GenerateConfig,
    rng: &mut dyn UniformSource,
    record_trace: bool,
) -> Result<GenerateOutput<B>, SamplerError>
where
    B: Backend,
    D: Denoiser<B> + ?Sized,
{
    generate_observed(
        model,
        prompt,
        attention_mask,
        config,
        rng,
        record_trace,
        &mut |_| {},
    )
}

/// The canvas after one denoising step of [`generate_observed`] (for live views: a server
/// streams the positions each step committed).
#[derive(Debug, Clone, Copy)]
pub struct StepEvent<'a> {
    /// Global step index (`0..nfe`).
    pub step: usize,
    /// Block of this step (`0..num_blocks`).
    pub block: usize,
    /// Whether this step finished its block (no masked position left in it, or its last
    /// scheduled step).
    pub block_done: bool,
    /// Batch size `B`.
    pub batch: usize,
    /// Canvas length `Lp + G`.
    pub seq_len: usize,
    /// Prompt width `Lp` (the generated positions are `Lp..Lp + G` of each row).
    pub prompt_len: usize,
    /// The canvas after the step, `[B, Lp + G]` row-major (`mask_id` where still masked).
    pub canvas: &'a [i64],
    /// `[B, Lp + G]` row-major: the step at which each position was committed, `-1` for the
    /// prompt and the positions still masked.
    pub unmask_step: &'a [i64],
    /// Set it (`stop.set(true)`) to end the generation after this step: the sampler returns
    /// [`SamplerError::Cancelled`] (a server whose clients all went away).
    pub stop: &'a std::cell::Cell<bool>,
}

/// [`generate`] with `observer` called after every denoising step with the canvas
/// ([`StepEvent`]). The result is the same as [`generate`]'s.
///
/// # Errors
/// Those of [`generate`].
pub fn generate_observed<B, D>(
    model: &D,
    prompt: Tensor<B, 2, Int>,
    attention_mask: Option<Tensor<B, 2, Bool>>,
    config: &GenerateConfig,
    rng: &mut dyn UniformSource,
    record_trace: bool,
    observer: &mut dyn FnMut(&StepEvent<'_>),
) -> Result<GenerateOutput<B>, SamplerError>
where
    B: Backend,
    D: Denoiser<B> + ?Sized,
{
    let t0 = std::time::Instant::now();
    config.validate()?;
    let [b, lp] = prompt.dims();
    if b == 0 {
        return Err(SamplerError::Shape {
            input: "prompt",
            got: vec![b, lp],
            expected: "[batch >= 1, prompt_len]".into(),
        });
    }
    let device = prompt.device();
    let g = config.gen_length;
    let l = lp + g;
    let mask = i64::from(config.mask_id);

    // x = [prompt | MASK × G]
    let prompt_host = host::ints(prompt)?;
    check_prompt_ids(&prompt_host, lp, model.input_vocab())?;
    if let Some(v) = model.input_vocab() {
        check_id("mask_id", config.mask_id, v)?;
    }
    let stop = std::cell::Cell::new(false);
    let mut x = vec![mask; b * l];
    for r in 0..b {
        x[r * l..r * l + lp].copy_from_slice(&prompt_host[r * lp..(r + 1) * lp]);
    }
    // prompt_index = (x != mask_id), computed once (upstream).
    let prompt_index: Vec<bool> = x.iter().map(|&t| t != mask).collect();

    let key_padding = match attention_mask {
        None => None,
        Some(m) => {
            let dims = m.dims();
            if dims != [b, lp] {
                return Err(SamplerError::Shape {
                    input: "attention_mask",
                    got: dims.to_vec(),
                    expected: format!("[{b}, {lp}] like the prompt"),
                });
            }
            let mh = host::bools(m)?;
            if let Some(i) = (0..b * lp).find(|&i| !mh[i] && prompt_host[i] == mask) {
                return Err(SamplerError::PadIsMask {
                    row: i / lp,
                    position: i % lp,
                    mask_id: config.mask_id,
                });
            }
            let mut ext = vec![true; b * l];
            for r in 0..b {
                ext[r * l..r * l + lp].copy_from_slice(&mh[r * lp..(r + 1) * lp]);
            }
            Some(ext)
        }
    };
    let cfg_on = config.cfg_scale > 0.0;
    let attention = match &key_padding {
        None => Attention::Full,
        Some(m) if cfg_on => {
            let mut twice = m.clone();
            twice.extend_from_slice(m);
            Attention::KeyPadding(host::bool_tensor2(twice, [2 * b, l], &device))
        }
        Some(m) => Attention::KeyPadding(host::bool_tensor2(m.clone(), [b, l], &device)),
    };

    let num_blocks = config.num_blocks();
    let spb = config.steps_per_block();
    let bl = config.block_length;
    let stop_ids: Vec<i64> = [config.eos_id, config.eot_id]
        .into_iter()
        .flatten()
        .map(i64::from)
        .collect();
    let mut canvases = Vec::new();
    let mut transfers = Vec::new();
    let mut unmask_step = vec![-1i64; b * l];
    let mut nfe = 0usize;
    let (mut refreshes, mut cache_hits, mut positions, mut committed) = (0, 0, 0, 0);
    let mut cache: Option<KvCache<B>> = None;
    let mut global_step = 0i64;
    let mut blocks = 0usize;

    for blk in 0..num_blocks {
        let bs = lp + blk * bl;
        let be = bs + bl;
        blocks += 1;
        // get_num_transfer_tokens on the block's masks at the start of the block: [B][S_b]
        let per_row: Vec<Vec<usize>> = (0..b)
            .map(|r| {
                let n = x[r * l + bs..r * l + be]
                    .iter()
                    .filter(|&&t| t == mask)
                    .count();
                get_num_transfer_tokens(n, spb)
            })
            .collect();
        // Threshold mode: the block is decoded until it has no mask left; every step commits
        // at least one masked position per row that has one, so `be` steps always suffice
        // (the bound only matters for a head that can predict the mask id itself).
        let max_steps = if config.threshold.is_some() { be } else { spb };
        for j in 0..max_steps {
            if config.threshold.is_some()
                && (0..b).all(|r| x[r * l + bs..r * l + be].iter().all(|&t| t != mask))
            {
                break;
            }
            if record_trace {
                canvases.push(x.clone());
            }
            // Window: every masked position before the block end can be selected upstream.
            let ws = (0..b)
                .filter_map(|r| x[r * l..r * l + be].iter().position(|&t| t == mask))
                .min()
                .unwrap_or(bs)
                .min(bs);
            let w = be - ws;
            // Cache: refresh at the block start and every `refresh_every` steps, else run the
            // queries (prefix: window .. canvas end; dual: the window) against the cache.
            let refresh = j == 0
                || cache.is_none()
                || (config.refresh_every > 0 && j.is_multiple_of(config.refresh_every));
            let pass = if config.cache == CacheMode::None {
                Pass::Plain
            } else if let (false, Some(c)) = (refresh, &cache) {
                let qs = ws.saturating_sub(config.vicinity);
                let qe = match config.cache {
                    CacheMode::Dual => (be + config.vicinity).min(l),
                    _ => l,
                };
                Pass::Cached(c, (qs, qe - qs))
            } else {
                Pass::Refresh(&mut cache)
            };
            positions += match &pass {
                Pass::Cached(_, (_, n)) => *n,
                _ => l,
            };
            match &pass {
                Pass::Plain => {}
                Pass::Refresh(_) => refreshes += 1,
                Pass::Cached(..) => cache_hits += 1,
            }
            let logits = denoise(
                model,
                &x,
                b,
                l,
                ws,
                w,
                config.cfg_scale,
                &prompt_index,
                mask,
                &attention,
                &device,
                pass,
            )?;
            if config.cache != CacheMode::None && cache.is_none() {
                // the denoiser has no cache: every step ran uncached
                refreshes = 0;
                cache_hits = 0;
            }
            nfe += 1;
            if nfe == 1 {
                // Denoisers without `input_vocab`: the ids are checked against the logits width.
                let vocab = logits.dims()[2];
                check_prompt_ids(&prompt_host, lp, Some(vocab))?;
                check_id("mask_id", config.mask_id, vocab)?;
            }
            let (x0, conf) = predict(logits, b, w, config, rng, &device)?;

            let mut step_transfers = Vec::with_capacity(b);
            for r in 0..b {
                // confidence = where(mask_index, x0_p, -inf)
                let row_conf: Vec<f64> = (0..w)
                    .map(|p| {
                        if x[r * l + ws + p] == mask {
                            conf[r * w + p]
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let k = match config.threshold {
                    None => per_row[r].get(j).copied().unwrap_or(0),
                    Some(t) => threshold_count(&row_conf, &x[r * l + ws..r * l + be], mask, t),
                };
                let mut n_done = 0;
                for p in host::top_k(&row_conf, k) {
                    let pos = r * l + ws + p;
                    // x0 = where(mask_index, x0, x): selecting an unmasked position is a no-op.
                    if x[pos] == mask {
                        x[pos] = x0[r * w + p];
                        unmask_step[pos] = global_step;
                        n_done += 1;
                    }
                }
                committed += n_done;
                step_transfers.push(n_done);
            }
            transfers.push(step_transfers);
            let block_done = j + 1 == max_steps
                || (config.threshold.is_some()
                    && (0..b).all(|r| x[r * l + bs..r * l + be].iter().all(|&t| t != mask)));
            observer(&StepEvent {
                step: global_step as usize,
                block: blk,
                block_done,
                batch: b,
                seq_len: l,
                prompt_len: lp,
                canvas: &x,
                unmask_step: &unmask_step,
                stop: &stop,
            });
            if stop.get() {
                return Err(SamplerError::Cancelled {
                    step: global_step as usize,
                });
            }
            global_step += 1;
        }
        // the cache holds the keys of this block's masks: the next block starts with a refresh
        cache = None;
        // mmu_generate_fast: stop once every row's block ends in a stop id.
        if config.early_stop
            && blk + 1 < num_blocks
            && (0..b).all(|r| stop_ids.contains(&x[r * l + be - 1]))
        {
            break;
        }
    }
    if record_trace {
        canvases.push(x.clone());
    }
    Ok(GenerateOutput {
        ids: host::int_tensor(&x, b, l, &device),
        nfe,
        blocks,
        seconds: t0.elapsed().as_secs_f64(),
        refreshes,
        cache_hits,
        positions,
        committed,
        trace: record_trace.then_some(GenerateTrace {
            batch: b,
            seq_len: l,
            canvases,
            unmask_step,
            transfers,
        }),
    })
}

/// Threshold mode (Fast-dLLM `get_transfer_index` with `threshold`; dLLM-RL
/// `low_confidence_dynamic`): the number of masked positions of a row's window whose confidence
/// is `>= threshold`, at least 1 when the window has a mask, 0 otherwise. `row_conf` is `-inf`
/// at unmasked positions; `window` holds the row's canvas over the same positions.
fn threshold_count(row_conf: &[f64], window: &[i64], mask: i64, threshold: f64) -> usize {
    let masked = window.iter().filter(|&&t| t == mask).count();
    if masked == 0 {
        return 0;
    }
    let above = window
        .iter()
        .zip(row_conf)
        .filter(|&(&t, &c)| t == mask && c >= threshold)
        .count();
    above.max(1)
}

/// Prompt ids must be `>= 0` and, when the width is known, `< vocab`.
fn check_prompt_ids(ids: &[i64], lp: usize, vocab: Option<usize>) -> Result<(), SamplerError> {
    for (i, &t) in ids.iter().enumerate() {
        if t < 0 || vocab.is_some_and(|v| t as u64 >= v as u64) {
            return Err(SamplerError::PromptId {
                row: i / lp.max(1),
                position: i % lp.max(1),
                id: t,
                vocab,
            });
        }
    }
    Ok(())
}

/// How one denoiser call uses the key/value cache.
pub(crate) enum Pass<'c, B: Backend> {
    /// No cache: [`Denoiser::window_logits`].
    Plain,
    /// A full forward that (re)fills the cache ([`Denoiser::window_logits_caching`]); the slot
    /// stays `None` for a denoiser without a cache.
    Refresh(&'c mut Option<KvCache<B>>),
    /// Only the query positions `(start, len)` against the cache
    /// ([`Denoiser::window_logits_cached`]).
    Cached(&'c KvCache<B>, (usize, usize)),
}

/// One denoiser call on the canvas (with CFG when `cfg_scale > 0`), returning the logits of the
/// window `[ws, ws + w)`: `[B, w, vocab]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn denoise<B, D>(
    model: &D,
    x: &[i64],
    b: usize,
    l: usize,
    ws: usize,
    w: usize,
    cfg_scale: f64,
    prompt_index: &[bool],
    mask: i64,
    attention: &Attention<B>,
    device: &B::Device,
    pass: Pass<'_, B>,
) -> Result<Tensor<B, 3>, SamplerError>
where
    B: Backend,
    D: Denoiser<B> + ?Sized,
{
    let call = |ids: Tensor<B, 2, Int>| -> Result<Tensor<B, 3>, SamplerError> {
        Ok(match pass {
            Pass::Plain => model.window_logits(ids, attention, ws, w),
            Pass::Refresh(slot) => {
                let (logits, cache) = model.window_logits_caching(ids, attention, ws, w);
                *slot = cache;
                logits
            }
            Pass::Cached(cache, query) => {
                model.window_logits_cached(ids, attention, cache, query, ws, w)?
            }
        })
    };
    if cfg_scale > 0.0 {
        // un_x = x with prompt positions set to mask; one forward on [x; un_x]
        let mut both = Vec::with_capacity(2 * b * l);
        both.extend_from_slice(x);
        both.extend(
            x.iter()
                .zip(prompt_index)
                .map(|(&t, &p)| if p { mask } else { t }),
        );
        let logits = call(host::int_tensor(&both, 2 * b, l, device))?;
        check_logits(&logits, 2 * b, w)?;
        let cond = logits.clone().narrow(0, 0, b);
        let un = logits.narrow(0, b, b);
        // un + (cfg + 1) * (cond - un)
        Ok(un.clone() + (cond - un).mul_scalar(cfg_scale + 1.0))
    } else {
        let logits = call(host::int_tensor(x, b, l, device))?;
        check_logits(&logits, b, w)?;
        Ok(logits)
    }
}

pub(crate) fn check_logits<B: Backend>(
    logits: &Tensor<B, 3>,
    batch: usize,
    seq: usize,
) -> Result<(), SamplerError> {
    let d = logits.dims();
    if d[0] != batch || d[1] != seq || d[2] == 0 {
        return Err(SamplerError::LogitsShape {
            got: d.to_vec(),
            batch,
            seq,
        });
    }
    Ok(())
}

fn check_id(what: &'static str, id: u32, vocab: usize) -> Result<usize, SamplerError> {
    let i = id as usize;
    if i >= vocab {
        return Err(SamplerError::IdOutOfVocab {
            what,
            id: i64::from(id),
            vocab,
        });
    }
    Ok(i)
}

/// From window logits `[B, w, V]`: the predicted ids `x0` `[B, w]` and their confidence
/// `[B, w]` (host, row-major).
fn predict<B: Backend>(
    logits: Tensor<B, 3>,
    b: usize,
    w: usize,
    config: &GenerateConfig,
    rng: &mut dyn UniformSource,
    device: &B::Device,
) -> Result<(Vec<i64>, Vec<f64>), SamplerError> {
    let width = logits.dims()[2];
    let mut logits = logits;
    let vocab = match config.sample_vocab {
        None => width,
        Some(n) if n > width => {
            return Err(SamplerError::config(
                "sample_vocab",
                format!(
                    "sample_vocab {n} is wider than the model's logits ({width}); set it to the \
                     tokenizer's length"
                ),
            ));
        }
        Some(n) => {
            if n < width {
                logits = logits.narrow(2, 0, n);
            }
            let m = config.mask_id as usize;
            if m < n {
                logits = logits.slice_fill([0..b, 0..w, m..m + 1], f32::NEG_INFINITY);
            }
            n
        }
    };
    if config.logits_eos_inf {
        let eos = check_id("eos_id", config.eos_id.unwrap_or_default(), vocab)?;
        logits = logits.slice_fill([0..b, 0..w, eos..eos + 1], f32::NEG_INFINITY);
    }
    // add_gumbel_noise: exp(logits64) / (-log u)^T, then argmax
    let x0 = if config.temperature == 0.0 {
        logits.clone().argmax(2)
    } else {
        let u = rng.uniform_f64(b * w * vocab);
        if u.len() != b * w * vocab {
            return Err(SamplerError::RandomnessLength {
                source_name: "gumbel uniform",
                got: u.len(),
                expected: b * w * vocab,
            });
        }
        let u = Tensor::<B, 3>::from_data(TensorData::new(u, [b, w, vocab]), (device, DType::F64));
        let gumbel = u.log().neg().powf_scalar(config.temperature);
        (logits.clone().cast(FloatDType::F64).exp() / gumbel).argmax(2)
    }; // [B, w, 1]
    // The clean probabilities of the confidence rankings (EOT zeroed by confidence_eos_eot_inf).
    let probs = |logits: Tensor<B, 3>| -> Result<Tensor<B, 3>, SamplerError> {
        let mut clean = logits;
        if config.confidence_eos_eot_inf {
            let eot = check_id("eot_id", config.eot_id.unwrap_or_default(), vocab)?;
            clean = clean.slice_fill([0..b, 0..w, eot..eot + 1], f32::NEG_INFINITY);
        }
        // threshold mode compares confidences with a threshold: f64 as Fast-dLLM
        // (`F.softmax(logits.to(torch.float64))` in get_transfer_index)
        if config.confidence_f64 || config.threshold.is_some() {
            clean = clean.cast(FloatDType::F64);
        }
        Ok(softmax(clean, 2))
    };
    let conf = match config.remasking {
        Remasking::LowConfidence => host::floats(probs(logits)?.gather(2, x0.clone()))?,
        Remasking::Margin => {
            let p = probs(logits)?;
            if vocab < 2 {
                // a single id: p₁ = 1, no runner-up
                host::floats(p)?
            } else {
                let top2 = p.topk(2, 2); // [B, w, 2]
                let p1 = top2.clone().narrow(2, 0, 1);
                let p2 = top2.narrow(2, 1, 1);
                host::floats(p1 - p2)?
            }
        }
        Remasking::Entropy => {
            let p = probs(logits)?;
            let plogp = p.clone() * p.add_scalar(1e-10).log();
            host::floats(plogp.sum_dim(2))?
        }
        Remasking::Random => {
            let v = rng.uniform_f64(b * w);
            if v.len() != b * w {
                return Err(SamplerError::RandomnessLength {
                    source_name: "random remasking",
                    got: v.len(),
                    expected: b * w,
                });
            }
            v
        }
    };
    Ok((host::ints(x0)?, conf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_field() {
        let mut c = GenerateConfig::new(300);
        c.validate().unwrap();
        c.gen_length = 100;
        c.block_length = 32;
        match c.validate() {
            Err(SamplerError::InvalidConfig { field, .. }) => assert_eq!(field, "gen_length"),
            other => panic!("{other:?}"),
        }
        c.gen_length = 96; // 3 blocks
        c.steps = 128;
        match c.validate() {
            Err(SamplerError::InvalidConfig { field, reason }) => {
                assert_eq!(field, "steps");
                assert!(reason.contains("3"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        c.steps = 96;
        c.validate().unwrap();
        assert_eq!(c.num_blocks(), 3);
        assert_eq!(c.steps_per_block(), 32);
        c.logits_eos_inf = true;
        assert!(matches!(
            c.validate(),
            Err(SamplerError::InvalidConfig {
                field: "eos_id",
                ..
            })
        ));
        c.eos_id = Some(5);
        c.validate().unwrap();
        c.confidence_eos_eot_inf = true;
        assert!(matches!(
            c.validate(),
            Err(SamplerError::InvalidConfig {
                field: "eot_id",
                ..
            })
        ));
        c.eot_id = Some(6);
        c.validate().unwrap();
        c.temperature = -1.0;
        assert!(matches!(
            c.validate(),
            Err(SamplerError::InvalidConfig {
                field: "temperature",
                ..
            })
        ));
        c.temperature = 0.5;
        c.cfg_scale = f64::NAN;
        assert!(matches!(
            c.validate(),
            Err(SamplerError::InvalidConfig {
                field: "cfg_scale",
                ..
            })
        ));
        c.cfg_scale = 0.0;
        c.block_length = 0;
        assert!(matches!(
            c.validate(),
            Err(SamplerError::InvalidConfig {
                field: "block_length",
                ..
            })
        ));
    }

    #[test]
    fn config_from_recipe_json() {
        let c: GenerateConfig = serde_json::from_str(
            r#"{"steps": 64, "gen_length": 64, "block_length": 32, "remasking": "random", "mask_id": 126336}"#,
        )
        .unwrap();
        assert_eq!(c.steps, 64);
        assert_eq!(c.remasking, Remasking::Random);
        assert_eq!(c.temperature, 0.0);
        assert_eq!(c.mask_id, 126336);
        assert_eq!(c.eos_id, None);
        // defaults
        let d: GenerateConfig = serde_json::from_str(r#"{"mask_id": 7}"#).unwrap();
        assert_eq!(d, GenerateConfig::new(7));
        let f = GenerateConfig::from_layout(&TokenLayout::llada());
        assert_eq!(
            (f.mask_id, f.eos_id, f.eot_id),
            (126336, Some(126081), Some(126348))
        );
        // unknown field and missing mask_id are rejected
        let e = serde_json::from_str::<GenerateConfig>(r#"{"mask_id": 7, "step": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("step"), "{e}");
        assert!(serde_json::from_str::<GenerateConfig>(r#"{"steps": 3}"#).is_err());
    }
}
