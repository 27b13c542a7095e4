//! Randomness sources. Every sampler takes its randomness through a trait so that tests can
//! inject the draws recorded from upstream PyTorch runs (exact PyTorch RNG parity is not a goal,
//! spec §9), while production code uses a per-call seeded RNG ([`SeededRng`]) that gives the
//! same result on every backend.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// A source of i.i.d. uniform draws on `[0, 1)`, used by the LLaDA sampler (Gumbel noise,
/// `random` remasking) and by [`crate::loglik::StratifiedMasks`].
pub trait UniformSource {
    /// `n` i.i.d. draws from `U[0, 1)` (f64), the equivalent of `torch.rand(n, dtype=float64)`.
    fn uniform_f64(&mut self, n: usize) -> Vec<f64>;
}

impl<T: UniformSource + ?Sized> UniformSource for &mut T {
    fn uniform_f64(&mut self, n: usize) -> Vec<f64> {
        (**self).uniform_f64(n)
    }
}

/// The default randomness: a `rand` [`StdRng`] seeded once per sampler call. Implements
/// [`UniformSource`] and [`crate::maskgit::MaskGitRandomness`] for every backend; draws are made
/// on the host, so a seed gives the same samples on CPU and GPU.
#[derive(Debug)]
pub struct SeededRng {
    rng: StdRng,
}

impl SeededRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SeededRng {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// One draw from `U[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

impl UniformSource for SeededRng {
    fn uniform_f64(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.rng.random::<f64>()).collect()
    }
}

/// Standard Gumbel noise from a uniform draw, in f32 exactly as upstream MMaDA
/// `models/sampling.py::gumbel_noise`: `-log(clamp(-log(clamp(u, 1e-20)), 1e-20))`.
pub fn gumbel_from_uniform_f32(u: f32) -> f32 {
    let eps = 1e-20f32;
    -(-(u.max(eps)).ln()).max(eps).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_rng_is_reproducible_and_in_range() {
        let a = SeededRng::new(7).uniform_f64(1000);
        let b = SeededRng::new(7).uniform_f64(1000);
        let c = SeededRng::new(8).uniform_f64(1000);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = a.iter().sum::<f64>() / a.len() as f64;
        assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn gumbel_is_finite_and_monotone() {
        assert!(gumbel_from_uniform_f32(0.0).is_finite());
        assert!(gumbel_from_uniform_f32(1.0).is_finite());
        let g1 = gumbel_from_uniform_f32(0.2);
        let g2 = gumbel_from_uniform_f32(0.8);
        assert!(g1 < g2);
        // median of the standard Gumbel: -ln(ln 2)
        let med = gumbel_from_uniform_f32(0.5);
        assert!((med - 0.366_512_9).abs() < 1e-6, "{med}");
    }
}
