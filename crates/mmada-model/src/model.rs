//! The LLaDA / MMaDA bidirectional transformer (spec §1.2–§1.3).
//!
//! Port of upstream `models/modeling_llada.py` (`LLaDAModel`, `LLaDALlamaBlock`,
//! `RMSLayerNorm`, `RotaryEmbedding`) at Gen-Verse/MMaDA `3cdb870`, for
//! `block_type = "llama"`: pre-norm blocks with RMSNorm, rotate-half RoPE, grouped-query
//! attention **without a causal mask**, and a SwiGLU MLP whose gate is `ff_proj`.
//!
//! Field names follow the Hugging Face checkpoint (`wte`, `blocks.{i}.q_proj`, …,
//! `ln_f`, `ff_out`) so that [`crate::checkpoint`] maps them one to one.

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, DType, FloatDType, Int, Tensor, TensorData};

use crate::config::ModelConfig;
use crate::kv::{KvCache, KvCacheError, KvUse};
use crate::lora::LoraTarget;

/// The additive bias for attention scores that must be ignored: `finfo(float32).min`, as
/// upstream (`LLaDAModel.forward` uses `torch.finfo(dtype).min`, never `-inf`, spec §1.3).
/// A query row whose keys are all masked therefore attends uniformly to every key, exactly as
/// upstream does for left-padding rows.
pub const MASKED_SCORE: f32 = f32::MIN;

/// Which key positions each query may attend to. There is never a causal mask.
#[derive(Debug, Clone)]
pub enum Attention<B: Backend> {
    /// Every position attends to every position (training rows, unpadded batches).
    Full,
    /// Key padding: `[batch, seq]`, `true` = a real token that may be attended to. This is the
    /// `attention_mask` semantics of the fixed HF LLaDA code (2025-10): bidirectional with the
    /// padded keys removed.
    KeyPadding(Tensor<B, 2, Bool>),
    /// Explicit pairwise mask `[batch, seq, seq]` (query, key), `true` = may attend. This is the
    /// boolean `attention_bias` MMaDA passes in `t2i_generate` / `mmu_generate`
    /// (`m[:, :, None] & m[:, None, :]`).
    Pairwise(Tensor<B, 3, Bool>),
    /// An additive float bias `[batch, 1, seq, seq]` added to the attention scores, exactly as
    /// upstream adds a *float* `attention_bias`. MMaDA's training `forward_process` passes a
    /// float tensor of 1.0 / 0.0 (spec §3.3 caveat, fixture quirk 2), so padded keys are only
    /// down-weighted by e⁻¹, not removed; this variant reproduces that.
    Bias(Tensor<B, 4>),
}

impl<B: Backend> Attention<B> {
    /// Key-padding attention from a `[batch, seq]` 0/1 integer mask (HF `attention_mask`).
    pub fn key_padding_from_ints(mask: Tensor<B, 2, Int>) -> Self {
        Attention::KeyPadding(mask.greater_elem(0))
    }

    /// The additive f32 bias `[batch, 1, q, k]` (or `None` for full attention) that every
    /// block adds to its attention scores for a canvas of `seq` positions.
    ///
    /// # Panics
    /// When the mask's length differs from `seq`.
    pub fn bias(&self, seq: usize) -> Option<Tensor<B, 4>> {
        match self {
            Attention::Full => None,
            Attention::KeyPadding(m) => {
                let [b, l] = m.dims();
                assert_eq!(
                    l, seq,
                    "key-padding mask length {l} != sequence length {seq}"
                );
                let keep = m.clone().reshape([b, 1, 1, l]);
                Some(mask_to_bias(keep))
            }
            Attention::Pairwise(m) => {
                let [b, q, k] = m.dims();
                assert!(
                    q == seq && k == seq,
                    "pairwise mask [{b}, {q}, {k}] does not match sequence length {seq}"
                );
                Some(mask_to_bias(m.clone().reshape([b, 1, q, k])))
            }
            Attention::Bias(t) => {
                let [_, _, q, k] = t.dims();
                assert!(
                    q == seq && k == seq,
                    "attention bias [.., {q}, {k}] does not match sequence length {seq}"
                );
                Some(t.clone().cast(FloatDType::F32))
            }
        }
    }
}

fn mask_to_bias<B: Backend>(keep: Tensor<B, 4, Bool>) -> Tensor<B, 4> {
    let zeros = Tensor::<B, 4>::zeros(keep.shape(), (&keep.device(), DType::F32));
    zeros.mask_fill(keep.bool_not(), MASKED_SCORE)
}

