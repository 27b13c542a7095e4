//! The UniGRPO recipe (`mmada-train unigrpo --recipe FILE`, spec §5): [`UniGrpoRecipe`] and
//! the sections only UniGRPO has (`prompts`, `grpo`, `rollout`, `reward_funcs`, `train`), with
//! TRL `GRPOConfig` key names where they exist. Shared sections live in [`crate::recipe`].

use std::path::PathBuf;

use mmada_data::manifest::Manifest;
use mmada_diffusion::grpo::{
    AdvantageOptions, GrpoLossConfig, LossNorm, MaskRatioSchedule, ScaleRewards,
};
use mmada_rewards::RewardSpec;
use mmada_sampler::SamplerSection;
use serde::{Deserialize, Serialize};

use super::{
    CheckpointSection, ImageTokenizerSection, LoggingSection, MixedPrecision, ModelSection,
    OptimizerSection, Recipe, RecipeError, RunConfig, ScheduleSection, Sharding, TokenizerSection,
    cpu, one_f32, one_u64, validate_device, validate_log_every, yes,
};

serde_defaults! {
    default_max_prompt: usize = 512;
    default_p_mask_prompt: f32 = 0.15;
    one: usize = 1;
    default_beta: f32 = 0.01;
    default_eps: f32 = 0.2;
    default_timesteps: u32 = 1000;
    default_lower: f32 = 0.1;
    default_upper: f32 = 0.9;
    ce_chunk: usize = mmada_diffusion::DEFAULT_CE_CHUNK_ROWS;
    default_maskgit_steps: usize = 18;
    default_maskgit_temperature: f64 = 1.0;
}

/// `prompts.template`: how a prompt example becomes prompt text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptTemplate {
    /// MMaDA chat template (`\n` after the header; default).
    #[default]
    Mmada,
    /// LLaDA-8B-Instruct chat template (`\n\n` after the header).
    Llada,
    /// The raw question.
    None,
}

impl PromptTemplate {
    /// The chat template, `None` for the raw question.
    pub fn chat(self) -> Option<mmada_data::ChatTemplate> {
        match self {
            PromptTemplate::Mmada => Some(mmada_data::ChatTemplate::mmada()),
            PromptTemplate::Llada => Some(mmada_data::ChatTemplate::llada()),
            PromptTemplate::None => None,
        }
    }
}

/// `prompts:` — where the prompts (and the reward fields) come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptsSection {
    /// A dataset manifest file (`data_manifests/gsm8k.yaml`).
    #[serde(default)]
    pub manifest: Option<PathBuf>,
    /// Or an inline manifest.
    #[serde(default)]
    pub inline: Option<Manifest>,
    /// Override of the manifest's `source.path` (a local file or glob).
    #[serde(default)]
    pub path: Option<String>,
    /// Root for relative data paths.
    #[serde(default)]
    pub data_root: Option<PathBuf>,
    /// Use at most this many examples.
    #[serde(default)]
    pub max_examples: Option<usize>,
    /// Chat template: `mmada` (default), `llada` or `none` (raw question).
    #[serde(default)]
    pub template: PromptTemplate,
    /// Prepend the long-CoT `<think>` instruction to the question (default true).
    #[serde(default = "yes")]
    pub cot: bool,
    /// Prompts longer than this (in tokens, BOS included) keep their last tokens (default 512,
    /// dLLM-RL `max_prompt_len`).
    #[serde(default = "default_max_prompt")]
    pub max_prompt_length: usize,
}

impl Default for PromptsSection {
    /// No source (`manifest` and `inline` unset), the defaults of every other key.
    fn default() -> Self {
        serde_norway::from_str("{}").expect("defaults")
    }
}

impl PromptsSection {
    /// Whether no source is given (the top-level `prompts:` of a recipe with `tasks:`).
    pub fn is_unset(&self) -> bool {
        self.manifest.is_none() && self.inline.is_none()
    }
}

/// `grpo.mask_ratio`: where the mask ratio of each (completion, inner iteration) comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskRatioKind {
    /// Paper Algorithm 1: μ ratios uniformly spaced from a random start (default).
    #[default]
    UniformSpaced,
    /// dLLM-RL: i.i.d. `U[lower_p, upper_p]`.
    Uniform,
}

/// `grpo.kl_reference`: the policy the KL penalty is measured against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlReference {
    /// The pre-update snapshot of the step (dLLM-RL; default).
    #[default]
    OldPolicy,
    /// The initial weights, kept as a frozen reference model (paper / TRL).
    ReferenceModel,
}

/// `grpo.estimator`: how a completion's log-probabilities are estimated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// UniGRPO structured noising of the completion with `mask_ratio` (default).
    #[default]
    Structured,
    /// d1 `diffu_grpo_trainer.py`: completion fully masked, prompt tokens masked with
    /// probability `p_mask_prompt`, one forward pass.
    D1,
}

