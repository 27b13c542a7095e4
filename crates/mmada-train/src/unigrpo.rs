//! The UniGRPO trainer (spec §5): rollouts through the shared sampler, pluggable rewards,
//! group advantages, structured noising of the completions, μ inner updates of the clipped
//! objective with a k3 KL penalty, atomic checkpoints with exact resume, TRL-named metrics.
//!
//! One step (paper Algorithm 1, dLLM-RL `rl.py`):
//! 1. take `generation_batch_size / num_generations` prompts; sample `num_generations`
//!    completions of each with `mmada_sampler::generate` on `model.valid()` (no graph);
//! 2. score them with the recipe's `reward_funcs` (weighted sum) → group advantages;
//! 3. for each inner iteration `n = 1..μ` and completion: a mask ratio (Algorithm 1 uniformly
//!    spaced, or dLLM-RL `U[lower_p, upper_p]`), a random mask of the completion, the noised row;
//! 4. old-policy log-probs of every noised row with the pre-update weights (and reference
//!    log-probs when `kl_reference: reference_model`), without graph;
//! 5. μ optimizer updates, update `n` on the rows of iteration `n` (the same masks for old
//!    and new policy).
//!
//! `grpo.estimator: d1` replaces step 3 by the d1 one-step estimator (d1
//! `diffu-grpo/diffu_grpo_trainer.py`: completion fully masked, prompt tokens masked with
//! probability `p_mask_prompt`, [`mmada_diffusion::grpo::noise_d1`]).
//!
//! Metrics go to `metrics.jsonl` and, with `logging.wandb`, to wandb through the path SFT uses
//! ([`crate::wandb_log`]); the step time is split into `time/rollout_s`, `time/logprob_s`
//! (old-policy / reference forward passes) and `time/backward_s` (μ training forward +
//! backward + optimizer steps), with `time/update_s` = noising + log-probs + updates.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, FloatDType, Int, Tensor, TensorData};
use mmada_data::manifest::Manifest;
use mmada_data::{ChatTemplate, Example, ExampleStream, TextTokenizer};
use mmada_diffusion::grpo::{
    AdvantageOptions, GrpoBatch, GrpoLossConfig, LossNorm, MaskRatioSchedule, ScaleRewards,
    TailPad, completion_mask, group_advantages, noise_completion, noise_d1, unigrpo_loss,
};
use mmada_model::checkpoint::{DiskDtype, SaveOptions};
use mmada_model::{Attention, LladaModel, ModelConfig, load_checkpoint, save_checkpoint};
use mmada_rewards::{RewardInput, RewardRegistry, RewardSet, RewardSpec};
use mmada_sampler::{GenerateConfig, SeededRng, generate};
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_norway::Value;

use crate::data::derive_seed;
use crate::dist::{DistConfig, Worker};
use crate::optim::{self, AdamWOptim};
use crate::recipe::{
    CheckpointSection, LoggingSection, MixedPrecision, ModelSection, OptimizerSection, RecipeError,
    RunConfig, ScheduleSection, TokenizerSection, apply_overrides, from_tree,
};
use crate::run_dir::{RunDir, TrainerState, read_state, resolve, write_atomic};
use crate::schedule::Schedule;
use crate::sft::{Resume, RunOutputs, TrainError, begin_run, resume_dir};

/// Seed purposes of the UniGRPO streams (see [`derive_seed`]).
pub mod purpose {
    /// Rollout sampling (index = prompt slot in the step).
    pub const ROLLOUT: u64 = 32;
    /// Completion noising (index = completion in the step).
    pub const NOISE: u64 = 33;
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
    #[serde(default = "default_template")]
    pub template: String,
    /// Prepend the long-CoT `<think>` instruction to the question (default true).
    #[serde(default = "yes")]
    pub cot: bool,
    /// Prompts longer than this (in tokens, BOS included) keep their last tokens (default 512,
    /// dLLM-RL `max_prompt_len`).
    #[serde(default = "default_max_prompt")]
    pub max_prompt_length: usize,
}

fn default_template() -> String {
    "mmada".into()
}
fn yes() -> bool {
    true
}
fn default_max_prompt() -> usize {
    512
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
    #[serde(default = "default_scale")]
    pub scale_rewards: String,
    /// Added to the std in the advantage (default 0 with the zero-std guard, as dLLM-RL; TRL
    /// uses 1e-4).
    #[serde(default)]
    pub advantage_eps: f32,
    /// `dllm_rl` (default), `sequence` (paper eq., TRL `grpo`) or `token` (TRL `bnpo`).
    #[serde(default = "default_loss_type")]
    pub loss_type: String,
    /// `uniform_spaced` (paper Algorithm 1, default) or `uniform` (dLLM-RL).
    #[serde(default = "default_mask_ratio")]
    pub mask_ratio: String,
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
    #[serde(default = "default_kl_ref")]
    pub kl_reference: String,
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
    #[serde(default = "default_estimator")]
    pub estimator: String,
    /// Prompt masking probability of `estimator: d1` (d1 default 0.15).
    #[serde(default = "default_p_mask_prompt")]
    pub p_mask_prompt: f32,
}

fn default_estimator() -> String {
    "structured".into()
}
fn default_p_mask_prompt() -> f32 {
    0.15
}

fn one() -> usize {
    1
}
fn default_beta() -> f32 {
    0.01
}
fn default_eps() -> f32 {
    0.2
}
fn default_scale() -> String {
    "group".into()
}
fn default_loss_type() -> String {
    "dllm_rl".into()
}
fn default_mask_ratio() -> String {
    "uniform_spaced".into()
}
fn default_timesteps() -> u32 {
    1000
}
fn default_lower() -> f32 {
    0.1
}
fn default_upper() -> f32 {
    0.9
}
fn default_kl_ref() -> String {
    "old_policy".into()
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
    /// parallelism, see [`run_unigrpo_dp`]; see `mmada_model::backend::DeviceSpec`).
    #[serde(default = "default_device")]
    pub device: String,
    /// Mixed precision as in SFT (accelerate's name): `no` (default) or `bf16` (f32 master
    /// weights and AdamW state, bf16 matmuls in rollouts, log-probs and updates; needs
    /// `model.dtype: f32`). The reference model computes in the same precision.
    #[serde(default)]
    pub mixed_precision: MixedPrecision,
}

