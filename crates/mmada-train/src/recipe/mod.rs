//! Recipes: typed YAML with `--set a.b=c` overrides and errors that name the key path.
//!
//! A recipe is parsed in three steps ([`Recipe::parse`], one implementation for every
//! trainer): YAML text → a YAML tree, `--set` overrides applied to the tree (so overrides get
//! the same validation), the tree deserialised into the recipe type with unknown keys
//! rejected, then the recipe's cross-field [`Recipe::validate`]. Errors give the key path
//! (`optimizer.lr`), what is wrong and, for an unknown key or value, the nearest valid one.
//!
//! * this module: the trait, the parser and the sections every trainer shares (`run`,
//!   `model`, `tokenizer`, `optimizer`, `schedule`, `checkpoint`, `logging`);
//! * [`sft`]: [`SftRecipe`] and its `data` / `loss` / `train` sections;
//! * [`unigrpo`]: [`UniGrpoRecipe`] and its `prompts` / `grpo` / `rollout` / `train` sections.
//!
//! Every choice is an enum whose serde spelling is the YAML value (`cosine`, `bf16`,
//! `reference_model`, …), so a recipe is checked when it is read and the code matches on
//! variants instead of comparing strings.

use std::path::{Path, PathBuf};

use mmada_data::manifest::Manifest;
use mmada_model::checkpoint::DiskDtype;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_norway::Value;

/// The serde `default = "…"` functions of a recipe file: `serde_defaults! { name: Type =
/// value; … }` defines `fn name() -> Type { value }` for each line.
macro_rules! serde_defaults {
    ($($name:ident: $t:ty = $v:expr;)*) => {
        $(fn $name() -> $t {
            $v
        })*
    };
}

pub mod sft;
pub mod unigrpo;

pub use sft::{
    DataSection, ImageTokenizerSection, LossSection, SftRecipe, SourceSpec, StreamSection,
    T2iAttentionName, TrainSection,
};
pub use unigrpo::{
    Estimator, GrpoSection, GrpoTrainSection, KlReference, MaskGitSection, MaskRatioKind,
    PromptTemplate, PromptsSection, T2iPadAttention, TaskKind, TaskSection, TaskSpec,
    UniGrpoRecipe,
};

serde_defaults! {
    default_output_dir: PathBuf = PathBuf::from("runs");
    beta1: f32 = 0.9;
    beta2: f32 = 0.999;
    adam_eps: f32 = 1e-8;
    wd: f32 = 0.01;
    decay_fraction: f64 = 0.1;
    two: usize = 2;
}

/// A recipe error: file, key path and message.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The file cannot be read.
    #[error("cannot read recipe {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// YAML syntax.
    #[error("recipe {path}: invalid YAML: {message}")]
    Yaml {
        /// The file.
        path: String,
        /// Parser message with line and column.
        message: String,
    },
    /// A value at a key path is invalid (unknown key, wrong type, failed validation).
    #[error("recipe {path}: `{key}`: {message}")]
    Key {
        /// The file.
        path: String,
        /// The key path, e.g. `optimizer.lr`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A malformed `--set` override.
    #[error("--set {0}: expected KEY.PATH=VALUE (e.g. --set optimizer.lr=1e-4)")]
    BadOverride(String),
}

impl RecipeError {
    /// A [`RecipeError::Key`] for recipe `path`.
    pub fn key(path: &str, key: &str, message: impl Into<String>) -> Self {
        RecipeError::Key {
            path: path.to_string(),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// A trainer's recipe: one load / parse / print path for every trainer.
pub trait Recipe: Serialize + DeserializeOwned {
    /// Cross-field checks, with the key path of the offending value; `name` is the file.
    ///
    /// # Errors
    /// [`RecipeError::Key`].
    fn validate(&self, name: &str) -> Result<(), RecipeError>;

    /// Read a recipe file, apply `--set` overrides, validate.
    ///
    /// # Errors
    /// [`RecipeError`] naming the file and key.
    fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// Parse recipe text (`name` is used in errors), apply overrides, validate.
    ///
    /// # Errors
    /// [`RecipeError`].
    fn parse(text: &str, name: &str, overrides: &[String]) -> Result<Self, RecipeError> {
        let mut tree: Value = serde_norway::from_str(text).map_err(|e| RecipeError::Yaml {
            path: name.to_string(),
            message: e.to_string(),
        })?;
        apply_overrides(&mut tree, overrides)?;
        let r: Self = from_tree(tree, name)?;
        r.validate(name)?;
        Ok(r)
    }

    /// The resolved recipe as YAML (what `--print-config` prints and the run directory keeps).
    fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("recipe serialises")
    }
}

/// Apply `key.path=value` overrides to a YAML tree ([`mmada_data::overrides::apply`]); the
/// value is parsed as YAML (`1e-4`, `true`, `[a, b]`, strings). A path part may index a list:
/// `tasks[1].share=2`.
///
/// # Errors
/// [`RecipeError::BadOverride`] when an override has no `=`, an empty key, or an index
/// outside the list it names.
pub fn apply_overrides(tree: &mut Value, overrides: &[String]) -> Result<(), RecipeError> {
    mmada_data::overrides::apply(tree, overrides).map_err(RecipeError::BadOverride)
}

/// The nearest of `candidates` to `word` (Levenshtein ≤ 3), for "did you mean" hints.
pub(crate) fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(word, c), *c))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, c)| c)
}