/// `grpo:` — the algorithm, with TRL `GRPOConfig` key names where they exist.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoSection {
    /// Completions per prompt `G` (≥ 2; TRL `num_generations`).
    pub num_generations: usize,
    /// Completions per step (a multiple of `num_generations`; TRL `generation_batch_size`).
    pub generation_batch_size: usize,
    /// Inner updates μ per rollout batch (TRL `num_iterations`; default 1).
    #[serde(default = "one")]
    pub num_iterations: usize,
    /// KL weight β (default 0.01, dLLM-RL).
    #[serde(default = "default_beta")]
    pub beta: f32,
    /// Lower clip ε (default 0.2).
    #[serde(default = "default_eps")]
    pub epsilon: f32,
    /// Upper clip (default = `epsilon`).
    #[serde(default)]
    pub epsilon_high: Option<f32>,
    /// `group` (default), `batch` or `none`.
    #[serde(default)]
    pub scale_rewards: ScaleRewards,
    /// Added to the std in the advantage (default 0 with the zero-std guard, as dLLM-RL; TRL
    /// uses 1e-4).
    #[serde(default)]
    pub advantage_eps: f32,
    /// `dllm_rl` (default), `sequence` (paper eq., TRL `grpo`) or `token` (TRL `bnpo` /
    /// `dapo`); TRL's names are accepted, `dr_grpo` is refused (see [`LossNorm`]).
    #[serde(default)]
    pub loss_type: LossNorm,
    /// `uniform_spaced` (paper Algorithm 1, default) or `uniform` (dLLM-RL).
    #[serde(default)]
    pub mask_ratio: MaskRatioKind,
    /// `T` of the uniformly-spaced schedule (default 1000).
    #[serde(default = "default_timesteps")]
    pub timesteps: u32,
    /// Lower bound of `uniform` ratios (default 0.1).
    #[serde(default = "default_lower")]
    pub lower_p: f32,
    /// Upper bound of `uniform` ratios (default 0.9).
    #[serde(default = "default_upper")]
    pub upper_p: f32,
    /// Trailing EOS pads trained as ordinary tokens (dLLM-RL `post_num`, default 0).
    #[serde(default)]
    pub post_num: usize,
    /// `old_policy` (dLLM-RL, default) or `reference_model` (the initial weights, paper/TRL).
    #[serde(default)]
    pub kl_reference: KlReference,
    /// Copy the policy into the reference model every N steps (0 = never). TRL's name;
    /// `sync_ref_model_steps` (this project's earlier spelling) is accepted too.
    #[serde(default, alias = "sync_ref_model_steps")]
    pub ref_model_sync_steps: u64,
    /// Completion length = sampler `gen_length` (TRL `max_completion_length`).
    pub max_completion_length: usize,
    /// Log-prob estimator: `structured` (default; UniGRPO structured noising of the
    /// completion with `mask_ratio`) or `d1` (d1 `diffu_grpo_trainer.py`: completion fully
    /// masked, prompt tokens masked with probability `p_mask_prompt`, one forward pass; the
    /// first EOS is scored as in TRL's `completion_mask`, so `post_num` is at least 1).
    #[serde(default)]
    pub estimator: Estimator,
    /// Prompt masking probability of `estimator: d1` (d1 default 0.15).
    #[serde(default = "default_p_mask_prompt")]
    pub p_mask_prompt: f32,
    /// `N > 0` (default 512, `mmada_diffusion::DEFAULT_CE_CHUNK_ROWS`): every log-probability (policy, old policy, reference) with
    /// the head only at the scored completion tokens, `N` rows of hidden states at a time
    /// (`mmada_diffusion::head`; same values and gradients). `0`: from full logits.
    #[serde(default = "ce_chunk")]
    pub ce_chunk_rows: usize,
}

impl GrpoSection {
    /// Prompt groups per step (`generation_batch_size / num_generations`).
    pub fn prompts_per_step(&self) -> usize {
        self.generation_batch_size / self.num_generations
    }

    /// Whether a frozen reference model is kept (`kl_reference: reference_model`, β > 0).
    pub fn uses_reference_model(&self) -> bool {
        self.kl_reference == KlReference::ReferenceModel && self.beta > 0.0
    }

    /// The mask-ratio schedule of `mask_ratio`.
    pub fn mask_schedule(&self) -> MaskRatioSchedule {
        match self.mask_ratio {
            MaskRatioKind::Uniform => MaskRatioSchedule::Uniform {
                lower: self.lower_p,
                upper: self.upper_p,
            },
            MaskRatioKind::UniformSpaced => MaskRatioSchedule::UniformSpaced {
                timesteps: self.timesteps,
            },
        }
    }

    /// The loss parameters.
    pub fn loss_config(&self) -> GrpoLossConfig {
        GrpoLossConfig {
            epsilon: self.epsilon,
            epsilon_high: self.epsilon_high,
            beta: self.beta,
            norm: self.loss_type,
        }
    }

    /// Advantage options.
    pub fn advantage_options(&self) -> AdvantageOptions {
        AdvantageOptions {
            scale: self.scale_rewards,
            eps: self.advantage_eps,
            unbiased_std: false,
        }
    }