fn one_u64() -> u64 {
    1
}
fn default_device() -> String {
    "cpu".into()
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
    /// Rollout sampler: keys of `mmada_sampler::GenerateConfig` (`steps`, `block_length`,
    /// `temperature`, `cfg_scale`, `remasking`, …); ids default to the tokenizer's and
    /// `gen_length` is `grpo.max_completion_length`.
    #[serde(default)]
    pub rollout: serde_json::Map<String, serde_json::Value>,
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
}

fn one_of(key: &str, v: &str, valid: &[&str]) -> Result<(), (String, String)> {
    if valid.contains(&v) {
        Ok(())
    } else {
        Err((
            key.to_string(),
            format!("`{v}` is invalid: valid values are {}", valid.join(", ")),
        ))
    }
}

impl UniGrpoRecipe {
    /// Read a recipe file, apply `--set` overrides, validate.
    ///
    /// # Errors
    /// [`RecipeError`] naming file and key.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// Parse recipe text (`name` is used in errors).
    ///
    /// # Errors
    /// [`RecipeError`].
    pub fn parse(text: &str, name: &str, overrides: &[String]) -> Result<Self, RecipeError> {
        let mut tree: Value = serde_norway::from_str(text).map_err(|e| RecipeError::Yaml {
            path: name.to_string(),
            message: e.to_string(),
        })?;
        apply_overrides(&mut tree, overrides)?;
        let r: UniGrpoRecipe = from_tree(tree, name)?;
        r.validate().map_err(|(key, message)| RecipeError::Key {
            path: name.to_string(),
            key,
            message,
        })?;
        Ok(r)
    }

    /// The resolved recipe as YAML.
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("recipe serialises")
    }

    /// Cross-field checks → `(key, message)`.
    fn validate(&self) -> Result<(), (String, String)> {
        let g = &self.grpo;
        let err = |k: &str, m: String| Err((k.to_string(), m));
        if g.num_generations < 2 {
            return err(
                "grpo.num_generations",
                format!(
                    "{} is invalid: group advantages need at least 2 completions per prompt (valid: 2, 3, 4, …)",
                    g.num_generations
                ),
            );
        }
        if g.generation_batch_size == 0
            || !g.generation_batch_size.is_multiple_of(g.num_generations)
        {
            let n = g.num_generations;
            return err(
                "grpo.generation_batch_size",
                format!(
                    "{} is not a multiple of num_generations {n}: valid values are {n}, {}, {}, …",
                    g.generation_batch_size,
                    2 * n,
                    3 * n
                ),
            );
        }
        if g.num_iterations == 0 {
            return err(
                "grpo.num_iterations",
                "0 is invalid: need at least 1".into(),
            );
        }
        if !(0.0..1.0).contains(&g.epsilon) {
            return err(
                "grpo.epsilon",
                format!("{} is invalid: need 0 <= epsilon < 1", g.epsilon),
            );
        }
        if g.epsilon_high.is_some_and(|e| e.is_nan() || e < 0.0) {
            return err("grpo.epsilon_high", "must be >= 0".into());
        }
        if g.beta.is_nan() || g.beta < 0.0 {
            return err(
                "grpo.beta",
                format!("{} is invalid: need beta >= 0", g.beta),
            );
        }
        if g.max_completion_length == 0 {
            return err("grpo.max_completion_length", "must be at least 1".into());
        }
        one_of(
            "grpo.scale_rewards",
            &g.scale_rewards,
            &["group", "batch", "none"],
        )?;
        one_of(
            "grpo.loss_type",
            &g.loss_type,
            &["dllm_rl", "sequence", "token"],
        )?;
        one_of(
            "grpo.mask_ratio",
            &g.mask_ratio,
            &["uniform_spaced", "uniform"],
        )?;
        one_of("grpo.estimator", &g.estimator, &["structured", "d1"])?;
        if !(0.0..1.0).contains(&g.p_mask_prompt) {
            return err(
                "grpo.p_mask_prompt",
                format!(
                    "{} is invalid: need 0 <= p_mask_prompt < 1 (d1 uses 0.15)",
                    g.p_mask_prompt
                ),
            );
        }
        one_of(
            "grpo.kl_reference",
            &g.kl_reference,
            &["old_policy", "reference_model"],
        )?;
        one_of(
            "prompts.template",
            &self.prompts.template,
            &["mmada", "llada", "none"],
        )?;
        self.mask_schedule()
            .validate()
            .map_err(|e| ("grpo.mask_ratio".to_string(), e.to_string()))?;
        match (&self.prompts.manifest, &self.prompts.inline) {
            (None, None) => return err("prompts", "give `manifest: FILE` or `inline: {…}`".into()),
            (Some(_), Some(_)) => {
                return err("prompts", "give `manifest` or `inline`, not both".into());
            }
            _ => {}
        }
        match (&self.model.preset, &self.model.checkpoint) {
            (Some(_), Some(_)) | (None, None) => {
                return err(
                    "model",
                    "give either `checkpoint: DIR` or `preset: NAME`".into(),
                );
            }
            _ => {}
        }
        if self.train.max_steps == 0 {
            return err("train.max_steps", "must be at least 1".into());
        }
        if let Err(e) = self
            .train
            .device
            .parse::<mmada_model::backend::DeviceSpec>()
        {
            return err("train.device", e.to_string());
        }
        if self.train.mixed_precision == MixedPrecision::Bf16 && self.model.dtype != "f32" {
            return err(
                "train.mixed_precision",
                format!(
                    "`bf16` keeps f32 master weights, but model.dtype is `{}`: set model.dtype: f32 (or mixed_precision: no for pure {} training)",
                    self.model.dtype, self.model.dtype
                ),
            );
        }
        if self.reward_funcs.is_empty() {
            return err(
                "reward_funcs",
                "give at least one reward, e.g. `- kind: math_correctness`".into(),
            );
        }
        if self.optimizer.lr.is_nan() || self.optimizer.lr <= 0.0 {
            return err("optimizer.lr", "must be positive".into());
        }
        Ok(())
    }

    /// The mask-ratio schedule of `grpo.mask_ratio`.
    pub fn mask_schedule(&self) -> MaskRatioSchedule {
        if self.grpo.mask_ratio == "uniform" {
            MaskRatioSchedule::Uniform {
                lower: self.grpo.lower_p,
                upper: self.grpo.upper_p,
            }
        } else {
            MaskRatioSchedule::UniformSpaced {
                timesteps: self.grpo.timesteps,
            }
        }
    }

    /// The loss parameters.
    pub fn loss_config(&self) -> GrpoLossConfig {
        GrpoLossConfig {
            epsilon: self.grpo.epsilon,
            epsilon_high: self.grpo.epsilon_high,
            beta: self.grpo.beta,
            norm: match self.grpo.loss_type.as_str() {
                "sequence" => LossNorm::Sequence,
                "token" => LossNorm::Token,
                _ => LossNorm::DllmRl,
            },
        }
    }

    /// Advantage options.
    pub fn advantage_options(&self) -> AdvantageOptions {
        AdvantageOptions {
            scale: match self.grpo.scale_rewards.as_str() {
                "batch" => ScaleRewards::Batch,
                "none" => ScaleRewards::None,
                _ => ScaleRewards::Group,
            },
            eps: self.grpo.advantage_eps,
            unbiased_std: false,
        }
    }

    /// The rollout sampler config: the tokenizer's ids, the recipe's `rollout:` keys, and
    /// `gen_length = max_completion_length`. Errors name `rollout.<key>`.
    pub fn generate_config(&self, tok: &TextTokenizer) -> Result<GenerateConfig, TrainError> {
        let mut v =
            serde_json::to_value(GenerateConfig::from_layout(tok.layout())).expect("serialises");
        for (k, x) in &self.rollout {
            v[k] = x.clone();
        }
        v["gen_length"] = self.grpo.max_completion_length.into();
        if !self.rollout.contains_key("block_length") {
            v["block_length"] = self.grpo.max_completion_length.into();
        }
        if !self.rollout.contains_key("steps") {
            v["steps"] = self.grpo.max_completion_length.into();
        }
        let cfg: GenerateConfig =
            serde_json::from_value(v).map_err(|e| TrainError::Other(format!("rollout: {e}")))?;
        cfg.validate()
            .map_err(|e| TrainError::Other(format!("rollout: {e}")))?;
        Ok(cfg)
    }
}

