//! UniGRPO (spec §5): group advantages, structured noising of completions, per-token
//! log-probabilities on masked positions, and the clipped surrogate with a k3 KL penalty.
//!
//! Everything random is an explicit value (ratios, uniforms, or the resulting masks), so the
//! loss is reproducible and testable against `fixtures/unigrpo/random_masking_g4`
//! (dLLM-RL `train/rl_mmada.py`, method `random_masking`).
//!
//! Pipeline for one rollout batch of `N = prompts · G` completions:
//! 1. [`group_advantages`] on the `N` rewards (spec §5.1 step 1, dLLM-RL
//!    `reward/reward.py::z_score_normalize`, TRL `scale_rewards`).
//! 2. Per inner iteration `n` and completion: a mask ratio from [`MaskRatioSchedule`] (paper
//!    Algorithm 1 uniformly spaced, or dLLM-RL i.i.d. `U[lower_p, upper_p]`), a random mask
//!    of the completion ([`completion_mask`]) and the noised row ([`noise_completion`]), into a
//!    [`GrpoBatch`] (rows without a masked token are dropped, as upstream).
//! 3. Old-policy (and optionally reference) log-probs on the batch without gradient
//!    ([`GrpoBatch::logprobs`] on the old model's logits).
//! 4. [`unigrpo_loss`] on the current model's logits → policy loss, KL loss, total, stats.
//!
//! The d1 one-step estimator replaces step 2 by [`noise_d1`] (completion fully masked, prompt
//! tokens masked with probability `p_mask_prompt`); steps 3 and 4 are the same.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::head::Scores;
use crate::{DiffusionError, check_len};

/// How group-relative advantages are scaled (TRL `GRPOConfig.scale_rewards`; serde spells
/// the variants `group`, `batch`, `none` as TRL does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// `(r − mean_group) / (std_group + eps)` — the paper and dLLM-RL.
    #[default]
    Group,
    /// `(r − mean_group) / (std_batch + eps)` (TRL `"batch"`).
    Batch,
    /// `r − mean_group` (Dr. GRPO, TRL `"none"`).
    None,
}

/// Options of [`group_advantages`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdvantageOptions {
    /// Scaling.
    pub scale: ScaleRewards,
    /// Added to the std (TRL 1e-4; dLLM-RL 0 with an explicit zero-std guard).
    pub eps: f32,
    /// Bessel-corrected std (TRL `torch.std`) instead of the population std (dLLM-RL).
    pub unbiased_std: bool,
}

impl Default for AdvantageOptions {
    /// dLLM-RL `z_score_normalize`: group scaling, population std, no eps.
    fn default() -> Self {
        Self {
            scale: ScaleRewards::Group,
            eps: 0.0,
            unbiased_std: false,
        }
    }
}

/// Result of [`group_advantages`].
#[derive(Debug, Clone, PartialEq)]
pub struct GroupAdvantages {
    /// One advantage per completion `[N]`, shared by all its tokens (`Â_{i,t} = Â_i`).
    pub advantages: Vec<f32>,
    /// Reward mean per group `[N / G]`.
    pub group_mean: Vec<f32>,
    /// Reward std per group `[N / G]` (population or Bessel as configured).
    pub group_std: Vec<f32>,
    /// Per group: all rewards equal (std ≈ 0); these groups get advantage exactly 0.
    pub zero_std: Vec<bool>,
}

impl GroupAdvantages {
    /// Fraction of groups whose rewards are all equal (TRL `frac_reward_zero_std`).
    pub fn frac_zero_std(&self) -> f32 {
        if self.zero_std.is_empty() {
            return 0.0;
        }
        self.zero_std.iter().filter(|z| **z).count() as f32 / self.zero_std.len() as f32
    }
}

fn mean_std(xs: &[f64], unbiased: bool) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let denom = if unbiased && xs.len() > 1 { n - 1.0 } else { n };
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / denom;
    (mean, var.sqrt())
}

/// Group-relative advantages (spec §5.1 step 1): rewards `[N]` in consecutive groups of
/// `group_size` completions of the same prompt → `Â_i = (r_i − mean_g) / (std + eps)`
/// (std of the group or of the batch, see [`ScaleRewards`]).
///
/// A group whose rewards are all equal (`std ≤ 1e-6·max(1, |mean|)`) gets `Â = 0` exactly
/// under every scaling, so it contributes no policy gradient and never divides 0 by 0
/// (dLLM-RL returns zeros when `std == 0`). Computed in f64.
///
/// # Errors
/// [`DiffusionError::Range`] when `group_size` is 0, `N` is not a multiple of it, or a reward
/// is not finite.
pub fn group_advantages(
    rewards: &[f32],
    group_size: usize,
    opts: AdvantageOptions,
) -> Result<GroupAdvantages, DiffusionError> {
    if group_size == 0 || !rewards.len().is_multiple_of(group_size) {
        return Err(DiffusionError::Range {
            what: "group_size",
            value: format!("{group_size} (for {} rewards)", rewards.len()),
            why: "the number of rewards must be a positive multiple of the group size",
        });
    }
    if let Some(r) = rewards.iter().find(|r| !r.is_finite()) {
        return Err(DiffusionError::Range {
            what: "rewards",
            value: r.to_string(),
            why: "rewards must be finite",
        });
    }
    let r64: Vec<f64> = rewards.iter().map(|&r| f64::from(r)).collect();
    let (_, batch_std) = mean_std(&r64, opts.unbiased_std);
    let mut out = GroupAdvantages {
        advantages: Vec::with_capacity(rewards.len()),
        group_mean: vec![],
        group_std: vec![],
        zero_std: vec![],
    };
    for g in r64.chunks(group_size) {
        let (mean, std) = mean_std(g, opts.unbiased_std);
        let zero = std <= 1e-6 * mean.abs().max(1.0);
        let denom = match opts.scale {
            ScaleRewards::Group => std + f64::from(opts.eps),
            ScaleRewards::Batch => batch_std + f64::from(opts.eps),
            ScaleRewards::None => 1.0,
        };
        for &r in g {
            let a = if zero || denom == 0.0 {
                0.0
            } else {
                (r - mean) / denom
            };
            out.advantages.push(a as f32);
        }
        out.group_mean.push(mean as f32);
        out.group_std.push(std as f32);
        out.zero_std.push(zero);
    }
    Ok(out)
}

