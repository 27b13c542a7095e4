//! `VQGANEncoder` (Show-o `models/modeling_magvitv2.py`), including `quant_conv`.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::EncoderConfig;
use crate::error::VqError;
use crate::layers::{AttnBlock, Conv2d, Downsample, GroupNorm, Named, ResnetBlock, join, silu};
use crate::params::ParamSource;

/// A callback seeing the output of every stage, by upstream module name (`conv_in`,
/// `down.0.block.0`, `down.0.downsample`, `mid.attn_1`, `norm_out` (GroupNorm output, before
/// SiLU), `conv_out`, `quant_conv`, …) — the names of the fixtures' stage statistics.
pub type StageObserver<'a, B> = &'a mut dyn FnMut(&str, &Tensor<B, 4>);

/// One resolution level of the encoder (`encoder.down.{i}`).
#[derive(Module, Debug)]
pub struct DownLevel<B: Backend> {
    /// `num_res_blocks[i]` residual blocks; the first maps `ch·in_ch_mult[i] → ch·ch_mult[i]`.
    pub block: Vec<ResnetBlock<B>>,
    /// One `AttnBlock` after each residual block when this level's config resolution is in
    /// `attn_resolutions`, else empty (always empty for the real model).
    pub attn: Vec<AttnBlock<B>>,
    /// Stride-2 downsampling, absent on the last level.
    pub downsample: Option<Downsample<B>>,
}

/// The middle of the encoder or decoder (`*.mid`): ResnetBlock, AttnBlock, ResnetBlock at a
/// constant channel count. `[B, C, h, w]` → same shape.
#[derive(Module, Debug)]
pub struct Mid<B: Backend> {
    /// First residual block.
    pub block_1: ResnetBlock<B>,
    /// Global self-attention over the `h·w` latent positions.
    pub attn_1: AttnBlock<B>,
    /// Second residual block.
    pub block_2: ResnetBlock<B>,
}

impl<B: Backend> Mid<B> {
    pub(crate) fn new<S: ParamSource<B>>(
        src: &mut S,
        name: &str,
        ch: usize,
    ) -> Result<Self, VqError> {
        Ok(Self {
            block_1: ResnetBlock::new(src, &join(name, "block_1"), ch, ch)?,
            attn_1: AttnBlock::new(src, &join(name, "attn_1"), ch)?,
            block_2: ResnetBlock::new(src, &join(name, "block_2"), ch, ch)?,
        })
    }

    pub(crate) fn forward(
        &self,
        h: Tensor<B, 4>,
        obs: &mut Option<StageObserver<'_, B>>,
    ) -> Tensor<B, 4> {
        let h = self.block_1.forward(h);
        observe(obs, "mid.block_1", &h);
        let h = self.attn_1.forward(h);
        observe(obs, "mid.attn_1", &h);
        let h = self.block_2.forward(h);
        observe(obs, "mid.block_2", &h);
        h
    }

    pub(crate) fn named(&self, prefix: &str, out: &mut Named<B>) {
        self.block_1.named(&join(prefix, "block_1"), out);
        self.attn_1.named(&join(prefix, "attn_1"), out);
        self.block_2.named(&join(prefix, "block_2"), out);
    }
}

pub(crate) fn observe<B: Backend>(
    obs: &mut Option<StageObserver<'_, B>>,
    name: &str,
    t: &Tensor<B, 4>,
) {
    if let Some(f) = obs {
        f(name, t);
    }
}

/// `VQGANEncoder`: pixels `[B, in_ch, H, W]` → latent `[B, z_channels, H/f, W/f]` with
/// `f = 2^(levels − 1)` (16 for the real model).
///
/// `conv_in` 3×3 (`in_ch → ch`); per level `i`: `num_res_blocks[i]` [`ResnetBlock`]s (→
/// `ch·ch_mult[i]`, each followed by an [`AttnBlock`] when the level's config resolution is in
/// `attn_resolutions`), then [`Downsample`] unless last; [`Mid`]; `norm_out` → SiLU →
/// `conv_out` 3×3 (→ `z_channels`) → `quant_conv` 1×1. The output is what the LFQ sees.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// 3×3 `in_ch → ch`.
    pub conv_in: Conv2d<B>,
    /// The levels, full resolution first.
    pub down: Vec<DownLevel<B>>,
    /// Middle blocks at `ch·ch_mult[-1]` channels.
    pub mid: Mid<B>,
    /// GroupNorm before the output conv.
    pub norm_out: GroupNorm<B>,
    /// 3×3 `ch·ch_mult[-1] → z_channels`.
    pub conv_out: Conv2d<B>,
    /// 1×1 `z_channels → z_channels`.
    pub quant_conv: Conv2d<B>,
}

