//! LLaDA conditional log-likelihood, Monte-Carlo ELBO estimate (spec §4.4).
//!
//! Port of ML-GSAI/LLaDA `get_log_likelihood.py` (`get_log_likelihood`, `forward_process`,
//! `get_logits`; commit `b7e6c35`). It lives in the sampler crate for now; per the crate charter
//! (`crates/README.md`) it belongs in `mmada-diffusion` once that crate exists.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use mmada_model::{Attention, Denoiser};
use serde::{Deserialize, Serialize};

use crate::SamplerError;
use crate::generate::check_logits;
use crate::host;
use crate::rng::UniformSource;

fn default_mc_num() -> usize {
    128
}
fn default_batch_size() -> usize {
    16
}

/// Parameters of [`log_likelihood`] (upstream defaults `mc_num = 128, batch_size = 16,
/// cfg_scale = 0`). Deserialisable from a recipe (`deny_unknown_fields`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoglikConfig {
    /// Total number of Monte-Carlo samples (multiple of `batch_size`; 1 is enough for
    /// single-token answers, LLaDA App. B.5).
    #[serde(default = "default_mc_num")]
    pub mc_num: usize,
    /// Rows per forward pass (one stratified set of mask counts per batch).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Classifier-free guidance scale (prompt → mask for the unconditional branch).
    #[serde(default)]
    pub cfg_scale: f64,
    /// The mask token id (126336 upstream). Required.
    pub mask_id: u32,
}

impl LoglikConfig {
    /// Upstream defaults with the given mask id.
    pub fn new(mask_id: u32) -> Self {
        LoglikConfig {
            mc_num: 128,
            batch_size: 16,
            cfg_scale: 0.0,
            mask_id,
        }
    }

    /// Checks the fields; the error names the field.
    pub fn validate(&self) -> Result<(), SamplerError> {
        if self.batch_size == 0 {
            return Err(SamplerError::config("batch_size", "must be > 0"));
        }
        if self.mc_num == 0 || !self.mc_num.is_multiple_of(self.batch_size) {
            return Err(SamplerError::config(
                "mc_num",
                format!(
                    "must be a positive multiple of batch_size {}, got {}",
                    self.batch_size, self.mc_num
                ),
            ));
        }
        if !(self.cfg_scale.is_finite() && self.cfg_scale >= 0.0) {
            return Err(SamplerError::config(
                "cfg_scale",
                format!("must be finite and >= 0, got {}", self.cfg_scale),
            ));
        }
        Ok(())
    }
}

/// Which answer positions are masked in each Monte-Carlo round.
pub trait MaskSource {
    /// `[batch_size, answer_len]` row-major, `true` = masked, for round `round`. Every row should
    /// mask at least one position (its weight is `1 / p`, `p = #masked / answer_len`).
    fn answer_masks(
        &mut self,
        round: usize,
        batch_size: usize,
        answer_len: usize,
    ) -> Result<Vec<bool>, SamplerError>;
}

/// The upstream stratified masking (`get_log_likelihood.py::forward_process`): draw
/// `k ~ U{1..l}`, mask counts `n_i = round(linspace(k, k + (b−1)·l/b, b))` wrapped into
/// `[1, l]`, each row masks `n_i` positions chosen by a random permutation.
#[derive(Debug, Clone)]
pub struct StratifiedMasks<R: UniformSource> {
    /// The uniform source.
    pub rng: R,
}

impl<R: UniformSource> StratifiedMasks<R> {
    /// Wraps a uniform source (e.g. [`crate::SeededRng`]).
    pub fn new(rng: R) -> Self {
        StratifiedMasks { rng }
    }

    /// The stratified mask counts `n_i ∈ [1, l]` for `b` rows given the start `k ∈ [1, l]`.
    pub fn counts(k: usize, b: usize, l: usize) -> Vec<usize> {
        let start = k as f64;
        let end = k as f64 + (b as f64 - 1.0) * (l as f64 / b as f64);
        (0..b)
            .map(|i| {
                let v = if b == 1 {
                    start
                } else {
                    start + (end - start) * i as f64 / (b - 1) as f64
                };
                let x = v.round_ties_even() as i64;
                ((x - 1).rem_euclid(l as i64) + 1) as usize
            })
            .collect()
    }
}

