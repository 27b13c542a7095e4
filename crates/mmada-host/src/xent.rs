//! The LM head's log-softmax, target gather and cross-entropy gradient in one pass over a
//! chunk of logits.
//!
//! `mmada_diffusion::head` runs the head over the scored rows a chunk at a time and needs, for
//! each row `r` with target `t_r` and upstream `u_r = ∂L/∂logp_r`:
//! ```text
//! logp_r = log_softmax(x_r)[t_r]
//! G_r    = u_r · (onehot(t_r) − softmax(x_r))          (the log-softmax backward)
//! ```
//! As tensor ops that is `log_softmax`, `gather`, `exp`, a broadcast multiply and a
//! `scatter`: four passes over the `[rows, vocab]` chunk, two of them into a new buffer
//! (`log_softmax`, `scatter`), 45 ms for a `[256, 58 560]` chunk on a 2-core AVX2 EPYC. Here
//! each row is read from memory once and rewritten in place while it sits in the cache
//! (15 ms).
//!
//! Every element goes through the same f32 operations in the same order as that op sequence
//! on the CPU backend (burn-flex's fused `log_softmax` — vendor/PATCHED.md item 8 —, its
//! vectorised `exp` and 16-lane sum — item 9 —, then `exp(logp) · (−u)` and `+ u` at the
//! target), so `logp` and `G` are bit-identical to it (tested in `mmada-diffusion`'s `head`
//! module against the op path).

use burn_flex::ops::fast_exp::exp_f32;
use rayon::prelude::*;

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 16;

/// For each row `r` of `logits` (`[rows, vocab]`, row-major): `logp[r] =
/// log_softmax(logits[r])[targets[r]]`; with `upstream`, the row is overwritten by
/// `G_r = u_r · (onehot(t_r) − softmax(logits[r]))` (module docs). Without `upstream` the rows
/// are left in an unspecified state. A row whose entries are all `−∞` gives NaN, as the
/// op sequence does.
///
/// # Panics
/// If `vocab` is 0, if `logits.len() ≠ rows · vocab` for `rows = logp.len()`, if `targets`
/// (or `upstream`) is not `rows` long, or if a target is not below `vocab`.
pub fn log_softmax_gather_grad(
    logits: &mut [f32],
    vocab: usize,
    targets: &[i64],
    upstream: Option<&[f32]>,
    logp: &mut [f32],
) {
    let rows = logp.len();
    assert!(
        vocab > 0 && logits.len() == rows * vocab && targets.len() == rows,
        "log_softmax_gather_grad: {} logits, vocab {vocab}, {} targets, {rows} rows",
        logits.len(),
        targets.len()
    );
    if let Some(u) = upstream {
        assert_eq!(u.len(), rows, "log_softmax_gather_grad: upstream length");
    }
    if let Some(&t) = targets.iter().find(|&&t| t < 0 || t as usize >= vocab) {
        panic!("log_softmax_gather_grad: target {t} not below vocab {vocab} (or negative)");
    }
    logits
        .par_chunks_mut(ROWS_PER_TASK * vocab)
        .zip(logp.par_chunks_mut(ROWS_PER_TASK))
        .enumerate()
        .for_each(|(task, (x, lp))| {
            let first = task * ROWS_PER_TASK;
            for (i, (row, out)) in x.chunks_mut(vocab).zip(lp.iter_mut()).enumerate() {
                let r = first + i;
                *out = one_row(row, targets[r] as usize, upstream.map(|u| u[r]));
            }
        });
}