/// RMSNorm as upstream `RMSLayerNorm`: `weight * (x_f32 * rsqrt(mean(x_f32²) + eps)).to(dtype)`.
/// Parameter `weight`: `[d_model]`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Scale, `[d_model]` (HF `*.attn_norm.weight`, `*.ff_norm.weight`, `ln_f.weight`).
    pub weight: Param<Tensor<B, 1>>,
    /// `rms_norm_eps`.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// `x`: `[batch, seq, d_model]` → same shape and dtype. The statistics are computed in f32.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let dtype = x.dtype();
        let xf = x.cast(FloatDType::F32);
        let var = xf.clone().powi_scalar(2).mean_dim(2);
        let normed = (xf * (var + self.eps).sqrt().recip()).cast(float_dtype(dtype));
        normed * self.weight.val().unsqueeze_dims::<3>(&[0, 1])
    }
}

/// The [`FloatDType`] of a tensor's [`DType`] (f32 for anything that is not f64 / f16 / bf16).
pub fn float_dtype(d: DType) -> FloatDType {
    match d {
        DType::F64 => FloatDType::F64,
        DType::F16 => FloatDType::F16,
        DType::BF16 => FloatDType::BF16,
        _ => FloatDType::F32,
    }
}

/// Rotate-half RoPE tables `(cos, sin)`, each `[seq, head_dim]` in f32, for positions
/// `0..seq`.
///
/// As upstream `RotaryEmbedding.get_rotary_embedding`: `inv_freq[j] = 1 / θ^(2j/hd)` in f32,
/// `freqs = pos ⊗ inv_freq`, `emb = cat(freqs, freqs)` (NeoX layout, **not** burn's
/// interleaved `RotaryEncoding`).
pub fn rope_tables<B: Backend>(
    seq: usize,
    head_dim: usize,
    theta: f64,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let half = head_dim / 2;
    let theta = theta as f32;
    let inv_freq: Vec<f32> = (0..half)
        .map(|j| 1.0 / theta.powf((2 * j) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(seq * head_dim);
    let mut sin = Vec::with_capacity(seq * head_dim);
    for p in 0..seq {
        // emb = cat(freqs, freqs)
        for _ in 0..2 {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let opts = (device, DType::F32);
    (
        Tensor::from_data(TensorData::new(cos, [seq, head_dim]), opts),
        Tensor::from_data(TensorData::new(sin, [seq, head_dim]), opts),
    )
}

/// Apply rotate-half RoPE in f32: `t·cos + rotate_half(t)·sin`, `rotate_half([a, b]) = [-b, a]`.
/// `t`: `[batch, heads, seq, head_dim]`; `cos`, `sin`: `[seq, head_dim]` (f32). Returns `t`'s dtype.
pub fn apply_rope<B: Backend>(
    t: Tensor<B, 4>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
) -> Tensor<B, 4> {
    let dtype = t.dtype();
    let [_, _, _, hd] = t.dims();
    let t = t.cast(FloatDType::F32);
    let half = hd / 2;
    let x1 = t.clone().narrow(3, 0, half);
    let x2 = t.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let cos = cos.clone().unsqueeze_dims::<4>(&[0, 1]);
    let sin = sin.clone().unsqueeze_dims::<4>(&[0, 1]);
    (t * cos + rotated * sin).cast(float_dtype(dtype))
}

/// One `LLaDALlamaBlock`.
#[derive(Module, Debug)]
pub struct LladaBlock<B: Backend> {
    /// Pre-attention RMSNorm.
    pub attn_norm: RmsNorm<B>,
    /// Query projection, burn layout `[d_model, n_heads·hd]` (HF `[out, in]` transposed).
    pub q_proj: Linear<B>,
    /// Key projection `[d_model, n_kv_heads·hd]`.
    pub k_proj: Linear<B>,
    /// Value projection `[d_model, n_kv_heads·hd]`.
    pub v_proj: Linear<B>,
    /// Attention output projection `[d_model, d_model]`.
    pub attn_out: Linear<B>,
    /// Pre-MLP RMSNorm.
    pub ff_norm: RmsNorm<B>,
    /// SwiGLU gate `[d_model, mlp]` (goes through SiLU).
    pub ff_proj: Linear<B>,
    /// SwiGLU up projection `[d_model, mlp]`.
    pub up_proj: Linear<B>,
    /// MLP down projection `[mlp, d_model]`.
    pub ff_out: Linear<B>,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// LoRA adapters on the projections ([`crate::lora`]); `None`: the plain block.
    pub lora: Option<crate::lora::BlockLora<B>>,
}

/// `x · W` of a [`Linear`] (no bias in LLaDA), computed in `compute` when given: the input
/// and the weight are cast to `compute` (tracked by autodiff, so the weight's gradient arrives
/// in the parameter's own dtype) and the product stays in `compute`, as a matmul under
/// PyTorch's `torch.autocast(dtype=torch.bfloat16)`.
pub(crate) fn linear_in<B: Backend>(
    layer: &Linear<B>,
    x: Tensor<B, 3>,
    compute: Option<FloatDType>,
) -> Tensor<B, 3> {
    match compute {
        None => layer.forward(x),
        Some(c) => {
            let w = cast_to(layer.weight.val(), c);
            let y = cast_to(x, c).matmul(w.unsqueeze::<3>());
            match &layer.bias {
                Some(b) => y + cast_to(b.val(), c).unsqueeze::<3>(),
                None => y,
            }
        }
    }
}

/// `t` copied into a fresh row-major buffer (its values unchanged).
///
/// A transposed view and a row-major tensor holding the same values can take different
/// matmul kernels, and so different summation orders, in Flex: the LM head's input gradient
/// `G · Wᵀ` differed in the last bits between a run and its resumed copy (the checkpoint
/// loader's `[out, in]` → `[in, out]` transpose was a view; AdamW's update writes row-major).
/// Linear weights are therefore created row-major, so that a resumed run computes bit for
/// bit as the run that wrote the checkpoint. The copy passes through the host once, at load.
pub fn row_major<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    let (device, dtype) = (t.device(), t.dtype());
    Tensor::from_data(t.into_data(), (&device, dtype))
}

/// `t` cut from the autodiff graph and not tracked: `torch.Tensor.detach()`. burn 0.21's
/// `Tensor::detach` keeps `require_grad` (a detached parameter or intermediate becomes a new
/// leaf whose downstream ops are recorded and back-propagated); this also clears it. No op on
/// a backend without autodiff.
pub fn stop_grad<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    t.detach().set_require_grad(false)
}

/// `t` in `dtype` (no op when it already is).
fn cast_to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: FloatDType) -> Tensor<B, D> {
    if t.dtype() == DType::from(dtype) {
        t
    } else {
        t.cast(dtype)
    }
}

impl<B: Backend> LladaBlock<B> {
    /// `x`: `[batch, seq, d_model]`; `bias`: additive f32 `[batch|1, 1, seq|1, seq]`.
    /// Computes in the parameters' dtype; see [`LladaBlock::forward_in`] for mixed precision.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &(Tensor<B, 2>, Tensor<B, 2>),
        bias: Option<&Tensor<B, 4>>,
    ) -> Tensor<B, 3> {
        self.forward_in(x, rope, bias, None)
    }

    /// [`LladaBlock::forward`] with the seven projections computed in `compute` (e.g. BF16
    /// over f32 parameters, see [`LladaModel::with_compute_dtype`]). The residual stream and
    /// the norms stay in `x`'s dtype (upstream under autocast: `x + attn_out(..)` promotes the
    /// bf16 branch back to the f32 residual); RoPE and the softmax run in f32 as always; the
    /// attention matmuls and the SwiGLU product run in `compute`.
    pub fn forward_in(
        &self,
        x: Tensor<B, 3>,
        rope: &(Tensor<B, 2>, Tensor<B, 2>),
        bias: Option<&Tensor<B, 4>>,
        compute: Option<FloatDType>,
    ) -> Tensor<B, 3> {
        self.forward_kv(x, rope, bias, compute, KvUse::Keep)
    }

    /// [`LladaBlock::forward_in`] with the keys and values of the block's positions handed to
    /// `kv` after RoPE (KV-cached decoding, [`crate::kv`]): kept, also stored, or spliced into
    /// cached ones, so that the queries `x` (`[batch, q, d_model]`, `rope` of their positions)
    /// attend to every cached position. With [`KvUse::Keep`] and [`KvUse::Store`] the ops are
    /// those of `forward_in`, so the result is the same bit for bit.
    pub(crate) fn forward_kv(
        &self,
        x: Tensor<B, 3>,
        rope: &(Tensor<B, 2>, Tensor<B, 2>),
        bias: Option<&Tensor<B, 4>>,
        compute: Option<FloatDType>,
        kv: KvUse<'_, B>,
    ) -> Tensor<B, 3> {
        let [b, l, d] = x.dims();
        let residual = float_dtype(x.dtype());
        let hd = d / self.n_heads;
        let h = self.attn_norm.forward(x.clone());
        let q = self.project(LoraTarget::QProj, h.clone(), compute);
        let k = self.project(LoraTarget::KProj, h.clone(), compute);
        let v = self.project(LoraTarget::VProj, h, compute);
        let q = q.reshape([b, l, self.n_heads, hd]).swap_dims(1, 2);
        let k = k.reshape([b, l, self.n_kv_heads, hd]).swap_dims(1, 2);
        let v = v.reshape([b, l, self.n_kv_heads, hd]).swap_dims(1, 2);
        let q = apply_rope(q, &rope.0, &rope.1);
        let k = apply_rope(k, &rope.0, &rope.1);
        let (k, v) = kv.apply(k, v);
        let lk = k.dims()[2];
        let (k, v) = if self.n_kv_heads != self.n_heads {
            // torch `repeat_interleave(n_heads / n_kv_heads, dim=1)`: kv head j serves query
            // heads j·r .. j·r + r.
            let r = self.n_heads / self.n_kv_heads;
            let rep = |t: Tensor<B, 4>| {
                t.unsqueeze_dim::<5>(2)
                    .expand([b, self.n_kv_heads, r, lk, hd])
                    .reshape([b, self.n_heads, lk, hd])
            };
            (rep(k), rep(v))
        } else {
            (k, v)
        };
        let o = scaled_dot_product_attention(q, k, v, bias);
        let o = o.swap_dims(1, 2).reshape([b, l, d]);
        let x = x + cast_to(self.project(LoraTarget::AttnOut, o, compute), residual);
        let h = self.ff_norm.forward(x.clone());
        let gate = silu(self.project(LoraTarget::FfProj, h.clone(), compute));
        let up = self.project(LoraTarget::UpProj, h, compute);
        x + cast_to(
            self.project(LoraTarget::FfOut, gate * up, compute),
            residual,
        )
    }
}

