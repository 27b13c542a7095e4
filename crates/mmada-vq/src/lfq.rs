//! `LFQuantizer` (Show-o `models/modeling_magvitv2.py`): lookup-free quantization of a
//! `D`-channel latent to `D`-bit codes (`D` = 13 → 8192 codes).
//!
//! * `z_q = +1` where `z > 0` (strictly: `0.0` and `-0.0` give −1), else −1.
//! * `code = Σ_c [z_c > 0] · 2^(D−1−c)`: channel 0 is the most significant bit.
//! * Codes of a latent grid `[h, w]` are row-major: position `y·w + x`.
//! * Codebook row of code `n`: channel `c` = `2·((n >> (D−1−c)) & 1) − 1` (the buffer
//!   `quantize.embedding` `[2^D, D]`); `quantize.power_vals` = `[2^(D−1), …, 2, 1]` (int64).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::config::QuantizerConfig;
use crate::error::VqError;

/// A latent grid size `(h, w)` in latent positions (image pixels / 16 for the real model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Grid {
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
}

impl Grid {
    /// `h × w`.
    pub fn new(h: usize, w: usize) -> Self {
        Self { h, w }
    }

    /// Number of positions `h·w`.
    pub fn len(&self) -> usize {
        self.h * self.w
    }

    /// True for an empty grid.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The square grid upstream assumes when `decode_code` gets no `shape`:
    /// `h = w = ⌊√len⌋`, here required to be exact.
    ///
    /// # Errors
    /// [`VqError::BadInput`] when `len` is not a perfect square (upstream would fail in
    /// `view`).
    pub fn square(len: usize) -> Result<Self, VqError> {
        let s = len.isqrt();
        if s * s != len || len == 0 {
            return Err(VqError::BadInput {
                what: "codes",
                reason: format!(
                    "{len} codes per image is not a square grid; pass the grid (h, w) explicitly"
                ),
            });
        }
        Ok(Self { h: s, w: s })
    }
}

/// The lookup-free quantizer (no parameters; the two upstream buffers are derived).
#[derive(Debug, Clone, PartialEq)]
pub struct Lfq {
    /// Bits per code = latent channels `D`.
    pub codebook_dim: usize,
    /// Commitment weight `beta`.
    pub beta: f64,
    /// Entropy loss multiplier.
    pub entropy_multiplier: f64,
    /// Commitment loss multiplier.
    pub commit_loss_multiplier: f64,
}

/// Training losses of [`Lfq::losses`] (upstream `quantizer_loss`, `entropy_loss`), `[1]` each.
#[derive(Debug, Clone)]
pub struct LfqLosses<B: Backend> {
    /// `commit_loss_multiplier · (1 + beta) · mean((z_q − z)²)` (forward value).
    pub quantizer_loss: Tensor<B, 1>,
    /// `entropy_multiplier · (mean per-element entropy − mean entropy of the per-channel
    /// mean probabilities)`, with per-bit logits `[−(z−1)², −(z+1)²]`.
    pub entropy_loss: Tensor<B, 1>,
}

impl Lfq {
    /// The quantizer of `cfg`.
    pub fn new(cfg: &QuantizerConfig) -> Self {
        Self {
            codebook_dim: cfg.codebook_dim,
            beta: cfg.beta,
            entropy_multiplier: cfg.entropy_multiplier,
            commit_loss_multiplier: cfg.commit_loss_multiplier,
        }
    }

    /// Number of codes `2^D`.
    pub fn codebook_size(&self) -> usize {
        1 << self.codebook_dim
    }

    /// The buffer `quantize.power_vals`: `[2^(D−1), …, 1]`.
    pub fn power_vals(&self) -> Vec<i64> {
        (0..self.codebook_dim)
            .map(|c| 1i64 << (self.codebook_dim - 1 - c))
            .collect()
    }

    /// The buffer `quantize.embedding` `[2^D, D]`, row-major.
    pub fn embedding(&self) -> Vec<f32> {
        let d = self.codebook_dim;
        let mut out = Vec::with_capacity(self.codebook_size() * d);
        for n in 0..self.codebook_size() {
            for c in 0..d {
                out.push(if (n >> (d - 1 - c)) & 1 == 1 {
                    1.0
                } else {
                    -1.0
                });
            }
        }
        out
    }

    fn check_latent(&self, dims: [usize; 4]) -> Result<(), VqError> {
        if dims[1] != self.codebook_dim {
            return Err(VqError::BadInput {
                what: "latent",
                reason: format!(
                    "shape {dims:?} must be [B, {}, h, w] (one channel per code bit)",
                    self.codebook_dim
                ),
            });
        }
        Ok(())
    }