/// Run options outside the recipe.
#[derive(Debug, Clone, Default)]
pub struct UniGrpoOptions {
    /// Resume instead of starting fresh.
    pub resume: Option<Resume>,
    /// Clean-stop request (checkpoint after the current step).
    pub stop: Option<Arc<AtomicBool>>,
    /// Stop after this many steps of this invocation.
    pub stop_after: Option<u64>,
    /// Folder relative recipe paths are resolved against.
    pub base_dir: PathBuf,
    /// wandb server + key instead of `WANDB_BASE_URL` / `WANDB_API_KEY` (tests).
    pub wandb_endpoint: Option<mmada_wandb::Endpoint>,
}

/// What one RL step did.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoStepReport {
    /// Steps completed (1-based).
    pub step: u64,
    /// Total steps.
    pub max_steps: u64,
    /// Mean total reward.
    pub reward: f32,
    /// Mean loss over the μ updates.
    pub loss: f32,
    /// Mean policy loss.
    pub policy_loss: f32,
    /// Mean KL loss.
    pub kl_loss: f32,
    /// Fraction of all-equal groups.
    pub frac_reward_zero_std: f32,
    /// Rollout seconds.
    pub rollout_s: f64,
    /// Update seconds (noising + old/reference log-probs + μ updates).
    pub update_s: f64,
    /// Old-policy and reference log-prob seconds (forward passes without graph).
    pub logprob_s: f64,
    /// Training forward + backward + optimizer seconds of the μ updates.
    pub backward_s: f64,
    /// The full metrics row written to `metrics.jsonl`.
    pub metrics: serde_json::Value,
}

/// Result of [`run_unigrpo`].
#[derive(Debug, Clone)]
pub struct UniGrpoOutcome {
    /// Run directory.
    pub run_dir: PathBuf,
    /// Steps completed.
    pub final_step: u64,
    /// Newest checkpoint.
    pub last_checkpoint: Option<PathBuf>,
    /// Mean reward per step of this invocation.
    pub rewards: Vec<f32>,
    /// Mean loss per step (all steps of the run, restored on resume).
    pub losses: Vec<f32>,
    /// Whether a stop request ended the run.
    pub interrupted: bool,
}

/// Load the prompts of the recipe (examples with a question or messages).
fn load_prompts(recipe: &UniGrpoRecipe, base: &Path) -> Result<Vec<Example>, TrainError> {
    let p = &recipe.prompts;
    let mut m = match (&p.manifest, &p.inline) {
        (Some(path), _) => Manifest::from_file(&resolve(base, path))?,
        (None, Some(m)) => m.clone(),
        (None, None) => unreachable!("validated"),
    };
    if let Some(path) = &p.path {
        m.source.path = Some(path.clone());
        m.source.hf_repo = None;
    }
    let root = p.data_root.as_ref().map(|r| resolve(base, r));
    let root = root.or_else(|| Some(base.to_path_buf()));
    let stream = ExampleStream::open(m, root.as_deref())?;
    let max = p.max_examples.unwrap_or(usize::MAX);
    let mut out = vec![];
    for ex in stream {
        let ex = ex?;
        if ex.question.is_some() || !ex.messages.is_empty() {
            out.push(ex);
        }
        if out.len() >= max {
            break;
        }
    }
    if out.is_empty() {
        return Err(TrainError::Other(
            "prompts: the source has no example with a question or messages".into(),
        ));
    }
    Ok(out)
}