    /// Group size, batch, μ, ε, β, completion length, `p_mask_prompt` and the mask-ratio
    /// schedule.
    ///
    /// # Errors
    /// [`RecipeError::Key`] naming the `grpo.…` key, with the valid values.
    pub fn validate(&self, name: &str) -> Result<(), RecipeError> {
        let err = |k: &str, m: String| Err(RecipeError::key(name, k, m));
        if self.num_generations < 2 {
            return err(
                "grpo.num_generations",
                format!(
                    "{} is invalid: group advantages need at least 2 completions per prompt (valid: 2, 3, 4, …)",
                    self.num_generations
                ),
            );
        }
        let n = self.num_generations;
        if self.generation_batch_size == 0 || !self.generation_batch_size.is_multiple_of(n) {
            return err(
                "grpo.generation_batch_size",
                format!(
                    "{} is not a multiple of num_generations {n}: valid values are {n}, {}, {}, …",
                    self.generation_batch_size,
                    2 * n,
                    3 * n
                ),
            );
        }
        if self.num_iterations == 0 {
            return err(
                "grpo.num_iterations",
                "0 is invalid: need at least 1".into(),
            );
        }
        if !(0.0..1.0).contains(&self.epsilon) {
            return err(
                "grpo.epsilon",
                format!("{} is invalid: need 0 <= epsilon < 1", self.epsilon),
            );
        }
        if self.epsilon_high.is_some_and(|e| e.is_nan() || e < 0.0) {
            return err("grpo.epsilon_high", "must be >= 0".into());
        }
        if self.beta.is_nan() || self.beta < 0.0 {
            return err(
                "grpo.beta",
                format!("{} is invalid: need beta >= 0", self.beta),
            );
        }
        if self.max_completion_length == 0 {
            return err("grpo.max_completion_length", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.p_mask_prompt) {
            return err(
                "grpo.p_mask_prompt",
                format!(
                    "{} is invalid: need 0 <= p_mask_prompt < 1 (d1 uses 0.15)",
                    self.p_mask_prompt
                ),
            );
        }
        self.mask_schedule()
            .validate()
            .map_err(|e| RecipeError::key(name, "grpo.mask_ratio", e.to_string()))
    }
}

/// `tasks[i].kind`: what a task's prompts and completions are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Text prompt, text completion from the block sampler (the single-task recipe).
    Text,
    /// Multimodal understanding: `<|mmu|> <|soi|> image codes <|eoi|>` + the chat-templated
    /// question (spec §2.4 d, inference form), text completion from the block sampler.
    Mmu,
    /// Text-to-image: the t2i prompt of the caption (spec §2.4 c), the image tokens sampled
    /// by the MaskGIT sampler (spec §4.3, with CFG) are the completion; the decoded image
    /// reaches the rewards.
    T2i,
}

impl TaskKind {
    /// The recipe spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Text => "text",
            TaskKind::Mmu => "mmu",
            TaskKind::T2i => "t2i",
        }
    }
}

/// `tasks[i].maskgit` — the MaskGIT sampler of a `t2i` task's rollouts (spec §4.3; upstream
/// `t2i_generate` keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskGitSection {
    /// MaskGIT steps `S` (upstream `timesteps`, default 18).
    #[serde(default = "default_maskgit_steps")]
    pub timesteps: usize,
    /// Classifier-free guidance weight `w` (`(1 + w)·cond − w·uncond` with the empty
    /// caption; default 0 = off; upstream inference 3.5).
    #[serde(default)]
    pub guidance_scale: f64,
    /// Initial Gumbel temperature of the re-masking (default 1.0, annealed as upstream).
    #[serde(default = "default_maskgit_temperature")]
    pub temperature: f64,
    /// Mask-ratio schedule `γ` of the sampler (default cosine).
    #[serde(default)]
    pub noise_schedule: mmada_sampler::MaskSchedule,
}

impl Default for MaskGitSection {
    fn default() -> Self {
        serde_norway::from_str("{}").expect("defaults")
    }
}

/// `tasks[i].t2i_attention` of a `t2i` task: whether the `[iPAD]` left padding of the caption
/// (spec §2.4 c) is visible to attention. The same choice holds in the rollout (the MaskGIT
/// sampler) and in every forward of the update (policy, old policy, reference), so the
/// log-probs are those of the distribution that sampled the images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum T2iPadAttention {
    /// Full attention, pads visible (default): the regime the released MMaDA-8B-Base /
    /// MixCoT checkpoints were trained in (spec §1.3, before upstream commit `0ef94ba`), and
    /// SFT's `loss.t2i_attention: full`.
    #[default]
    Full,
    /// The pads are hidden from every query: the boolean `attention_bias` that upstream's
    /// `t2i_generate` passes (`m[:, :, None] & m[:, None, :]`, spec §1.3), and SFT's
    /// `loss.t2i_attention: hard`. The update uses the key-padding mask, which gives every
    /// non-pad position the same attention as the pairwise mask of the sampler.
    Hard,
}