/// `softmax(q kᵀ / √hd + bias) v`, scores and softmax in f32.
/// `q`, `k`, `v`: `[batch, heads, seq, hd]`; `bias`: broadcastable to `[batch, heads, seq, seq]`.
pub fn scaled_dot_product_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<&Tensor<B, 4>>,
) -> Tensor<B, 4> {
    let dtype = v.dtype();
    let hd = q.dims()[3];
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = q.matmul(k.swap_dims(2, 3)).cast(FloatDType::F32) * scale;
    let scores = match bias {
        Some(bias) => scores + bias.clone(),
        None => scores,
    };
    let probs = softmax(scores, 3).cast(float_dtype(dtype));
    probs.matmul(v)
}

/// The full model: `LLaDAModel` with its LM head (`LLaDAModelLM` minus the HF wrapper).
#[derive(Module, Debug)]
pub struct LladaModel<B: Backend> {
    /// Token embedding `[embedding_size, d_model]`.
    pub wte: Embedding<B>,
    /// Transformer blocks.
    pub blocks: Vec<LladaBlock<B>>,
    /// Final RMSNorm.
    pub ln_f: RmsNorm<B>,
    /// Untied output head, burn layout `[d_model, embedding_size]`.
    pub ff_out: Linear<B>,
    /// `rope_theta`.
    pub rope_theta: f64,
    /// Mixed precision: the dtype the matmuls run in when it differs from the parameters'
    /// (`None`: everything in the parameter dtype). Not a parameter; not saved. Set it with
    /// [`LladaModel::with_compute_dtype`].
    pub compute_dtype: Option<FloatDType>,
}

