//! The f32 AdamW update in one pass over host buffers.
//!
//! `torch.optim.AdamW` (PyTorch 2.x `torch/optim/adamw.py`, `_single_tensor_adamw`;
//! Loshchilov & Hutter 2019, Algorithm 2) with the operations in the order of burn 0.21's
//! `AdamW` (`burn-optim` `optim/adamw.rs`), element by element:
//! ```text
//! m ← β₁·m + (1 − β₁)·g            (first step: m = (1 − β₁)·g)
//! v ← β₂·v + (1 − β₂)·(g·g)        (first step: v = (1 − β₂)·(g·g))
//! p ← p·(1 − lr·wd) − lr · (m / (1 − β₁ᵗ)) / (sqrt(v / (1 − β₂ᵗ)) + ε)
//! ```
//! Each element goes through the same f32 operations in the same order as burn's sequence of
//! fifteen tensor ops (no fused multiply-add: Rust does not contract `a * b + c`), so the
//! result is bit-identical to it, while the buffers are read and written once instead of
//! about thirty times (`mmada-train`'s `optim` module uses it on the CPU backend and checks
//! the identity in its tests).

use rayon::prelude::*;

/// The scalars of one AdamW update, as f32 as the tensor ops use them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// `β₁`.
    pub beta1: f32,
    /// `β₂`.
    pub beta2: f32,
    /// `ε` (outside the square root).
    pub eps: f32,
    /// The parameter's step count `t` after this update (1 for its first).
    pub time: i32,
    /// Learning rate `lr`.
    pub lr: f64,
    /// Decoupled weight decay `wd` (the parameter is multiplied by `1 − lr·wd`, computed in
    /// f64 and rounded to f32, and not at all when `lr·wd` is 0).
    pub weight_decay: f64,
}

/// Elements per rayon task: 128 KiB of each buffer.
const PIECE: usize = 1 << 15;

/// One AdamW update of `p` in place, with gradient `g` and moments `m`, `v` (all `[n]`).
/// `fresh`: the parameter's first update (`m`, `v` are overwritten, not read).
///
/// # Panics
/// If the four slices differ in length.
pub fn adamw_f32(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    fresh: bool,
    s: AdamWScalars,
) {
    let n = p.len();
    assert!(
        g.len() == n && m.len() == n && v.len() == n,
        "adamw_f32: p, g, m, v have {n}, {}, {}, {} elements",
        g.len(),
        m.len(),
        v.len()
    );
    let (beta1, beta2, eps) = (s.beta1, s.beta2, s.eps);
    let (factor_1, factor_2) = (1.0 - beta1, 1.0 - beta2);
    let (bc1, bc2) = (1f32 - beta1.powi(s.time), 1f32 - beta2.powi(s.time));
    let decay = s.lr * s.weight_decay;
    let keep = (1.0 - decay) as f32;
    let lr = s.lr as f32;
    let k = [beta1, beta2, factor_1, factor_2, bc1, bc2, eps, keep, lr];
    // one branch per piece, not per element: the loops vectorise
    let update = match (fresh, decay != 0.0) {
        (true, true) => update::<true, true>,
        (true, false) => update::<true, false>,
        (false, true) => update::<false, true>,
        (false, false) => update::<false, false>,
    };
    let piece = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| update(p, g, m, v, k);
    if n <= PIECE {
        piece(p, g, m, v);
        return;
    }
    p.par_chunks_mut(PIECE)
        .zip(g.par_chunks(PIECE))
        .zip(m.par_chunks_mut(PIECE))
        .zip(v.par_chunks_mut(PIECE))
        .for_each(|(((p, g), m), v)| piece(p, g, m, v));
}

fn update<const FRESH: bool, const DECAY: bool>(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    [beta1, beta2, factor_1, factor_2, bc1, bc2, eps, keep, lr]: [f32; 9],
) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let gi = g[i];
        let (mi, vi) = if FRESH {
            (gi * factor_1, (gi * gi) * factor_2)
        } else {
            (
                m[i] * beta1 + gi * factor_1,
                v[i] * beta2 + (gi * gi) * factor_2,
            )
        };
        m[i] = mi;
        v[i] = vi;
        let delta = (mi / bc1) / ((vi / bc2).sqrt() + eps);
        let decayed = if DECAY { p[i] * keep } else { p[i] };
        p[i] = decayed - delta * lr;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The op-by-op reference (the order of burn's tensor ops), one element at a time.
    fn reference(p: f32, g: f32, m: f32, v: f32, fresh: bool, s: AdamWScalars) -> (f32, f32, f32) {
        let (f1, f2) = (1.0 - s.beta1, 1.0 - s.beta2);
        let (m, v) = if fresh {
            (g * f1, (g * g) * f2)
        } else {
            (m * s.beta1 + g * f1, v * s.beta2 + (g * g) * f2)
        };
        let m_hat = m / (1f32 - s.beta1.powi(s.time));
        let v_hat = v / (1f32 - s.beta2.powi(s.time));
        let delta = m_hat / (v_hat.sqrt() + s.eps);
        let decay = s.lr * s.weight_decay;
        let p = if decay == 0.0 {
            p
        } else {
            p * (1.0 - decay) as f32
        };
        (p - delta * s.lr as f32, m, v)
    }

    #[test]
    fn equals_the_op_sequence_bit_for_bit_in_every_branch_and_size() {
        let val = |i: usize, k: u64| {
            let x = (i as u64).wrapping_mul(6364136223846793005).wrapping_add(k) >> 40;
            (x as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
        };
        for n in [0, 1, 7, PIECE, 3 * PIECE + 5] {
            for (fresh, wd, time) in [
                (true, 0.01, 1),
                (false, 0.01, 5),
                (true, 0.0, 1),
                (false, 0.0, 12),
            ] {
                let s = AdamWScalars {
                    beta1: 0.9,
                    beta2: 0.95,
                    eps: 1e-8,
                    time,
                    lr: 3e-4,
                    weight_decay: wd,
                };
                let p0: Vec<f32> = (0..n).map(|i| val(i, 1)).collect();
                let g: Vec<f32> = (0..n).map(|i| val(i, 2)).collect();
                let m0: Vec<f32> = (0..n).map(|i| val(i, 3) * 0.1).collect();
                let v0: Vec<f32> = (0..n).map(|i| val(i, 4).abs() * 1e-3).collect();
                let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
                adamw_f32(&mut p, &g, &mut m, &mut v, fresh, s);
                for i in 0..n {
                    let want = reference(p0[i], g[i], m0[i], v0[i], fresh, s);
                    assert_eq!(
                        (p[i].to_bits(), m[i].to_bits(), v[i].to_bits()),
                        (want.0.to_bits(), want.1.to_bits(), want.2.to_bits()),
                        "n {n} fresh {fresh} wd {wd} element {i}"
                    );
                }
                if n > 0 {
                    assert_ne!(p, p0, "the update moves the parameters");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "adamw_f32: p, g, m, v have 4, 3, 4, 4 elements")]
    fn refuses_buffers_of_different_lengths() {
        let s = AdamWScalars {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            time: 1,
            lr: 1e-3,
            weight_decay: 0.0,
        };
        adamw_f32(
            &mut [0.0; 4],
            &[0.0; 3],
            &mut [0.0; 4],
            &mut [0.0; 4],
            true,
            s,
        );
    }
}
