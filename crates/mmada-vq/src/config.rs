//! Architecture configuration, field for field the constructor arguments of upstream
//! `VQGANEncoder`, `VQGANDecoder` and `LFQuantizer` (Show-o `models/modeling_magvitv2.py`).
//!
//! The released checkpoint `showlab/magvitv2` has no architecture in its `config.json`
//! (`MAGVITv2.__init__` takes no arguments), so [`MagvitConfig::default`] is the real
//! architecture (the code defaults). The tiny test checkpoint writes a `config.json` of the
//! form `{"encoder": {...}, "decoder": {...}, "quantizer": {...}}` with the same field names;
//! [`MagvitConfig::from_json`] reads both forms.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{VqError, io_err};

/// Number of GroupNorm groups of upstream `Normalize` (`common_modules.py`).
pub const NORM_GROUPS: usize = 32;
/// GroupNorm epsilon of upstream `Normalize`.
pub const NORM_EPS: f64 = 1e-6;

/// `VQGANEncoder` constructor arguments. Defaults = the real `showlab/magvitv2` encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncoderConfig {
    /// Base channel count (`ch`), 128.
    pub ch: usize,
    /// Channel multiplier per level (`ch_mult`), `[1, 2, 2, 4, 4]`; `len` = number of levels.
    pub ch_mult: Vec<usize>,
    /// Residual blocks per level (`num_res_blocks`), `[4, 3, 4, 3, 4]`.
    pub num_res_blocks: Vec<usize>,
    /// Config resolutions at which every residual block of a level is followed by an
    /// `AttnBlock` (`attn_resolutions`), `[5]` (never reached from 256).
    pub attn_resolutions: Vec<usize>,
    /// Dropout (inference: ignored), 0.0.
    pub dropout: f64,
    /// Input image channels (`in_ch`), 3.
    pub in_ch: usize,
    /// Unused by the encoder (`out_ch`), 3.
    pub out_ch: usize,
    /// Nominal resolution (`resolution`), 256: only decides where per-level attention sits.
    pub resolution: usize,
    /// Latent channels (`z_channels`), 13.
    pub z_channels: usize,
    /// `double_z`, false (true cannot run upstream either: `quant_conv` expects `z_channels`).
    pub double_z: bool,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            ch: 128,
            ch_mult: vec![1, 2, 2, 4, 4],
            num_res_blocks: vec![4, 3, 4, 3, 4],
            attn_resolutions: vec![5],
            dropout: 0.0,
            in_ch: 3,
            out_ch: 3,
            resolution: 256,
            z_channels: 13,
            double_z: false,
        }
    }
}

/// `VQGANDecoder` constructor arguments. Defaults = the real `showlab/magvitv2` decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecoderConfig {
    /// Base channel count (`ch`), 128.
    pub ch: usize,
    /// Channel multiplier per level (`ch_mult`), `[1, 1, 2, 2, 4]`; level 0 = full resolution.
    pub ch_mult: Vec<usize>,
    /// Residual blocks per level (`num_res_blocks`), `[4, 4, 3, 4, 3]`.
    pub num_res_blocks: Vec<usize>,
    /// See [`EncoderConfig::attn_resolutions`], `[5]`.
    pub attn_resolutions: Vec<usize>,
    /// Dropout (inference: ignored), 0.0.
    pub dropout: f64,
    /// Unused by the decoder (`in_ch`), 3.
    pub in_ch: usize,
    /// Output image channels (`out_ch`), 3.
    pub out_ch: usize,
    /// Nominal resolution (`resolution`), 256.
    pub resolution: usize,
    /// Latent channels (`z_channels`), 13.
    pub z_channels: usize,
    /// Unused by the decoder (`double_z`), false.
    pub double_z: bool,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            ch: 128,
            ch_mult: vec![1, 1, 2, 2, 4],
            num_res_blocks: vec![4, 4, 3, 4, 3],
            attn_resolutions: vec![5],
            dropout: 0.0,
            in_ch: 3,
            out_ch: 3,
            resolution: 256,
            z_channels: 13,
            double_z: false,
        }
    }
}

/// `LFQuantizer` constructor arguments. Defaults = the real quantizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuantizerConfig {
    /// Bits per code = latent channels (`codebook_dim`), 13.
    pub codebook_dim: usize,
    /// `2^codebook_dim` (written by the fixture generator; checked when present).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codebook_size: Option<usize>,
    /// Unused upstream argument `num_codebook_entry` (-1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_codebook_entry: Option<i64>,
    /// Commitment weight (`beta`), 0.25 (training loss only).
    pub beta: f64,
    /// Entropy loss multiplier, 0.1 (training loss only).
    pub entropy_multiplier: f64,
    /// Commitment loss multiplier, 0.1 (training loss only).
    pub commit_loss_multiplier: f64,
}

impl Default for QuantizerConfig {
    fn default() -> Self {
        Self {
            codebook_dim: 13,
            codebook_size: None,
            num_codebook_entry: None,
            beta: 0.25,
            entropy_multiplier: 0.1,
            commit_loss_multiplier: 0.1,
        }
    }
}

impl QuantizerConfig {
    /// Number of codes, `2^codebook_dim` (8192).
    pub fn num_codes(&self) -> usize {
        1 << self.codebook_dim
    }
}