/// Anything that maps a canvas of token ids to logits: the model, a mock in tests, later a
/// KV-cached variant. Samplers, losses and RL take this trait.
pub trait Denoiser<B: Backend> {
    /// `ids`: `[batch, seq]` → logits `[batch, seq, vocab]`. The logit at position `i`
    /// predicts the token at `i` (no shift).
    fn logits(&self, ids: Tensor<B, 2, Int>, attention: &Attention<B>) -> Tensor<B, 3>;

    /// The logits of positions `start .. start + len` only: `[batch, len, vocab]` (a sampler's
    /// current block). Default: [`Denoiser::logits`] narrowed (returned whole when it is
    /// shorter than the window, so the caller's shape check names the fault); [`LladaModel`]
    /// applies its LM head to the window's hidden states only, so the head's work scales with
    /// the window, not the canvas.
    fn window_logits(
        &self,
        ids: Tensor<B, 2, Int>,
        attention: &Attention<B>,
        start: usize,
        len: usize,
    ) -> Tensor<B, 3> {
        let logits = self.logits(ids, attention);
        if logits.dims()[1] >= start + len {
            logits.narrow(1, start, len)
        } else {
            logits
        }
    }

    /// [`Denoiser::window_logits`] from a full forward that also returns the keys and values
    /// of every layer at every canvas position ([`KvCache`]) for later
    /// [`Denoiser::window_logits_cached`] calls. The logits equal those of `window_logits` bit
    /// for bit (a cache refresh runs exactly the uncached computation). Default: no cache
    /// (`None`; the sampler then runs every step uncached and counts no cache hit).
    fn window_logits_caching(
        &self,
        ids: Tensor<B, 2, Int>,
        attention: &Attention<B>,
        start: usize,
        len: usize,
    ) -> (Tensor<B, 3>, Option<KvCache<B>>) {
        (self.window_logits(ids, attention, start, len), None)
    }

