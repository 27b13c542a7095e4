//! The one text-sampler settings section shared by every front end: the `sampling:` section of
//! `mmada-infer --config FILE.yaml` (and its command line) and the `rollout:` section of a
//! UniGRPO recipe.
//!
//! Every key is optional; unset keys take the preset's or the built-in defaults when the
//! section is turned into a [`GenerateConfig`] ([`SamplerSection::to_config`]), and two
//! sections are layered with [`SamplerSection::or`] (command line over file over defaults).

use mmada_model::TokenLayout;
use serde::{Deserialize, Serialize};

use crate::SamplerError;
use crate::generate::{CacheMode, GenerateConfig, Remasking};

/// Published text decoding settings: `(gen_length, steps, block_length)` defaults that
/// explicit values override. Serde names are kebab-case (`default`, `llada-gsm8k`,
/// `mmada-paper`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// LLaDA `generate.py` example: gen_length 128, steps 128, block_length 32.
    #[default]
    Default,
    /// LLaDA-8B-Instruct GSM8K: gen_length 256, steps 256, block_length 8.
    LladaGsm8k,
    /// MMaDA paper text evaluation: gen_length 1024, steps 512, block_length 64.
    MmadaPaper,
    /// Fast decoding (Fast-dLLM's prefix cache + parallel decoding, 8.1× at −0.8 GSM8K points
    /// in its paper): the lengths of `default` (128 / 128 / 32) with `cache: prefix` and
    /// `threshold: 0.9` unless those keys are set.
    Fast,
}

impl Preset {
    /// `(gen_length, steps, block_length)` of the preset.
    pub fn values(self) -> (usize, usize, usize) {
        match self {
            Preset::Default => (128, 128, 32),
            Preset::LladaGsm8k => (256, 256, 8),
            Preset::MmadaPaper => (1024, 512, 64),
            Preset::Fast => (128, 128, 32),
        }
    }

    /// `(cache, threshold)` defaults of the preset: `(prefix, 0.9)` for [`Preset::Fast`],
    /// `(none, off)` for the others.
    pub fn decoding(self) -> (CacheMode, Option<f64>) {
        match self {
            Preset::Fast => (CacheMode::Prefix, Some(0.9)),
            _ => (CacheMode::None, None),
        }
    }
}