/// Deserialize a YAML tree into `T` with key-path errors and nearest-key / nearest-value
/// hints.
///
/// # Errors
/// [`RecipeError::Key`].
pub fn from_tree<T: DeserializeOwned>(tree: Value, path: &str) -> Result<T, RecipeError> {
    serde_path_to_error::deserialize(tree).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner().to_string();
        let mut message = inner.clone();
        // serde: "unknown field `lrr`, expected one of `lr`, `beta1`, …" and
        // "unknown variant `cosin`, expected one of `cosine`, `linear`, …"
        let rest = inner
            .strip_prefix("unknown field `")
            .or_else(|| inner.strip_prefix("unknown variant `"));
        if let Some(rest) = rest
            && let Some((word, expected)) = rest.split_once('`')
        {
            let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            if let Some(n) = nearest(word, &candidates) {
                message = format!("{inner} (did you mean `{n}`?)");
            }
        }
        RecipeError::key(path, &key, message)
    })
}

/// The manifest a recipe names: the file `manifest` (relative to `base`) or the `inline`
/// one, with its source replaced by the local `path` when given
/// ([`Manifest::with_source_path`]: the format follows a known file extension, so a parquet
/// manifest pointed at a jsonl copy reads as jsonl). The one resolution of SFT sources
/// (`data.<stream>.sources[i]`), UniGRPO prompts (`prompts`) and `mmada-train data check`.
///
/// # Errors
/// The manifest file's errors (naming it); [`mmada_data::DataError::Manifest`] when neither
/// `manifest` nor `inline` is given.
pub fn resolve_manifest(
    manifest: Option<&Path>,
    inline: Option<&Manifest>,
    path: Option<&str>,
    base: &Path,
) -> Result<Manifest, mmada_data::DataError> {
    let m = match (manifest, inline) {
        (Some(file), _) => Manifest::from_file(&crate::run_dir::resolve(base, file))?,
        (None, Some(m)) => m.clone(),
        (None, None) => {
            return Err(mmada_data::DataError::Manifest {
                path: "recipe".into(),
                message: "a source needs `manifest: FILE` or `inline: {…}`".into(),
            });
        }
    };
    Ok(match path {
        Some(p) => m.with_source_path(p),
        None => m,
    })
}

/// The `lora:` section ([`mmada_model::lora::LoraConfig`]): `r`, `alpha`, `dropout`,
/// `target_modules` (upstream block projection names), `modules_to_save` (`wte`, `ln_f`,
/// `ff_out` = the LM head).
pub use mmada_model::lora::LoraConfig as LoraSection;

/// Checks of an optional `lora:` section, with the key path (`lora.r`, …) of a bad value.
///
/// # Errors
/// [`RecipeError::Key`] naming `lora.<field>`.
pub(crate) fn validate_lora(
    name: &str,
    lora: Option<&LoraSection>,
    activation_checkpointing: bool,
) -> Result<(), RecipeError> {
    let Some(l) = lora else { return Ok(()) };
    if activation_checkpointing && l.dropout > 0.0 {
        // the recomputed forward would draw other dropout masks than the first one
        return Err(RecipeError::key(
            name,
            "lora.dropout",
            format!(
                "{} with train.activation_checkpointing: true is not supported (the block recomputation would draw new dropout masks); set lora.dropout: 0 or train.activation_checkpointing: false",
                l.dropout
            ),
        ));
    }
    l.validate().map_err(|e| match e {
        mmada_model::lora::LoraError::Config { field, message } => {
            RecipeError::key(name, &format!("lora.{field}"), message)
        }
        other => RecipeError::key(name, "lora", other.to_string()),
    })
}

