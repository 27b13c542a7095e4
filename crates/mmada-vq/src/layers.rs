//! Building blocks of the MAGVIT-v2 encoder and decoder, ported from Show-o
//! `models/common_modules.py` (itself from taming-transformers): `Normalize`, `nonlinearity`,
//! `ResnetBlock`, `AttnBlock`, `Downsample`, `Upsample`, plus `torch.nn.Conv2d`.
//!
//! All tensors are `[batch, channels, height, width]` (NCHW, as upstream); conv weights keep
//! the torch layout `[out, in, kh, kw]`, which is also burn's.

use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d;
use burn::tensor::ops::{ConvOptions, PadMode};

use crate::config::{NORM_EPS, NORM_GROUPS};
use crate::error::VqError;
use crate::params::{Init, ParamSource};

/// A tensor of the module with its upstream `state_dict` name.
#[derive(Debug, Clone)]
pub enum NamedParam<B: Backend> {
    /// A bias or GroupNorm affine vector `[C]`.
    Vector(Tensor<B, 1>),
    /// A conv weight `[out, in, kh, kw]`.
    Conv(Tensor<B, 4>),
}

impl<B: Backend> NamedParam<B> {
    /// The torch shape.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            NamedParam::Vector(t) => t.dims().to_vec(),
            NamedParam::Conv(t) => t.dims().to_vec(),
        }
    }
}

/// The list [`named_params`](crate::MagvitV2::named_params) fills.
pub(crate) type Named<B> = Vec<(String, NamedParam<B>)>;

pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// `nonlinearity` (swish): `x · sigmoid(x)`, element-wise.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone() * sigmoid(x)
}

/// `torch.nn.Conv2d` with bias, square kernel, zero padding on all sides.
///
/// Input `[B, in, H, W]` → output `[B, out, (H + 2p − k)/s + 1, (W + 2p − k)/s + 1]`.
#[derive(Module, Debug)]
pub struct Conv2d<B: Backend> {
    /// `[out, in, k, k]`.
    pub weight: Param<Tensor<B, 4>>,
    /// `[out]`.
    pub bias: Param<Tensor<B, 1>>,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl<B: Backend> Conv2d<B> {
    /// Build `{name}.weight` `[out, in, k, k]` and `{name}.bias` `[out]` from `src`.
    ///
    /// # Errors
    /// The source's error.
    #[allow(clippy::too_many_arguments)]
    pub fn new<S: ParamSource<B>>(
        src: &mut S,
        name: &str,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self, VqError> {
        let fan_in = in_ch * kernel * kernel;
        let weight = src.tensor(
            &join(name, "weight"),
            [out_ch, in_ch, kernel, kernel],
            Init::ConvWeight { fan_in },
        )?;
        let bias = src.tensor(&join(name, "bias"), [out_ch], Init::ConvBias { fan_in })?;
        Ok(Self {
            weight: Param::from_tensor(weight),
            bias: Param::from_tensor(bias),
            stride,
            padding,
        })
    }

    /// `[B, in, H, W]` → `[B, out, H', W']`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        conv2d(
            x,
            self.weight.val(),
            Some(self.bias.val()),
            ConvOptions::new(
                [self.stride, self.stride],
                [self.padding, self.padding],
                [1, 1],
                1,
            ),
        )
    }

    pub(crate) fn named(&self, prefix: &str, out: &mut Named<B>) {
        out.push((join(prefix, "weight"), NamedParam::Conv(self.weight.val())));
        out.push((join(prefix, "bias"), NamedParam::Vector(self.bias.val())));
    }
}

/// `Normalize` = `torch.nn.GroupNorm(num_groups=32, eps=1e-6, affine=True)`.
///
/// Per sample and group of `C/32` channels: `(x − mean) / √(var + eps)` with the biased
/// variance over the group's channels and all pixels, then `· weight[c] + bias[c]`.
/// `[B, C, H, W]` → same shape.
#[derive(Module, Debug)]
pub struct GroupNorm<B: Backend> {
    /// `[C]`.
    pub weight: Param<Tensor<B, 1>>,
    /// `[C]`.
    pub bias: Param<Tensor<B, 1>>,
    /// Number of groups (32).
    pub num_groups: usize,
    /// Epsilon (1e-6).
    pub eps: f64,
}

impl<B: Backend> GroupNorm<B> {
    /// Build `{name}.weight` / `{name}.bias` `[channels]` from `src`.
    ///
    /// # Errors
    /// The source's error.
    pub fn new<S: ParamSource<B>>(
        src: &mut S,
        name: &str,
        channels: usize,
    ) -> Result<Self, VqError> {
        let weight = src.tensor(&join(name, "weight"), [channels], Init::Ones)?;
        let bias = src.tensor(&join(name, "bias"), [channels], Init::Zeros)?;
        Ok(Self {
            weight: Param::from_tensor(weight),
            bias: Param::from_tensor(bias),
            num_groups: NORM_GROUPS,
            eps: NORM_EPS,
        })
    }