    /// The logits of positions `start .. start + len` (`[batch, len, vocab]`) from a forward of
    /// the query positions `query.0 .. query.0 + query.1` only (which must contain the
    /// window): their keys and values are recomputed from `ids` (`[batch, seq]`, the whole
    /// canvas), every other position's come from `cache` (Fast-dLLM prefix / dual cache; an
    /// approximation for a bidirectional model, exact only where the cached positions did not
    /// change since the refresh). Default: [`Denoiser::window_logits`] (the cache ignored).
    ///
    /// # Errors
    /// [`KvCacheError`] when the cache does not fit the call (batch, canvas length, layers) or
    /// the query range does not contain the window.
    fn window_logits_cached(
        &self,
        ids: Tensor<B, 2, Int>,
        attention: &Attention<B>,
        cache: &KvCache<B>,
        query: (usize, usize),
        start: usize,
        len: usize,
    ) -> Result<Tensor<B, 3>, KvCacheError> {
        let _ = (cache, query);
        Ok(self.window_logits(ids, attention, start, len))
    }

    /// Number of input ids the network accepts (its embedding rows), when known, so that
    /// samplers reject an out-of-range prompt id with a typed error instead of an index panic
    /// inside the embedding. Default `None` (unknown).
    fn input_vocab(&self) -> Option<usize> {
        None
    }
}

