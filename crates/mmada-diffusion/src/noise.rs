//! The forward (noising) process.

use rand::{Rng, RngExt};

use crate::schedule::MaskSchedule;
use crate::{DiffusionError, check_len};

/// `ε` of LLaDA's forward process: `p_mask ∈ [ε, 1]`.
pub const DEFAULT_EPS: f32 = 1e-3;

/// `p_mask = (1 − ε)·t + ε`, in f32 as upstream (`GUIDELINES.md::forward_process`).
pub fn p_mask(t: f32, eps: f32) -> f32 {
    (1.0 - eps) * t + eps
}

/// The random draws of one text forward process: mask ratio `t` per row `[batch]` and
/// uniforms `u` `[batch, seq]` (row-major). Position `(b, i)` is masked when `u[b,i] < p_mask(t[b])`.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskDraw {
    /// `t ~ U[0, 1)`, `[batch]`.
    pub t: Vec<f32>,
    /// `u ~ U[0, 1)`, `[batch · seq]`.
    pub u: Vec<f32>,
}

impl MaskDraw {
    /// Draw `t` then `u` from `rng` (in that order, as upstream: `torch.rand(b)` then
    /// `torch.rand(b, l)`).
    pub fn sample(rng: &mut impl Rng, batch: usize, seq: usize) -> Self {
        let t = (0..batch).map(|_| rng.random::<f32>()).collect();
        let u = (0..batch * seq).map(|_| rng.random::<f32>()).collect();
        MaskDraw { t, u }
    }
}

/// A noised batch (host side): what the model sees and what the loss weighs.
#[derive(Debug, Clone, PartialEq)]
pub struct Noised {
    /// Noisy ids `x_t`, `[batch · seq]`.
    pub noisy: Vec<i64>,
    /// `masked[b,i] = (x_t[b,i] == mask_id)`, `[batch · seq]` (upstream `masked_indices`).
    pub masked: Vec<bool>,
    /// `p_mask` per row, `[batch]`.
    pub p_mask: Vec<f32>,
}

/// LLaDA's forward process (`GUIDELINES.md::forward_process`, spec §3.1–3.2).
///
/// `x0`: clean ids `[batch · seq]`; `prompt_lengths`: `Some([batch])` restores the first
/// `prompt_lengths[b]` tokens of each row (SFT), `None` masks everywhere (pretraining).
/// As upstream, `masked` is `x_t == mask_id` after the prompt is restored.
///
/// # Errors
/// [`DiffusionError::Length`] when the arrays do not match `batch × seq`.
pub fn forward_process(
    x0: &[i64],
    batch: usize,
    seq: usize,
    draw: &MaskDraw,
    eps: f32,
    mask_id: i64,
    prompt_lengths: Option<&[usize]>,
) -> Result<Noised, DiffusionError> {
    check_len("x0", x0.len(), batch * seq)?;
    check_len("t", draw.t.len(), batch)?;
    check_len("u", draw.u.len(), batch * seq)?;
    if let Some(p) = prompt_lengths {
        check_len("prompt_lengths", p.len(), batch)?;
    }
    let p: Vec<f32> = draw.t.iter().map(|&t| p_mask(t, eps)).collect();
    let mut noisy = Vec::with_capacity(batch * seq);
    for b in 0..batch {
        let keep = prompt_lengths.map(|pl| pl[b]).unwrap_or(0);
        for i in 0..seq {
            let k = b * seq + i;
            let masked = draw.u[k] < p[b] && i >= keep;
            noisy.push(if masked { mask_id } else { x0[k] });
        }
    }
    let masked = noisy.iter().map(|&x| x == mask_id).collect();
    Ok(Noised {
        noisy,
        masked,
        p_mask: p,
    })
}

/// The random draws of MaskGIT image masking for one row: `tau ~ U(0,1)` and a random
/// score per image position (`torch.rand(N).argsort()`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageMaskDraw {
    /// `τ`.
    pub tau: f32,
    /// One uniform score per image token, `[n_image_tokens]`.
    pub scores: Vec<f32>,
}

