//! Command-line options, the YAML config file (`--config FILE.yaml`) and the sampling presets.
//!
//! Every option can be given on the command line or in the config file; the command line wins,
//! then the file, then the preset (`sampling.preset`), then the built-in default. The file has
//! one section per group and rejects unknown keys; `sampling` is the sampler's shared
//! [`SamplerSection`] (the keys of UniGRPO's `rollout:` too):
//!
//! ```yaml
//! model:    {checkpoint: runs/quickstart/checkpoints/step-000200/model, device: cpu}
//! sampling: {preset: llada-gsm8k, steps: 128, temperature: 0.0}
//! generate: {prompt: ["What is 2 + 3?"]}
//! eval:     {task: gsm8k, data: ../shared/data/math/gsm8k_test.jsonl, limit: 5}
//! loglik:   {prompt: "2 + 3 =", answer: " 5", mc_num: 32}
//! image:    {mode: t2i, vq_checkpoint: showlab/magvitv2, resolution: 256, guidance_scale: 3.5}
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use mmada_model::FloatDType;
use mmada_sampler::{CacheMode, Preset, Remasking, SamplerSection};
use serde::Deserialize;

/// Command-line spelling of the sampler's [`Preset`]s. The values are listed in `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PresetArg {
    /// LLaDA `generate.py` example: gen_length 128, steps 128, block_length 32.
    Default,
    /// LLaDA-8B-Instruct GSM8K: gen_length 256, steps 256, block_length 8.
    LladaGsm8k,
    /// MMaDA paper text evaluation: gen_length 1024, steps 512, block_length 64.
    MmadaPaper,
    /// Fast decoding: the lengths of `default` with --cache prefix and --threshold 0.9
    /// (Fast-dLLM); explicit options override each.
    Fast,
}

impl From<PresetArg> for Preset {
    fn from(p: PresetArg) -> Self {
        match p {
            PresetArg::Default => Preset::Default,
            PresetArg::LladaGsm8k => Preset::LladaGsm8k,
            PresetArg::MmadaPaper => Preset::MmadaPaper,
            PresetArg::Fast => Preset::Fast,
        }
    }
}

/// Key/value cache names accepted on the command line ([`CacheMode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheArg {
    /// Every step runs the whole canvas (upstream LLaDA).
    None,
    /// Reuse the keys/values of the prompt and the decoded blocks (Fast-dLLM prefix cache).
    Prefix,
    /// Also reuse those of the masked positions after the block (Fast-dLLM dual cache).
    Dual,
}

impl From<CacheArg> for CacheMode {
    fn from(c: CacheArg) -> Self {
        match c {
            CacheArg::None => CacheMode::None,
            CacheArg::Prefix => CacheMode::Prefix,
            CacheArg::Dual => CacheMode::Dual,
        }
    }
}

/// Remasking strategy names accepted on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RemaskingArg {
    /// Commit the most confident predictions first (`softmax(logits)[x0]`).
    LowConfidence,
    /// Commit positions in random order.
    Random,
    /// Commit the largest top-1 − top-2 probability gaps first (dLLM-RL `margin_confidence`).
    Margin,
    /// Commit the lowest-entropy predictions first (Dream / Fast-dLLM `neg_entropy`).
    Entropy,
}

impl From<RemaskingArg> for Remasking {
    fn from(r: RemaskingArg) -> Self {
        match r {
            RemaskingArg::LowConfidence => Remasking::LowConfidence,
            RemaskingArg::Random => Remasking::Random,
            RemaskingArg::Margin => Remasking::Margin,
            RemaskingArg::Entropy => Remasking::Entropy,
        }
    }
}

/// Float dtype of the parameters in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeArg {
    /// float32 (default; the CPU backend computes in f32).
    F32,
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
}

impl From<DtypeArg> for FloatDType {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => FloatDType::F32,
            DtypeArg::Bf16 => FloatDType::BF16,
            DtypeArg::F16 => FloatDType::F16,
        }
    }
}