/// Where the mask ratio of each (completion, inner iteration) comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaskRatioSchedule {
    /// Paper Algorithm 1 (spec §5.1 step 2): one uniform `r₁` per completion, `t₁ = ⌊r₁·T⌋`,
    /// `t_n = ⌊(n−1)/(μ−1)·(T − t₁) + t₁⌋`, ratio `t_n / T` for iteration `n = 1..μ`.
    UniformSpaced {
        /// Diffusion timesteps `T` (paper: 1000).
        timesteps: u32,
    },
    /// dLLM-RL `random_masking`: an independent `t = (upper − lower)·u + lower` per
    /// (completion, iteration).
    Uniform {
        /// `lower_p` (dLLM-RL 0.1).
        lower: f32,
        /// `upper_p` (dLLM-RL 0.9).
        upper: f32,
    },
}

impl MaskRatioSchedule {
    /// Checks the parameters (`T ≥ 1`; `0 ≤ lower ≤ upper ≤ 1`).
    ///
    /// # Errors
    /// [`DiffusionError::Range`] naming the bad parameter.
    pub fn validate(&self) -> Result<(), DiffusionError> {
        match *self {
            MaskRatioSchedule::UniformSpaced { timesteps: 0 } => Err(DiffusionError::Range {
                what: "timesteps",
                value: "0".into(),
                why: "need at least 1 diffusion timestep (paper: 1000)",
            }),
            MaskRatioSchedule::Uniform { lower, upper }
                if !(0.0..=1.0).contains(&lower)
                    || !(0.0..=1.0).contains(&upper)
                    || lower > upper =>
            {
                Err(DiffusionError::Range {
                    what: "lower_p/upper_p",
                    value: format!("{lower}/{upper}"),
                    why: "need 0 <= lower_p <= upper_p <= 1",
                })
            }
            _ => Ok(()),
        }
    }

    /// Uniforms needed per completion for `mu` iterations (1 for `UniformSpaced`, `mu` else).
    pub fn draws_needed(&self, mu: usize) -> usize {
        match self {
            MaskRatioSchedule::UniformSpaced { .. } => 1,
            MaskRatioSchedule::Uniform { .. } => mu,
        }
    }

    /// The `mu` mask ratios of one completion from `uniforms` (`U[0,1)`, length
    /// [`Self::draws_needed`]).
    ///
    /// # Errors
    /// [`DiffusionError::Length`] for a wrong number of uniforms, `Range` for `mu == 0`.
    pub fn ratios(&self, mu: usize, uniforms: &[f32]) -> Result<Vec<f32>, DiffusionError> {
        if mu == 0 {
            return Err(DiffusionError::Range {
                what: "num_iterations",
                value: "0".into(),
                why: "need at least one inner iteration",
            });
        }
        check_len("uniforms", uniforms.len(), self.draws_needed(mu))?;
        Ok(match *self {
            MaskRatioSchedule::UniformSpaced { timesteps } => {
                let t_total = f64::from(timesteps);
                let t1 = (f64::from(uniforms[0]) * t_total).floor();
                (0..mu)
                    .map(|n| {
                        let tn = if mu == 1 {
                            t1
                        } else {
                            (n as f64 / (mu - 1) as f64 * (t_total - t1) + t1).floor()
                        };
                        (tn / t_total) as f32
                    })
                    .collect()
            }
            MaskRatioSchedule::Uniform { lower, upper } => uniforms
                .iter()
                .map(|&u| (upper - lower) * u + lower)
                .collect(),
        })
    }
}

/// The random mask of a completion: position `i` is masked when `u[i] < ratio` (dLLM-RL
/// `torch.rand(L) < t`; paper: each token masked independently with probability `p`).
pub fn completion_mask(ratio: f32, u: &[f32]) -> Vec<bool> {
    u.iter().map(|&x| x < ratio).collect()
}

/// Trailing padding of a completion (dLLM-RL `post_num`): from the first `pad_id` at or after
/// the prompt, the first `post_num` pads are ordinary tokens; later ones are always replaced by
/// the mask id in the input and excluded from the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailPad {
    /// Padding id (LLaDA pads completions with EOS, 126081).
    pub pad_id: i64,
    /// Pads kept as ordinary tokens (dLLM-RL default 0).
    pub post_num: usize,
}

/// One noised row: model input and which positions are scored.
#[derive(Debug, Clone, PartialEq)]
pub struct NoisedRow {
    /// Model input `[L]`: prompt intact, masked completion positions → mask id.
    pub noisy: Vec<i64>,
    /// Positions scored by the loss `[L]` (dLLM-RL `p_mask`): masked, in the completion, not
    /// tail padding.
    pub loss_mask: Vec<bool>,
}

impl NoisedRow {
    /// Number of scored positions `|M_i|`.
    pub fn n_masked(&self) -> usize {
        self.loss_mask.iter().filter(|m| **m).count()
    }
}

/// Structured noising of one `[prompt | completion]` row (spec §5.1 step 2, dLLM-RL
/// `prepare_inputs_and_labels_for_text`, `random_masking`): the prompt is never masked;
/// completion position `j` is masked when `random_mask[j]`; tail pads (see [`TailPad`]) are
/// always masked in the input and never scored.
///
/// `ids`: `[L]`; `random_mask`: `[L − prompt_len]`.
///
/// # Errors
/// [`DiffusionError::Length`] / `Range` when the lengths do not fit.
pub fn noise_completion(
    ids: &[i64],
    prompt_len: usize,
    random_mask: &[bool],
    mask_id: i64,
    tail: Option<TailPad>,
) -> Result<NoisedRow, DiffusionError> {
    if prompt_len > ids.len() {
        return Err(DiffusionError::Range {
            what: "prompt_len",
            value: prompt_len.to_string(),
            why: "the prompt is longer than the row",
        });
    }
    check_len("random_mask", random_mask.len(), ids.len() - prompt_len)?;
    let tail_from = tail.and_then(|t| {
        ids[prompt_len..]
            .iter()
            .position(|&x| x == t.pad_id)
            .map(|p| prompt_len + p + t.post_num)
    });
    let mut noisy = ids.to_vec();
    let mut loss_mask = vec![false; ids.len()];
    for (j, &m) in random_mask.iter().enumerate() {
        let i = prompt_len + j;
        let is_tail = tail_from.is_some_and(|f| i >= f);
        if is_tail || m {
            noisy[i] = mask_id;
        }
        loss_mask[i] = m && !is_tail;
    }
    Ok(NoisedRow { noisy, loss_mask })
}