impl ImageMaskDraw {
    /// Draw `τ` then the scores.
    pub fn sample(rng: &mut impl Rng, n_tokens: usize) -> Self {
        let tau = rng.random::<f32>();
        ImageMaskDraw {
            tau,
            scores: (0..n_tokens).map(|_| rng.random::<f32>()).collect(),
        }
    }
}

/// MaskGIT image mask with the default cosine schedule: [`image_mask_with`] and
/// [`MaskSchedule::Cosine`].
///
/// # Errors
/// As [`image_mask_with`].
pub fn image_mask(
    draw: &ImageMaskDraw,
    min_masking_rate: f32,
) -> Result<Vec<bool>, DiffusionError> {
    image_mask_with(draw, &MaskSchedule::Cosine, min_masking_rate)
}

/// The image mask ratio of one t2i row (`training/utils.py::mask_or_random_replace_tokens`,
/// spec §3.3): `mask_prob = max(γ(τ), min_masking_rate)` with `γ` the configured
/// `mask_schedule` evaluated in f32 on `τ` (upstream `mask_schedule(torch.rand(B))`).
pub fn image_mask_prob(tau: f32, schedule: &MaskSchedule, min_masking_rate: f32) -> f32 {
    schedule.mask_ratio(f64::from(tau)).max(min_masking_rate)
}