/// Which chat template wraps the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateArg {
    /// The checkpoint's: LLaDA (`\n\n` after the header) when its `tokenizer_config.json`
    /// chat template or `model_type` says LLaDA, MMaDA (`\n`) otherwise.
    Auto,
    /// MMaDA: `<|start_header_id|>user<|end_header_id|>\n…<|eot_id|>` + assistant header.
    Mmada,
    /// LLaDA-8B-Instruct: as MMaDA with `\n\n` after `<|end_header_id|>`.
    Llada,
    /// No template: `<BOS>` + the raw prompt text.
    None,
}

/// `impl $ty { pub fn or(self, other) }` for an option group whose fields are all `Option`s:
/// each field left unset here is filled from `other` (command line over config file). The
/// struct literal names every field, so a field missing from the list does not compile.
macro_rules! impl_or {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        impl $ty {
            /// Fills the fields left unset here from `other` (the config file).
            pub fn or(self, other: $ty) -> $ty {
                $ty { $($field: self.$field.or(other.$field)),* }
            }
        }
    };
}
pub(crate) use impl_or;

/// Checkpoint, tokenizer and device options (config-file section `model`).
#[derive(Args, Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelArgs {
    /// Checkpoint directory (config.json + safetensors weights; tokenizer.json inside unless
    /// --tokenizer is given), or a Hugging Face model id (`GSAI-ML/LLaDA-8B-Instruct`,
    /// `owner/name@revision`): taken from the local cache or downloaded (HF_HOME, HF_ENDPOINT,
    /// HF_TOKEN and HF_HUB_OFFLINE are honoured).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// LoRA adapter over the checkpoint: a PEFT adapter directory (adapter_config.json +
    /// adapter_model.safetensors) or a LoRA training checkpoint (its `adapter/`); merged
    /// into the weights at load (`W + (alpha/r)·B·A`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// tokenizer.json (or a folder or Hub model id holding one) to use instead of the
    /// checkpoint's (MMaDA special tokens it lacks are added; the result must match the
    /// model's vocabulary).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Device: `cpu` (default) or `cuda:N` (needs a build with `--features cuda`).
    #[arg(long)]
    pub device: Option<String>,
    /// Parameter dtype in memory [default: f32].
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Chat template [default: auto for generate/eval, none for loglik].
    #[arg(long, value_enum)]
    pub template: Option<TemplateArg>,
    /// Seed of the per-call random generator (Gumbel noise, random remasking, MC masks)
    /// [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// A prompt longer than `max_sequence_length − gen_length` (the canvas would exceed the
    /// positions the model was trained on): `warn` and decode anyway, or `refuse` with an
    /// error [default: warn].
    #[arg(long, value_enum)]
    pub long_prompt: Option<LongPrompt>,
}

impl_or!(ModelArgs {
    checkpoint,
    adapter,
    tokenizer,
    device,
    dtype,
    template,
    seed,
    long_prompt
});

/// What to do with a prompt whose canvas exceeds the model's `max_sequence_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LongPrompt {
    /// Log a warning and decode (RoPE extrapolates; quality may drop).
    #[default]
    Warn,
    /// Stop with an error naming the lengths.
    Refuse,
}

