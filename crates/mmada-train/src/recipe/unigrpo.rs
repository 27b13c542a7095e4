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
    CheckpointSection, LoggingSection, MixedPrecision, ModelSection, OptimizerSection, Recipe,
    RecipeError, RunConfig, ScheduleSection, Sharding, TokenizerSection, cpu, one_u64,
    validate_device, validate_log_every, yes,
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
    /// `dllm_rl` (default), `sequence` (paper eq., TRL `grpo`) or `token` (TRL `bnpo`).
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
    /// Copy the policy into the reference model every N steps (0 = never; TRL
    /// `ref_model_sync_steps`).
    #[serde(default)]
    pub sync_ref_model_steps: u64,
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
    /// `N > 0` (default 256, `mmada_diffusion::DEFAULT_CE_CHUNK_ROWS`): every log-probability (policy, old policy, reference) with
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
    /// Prompts.
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
    /// Rewards (`kind`, `name`, `weight`, `params`); see `mmada_rewards`.
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
}

impl UniGrpoRecipe {
    /// The rollout sampler settings: the `rollout:` section with `gen_length =
    /// grpo.max_completion_length`, and `steps` / `block_length` defaulting to it (pure
    /// diffusion over the completion, one token per step).
    pub fn rollout_section(&self) -> SamplerSection {
        let len = Some(self.grpo.max_completion_length);
        SamplerSection {
            gen_length: len,
            steps: self.rollout.steps.or(len),
            block_length: self.rollout.block_length.or(len),
            ..self.rollout.clone()
        }
    }

    /// `rollout:` leaves `gen_length` to `grpo.max_completion_length` and passes the sampler's
    /// checks (block length dividing the completion length, steps per block, …), so a bad
    /// setting is reported when the recipe is read, not after the model is loaded.
    fn validate_rollout(&self, name: &str) -> Result<(), RecipeError> {
        let len = self.grpo.max_completion_length;
        if self.rollout.gen_length.is_some_and(|g| g != len) {
            return Err(RecipeError::key(
                name,
                "rollout.gen_length",
                format!(
                    "the completion length is grpo.max_completion_length ({len}): set that instead"
                ),
            ));
        }
        for (key, set, why) in [
            (
                "rollout.preset",
                self.rollout.preset.is_some(),
                "gen_length is grpo.max_completion_length and steps / block_length default to it: set rollout.steps and rollout.block_length",
            ),
            (
                "rollout.batch_size",
                self.rollout.batch_size.is_some(),
                "a rollout decodes the G completions of one prompt together (grpo.num_generations)",
            ),
        ] {
            if set {
                return Err(RecipeError::key(
                    name,
                    key,
                    format!("not used by UniGRPO: {why}"),
                ));
            }
        }
        let layout = mmada_model::TokenLayout::llada();
        match self
            .rollout_section()
            .to_config(&layout, layout.total_vocab() as usize)
        {
            Ok(_) => Ok(()),
            Err(mmada_sampler::SamplerError::InvalidConfig { field, reason }) => {
                // gen_length is the completion length, set under grpo:
                let key = if field == "gen_length" {
                    "grpo.max_completion_length".to_string()
                } else {
                    format!("rollout.{field}")
                };
                Err(RecipeError::key(name, &key, reason))
            }
            Err(e) => Err(RecipeError::key(name, "rollout", e.to_string())),
        }
    }
}

impl Recipe for UniGrpoRecipe {
    fn validate(&self, name: &str) -> Result<(), RecipeError> {
        let err = |k: &str, m: &str| Err(RecipeError::key(name, k, m));
        self.grpo.validate(name)?;
        match (&self.prompts.manifest, &self.prompts.inline) {
            (None, None) => return err("prompts", "give `manifest: FILE` or `inline: {…}`"),
            (Some(_), Some(_)) => return err("prompts", "give `manifest` or `inline`, not both"),
            _ => {}
        }
        self.model.validate(name, self.train.mixed_precision)?;
        self.validate_rollout(name)?;
        if self.train.max_steps == 0 {
            return err("train.max_steps", "must be at least 1");
        }
        validate_log_every(name, self.train.log_every)?;
        super::validate_max_nonfinite(name, self.train.max_nonfinite_steps)?;
        validate_device(name, &self.train.device)?;
        if self.reward_funcs.is_empty() {
            return err(
                "reward_funcs",
                "give at least one reward, e.g. `- kind: math_correctness`",
            );
        }
        super::validate_lora(
            name,
            self.lora.as_ref(),
            self.train.activation_checkpointing,
        )?;
        if self.lora.is_some() && self.grpo.sync_ref_model_steps > 0 {
            return err(
                "grpo.sync_ref_model_steps",
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
}