/// The dtype of the parameters the optimizer updates: `model.dtype`, except under LoRA
/// without modules to save, where only the f32 adapters learn (the base may be bf16).
pub(crate) fn trained_dtype(model: &ModelSection, lora: Option<&LoraSection>) -> ParamDtype {
    match lora {
        Some(l) if l.modules_to_save.is_empty() => ParamDtype::F32,
        _ => model.dtype,
    }
}

/// `run:` — identity of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Run name: the run directory is `output_dir/name`.
    pub name: String,
    /// Parent of run directories.
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    /// The one run seed; every consumer derives its own stream from it.
    #[serde(default)]
    pub seed: u64,
}

/// A parameter dtype in memory (`model.dtype`) or on disk (`checkpoint.model_dtype`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamDtype {
    /// float32 (default; exact resume).
    #[default]
    F32,
    /// bfloat16 (half the size; a checkpoint in bf16 does not resume bit-exactly).
    Bf16,
}

impl ParamDtype {
    /// The in-memory float dtype.
    pub fn float(self) -> burn::tensor::FloatDType {
        match self {
            ParamDtype::F32 => burn::tensor::FloatDType::F32,
            ParamDtype::Bf16 => burn::tensor::FloatDType::BF16,
        }
    }

    /// The safetensors dtype.
    pub fn disk(self) -> DiskDtype {
        match self {
            ParamDtype::F32 => DiskDtype::F32,
            ParamDtype::Bf16 => DiskDtype::BF16,
        }
    }

    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamDtype::F32 => "f32",
            ParamDtype::Bf16 => "bf16",
        }
    }
}

/// `model:` — where the initial weights come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A preset (`tiny`, `llada_8b`, `mmada_8b`) initialised randomly; exclusive with `checkpoint`.
    #[serde(default)]
    pub preset: Option<String>,
    /// A Hugging Face checkpoint directory (config.json + safetensors).
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// `config.json` keys overriding the preset (e.g. `{d_model: 128, n_layers: 4}`).
    /// `vocab_size`, `embedding_size` and the special ids always follow the tokenizer.
    #[serde(default)]
    pub overrides: serde_json::Map<String, serde_json::Value>,
    /// Parameter dtype: `f32` (default) or `bf16`.
    #[serde(default)]
    pub dtype: ParamDtype,
}

impl ModelSection {
    /// Exactly one of `preset` / `checkpoint`; `mixed_precision: bf16` needs f32 parameters.
    ///
    /// # Errors
    /// [`RecipeError::Key`] naming `model` or `train.mixed_precision`.
    pub fn validate(&self, name: &str, mixed: MixedPrecision) -> Result<(), RecipeError> {
        match (&self.preset, &self.checkpoint) {
            (Some(_), Some(_)) => {
                return Err(RecipeError::key(
                    name,
                    "model",
                    "give either `preset` or `checkpoint`, not both",
                ));
            }
            (None, None) => {
                return Err(RecipeError::key(
                    name,
                    "model",
                    "give `preset: tiny` or `checkpoint: DIR`",
                ));
            }
            _ => {}
        }
        if mixed == MixedPrecision::Bf16 && self.dtype != ParamDtype::F32 {
            let d = self.dtype.as_str();
            return Err(RecipeError::key(
                name,
                "train.mixed_precision",
                format!(
                    "`bf16` keeps f32 master weights, but model.dtype is `{d}`: set model.dtype: f32 (or mixed_precision: no for pure {d} training)"
                ),
            ));
        }
        Ok(())
    }
}

/// `tokenizer:` — the text tokenizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    /// A `tokenizer.json` file or a directory holding one (with its config files).
    pub path: PathBuf,
    /// Add the MMaDA special tokens the vocabulary lacks (mask, chat headers, task tokens).
    #[serde(default = "yes")]
    pub add_mmada_tokens: bool,
}

pub(crate) fn yes() -> bool {
    true
}

pub(crate) fn one_u64() -> u64 {
    1
}

/// The default of `train.max_nonfinite_steps`.
pub(crate) fn max_nonfinite_steps() -> u32 {
    crate::guard::DEFAULT_MAX_NONFINITE_STEPS
}