/// The d1 one-step estimator's noising of one `[prompt | completion]` row (d1
/// `diffu-grpo/diffu_grpo_trainer.py`, `DiffuGRPOTrainer.forward_process`): every completion
/// position is masked; prompt position `i` is masked when `prompt_u[i] < p_mask_prompt`
/// (d1 `torch.rand((b, l)) < p_mask_prompt`, default 0.15). Every completion position is
/// scored (one forward pass gives all per-token log-probs, `_get_per_token_logps`) except
/// tail pads (see [`TailPad`]; d1 scores through the first EOS, TRL's `completion_mask`,
/// which is `post_num: 1`). Masked prompt positions are never scored.
///
/// `ids`: `[L]`; `prompt_u`: `[prompt_len]` uniforms in `[0, 1)`.
///
/// # Errors
/// [`DiffusionError::Range`] when `prompt_len > L` or `p_mask_prompt` is outside `[0, 1]`;
/// [`DiffusionError::Length`] when `prompt_u` is not `[prompt_len]`.
pub fn noise_d1(
    ids: &[i64],
    prompt_len: usize,
    prompt_u: &[f32],
    p_mask_prompt: f32,
    mask_id: i64,
    tail: Option<TailPad>,
) -> Result<NoisedRow, DiffusionError> {
    if !(0.0..=1.0).contains(&p_mask_prompt) {
        return Err(DiffusionError::Range {
            what: "p_mask_prompt",
            value: p_mask_prompt.to_string(),
            why: "a probability must lie in [0, 1]",
        });
    }
    if prompt_len > ids.len() {
        return Err(DiffusionError::Range {
            what: "prompt_len",
            value: prompt_len.to_string(),
            why: "the prompt is longer than the row",
        });
    }
    check_len("prompt_u", prompt_u.len(), prompt_len)?;
    let all = vec![true; ids.len() - prompt_len];
    let mut row = noise_completion(ids, prompt_len, &all, mask_id, tail)?;
    for (i, &u) in prompt_u.iter().enumerate() {
        if u < p_mask_prompt {
            row.noisy[i] = mask_id;
        }
    }
    Ok(row)
}

/// Structured noising of a text-to-image completion (the image tokens of a t2i row), with
/// the t2i conventions of SFT (spec §3.3, `training/utils.py::mask_or_random_replace_tokens`,
/// [`crate::noise::image_mask_with`]): the draw's `tau` is the mask ratio of the UniGRPO
/// schedule for this (completion, inner iteration); `mask_prob = γ(tau)`
/// (`schedule`, cosine by default), `n = clamp(round(N·mask_prob), 1, N)` image positions —
/// the `n` smallest `draw.scores` — are replaced by `mask_id` and scored. Everything else (the
/// text prompt, `<|soi|>`, `<|eoi|>`) stays intact and unscored, unlike SFT's mean, which also
/// counts the trivial `<|soi|>` / `<|eoi|>` targets: the completion of a t2i rollout is its
/// image tokens.
///
/// `ids`: `[L]`; the image tokens are `ids[image_start .. image_start + N]` with
/// `N = draw.scores.len()`.
///
/// # Errors
/// [`DiffusionError::Range`] when the image slice does not fit in the row or the schedule is
/// invalid.
pub fn noise_image(
    ids: &[i64],
    image_start: usize,
    draw: &crate::noise::ImageMaskDraw,
    schedule: &crate::MaskSchedule,
    mask_id: i64,
) -> Result<NoisedRow, DiffusionError> {
    let n = draw.scores.len();
    if image_start + n > ids.len() {
        return Err(DiffusionError::Range {
            what: "image_start",
            value: format!("{image_start} + {n} image tokens"),
            why: "the image slice runs past the end of the row",
        });
    }
    let m = crate::noise::image_mask_with(draw, schedule, 0.0)?;
    let mut noisy = ids.to_vec();
    let mut loss_mask = vec![false; ids.len()];
    for (j, &masked) in m.iter().enumerate() {
        if masked {
            noisy[image_start + j] = mask_id;
            loss_mask[image_start + j] = true;
        }
    }
    Ok(NoisedRow { noisy, loss_mask })
}

/// A batch of noised rows for the UniGRPO loss (host side, row-major).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GrpoBatch {
    /// Sequence length `L` of every row.
    pub seq_len: usize,
    /// Model input `[R · L]`.
    pub noisy: Vec<i64>,
    /// Clean ids (labels) `[R · L]`.
    pub labels: Vec<i64>,
    /// Scored positions `[R · L]`.
    pub loss_mask: Vec<bool>,
    /// Advantage of each row `[R]`.
    pub advantages: Vec<f32>,
    /// Index of the completion each row comes from `[R]` (for bookkeeping).
    pub source: Vec<usize>,
}

impl GrpoBatch {
    /// An empty batch of rows of length `seq_len`.
    pub fn new(seq_len: usize) -> Self {
        Self {
            seq_len,
            ..Default::default()
        }
    }

    /// Number of rows `R`.
    pub fn rows(&self) -> usize {
        self.advantages.len()
    }