    /// `[B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let g = self.num_groups;
        let n = (c / g) * h * w;
        let xg = x.reshape([b, g, n]);
        let mean = xg.clone().mean_dim(2);
        let centered = xg - mean;
        let var = centered.clone().square().mean_dim(2);
        let normed = (centered / var.add_scalar(self.eps).sqrt()).reshape([b, c, h, w]);
        normed * self.weight.val().reshape([1, c, 1, 1]) + self.bias.val().reshape([1, c, 1, 1])
    }

    pub(crate) fn named(&self, prefix: &str, out: &mut Named<B>) {
        out.push((
            join(prefix, "weight"),
            NamedParam::Vector(self.weight.val()),
        ));
        out.push((join(prefix, "bias"), NamedParam::Vector(self.bias.val())));
    }
}

/// `ResnetBlock(in_channels, out_channels, temb_channels=0, dropout)`:
/// `h = conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))`, `out = shortcut(x) + h`, where the
/// shortcut is the identity when `in == out` and the 1×1 conv `nin_shortcut` otherwise.
/// Both convs 3×3, padding 1. `[B, in, H, W]` → `[B, out, H, W]`.
#[derive(Module, Debug)]
pub struct ResnetBlock<B: Backend> {
    /// GroupNorm over `in` channels.
    pub norm1: GroupNorm<B>,
    /// 3×3 `in → out`.
    pub conv1: Conv2d<B>,
    /// GroupNorm over `out` channels.
    pub norm2: GroupNorm<B>,
    /// 3×3 `out → out`.
    pub conv2: Conv2d<B>,
    /// 1×1 `in → out`, present iff `in != out`.
    pub nin_shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> ResnetBlock<B> {
    /// Build the block named `name` (`encoder.down.0.block.0`, …).
    ///
    /// # Errors
    /// The source's error.
    pub fn new<S: ParamSource<B>>(
        src: &mut S,
        name: &str,
        in_ch: usize,
        out_ch: usize,
    ) -> Result<Self, VqError> {
        let norm1 = GroupNorm::new(src, &join(name, "norm1"), in_ch)?;
        let conv1 = Conv2d::new(src, &join(name, "conv1"), in_ch, out_ch, 3, 1, 1)?;
        let norm2 = GroupNorm::new(src, &join(name, "norm2"), out_ch)?;
        let conv2 = Conv2d::new(src, &join(name, "conv2"), out_ch, out_ch, 3, 1, 1)?;
        let nin_shortcut = if in_ch != out_ch {
            Some(Conv2d::new(
                src,
                &join(name, "nin_shortcut"),
                in_ch,
                out_ch,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            norm2,
            conv2,
            nin_shortcut,
        })
    }

    /// `[B, in, H, W]` → `[B, out, H, W]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let shortcut = match &self.nin_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        shortcut + h
    }

    pub(crate) fn named(&self, prefix: &str, out: &mut Named<B>) {
        self.norm1.named(&join(prefix, "norm1"), out);
        self.conv1.named(&join(prefix, "conv1"), out);
        self.norm2.named(&join(prefix, "norm2"), out);
        self.conv2.named(&join(prefix, "conv2"), out);
        if let Some(c) = &self.nin_shortcut {
            c.named(&join(prefix, "nin_shortcut"), out);
        }
    }
}

/// `AttnBlock(C)`: single-head self-attention over all `N = H·W` pixels.
///
/// `h = norm(x)`; `q, k, v` = 1×1 convs of `h` reshaped to `[B, C, N]` (pixel `i = y·W + x`);
/// `p[i, j] = softmax_j(Σ_c q[c, i]·k[c, j] · C^−½)`; `o[c, i] = Σ_j v[c, j]·p[i, j]`;
/// output `x + proj_out(o)`. `[B, C, H, W]` → same shape.
#[derive(Module, Debug)]
pub struct AttnBlock<B: Backend> {
    /// GroupNorm over `C`.
    pub norm: GroupNorm<B>,
    /// 1×1 query projection.
    pub q: Conv2d<B>,
    /// 1×1 key projection.
    pub k: Conv2d<B>,
    /// 1×1 value projection.
    pub v: Conv2d<B>,
    /// 1×1 output projection.
    pub proj_out: Conv2d<B>,
}

impl<B: Backend> AttnBlock<B> {
    /// Build the block named `name` (`encoder.mid.attn_1`, …).
    ///
    /// # Errors
    /// The source's error.
    pub fn new<S: ParamSource<B>>(src: &mut S, name: &str, ch: usize) -> Result<Self, VqError> {
        Ok(Self {
            norm: GroupNorm::new(src, &join(name, "norm"), ch)?,
            q: Conv2d::new(src, &join(name, "q"), ch, ch, 1, 1, 0)?,
            k: Conv2d::new(src, &join(name, "k"), ch, ch, 1, 1, 0)?,
            v: Conv2d::new(src, &join(name, "v"), ch, ch, 1, 1, 0)?,
            proj_out: Conv2d::new(src, &join(name, "proj_out"), ch, ch, 1, 1, 0)?,
        })
    }