impl<B: Backend> LladaModel<B> {
    /// Forward pass (spec §1.2): `input_ids` `[batch, seq]` → logits `[batch, seq, embedding_size]`.
    /// Positions are `0..seq` whatever the padding (upstream has no position ids).
    ///
    /// With a compute dtype ([`LladaModel::with_compute_dtype`]) the projections and the LM
    /// head run in that dtype over the parameters cast inside the forward (autodiff tracks the
    /// casts, so gradients arrive in the parameter dtype), the embedding lookup, residual
    /// stream and norms stay in the parameter dtype, and the logits are returned in f32 for an
    /// f32 loss (PyTorch autocast runs `cross_entropy` in f32).
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>, attention: &Attention<B>) -> Tensor<B, 3> {
        self.lm_head().logits3(self.hidden(input_ids, attention))
    }

    /// The final hidden states `[batch, seq, d_model]` (after `ln_f`, before the LM head), in
    /// the parameter dtype: [`LladaModel::forward`] is `lm_head().logits(hidden(..))`. Losses
    /// that score a few positions gather these rows and apply the head only there
    /// (`mmada_diffusion::Scores::Hidden`), never materialising `[batch, seq, vocab]`.
    pub fn hidden(&self, input_ids: Tensor<B, 2, Int>, attention: &Attention<B>) -> Tensor<B, 3> {
        let [_, l] = input_ids.dims();
        let device = input_ids.device();
        let x = self.wte.forward(input_ids);
        let hd = self.head_dim();
        let rope = rope_tables::<B>(l, hd, self.rope_theta, &device);
        let bias = attention.bias(l);
        let compute = self.effective_compute_dtype();
        let mut x = x;
        for block in &self.blocks {
            x = block.forward_in(x, &rope, bias.as_ref(), compute);
        }
        self.ln_f.forward(x)
    }

    /// The LM head (`ff_out`) with the compute dtype of the forward, as tensors on this
    /// model's graph (gradients reach `ff_out`).
    pub fn lm_head(&self) -> LmHead<B> {
        LmHead {
            weight: self.ff_out.weight.val(),
            bias: self.ff_out.bias.as_ref().map(|b| b.val()),
            compute: self.effective_compute_dtype(),
        }
    }

    /// Set the mixed-precision compute dtype: `Some(FloatDType::BF16)` over f32 parameters is
    /// bf16 compute with f32 master weights (accelerate `mixed_precision: bf16`); `None`, or
    /// the parameters' own dtype, computes in the parameter dtype. The optimizer keeps seeing
    /// the parameters (and their gradients) in their own dtype.
    pub fn with_compute_dtype(mut self, compute: Option<FloatDType>) -> Self {
        self.compute_dtype = compute;
        self
    }

    /// The compute dtype when it differs from the parameter dtype (`None`: no mixed precision).
    pub fn effective_compute_dtype(&self) -> Option<FloatDType> {
        self.compute_dtype
            .filter(|c| DType::from(*c) != self.dtype())
    }

    /// `d_model / n_heads`.
    pub fn head_dim(&self) -> usize {
        let d = self.wte.weight.val().dims()[1];
        d / self.blocks.first().map(|b| b.n_heads).unwrap_or(1)
    }

    /// The float dtype of the parameters (`F32`, `BF16`, …).
    pub fn dtype(&self) -> DType {
        self.wte.weight.val().dtype()
    }

    /// Build a model whose parameters come from `source`, by Hugging Face tensor name
    /// (without the `model.transformer.` prefix) and torch shape (`[out, in]` for Linear).
    ///
    /// # Errors
    /// Whatever `source` returns (missing tensor, wrong shape, I/O).
    pub fn from_source<S: ParamSource<B>>(
        cfg: &ModelConfig,
        source: &mut S,
    ) -> Result<Self, S::Error> {
        let d = cfg.d_model;
        let hd = cfg.head_dim();
        let kv = cfg.n_kv_heads * hd;
        let m = cfg.mlp_hidden_size;
        let v = cfg.embedding_size;
        let eps = cfg.rms_norm_eps;
        let norm = |s: &mut S, name: String| -> Result<RmsNorm<B>, S::Error> {
            Ok(RmsNorm {
                weight: Param::from_tensor(s.vector(&name, d)?),
                eps,
            })
        };
        let linear =
            |s: &mut S, name: String, out: usize, inp: usize| -> Result<Linear<B>, S::Error> {
                let w = s.matrix(&name, [out, inp])?;
                Ok(Linear {
                    weight: Param::from_tensor(row_major(w.transpose())),
                    bias: None,
                })
            };
        let wte = Embedding {
            weight: Param::from_tensor(source.matrix("wte.weight", [v, d])?),
        };
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = |n: &str| format!("blocks.{i}.{n}.weight");
            blocks.push(LladaBlock {
                attn_norm: norm(source, p("attn_norm"))?,
                q_proj: linear(source, p("q_proj"), d, d)?,
                k_proj: linear(source, p("k_proj"), kv, d)?,
                v_proj: linear(source, p("v_proj"), kv, d)?,
                attn_out: linear(source, p("attn_out"), d, d)?,
                ff_norm: norm(source, p("ff_norm"))?,
                ff_proj: linear(source, p("ff_proj"), m, d)?,
                up_proj: linear(source, p("up_proj"), m, d)?,
                ff_out: linear(source, p("ff_out"), d, m)?,
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                lora: None,
            });
        }
        let ln_f = norm(source, "ln_f.weight".into())?;
        let ff_out = linear(source, "ff_out.weight".into(), v, d)?;
        Ok(LladaModel {
            wte,
            blocks,
            ln_f,
            ff_out,
            rope_theta: cfg.rope_theta,
            compute_dtype: None,
        })
    }

    /// Every parameter by Hugging Face name (without the `model.transformer.` prefix), in the
    /// order of the upstream state dict; a block's LoRA adapters ([`crate::lora`]) follow
    /// its base parameters as `blocks.N.{target}.lora_A.weight` / `lora_B.weight` (torch
    /// layout `[r, in]` / `[out, r]`).
    pub fn params(&self) -> Vec<(String, ParamRef<'_, B>)> {
        let mut out = Vec::with_capacity(3 + 9 * self.blocks.len());
        out.push(("wte.weight".to_string(), ParamRef::Matrix(&self.wte.weight)));
        for (i, b) in self.blocks.iter().enumerate() {
            let p = |n: &str| format!("blocks.{i}.{n}.weight");
            out.push((p("attn_out"), ParamRef::Linear(&b.attn_out.weight)));
            out.push((p("attn_norm"), ParamRef::Vector(&b.attn_norm.weight)));
            out.push((p("ff_norm"), ParamRef::Vector(&b.ff_norm.weight)));
            out.push((p("q_proj"), ParamRef::Linear(&b.q_proj.weight)));
            out.push((p("k_proj"), ParamRef::Linear(&b.k_proj.weight)));
            out.push((p("v_proj"), ParamRef::Linear(&b.v_proj.weight)));
            out.push((p("ff_proj"), ParamRef::Linear(&b.ff_proj.weight)));
            out.push((p("up_proj"), ParamRef::Linear(&b.up_proj.weight)));
            out.push((p("ff_out"), ParamRef::Linear(&b.ff_out.weight)));
            crate::lora::block_lora_params(i, b, &mut out);
        }
        out.push((
            "ln_f.weight".to_string(),
            ParamRef::Vector(&self.ln_f.weight),
        ));
        out.push((
            "ff_out.weight".to_string(),
            ParamRef::Linear(&self.ff_out.weight),
        ));
        out
    }

    /// Every base parameter with its Hugging Face name (without the `model.transformer.`
    /// prefix), in torch layout (`[out, in]` for Linear weights, `[d]` for norms), in the
    /// order of the upstream state dict: what a checkpoint holds. LoRA adapters are not
    /// included (see [`LladaModel::lora_tensors`]).
    pub fn named_tensors(&self) -> Vec<(String, NamedTensor<B>)> {
        self.params()
            .into_iter()
            .filter(|(n, _)| !crate::lora::is_adapter_name(n))
            .map(|(n, p)| (n, p.torch_tensor()))
            .collect()
    }
}