/// MaskGIT image mask (`training/utils.py::mask_or_random_replace_tokens`, spec §3.3):
/// `mask_prob = max(γ(τ), min_masking_rate)` ([`image_mask_prob`]),
/// `n = clamp(round(N·mask_prob), 1, N)`; the `n` positions with the smallest scores are
/// masked (upstream: the first `n` of `torch.rand(N).argsort()`).
/// Returns `[n_image_tokens]`, `true` = masked.
///
/// # Errors
/// [`DiffusionError::Range`] for `min_masking_rate` outside `[0, 1]` or invalid schedule
/// parameters.
pub fn image_mask_with(
    draw: &ImageMaskDraw,
    schedule: &MaskSchedule,
    min_masking_rate: f32,
) -> Result<Vec<bool>, DiffusionError> {
    if !(0.0..=1.0).contains(&min_masking_rate) {
        return Err(DiffusionError::Range {
            what: "min_masking_rate",
            value: min_masking_rate.to_string(),
            why: "must be in [0, 1]",
        });
    }
    schedule.check()?;
    let n_tokens = draw.scores.len();
    let prob = image_mask_prob(draw.tau, schedule, min_masking_rate);
    // torch: (seq_len * mask_prob).round().clamp(min=1), in f32 (round half to even)
    let n = ((n_tokens as f32 * prob).round_ties_even().max(1.0) as usize).min(n_tokens.max(1));
    // rank of each position by score (argsort of argsort), stable on ties
    let mut order: Vec<usize> = (0..n_tokens).collect();
    order.sort_by(|&a, &b| draw.scores[a].total_cmp(&draw.scores[b]));
    let mut mask = vec![false; n_tokens];
    for &i in order.iter().take(n) {
        mask[i] = true;
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn prompt_is_never_masked_and_p_mask_in_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (b, l) = (4, 50);
        let x0: Vec<i64> = (0..(b * l) as i64).map(|i| i % 97).collect();
        let draw = MaskDraw::sample(&mut rng, b, l);
        let n =
            forward_process(&x0, b, l, &draw, DEFAULT_EPS, 999, Some(&[10, 0, 49, 50])).unwrap();
        for r in 0..b {
            assert!(n.p_mask[r] >= DEFAULT_EPS && n.p_mask[r] <= 1.0);
        }
        assert!(n.masked[..10].iter().all(|m| !m));
        assert!(n.masked[2 * l..2 * l + 49].iter().all(|m| !m));
        assert!(n.masked[3 * l..].iter().all(|m| !m));
        // unprotected positions are masked iff u < p
        for i in 10..l {
            assert_eq!(n.masked[i], draw.u[i] < n.p_mask[0]);
        }
        assert!(n.masked.iter().any(|m| *m));
        let err = forward_process(&x0[1..], b, l, &draw, DEFAULT_EPS, 999, None).unwrap_err();
        assert!(err.to_string().contains("`x0`"), "{err}");
    }

    #[test]
    fn image_mask_counts_follow_cosine_schedule() {
        let scores: Vec<f32> = (0..16).map(|i| ((i * 7) % 16) as f32 / 16.0).collect();
        for (tau, expect) in [(0.0f32, 16usize), (1.0, 1), (0.5, 11)] {
            let m = image_mask(
                &ImageMaskDraw {
                    tau,
                    scores: scores.clone(),
                },
                0.0,
            )
            .unwrap();
            assert_eq!(m.iter().filter(|x| **x).count(), expect, "tau {tau}");
        }
        // the masked positions are those with the smallest scores
        let m = image_mask(
            &ImageMaskDraw {
                tau: 1.0,
                scores: scores.clone(),
            },
            0.0,
        )
        .unwrap();
        assert!(m[0] && scores[0] == 0.0);
        let m = image_mask(&ImageMaskDraw { tau: 1.0, scores }, 0.5).unwrap();
        assert_eq!(m.iter().filter(|x| **x).count(), 8);
    }

    #[test]
    fn image_mask_counts_follow_each_schedule() {
        // n = clamp(round(N · max(γ(τ), min)), 1, N) for every schedule, vs the formulas.
        let n_tok = 64usize;
        let scores: Vec<f32> = (0..n_tok).map(|i| ((i * 37) % n_tok) as f32).collect();
        type Case = (MaskSchedule, fn(f64) -> f64);
        let cases: [Case; 4] = [
            (MaskSchedule::Cosine, |t| {
                (t * std::f64::consts::PI * 0.5).cos()
            }),
            (MaskSchedule::Linear, |t| (1.0 - t).clamp(1e-6, 1.0)),
            (MaskSchedule::Pow(2.0), |t| (1.0 - t * t).clamp(1e-6, 1.0)),
            (MaskSchedule::SIGMOID, |t| {
                let s = |x: f64| 1.0 / (1.0 + (-x).exp());
                ((s(3.0) - s(t * 6.0 - 3.0)) / (s(3.0) - s(-3.0))).clamp(1e-6, 1.0)
            }),
        ];
        for (sched, formula) in cases {
            for tau in [0.0f32, 0.1, 0.3, 0.5, 0.77, 0.9, 1.0] {
                for min in [0.0f32, 0.25] {
                    let want_p = formula(f64::from(tau)).max(f64::from(min));
                    let got_p = image_mask_prob(tau, &sched, min);
                    assert!(
                        (f64::from(got_p) - want_p).abs() < 1e-6,
                        "{sched:?} τ={tau}: {got_p} vs {want_p}"
                    );
                    let m = image_mask_with(
                        &ImageMaskDraw {
                            tau,
                            scores: scores.clone(),
                        },
                        &sched,
                        min,
                    )
                    .unwrap();
                    let want_n =
                        ((n_tok as f32 * got_p).round_ties_even().max(1.0) as usize).min(n_tok);
                    assert_eq!(
                        m.iter().filter(|x| **x).count(),
                        want_n,
                        "{sched:?} τ={tau} min={min}"
                    );
                    // the masked positions are the want_n lowest scores
                    for (i, &mi) in m.iter().enumerate() {
                        assert_eq!(mi, (scores[i] as usize) < want_n, "{sched:?} τ={tau} i={i}");
                    }
                }
            }
        }
        // linear at τ = 0.25 masks exactly 48 of 64; pow2 at τ = 0.5 masks 48 (1 − 0.25).
        let d = |tau| ImageMaskDraw {
            tau,
            scores: scores.clone(),
        };
        let count = |m: Vec<bool>| m.iter().filter(|x| **x).count();
        assert_eq!(
            count(image_mask_with(&d(0.25), &MaskSchedule::Linear, 0.0).unwrap()),
            48
        );
        assert_eq!(
            count(image_mask_with(&d(0.5), &MaskSchedule::Pow(2.0), 0.0).unwrap()),
            48
        );
        assert_eq!(
            count(image_mask_with(&d(0.5), &MaskSchedule::SIGMOID, 0.0).unwrap()),
            32
        );
        assert!(image_mask_with(&d(0.5), &MaskSchedule::Pow(0.0), 0.0).is_err());
    }
}