fn prompt_text(recipe: &UniGrpoRecipe, ex: &Example) -> String {
    let template = match recipe.prompts.template.as_str() {
        "llada" => Some(ChatTemplate::llada()),
        "none" => None,
        _ => Some(ChatTemplate::mmada()),
    };
    match template {
        Some(t) => t
            .prompt_and_answer(ex, recipe.prompts.cot)
            .map(|(p, _)| p)
            .unwrap_or_default(),
        None => ex.question.clone().unwrap_or_default(),
    }
}

fn reward_fields(ex: &Example) -> serde_json::Map<String, serde_json::Value> {
    let mut f = serde_json::Map::new();
    for (k, v) in [
        ("question", &ex.question),
        ("answer", &ex.answer),
        ("reasoning", &ex.reasoning),
        ("id", &ex.id),
    ] {
        if let Some(v) = v {
            f.insert(k.into(), v.clone().into());
        }
    }
    f
}

fn load_tokenizer(t: &TokenizerSection, base: &Path) -> Result<TextTokenizer, TrainError> {
    let p = resolve(base, &t.path);
    let file = if p.is_dir() {
        p.join("tokenizer.json")
    } else {
        p
    };
    Ok(if t.add_mmada_tokens {
        TextTokenizer::from_file_with_mmada_tokens(&file)?
    } else {
        TextTokenizer::from_file(&file)?
    })
}

fn float_dtype(s: &str) -> FloatDType {
    if s == "bf16" {
        FloatDType::BF16
    } else {
        FloatDType::F32
    }
}

/// Initial policy: the checkpoint (checked against the tokenizer) or a seeded preset.
fn initial_model<B: Backend>(
    recipe: &UniGrpoRecipe,
    tok: &TextTokenizer,
    base: &Path,
    device: &B::Device,
) -> Result<(ModelConfig, LladaModel<B>), TrainError> {
    let dtype = float_dtype(&recipe.model.dtype);
    let t = tok.layout();
    if let Some(dir) = &recipe.model.checkpoint {
        let (cfg, model) = load_checkpoint::<B>(&resolve(base, dir), device, dtype)?;
        if t.total_vocab() as usize > cfg.embedding_size {
            return Err(TrainError::Mismatch {
                tokenizer: recipe.tokenizer.path.display().to_string(),
                message: format!(
                    "it needs {} ids but the model has {} embedding rows",
                    t.total_vocab(),
                    cfg.embedding_size
                ),
            });
        }
        return Ok((cfg, model));
    }
    let preset = recipe.model.preset.as_ref().expect("validated");
    let mut json = ModelConfig::preset(preset)?.to_hf_json();
    for (k, v) in &recipe.model.overrides {
        json[k] = v.clone();
    }
    let total = t.total_vocab() as usize;
    json["vocab_size"] = total.into();
    json["embedding_size"] = total.into();
    json["mask_token_id"] = t.mask_id.into();
    json["eos_token_id"] = t.eos_id.into();
    json["pad_token_id"] = t.pad_id.into();
    let cfg = ModelConfig::from_json_str(&json.to_string(), "model.overrides")?;
    let model = mmada_model::init::init_model::<B>(
        &cfg,
        derive_seed(recipe.run.seed, 0, 0, 0),
        device,
        dtype,
    );
    Ok((cfg, model))
}

/// One rolled-out completion.
struct Rollout {
    /// Global completion index in the step (`slot · G + r`), the same on any number of ranks.
    index: usize,
    prompt_ids: Vec<i64>,
    /// `[prompt | completion up to EOS | EOS …]`, length `Lp + max_completion_length`.
    row: Vec<i64>,
    completion_len: usize,
    terminated: bool,
    input: RewardInput,
}

fn host_ints<B: Backend>(t: Tensor<B, 2, Int>) -> Vec<i64> {
    t.into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("int tensor")
}

/// Run (or resume) UniGRPO as the recipe says on `device`; `on_step` is called after every
/// RL step.
///
/// # Errors
/// [`TrainError`] naming the file, key or reward at fault.
pub fn run_unigrpo<B: AutodiffBackend>(
    recipe: &UniGrpoRecipe,
    device: &B::Device,
    opts: &UniGrpoOptions,
    on_step: &mut dyn FnMut(&GrpoStepReport),
) -> Result<UniGrpoOutcome, TrainError> {
    unigrpo_worker(recipe, Worker::<B>::single(device.clone()), opts, on_step)
}

/// Data-parallel UniGRPO (see [`crate::dist`] for ranks, reducers and launch): one worker
/// thread per device of `devices` on this node, `dist` says how many nodes and which one this
/// is.
///
/// * **Rollouts.** `grpo.generation_batch_size` is the *global* number of completions per
///   step (TRL's meaning). Prompt group `k` (slot `k` of the step, its `G` completions) is
///   rolled out, scored and noised by rank `k mod world`, so a group never straddles devices;
///   with `generation_batch_size / G` a multiple of the world every rank gets the same number
///   of groups (otherwise some ranks idle during one group's rollout, and with fewer groups
///   than ranks some ranks roll out nothing at all while still holding a replica and taking
///   part in every all-reduce: correct, but wasted devices).
/// * **Advantages.** Rewards (totals and per-function scores) and completion lengths are then
///   all-gathered ([`crate::dist::gather_rows`]) so every rank computes the advantages of the
///   whole batch, which keeps `scale_rewards: batch` exact, and rank 0 logs global metrics.
/// * **Updates.** Each rank's group losses are scaled by `world / non-empty groups of the whole
///   step` (the number of non-empty groups is summed over ranks), so the mean all-reduce of
///   the gradients is exactly the 1-device gradient; clipping and the AdamW step follow on
///   identical gradients, so the replicas stay identical (checked every `dist.check_every`
///   steps).
/// * Every seed is indexed by the global prompt slot / completion index, so a run on `N`
///   devices samples, noises and trains exactly like the same recipe on 1 device (up to
///   float summation order).
///
/// Rank 0 alone writes `metrics.jsonl`, wandb and checkpoints (the others wait at a barrier);
/// every rank resumes from the same checkpoint (a shared run directory). Returns local rank
/// 0's outcome.
///
/// # Errors
/// [`TrainError`]; [`TrainError::Dist`] for timeouts (a dead rank), diverged replicas, bad flags.
pub fn run_unigrpo_dp<B>(
    recipe: &UniGrpoRecipe,
    devices: &[B::Device],
    dist: &DistConfig,
    opts: &UniGrpoOptions,
    on_step: &mut dyn FnMut(&GrpoStepReport),
) -> Result<UniGrpoOutcome, TrainError>
where
    B: AutodiffBackend,
    B::InnerBackend: Backend<Device = B::Device>,
{
    crate::dist::launch::<B, _, TrainError>(
        devices,
        devices,
        dist,
        |w| unigrpo_worker(recipe, w, opts, on_step),
        |w| unigrpo_worker(recipe, w, opts, &mut |_| {}),
    )
}