/// Defines [`SamplerSection`] and its [`SamplerSection::or`] from one list of fields, so a new
/// key is layered like the others without a second list to keep in step.
macro_rules! sampler_section {
    ($(#[$meta:meta])* pub struct $name:ident {
        $($(#[$fmeta:meta])* pub $field:ident: Option<$ty:ty>,)*
    }) => {
        $(#[$meta])*
        pub struct $name {
            $(
                $(#[$fmeta])*
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
        }

        impl $name {
            /// Fills the keys left unset here from `other`; keys set here win (layering:
            /// `command_line.or(file).or(defaults)`).
            pub fn or(self, other: $name) -> $name {
                $name { $($field: self.$field.or(other.$field),)* }
            }
        }
    };
}

sampler_section! {
    /// Text sampler settings (LLaDA block sampler, [`crate::generate()`]) as written by a user:
    /// every key optional, unknown keys rejected with their name. YAML example:
    ///
    /// ```yaml
    /// sampling: {preset: llada-gsm8k, steps: 128, temperature: 0.0, remasking: low_confidence}
    /// ```
    ///
    /// Token ids are not keys: they come from the tokenizer's [`TokenLayout`] in
    /// [`SamplerSection::to_config`].
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct SamplerSection {
        /// Published `(gen_length, steps, block_length)` defaults [default: `default` =
        /// 128 / 128 / 32].
        pub preset: Option<Preset>,
        /// Generated positions `G` (multiple of `block_length`) [default: the preset's].
        pub gen_length: Option<usize>,
        /// Total denoising steps (multiple of `gen_length / block_length`) [default: the
        /// preset's].
        pub steps: Option<usize>,
        /// Semi-autoregressive block length [default: the preset's].
        pub block_length: Option<usize>,
        /// Gumbel temperature, 0 = greedy [default: 0].
        pub temperature: Option<f64>,
        /// Classifier-free guidance scale, 0 = off [default: 0].
        pub cfg_scale: Option<f64>,
        /// Ranking of the positions to unmask (`low_confidence`, `random`, `margin`,
        /// `entropy`) [default: `low_confidence`].
        pub remasking: Option<Remasking>,
        /// Forbid EOS everywhere (upstream `logits_eos_inf`) [default: false].
        pub logits_eos_inf: Option<bool>,
        /// A predicted EOT gets confidence 0 (upstream `confidence_eos_eot_inf`)
        /// [default: false].
        pub confidence_eos_eot_inf: Option<bool>,
        /// Confidence softmax in float64 (MMaDA `mmu_generate`) [default: false].
        pub confidence_f64: Option<bool>,
        /// Confidence-threshold parallel decoding ([`GenerateConfig::threshold`])
        /// [default: off].
        pub threshold: Option<f64>,
        /// Stop once every row's block ends in EOS / EOT ([`GenerateConfig::early_stop`])
        /// [default: false].
        pub early_stop: Option<bool>,
        /// Sample over the model's whole output head instead of the tokenizer's ids without
        /// the mask id [default: false]. Ignored when `sample_vocab` is set.
        pub full_vocab: Option<bool>,
        /// Explicit number of ids that may be sampled ([`GenerateConfig::sample_vocab`]);
        /// wins over `full_vocab` [default: the tokenizer's length].
        pub sample_vocab: Option<usize>,
        /// Key/value cache of the decoding steps (`none`, `prefix`, `dual`;
        /// [`GenerateConfig::cache`]) [default: the preset's, `none` but for `fast`].
        pub cache: Option<CacheMode>,
        /// Also refresh the cache every N steps of a block; 0 = at block starts only, 1 =
        /// every step = no cache ([`GenerateConfig::refresh_every`]) [default: 0].
        pub refresh_every: Option<usize>,
        /// Positions around the block recomputed at every cached step
        /// ([`GenerateConfig::vicinity`]) [default: 0].
        pub vicinity: Option<usize>,
        /// Prompts decoded together (left-padded, key-padding mask); not a
        /// [`GenerateConfig`] field, the front end reads it [default: the front end's].
        pub batch_size: Option<usize>,
    }
}

impl SamplerSection {
    /// The sampler configuration of these settings.
    ///
    /// * `gen_length`, `steps`, `block_length`: the explicit values, else the preset's
    ///   ([`Preset::Default`] = 128 / 128 / 32 when no preset is set).
    /// * Ids (`mask_id`, `eos_id`, `eot_id`) from `layout` ([`GenerateConfig::from_layout`]).
    /// * [`GenerateConfig::sample_vocab`] = `sample_vocab` when set, else `None` (whole head)
    ///   when `full_vocab`, else `tokenizer_len`. `tokenizer_len` is the number of ids the
    ///   tokenizer can produce; callers that know the model clamp it to the model's width
    ///   (`mmada-infer` passes `min(tokenizer.len(), embedding_size)`).
    /// * Every other key: its value, else the [`GenerateConfig::new`] default.
    ///
    /// # Errors
    /// [`SamplerError::InvalidConfig`] naming the key: `batch_size` = 0, and every check of
    /// [`GenerateConfig::validate`] (called once here).
    pub fn to_config(
        &self,
        layout: &TokenLayout,
        tokenizer_len: usize,
    ) -> Result<GenerateConfig, SamplerError> {
        if self.batch_size == Some(0) {
            return Err(SamplerError::config("batch_size", "must be > 0"));
        }
        let preset = self.preset.unwrap_or_default();
        let (g, s, b) = preset.values();
        let (cache, threshold) = preset.decoding();
        let base = GenerateConfig::from_layout(layout);
        let sample_vocab = match (self.sample_vocab, self.full_vocab) {
            (Some(n), _) => Some(n),
            (None, Some(true)) => None,
            (None, _) => Some(tokenizer_len),
        };
        let config = GenerateConfig {
            gen_length: self.gen_length.unwrap_or(g),
            steps: self.steps.unwrap_or(s),
            block_length: self.block_length.unwrap_or(b),
            temperature: self.temperature.unwrap_or(base.temperature),
            cfg_scale: self.cfg_scale.unwrap_or(base.cfg_scale),
            remasking: self.remasking.unwrap_or(base.remasking),
            logits_eos_inf: self.logits_eos_inf.unwrap_or(base.logits_eos_inf),
            confidence_eos_eot_inf: self
                .confidence_eos_eot_inf
                .unwrap_or(base.confidence_eos_eot_inf),
            confidence_f64: self.confidence_f64.unwrap_or(base.confidence_f64),
            threshold: self.threshold.or(threshold),
            early_stop: self.early_stop.unwrap_or(base.early_stop),
            cache: self.cache.unwrap_or(cache),
            refresh_every: self.refresh_every.unwrap_or(base.refresh_every),
            vicinity: self.vicinity.unwrap_or(base.vicinity),
            sample_vocab,
            ..base
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOK_LEN: usize = 126349;

    fn llada() -> TokenLayout {
        TokenLayout::llada()
    }

    #[test]
    fn round_trip_writes_only_the_keys_set() {
        assert_eq!(
            serde_json::to_string(&SamplerSection::default()).unwrap(),
            "{}"
        );
        let s = SamplerSection {
            preset: Some(Preset::LladaGsm8k),
            gen_length: Some(64),
            steps: Some(32),
            block_length: Some(16),
            temperature: Some(0.8),
            cfg_scale: Some(1.5),
            remasking: Some(Remasking::LowConfidence),
            logits_eos_inf: Some(true),
            confidence_eos_eot_inf: Some(false),
            confidence_f64: Some(true),
            threshold: Some(0.9),
            early_stop: Some(true),
            full_vocab: Some(false),
            sample_vocab: Some(99),
            cache: Some(CacheMode::Dual),
            refresh_every: Some(4),
            vicinity: Some(2),
            batch_size: Some(4),
        };
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["preset"], "llada-gsm8k");
        assert_eq!(j["remasking"], "low_confidence");
        assert_eq!(j["cache"], "dual");
        assert_eq!(j.as_object().unwrap().len(), 18);
        assert_eq!(serde_json::from_value::<SamplerSection>(j).unwrap(), s);
        let partial = SamplerSection {
            preset: Some(Preset::MmadaPaper),
            remasking: Some(Remasking::Entropy),
            ..Default::default()
        };
        let text = serde_json::to_string(&partial).unwrap();
        assert_eq!(text, r#"{"preset":"mmada-paper","remasking":"entropy"}"#);
        assert_eq!(
            serde_json::from_str::<SamplerSection>(&text).unwrap(),
            partial
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected_with_their_name() {
        let e = serde_json::from_str::<SamplerSection>(r#"{"steps": 4, "step": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `step`"), "{e}");
        let e = serde_json::from_str::<SamplerSection>(r#"{"preset": "llada_gsm8k"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("llada_gsm8k"), "{e}");
        let e = serde_json::from_str::<SamplerSection>(r#"{"remasking": "margn"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("margn"), "{e}");
        // GenerateConfig's ids are not keys of the section: they come from the tokenizer
        let e = serde_json::from_str::<SamplerSection>(r#"{"mask_id": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mask_id"), "{e}");
    }

    #[test]
    fn or_keeps_the_keys_set_here_and_fills_the_rest() {
        let cli = SamplerSection {
            steps: Some(16),
            full_vocab: Some(true),
            ..Default::default()
        };
        let file = SamplerSection {
            steps: Some(32),
            gen_length: Some(64),
            temperature: Some(0.5),
            ..Default::default()
        };
        let defaults = SamplerSection {
            gen_length: Some(8),
            block_length: Some(8),
            batch_size: Some(4),
            ..Default::default()
        };
        let m = cli.clone().or(file.clone()).or(defaults);
        assert_eq!(
            m,
            SamplerSection {
                steps: Some(16),
                gen_length: Some(64),
                block_length: Some(8),
                temperature: Some(0.5),
                full_vocab: Some(true),
                batch_size: Some(4),
                ..Default::default()
            }
        );
        assert_eq!(SamplerSection::default().or(file.clone()), file);
        assert_eq!(file.clone().or(SamplerSection::default()), file);
    }

    #[test]
    fn presets_give_the_lengths_explicit_keys_override() {
        let g = SamplerSection::default()
            .to_config(&llada(), TOK_LEN)
            .unwrap();
        assert_eq!((g.gen_length, g.steps, g.block_length), (128, 128, 32));
        assert_eq!(
            (g.temperature, g.cfg_scale, g.remasking),
            (0.0, 0.0, Remasking::LowConfidence)
        );
        assert_eq!(
            (g.threshold, g.early_stop, g.confidence_f64),
            (None, false, false)
        );
        assert_eq!(
            (g.mask_id, g.eos_id, g.eot_id),
            (126336, Some(126081), Some(126348))
        );
        let with = |preset| SamplerSection {
            preset: Some(preset),
            ..Default::default()
        };
        let lengths = |s: SamplerSection| {
            let g = s.to_config(&llada(), TOK_LEN).unwrap();
            (g.gen_length, g.steps, g.block_length)
        };
        assert_eq!(lengths(with(Preset::Default)), (128, 128, 32));
        assert_eq!(lengths(with(Preset::LladaGsm8k)), (256, 256, 8));
        assert_eq!(lengths(with(Preset::MmadaPaper)), (1024, 512, 64));
        assert_eq!(lengths(with(Preset::Fast)), (128, 128, 32));
        // fast = prefix cache + threshold 0.9, each overridable; the others decode uncached
        let fast = with(Preset::Fast).to_config(&llada(), TOK_LEN).unwrap();
        assert_eq!((fast.cache, fast.threshold), (CacheMode::Prefix, Some(0.9)));
        let g = SamplerSection {
            cache: Some(CacheMode::Dual),
            threshold: Some(0.7),
            refresh_every: Some(3),
            vicinity: Some(1),
            ..with(Preset::Fast)
        }
        .to_config(&llada(), TOK_LEN)
        .unwrap();
        assert_eq!(
            (g.cache, g.threshold, g.refresh_every, g.vicinity),
            (CacheMode::Dual, Some(0.7), 3, 1)
        );
        let d = with(Preset::LladaGsm8k)
            .to_config(&llada(), TOK_LEN)
            .unwrap();
        assert_eq!(
            (d.cache, d.threshold, d.refresh_every),
            (CacheMode::None, None, 0)
        );
        let s = SamplerSection {
            steps: Some(64),
            ..with(Preset::LladaGsm8k)
        };
        assert_eq!(lengths(s), (256, 64, 8));
        // every other key reaches the config
        let g = SamplerSection {
            temperature: Some(0.7),
            cfg_scale: Some(2.0),
            remasking: Some(Remasking::Margin),
            logits_eos_inf: Some(true),
            confidence_eos_eot_inf: Some(true),
            confidence_f64: Some(true),
            threshold: Some(0.9),
            early_stop: Some(true),
            ..Default::default()
        }
        .to_config(&llada(), TOK_LEN)
        .unwrap();
        assert_eq!(
            (g.temperature, g.cfg_scale, g.remasking, g.threshold),
            (0.7, 2.0, Remasking::Margin, Some(0.9))
        );
        assert!(g.logits_eos_inf && g.confidence_eos_eot_inf && g.confidence_f64 && g.early_stop);
    }

    #[test]
    fn sample_vocab_is_explicit_else_whole_head_else_the_tokenizer() {
        let vocab = |s: SamplerSection| s.to_config(&llada(), TOK_LEN).unwrap().sample_vocab;
        assert_eq!(vocab(SamplerSection::default()), Some(TOK_LEN));
        let full = SamplerSection {
            full_vocab: Some(true),
            ..Default::default()
        };
        assert_eq!(vocab(full.clone()), None);
        let not_full = SamplerSection {
            full_vocab: Some(false),
            ..Default::default()
        };
        assert_eq!(vocab(not_full), Some(TOK_LEN));
        // UniGRPO tests set `rollout.sample_vocab=99`; it wins over full_vocab
        let explicit: SamplerSection = serde_json::from_str(r#"{"sample_vocab": 99}"#).unwrap();
        assert_eq!(vocab(explicit.clone()), Some(99));
        assert_eq!(vocab(explicit.or(full)), Some(99));
    }

    #[test]
    fn invalid_settings_name_the_key() {
        let field = |s: SamplerSection| match s.to_config(&llada(), TOK_LEN) {
            Err(SamplerError::InvalidConfig { field, reason }) => (field, reason),
            other => panic!("{other:?}"),
        };
        let (f, r) = field(SamplerSection {
            gen_length: Some(10),
            block_length: Some(4),
            ..Default::default()
        });
        assert_eq!(f, "gen_length");
        assert!(
            r.contains("gen_length 10 is not divisible by block_length 4"),
            "{r}"
        );
        let (f, _) = field(SamplerSection {
            gen_length: Some(8),
            block_length: Some(4),
            steps: Some(3),
            ..Default::default()
        });
        assert_eq!(f, "steps");
        let (f, _) = field(SamplerSection {
            temperature: Some(-1.0),
            ..Default::default()
        });
        assert_eq!(f, "temperature");
        let (f, _) = field(SamplerSection {
            sample_vocab: Some(0),
            ..Default::default()
        });
        assert_eq!(f, "sample_vocab");
        let (f, r) = field(SamplerSection {
            batch_size: Some(0),
            ..Default::default()
        });
        assert_eq!((f, r.as_str()), ("batch_size", "must be > 0"));
    }
}
