//! The SFT recipe (`mmada-train sft --recipe FILE`): [`SftRecipe`] and the sections only SFT
//! has (`data`, `loss`, `train`). Shared sections live in [`crate::recipe`].

use std::path::PathBuf;

use mmada_data::manifest::Manifest;
use mmada_data::{LayoutConfig, ResizeMode};
use mmada_diffusion::{MaskSchedule, T2iAttention};
use serde::{Deserialize, Serialize};

use super::{
    CheckpointSection, LoggingSection, MixedPrecision, ModelSection, OptimizerSection, Recipe,
    RecipeError, RunConfig, ScheduleSection, Sharding, TokenizerSection, cpu, one_f32, one_u64,
    validate_device, validate_log_every, yes,
};

serde_defaults! {
    one: f64 = 1.0;
    default_resolution: u32 = 512;
    squash: ResizeMode = ResizeMode::Squash;
    cond_dropout: f32 = 0.1;
    default_eps: f32 = 1e-3;
    ce_chunk: usize = mmada_diffusion::DEFAULT_CE_CHUNK_ROWS;
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
    /// `N > 0` (default 512, `mmada_diffusion::DEFAULT_CE_CHUNK_ROWS`): the LM head and the cross-entropy only at the scored
    /// positions, `N` rows of hidden states at a time, so the `[rows, vocab]` logits never
    /// exist for the whole batch (`mmada_diffusion::head`; same losses and gradients; about
    /// 2× faster training steps on CPU at vocab 58 560, see the README). `0`: the head over
    /// every position (full logits).
    #[serde(default = "ce_chunk")]
    pub ce_chunk_rows: usize,
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
    /// LoRA adapters (absent: full fine-tuning): the base is frozen (no gradient, no
    /// optimizer state; `model.dtype: bf16` holds it in bf16), the f32 adapters learn, and
    /// checkpoints hold a PEFT adapter (`adapter/`) instead of the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<super::LoraSection>,
}

impl Recipe for SftRecipe {
    fn validate(&self, name: &str) -> Result<(), RecipeError> {
        let err = |key: &str, message: String| RecipeError::key(name, key, message);
        self.model.validate(name, self.train.mixed_precision)?;
        self.schedule.validate(name)?;
        super::validate_lora(
            name,
            self.lora.as_ref(),
            self.train.activation_checkpointing,
        )?;
        self.optimizer
            .validate(name, super::trained_dtype(&self.model, self.lora.as_ref()))?;
        self.loss.validate(name)?;
        self.data.validate(name)?;
        if self.train.max_steps == 0 {
            return Err(err("train.max_steps", "must be at least 1".into()));
        }
        if self.train.grad_accum == 0 {
            return Err(err("train.grad_accum", "must be at least 1".into()));
        }
        validate_log_every(name, self.train.log_every)?;
        super::validate_max_nonfinite(name, self.train.max_nonfinite_steps)?;
        validate_device(name, &self.train.device)
    }
}

impl LossSection {
    /// Rates in `[0, 1]`.
    ///
    /// # Errors
    /// [`RecipeError::Key`] naming `loss.min_masking_rate` or `loss.cond_dropout_prob`.
    pub fn validate(&self, name: &str) -> Result<(), RecipeError> {
        for (key, v) in [
            ("loss.min_masking_rate", self.min_masking_rate),
            ("loss.cond_dropout_prob", self.cond_dropout_prob),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(RecipeError::key(
                    name,
                    key,
                    format!("{v}: must be in [0, 1]"),
                ));
            }
        }
        Ok(())
    }
}

impl DataSection {
    /// The streams in batch order `[t2i, lm, mmu]` with their key paths.
    pub fn streams(&self) -> [(&'static str, &StreamSection); 3] {
        [
            ("data.t2i", &self.t2i),
            ("data.lm", &self.lm),
            ("data.mmu", &self.mmu),
        ]
    }

    /// Rows per micro-batch over all streams (per device).
    pub fn rows_per_micro_batch(&self) -> usize {
        self.streams().iter().map(|(_, s)| s.batch_size).sum()
    }

    /// At least one stream with rows, every such stream with a source, every source with
    /// exactly one manifest and a positive weight, a valid image resolution.
    ///
    /// # Errors
    /// [`RecipeError::Key`] naming the stream, source or key.
    pub fn validate(&self, name: &str) -> Result<(), RecipeError> {
        let err = |key: &str, message: String| RecipeError::key(name, key, message);
        if let Some(it) = &self.image_tokenizer
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
        if self.rows_per_micro_batch() == 0 {
            return Err(err(
                "data",
                "every stream has batch_size 0: set data.lm.batch_size (or mmu / t2i)".into(),
            ));
        }
        for (key, s) in self.streams() {
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
    use crate::recipe::ScheduleKind;

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
        assert_eq!(r.schedule.kind, ScheduleKind::Cosine);
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

#[cfg(test)]
mod props {
    //! Recipe YAML with `--set` overrides: no input panics; errors name the recipe file
    //! (`PROPTEST_CASES=10000` for the long run).
    use super::*;
    use proptest::prelude::*;

    const BASE: &str = "run: {name: t}\nmodel: {preset: tiny}\ntokenizer: {path: tok.json}\ndata:\n  lm: {batch_size: 2, sources: [{manifest: m.yaml}]}\noptimizer: {lr: 1.0e-4}\ntrain: {max_steps: 3}\n";

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("optimizer.lr".to_string()),
            Just("train.max_steps".to_string()),
            Just("train.max_nonfinite_steps".to_string()),
            Just("data.lm.batch_size".to_string()),
            Just("data.lm.sources".to_string()),
            Just("checkpoint.keep_last".to_string()),
            Just("schedule.kind".to_string()),
            Just("model.overrides".to_string()),
            Just("run".to_string()),
            "[a-z_.]{0,20}",
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(".inf".to_string()),
            Just("-1".to_string()),
            Just("null".to_string()),
            Just("[1, {a: 2}]".to_string()),
            Just("{d_model: 8}".to_string()),
            "[0-9eE.+-]{0,8}",
            any::<String>(),
        ]
    }

    proptest! {
        /// `--set KEY=VALUE` with any key and value: a recipe or an error naming the file.
        #[test]
        fn set_overrides_never_panic(sets in proptest::collection::vec((key(), value(), any::<bool>()), 0..4)) {
            let sets: Vec<String> = sets
                .into_iter()
                .map(|(k, v, eq)| if eq { format!("{k}={v}") } else { format!("{k}{v}") })
                .collect();
            match SftRecipe::parse(BASE, "recipes/r.yaml", &sets) {
                Ok(r) => {
                    // what parses, prints and parses back the same
                    let again = SftRecipe::parse(&r.to_yaml(), "printed", &[]).unwrap();
                    prop_assert_eq!(again.to_yaml(), r.to_yaml());
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("recipes/r.yaml") || msg.contains("--set"), "{}", msg);
                }
            }
        }

        /// Any text as the recipe file.
        #[test]
        fn any_recipe_text_never_panics(text in any::<String>(), cut in 0usize..200) {
            let mut t = BASE.to_string();
            t.truncate(cut.min(t.len()));
            t.push_str(&text);
            for t in [text.as_str(), t.as_str()] {
                if let Err(e) = SftRecipe::parse(t, "recipes/r.yaml", &[]) {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("recipes/r.yaml"), "{}", msg);
                }
            }
        }
    }
}