/// One row (see [`log_softmax_gather_grad`]); returns `logp` at `target`. Compiled for
/// AVX-512 or AVX2 + FMA when the CPU has them (chosen at run time, as burn-flex's `exp`).
#[allow(unsafe_code)] // calling the target-feature variants after the CPU check
fn one_row(x: &mut [f32], target: usize, u: Option<f32>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above)
            return unsafe { one_row_avx512(x, target, u) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above)
            return unsafe { one_row_avx2(x, target, u) };
        }
    }
    one_row_body(x, target, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn one_row_avx512(x: &mut [f32], target: usize, u: Option<f32>) -> f32 {
    one_row_body(x, target, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn one_row_avx2(x: &mut [f32], target: usize, u: Option<f32>) -> f32 {
    one_row_body(x, target, u)
}

/// Three passes over the row, each value computed by the ops' own expressions: the maximum;
/// `Σ exp(x − max)` summed as burn-flex's `sum_f32` sums (16 running lanes over whole groups
/// of 16, the lanes added in order, then the tail); and, with an upstream, `G`. `x − max` is
/// recomputed rather than stored (the same f32 value each time).
#[inline(always)]
fn one_row_body(x: &mut [f32], target: usize, u: Option<f32>) -> f32 {
    let max = max_f32(x);
    if max == f32::NEG_INFINITY {
        x.iter_mut().for_each(|v| *v = f32::NAN);
        return f32::NAN;
    }
    let mut acc = [0f32; 16];
    let groups = x.chunks_exact(16);
    let tail = groups.remainder();
    for c in groups {
        for j in 0..16 {
            acc[j] += exp_f32(c[j] - max);
        }
    }
    let mut sum = 0f32;
    for a in acc {
        sum += a;
    }
    for &t in tail {
        sum += exp_f32(t - max);
    }
    let ln_sum = sum.ln();
    // logp = (x − max) − ln Σ: the fused log-softmax's rounding
    let logp = (x[target] - max) - ln_sum;
    let Some(u) = u else {
        return logp;
    };
    // G = exp(logp) · (−u), + u at the target
    let neg_u = -u;
    for v in x.iter_mut() {
        *v = exp_f32((*v - max) - ln_sum) * neg_u;
    }
    x[target] += u;
    logp
}

/// `max(x)` as burn-flex's log-softmax takes it (`if v > m { v } else { m }` from `−∞`, so
/// NaNs are skipped), over 16 lanes so that it vectorises. Its value does not depend on the
/// order; only the sign of a zero maximum can, which changes no output (`x − (±0)` and
/// `exp(±0)` agree).
#[inline(always)]
fn max_f32(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..16 {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for v in acc.into_iter().chain(tail.iter().copied()) {
        m = if v > m { v } else { m };
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook formulas in f64.
    fn reference(x: &[f32], t: usize, u: f32) -> (f64, Vec<f64>) {
        let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let lse = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        let g = x
            .iter()
            .enumerate()
            .map(|(j, &v)| u as f64 * ((j == t) as u8 as f64 - (v as f64 - lse).exp()))
            .collect();
        (x[t] as f64 - lse, g)
    }

    fn logits(rows: usize, vocab: usize) -> Vec<f32> {
        (0..rows * vocab)
            .map(|i| ((i as u64 * 2_654_435_761 % 10_007) as f32 / 10_007.0 - 0.5) * 12.0)
            .collect()
    }

    /// Values and gradient against the f64 formulas, for row counts around a task's rows
    /// and a vocabulary that is not a multiple of the 16 lanes.
    #[test]
    fn matches_the_formulas() {
        for rows in [1, 15, 16, 17, 40] {
            let vocab = 1_003;
            let x = logits(rows, vocab);
            let targets: Vec<i64> = (0..rows).map(|r| ((r * 97 + 5) % vocab) as i64).collect();
            let u: Vec<f32> = (0..rows).map(|r| 0.5 - r as f32 * 0.03).collect();
            let mut g = x.clone();
            let mut lp = vec![0f32; rows];
            log_softmax_gather_grad(&mut g, vocab, &targets, Some(&u), &mut lp);
            let mut lp_only = vec![0f32; rows];
            log_softmax_gather_grad(&mut x.clone(), vocab, &targets, None, &mut lp_only);
            for r in 0..rows {
                let (want_lp, want_g) =
                    reference(&x[r * vocab..(r + 1) * vocab], targets[r] as usize, u[r]);
                assert!(
                    (lp[r] as f64 - want_lp).abs() < 1e-5,
                    "row {r}: {} vs {want_lp}",
                    lp[r]
                );
                assert_eq!(
                    lp[r], lp_only[r],
                    "row {r}: logp with and without the gradient"
                );
                for (j, w) in want_g.iter().enumerate() {
                    let got = g[r * vocab + j] as f64;
                    assert!((got - w).abs() < 1e-6, "row {r} col {j}: {got} vs {w}");
                }
                // the gradient of a log-probability sums to 0 over the vocabulary
                let s: f64 = g[r * vocab..(r + 1) * vocab]
                    .iter()
                    .map(|&v| v as f64)
                    .sum();
                assert!(s.abs() < 1e-5, "row {r}: Σ G = {s}");
            }
        }
    }

    /// A row of −∞ gives NaN (as log-softmax does); −∞ entries elsewhere get probability 0.
    #[test]
    fn infinities() {
        let vocab = 20;
        let mut x = vec![f32::NEG_INFINITY; 2 * vocab];
        x[vocab + 3] = 1.0;
        x[vocab + 4] = 1.0;
        let mut lp = [0f32; 2];
        log_softmax_gather_grad(&mut x, vocab, &[0, 3], Some(&[1.0, 1.0]), &mut lp);
        assert!(lp[0].is_nan());
        assert!(x[..vocab].iter().all(|v| v.is_nan()));
        assert!((lp[1] - (0.5f32).ln()).abs() < 1e-6);
        assert_eq!(x[vocab], 0.0);
        assert!((x[vocab + 3] - 0.5).abs() < 1e-6 && (x[vocab + 4] + 0.5).abs() < 1e-6);
    }

    #[test]
    #[should_panic(expected = "not below vocab")]
    fn target_out_of_range() {
        let mut x = vec![0f32; 8];
        log_softmax_gather_grad(&mut x, 4, &[1, 4], None, &mut [0f32; 2]);
    }
}