/// One entry of `tasks:`.
///
/// ```yaml
/// tasks:
///   - {name: gsm8k, kind: text, share: 2, prompts: {manifest: gsm8k.yaml},
///      reward_funcs: [{kind: math_correctness}, {kind: think_format}]}
///   - {name: vqa, kind: mmu, share: 1, prompts: {manifest: clevr.yaml},
///      reward_funcs: [{kind: exact_match}]}
///   - {name: t2i, kind: t2i, share: 1, prompts: {manifest: captions.yaml, max_prompt_length: 128},
///      maskgit: {timesteps: 18, guidance_scale: 3.5},
///      reward_funcs: [{kind: http, name: clip, weight: 0.1, params: {url: "http://localhost:8000/clip"}}]}
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    /// Name in the metrics (`rewards/<name>/<fn>/mean`); default the kind. Unique, no `/`.
    #[serde(default)]
    pub name: Option<String>,
    /// `text`, `mmu` or `t2i`.
    pub kind: TaskKind,
    /// Relative share of each step's prompt groups (`generation_batch_size /
    /// num_generations`), split by largest remainder; every task gets at least one group
    /// (default 1).
    #[serde(default = "one_f32")]
    pub share: f32,
    /// The prompts. `text`: questions / messages; `mmu`: questions with an image (path,
    /// bytes or codes); `t2i`: captions (`caption`, else `question`, else `text`), and
    /// `max_prompt_length` is the t2i text length `P` (spec §2.4 c, upstream
    /// `max_seq_length`).
    pub prompts: PromptsSection,
    /// The task's rewards, as the top-level `reward_funcs:`.
    pub reward_funcs: Vec<RewardSpec>,
    /// `text` / `mmu`: the block sampler (default the top-level `rollout:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<SamplerSection>,
    /// `text` / `mmu`: completion length (default `grpo.max_completion_length`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_length: Option<usize>,
    /// `t2i`: the MaskGIT sampler (defaults of [`MaskGitSection`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maskgit: Option<MaskGitSection>,
    /// `t2i`: the mask-ratio schedule `γ` of the structured noising of the image tokens (as
    /// SFT's `loss.mask_schedule`; default cosine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_schedule: Option<mmada_diffusion::MaskSchedule>,
    /// `t2i`: `full` (default) or `hard`, the attention over the caption's padding in the
    /// rollout and the update ([`T2iPadAttention`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t2i_attention: Option<T2iPadAttention>,
}

/// A task with everything resolved: the single-task recipe is one `text` task named `""`
/// (its metrics keep their names, `rewards/<fn>/mean`).
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// Metric name, `""` for the single-task recipe.
    pub name: String,
    /// Kind.
    pub kind: TaskKind,
    /// Prompts.
    pub prompts: PromptsSection,
    /// Rewards.
    pub reward_funcs: Vec<RewardSpec>,
    /// Key path of the rewards in the recipe (`reward_funcs` or `tasks[i].reward_funcs`).
    pub reward_key: String,
    /// Key path of the task (`tasks[i]`, `""` for the single-task recipe).
    pub key: String,
    /// `text` / `mmu`: the sampler section with `gen_length`, `steps`, `block_length` set.
    pub rollout: SamplerSection,
    /// `text` / `mmu`: completion length.
    pub max_completion_length: usize,
    /// `t2i`: the MaskGIT sampler.
    pub maskgit: MaskGitSection,
    /// `t2i`: noising schedule of the image tokens.
    pub mask_schedule: mmada_diffusion::MaskSchedule,
    /// `t2i`: attention over the caption's padding, in the rollout and the update.
    pub t2i_attention: T2iPadAttention,
    /// Prompt groups of this task per step.
    pub groups: usize,
    /// Its first group slot in the step (slots `first_slot .. first_slot + groups`).
    pub first_slot: usize,
}

/// Largest-remainder split of `total` groups by `shares` (ties to the earlier task).
pub fn split_groups(total: usize, shares: &[f32]) -> Vec<usize> {
    let sum: f64 = shares.iter().map(|&s| f64::from(s)).sum();
    let exact: Vec<f64> = shares
        .iter()
        .map(|&s| f64::from(s) / sum * total as f64)
        .collect();
    let mut out: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut left = total - out.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..shares.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for i in order {
        if left == 0 {
            break;
        }
        out[i] += 1;
        left -= 1;
    }
    out
}

/// `train:` of a UniGRPO recipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoTrainSection {
    /// RL steps (rollout batches).
    pub max_steps: u64,
    /// Log every N steps (default 1).
    #[serde(default = "one_u64")]
    pub log_every: u64,
    /// `cpu`, `cpu:N`, `cuda:N`, `cuda:0,1,2,3` or `cuda:all` (several devices = data
    /// parallelism, see `crate::unigrpo::UniGrpo`; see `mmada_model::backend::DeviceSpec`).
    #[serde(default = "cpu")]
    pub device: String,
    /// Mixed precision as in SFT (accelerate's name): `no` (default) or `bf16` (f32 master
    /// weights and AdamW state, bf16 matmuls in rollouts, log-probs and updates; needs
    /// `model.dtype: f32`). The reference model computes in the same precision.
    #[serde(default)]
    pub mixed_precision: MixedPrecision,
    /// Stop the run after this many consecutive steps whose loss or gradient norm is NaN/inf
    /// (their updates are skipped; see `crate::guard`). Default 5.
    #[serde(default = "super::max_nonfinite_steps")]
    pub max_nonfinite_steps: u32,
    /// ZeRO sharding over data-parallel ranks: `none` (default), `optimizer` (stage 1:
    /// AdamW state and master weights split over ranks), `optimizer_and_gradients` (stage 2:
    /// gradients reduced to their owner only). Checkpoints stay consolidated either way.
    #[serde(default)]
    pub sharding: Sharding,
    /// Activation checkpointing per transformer block (`crate::recompute`): the forward keeps
    /// only each block's input and the backward recomputes one block at a time. Same
    /// gradients, about a third more compute, activations bounded by one block. Default false.
    #[serde(default)]
    pub activation_checkpointing: bool,
}