/// The whole tokenizer (`MAGVITv2`). `Default` = the real `showlab/magvitv2` architecture.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MagvitConfig {
    /// Encoder arguments.
    pub encoder: EncoderConfig,
    /// Decoder arguments.
    pub decoder: DecoderConfig,
    /// Quantizer arguments.
    pub quantizer: QuantizerConfig,
}

impl MagvitConfig {
    /// The real `showlab/magvitv2` architecture (same as `default()`).
    pub fn real() -> Self {
        Self::default()
    }

    /// Parse a `config.json`: a file with any of the keys `encoder` / `decoder` /
    /// `quantizer` gives those sections (missing fields take the real defaults); any other
    /// JSON object (the HF `showlab/magvitv2` file: only `_class_name`, `_diffusers_version`)
    /// gives the real architecture. Other top-level keys are ignored.
    ///
    /// # Errors
    /// [`VqError::ConfigParse`] (naming `origin`) for malformed JSON or mistyped fields,
    /// [`VqError::InvalidConfig`] from [`MagvitConfig::validate`].
    pub fn from_json(text: &str, origin: &Path) -> Result<Self, VqError> {
        let bad = |reason: String| VqError::ConfigParse {
            path: origin.to_path_buf(),
            reason,
        };
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if !v.is_object() {
            return Err(bad("not a JSON object".into()));
        }
        let mut cfg = Self::default();
        if let Some(e) = v.get("encoder") {
            cfg.encoder =
                serde_json::from_value(e.clone()).map_err(|e| bad(format!("encoder: {e}")))?;
        }
        if let Some(d) = v.get("decoder") {
            cfg.decoder =
                serde_json::from_value(d.clone()).map_err(|e| bad(format!("decoder: {e}")))?;
        }
        if let Some(q) = v.get("quantizer") {
            cfg.quantizer =
                serde_json::from_value(q.clone()).map_err(|e| bad(format!("quantizer: {e}")))?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read `dir/config.json` with [`MagvitConfig::from_json`]; no file = real architecture.
    ///
    /// # Errors
    /// As [`MagvitConfig::from_json`], plus [`VqError::Io`].
    pub fn from_dir(dir: &Path) -> Result<Self, VqError> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        Self::from_json(&text, &path)
    }

    /// Image pixels per latent position along each axis: `2^(encoder levels - 1)` (16).
    pub fn downsample_factor(&self) -> usize {
        1 << (self.encoder.ch_mult.len().saturating_sub(1))
    }

    /// Output pixels per latent position along each axis: `2^(decoder levels - 1)` (16).
    pub fn upsample_factor(&self) -> usize {
        1 << (self.decoder.ch_mult.len().saturating_sub(1))
    }

    /// Check that the architecture can be built and run.
    ///
    /// # Errors
    /// [`VqError::InvalidConfig`] naming the field: empty or mismatched `ch_mult` /
    /// `num_res_blocks`, a channel count not divisible by the 32 GroupNorm groups, `double_z`,
    /// `z_channels` differing from `codebook_dim`, `codebook_size != 2^codebook_dim`.
    pub fn validate(&self) -> Result<(), VqError> {
        let err = |s: String| Err(VqError::InvalidConfig(s));
        for (part, ch, ch_mult, nrb, z, io) in [
            (
                "encoder",
                self.encoder.ch,
                &self.encoder.ch_mult,
                &self.encoder.num_res_blocks,
                self.encoder.z_channels,
                self.encoder.in_ch,
            ),
            (
                "decoder",
                self.decoder.ch,
                &self.decoder.ch_mult,
                &self.decoder.num_res_blocks,
                self.decoder.z_channels,
                self.decoder.out_ch,
            ),
        ] {
            if ch_mult.is_empty() || ch_mult.len() > 16 {
                return err(format!(
                    "{part}.ch_mult must have 1..=16 levels, got {ch_mult:?}"
                ));
            }
            if nrb.len() != ch_mult.len() {
                return err(format!(
                    "{part}.num_res_blocks {nrb:?} must have one entry per level of ch_mult {ch_mult:?}"
                ));
            }
            if ch == 0 || !ch.is_multiple_of(NORM_GROUPS) {
                return err(format!(
                    "{part}.ch = {ch} must be a positive multiple of {NORM_GROUPS} (GroupNorm(32) in every block)"
                ));
            }
            if let Some(m) = ch_mult.iter().find(|&&m| m == 0) {
                return err(format!("{part}.ch_mult {ch_mult:?} has a zero entry ({m})"));
            }
            if z == 0 || io == 0 {
                return err(format!("{part}: z_channels and image channels must be > 0"));
            }
            if z != self.quantizer.codebook_dim {
                return err(format!(
                    "{part}.z_channels = {z} must equal quantizer.codebook_dim = {} (LFQ quantizes each latent channel to one bit)",
                    self.quantizer.codebook_dim
                ));
            }
        }
        if self.encoder.double_z {
            return err(
                "encoder.double_z = true is not supported (upstream quant_conv expects z_channels inputs)"
                    .into(),
            );
        }
        let d = self.quantizer.codebook_dim;
        if d == 0 || d > 30 {
            return err(format!(
                "quantizer.codebook_dim = {d} must be in 1..=30 (codes are stored as integers)"
            ));
        }
        if let Some(n) = self.quantizer.codebook_size
            && n != 1 << d
        {
            return err(format!(
                "quantizer.codebook_size = {n} must be 2^codebook_dim = {}",
                1usize << d
            ));
        }
        Ok(())
    }
}