impl<R: UniformSource> MaskSource for StratifiedMasks<R> {
    fn answer_masks(
        &mut self,
        _round: usize,
        batch_size: usize,
        answer_len: usize,
    ) -> Result<Vec<bool>, SamplerError> {
        let l = answer_len;
        if l == 0 {
            return Ok(Vec::new());
        }
        let u = self.rng.uniform_f64(1)[0];
        let k = ((u * l as f64) as usize).min(l - 1) + 1;
        let counts = Self::counts(k, batch_size, l);
        let mut out = Vec::with_capacity(batch_size * l);
        for &c in &counts {
            // random permutation (Fisher–Yates), mask its first c entries
            let mut perm: Vec<usize> = (0..l).collect();
            let draws = self.rng.uniform_f64(l);
            for i in (1..l).rev() {
                let j = ((draws[i] * (i + 1) as f64) as usize).min(i);
                perm.swap(i, j);
            }
            let mut row = vec![false; l];
            for &p in &perm[..c] {
                row[p] = true;
            }
            out.extend(row);
        }
        Ok(out)
    }
}

/// Result of [`log_likelihood`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoglikOutput {
    /// The estimate of `log p(answer | prompt)`: `−mean_k loss_k`.
    pub value: f64,
    /// `loss_k = Σ_{rows, masked} CE / p_row / batch_size` for each round `k`.
    pub round_losses: Vec<f64>,
    /// Denoiser evaluations (`mc_num / batch_size`; with CFG each runs a `2·batch_size` batch).
    pub nfe: usize,
}