/// Text sampler options of the command line. The config-file section `sampling` is the
/// sampler's [`SamplerSection`] (the same keys, plus `sample_vocab`); [`SamplingArgs::or`]
/// layers the command line over it.
#[derive(Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// Published settings for gen_length / steps / block_length (explicit values override):
    /// default = 128 / 128 / 32 (LLaDA generate.py), llada-gsm8k = 256 / 256 / 8,
    /// mmada-paper = 1024 / 512 / 64, fast = 128 / 128 / 32 with --cache prefix and
    /// --threshold 0.9.
    #[arg(long, value_enum)]
    pub preset: Option<PresetArg>,
    /// Number of generated tokens (multiple of block_length).
    #[arg(long)]
    pub gen_length: Option<usize>,
    /// Total denoising steps (multiple of gen_length / block_length).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Semi-autoregressive block length.
    #[arg(long)]
    pub block_length: Option<usize>,
    /// Gumbel temperature; 0 = greedy [default: 0].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Classifier-free guidance scale (unconditional branch = prompt masked) [default: 0].
    #[arg(long)]
    pub cfg_scale: Option<f64>,
    /// Remasking strategy [default: low-confidence].
    #[arg(long, value_enum)]
    pub remasking: Option<RemaskingArg>,
    /// Forbid EOS everywhere (upstream `logits_eos_inf`) [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub logits_eos_inf: Option<bool>,
    /// Give a predicted EOT zero confidence (upstream `confidence_eos_eot_inf`) [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub confidence_eos_eot_inf: Option<bool>,
    /// Confidence softmax in float64 (MMaDA `mmu_generate`) [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub confidence_f64: Option<bool>,
    /// Fast parallel decoding (Fast-dLLM / dLLM-RL `low_confidence_dynamic`): each step
    /// commits every masked position of the current block whose confidence is >= THRESHOLD
    /// (at least one), until the block is done; --steps is then ignored. 0.9 is the
    /// Fast-dLLM value [default: off = the fixed per-step schedule].
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Stop once every answer's current block ends in EOS / EOT (MMaDA
    /// `mmu_generate_fast`); the remaining blocks are not decoded (fewer NFE) [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub early_stop: Option<bool>,
    /// Sample over the model's whole output head. By default the sampler restricts ids to the
    /// tokenizer's vocabulary without the mask token [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub full_vocab: Option<bool>,
    /// Key/value cache: prefix reuses the prompt's and decoded blocks' keys/values between
    /// refreshes, dual also the masked suffix's (Fast-dLLM); an approximation refreshed at
    /// every block start [default: none, prefix for --preset fast].
    #[arg(long, value_enum)]
    pub cache: Option<CacheArg>,
    /// With --cache: also refresh every N steps of a block (1 = every step = no cache)
    /// [default: 0 = block starts only].
    #[arg(long)]
    pub refresh_every: Option<usize>,
    /// With --cache: positions next to the block recomputed at every cached step [default: 0].
    #[arg(long)]
    pub vicinity: Option<usize>,
    /// Prompts decoded together (left-padded, key-padding mask) [default: 1 for generate,
    /// 4 for eval].
    #[arg(long)]
    pub batch_size: Option<usize>,
}

impl From<SamplingArgs> for SamplerSection {
    fn from(a: SamplingArgs) -> Self {
        SamplerSection {
            preset: a.preset.map(Into::into),
            gen_length: a.gen_length,
            steps: a.steps,
            block_length: a.block_length,
            temperature: a.temperature,
            cfg_scale: a.cfg_scale,
            remasking: a.remasking.map(Into::into),
            logits_eos_inf: a.logits_eos_inf,
            confidence_eos_eot_inf: a.confidence_eos_eot_inf,
            confidence_f64: a.confidence_f64,
            threshold: a.threshold,
            early_stop: a.early_stop,
            full_vocab: a.full_vocab,
            sample_vocab: None,
            cache: a.cache.map(Into::into),
            refresh_every: a.refresh_every,
            vicinity: a.vicinity,
            batch_size: a.batch_size,
        }
    }
}

impl SamplingArgs {
    /// The command line over the config file's `sampling` section: the options set here win,
    /// the file fills the rest.
    pub fn or(self, file: SamplerSection) -> SamplerSection {
        SamplerSection::from(self).or(file)
    }
}

/// `generate` options (config-file section `generate`).
#[derive(Args, Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerateArgs {
    /// Prompt text (repeatable: several prompts are decoded in batches of --batch-size).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// File of prompts: JSONL with a `prompt` (or `question`) field per line, or `.txt` with
    /// one prompt per non-empty line.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Write one JSON record per prompt (prompt, output, ids, terminated, nfe, seconds) to
    /// this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl GenerateArgs {
    /// Fills the fields left unset here from `other`. Not [`impl_or`]: `prompt` and `prompts`
    /// are one source, so the file's `prompt` list is only used when the command line gives
    /// neither.
    pub fn or(self, other: GenerateArgs) -> GenerateArgs {
        GenerateArgs {
            prompt: if self.prompt.is_empty() && self.prompts.is_none() {
                other.prompt
            } else {
                self.prompt
            },
            prompts: self.prompts.or(other.prompts),
            out: self.out.or(other.out),
        }
    }
}

/// Evaluation benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskArg {
    /// GSM8K (`question`, `answer` with `#### N`).
    Gsm8k,
    /// MATH-500 (`problem`, `solution`, `answer`).
    Math500,
}