impl<B: Backend> Encoder<B> {
    /// Build the encoder of `cfg` with tensors `encoder.*` from `src` (`cfg` validated by
    /// [`crate::MagvitConfig::validate`]).
    ///
    /// # Errors
    /// The source's error.
    pub fn new<S: ParamSource<B>>(cfg: &EncoderConfig, src: &mut S) -> Result<Self, VqError> {
        let p = "encoder";
        let ch = cfg.ch;
        let levels = cfg.ch_mult.len();
        let conv_in = Conv2d::new(src, &join(p, "conv_in"), cfg.in_ch, ch, 3, 1, 1)?;
        let mut curr_res = cfg.resolution;
        let mut block_in = ch;
        let mut down = Vec::with_capacity(levels);
        for i in 0..levels {
            let block_out = ch * cfg.ch_mult[i];
            let lp = format!("{p}.down.{i}");
            let mut block = Vec::new();
            let mut attn = Vec::new();
            for b in 0..cfg.num_res_blocks[i] {
                block.push(ResnetBlock::new(
                    src,
                    &format!("{lp}.block.{b}"),
                    block_in,
                    block_out,
                )?);
                block_in = block_out;
                if cfg.attn_resolutions.contains(&curr_res) {
                    attn.push(AttnBlock::new(src, &format!("{lp}.attn.{b}"), block_in)?);
                }
            }
            let downsample = if i != levels - 1 {
                curr_res /= 2;
                Some(Downsample::new(src, &join(&lp, "downsample"), block_in)?)
            } else {
                None
            };
            down.push(DownLevel {
                block,
                attn,
                downsample,
            });
        }
        let mid = Mid::new(src, &join(p, "mid"), block_in)?;
        let norm_out = GroupNorm::new(src, &join(p, "norm_out"), block_in)?;
        let conv_out = Conv2d::new(src, &join(p, "conv_out"), block_in, cfg.z_channels, 3, 1, 1)?;
        let quant_conv = Conv2d::new(
            src,
            &join(p, "quant_conv"),
            cfg.z_channels,
            cfg.z_channels,
            1,
            1,
            0,
        )?;
        Ok(Self {
            conv_in,
            down,
            mid,
            norm_out,
            conv_out,
            quant_conv,
        })
    }

    /// Pixels `[B, in_ch, H, W]` → latent `[B, z_channels, H/f, W/f]` (incl. `quant_conv`).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.forward_observed(x, None)
    }

    /// [`Encoder::forward`], calling `obs` with the output of every stage (see
    /// [`StageObserver`]).
    pub fn forward_observed(
        &self,
        x: Tensor<B, 4>,
        mut obs: Option<StageObserver<'_, B>>,
    ) -> Tensor<B, 4> {
        let mut h = self.conv_in.forward(x);
        observe(&mut obs, "conv_in", &h);
        for (i, level) in self.down.iter().enumerate() {
            for (b, block) in level.block.iter().enumerate() {
                h = block.forward(h);
                observe(&mut obs, &format!("down.{i}.block.{b}"), &h);
                if let Some(attn) = level.attn.get(b) {
                    h = attn.forward(h);
                    observe(&mut obs, &format!("down.{i}.attn.{b}"), &h);
                }
            }
            if let Some(ds) = &level.downsample {
                h = ds.forward(h);
                observe(&mut obs, &format!("down.{i}.downsample"), &h);
            }
        }
        let h = self.mid.forward(h, &mut obs);
        let h = self.norm_out.forward(h);
        observe(&mut obs, "norm_out", &h);
        let h = self.conv_out.forward(silu(h));
        observe(&mut obs, "conv_out", &h);
        let h = self.quant_conv.forward(h);
        observe(&mut obs, "quant_conv", &h);
        h
    }

    pub(crate) fn named(&self, prefix: &str, out: &mut Named<B>) {
        self.conv_in.named(&join(prefix, "conv_in"), out);
        for (i, level) in self.down.iter().enumerate() {
            let lp = format!("{prefix}.down.{i}");
            for (b, block) in level.block.iter().enumerate() {
                block.named(&format!("{lp}.block.{b}"), out);
            }
            for (b, attn) in level.attn.iter().enumerate() {
                attn.named(&format!("{lp}.attn.{b}"), out);
            }
            if let Some(ds) = &level.downsample {
                ds.named(&join(&lp, "downsample"), out);
            }
        }
        self.mid.named(&join(prefix, "mid"), out);
        self.norm_out.named(&join(prefix, "norm_out"), out);
        self.conv_out.named(&join(prefix, "conv_out"), out);
        self.quant_conv.named(&join(prefix, "quant_conv"), out);
    }
}