/// LLaDA `get_log_likelihood` (spec §4.4): Monte-Carlo estimate of `log p(answer | prompt)`.
///
/// * `prompt`: `[Lp]`, `answer`: `[La]` token ids (one example; upstream is unbatched).
/// * Each of the `mc_num / batch_size` rounds builds `[batch_size, Lp + La]` rows with the answer
///   positions chosen by `masks` replaced by the mask id (the prompt is never masked), runs the
///   denoiser (full attention, as upstream calls `model(input)` without a mask; CFG as in
///   `get_logits`) and sums `CE(logits, seq) / p` over the positions equal to the mask id,
///   `p = #masked answer positions / La` per row.
pub fn log_likelihood<B, D, M>(
    model: &D,
    prompt: Tensor<B, 1, Int>,
    answer: Tensor<B, 1, Int>,
    config: &LoglikConfig,
    masks: &mut M,
) -> Result<LoglikOutput, SamplerError>
where
    B: Backend,
    D: Denoiser<B> + ?Sized,
    M: MaskSource + ?Sized,
{
    config.validate()?;
    let device = prompt.device();
    let prompt = host::ints(prompt)?;
    let answer = host::ints(answer)?;
    let (lp, la) = (prompt.len(), answer.len());
    if la == 0 {
        return Err(SamplerError::Shape {
            input: "answer",
            got: vec![0],
            expected: "[answer_len >= 1]".into(),
        });
    }
    let l = lp + la;
    let bs = config.batch_size;
    let mask = i64::from(config.mask_id);
    let seq: Vec<i64> = prompt.iter().chain(&answer).copied().collect();
    let cfg_on = config.cfg_scale > 0.0;
    let rounds = config.mc_num / bs;
    let mut round_losses = Vec::with_capacity(rounds);

    for round in 0..rounds {
        let am = masks.answer_masks(round, bs, la)?;
        if am.len() != bs * la {
            return Err(SamplerError::RandomnessLength {
                source_name: "answer_masks",
                got: am.len(),
                expected: bs * la,
            });
        }
        let mut noisy = Vec::with_capacity(bs * l);
        let mut p_row = Vec::with_capacity(bs);
        for r in 0..bs {
            let row = &am[r * la..(r + 1) * la];
            noisy.extend_from_slice(&prompt);
            noisy.extend(
                answer
                    .iter()
                    .zip(row)
                    .map(|(&t, &m)| if m { mask } else { t }),
            );
            // p_mask = x / target_len (float32 in upstream)
            p_row.push(row.iter().filter(|&&m| m).count() as f32 / la as f32);
        }
        let logits = if cfg_on {
            let mut both = noisy.clone();
            for r in 0..bs {
                both.extend(std::iter::repeat_n(mask, lp));
                both.extend_from_slice(&noisy[r * l + lp..(r + 1) * l]);
            }
            let lg = model.logits(
                host::int_tensor(&both, 2 * bs, l, &device),
                &Attention::Full,
            );
            check_logits(&lg, 2 * bs, l)?;
            let cond = lg.clone().narrow(0, 0, bs);
            let un = lg.narrow(0, bs, bs);
            un.clone() + (cond - un).mul_scalar(config.cfg_scale + 1.0)
        } else {
            let lg = model.logits(host::int_tensor(&noisy, bs, l, &device), &Attention::Full);
            check_logits(&lg, bs, l)?;
            lg
        };
        let vocab = logits.dims()[2];
        if let Some(&bad) = seq.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(SamplerError::IdOutOfVocab {
                what: "prompt/answer",
                id: bad,
                vocab,
            });
        }
        let targets: Vec<i64> = (0..bs).flat_map(|_| seq.iter().copied()).collect();
        let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [bs, l, 1]), &device);
        let logp = host::floats_f32(log_softmax(logits, 2).gather(2, targets))?;
        // mask_index = perturbed == mask_id; loss = Σ CE / p_mask, / batch_size
        let mut loss = 0f64;
        for r in 0..bs {
            for i in 0..l {
                if noisy[r * l + i] == mask {
                    loss += f64::from(-logp[r * l + i] / p_row[r]);
                }
            }
        }
        round_losses.push(loss / bs as f64);
    }
    let value = -round_losses.iter().sum::<f64>() / rounds as f64;
    Ok(LoglikOutput {
        value,
        round_losses,
        nfe: rounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;

    #[test]
    fn stratified_counts_cover_the_range() {
        // l = 10, b = 4, k = 3: linspace(3, 3 + 3·2.5 = 10.5, 4) = [3, 5.5, 8, 10.5] → round half
        // even [3, 6, 8, 10]
        assert_eq!(
            StratifiedMasks::<SeededRng>::counts(3, 4, 10),
            vec![3, 6, 8, 10]
        );
        // wrap: k = 9: [9, 11.5→12, 14, 16.5→16] → ((x−1) mod 10) + 1 = [9, 2, 4, 6]
        assert_eq!(
            StratifiedMasks::<SeededRng>::counts(9, 4, 10),
            vec![9, 2, 4, 6]
        );
        assert_eq!(StratifiedMasks::<SeededRng>::counts(5, 1, 10), vec![5]);
    }

    #[test]
    fn stratified_masks_have_the_drawn_counts() {
        let mut s = StratifiedMasks::new(SeededRng::new(3));
        for round in 0..20 {
            let m = s.answer_masks(round, 4, 10).unwrap();
            assert_eq!(m.len(), 40);
            let counts: Vec<usize> = m
                .chunks(10)
                .map(|r| r.iter().filter(|&&x| x).count())
                .collect();
            assert!(counts.iter().all(|&c| (1..=10).contains(&c)), "{counts:?}");
            // stratified: consecutive counts differ by about l/b = 2.5 (mod l)
            let k = counts[0];
            assert_eq!(counts, StratifiedMasks::<SeededRng>::counts(k, 4, 10));
        }
    }

    #[test]
    fn validate_names_the_field() {
        let mut c = LoglikConfig::new(5);
        c.validate().unwrap();
        c.mc_num = 20;
        assert!(matches!(
            c.validate(),
            Err(SamplerError::InvalidConfig {
                field: "mc_num",
                ..
            })
        ));
        c.batch_size = 0;
        assert!(matches!(
            c.validate(),
            Err(SamplerError::InvalidConfig {
                field: "batch_size",
                ..
            })
        ));
    }
}