/// `eval` options (config-file section `eval`).
#[derive(Args, Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalArgs {
    /// Benchmark.
    #[arg(long, value_enum)]
    pub task: Option<TaskArg>,
    /// Data file (jsonl, json or parquet), e.g. ../shared/data/math/gsm8k_test.jsonl, or a
    /// file of a Hugging Face dataset repo, `openai/gsm8k:main/test-00000-of-00001.parquet`
    /// (`REPO[@REVISION]:PATH`, cached / downloaded as `--checkpoint` ids).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Evaluate the first N items only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Per-item results (JSONL: prompt, output, extracted, gold, correct, nfe, seconds).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// User turn; `{question}` is replaced by the problem [default: "{question}\nPlease
    /// reason step by step, and put your final answer within \boxed{}."].
    #[arg(long)]
    pub prompt_template: Option<String>,
}

impl_or!(EvalArgs {
    task,
    data,
    limit,
    out,
    prompt_template
});

/// `loglik` options (config-file section `loglik`).
#[derive(Args, Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoglikArgs {
    /// Prompt (conditioning) text.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Answer text whose log-likelihood is estimated.
    #[arg(long)]
    pub answer: Option<String>,
    /// Number of Monte-Carlo samples [default: 128].
    #[arg(long)]
    pub mc_num: Option<usize>,
    /// Monte-Carlo samples per forward pass; must divide mc_num [default: min(16, mc_num)].
    #[arg(long)]
    pub mc_batch_size: Option<usize>,
    /// Classifier-free guidance scale [default: 0].
    #[arg(long)]
    pub cfg_scale: Option<f64>,
}

impl_or!(LoglikArgs {
    prompt,
    answer,
    mc_num,
    mc_batch_size,
    cfg_scale
});

/// The YAML config file: one optional section per option group, unknown keys rejected.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Checkpoint, tokenizer, device.
    pub model: ModelArgs,
    /// Text sampler (the sampler's shared section; also UniGRPO's `rollout:`).
    pub sampling: SamplerSection,
    /// `generate`.
    pub generate: GenerateArgs,
    /// `eval`.
    pub eval: EvalArgs,
    /// `loglik`.
    pub loglik: LoglikArgs,
    /// Image options of `generate` (`--mode t2i | mmu`).
    pub image: crate::image::ImageArgs,
}

impl FileConfig {
    /// Parses the YAML text; `source` names the file in errors.
    #[cfg(test)]
    pub fn from_yaml(text: &str, source: &str) -> Result<Self> {
        Self::from_yaml_with(text, source, &[])
    }

    /// Parses the YAML text and applies `--set key.path=value` overrides to it (the same
    /// syntax as `mmada-train --set`: `sampling.steps=64`, `model.checkpoint=DIR`); `source`
    /// names the file in errors.
    pub fn from_yaml_with(text: &str, source: &str, sets: &[String]) -> Result<Self> {
        let mut tree: serde_norway::Value = if text.trim().is_empty() {
            serde_norway::Value::Mapping(Default::default())
        } else {
            serde_norway::from_str(text).with_context(|| format!("config file {source}"))?
        };
        mmada_data::overrides::apply(&mut tree, sets).map_err(|o| {
            anyhow::anyhow!("--set {o}: expected SECTION.KEY=VALUE (e.g. --set sampling.steps=64)")
        })?;
        let what = if sets.is_empty() {
            format!("config file {source}")
        } else {
            format!("config file {source} with --set {}", sets.join(" --set "))
        };
        serde_norway::from_value(tree).with_context(|| what)
    }

    /// Reads `path` (or starts from the empty config when `None`) and applies `sets`.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Self> {
        let Some(path) = path else {
            return Self::from_yaml_with("", "(none)", sets);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::from_yaml_with(&text, &path.display().to_string(), sets)
    }
}

