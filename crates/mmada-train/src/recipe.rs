//! Recipes: typed YAML with `--set a.b=c` overrides and errors that name the key path.
//!
//! A recipe is parsed in three steps: YAML text → a YAML tree, `--set` overrides applied to
//! the tree (so overrides get the same validation), the tree deserialised into [`SftRecipe`]
//! with unknown keys rejected. Errors give the key path (`optimizer.lr`), what is wrong and,
//! for an unknown key, the nearest valid one.

use std::path::{Path, PathBuf};

use mmada_data::LayoutConfig;
use mmada_data::ResizeMode;
use mmada_data::manifest::Manifest;
use mmada_diffusion::{MaskSchedule, T2iAttention};
use serde::{Deserialize, Serialize};
use serde_norway::Value;

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

fn default_output_dir() -> PathBuf {
    PathBuf::from("runs")
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
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

fn default_dtype() -> String {
    "f32".into()
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

fn yes() -> bool {
    true
}

/// One dataset of a stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// A manifest file (`data_manifests/gsm8k.yaml`); exclusive with `inline`.
    #[serde(default)]
    pub manifest: Option<PathBuf>,
    /// A manifest written inline in the recipe.
    #[serde(default)]
    pub inline: Option<Manifest>,
    /// Replace the manifest's source with this local path or glob (e.g. a local copy).
    #[serde(default)]
    pub path: Option<String>,
    /// Mixture weight within the stream.
    #[serde(default = "one")]
    pub weight: f64,
    /// Use at most this many examples (after reading).
    #[serde(default)]
    pub max_examples: Option<usize>,
}

fn one() -> f64 {
    1.0
}

/// A stream (`lm`, `mmu`, `t2i`): rows per micro-batch and its datasets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSection {
    /// Rows of this stream in each micro-batch (upstream `batch_size_lm` / `_mmu` / `_t2i`).
    #[serde(default)]
    pub batch_size: usize,
    /// Datasets mixed by weight.
    #[serde(default)]
    pub sources: Vec<SourceSpec>,
    /// `per_row` (default: every row draws its source by weight) or `per_batch` (one source
    /// per micro-step for the whole sub-batch, upstream stage 2.2 `*_in_mmu_coeff` /
    /// `*_in_lm_coeff` sampling, spec §3.4); seeded from the run seed, resumable.
    #[serde(default)]
    pub mixing: mmada_data::Mixing,
}

/// `data:` — streams, layouts and held-out evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Root for relative manifest source paths (e.g. `../shared/data`).
    #[serde(default)]
    pub data_root: Option<PathBuf>,
    /// Sequence layouts (max lengths, chat template).
    #[serde(default)]
    pub layout: LayoutConfig,
    /// Text stream (lm / chat / cot rows).
    #[serde(default)]
    pub lm: StreamSection,
    /// Multimodal-understanding stream (rows need image codes).
    #[serde(default)]
    pub mmu: StreamSection,
    /// Text-to-image stream (rows need image codes).
    #[serde(default)]
    pub t2i: StreamSection,
    /// Drop examples whose layout had to be truncated (upstream `ChatDataset` filter).
    #[serde(default = "yes")]
    pub filter_overlong: bool,
    /// Held-out evaluation: this many examples of each lm source are kept out of training.
    #[serde(default)]
    pub eval_examples: usize,
    /// The image tokenizer for mmu / t2i rows whose images are files or bytes.
    #[serde(default)]
    pub image_tokenizer: Option<ImageTokenizerSection>,
}

/// `data.image_tokenizer:` — MAGVIT-v2 (spec §2.3) for the images of mmu / t2i rows
/// (upstream `model.vq_model`, `dataset.preprocessing.resolution`, `image_transform` /
/// `image_transform_squash`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageTokenizerSection {
    /// A MAGVIT-v2 folder (`config.json` + `pytorch_model.safetensors`) or a Hugging Face
    /// repo id (`showlab/magvitv2`). Optional when `codes` answers every image.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Square side `R` images are brought to (256 in stages 1.1/1.2, 512 later); codes per
    /// image `(R/16)²`.
    #[serde(default = "default_resolution")]
    pub resolution: u32,
    /// t2i images: `center_crop` (upstream `image_transform`) or `squash`.
    #[serde(default)]
    pub t2i_mode: ResizeMode,
    /// mmu images: `squash` (upstream stage 2.x `image_transform_squash`) or `center_crop`.
    #[serde(default = "squash")]
    pub mmu_mode: ResizeMode,
    /// On-disk code cache (keyed by file hash, preprocessing and tokenizer weights), shared
    /// by runs; none when absent.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Pre-tokenized code tables from `mmada-train data pretokenize` (parquet), looked up
    /// before encoding.
    #[serde(default)]
    pub codes: Vec<PathBuf>,
}