/// `train.max_nonfinite_steps` is at least 1.
///
/// # Errors
/// [`RecipeError::Key`] naming `train.max_nonfinite_steps`.
pub(crate) fn validate_max_nonfinite(name: &str, k: u32) -> Result<(), RecipeError> {
    if k == 0 {
        return Err(RecipeError::key(
            name,
            "train.max_nonfinite_steps",
            "must be at least 1 (the run stops after this many consecutive steps with a NaN/inf loss or gradient norm)",
        ));
    }
    Ok(())
}

pub(crate) fn one_f32() -> f32 {
    1.0
}

pub(crate) fn cpu() -> String {
    "cpu".into()
}

/// `optimizer:` — AdamW (PyTorch semantics; burn's defaults differ and are never used).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSection {
    /// Peak learning rate.
    pub lr: f64,
    /// β₁.
    #[serde(default = "beta1")]
    pub beta1: f32,
    /// β₂.
    #[serde(default = "beta2")]
    pub beta2: f32,
    /// ε (PyTorch default 1e-8).
    #[serde(default = "adam_eps")]
    pub eps: f32,
    /// Decoupled weight decay (upstream configs: 0.01).
    #[serde(default = "wd")]
    pub weight_decay: f32,
    /// Global-norm gradient clipping (`clip_grad_norm_`); `0` disables.
    #[serde(default = "one_f32")]
    pub max_grad_norm: f32,
    /// With `model.dtype: bf16`: keep an f32 master copy of every parameter (on its owner
    /// rank when sharded), update it and write it rounded to nearest into the bf16 weights
    /// (4 more bytes per parameter, divided by the ranks with `train.sharding`). Saved as
    /// `master_weights.safetensors` in every checkpoint, so resume is exact. No effect on
    /// f32 parameters.
    #[serde(default)]
    pub master_weights: bool,
    /// With `model.dtype: bf16` and no master copy: `stochastic` rounds every update into
    /// bf16 stochastically (seeded by `run.seed`, reproducible); `nearest` (default) is
    /// refused for bf16 parameters without `master_weights`, because updates smaller than
    /// half a bf16 ulp would vanish.
    #[serde(default)]
    pub bf16_rounding: Bf16Rounding,
}

/// `optimizer.bf16_rounding`: how an update is written into bf16 parameters that have no
/// f32 master copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bf16Rounding {
    /// Round to nearest (updates below half an ulp vanish: refused without master weights).
    #[default]
    Nearest,
    /// Stochastic rounding (unbiased; seeded).
    Stochastic,
}

impl OptimizerSection {
    /// A positive learning rate; parameters of dtype `dtype` (`model.dtype`) that learn:
    /// bf16 needs `master_weights: true` or `bf16_rounding: stochastic` (not both).
    ///
    /// # Errors
    /// [`RecipeError::Key`] naming `optimizer.lr`, `optimizer.master_weights` or
    /// `optimizer.bf16_rounding`.
    pub fn validate(&self, name: &str, dtype: ParamDtype) -> Result<(), RecipeError> {
        if self.lr.is_nan() || self.lr <= 0.0 {
            return Err(RecipeError::key(name, "optimizer.lr", "must be positive"));
        }
        if self.master_weights && self.bf16_rounding == Bf16Rounding::Stochastic {
            return Err(RecipeError::key(
                name,
                "optimizer.bf16_rounding",
                "`stochastic` is for bf16 weights without a master copy, but optimizer.master_weights is true: keep one of the two",
            ));
        }
        if dtype == ParamDtype::Bf16
            && !self.master_weights
            && self.bf16_rounding == Bf16Rounding::Nearest
        {
            return Err(RecipeError::key(
                name,
                "optimizer.master_weights",
                "model.dtype is bf16 with no f32 master copy and round-to-nearest updates: at small learning rates almost every update rounds away (4 UniGRPO updates at lr 1e-5 changed 0.35 % of the weights). Set optimizer.master_weights: true (f32 master copy, exact resume), or optimizer.bf16_rounding: stochastic (no extra memory), or model.dtype: f32",
            ));
        }
        Ok(())
    }

    /// The optimizer's precision mode for these settings.
    pub fn precision(&self) -> crate::optim::Precision {
        if self.master_weights {
            crate::optim::Precision::Master
        } else if self.bf16_rounding == Bf16Rounding::Stochastic {
            crate::optim::Precision::Stochastic
        } else {
            crate::optim::Precision::Plain
        }
    }
}