/// Per-completion values gathered over ranks: total reward, completion length, terminated,
/// then for every reward function its score and whether it applied.
const GATHER_FIXED: usize = 3;

/// The UniGRPO loop of one data-parallel rank (or the only one).
fn unigrpo_worker<B: AutodiffBackend>(
    recipe: &UniGrpoRecipe,
    mut worker: Worker<B>,
    opts: &UniGrpoOptions,
    on_step: &mut dyn FnMut(&GrpoStepReport),
) -> Result<UniGrpoOutcome, TrainError> {
    let device = &worker.device.clone();
    let (rank, world) = (worker.rank(), worker.world());
    let lead = rank == 0;
    let base = &opts.base_dir;
    let tok = load_tokenizer(&recipe.tokenizer, base)?;
    let layout = *tok.layout();
    let gen_cfg = recipe.generate_config(&tok)?;
    let rewards: RewardSet = RewardRegistry::with_builtins()
        .build("reward_funcs", &recipe.reward_funcs)
        .map_err(|e| TrainError::Other(e.to_string()))?;
    let examples = load_prompts(recipe, base)?;
    let run = RunDir::create(&resolve(base, &recipe.run.output_dir).join(&recipe.run.name))?;
    let resume_dir = resume_dir(&run, opts.resume.as_ref(), base)?;
    let dtype = float_dtype(&recipe.model.dtype);
    let use_ref = recipe.grpo.kl_reference == "reference_model" && recipe.grpo.beta > 0.0;
    let (cfg, mut model, mut state, mut reference) = match &resume_dir {
        Some(dir) => {
            let state = read_state(dir)?;
            if lead {
                tracing::info!("resuming from {} at step {}", dir.display(), state.step);
            }
            let (cfg, model) = load_checkpoint::<B>(&dir.join("model"), device, dtype)?;
            let reference = if use_ref {
                Some(load_checkpoint::<B::InnerBackend>(&dir.join("reference"), device, dtype)?.1)
            } else {
                None
            };
            (cfg, model, state, reference)
        }
        None => {
            let (cfg, model) = initial_model::<B>(recipe, &tok, base, device)?;
            let reference = use_ref.then(|| model.valid());
            let state = TrainerState {
                step: 0,
                seed: recipe.run.seed,
                data: Default::default(),
                losses: vec![],
                extra: Default::default(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            };
            (cfg, model, state, reference)
        }
    };
    // train.mixed_precision: bf16 compute over the f32 master weights (policy and reference)
    let compute = recipe.train.mixed_precision.compute_dtype();
    model = model.with_compute_dtype(compute);
    reference = reference.map(|r| r.with_compute_dtype(compute));
    let mut optim: AdamWOptim<B> = optim::adamw::<B>(&recipe.optimizer);
    if let Some(dir) = &resume_dir {
        optim = optim::load_state(optim, &model, &dir.join("optimizer.safetensors"))?;
    }
    let RunOutputs {
        mut wandb,
        mut metrics,
        metrics_path,
    } = begin_run(
        &mut worker,
        &model,
        &state,
        serde_json::to_value(recipe).expect("recipe serialises"),
        &recipe.to_yaml(),
        recipe.logging.wandb.as_ref(),
        &run,
        resume_dir.is_some(),
        opts.wandb_endpoint.clone(),
    )?;

    let g = recipe.grpo.num_generations;
    let mu = recipe.grpo.num_iterations;
    let prompts_per_step = recipe.grpo.generation_batch_size / g;
    let n_completions = prompts_per_step * g;
    let schedule = Schedule::new(
        &recipe.schedule,
        recipe.optimizer.lr,
        recipe.train.max_steps * mu as u64,
    );
    let mask_sched = recipe.mask_schedule();
    let loss_cfg = recipe.loss_config();
    let eos = i64::from(layout.eos_id);
    let mask_id = i64::from(layout.mask_id);
    let d1 = recipe.grpo.estimator == "d1";
    let tail = TailPad {
        pad_id: eos,
        // d1 scores through the first EOS (TRL completion_mask)
        post_num: if d1 {
            recipe.grpo.post_num.max(1)
        } else {
            recipe.grpo.post_num
        },
    };
    let gen_len = recipe.grpo.max_completion_length;
    // this rank's prompt groups (slots of the step): k ≡ rank (mod world)
    let my_groups: Vec<usize> = (0..prompts_per_step)
        .filter(|k| k % world == rank)
        .collect();
    let mut outcome = UniGrpoOutcome {
        run_dir: run.root().to_path_buf(),
        final_step: state.step,
        last_checkpoint: None,
        rewards: vec![],
        losses: state.losses.clone(),
        interrupted: false,
    };
    let mut ran = 0u64;
    while state.step < recipe.train.max_steps {
        let step = state.step;
        let cursor = state
            .extra
            .get("prompt_cursor")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as usize;

        // 1. Rollouts of this rank's groups (no graph).
        let t_roll = Instant::now();
        let policy = model.valid();
        let mut rollouts: Vec<Rollout> = Vec::with_capacity(my_groups.len() * g);
        for &slot in &my_groups {
            let ex = &examples[(cursor + slot) % examples.len()];
            let text = prompt_text(recipe, ex);
            let mut ids: Vec<i64> = vec![i64::from(layout.bos_id)];
            ids.extend(tok.encode(&text)?.into_iter().map(i64::from));
            let maxp = recipe.prompts.max_prompt_length.max(1);
            if ids.len() > maxp {
                ids = ids[ids.len() - maxp..].to_vec();
            }
            let lp = ids.len();
            let rep: Vec<i32> = (0..g).flat_map(|_| ids.iter().map(|&x| x as i32)).collect();
            let prompt =
                Tensor::<B::InnerBackend, 2, Int>::from_data(TensorData::new(rep, [g, lp]), device);
            let mut rng = SeededRng::new(derive_seed(
                recipe.run.seed,
                purpose::ROLLOUT,
                step,
                slot as u64,
            ));
            let out = generate(&policy, prompt, None, &gen_cfg, &mut rng, false)
                .map_err(|e| TrainError::Other(format!("rollout: {e}")))?;
            let canvas = host_ints(out.ids);
            for r in 0..g {
                let comp = &canvas[r * (lp + gen_len) + lp..(r + 1) * (lp + gen_len)];
                let end = comp.iter().position(|&x| x == eos);
                let clen = end.unwrap_or(gen_len);
                let mut row = ids.clone();
                row.extend_from_slice(&comp[..clen]);
                row.resize(lp + gen_len, eos);
                let cids: Vec<u32> = comp[..clen].iter().map(|&x| x as u32).collect();
                let completion = tok.decode(&cids)?;
                rollouts.push(Rollout {
                    index: slot * g + r,
                    prompt_ids: ids.clone(),
                    row,
                    completion_len: clen,
                    terminated: end.is_some(),
                    input: RewardInput {
                        prompt: text.clone(),
                        completion,
                        completion_ids: cids,
                        terminated: end.is_some(),
                        fields: reward_fields(ex),
                    },
                });
            }
        }
        drop(policy);
        let rollout_s = t_roll.elapsed().as_secs_f64();

        // 2. Rewards of this rank's completions, gathered over ranks; advantages of the
        // whole batch (identical on every rank).
        let inputs: Vec<RewardInput> = rollouts.iter().map(|r| r.input.clone()).collect();
        let local = rewards
            .score(&inputs)
            .map_err(|e| TrainError::Other(format!("reward_funcs: {e}")))?;
        let n_rewards = local.names.len();
        let width = GATHER_FIXED + 2 * n_rewards;
        let rows: Vec<(usize, Vec<f32>)> = rollouts
            .iter()
            .enumerate()
            .map(|(j, r)| {
                let mut v = vec![
                    local.total[j],
                    r.completion_len as f32,
                    f32::from(u8::from(r.terminated)),
                ];
                for k in 0..n_rewards {
                    let s = local.per_reward[k][j];
                    v.push(s.unwrap_or(0.0));
                    v.push(f32::from(u8::from(s.is_some())));
                }
                (r.index, v)
            })
            .collect();
        let table = crate::dist::gather_rows(worker.reducer.as_mut(), n_completions, width, &rows)?;
        let at = |i: usize, c: usize| table[i * width + c];
        let breakdown = mmada_rewards::RewardBreakdown {
            names: local.names.clone(),
            weights: local.weights.clone(),
            per_reward: (0..n_rewards)
                .map(|k| {
                    (0..n_completions)
                        .map(|i| {
                            let c = GATHER_FIXED + 2 * k;
                            (at(i, c + 1) > 0.5).then(|| at(i, c))
                        })
                        .collect()
                })
                .collect(),
            total: (0..n_completions).map(|i| at(i, 0)).collect(),
        };
        let lens: Vec<f32> = (0..n_completions).map(|i| at(i, 1)).collect();
        let terminated: Vec<bool> = (0..n_completions).map(|i| at(i, 2) > 0.5).collect();
        let adv = group_advantages(&breakdown.total, g, recipe.advantage_options())?;

        // 3. Noised batches per (iteration, prompt group of this rank).
        let t_upd = Instant::now();
        let mut batches: Vec<Vec<GrpoBatch>> = vec![Vec::new(); mu];
        let mut ratios_all = vec![];
        let mut noise_rngs: Vec<rand::rngs::StdRng> = rollouts
            .iter()
            .map(|r| {
                rand::rngs::StdRng::seed_from_u64(derive_seed(
                    recipe.run.seed,
                    purpose::NOISE,
                    step,
                    r.index as u64,
                ))
            })
            .collect();
        let ratios: Vec<Vec<f32>> = if d1 {
            vec![vec![1.0; mu]; rollouts.len()]
        } else {
            noise_rngs
                .iter_mut()
                .map(|rng| {
                    let u: Vec<f32> = (0..mask_sched.draws_needed(mu))
                        .map(|_| rng.random::<f32>())
                        .collect();
                    mask_sched.ratios(mu, &u)
                })
                .collect::<Result<_, _>>()?
        };
        for (n, iter_batches) in batches.iter_mut().enumerate() {
            for grp in 0..my_groups.len() {
                let lp = rollouts[grp * g].prompt_ids.len();
                let mut b = GrpoBatch::new(lp + gen_len);
                for j in grp * g..(grp + 1) * g {
                    let r = &rollouts[j];
                    let row = if d1 {
                        // d1: a fresh prompt mask per inner iteration (d1's per-iteration
                        // mask seeds), the completion fully masked
                        let u: Vec<f32> = (0..lp).map(|_| noise_rngs[j].random::<f32>()).collect();
                        noise_d1(
                            &r.row,
                            lp,
                            &u,
                            recipe.grpo.p_mask_prompt,
                            mask_id,
                            Some(tail),
                        )?
                    } else {
                        let u: Vec<f32> = (0..gen_len)
                            .map(|_| noise_rngs[j].random::<f32>())
                            .collect();
                        let m = completion_mask(ratios[j][n], &u);
                        noise_completion(&r.row, lp, &m, mask_id, Some(tail))?
                    };
                    ratios_all.push(ratios[j][n]);
                    b.push(row, &r.row, adv.advantages[r.index], r.index)?;
                }
                iter_batches.push(b);
            }
        }
        // non-empty groups of every iteration over the whole step (the 1-device divisor)
        let nonempty_local: Vec<f32> = batches
            .iter()
            .map(|bs| bs.iter().filter(|b| b.rows() > 0).count() as f32)
            .collect();
        let nonempty: Vec<usize> = if world > 1 {
            worker
                .reducer
                .sum_labeled("non-empty group count", &nonempty_local, false)?
                .into_iter()
                .map(|x| x.round() as usize)
                .collect()
        } else {
            nonempty_local.iter().map(|&x| x as usize).collect()
        };

        // 4. Old-policy (and reference) log-probs, without graph.
        let t_lp = Instant::now();
        let old_model = model.valid();
        let logp_of =
            |m: &LladaModel<B::InnerBackend>, b: &GrpoBatch| -> Result<Vec<f32>, TrainError> {
                if b.rows() == 0 {
                    return Ok(vec![]);
                }
                let logits = m.forward(b.input::<B::InnerBackend>(device), &Attention::Full);
                Ok(b.logprobs(logits)?
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .expect("f32"))
            };
        let mut old_lp: Vec<Vec<Vec<f32>>> = vec![];
        let mut ref_lp: Vec<Vec<Option<Vec<f32>>>> = vec![];
        for iter_batches in &batches {
            let mut o = vec![];
            let mut r = vec![];
            for b in iter_batches {
                o.push(logp_of(&old_model, b)?);
                r.push(match &reference {
                    Some(rm) => Some(logp_of(rm, b)?),
                    None => None,
                });
            }
            old_lp.push(o);
            ref_lp.push(r);
        }
        drop(old_model);
        let logprob_s = t_lp.elapsed().as_secs_f64();

        // 5. μ updates.
        let t_bwd = Instant::now();
        // [loss, policy loss, kl loss, kl, clip low, clip high, clip region, rows] of this rank
        let mut sums = [0f32; 8];
        let mut gn_sum = 0f32;
        let mut lr = 0.0;
        for n in 0..mu {
            if nonempty[n] == 0 {
                continue;
            }
            let mut acc: Option<GradientsParams> = None;
            for (k, b) in batches[n].iter().enumerate() {
                if b.rows() == 0 {
                    continue;
                }
                let logits = model.forward(b.input::<B>(device), &Attention::Full);
                let out =
                    unigrpo_loss(logits, b, &old_lp[n][k], ref_lp[n][k].as_deref(), &loss_cfg)?;
                let scale = 1.0 / (nonempty[n] as f32 * mu as f32);
                sums[0] += out.loss.clone().into_scalar().elem::<f32>() * scale;
                sums[1] += out.policy_loss.clone().into_scalar().elem::<f32>() * scale;
                sums[2] += out.kl_loss.clone().into_scalar().elem::<f32>() * scale;
                sums[3] += out.stats.kl_mean * scale;
                sums[4] += out.stats.clip_low * scale;
                sums[5] += out.stats.clip_high * scale;
                sums[6] += out.stats.clip_region * scale;
                sums[7] += out.stats.rows as f32;
                // × world: the mean over ranks of the shard gradients is the 1-device sum
                let loss = out.loss * (world as f32 / nonempty[n] as f32);
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                acc = Some(match acc {
                    None => grads,
                    Some(a) => optim::add_grads(&model, a, grads),
                });
            }
            // a rank whose groups are all empty this iteration contributes zeros
            let mut grads = acc.unwrap_or_default();
            if world > 1 {
                grads = worker.reducer.mean_grads(&model, grads)?;
            }
            gn_sum += optim::clip_global_norm(&model, &mut grads, recipe.optimizer.max_grad_norm)
                / mu as f32;
            lr = schedule.lr(step * mu as u64 + n as u64);
            model = optim::step(&mut optim, model, grads, lr);
        }
        let backward_s = t_bwd.elapsed().as_secs_f64();
        let update_s = t_upd.elapsed().as_secs_f64();
        state.step += 1;
        ran += 1;
        if recipe.grpo.sync_ref_model_steps > 0
            && state.step.is_multiple_of(recipe.grpo.sync_ref_model_steps)
            && reference.is_some()
        {
            reference = Some(model.valid());
        }
        // a signal, or the run stopped from the wandb UI (any rank's request stops every rank)
        let mut stop_requested =
            opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) || wandb.stop_requested();
        let mut ratio_sum = [ratios_all.iter().sum::<f32>(), ratios_all.len() as f32];
        if world > 1 {
            let mut v = sums.to_vec();
            v.extend_from_slice(&ratio_sum);
            v.push(f32::from(u8::from(stop_requested)));
            let r = worker.reducer.sum_labeled("step metrics", &v, false)?;
            sums.copy_from_slice(&r[..8]);
            ratio_sum = [r[8], r[9]];
            stop_requested = r[10] > 0.0;
            if worker.check_every > 0 && state.step.is_multiple_of(worker.check_every) {
                crate::dist::check_replicas(worker.reducer.as_mut(), &model, state.step)?;
            }
        }
        let [
            l_sum,
            p_sum,
            k_sum,
            kl_sum,
            clip_low,
            clip_high,
            clip_region,
            rows_trained,
        ] = sums;
        state.losses.push(l_sum);
        state
            .extra
            .insert("prompt_cursor".into(), json!(cursor + prompts_per_step));

        // Metrics (TRL names), over the whole step.
        let total = &breakdown.total;
        let mean_reward = total.iter().sum::<f32>() / total.len() as f32;
        let term: Vec<f32> = lens
            .iter()
            .zip(&terminated)
            .filter(|(_, t)| **t)
            .map(|(l, _)| *l)
            .collect();
        let gen_tokens: usize = n_completions * gen_len;
        let mut row = json!({
            "step": state.step,
            "reward": mean_reward,
            "reward_std": adv.group_std.iter().sum::<f32>() / adv.group_std.len() as f32,
            "frac_reward_zero_std": adv.frac_zero_std(),
            "loss": l_sum,
            "policy_loss": p_sum,
            "kl_loss": k_sum,
            "kl": kl_sum,
            "clip_ratio/low_mean": clip_low,
            "clip_ratio/high_mean": clip_high,
            "clip_ratio/region_mean": clip_region,
            "grad_norm": gn_sum,
            "learning_rate": lr,
            "completions/mean_length": lens.iter().sum::<f32>() / lens.len() as f32,
            "completions/min_length": lens.iter().cloned().fold(f32::INFINITY, f32::min),
            "completions/max_length": lens.iter().cloned().fold(0.0, f32::max),
            "completions/mean_terminated_length": if term.is_empty() { 0.0 } else { term.iter().sum::<f32>() / term.len() as f32 },
            "completions/clipped_ratio": 1.0 - term.len() as f32 / lens.len() as f32,
            "num_train_rows": rows_trained.round() as usize,
            "mask_ratio/mean": ratio_sum[0] / ratio_sum[1].max(1.0),
            "time/rollout_s": rollout_s,
            "time/update_s": update_s,
            "time/logprob_s": logprob_s,
            "time/backward_s": backward_s,
            // all ranks roll out at the same time: global tokens over rank 0's rollout time
            "rollout_tokens_per_s": gen_tokens as f64 / rollout_s.max(1e-9),
        });
        for (k, name) in breakdown.names.iter().enumerate() {
            match breakdown.stats(k) {
                Some(s) => {
                    row[format!("rewards/{name}/mean")] = json!(s.mean);
                    row[format!("rewards/{name}/std")] = json!(s.std);
                }
                None => {
                    row[format!("rewards/{name}/mean")] = serde_json::Value::Null;
                    row[format!("rewards/{name}/std")] = serde_json::Value::Null;
                }
            }
        }
        let inapplicable = breakdown.inapplicable();
        if !inapplicable.is_empty() {
            row["rewards_inapplicable"] = json!(inapplicable);
            if lead {
                tracing::warn!(
                    "step {}: reward(s) {:?} returned None for every completion (check their fields/params)",
                    state.step,
                    inapplicable
                );
            }
        }
        if let Some(metrics) = metrics.as_mut()
            && (state.step.is_multiple_of(recipe.train.log_every)
                || state.step == recipe.train.max_steps)
        {
            writeln!(metrics, "{row}")
                .map_err(|e| TrainError::Other(format!("{}: {e}", metrics_path.display())))?;
            wandb.log_row(state.step, &row);
        }
        let report = GrpoStepReport {
            step: state.step,
            max_steps: recipe.train.max_steps,
            reward: mean_reward,
            loss: l_sum,
            policy_loss: p_sum,
            kl_loss: k_sum,
            frac_reward_zero_std: adv.frac_zero_std(),
            rollout_s,
            update_s,
            logprob_s,
            backward_s,
            metrics: row,
        };
        outcome.rewards.push(mean_reward);
        on_step(&report);

        let stop_after = opts.stop_after.is_some_and(|n| ran >= n);
        let periodic =
            recipe.checkpoint.every > 0 && state.step.is_multiple_of(recipe.checkpoint.every);
        let last = state.step == recipe.train.max_steps;
        let save_due = periodic || last || stop_requested || stop_after;
        if lead && save_due {
            wandb.record(&mut state);
            outcome.last_checkpoint = Some(save(
                recipe,
                &run,
                &cfg,
                &tok,
                &model,
                reference.as_ref(),
                &optim,
                &state,
            )?);
        }
        if world > 1 && save_due {
            // the other ranks waited for rank 0's checkpoint: a long deadline
            worker.reducer.barrier()?;
        }
        if stop_requested || stop_after {
            outcome.interrupted = stop_requested;
            if stop_requested {
                wandb.preempting();
            }
            break;
        }
    }
    if world > 1 {
        crate::dist::end_run(worker.reducer.as_mut(), &model, state.step)?;
    }
    let final_loss = state.losses.last().map_or(f64::NAN, |l| f64::from(*l));
    let final_reward = outcome.rewards.last().map_or(f64::NAN, |r| f64::from(*r));
    wandb.finish(
        &[("final_loss", final_loss), ("final_reward", final_reward)],
        i32::from(outcome.interrupted),
    );
    outcome.final_step = state.step;
    outcome.losses = state.losses;
    Ok(outcome)
}