impl Default for ImageTokenizerSection {
    fn default() -> Self {
        serde_norway::from_str("{}").expect("defaults")
    }
}

fn default_resolution() -> u32 {
    512
}
fn squash() -> ResizeMode {
    ResizeMode::Squash
}

/// `loss:` — coefficients and upstream options (spec §3.3).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossSection {
    /// `t2i_coeff`.
    #[serde(default = "one_f32")]
    pub t2i_coeff: f32,
    /// `lm_coeff`.
    #[serde(default = "one_f32")]
    pub lm_coeff: f32,
    /// `mmu_coeff`.
    #[serde(default = "one_f32")]
    pub mmu_coeff: f32,
    /// `ε` of `p_mask = (1 − ε)t + ε`.
    #[serde(default = "default_eps")]
    pub eps: f32,
    /// lm rows: `answer_length` normalisation (chat/SFT data) or `B·L` (pretraining text).
    #[serde(default = "yes")]
    pub lm_answer_normalised: bool,
    /// t2i attention: `upstream_soft_bias` (current upstream code), `full`, `hard`.
    #[serde(default)]
    pub t2i_attention: T2iAttentionName,
    /// Minimum image masking rate (upstream `training.min_masking_rate`).
    #[serde(default)]
    pub min_masking_rate: f32,
    /// t2i mask-ratio schedule `γ(τ)` (upstream `mask_schedule.schedule`): `cosine`,
    /// `linear`, `powK` (e.g. `pow2`), `sigmoid`, or `{sigmoid: {start, end, tau, clip_min}}`.
    #[serde(default)]
    pub mask_schedule: MaskSchedule,
    /// Probability that a t2i caption is replaced by the empty prompt (upstream
    /// `training.cond_dropout_prob`, 0.1 in every config).
    #[serde(default = "cond_dropout")]
    pub cond_dropout_prob: f32,
}

fn cond_dropout() -> f32 {
    0.1
}

fn one_f32() -> f32 {
    1.0
}
fn default_eps() -> f32 {
    1e-3
}

/// Recipe spelling of [`T2iAttention`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum T2iAttentionName {
    /// [`T2iAttention::UpstreamSoftBias`].
    #[default]
    UpstreamSoftBias,
    /// [`T2iAttention::Full`].
    Full,
    /// [`T2iAttention::Hard`].
    Hard,
}

impl From<T2iAttentionName> for T2iAttention {
    fn from(n: T2iAttentionName) -> Self {
        match n {
            T2iAttentionName::UpstreamSoftBias => T2iAttention::UpstreamSoftBias,
            T2iAttentionName::Full => T2iAttention::Full,
            T2iAttentionName::Hard => T2iAttention::Hard,
        }
    }
}

impl Default for LossSection {
    fn default() -> Self {
        serde_norway::from_str("{}").expect("defaults")
    }
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
}

fn beta1() -> f32 {
    0.9
}
fn beta2() -> f32 {
    0.999
}
fn adam_eps() -> f32 {
    1e-8
}
fn wd() -> f32 {
    0.01
}

/// `schedule:` — learning-rate schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// `cosine` (upstream), `linear`, `constant`, `wsd` (warmup-stable-decay).
    #[serde(default = "cosine")]
    pub kind: String,
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

fn cosine() -> String {
    "cosine".into()
}
fn decay_fraction() -> f64 {
    0.1
}

impl Default for ScheduleSection {
    fn default() -> Self {
        serde_norway::from_str("{}").expect("defaults")
    }
}

/// `train:` — steps, accumulation, device, logging cadence, evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps.
    pub max_steps: u64,
    /// Micro-batches per optimizer step (upstream `gradient_accumulation_steps`); each
    /// micro-batch holds every stream's `batch_size` rows.
    #[serde(default = "one_u64")]
    pub grad_accum: u64,
    /// `cpu`, `cpu:N`, `cuda:0`, `cuda:0,1,2,3`, `cuda:all` (several = data parallelism; see
    /// `mmada_model::backend::DeviceSpec`).
    #[serde(default = "cpu")]
    pub device: String,
    /// Write a metrics row every this many steps.
    #[serde(default = "one_u64")]
    pub log_every: u64,
    /// Evaluate the held-out loss every this many steps (0 = never).
    #[serde(default)]
    pub eval_every: u64,
    /// Mixed precision, named as accelerate's `mixed_precision` (upstream
    /// `training.mixed_precision`, spec §3.5): `no` (compute in `model.dtype`) or `bf16`
    /// (f32 master weights and AdamW state, bf16 forward/backward, f32 loss; needs
    /// `model.dtype: f32`).
    #[serde(default)]
    pub mixed_precision: MixedPrecision,
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

