//! `VQGANDecoder` (Show-o `models/modeling_magvitv2.py`), including `post_quant_conv`.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::DecoderConfig;
use crate::encoder::{Mid, StageObserver, observe};
use crate::error::VqError;
use crate::layers::{AttnBlock, Conv2d, GroupNorm, Named, ResnetBlock, Upsample, join, silu};
use crate::params::ParamSource;

/// One resolution level of the decoder (`decoder.up.{i}`; `up.0` is full resolution).
#[derive(Module, Debug)]
pub struct UpLevel<B: Backend> {
    /// `num_res_blocks[i]` residual blocks mapping to `ch·ch_mult[i]` channels.
    pub block: Vec<ResnetBlock<B>>,
    /// Per-block attention when the level's config resolution is in `attn_resolutions`
    /// (always empty for the real model).
    pub attn: Vec<AttnBlock<B>>,
    /// Nearest ×2 + conv, absent on level 0.
    pub upsample: Option<Upsample<B>>,
}

/// `VQGANDecoder`: quantized latent `[B, z_channels, h, w]` → pixels
/// `[B, out_ch, h·f, w·f]`, `f = 2^(levels − 1)`.
///
/// `post_quant_conv` 1×1 (applied first although registered last) → `conv_in` 3×3
/// (`z_channels → ch·ch_mult[-1]`) → [`Mid`] → levels `L−1` down to `0`: `num_res_blocks[i]`
/// [`ResnetBlock`]s (→ `ch·ch_mult[i]`), [`Upsample`] unless `i == 0` → `norm_out` → SiLU →
/// `conv_out` 3×3 (→ `out_ch`). Output nominally in `[-1, 1]` (not clamped).
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// 3×3 `z_channels → ch·ch_mult[-1]`.
    pub conv_in: Conv2d<B>,
    /// Middle blocks.
    pub mid: Mid<B>,
    /// Levels indexed as upstream (`up[0]` = full resolution), executed from the last.
    pub up: Vec<UpLevel<B>>,
    /// GroupNorm before the output conv.
    pub norm_out: GroupNorm<B>,
    /// 3×3 `ch·ch_mult[0] → out_ch`.
    pub conv_out: Conv2d<B>,
    /// 1×1 `z_channels → z_channels`.
    pub post_quant_conv: Conv2d<B>,
}

impl<B: Backend> Decoder<B> {
    /// Build the decoder of `cfg` with tensors `decoder.*` from `src` (`cfg` validated by
    /// [`crate::MagvitConfig::validate`]).
    ///
    /// # Errors
    /// The source's error.
    pub fn new<S: ParamSource<B>>(cfg: &DecoderConfig, src: &mut S) -> Result<Self, VqError> {
        let p = "decoder";
        let levels = cfg.ch_mult.len();
        let mut block_in = cfg.ch * cfg.ch_mult[levels - 1];
        let mut curr_res = cfg.resolution >> (levels - 1);
        let conv_in = Conv2d::new(src, &join(p, "conv_in"), cfg.z_channels, block_in, 3, 1, 1)?;
        let mid = Mid::new(src, &join(p, "mid"), block_in)?;
        let mut up_rev = Vec::with_capacity(levels);
        for i in (0..levels).rev() {
            let block_out = cfg.ch * cfg.ch_mult[i];
            let lp = format!("{p}.up.{i}");
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
            let upsample = if i != 0 {
                curr_res *= 2;
                Some(Upsample::new(src, &join(&lp, "upsample"), block_in)?)
            } else {
                None
            };
            up_rev.push(UpLevel {
                block,
                attn,
                upsample,
            });
        }
        up_rev.reverse();
        let norm_out = GroupNorm::new(src, &join(p, "norm_out"), block_in)?;
        let conv_out = Conv2d::new(src, &join(p, "conv_out"), block_in, cfg.out_ch, 3, 1, 1)?;
        let post_quant_conv = Conv2d::new(
            src,
            &join(p, "post_quant_conv"),
            cfg.z_channels,
            cfg.z_channels,
            1,
            1,
            0,
        )?;
        Ok(Self {
            conv_in,
            mid,
            up: up_rev,
            norm_out,
            conv_out,
            post_quant_conv,
        })
    }

    /// Quantized latent `[B, z_channels, h, w]` → pixels `[B, out_ch, h·f, w·f]`.
    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        self.forward_observed(z, None)
    }

    /// [`Decoder::forward`], calling `obs` with the output of every stage
    /// (`post_quant_conv`, `conv_in`, `mid.*`, `up.{i}.block.{b}`, `up.{i}.upsample`,
    /// `norm_out` (before SiLU), `conv_out`).
    pub fn forward_observed(
        &self,
        z: Tensor<B, 4>,
        mut obs: Option<StageObserver<'_, B>>,
    ) -> Tensor<B, 4> {
        let z = self.post_quant_conv.forward(z);
        observe(&mut obs, "post_quant_conv", &z);
        let h = self.conv_in.forward(z);
        observe(&mut obs, "conv_in", &h);
        let mut h = self.mid.forward(h, &mut obs);
        for (i, level) in self.up.iter().enumerate().rev() {
            for (b, block) in level.block.iter().enumerate() {
                h = block.forward(h);
                observe(&mut obs, &format!("up.{i}.block.{b}"), &h);
                if let Some(attn) = level.attn.get(b) {
                    h = attn.forward(h);
                    observe(&mut obs, &format!("up.{i}.attn.{b}"), &h);
                }
            }
            if let Some(us) = &level.upsample {
                h = us.forward(h);
                observe(&mut obs, &format!("up.{i}.upsample"), &h);
            }
        }
        let h = self.norm_out.forward(h);
        observe(&mut obs, "norm_out", &h);
        let h = self.conv_out.forward(silu(h));
        observe(&mut obs, "conv_out", &h);
        h
    }

    pub(crate) fn named(&self, prefix: &str, out: &mut Named<B>) {
        self.conv_in.named(&join(prefix, "conv_in"), out);
        self.mid.named(&join(prefix, "mid"), out);
        for (i, level) in self.up.iter().enumerate() {
            let lp = format!("{prefix}.up.{i}");
            for (b, block) in level.block.iter().enumerate() {
                block.named(&format!("{lp}.block.{b}"), out);
            }
            for (b, attn) in level.attn.iter().enumerate() {
                attn.named(&format!("{lp}.attn.{b}"), out);
            }
            if let Some(us) = &level.upsample {
                us.named(&join(&lp, "upsample"), out);
            }
        }
        self.norm_out.named(&join(prefix, "norm_out"), out);
        self.conv_out.named(&join(prefix, "conv_out"), out);
        self.post_quant_conv
            .named(&join(prefix, "post_quant_conv"), out);
    }
}