impl<B: AutodiffBackend> LladaModel<B> {
    /// The gradient of every parameter (torch layout, HF names without prefix); `None` for a
    /// parameter that did not take part in the loss.
    pub fn named_grads(&self, grads: &B::Gradients) -> Vec<(String, Option<TensorData>)> {
        self.params()
            .into_iter()
            .map(|(n, p)| {
                let g = match p {
                    ParamRef::Linear(w) => w.val().grad(grads).map(|g| g.transpose().into_data()),
                    ParamRef::Matrix(w) => w.val().grad(grads).map(|g| g.into_data()),
                    ParamRef::Vector(w) => w.val().grad(grads).map(|g| g.into_data()),
                };
                (n, g)
            })
            .collect()
    }
}

/// A reference to one parameter of [`LladaModel`], with how it maps to the torch layout.
#[derive(Debug, Clone, Copy)]
pub enum ParamRef<'a, B: Backend> {
    /// A Linear weight stored `[in, out]` (torch: `[out, in]`).
    Linear(&'a Param<Tensor<B, 2>>),
    /// A matrix stored as in torch (the embedding).
    Matrix(&'a Param<Tensor<B, 2>>),
    /// A vector (norm weights).
    Vector(&'a Param<Tensor<B, 1>>),
}

impl<B: Backend> ParamRef<'_, B> {
    /// The value in torch layout.
    pub fn torch_tensor(&self) -> NamedTensor<B> {
        match self {
            ParamRef::Linear(w) => NamedTensor::Matrix(w.val().transpose()),
            ParamRef::Matrix(w) => NamedTensor::Matrix(w.val()),
            ParamRef::Vector(w) => NamedTensor::Vector(w.val()),
        }
    }
}

/// The output projection of a model as plain tensors: `logits = h · W (+ b)`.
///
/// Computes exactly as the last step of [`LladaModel::forward`]: with a compute dtype the
/// input and the weight are cast to it (PyTorch autocast), and the logits come back in f32.
#[derive(Debug, Clone)]
pub struct LmHead<B: Backend> {
    /// `W`: `[d_model, vocab]` (burn layout of `ff_out.weight`).
    pub weight: Tensor<B, 2>,
    /// `b`: `[vocab]` (LLaDA has none).
    pub bias: Option<Tensor<B, 1>>,
    /// Mixed-precision compute dtype (`None`: the weight's dtype).
    pub compute: Option<FloatDType>,
}

impl<B: Backend> LmHead<B> {
    /// `h`: `[batch, seq, d_model]` → logits `[batch, seq, vocab]` (f32 under a compute dtype,
    /// else the weight's dtype), with the ops of `Linear::forward` / [`LladaModel::forward`]
    /// (a batched matmul per sequence, so a row's logits do not depend on the other rows of
    /// the batch).
    pub fn logits3(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        match self.compute {
            None => burn::tensor::module::linear(h, self.weight.clone(), self.bias.clone()),
            Some(c) => {
                let y = cast_to(h, c).matmul(cast_to(self.weight.clone(), c).unsqueeze::<3>());
                let y = match &self.bias {
                    Some(b) => y + cast_to(b.clone(), c).unsqueeze::<3>(),
                    None => y,
                };
                cast_to(y, FloatDType::F32)
            }
        }
    }

    /// `h`: `[rows, d_model]` → logits `[rows, vocab]`: [`LmHead::logits3`] on one sequence.
    pub fn logits(&self, h: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, _] = h.dims();
        self.logits3(h.unsqueeze::<3>()).reshape([n, self.vocab()])
    }

    /// The same head off the autodiff graph and untracked (for passes that compute their own
    /// gradients). burn's `Tensor::detach` keeps `require_grad`, so a detached parameter is a
    /// new tracked leaf and every op on it would still be recorded (and back-propagated, into
    /// nothing); [`stop_grad`] drops the flag too.
    pub fn detach(&self) -> Self {
        Self {
            weight: stop_grad(self.weight.clone()),
            bias: self.bias.clone().map(stop_grad),
            compute: self.compute,
        }
    }

    /// `vocab`, the number of logits per row.
    pub fn vocab(&self) -> usize {
        self.weight.dims()[1]
    }

    /// The dtype the head's matmuls run in.
    pub fn matmul_dtype(&self) -> FloatDType {
        self.compute
            .unwrap_or_else(|| float_dtype(self.weight.dtype()))
    }
}