#[allow(clippy::too_many_arguments)]
fn save<B: AutodiffBackend>(
    recipe: &UniGrpoRecipe,
    run: &RunDir,
    cfg: &ModelConfig,
    tok: &TextTokenizer,
    model: &LladaModel<B>,
    reference: Option<&LladaModel<B::InnerBackend>>,
    optim: &AdamWOptim<B>,
    state: &TrainerState,
) -> Result<PathBuf, TrainError> {
    let tmp = run.begin_checkpoint(state.step)?;
    let opts = SaveOptions {
        dtype: if recipe.checkpoint.model_dtype == "bf16" {
            DiskDtype::BF16
        } else {
            DiskDtype::F32
        },
        ..Default::default()
    };
    let model_dir = tmp.join("model");
    save_checkpoint(model, cfg, &model_dir, &opts)?;
    tok.inner()
        .save(model_dir.join("tokenizer.json"), false)
        .map_err(|e| TrainError::Other(format!("saving tokenizer.json: {e}")))?;
    if let Some(r) = reference {
        save_checkpoint(r, cfg, &tmp.join("reference"), &opts)?;
    }
    optim::save_state(optim, model, &tmp.join("optimizer.safetensors"))?;
    let text = serde_json::to_string_pretty(state).expect("state serialises");
    write_atomic(&tmp.join("trainer_state.json"), text.as_bytes())?;
    Ok(run.commit_checkpoint(&tmp, state.step, recipe.checkpoint.keep_last)?)
}