fn one_u64() -> u64 {
    1
}
fn cpu() -> String {
    "cpu".into()
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
    #[serde(default = "default_dtype")]
    pub model_dtype: String,
}

fn two() -> usize {
    2
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

/// A complete SFT recipe (`mmada-train sft --recipe FILE`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftRecipe {
    /// Run identity.
    pub run: RunConfig,
    /// Initial model.
    pub model: ModelSection,
    /// Tokenizer.
    pub tokenizer: TokenizerSection,
    /// Data.
    pub data: DataSection,
    /// Loss options.
    #[serde(default)]
    pub loss: LossSection,
    /// Optimizer.
    pub optimizer: OptimizerSection,
    /// LR schedule.
    #[serde(default)]
    pub schedule: ScheduleSection,
    /// Training loop.
    pub train: TrainSection,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    /// Metrics sinks.
    #[serde(default)]
    pub logging: LoggingSection,
}

/// Apply `key.path=value` overrides to a YAML tree; the value is parsed as YAML
/// (`1e-4`, `true`, `[a, b]`, strings).
///
/// # Errors
/// [`RecipeError::BadOverride`] when an override has no `=` or an empty key.
pub fn apply_overrides(tree: &mut Value, overrides: &[String]) -> Result<(), RecipeError> {
    for o in overrides {
        let (key, value) = o
            .split_once('=')
            .ok_or_else(|| RecipeError::BadOverride(o.clone()))?;
        if key.trim().is_empty() {
            return Err(RecipeError::BadOverride(o.clone()));
        }
        let value: Value =
            serde_norway::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
        let mut node = &mut *tree;
        let parts: Vec<&str> = key.trim().split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            if !node.is_mapping() {
                *node = Value::Mapping(Default::default());
            }
            let map = node.as_mapping_mut().expect("mapping");
            let k = Value::String(part.to_string());
            if i + 1 == parts.len() {
                map.insert(k, value.clone());
                break;
            }
            if !map.contains_key(&k) {
                map.insert(k.clone(), Value::Mapping(Default::default()));
            }
            node = map.get_mut(&k).expect("just inserted");
        }
    }
    Ok(())
}

/// The nearest of `candidates` to `word` (Levenshtein ≤ 3), for "did you mean" hints.
fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(word, c), *c))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, c)| c)
}

/// Deserialize a YAML tree into `T` with key-path errors and nearest-key hints.
///
/// # Errors
/// [`RecipeError::Key`].
pub fn from_tree<T: serde::de::DeserializeOwned>(
    tree: Value,
    path: &str,
) -> Result<T, RecipeError> {
    serde_path_to_error::deserialize(tree).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner().to_string();
        let mut message = inner.clone();
        // serde: "unknown field `lrr`, expected one of `lr`, `beta1`, …"
        if let Some(rest) = inner.strip_prefix("unknown field `")
            && let Some((field, expected)) = rest.split_once('`')
        {
            let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            if let Some(n) = nearest(field, &candidates) {
                message = format!("{inner} (did you mean `{n}`?)");
            }
        }
        RecipeError::Key {
            path: path.to_string(),
            key,
            message,
        }
    })
}

