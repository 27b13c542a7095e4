//! `MAGVITv2` (Show-o `models/modeling_magvitv2.py`): encoder + LFQ + decoder, with the
//! entry points MMaDA uses (`get_code`, `decode_code`).

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::config::MagvitConfig;
use crate::decoder::Decoder;
use crate::encoder::Encoder;
use crate::error::VqError;
use crate::image::{RgbImage, pixels_to_images};
use crate::layers::NamedParam;
use crate::lfq::{Grid, Lfq};
use crate::params::{ParamSource, RandomInit};

/// The MAGVIT-v2 image tokenizer.
#[derive(Debug)]
pub struct MagvitV2<B: Backend> {
    /// The architecture.
    pub config: MagvitConfig,
    /// `VQGANEncoder` (incl. `quant_conv`).
    pub encoder: Encoder<B>,
    /// `VQGANDecoder` (incl. `post_quant_conv`).
    pub decoder: Decoder<B>,
    /// `LFQuantizer`.
    pub quantize: Lfq,
}

impl<B: Backend> Clone for MagvitV2<B> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            encoder: self.encoder.clone(),
            decoder: self.decoder.clone(),
            quantize: self.quantize.clone(),
        }
    }
}

/// One entry of the upstream `state_dict`: name, torch shape, dtype string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDictEntry {
    /// Upstream name (`encoder.conv_in.weight`, …).
    pub name: String,
    /// Torch shape.
    pub shape: Vec<usize>,
    /// `"float32"` or `"int64"` (as torch names them).
    pub dtype: &'static str,
}

impl<B: Backend> MagvitV2<B> {
    /// Build the architecture `cfg` with tensors from `src` (validating `cfg` first).
    ///
    /// # Errors
    /// [`VqError::InvalidConfig`] and the source's errors.
    pub fn from_source<S: ParamSource<B>>(
        cfg: &MagvitConfig,
        src: &mut S,
    ) -> Result<Self, VqError> {
        cfg.validate()?;
        Ok(Self {
            config: cfg.clone(),
            encoder: Encoder::new(&cfg.encoder, src)?,
            decoder: Decoder::new(&cfg.decoder, src)?,
            quantize: Lfq::new(&cfg.quantizer),
        })
    }

    /// The architecture `cfg` with torch-default random weights from `seed` (benchmarks).
    ///
    /// # Errors
    /// [`VqError::InvalidConfig`].
    pub fn random(cfg: &MagvitConfig, seed: u64, device: &B::Device) -> Result<Self, VqError> {
        Self::from_source(cfg, &mut RandomInit::new(seed, device))
    }

    /// Every parameter with its upstream name, in upstream `state_dict` order (encoder, then
    /// decoder with `up.0` first and `post_quant_conv` last). Buffers are not included.
    pub fn named_params(&self) -> Vec<(String, NamedParam<B>)> {
        let mut out = Vec::new();
        self.encoder.named("encoder", &mut out);
        self.decoder.named("decoder", &mut out);
        out
    }

    /// The full upstream `state_dict` layout: [`MagvitV2::named_params`] with their shapes,
    /// then the buffers `quantize.embedding` `[2^D, D]` and `quantize.power_vals` `[D]`.
    pub fn state_dict_layout(&self) -> Vec<StateDictEntry> {
        let mut out: Vec<StateDictEntry> = self
            .named_params()
            .into_iter()
            .map(|(name, p)| StateDictEntry {
                name,
                shape: p.dims(),
                dtype: "float32",
            })
            .collect();
        let d = self.quantize.codebook_dim;
        out.push(StateDictEntry {
            name: crate::checkpoint::EMBEDDING_BUFFER.into(),
            shape: vec![self.quantize.codebook_size(), d],
            dtype: "float32",
        });
        out.push(StateDictEntry {
            name: crate::checkpoint::POWER_VALS_BUFFER.into(),
            shape: vec![d],
            dtype: "int64",
        });
        out
    }