/// A UniGRPO recipe (`mmada-train unigrpo --recipe …`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UniGrpoRecipe {
    /// Run identity.
    pub run: RunConfig,
    /// Initial policy (usually an SFT checkpoint).
    pub model: ModelSection,
    /// Tokenizer.
    pub tokenizer: TokenizerSection,
    /// Prompts of a single-task recipe (text reasoning). With `tasks:` each task has its own
    /// `prompts:` and this key must be absent.
    #[serde(default, skip_serializing_if = "PromptsSection::is_unset")]
    pub prompts: PromptsSection,
    /// Algorithm.
    pub grpo: GrpoSection,
    /// Rollout sampler: the sampler settings section `mmada-infer`'s `sampling:` uses
    /// ([`SamplerSection`]: `steps`, `block_length`, `temperature`, `cfg_scale`, `remasking`,
    /// `threshold`, `cache` (`none` / `prefix` / `dual`), `refresh_every`, `vicinity`,
    /// `sample_vocab`, …; unknown keys rejected). `gen_length` is
    /// `grpo.max_completion_length`; `steps` and `block_length` default to it; ids are the
    /// tokenizer's.
    #[serde(default)]
    pub rollout: SamplerSection,
    /// Rewards (`kind`, `name`, `weight`, `params`) of a single-task recipe; see
    /// `mmada_rewards`. With `tasks:` each task has its own `reward_funcs:` and this key must
    /// be absent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reward_funcs: Vec<RewardSpec>,
    /// AdamW.
    pub optimizer: OptimizerSection,
    /// LR schedule over all optimizer steps (`max_steps · num_iterations`).
    #[serde(default)]
    pub schedule: ScheduleSection,
    /// Loop.
    pub train: GrpoTrainSection,
    /// Checkpoints.
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    /// Metrics besides `metrics.jsonl`: `wandb:` (see `mmada_wandb::WandbConfig`), the same
    /// section and code path as SFT ([`crate::wandb_log`]).
    #[serde(default)]
    pub logging: LoggingSection,
    /// LoRA adapters (absent: full fine-tuning), as SFT's `lora:`. The KL reference
    /// (`kl_reference: reference_model`) is then the base with the adapters off: no second
    /// copy of the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<super::LoraSection>,
    /// Several tasks in one run (MMaDA §3.3 UniGRPO: text reasoning, multimodal
    /// understanding and text-to-image): each with its prompts, kind, share of each step's
    /// groups, rollout settings and rewards ([`TaskSection`]). Absent: one `text` task from
    /// the top-level `prompts:`, `rollout:` and `reward_funcs:` (the single-task recipe).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskSection>,
    /// MAGVIT-v2 image tokenizer of `mmu` prompt images and `t2i` completions (SFT's
    /// `data.image_tokenizer` section: `checkpoint`, `resolution`, `mmu_mode`, `cache_dir`,
    /// `codes`; `t2i_mode` is not used). Needed by `t2i` tasks (the decoded images reach the
    /// rewards) and by `mmu` prompts whose images are files rather than codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tokenizer: Option<ImageTokenizerSection>,
}

impl UniGrpoRecipe {
    /// The rollout sampler settings of the single-task recipe: [`Self::sampler_for`] of
    /// `rollout:` and `grpo.max_completion_length`.
    pub fn rollout_section(&self) -> SamplerSection {
        Self::sampler_for(&self.rollout, self.grpo.max_completion_length)
    }

    /// A sampler section with `gen_length = len`, and `steps` / `block_length` defaulting to
    /// it (pure diffusion over the completion, one token per step).
    pub fn sampler_for(rollout: &SamplerSection, len: usize) -> SamplerSection {
        let len = Some(len);
        SamplerSection {
            gen_length: len,
            steps: rollout.steps.or(len),
            block_length: rollout.block_length.or(len),
            ..rollout.clone()
        }
    }

    /// The tasks of the run, resolved ([`TaskSpec`]): the `tasks:` list, or the single text
    /// task of `prompts:` / `rollout:` / `reward_funcs:`. Group slots are assigned in task
    /// order, each task's share by [`split_groups`].
    pub fn task_specs(&self) -> Vec<TaskSpec> {
        let total = self.grpo.prompts_per_step();
        if self.tasks.is_empty() {
            return vec![TaskSpec {
                name: String::new(),
                kind: TaskKind::Text,
                prompts: self.prompts.clone(),
                reward_funcs: self.reward_funcs.clone(),
                reward_key: "reward_funcs".into(),
                key: String::new(),
                rollout: self.rollout_section(),
                max_completion_length: self.grpo.max_completion_length,
                maskgit: MaskGitSection::default(),
                mask_schedule: Default::default(),
                t2i_attention: T2iPadAttention::Full,
                groups: total,
                first_slot: 0,
            }];
        }
        let shares: Vec<f32> = self.tasks.iter().map(|t| t.share).collect();
        let groups = split_groups(total, &shares);
        let mut first = 0;
        self.tasks
            .iter()
            .zip(groups)
            .enumerate()
            .map(|(i, (t, g))| {
                let len = t
                    .max_completion_length
                    .unwrap_or(self.grpo.max_completion_length);
                let spec = TaskSpec {
                    name: t.name.clone().unwrap_or_else(|| t.kind.as_str().into()),
                    kind: t.kind,
                    prompts: t.prompts.clone(),
                    reward_funcs: t.reward_funcs.clone(),
                    reward_key: format!("tasks[{i}].reward_funcs"),
                    key: format!("tasks[{i}]"),
                    rollout: Self::sampler_for(t.rollout.as_ref().unwrap_or(&self.rollout), len),
                    max_completion_length: len,
                    maskgit: t.maskgit.clone().unwrap_or_default(),
                    mask_schedule: t.mask_schedule.unwrap_or_default(),
                    t2i_attention: t.t2i_attention.unwrap_or_default(),
                    groups: g,
                    first_slot: first,
                };
                first += g;
                spec
            })
            .collect()
    }