impl SftRecipe {
    /// Read a recipe file and apply overrides, then validate.
    ///
    /// # Errors
    /// [`RecipeError`] naming the file and key.
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
        let r: SftRecipe = from_tree(tree, name)?;
        r.validate(name)?;
        Ok(r)
    }

    /// The resolved recipe as YAML (what `--print-config` prints and the run directory keeps).
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("recipe serialises")
    }

    /// Cross-field checks, with the key path of the offending value.
    ///
    /// # Errors
    /// [`RecipeError::Key`].
    pub fn validate(&self, name: &str) -> Result<(), RecipeError> {
        let err = |key: &str, message: String| RecipeError::Key {
            path: name.to_string(),
            key: key.to_string(),
            message,
        };
        match (&self.model.preset, &self.model.checkpoint) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "model",
                    "give either `preset` or `checkpoint`, not both".into(),
                ));
            }
            (None, None) => {
                return Err(err(
                    "model",
                    "give `preset: tiny` or `checkpoint: DIR`".into(),
                ));
            }
            _ => {}
        }
        if !["f32", "bf16"].contains(&self.model.dtype.as_str()) {
            return Err(err(
                "model.dtype",
                format!("`{}`: expected f32 or bf16", self.model.dtype),
            ));
        }
        if self.train.mixed_precision == MixedPrecision::Bf16 && self.model.dtype != "f32" {
            return Err(err(
                "train.mixed_precision",
                format!(
                    "`bf16` keeps f32 master weights, but model.dtype is `{}`: set model.dtype: f32 (or mixed_precision: no for pure {} training)",
                    self.model.dtype, self.model.dtype
                ),
            ));
        }
        if !["f32", "bf16"].contains(&self.checkpoint.model_dtype.as_str()) {
            return Err(err(
                "checkpoint.model_dtype",
                format!("`{}`: expected f32 or bf16", self.checkpoint.model_dtype),
            ));
        }
        if !["cosine", "linear", "constant", "wsd"].contains(&self.schedule.kind.as_str()) {
            let hint = nearest(
                &self.schedule.kind,
                &["cosine", "linear", "constant", "wsd"],
            )
            .map(|n| format!(" (did you mean `{n}`?)"))
            .unwrap_or_default();
            return Err(err(
                "schedule.kind",
                format!(
                    "`{}`: expected cosine, linear, constant or wsd{hint}",
                    self.schedule.kind
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.schedule.min_lr_scale) {
            return Err(err("schedule.min_lr_scale", "must be in [0, 1]".into()));
        }
        for (key, v) in [
            ("loss.min_masking_rate", self.loss.min_masking_rate),
            ("loss.cond_dropout_prob", self.loss.cond_dropout_prob),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(err(key, format!("{v}: must be in [0, 1]")));
            }
        }
        if let Some(it) = &self.data.image_tokenizer
            && (it.resolution == 0 || !it.resolution.is_multiple_of(16))
        {
            return Err(err(
                "data.image_tokenizer.resolution",
                format!(
                    "{}: must be a positive multiple of 16 (MAGVIT-v2 downsamples by 16; upstream 256 or 512)",
                    it.resolution
                ),
            ));
        }
        if self.optimizer.lr.is_nan() || self.optimizer.lr <= 0.0 {
            return Err(err("optimizer.lr", "must be positive".into()));
        }
        if self.train.max_steps == 0 {
            return Err(err("train.max_steps", "must be at least 1".into()));
        }
        if self.train.grad_accum == 0 {
            return Err(err("train.grad_accum", "must be at least 1".into()));
        }
        if let Err(e) = self
            .train
            .device
            .parse::<mmada_model::backend::DeviceSpec>()
        {
            return Err(err("train.device", e.to_string()));
        }
        let streams = [
            ("data.lm", &self.data.lm),
            ("data.mmu", &self.data.mmu),
            ("data.t2i", &self.data.t2i),
        ];
        if streams.iter().all(|(_, s)| s.batch_size == 0) {
            return Err(err(
                "data",
                "every stream has batch_size 0: set data.lm.batch_size (or mmu / t2i)".into(),
            ));
        }
        for (key, s) in streams {
            if s.batch_size > 0 && s.sources.is_empty() {
                return Err(err(
                    &format!("{key}.sources"),
                    "a stream with batch_size > 0 needs at least one source".into(),
                ));
            }
            for (i, src) in s.sources.iter().enumerate() {
                if src.manifest.is_some() == src.inline.is_some() {
                    return Err(err(
                        &format!("{key}.sources[{i}]"),
                        "give exactly one of `manifest: FILE` or `inline: {...}`".into(),
                    ));
                }
                if src.weight.is_nan() || src.weight <= 0.0 {
                    return Err(err(
                        &format!("{key}.sources[{i}].weight"),
                        "must be positive".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
run: {name: t}
model: {preset: tiny}
tokenizer: {path: tok.json}
data:
  lm: {batch_size: 2, sources: [{manifest: m.yaml}]}
optimizer: {lr: 1.0e-4}
train: {max_steps: 3}
"#;

    #[test]
    fn minimal_recipe_gets_upstream_defaults() {
        let r = SftRecipe::parse(MINIMAL, "r.yaml", &[]).unwrap();
        assert_eq!(r.optimizer.eps, 1e-8);
        assert_eq!(r.optimizer.weight_decay, 0.01);
        assert_eq!(r.optimizer.max_grad_norm, 1.0);
        assert_eq!(r.loss.eps, 1e-3);
        assert_eq!(r.schedule.kind, "cosine");
        assert_eq!(r.checkpoint.keep_last, 2);
        // the printed config parses back to the same thing
        let again = SftRecipe::parse(&r.to_yaml(), "printed", &[]).unwrap();
        assert_eq!(again.to_yaml(), r.to_yaml());
    }

    #[test]
    fn overrides_are_validated_like_the_file() {
        let r = SftRecipe::parse(
            MINIMAL,
            "r.yaml",
            &["optimizer.lr=3e-5".into(), "train.grad_accum=4".into()],
        )
        .unwrap();
        assert_eq!(r.optimizer.lr, 3e-5);
        assert_eq!(r.train.grad_accum, 4);
        let e = SftRecipe::parse(MINIMAL, "r.yaml", &["optimizer.lrr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`optimizer.lrr`")
                && e.contains("unknown field `lrr`")
                && e.contains("did you mean `lr`"),
            "{e}"
        );
        let e = SftRecipe::parse(MINIMAL, "r.yaml", &["train.max_steps=many".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`train.max_steps`") && e.contains("r.yaml"),
            "{e}"
        );
        let e = SftRecipe::parse(MINIMAL, "r.yaml", &["noequals".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--set noequals"), "{e}");
    }

    #[test]
    fn unknown_nested_keys_and_bad_values_are_named() {
        let bad = MINIMAL.replace("lm: {batch_size: 2", "lm: {batch_sise: 2");
        let e = SftRecipe::parse(&bad, "r.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`data.lm.batch_sise`") && e.contains("did you mean `batch_size`"),
            "{e}"
        );
        let e = SftRecipe::parse(MINIMAL, "r.yaml", &["schedule.kind=cosin".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`schedule.kind`") && e.contains("did you mean `cosine`"),
            "{e}"
        );
        let e = SftRecipe::parse(MINIMAL, "r.yaml", &["train.device=tpu".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`train.device`"), "{e}");
    }

    #[test]
    fn stream_mixing_values_are_checked() {
        let r = SftRecipe::parse(MINIMAL, "r.yaml", &[]).unwrap();
        assert_eq!(r.data.lm.mixing, mmada_data::Mixing::PerRow);
        let r = SftRecipe::parse(MINIMAL, "r.yaml", &["data.lm.mixing=per_batch".into()]).unwrap();
        assert_eq!(r.data.lm.mixing, mmada_data::Mixing::PerBatch);
        assert!(r.to_yaml().contains("mixing: per_batch"), "{}", r.to_yaml());
        let e = SftRecipe::parse(MINIMAL, "r.yaml", &["data.lm.mixing=per_step".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`data.lm.mixing`") && e.contains("`per_row`") && e.contains("`per_batch`"),
            "{e}"
        );
    }

    #[test]
    fn mixed_precision_values_are_checked() {
        let r = SftRecipe::parse(MINIMAL, "r.yaml", &[]).unwrap();
        assert_eq!(r.train.mixed_precision, MixedPrecision::No);
        assert_eq!(r.train.mixed_precision.compute_dtype(), None);
        let r =
            SftRecipe::parse(MINIMAL, "r.yaml", &["train.mixed_precision=bf16".into()]).unwrap();
        assert_eq!(r.train.mixed_precision, MixedPrecision::Bf16);
        assert_eq!(
            r.train.mixed_precision.compute_dtype(),
            Some(burn::tensor::FloatDType::BF16)
        );
        assert!(
            r.to_yaml().contains("mixed_precision: bf16"),
            "{}",
            r.to_yaml()
        );
        let r = SftRecipe::parse(MINIMAL, "r.yaml", &["train.mixed_precision=no".into()]).unwrap();
        assert_eq!(r.train.mixed_precision, MixedPrecision::No);
        let e = SftRecipe::parse(MINIMAL, "r.yaml", &["train.mixed_precision=fp16".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`train.mixed_precision`")
                && e.contains("fp16")
                && e.contains("`no`")
                && e.contains("`bf16`"),
            "{e}"
        );
        let e = SftRecipe::parse(
            MINIMAL,
            "r.yaml",
            &[
                "train.mixed_precision=bf16".into(),
                "model.dtype=bf16".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`train.mixed_precision`") && e.contains("model.dtype: f32"),
            "{e}"
        );
    }
}