/// `schedule.kind`: the learning-rate schedule (see [`crate::schedule`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Upstream MMaDA cosine with `min_lr_scale` (default).
    #[default]
    Cosine,
    /// Linear decay to `min_lr_scale`.
    Linear,
    /// Constant after warmup.
    Constant,
    /// Warmup-stable-decay (LLaDA SFT).
    Wsd,
}

/// `schedule:` — learning-rate schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// `cosine` (upstream), `linear`, `constant`, `wsd` (warmup-stable-decay).
    #[serde(default)]
    pub kind: ScheduleKind,
    /// Linear warmup steps from 0.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Floor as a fraction of the peak LR (cosine, linear, wsd).
    #[serde(default)]
    pub min_lr_scale: f64,
    /// `wsd`: fraction of the steps spent in the final linear decay (LLaDA SFT: 0.1).
    #[serde(default = "decay_fraction")]
    pub decay_fraction: f64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        serde_norway::from_str("{}").expect("defaults")
    }
}

impl ScheduleSection {
    /// `min_lr_scale` in `[0, 1]`.
    ///
    /// # Errors
    /// [`RecipeError::Key`] naming `schedule.min_lr_scale`.
    pub fn validate(&self, name: &str) -> Result<(), RecipeError> {
        if !(0.0..=1.0).contains(&self.min_lr_scale) {
            return Err(RecipeError::key(
                name,
                "schedule.min_lr_scale",
                "must be in [0, 1]",
            ));
        }
        Ok(())
    }
}

/// `train.sharding`: ZeRO-style partitioning over data-parallel ranks (see
/// [`crate::dist`]). Every parameter is owned by one rank (whole tensors, balanced by size).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// Every rank holds the whole optimizer state (plain data parallelism).
    #[default]
    None,
    /// ZeRO stage 1 (DeepSpeed `zero_optimization.stage: 1`): gradients are all-reduced,
    /// each rank keeps AdamW state and master weights of its own parameters only, updates
    /// them and broadcasts the new values.
    Optimizer,
    /// ZeRO stage 2 (DeepSpeed stage 2, FSDP `SHARD_GRAD_OP`): each gradient is reduced to
    /// its owner only (the others drop theirs), the global norm comes from the owners'
    /// per-parameter squared norms, then as stage 1.
    OptimizerAndGradients,
}

/// Recipe values of `train.mixed_precision` (accelerate's spelling).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// Compute in the parameter dtype.
    #[default]
    No,
    /// bf16 compute over f32 master parameters.
    Bf16,
}

impl MixedPrecision {
    /// The compute dtype to give `LladaModel::with_compute_dtype`.
    pub fn compute_dtype(self) -> Option<burn::tensor::FloatDType> {
        match self {
            MixedPrecision::No => None,
            MixedPrecision::Bf16 => Some(burn::tensor::FloatDType::BF16),
        }
    }
}

/// `train.log_every` is at least 1.
///
/// # Errors
/// [`RecipeError::Key`] naming `train.log_every`.
pub(crate) fn validate_log_every(name: &str, every: u64) -> Result<(), RecipeError> {
    if every == 0 {
        return Err(RecipeError::key(
            name,
            "train.log_every",
            "must be at least 1 (a metrics row every N steps)",
        ));
    }
    Ok(())
}

/// `train.device` parses as a device string.
///
/// # Errors
/// [`RecipeError::Key`] naming `train.device`.
pub(crate) fn validate_device(name: &str, device: &str) -> Result<(), RecipeError> {
    device
        .parse::<mmada_model::backend::DeviceSpec>()
        .map(|_| ())
        .map_err(|e| RecipeError::key(name, "train.device", e.to_string()))
}

/// `checkpoint:` — periodic run checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Save every this many steps (0 = only at the end).
    #[serde(default)]
    pub every: u64,
    /// Keep the newest this many checkpoints (0 = all).
    #[serde(default = "two")]
    pub keep_last: usize,
    /// On-disk dtype of the model: `f32` (exact resume) or `bf16` (half the size; resume is
    /// then not bit-exact).
    #[serde(default)]
    pub model_dtype: ParamDtype,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        serde_norway::from_str("{}").expect("defaults")
    }
}

/// `logging:` — where metrics go besides `metrics.jsonl` (always written).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    /// Weights & Biases over HTTP (`mode: online | offline | disabled`, project, entity, …).
    #[serde(default)]
    pub wandb: Option<mmada_wandb::WandbConfig>,
}