    /// A sampler section (`key` = `rollout` or `tasks[i].rollout`) leaves `gen_length` to the
    /// completion length (`len_key`) and passes the sampler's checks (block length dividing
    /// the completion length, steps per block, …), so a bad setting is reported when the
    /// recipe is read, not after the model is loaded.
    fn validate_rollout(
        name: &str,
        rollout: &SamplerSection,
        key: &str,
        len: usize,
        len_key: &str,
    ) -> Result<(), RecipeError> {
        if rollout.gen_length.is_some_and(|g| g != len) {
            return Err(RecipeError::key(
                name,
                &format!("{key}.gen_length"),
                format!("the completion length is {len_key} ({len}): set that instead"),
            ));
        }
        for (k, set, why) in [
            (
                "preset",
                rollout.preset.is_some(),
                "gen_length is the completion length and steps / block_length default to it: set steps and block_length",
            ),
            (
                "batch_size",
                rollout.batch_size.is_some(),
                "a rollout decodes the G completions of one prompt together (grpo.num_generations)",
            ),
        ] {
            if set {
                return Err(RecipeError::key(
                    name,
                    &format!("{key}.{k}"),
                    format!("not used by UniGRPO: {why}"),
                ));
            }
        }
        let layout = mmada_model::TokenLayout::llada();
        match Self::sampler_for(rollout, len).to_config(&layout, layout.total_vocab() as usize) {
            Ok(_) => Ok(()),
            Err(mmada_sampler::SamplerError::InvalidConfig { field, reason }) => {
                // gen_length is the completion length, set elsewhere
                let k = if field == "gen_length" {
                    len_key.to_string()
                } else {
                    format!("{key}.{field}")
                };
                Err(RecipeError::key(name, &k, reason))
            }
            Err(e) => Err(RecipeError::key(name, key, e.to_string())),
        }
    }

    /// The checks of `tasks:` (each task's keys by kind, names, shares, rewards, image
    /// tokenizer) or of the single-task `prompts:` / `reward_funcs:`.
    fn validate_tasks(&self, name: &str) -> Result<(), RecipeError> {
        if self.tasks.is_empty() {
            return self.validate_single_task(name);
        }
        for (k, set) in [
            ("prompts", !self.prompts.is_unset()),
            ("reward_funcs", !self.reward_funcs.is_empty()),
        ] {
            if set {
                return Err(RecipeError::key(
                    name,
                    k,
                    format!(
                        "with a `tasks:` list each task has its own `{k}:`: move it into the tasks and remove the top-level key"
                    ),
                ));
            }
        }
        let specs = self.task_specs();
        let mut names: Vec<&str> = vec![];
        for (i, (t, spec)) in self.tasks.iter().zip(&specs).enumerate() {
            self.validate_task_common(name, i, t, spec, &names)?;
            names.push(&spec.name);
            match t.kind {
                TaskKind::Text | TaskKind::Mmu => self.validate_text_task(name, i, t, spec)?,
                TaskKind::T2i => self.validate_t2i_task(name, i, t, spec)?,
            }
        }
        Ok(())
    }

    /// No `tasks:` list: the top-level `prompts:`, `rollout:` and `reward_funcs:`.
    fn validate_single_task(&self, name: &str) -> Result<(), RecipeError> {
        if self.prompts.is_unset() {
            return Err(RecipeError::key(
                name,
                "prompts",
                "missing: give `prompts: {manifest: FILE}` (one text task) or a `tasks:` list",
            ));
        }
        check_prompts_source(name, "prompts", &self.prompts)?;
        Self::validate_rollout(
            name,
            &self.rollout,
            "rollout",
            self.grpo.max_completion_length,
            "grpo.max_completion_length",
        )?;
        if self.reward_funcs.is_empty() {
            return Err(RecipeError::key(
                name,
                "reward_funcs",
                "give at least one reward, e.g. `- kind: math_correctness`",
            ));
        }
        Ok(())
    }