/// The `checkpoint` option, which is required: a local folder, or a Hugging Face model id
/// (`GSAI-ML/LLaDA-8B-Instruct[@revision]`) resolved through the local cache or downloaded
/// ([`mmada_data::hub`]: `HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`).
pub fn require_checkpoint(m: &ModelArgs) -> Result<PathBuf> {
    match &m.checkpoint {
        Some(p) => Ok(mmada_data::hub::local_or_model(p)?),
        None => {
            bail!("no checkpoint: pass --checkpoint DIR|HUB_ID or set model.checkpoint in --config")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LLaDA's tokenizer length.
    const TOK_LEN: usize = 126349;

    #[test]
    fn image_section_of_the_config_file() {
        use crate::image::{ImageArgs, ImageModeArg, ModeArg};
        let c = FileConfig::from_yaml(
            "image: {mode: t2i, resolution: 256, guidance_scale: 3.5, image_mode: center-crop, noise_schedule: pow2}\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(c.image.mode, Some(ModeArg::T2i));
        assert_eq!(c.image.resolution, Some(256));
        assert_eq!(c.image.image_mode, Some(ImageModeArg::CenterCrop));
        // the command line wins, the file fills the rest
        let cli = ImageArgs {
            resolution: Some(512),
            ..Default::default()
        };
        let merged = cli.or(c.image);
        assert_eq!(merged.resolution, Some(512));
        assert_eq!(merged.guidance_scale, Some(3.5));
        assert_eq!(merged.noise_schedule.as_deref(), Some("pow2"));
        let e = format!(
            "{:#}",
            FileConfig::from_yaml("image: {resolutoin: 3}\n", "t.yaml").unwrap_err()
        );
        assert!(e.contains("resolutoin") && e.contains("t.yaml"), "{e}");
    }

    #[test]
    fn file_config_sections_and_unknown_keys() {
        let c = FileConfig::from_yaml(
            "model: {checkpoint: ck, device: cpu}\nsampling: {preset: llada-gsm8k, steps: 64, remasking: random}\neval: {task: math500, limit: 3}\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(c.model.checkpoint.as_deref(), Some(Path::new("ck")));
        assert_eq!(c.sampling.preset, Some(Preset::LladaGsm8k));
        assert_eq!(c.eval.task, Some(TaskArg::Math500));
        let g = c
            .sampling
            .to_config(&mmada_model::TokenLayout::llada(), TOK_LEN)
            .unwrap();
        assert_eq!((g.gen_length, g.steps, g.block_length), (256, 64, 8));
        assert_eq!(g.remasking, Remasking::Random);
        assert_eq!((g.mask_id, g.eos_id), (126336, Some(126081)));
        let e = format!(
            "{:#}",
            FileConfig::from_yaml("sampling: {step: 3}\n", "t.yaml").unwrap_err()
        );
        assert!(e.contains("step") && e.contains("t.yaml"), "{e}");
        let e = format!(
            "{:#}",
            FileConfig::from_yaml("sample: {}\n", "t.yaml").unwrap_err()
        );
        assert!(e.contains("sample"), "{e}");
    }

    #[test]
    fn command_line_wins_over_file_over_preset() {
        let cli = SamplingArgs {
            steps: Some(16),
            ..Default::default()
        };
        let file = SamplerSection {
            steps: Some(32),
            gen_length: Some(64),
            preset: Some(Preset::MmadaPaper),
            ..Default::default()
        };
        let g = cli
            .or(file)
            .to_config(&mmada_model::TokenLayout::llada(), TOK_LEN)
            .unwrap();
        assert_eq!((g.gen_length, g.steps, g.block_length), (64, 16, 64));
        let d = SamplingArgs::default()
            .or(SamplerSection::default())
            .to_config(&mmada_model::TokenLayout::llada(), TOK_LEN)
            .unwrap();
        assert_eq!((d.gen_length, d.steps, d.block_length), (128, 128, 32));
        assert_eq!(d.temperature, 0.0);
        assert_eq!((d.threshold, d.early_stop), (None, false));
    }

    #[test]
    fn fast_decoding_options_from_file_and_command_line() {
        let c = FileConfig::from_yaml(
            "sampling: {remasking: margin, threshold: 0.9, early_stop: true}\n",
            "t.yaml",
        )
        .unwrap();
        let g = c
            .sampling
            .to_config(&mmada_model::TokenLayout::llada(), TOK_LEN)
            .unwrap();
        assert_eq!(g.remasking, Remasking::Margin);
        assert_eq!(g.threshold, Some(0.9));
        assert!(g.early_stop);
        g.validate().unwrap();
        let cli = SamplingArgs {
            remasking: Some(RemaskingArg::Entropy),
            threshold: Some(0.5),
            ..Default::default()
        };
        let g = cli
            .or(c.sampling)
            .to_config(&mmada_model::TokenLayout::llada(), TOK_LEN)
            .unwrap();
        assert_eq!(
            (g.remasking, g.threshold, g.early_stop),
            (Remasking::Entropy, Some(0.5), true)
        );
        let bad = FileConfig::from_yaml("sampling: {remasking: margn}\n", "t.yaml").unwrap_err();
        assert!(format!("{bad:#}").contains("margn"), "{bad:#}");
    }

    /// The `sampling:` section is the sampler's [`SamplerSection`]: every key of the command
    /// line plus `sample_vocab`, written back as the same YAML; the command line converts into
    /// it key by key.
    #[test]
    fn sampling_section_yaml_round_trip_and_command_line_keys() {
        let yaml = "sampling: {preset: mmada-paper, gen_length: 64, steps: 32, block_length: 16, \
            temperature: 0.5, cfg_scale: 1.0, remasking: entropy, logits_eos_inf: true, \
            confidence_eos_eot_inf: true, confidence_f64: true, threshold: 0.9, early_stop: true, \
            full_vocab: false, sample_vocab: 99, cache: dual, refresh_every: 4, vicinity: 2, \
            batch_size: 2}\n";
        let c = FileConfig::from_yaml(yaml, "t.yaml").unwrap();
        let s = &c.sampling;
        assert_eq!(s.preset, Some(Preset::MmadaPaper));
        assert_eq!(s.remasking, Some(Remasking::Entropy));
        assert_eq!((s.sample_vocab, s.batch_size), (Some(99), Some(2)));
        assert_eq!(
            (s.cache, s.refresh_every, s.vicinity),
            (Some(CacheMode::Dual), Some(4), Some(2))
        );
        let text = serde_norway::to_string(s).unwrap();
        assert!(text.contains("preset: mmada-paper"), "{text}");
        assert_eq!(serde_norway::from_str::<SamplerSection>(&text).unwrap(), *s);
        let cli = SamplingArgs {
            preset: Some(PresetArg::LladaGsm8k),
            gen_length: Some(64),
            steps: Some(32),
            block_length: Some(16),
            temperature: Some(0.5),
            cfg_scale: Some(1.0),
            remasking: Some(RemaskingArg::Entropy),
            logits_eos_inf: Some(true),
            confidence_eos_eot_inf: Some(true),
            confidence_f64: Some(true),
            threshold: Some(0.9),
            early_stop: Some(true),
            full_vocab: Some(false),
            cache: Some(CacheArg::Dual),
            refresh_every: Some(4),
            vicinity: Some(2),
            batch_size: Some(2),
        };
        let from_cli = SamplerSection::from(cli);
        assert_eq!(
            from_cli,
            SamplerSection {
                preset: Some(Preset::LladaGsm8k),
                sample_vocab: None,
                ..s.clone()
            }
        );
        // an empty command line leaves the file as it is
        assert_eq!(SamplingArgs::default().or(s.clone()), *s);
    }

    #[test]
    fn set_overrides_the_config_file_and_names_bad_keys() {
        let sets = ["sampling.steps=32".to_string(), "eval.limit=5".to_string()];
        let c = FileConfig::from_yaml_with(
            "sampling: {steps: 64, block_length: 32}\neval: {task: gsm8k}\n",
            "t.yaml",
            &sets,
        )
        .unwrap();
        assert_eq!(c.sampling.steps, Some(32));
        assert_eq!(c.sampling.block_length, Some(32));
        assert_eq!(c.eval.limit, Some(5));
        // without a file
        let c = FileConfig::load(None, &["model.checkpoint=ck".to_string()]).unwrap();
        assert_eq!(c.model.checkpoint.as_deref(), Some(Path::new("ck")));
        let e = format!(
            "{:#}",
            FileConfig::load(None, &["sampling.stepz=3".to_string()]).unwrap_err()
        );
        assert!(
            e.contains("stepz") && e.contains("--set sampling.stepz=3"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            FileConfig::load(None, &["steps".to_string()]).unwrap_err()
        );
        assert!(
            e.contains("--set steps") && e.contains("SECTION.KEY=VALUE"),
            "{e}"
        );
    }
}