    /// `z_q` (forward value of upstream `forward(z)['z']`): latent `[B, D, h, w]` → ±1
    /// `[B, D, h, w]`, +1 exactly where `z > 0`.
    ///
    /// # Errors
    /// [`VqError::BadInput`] when the channel count is not `D`.
    pub fn quantize<B: Backend>(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 4>, VqError> {
        self.check_latent(z.dims())?;
        Ok(z.greater_elem(0.0).float() * 2.0 - 1.0)
    }

    /// `get_indices`: latent (or `z_q`) `[B, D, h, w]` → codes `[B, 1, h, w]`.
    ///
    /// # Errors
    /// [`VqError::BadInput`] when the channel count is not `D`.
    pub fn indices<B: Backend>(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 4, Int>, VqError> {
        self.check_latent(z.dims())?;
        let device = z.device();
        let d = self.codebook_dim;
        let powers =
            Tensor::<B, 1, Int>::from_data(TensorData::new(self.power_vals(), [d]), &device)
                .reshape([1, d, 1, 1]);
        Ok((z.greater_elem(0.0).int() * powers).sum_dim(1))
    }

    /// Latent `[B, D, h, w]` → codes `[B, h·w]`, row-major (`get_indices(..).reshape(B, -1)`).
    ///
    /// # Errors
    /// [`VqError::BadInput`] when the channel count is not `D`.
    pub fn codes<B: Backend>(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 2, Int>, VqError> {
        let [b, _, h, w] = z.dims();
        Ok(self.indices(z)?.reshape([b, h * w]))
    }

    /// `get_codebook_entry(codes, shape=(h, w))`: codes `[B, h·w]` → `z_q` `[B, D, h, w]`.
    ///
    /// The codes are read to the host once (to validate their range and expand the bits), a
    /// device sync of `B·h·w` integers.
    ///
    /// # Errors
    /// [`VqError::BadInput`] when `h·w` differs from the number of codes per row,
    /// [`VqError::CodeOutOfRange`] for a code outside `[0, 2^D)`.
    pub fn codebook_entry<B: Backend>(
        &self,
        codes: Tensor<B, 2, Int>,
        grid: Grid,
    ) -> Result<Tensor<B, 4>, VqError> {
        let [b, l] = codes.dims();
        if l != grid.len() || l == 0 {
            return Err(VqError::BadInput {
                what: "codes",
                reason: format!(
                    "{l} codes per image do not fill the grid {}×{} ({} positions)",
                    grid.h,
                    grid.w,
                    grid.len()
                ),
            });
        }
        let device = codes.device();
        let data = codes.into_data();
        let values: Vec<i64> = data.iter::<i64>().collect();
        let d = self.codebook_dim;
        let n = self.codebook_size();
        // [B, D, L]: channel c of position p = bit (D−1−c) of code p.
        let mut out = vec![0f32; b * d * l];
        for (idx, &code) in values.iter().enumerate() {
            if code < 0 || code as usize >= n {
                return Err(VqError::CodeOutOfRange {
                    batch: idx / l,
                    position: idx % l,
                    code,
                    codebook_size: n,
                });
            }
            let (row, pos) = (idx / l, idx % l);
            for c in 0..d {
                let bit = (code >> (d - 1 - c)) & 1;
                out[(row * d + c) * l + pos] = if bit == 1 { 1.0 } else { -1.0 };
            }
        }
        Ok(Tensor::from_data(
            TensorData::new(out, [b, d, grid.h, grid.w]),
            &device,
        ))
    }

    /// The training losses of upstream `forward` (forward values; not needed for inference).
    ///
    /// # Errors
    /// [`VqError::BadInput`] when the channel count is not `D`.
    pub fn losses<B: Backend>(&self, z: Tensor<B, 4>) -> Result<LfqLosses<B>, VqError> {
        let [b, d, h, w] = z.dims();
        self.check_latent(z.dims())?;
        let zq = self.quantize(z.clone())?;
        let mse = (zq - z.clone()).square().mean();
        let quantizer_loss = mse * ((1.0 + self.beta) * self.commit_loss_multiplier);
        // [N, D] with N = B·h·w
        let zf = z.permute([0, 2, 3, 1]).reshape([b * h * w, d]);
        let l_pos = (zf.clone() - 1.0).square().neg(); // logit of z_q = +1
        let l_neg = (zf + 1.0).square().neg(); // logit of z_q = −1
        let logits = Tensor::stack::<3>(vec![l_pos, l_neg], 2); // [N, D, 2]
        let log_p = burn::tensor::activation::log_softmax(logits, 2);
        let p = log_p.clone().exp();
        let entropy = (p.clone() * log_p).sum_dim(2).neg().mean();
        let mean_p = p.mean_dim(0); // [1, D, 2]
        let mean_entropy = (mean_p.clone() * mean_p.log()).sum_dim(2).neg().mean();
        let entropy_loss = (entropy - mean_entropy) * self.entropy_multiplier;
        Ok(LfqLosses {
            quantizer_loss,
            entropy_loss,
        })
    }
}