    /// The keys every task has: `name` (valid, not in `taken`), `share`, `prompts`,
    /// `reward_funcs`.
    fn validate_task_common(
        &self,
        name: &str,
        i: usize,
        t: &TaskSection,
        spec: &TaskSpec,
        taken: &[&str],
    ) -> Result<(), RecipeError> {
        let err = |k: &str, m: String| Err(RecipeError::key(name, &format!("tasks[{i}].{k}"), m));
        if spec.name.is_empty() || spec.name.contains('/') {
            return err(
                "name",
                format!(
                    "`{}` is invalid: need a non-empty name without `/`",
                    spec.name
                ),
            );
        }
        if taken.contains(&spec.name.as_str()) {
            return err(
                "name",
                format!(
                    "duplicate task name `{}`: give each `{}` task a distinct `name:`",
                    spec.name,
                    t.kind.as_str()
                ),
            );
        }
        if !(t.share.is_finite() && t.share > 0.0) {
            return err(
                "share",
                format!(
                    "{} is invalid: need a positive number (a relative weight)",
                    t.share
                ),
            );
        }
        if spec.groups == 0 {
            return err(
                "share",
                format!(
                    "share {} of {} prompt group(s) per step gives task `{}` no group: raise grpo.generation_batch_size (a multiple of num_generations) or this share",
                    t.share,
                    self.grpo.prompts_per_step(),
                    spec.name
                ),
            );
        }
        check_prompts_source(name, &format!("tasks[{i}].prompts"), &t.prompts)?;
        if t.reward_funcs.is_empty() {
            return err(
                "reward_funcs",
                "give at least one reward, e.g. `- kind: math_correctness` (text) or `- kind: caption_color` (t2i)".into(),
            );
        }
        Ok(())
    }

    /// A `text` / `mmu` task: no image-sampling keys; its rollout and completion length (its
    /// own or the top-level ones).
    fn validate_text_task(
        &self,
        name: &str,
        i: usize,
        t: &TaskSection,
        spec: &TaskSpec,
    ) -> Result<(), RecipeError> {
        let key = |k: &str| format!("tasks[{i}].{k}");
        for (k, set) in [
            ("maskgit", t.maskgit.is_some()),
            ("mask_schedule", t.mask_schedule.is_some()),
            ("t2i_attention", t.t2i_attention.is_some()),
        ] {
            if set {
                return Err(RecipeError::key(
                    name,
                    &key(k),
                    format!(
                        "only `t2i` tasks sample images; a `{}` task samples text with `rollout:`",
                        t.kind.as_str()
                    ),
                ));
            }
        }
        if t.max_completion_length == Some(0) {
            return Err(RecipeError::key(
                name,
                &key("max_completion_length"),
                "must be at least 1",
            ));
        }
        let rkey = match t.rollout {
            Some(_) => key("rollout"),
            None => "rollout".into(),
        };
        let len_key = match t.max_completion_length {
            Some(_) => key("max_completion_length"),
            None => "grpo.max_completion_length".into(),
        };
        Self::validate_rollout(
            name,
            t.rollout.as_ref().unwrap_or(&self.rollout),
            &rkey,
            spec.max_completion_length,
            &len_key,
        )
    }

    /// A `t2i` task: no text-rollout keys; its MaskGIT settings and mask schedule; an image
    /// tokenizer to decode its images; the `structured` estimator.
    fn validate_t2i_task(
        &self,
        name: &str,
        i: usize,
        t: &TaskSection,
        spec: &TaskSpec,
    ) -> Result<(), RecipeError> {
        let key = |k: &str| format!("tasks[{i}].{k}");
        let err = |k: &str, m: String| Err(RecipeError::key(name, k, m));
        for (k, set) in [
            ("rollout", t.rollout.is_some()),
            ("max_completion_length", t.max_completion_length.is_some()),
        ] {
            if set {
                return err(
                    &key(k),
                    "a `t2i` task samples image tokens with the MaskGIT sampler (`maskgit:`); its completion length is the image's token count (image_tokenizer.resolution)".into(),
                );
            }
        }
        let m = &spec.maskgit;
        if m.timesteps == 0 {
            return err(&key("maskgit.timesteps"), "must be at least 1".into());
        }
        if !(m.guidance_scale.is_finite() && m.guidance_scale >= 0.0) {
            return err(
                &key("maskgit.guidance_scale"),
                format!(
                    "{} is invalid: need a finite w >= 0 (0 = no guidance)",
                    m.guidance_scale
                ),
            );
        }
        if !(m.temperature.is_finite() && m.temperature >= 0.0) {
            return err(
                &key("maskgit.temperature"),
                format!(
                    "{} is invalid: need a finite temperature >= 0",
                    m.temperature
                ),
            );
        }
        spec.mask_schedule
            .check()
            .map_err(|e| RecipeError::key(name, &key("mask_schedule"), e.to_string()))?;
        if self
            .image_tokenizer
            .as_ref()
            .and_then(|s| s.checkpoint.as_ref())
            .is_none()
        {
            return err(
                "image_tokenizer.checkpoint",
                format!(
                    "task `{}` (t2i) decodes its images for the rewards: give `image_tokenizer: {{checkpoint: DIR, resolution: R}}`",
                    spec.name
                ),
            );
        }
        if self.grpo.estimator == Estimator::D1 {
            return err(
                "grpo.estimator",
                format!(
                    "d1 is a text estimator; task `{}` (t2i) needs `structured` (the image tokens are noised as in SFT)",
                    spec.name
                ),
            );
        }
        Ok(())
    }
}