    /// Number of parameters (buffers excluded).
    pub fn num_params(&self) -> usize {
        self.encoder.num_params() + self.decoder.num_params()
    }

    /// The latent grid of an `height × width` image: `(height/f, width/f)`, `f = 16` for the
    /// real model.
    ///
    /// # Errors
    /// [`VqError::BadInput`] when a side is zero or not divisible by `f`.
    pub fn latent_grid(&self, height: usize, width: usize) -> Result<Grid, VqError> {
        let f = self.config.downsample_factor();
        if height == 0 || width == 0 || !height.is_multiple_of(f) || !width.is_multiple_of(f) {
            return Err(VqError::BadInput {
                what: "pixels",
                reason: format!(
                    "image size {height}×{width} must be non-zero multiples of {f} (the encoder's downsampling factor)"
                ),
            });
        }
        Ok(Grid::new(height / f, width / f))
    }

    fn check_pixels(&self, dims: [usize; 4]) -> Result<Grid, VqError> {
        if dims[1] != self.config.encoder.in_ch || dims[0] == 0 {
            return Err(VqError::BadInput {
                what: "pixels",
                reason: format!(
                    "shape {dims:?} must be [B, {}, H, W] with B > 0",
                    self.config.encoder.in_ch
                ),
            });
        }
        self.latent_grid(dims[2], dims[3])
    }

    /// `encoder(pixels)`: pixels `[B, 3, H, W]` in `[-1, 1]` → latent `[B, D, H/f, W/f]`
    /// (continuous, after `quant_conv`).
    ///
    /// # Errors
    /// [`VqError::BadInput`] for a wrong channel count or a size not divisible by `f`.
    pub fn encode_latent(&self, pixels: Tensor<B, 4>) -> Result<Tensor<B, 4>, VqError> {
        self.check_pixels(pixels.dims())?;
        Ok(self.encoder.forward(pixels))
    }

    /// `get_code(pixels)`: pixels `[B, 3, H, W]` in `[-1, 1]` → codes `[B, (H/f)·(W/f)]` in
    /// `[0, 2^D)`, row-major over the latent grid.
    ///
    /// # Errors
    /// As [`MagvitV2::encode_latent`].
    pub fn encode(&self, pixels: Tensor<B, 4>) -> Result<Tensor<B, 2, Int>, VqError> {
        let latent = self.encode_latent(pixels)?;
        self.quantize.codes(latent)
    }

    /// [`MagvitV2::encode`] together with the latent grid the codes fill.
    ///
    /// # Errors
    /// As [`MagvitV2::encode_latent`].
    pub fn encode_with_grid(
        &self,
        pixels: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 2, Int>, Grid), VqError> {
        let [_, _, h, w] = pixels.dims();
        let grid = self.latent_grid(h, w)?;
        Ok((self.encode(pixels)?, grid))
    }

    /// `decode_code(codes, shape=(h, w))`: codes `[B, h·w]` → pixels `[B, 3, h·f, w·f]`,
    /// nominally in `[-1, 1]` (not clamped). For upstream's `shape=None` pass
    /// [`Grid::square`].
    ///
    /// # Errors
    /// [`VqError::BadInput`] (codes do not fill `grid`), [`VqError::CodeOutOfRange`].
    pub fn decode(&self, codes: Tensor<B, 2, Int>, grid: Grid) -> Result<Tensor<B, 4>, VqError> {
        let z_q = self.quantize.codebook_entry(codes, grid)?;
        Ok(self.decoder.forward(z_q))
    }

    /// [`MagvitV2::decode`] then the upstream uint8 conversion ([`pixels_to_images`]).
    ///
    /// # Errors
    /// As [`MagvitV2::decode`].
    pub fn decode_to_images(
        &self,
        codes: Tensor<B, 2, Int>,
        grid: Grid,
    ) -> Result<Vec<RgbImage>, VqError> {
        pixels_to_images(self.decode(codes, grid)?)
    }
}