/// A [`Denoiser`] whose last layer is a separate [`LmHead`] over hidden states, so that a
/// loss can apply the head only at the positions it scores.
pub trait HiddenStates<B: Backend>: Denoiser<B> {
    /// `ids`: `[batch, seq]` → final hidden states `[batch, seq, d_model]`.
    fn hidden(&self, ids: Tensor<B, 2, Int>, attention: &Attention<B>) -> Tensor<B, 3>;
    /// The head that maps hidden rows to logits.
    fn lm_head(&self) -> LmHead<B>;
}

impl<B: Backend> HiddenStates<B> for LladaModel<B> {
    fn hidden(&self, ids: Tensor<B, 2, Int>, attention: &Attention<B>) -> Tensor<B, 3> {
        LladaModel::hidden(self, ids, attention)
    }

    fn lm_head(&self) -> LmHead<B> {
        LladaModel::lm_head(self)
    }
}

impl<B: Backend> Denoiser<B> for LladaModel<B> {
    fn logits(&self, ids: Tensor<B, 2, Int>, attention: &Attention<B>) -> Tensor<B, 3> {
        self.forward(ids, attention)
    }

    fn window_logits(
        &self,
        ids: Tensor<B, 2, Int>,
        attention: &Attention<B>,
        start: usize,
        len: usize,
    ) -> Tensor<B, 3> {
        self.lm_head()
            .logits3(self.hidden(ids, attention).narrow(1, start, len))
    }

    fn window_logits_caching(
        &self,
        ids: Tensor<B, 2, Int>,
        attention: &Attention<B>,
        start: usize,
        len: usize,
    ) -> (Tensor<B, 3>, Option<KvCache<B>>) {
        let (h, cache) = self.hidden_caching(ids, attention);
        (self.lm_head().logits3(h.narrow(1, start, len)), Some(cache))
    }

    fn window_logits_cached(
        &self,
        ids: Tensor<B, 2, Int>,
        attention: &Attention<B>,
        cache: &KvCache<B>,
        query: (usize, usize),
        start: usize,
        len: usize,
    ) -> Result<Tensor<B, 3>, KvCacheError> {
        let (qs, ql) = query;
        if start < qs || start + len > qs + ql {
            return Err(KvCacheError::WindowOutsideQueries {
                window: (start, len),
                query,
            });
        }
        let h = self.hidden_cached(ids, attention, cache, qs, ql)?;
        Ok(self.lm_head().logits3(h.narrow(1, start - qs, len)))
    }

    fn input_vocab(&self) -> Option<usize> {
        Some(self.wte.weight.val().dims()[0])
    }
}

/// A parameter tensor in torch layout, as returned by [`LladaModel::named_tensors`].
#[derive(Debug, Clone)]
pub enum NamedTensor<B: Backend> {
    /// A 1-D tensor (norm weights).
    Vector(Tensor<B, 1>),
    /// A 2-D tensor (embeddings, Linear weights as `[out, in]`).
    Matrix(Tensor<B, 2>),
}

impl<B: Backend> NamedTensor<B> {
    /// The torch shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            NamedTensor::Vector(t) => t.dims().to_vec(),
            NamedTensor::Matrix(t) => t.dims().to_vec(),
        }
    }

    /// The values, row-major in torch layout.
    pub fn to_data(&self) -> TensorData {
        match self {
            NamedTensor::Vector(t) => t.to_data(),
            NamedTensor::Matrix(t) => t.to_data(),
        }
    }
}

/// Where [`LladaModel::from_source`] gets its parameters: a checkpoint reader, a random
/// initialiser, a test. Names are Hugging Face names without the `model.transformer.` prefix.
pub trait ParamSource<B: Backend> {
    /// The error type.
    type Error;
    /// A 2-D tensor of torch shape `shape` (`[out, in]` for Linear weights).
    fn matrix(&mut self, name: &str, shape: [usize; 2]) -> Result<Tensor<B, 2>, Self::Error>;
    /// A 1-D tensor of length `len`.
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor<B, 1>, Self::Error>;
}