    /// Appends a row; a row with no scored position is dropped (dLLM-RL drops rows whose mask
    /// is empty) and `false` is returned.
    ///
    /// # Errors
    /// [`DiffusionError::Length`] when `labels` or the row do not have length `L`.
    pub fn push(
        &mut self,
        row: NoisedRow,
        labels: &[i64],
        advantage: f32,
        source: usize,
    ) -> Result<bool, DiffusionError> {
        check_len("labels", labels.len(), self.seq_len)?;
        check_len("noisy", row.noisy.len(), self.seq_len)?;
        check_len("loss_mask", row.loss_mask.len(), self.seq_len)?;
        if row.n_masked() == 0 {
            return Ok(false);
        }
        self.noisy.extend_from_slice(&row.noisy);
        self.labels.extend_from_slice(labels);
        self.loss_mask.extend_from_slice(&row.loss_mask);
        self.advantages.push(advantage);
        self.source.push(source);
        Ok(true)
    }

    /// The scored tokens in row-major order: flat positions `r·L + i`, their labels and rows.
    pub fn tokens(&self) -> (Vec<usize>, Vec<i64>, Vec<usize>) {
        let (mut pos, mut tg, mut row) = (vec![], vec![], vec![]);
        for (k, &m) in self.loss_mask.iter().enumerate() {
            if m {
                pos.push(k);
                tg.push(self.labels[k]);
                row.push(k / self.seq_len);
            }
        }
        (pos, tg, row)
    }

    /// The model input as a `[R, L]` int tensor.
    pub fn input<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        let v: Vec<i32> = self.noisy.iter().map(|&x| x as i32).collect();
        Tensor::from_data(TensorData::new(v, [self.rows(), self.seq_len]), device)
    }

    /// Per-token log-probs of the labels on the scored positions, `[n_tokens]` in the order of
    /// [`Self::tokens`], from the model's logits `[R, L, V]` (on the graph) or hidden states
    /// ([`Scores::Hidden`]: values only, the head applied at the scored rows in chunks) on
    /// [`Self::input`].
    ///
    /// # Errors
    /// [`DiffusionError::Length`] when the scores do not have `R × L` rows.
    pub fn logprobs<B: Backend>(
        &self,
        scores: impl Into<Scores<B>>,
    ) -> Result<Tensor<B, 1>, DiffusionError> {
        let scores = scores.into();
        let [b, l] = scores.batch_seq();
        check_len("logits rows", b * l, self.rows() * self.seq_len)?;
        let (pos, tg, _) = self.tokens();
        Ok(scores.logprobs(&pos, &tg))
    }
}

/// `log softmax(logits[pos_n])[target_n]` for each selected position → `[n]` (f32): spec
/// §5.1 step 3, dLLM-RL `compute_logp_old_tok_parallel` (`log_softmax(logits).gather(labels)`).
///
/// `scores`: logits `[batch, seq, vocab]` (on the graph) or hidden states + head (values
/// only, see [`Scores::logprobs`]); `positions`: flat indices `b·seq + i`. Only the selected
/// rows go through `log_softmax` (as [`crate::weighted_token_ce`]). With no position the
/// result is an empty `[0]` tensor.
///
/// # Panics
/// When `positions` and `targets` differ in length (a programming error).
pub fn token_logprobs<B: Backend>(
    scores: impl Into<Scores<B>>,
    positions: &[usize],
    targets: &[i64],
) -> Tensor<B, 1> {
    scores.into().logprobs(positions, targets)
}

/// How per-token terms are averaged into the loss (recipe `grpo.loss_type`: serde spells the
/// variants `dllm_rl`, `sequence`, `token`). TRL's `GRPOConfig.loss_type` values are accepted
/// as their equivalents: `grpo` = `sequence`, `bnpo` and `dapo` = `token` (one normalisation
/// over the masked tokens of the step's batch); `dr_grpo` (a constant
/// `max_completion_length` denominator) is refused with this mapping in the error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossNorm {
    /// dLLM-RL `rl_mmada.py`: policy term averaged over the masked tokens of each row, then
    /// over rows; KL term **summed** over the masked tokens of each row, averaged over rows.
    #[default]
    DllmRl,
    /// Paper eq. (spec §5.1 step 6) / TRL `loss_type: grpo`: both terms averaged over the
    /// masked tokens of each row, then over rows.
    Sequence,
    /// TRL `bnpo`/`dapo`: both terms summed over all masked tokens of the batch and divided by
    /// their count.
    Token,
}

impl LossNorm {
    /// The recipe spelling of each value, TRL's names included, and what it maps to.
    pub const NAMES: &'static str = "dllm_rl, sequence (TRL grpo), token (TRL bnpo, dapo)";

    /// Parse a recipe value: ours or TRL's `loss_type` names.
    ///
    /// # Errors
    /// An unknown name, or TRL's `dr_grpo`, with the accepted names.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "dllm_rl" => Ok(Self::DllmRl),
            "sequence" | "grpo" => Ok(Self::Sequence),
            "token" | "bnpo" | "dapo" => Ok(Self::Token),
            "dr_grpo" => Err(format!(
                "loss_type `dr_grpo` (TRL: divide by max_completion_length) is not implemented; \
                 use one of {}",
                Self::NAMES
            )),
            other => Err(format!(
                "unknown loss_type `{other}`; use one of {}",
                Self::NAMES
            )),
        }
    }
}

impl<'de> serde::Deserialize<'de> for LossNorm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = <String as serde::Deserialize>::deserialize(d)?;
        Self::parse(&name).map_err(serde::de::Error::custom)
    }
}

/// Parameters of [`unigrpo_loss`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoLossConfig {
    /// Lower clip `1 − epsilon` (dLLM-RL 0.2).
    pub epsilon: f32,
    /// Upper clip `1 + epsilon_high` (DAPO clip-higher); `None` = `epsilon`.
    pub epsilon_high: Option<f32>,
    /// KL weight β (dLLM-RL 0.01; 0 disables the KL term).
    pub beta: f32,
    /// Normalisation.
    pub norm: LossNorm,
}

impl Default for GrpoLossConfig {
    fn default() -> Self {
        Self {
            epsilon: 0.2,
            epsilon_high: None,
            beta: 0.01,
            norm: LossNorm::DllmRl,
        }
    }
}