    /// `[B, C, H, W]` → `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let n = h * w;
        let hn = self.norm.forward(x.clone());
        let q = self.q.forward(hn.clone()).reshape([b, c, n]);
        let k = self.k.forward(hn.clone()).reshape([b, c, n]);
        let v = self.v.forward(hn).reshape([b, c, n]);
        // scores[b, i, j] = Σ_c q[b, c, i] k[b, c, j]
        let scores = q.swap_dims(1, 2).matmul(k) * (c as f64).powf(-0.5);
        let p = softmax(scores, 2);
        // o[b, c, i] = Σ_j v[b, c, j] p[b, i, j]
        let o = v.matmul(p.swap_dims(1, 2)).reshape([b, c, h, w]);
        x + self.proj_out.forward(o)
    }

    pub(crate) fn named(&self, prefix: &str, out: &mut Named<B>) {
        self.norm.named(&join(prefix, "norm"), out);
        self.q.named(&join(prefix, "q"), out);
        self.k.named(&join(prefix, "k"), out);
        self.v.named(&join(prefix, "v"), out);
        self.proj_out.named(&join(prefix, "proj_out"), out);
    }
}

/// `Downsample(C, with_conv=True)`: zero-pad right and bottom by one pixel
/// (`F.pad(x, (0, 1, 0, 1))`), then a 3×3 conv with stride 2 and no padding.
/// `[B, C, H, W]` → `[B, C, ⌊(H − 2)/2⌋ + 1, ⌊(W − 2)/2⌋ + 1]` (`H/2` for even `H`).
#[derive(Module, Debug)]
pub struct Downsample<B: Backend> {
    /// 3×3, stride 2, padding 0.
    pub conv: Conv2d<B>,
}

impl<B: Backend> Downsample<B> {
    /// Build `{name}.conv`.
    ///
    /// # Errors
    /// The source's error.
    pub fn new<S: ParamSource<B>>(src: &mut S, name: &str, ch: usize) -> Result<Self, VqError> {
        Ok(Self {
            conv: Conv2d::new(src, &join(name, "conv"), ch, ch, 3, 2, 0)?,
        })
    }

    /// `[B, C, H, W]` → `[B, C, H/2, W/2]` (even sizes).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv
            .forward(x.pad((0, 1, 0, 1), PadMode::Constant(0.0)))
    }

    pub(crate) fn named(&self, prefix: &str, out: &mut Named<B>) {
        self.conv.named(&join(prefix, "conv"), out);
    }
}

/// `Upsample(C, with_conv=True)`: nearest-neighbour ×2
/// (`F.interpolate(scale_factor=2, mode="nearest")`: every pixel repeated into a 2×2 block),
/// then a 3×3 conv with padding 1. `[B, C, H, W]` → `[B, C, 2H, 2W]`.
#[derive(Module, Debug)]
pub struct Upsample<B: Backend> {
    /// 3×3, padding 1.
    pub conv: Conv2d<B>,
}

impl<B: Backend> Upsample<B> {
    /// Build `{name}.conv`.
    ///
    /// # Errors
    /// The source's error.
    pub fn new<S: ParamSource<B>>(src: &mut S, name: &str, ch: usize) -> Result<Self, VqError> {
        Ok(Self {
            conv: Conv2d::new(src, &join(name, "conv"), ch, ch, 3, 1, 1)?,
        })
    }

    /// `[B, C, H, W]` → `[B, C, 2H, 2W]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward(nearest2x(x))
    }

    pub(crate) fn named(&self, prefix: &str, out: &mut Named<B>) {
        self.conv.named(&join(prefix, "conv"), out);
    }
}

/// Nearest-neighbour ×2 upsampling: `out[.., y, x] = in[.., y/2, x/2]` (exact, no arithmetic).
pub fn nearest2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, 2, w, 2])
        .reshape([b, c, 2 * h, 2 * w])
}