/// A prompts section names exactly one source: `manifest:` or `inline:`.
fn check_prompts_source(name: &str, key: &str, p: &PromptsSection) -> Result<(), RecipeError> {
    match (&p.manifest, &p.inline) {
        (None, None) => Err(RecipeError::key(
            name,
            key,
            "give `manifest: FILE` or `inline: {…}`",
        )),
        (Some(_), Some(_)) => Err(RecipeError::key(
            name,
            key,
            "give `manifest` or `inline`, not both",
        )),
        _ => Ok(()),
    }
}

impl Recipe for UniGrpoRecipe {
    fn validate(&self, name: &str) -> Result<(), RecipeError> {
        let err = |k: &str, m: &str| Err(RecipeError::key(name, k, m));
        self.grpo.validate(name)?;
        self.model.validate(name, self.train.mixed_precision)?;
        self.validate_tasks(name)?;
        if self.train.max_steps == 0 {
            return err("train.max_steps", "must be at least 1");
        }
        validate_log_every(name, self.train.log_every)?;
        super::validate_max_nonfinite(name, self.train.max_nonfinite_steps)?;
        validate_device(name, &self.train.device)?;
        super::validate_lora(
            name,
            self.lora.as_ref(),
            self.train.activation_checkpointing,
        )?;
        if self.lora.is_some() && self.grpo.ref_model_sync_steps > 0 {
            return err(
                "grpo.ref_model_sync_steps",
                "must be 0 with lora: the reference is the base model with the adapters off",
            );
        }
        self.optimizer
            .validate(name, super::trained_dtype(&self.model, self.lora.as_ref()))?;
        self.schedule.validate(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
run: {name: t}
model: {preset: tiny}
tokenizer: {path: tok.json}
prompts: {manifest: m.yaml}
grpo: {num_generations: 2, generation_batch_size: 4, max_completion_length: 8}
rollout: {steps: 8, block_length: 4}
reward_funcs: [{kind: length}]
optimizer: {lr: 1.0e-5}
train: {max_steps: 1}
"#;

    fn err(set: &str) -> String {
        UniGrpoRecipe::parse(MINIMAL, "r.yaml", &[set.to_string()])
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn rollout_is_the_typed_sampler_section_checked_when_read() {
        let r = UniGrpoRecipe::parse(MINIMAL, "r.yaml", &[]).unwrap();
        let s = r.rollout_section();
        assert_eq!(
            (s.gen_length, s.steps, s.block_length),
            (Some(8), Some(8), Some(4))
        );
        // steps and block_length default to the completion length
        let r = UniGrpoRecipe::parse(MINIMAL, "r.yaml", &["rollout={}".into()]).unwrap();
        let s = r.rollout_section();
        assert_eq!((s.steps, s.block_length), (Some(8), Some(8)));
        // the printed recipe parses back to the same thing
        let again = UniGrpoRecipe::parse(&r.to_yaml(), "printed", &[]).unwrap();
        assert_eq!(again.to_yaml(), r.to_yaml());
        let e = err("rollout.stepz=3");
        assert!(
            e.contains("`rollout.stepz`") && e.contains("did you mean `steps`"),
            "{e}"
        );
        let e = err("rollout.steps=3");
        assert!(e.contains("`rollout.steps`") && e.contains("blocks"), "{e}");
        let e = err("rollout.block_length=3");
        assert!(e.contains("`grpo.max_completion_length`"), "{e}");
        for key in [
            "rollout.gen_length=16",
            "rollout.preset=default",
            "rollout.batch_size=2",
        ] {
            let e = err(key);
            let k = key.split('=').next().unwrap();
            assert!(e.contains(&format!("`{k}`")), "{e}");
        }
        let e = err("train.log_every=0");
        assert!(e.contains("`train.log_every`"), "{e}");
    }

    #[test]
    fn trl_names_are_accepted_and_dr_grpo_is_refused_with_the_mapping() {
        let parse = |set: &[&str]| {
            let set: Vec<String> = set.iter().map(|s| (*s).to_string()).collect();
            UniGrpoRecipe::parse(MINIMAL, "r.yaml", &set)
        };
        for (name, want) in [
            ("grpo", LossNorm::Sequence),
            ("sequence", LossNorm::Sequence),
            ("bnpo", LossNorm::Token),
            ("dapo", LossNorm::Token),
            ("token", LossNorm::Token),
            ("dllm_rl", LossNorm::DllmRl),
        ] {
            let r = parse(&[&format!("grpo.loss_type={name}")]).unwrap();
            assert_eq!(r.grpo.loss_type, want, "{name}");
        }
        let e = err("grpo.loss_type=dr_grpo");
        assert!(
            e.contains("dr_grpo") && e.contains("sequence (TRL grpo)") && e.contains("loss_type"),
            "{e}"
        );
        let e = err("grpo.loss_type=seqence");
        assert!(e.contains("unknown loss_type `seqence`"), "{e}");
        // TRL's `ref_model_sync_steps`, and this project's earlier spelling
        for key in ["ref_model_sync_steps", "sync_ref_model_steps"] {
            let r = parse(&[&format!("grpo.{key}=7")]).unwrap();
            assert_eq!(r.grpo.ref_model_sync_steps, 7, "{key}");
        }
    }
}