/// Token statistics of one loss evaluation (TRL metric names in the field docs).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GrpoStats {
    /// Rows `R`.
    pub rows: usize,
    /// Scored tokens.
    pub tokens: usize,
    /// Mean k3 KL per scored token (TRL `kl`).
    pub kl_mean: f32,
    /// Fraction of tokens with `ratio < 1 − ε` and `A < 0` (TRL `clip_ratio/low_mean`).
    pub clip_low: f32,
    /// Fraction with `ratio > 1 + ε_high` and `A > 0` (TRL `clip_ratio/high_mean`).
    pub clip_high: f32,
    /// `clip_low + clip_high` (TRL `clip_ratio/region_mean`).
    pub clip_region: f32,
    /// Fraction with `|ratio − 1| > ε` regardless of the advantage sign (dLLM-RL
    /// `clip_fraction`).
    pub clip_fraction: f32,
    /// Mean ratio over scored tokens.
    pub ratio_mean: f32,
}

/// Output of [`unigrpo_loss`].
#[derive(Debug, Clone)]
pub struct GrpoLoss<B: Backend> {
    /// Policy term `[1]` (to minimise).
    pub policy_loss: Tensor<B, 1>,
    /// `β ·` KL term `[1]`.
    pub kl_loss: Tensor<B, 1>,
    /// `policy_loss + kl_loss` `[1]`.
    pub loss: Tensor<B, 1>,
    /// New per-token log-probs `[n_tokens]` (on the graph).
    pub logp: Tensor<B, 1>,
    /// Statistics.
    pub stats: GrpoStats,
}

/// The UniGRPO loss on a noised batch (spec §5.1 steps 3–6, dLLM-RL `rl_mmada.py`):
///
/// * `ρ_t = exp(logp_new − logp_old)` per scored token;
/// * `surr_t = min(ρ_t·A, clip(ρ_t, 1 − ε, 1 + ε_high)·A)` with the row's advantage `A`;
/// * `policy = −Σ_rows Σ_t w_t·surr_t` (weights per [`LossNorm`]);
/// * `kl_t = exp(−d) − 1 + d`, `d = logp_new − logp_ref` (k3 estimator, spec §5.1 step 6:
///   `π_ref/π_θ − log(π_ref/π_θ) − 1`); `kl = β·Σ w'_t·kl_t`;
/// * `loss = policy + kl`.
///
/// `logits`: `[R, L, V]` of the model being trained on [`GrpoBatch::input`]; `old_logp` and
/// `ref_logp`: `[n_tokens]` host values in [`GrpoBatch::tokens`] order, computed without
/// gradient; `ref_logp = None` uses `old_logp` as KL reference (dLLM-RL, spec §5.2).
///
/// # Errors
/// [`DiffusionError::Length`] when the inputs do not match the batch; `Range` for an empty
/// batch or invalid ε / β.
pub fn unigrpo_loss<B: Backend>(
    logits: Tensor<B, 3>,
    batch: &GrpoBatch,
    old_logp: &[f32],
    ref_logp: Option<&[f32]>,
    cfg: &GrpoLossConfig,
) -> Result<GrpoLoss<B>, DiffusionError> {
    check_inputs(batch, old_logp, ref_logp, cfg)?;
    let logp = batch.logprobs(logits)?;
    grpo_terms(logp, batch, old_logp, ref_logp, cfg)
}

/// [`unigrpo_loss`] on [`Scores`]: for [`Scores::Hidden`] the head runs only at the scored
/// positions, in chunks, and the gradient reaches the model through
/// [`Scores::backprop`] with the upstream `∂loss/∂logp` that autodiff computes on a
/// `[n_tokens]` leaf (so the loss formula exists once, in [`unigrpo_loss`]'s terms). The
/// returned `loss` carries the whole gradient; `policy_loss`, `kl_loss` and `logp` are then
/// values only.
///
/// # Errors
/// As [`unigrpo_loss`].
pub fn unigrpo_loss_scores<B: AutodiffBackend>(
    scores: Scores<B>,
    batch: &GrpoBatch,
    old_logp: &[f32],
    ref_logp: Option<&[f32]>,
    cfg: &GrpoLossConfig,
) -> Result<GrpoLoss<B>, DiffusionError> {
    let Scores::Hidden { .. } = &scores else {
        let Scores::Logits(logits) = scores else {
            unreachable!()
        };
        return unigrpo_loss(logits, batch, old_logp, ref_logp, cfg);
    };
    check_inputs(batch, old_logp, ref_logp, cfg)?;
    let logp = batch.logprobs(scores.clone())?;
    let leaf = Tensor::<B, 1>::from_inner(logp.clone().inner()).require_grad();
    let terms = grpo_terms(leaf.clone(), batch, old_logp, ref_logp, cfg)?;
    let grads = terms.loss.backward();
    let n = logp.dims()[0];
    let u = leaf
        .grad(&grads)
        .map(Tensor::<B, 1>::from_inner)
        .unwrap_or_else(|| Tensor::zeros([n], (&logp.device(), DType::F32)));
    let (pos, tg, _) = batch.tokens();
    let carrier = scores.backprop(&pos, &tg, u);
    Ok(GrpoLoss {
        policy_loss: terms.policy_loss.detach(),
        kl_loss: terms.kl_loss.detach(),
        loss: terms.loss.detach() + carrier,
        logp: logp.detach(),
        stats: terms.stats,
    })
}

/// The input checks of [`unigrpo_loss`]: ε, β, a non-empty batch, old / reference lengths.
fn check_inputs(
    batch: &GrpoBatch,
    old_logp: &[f32],
    ref_logp: Option<&[f32]>,
    cfg: &GrpoLossConfig,
) -> Result<(), DiffusionError> {
    let eps_high = cfg.epsilon_high.unwrap_or(cfg.epsilon);
    if !(cfg.epsilon >= 0.0 && cfg.epsilon < 1.0 && eps_high >= 0.0 && cfg.beta >= 0.0) {
        return Err(DiffusionError::Range {
            what: "epsilon/epsilon_high/beta",
            value: format!("{}/{}/{}", cfg.epsilon, eps_high, cfg.beta),
            why: "need 0 <= epsilon < 1, epsilon_high >= 0, beta >= 0",
        });
    }
    let r = batch.rows();
    if r == 0 {
        return Err(DiffusionError::Range {
            what: "batch",
            value: "0 rows".into(),
            why: "no row has a masked completion token",
        });
    }
    let (_, _, row_of) = batch.tokens();
    let n = row_of.len();
    check_len("old_logp", old_logp.len(), n)?;
    if let Some(rf) = ref_logp {
        check_len("ref_logp", rf.len(), n)?;
    }
    Ok(())
}

/// The UniGRPO terms from the new per-token log-probs `logp` `[n_tokens]` (the body of
/// [`unigrpo_loss`]).
fn grpo_terms<B: Backend>(
    logp: Tensor<B, 1>,
    batch: &GrpoBatch,
    old_logp: &[f32],
    ref_logp: Option<&[f32]>,
    cfg: &GrpoLossConfig,
) -> Result<GrpoLoss<B>, DiffusionError> {
    let eps_high = cfg.epsilon_high.unwrap_or(cfg.epsilon);
    let r = batch.rows();
    let device = logp.device();
    let (_, _, row_of) = batch.tokens();
    let n = row_of.len();
    check_len("new logp", logp.dims()[0], n)?;

    let mut per_row = vec![0usize; r];
    for &row in &row_of {
        per_row[row] += 1;
    }
    let (w_pol, w_kl): (Vec<f32>, Vec<f32>) = row_of
        .iter()
        .map(|&row| {
            let row_mean = 1.0 / (per_row[row].max(1) as f32 * r as f32);
            match cfg.norm {
                LossNorm::DllmRl => (row_mean, 1.0 / r as f32),
                LossNorm::Sequence => (row_mean, row_mean),
                LossNorm::Token => (1.0 / n as f32, 1.0 / n as f32),
            }
        })
        .unzip();
    let adv: Vec<f32> = row_of.iter().map(|&row| batch.advantages[row]).collect();
    let f1 =
        |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v, [n]), (&device, DType::F32));

    let old = f1(old_logp.to_vec());
    let a = f1(adv.clone());
    let ratio = (logp.clone() - old.clone()).exp();
    let surr1 = ratio.clone() * a.clone();
    let surr2 = ratio.clone().clamp(1.0 - cfg.epsilon, 1.0 + eps_high) * a;
    let surr = surr1.min_pair(surr2);
    let policy_loss = (surr * f1(w_pol)).sum().neg().reshape([1]);

    let reference = match ref_logp {
        Some(rf) => f1(rf.to_vec()),
        None => old,
    };
    let d = logp.clone() - reference;
    let k3 = d.clone().neg().exp() - 1.0 + d;
    let kl_loss = if cfg.beta > 0.0 {
        (k3.clone() * f1(w_kl)).sum().reshape([1]) * cfg.beta
    } else {
        (k3.clone() * 0.0).sum().reshape([1])
    };
    let loss = policy_loss.clone() + kl_loss.clone();

    // Host statistics (detached).
    let ratio_h = ratio
        .detach()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|_| DiffusionError::Range {
            what: "ratio",
            value: "?".into(),
            why: "could not read back the ratio",
        })?;
    let k3_h = k3
        .detach()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default();
    let nf = n as f32;
    let (mut low, mut high, mut frac) = (0usize, 0usize, 0usize);
    for (i, &q) in ratio_h.iter().enumerate() {
        if q < 1.0 - cfg.epsilon && adv[i] < 0.0 {
            low += 1;
        }
        if q > 1.0 + eps_high && adv[i] > 0.0 {
            high += 1;
        }
        if (q - 1.0).abs() > cfg.epsilon {
            frac += 1;
        }
    }
    let stats = GrpoStats {
        rows: r,
        tokens: n,
        kl_mean: k3_h.iter().sum::<f32>() / nf,
        clip_low: low as f32 / nf,
        clip_high: high as f32 / nf,
        clip_region: (low + high) as f32 / nf,
        clip_fraction: frac as f32 / nf,
        ratio_mean: ratio_h.iter().sum::<f32>() / nf,
    };
    Ok(GrpoLoss {
        policy_loss,
        kl_loss,
        loss,
        logp,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic uniforms in [0, 1) (SplitMix64), seeded.
    fn uniforms(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect()
    }

    #[test]
    fn d1_noise_masks_the_whole_completion_and_prompt_at_the_rate() {
        const MASK: i64 = 99;
        const EOS: i64 = 7;
        let lp = 40;
        // completion: 5 tokens, EOS, then EOS pads (row length 40 + 12)
        let mut ids: Vec<i64> = (10..10 + lp as i64).collect();
        ids.extend([1, 2, 3, 4, 5, EOS, EOS, EOS, EOS, EOS, EOS, EOS]);
        let tail = Some(TailPad {
            pad_id: EOS,
            post_num: 1,
        });
        let (mut masked, mut total) = (0usize, 0usize);
        for row in 0..500u64 {
            let u = uniforms(row, lp);
            let r = noise_d1(&ids, lp, &u, 0.15, MASK, tail).unwrap();
            // completion: every position masked in the input
            assert!(r.noisy[lp..].iter().all(|&x| x == MASK));
            // scored: the 5 tokens and the first EOS (TRL completion_mask), never the prompt
            let scored: Vec<usize> = (0..ids.len()).filter(|&i| r.loss_mask[i]).collect();
            assert_eq!(scored, (lp..lp + 6).collect::<Vec<_>>());
            // prompt: masked exactly where u < p, otherwise intact
            for i in 0..lp {
                let m = r.noisy[i] == MASK;
                assert_eq!(m, u[i] < 0.15, "row {row} pos {i}");
                if !m {
                    assert_eq!(r.noisy[i], ids[i]);
                }
                masked += usize::from(m);
            }
            total += lp;
            // seeded: the same uniforms give the same row
            assert_eq!(
                r,
                noise_d1(&ids, lp, &uniforms(row, lp), 0.15, MASK, tail).unwrap()
            );
        }
        let rate = masked as f64 / total as f64;
        // 20 000 Bernoulli(0.15) draws: std 0.0025
        assert!((rate - 0.15).abs() < 0.01, "prompt mask rate {rate}");
        // p = 0: the prompt stays intact; post_num 0: the EOS is not scored
        let r = noise_d1(&ids, lp, &uniforms(1, lp), 0.0, MASK, None).unwrap();
        assert_eq!(&r.noisy[..lp], &ids[..lp]);
        assert_eq!(r.n_masked(), 12);
        let r0 = noise_d1(
            &ids,
            lp,
            &uniforms(1, lp),
            0.0,
            MASK,
            Some(TailPad {
                pad_id: EOS,
                post_num: 0,
            }),
        )
        .unwrap();
        assert_eq!(r0.n_masked(), 5);
        assert!(noise_d1(&ids, lp, &uniforms(1, lp - 1), 0.15, MASK, tail).is_err());
        assert!(noise_d1(&ids, lp, &uniforms(1, lp), 1.5, MASK, tail).is_err());
    }

    /// t2i completion (SFT t2i conventions): τ = 0.5 under the cosine schedule masks
    /// `round(4·cos(π/4)) = round(2.83) = 3` of the 4 image tokens — the three smallest
    /// scores — and only they are scored; log-probs and the clipped loss match the numbers
    /// worked out by hand (comments).
    #[test]
    fn t2i_noising_logprobs_and_loss_match_a_hand_computed_case() {
        use crate::noise::ImageMaskDraw;
        type B = mmada_model::backend::Cpu;
        const MASK: i64 = 15;
        // [text 1 2 3] <soi>=4, codes 10..13, <eoi>=5; image slot 4..8
        let ids = [1i64, 2, 3, 4, 10, 11, 12, 13, 5];
        let draw = ImageMaskDraw {
            tau: 0.5,
            scores: vec![0.9, 0.1, 0.5, 0.3],
        };
        let row = noise_image(&ids, 4, &draw, &crate::MaskSchedule::Cosine, MASK).unwrap();
        assert_eq!(row.noisy, vec![1, 2, 3, 4, 10, MASK, MASK, MASK, 5]);
        let scored: Vec<usize> = (0..9).filter(|&i| row.loss_mask[i]).collect();
        assert_eq!(
            scored,
            vec![5, 6, 7],
            "text, <soi>, <eoi> and the kept code unscored"
        );
        let mut b = GrpoBatch::new(9);
        assert!(b.push(row, &ids, 1.5, 0).unwrap());
        // logits [1, 9, 16], zero except the target logit: ln 3 at position 5 (label 11),
        // ln 15 at 6 (label 12), 0 at 7 (label 13) → p = 3/18, 15/30, 1/16
        let mut v = vec![0f32; 9 * 16];
        v[5 * 16 + 11] = 3f32.ln();
        v[6 * 16 + 12] = 15f32.ln();
        let logits = Tensor::<B, 3>::from_data(TensorData::new(v, [1, 9, 16]), &Default::default());
        let lp = b
            .logprobs(logits.clone())
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let want = [-1.791_759_5f32, -std::f32::consts::LN_2, -2.772_588_7]; // ln 1/6, ln 1/2, ln 1/16
        for (x, y) in lp.iter().zip(want) {
            assert!((x - y).abs() < 1e-5, "{lp:?}");
        }
        // old log-probs: equal, 0.5 lower, 0.1 higher → ratios 1, e^0.5 = 1.6487, e^-0.1 = 0.9048;
        // A = 1.5, ε = 0.2: surrogates 1.5, 1.2·1.5 = 1.8 (clipped), 1.3573;
        // policy = −(1.5 + 1.8 + 1.3573)/3 = −1.552419;
        // k3 = e^−d − 1 + d for d = 0, 0.5, −0.1: 0, 0.106531, 0.005171; KL (dLLM-RL: summed
        // over the row's tokens) × β 0.1 = 0.011170; loss = −1.541249
        let old = [lp[0], lp[1] - 0.5, lp[2] + 0.1];
        let cfg = GrpoLossConfig {
            epsilon: 0.2,
            epsilon_high: None,
            beta: 0.1,
            norm: LossNorm::DllmRl,
        };
        let out = unigrpo_loss(logits, &b, &old, None, &cfg).unwrap();
        let f = |t: Tensor<B, 1>| t.into_scalar();
        assert!((f(out.policy_loss) + 1.552_418_7).abs() < 1e-5);
        assert!((f(out.kl_loss) - 0.011_170_16).abs() < 1e-6);
        assert!((f(out.loss) + 1.541_248_6).abs() < 1e-5);
        assert_eq!(out.stats.tokens, 3);
        assert!(
            (out.stats.clip_high - 1.0 / 3.0).abs() < 1e-6,
            "one token clipped high"
        );
    }

    /// A t2i group whose rewards are all equal has advantage 0: with the old policy as KL
    /// reference (ratio exactly 1 on the first update) every gradient of the tiny model is
    /// exactly zero; the same rows with different rewards give a non-zero gradient.
    #[test]
    fn zero_variance_t2i_group_gives_zero_gradient() {
        use crate::noise::ImageMaskDraw;
        use burn::module::Module;
        use mmada_model::config::ModelConfig;
        use mmada_model::init::init_model;
        use mmada_model::{Attention, Denoiser};
        type Ad = burn::backend::Autodiff<mmada_model::backend::Cpu>;
        let dev = Default::default();
        let model = init_model::<Ad>(&ModelConfig::tiny(), 3, &dev, burn::tensor::FloatDType::F32);
        // tiny layout: image code c = id 320 + c, mask 300; [text…] <soi> 4 codes <eoi>
        let rows: Vec<Vec<i64>> = (0..3)
            .map(|r| vec![40, 41, 42, 43, 330 + r, 331, 340 + 2 * r, 350, 44])
            .collect();
        let grad_of = |rewards: [f32; 3]| {
            let adv = group_advantages(&rewards, 3, AdvantageOptions::default()).unwrap();
            let mut b = GrpoBatch::new(9);
            for (r, ids) in rows.iter().enumerate() {
                let draw = ImageMaskDraw {
                    tau: 0.3,
                    scores: vec![0.2 + 0.1 * r as f32, 0.7, 0.1, 0.5],
                };
                let row = noise_image(ids, 4, &draw, &crate::MaskSchedule::Cosine, 300).unwrap();
                b.push(row, ids, adv.advantages[r], r).unwrap();
            }
            let input = b.input::<Ad>(&dev);
            let old_model = model.clone().no_grad();
            let old = b
                .logprobs(old_model.logits(input.clone(), &Attention::Full))
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let cfg = GrpoLossConfig {
                beta: 0.04,
                ..Default::default()
            };
            let logits = model.logits(input, &Attention::Full);
            let out = unigrpo_loss(logits, &b, &old, None, &cfg).unwrap();
            let grads = out.loss.backward();
            let abs_max = |t: Option<Tensor<mmada_model::backend::Cpu, 2>>| {
                t.expect("a gradient").abs().max().into_scalar()
            };
            (
                adv.zero_std[0],
                abs_max(model.wte.weight.grad(&grads)),
                abs_max(model.ff_out.weight.grad(&grads)),
            )
        };
        let (zero, g_emb, g_head) = grad_of([0.7, 0.7, 0.7]);
        assert!(zero);
        assert_eq!((g_emb, g_head), (0.0, 0.0));
        let (zero, g_emb, g_head) = grad_of([1.0, 0.0, 0.5]);
        assert!(!zero);
        assert!(g_emb > 1e-6 && g_head > 1e-6, "{g_emb} {g_head}");
    }

    fn opts(scale: ScaleRewards) -> AdvantageOptions {
        AdvantageOptions {
            scale,
            ..Default::default()
        }
    }

    #[test]
    fn advantages_group_batch_none() {
        // dLLM-RL fixture rewards: population z-score.
        let a = group_advantages(&[1.0, 0.0, 1.0, 0.5], 4, opts(ScaleRewards::Group)).unwrap();
        let want = [0.904_534, -1.507_557, 0.904_534, -0.301_511];
        for (x, y) in a.advantages.iter().zip(want) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        // Two groups, second all-equal (0.1 three times: not exactly representable).
        let r = [1.0, 0.0, 0.1, 0.1, 0.1, 0.1];
        let g = group_advantages(&r, 2, opts(ScaleRewards::Group)).unwrap();
        assert_eq!(g.advantages, vec![1.0, -1.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(g.zero_std, vec![false, true, true]);
        assert!((g.frac_zero_std() - 2.0 / 3.0).abs() < 1e-6);
        let n = group_advantages(&r, 2, opts(ScaleRewards::None)).unwrap();
        assert_eq!(n.advantages, vec![0.5, -0.5, 0.0, 0.0, 0.0, 0.0]);
        let b = group_advantages(&r, 2, opts(ScaleRewards::Batch)).unwrap();
        let mean = (1.0 + 0.4) / 6.0f64;
        let std = ((r.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>()) / 6.0).sqrt();
        assert!((b.advantages[0] as f64 - 0.5 / std).abs() < 1e-6);
        // TRL: Bessel std + eps.
        let t = group_advantages(
            &[1.0, 0.0],
            2,
            AdvantageOptions {
                scale: ScaleRewards::Group,
                eps: 1e-4,
                unbiased_std: true,
            },
        )
        .unwrap();
        let s = std::f64::consts::FRAC_1_SQRT_2;
        assert!((t.advantages[0] as f64 - 0.5 / (s + 1e-4)).abs() < 1e-6);
        assert!(group_advantages(&[1.0, 2.0, 3.0], 2, opts(ScaleRewards::Group)).is_err());
        assert!(group_advantages(&[f32::NAN, 1.0], 2, opts(ScaleRewards::Group)).is_err());
    }

    #[test]
    fn ratio_schedules() {
        let s = MaskRatioSchedule::UniformSpaced { timesteps: 1000 };
        // Paper: start 100, 5 iterations -> 100, 325, 550, 775, 1000 (spec §5.1 note).
        let r = s.ratios(5, &[0.1]).unwrap();
        assert_eq!(r, vec![0.1, 0.325, 0.55, 0.775, 1.0]);
        assert_eq!(s.ratios(1, &[0.4567]).unwrap(), vec![0.456]);
        let u = MaskRatioSchedule::Uniform {
            lower: 0.1,
            upper: 0.9,
        };
        // f32 arithmetic as upstream `(upper - lower) * rand + lower`.
        let r = u.ratios(2, &[0.0, 0.5]).unwrap();
        assert_eq!(r, vec![0.1, (0.9f32 - 0.1) * 0.5 + 0.1]);
        assert!((r[1] - 0.5).abs() < 1e-6);
        assert!(u.ratios(2, &[0.5]).is_err());
        assert!(
            MaskRatioSchedule::Uniform {
                lower: 0.9,
                upper: 0.1
            }
            .validate()
            .is_err()
        );
        assert!(
            MaskRatioSchedule::UniformSpaced { timesteps: 0 }
                .validate()
                .is_err()
        );
    }

    #[test]
    fn noising_keeps_prompt_and_handles_tail_pads() {
        // prompt [1 2], completion [5 6 9 9 9] with pad 9, post_num 1.
        let ids = [1, 2, 5, 6, 9, 9, 9];
        let mask = [true, false, true, true, false];
        let row = noise_completion(
            &ids,
            2,
            &mask,
            0,
            Some(TailPad {
                pad_id: 9,
                post_num: 1,
            }),
        )
        .unwrap();
        assert_eq!(row.noisy, vec![1, 2, 0, 6, 0, 0, 0]);
        assert_eq!(
            row.loss_mask,
            vec![false, false, true, false, true, false, false]
        );
        assert_eq!(row.n_masked(), 2);
        let mut b = GrpoBatch::new(7);
        let empty = noise_completion(&ids, 2, &[false; 5], 0, None).unwrap();
        assert!(!b.push(empty, &ids, 1.0, 0).unwrap());
        assert!(b.push(row, &ids, 1.0, 0).unwrap());
        assert_eq!(b.rows(), 1);
        assert_eq!(b.tokens(), (vec![2, 4], vec![5, 9], vec![0, 0]));
        assert_eq!(
            completion_mask(0.5, &[0.1, 0.5, 0.9]),
            vec![true, false, false]
        );
    }
}
